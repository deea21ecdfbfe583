"""The one cross-attention object per model.

``SceneAttention`` is installed once on every cross-attention layer of a UNet (by the host adapter)
and holds the parts that act there:

- ``CategoryGate``: the mask-guided gate of the Category-Wise Generator. Product queries attend a
  *category-free context* (the same prompt encoded with the identifier left out), background queries
  the full one. CLIP text encoders are causal, so every row after the identifier (the rest of the
  prompt, the end token, the padding) carries the category; only a context encoded without it is
  free of it. At strength 1 a product position's output is exactly independent of the category.
- ``AttentionCapture``: records per-token attention maps at the resolutions a training loss needs,
  keeping only the selected token columns, never full probabilities.
- ``ReferenceInjection``: decoupled cross-attention to reference-image tokens (the personality
  adapter), gated by the background so the product receives nothing.

Objects are immutable from the outside: ``with_gate`` and friends return a new ``SceneAttention``.
Only per-resolution caches change inside them.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .dit import patch_tokens
from .errors import ProductSceneError
from .masks import grow, resize_to_layer, validate_mask

Kernel = Callable[..., torch.Tensor]  # kernel(q, k, v, heads) -> [B, Nq, heads*dim]
Projector = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # context -> this layer's (k, v)


@dataclass(frozen=True)
class LayerInfo:
    """Where an attention call happens. Built by the host adapter for every call."""

    key: tuple
    heads: int
    hw: tuple[int, int]
    latent_hw: tuple[int, int]
    chunks: tuple[int, ...] = (0,)  # one entry per batch chunk: 0 = cond, 1 = uncond
    progress: float | None = None  # fraction of the sampling schedule done, 0..1
    gated: tuple | None = None  # per gate, the batch rows it acts on (``SceneAttention.gated_rows``);
    #                             None: every cond row


def unet_cross_attention(unet: torch.nn.Module) -> dict[tuple[str, int, int], torch.nn.Module]:
    """``{key: attn2 module}`` of every cross-attention layer of an SD-style UNet (``input_blocks``,
    ``middle_block``, ``output_blocks``), keyed as ComfyUI keys attn2 replaces: ``("input", 4, 0)``."""
    groups = [("input", enumerate(unet.input_blocks)), ("middle", [(0, unet.middle_block)]),
              ("output", enumerate(unet.output_blocks))]
    layers = {}
    for name, blocks in groups:
        for index, block in blocks:
            for module in block:
                for t, transformer in enumerate(getattr(module, "transformer_blocks", ())):
                    if getattr(transformer, "attn2", None) is not None:
                        layers[(name, index, t)] = transformer.attn2
    if not layers:
        raise ProductSceneError("model: found no cross-attention layers; expected an SD1.5, SD2.x or SDXL UNet")
    return layers


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Reference kernel: torch's scaled dot-product attention (no mask: the fast kernels apply)."""
    b, nq, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, nq, inner)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax probabilities [B, heads, Nq, Nk], computed explicitly (used only where captured)."""
    b, nq, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, nq, heads, d).transpose(1, 2)
    kh = k.reshape(b, -1, heads, d).transpose(1, 2)
    logits = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    return logits.softmax(dim=-1)


def downsampled_hw(latent_hw: Sequence[int], factor: int) -> tuple[int, int]:
    """The h, w of the UNet level ``factor`` times below the latent (stride-2 convs round up)."""
    h, w = latent_hw
    while factor > 1:
        h, w, factor = -(-h // 2), -(-w // 2), factor // 2
    return int(h), int(w)


class ProductRegion:
    """A product mask ``[Bm, H, W]`` (1 = product) as every layer sees it: a layer cell is product
    when any pixel of the mask, grown by ``grow_latent_px`` latent pixels, falls in it (max-pool,
    never a blur that leaks across the edge)."""

    def __init__(self, mask: torch.Tensor, grow_latent_px: int = 0, name: str = "mask"):
        validate_mask(mask, name=name)
        if int(grow_latent_px) < 0:
            raise ProductSceneError(f"grow_latent_px: expected 0 or more latent pixels, got {grow_latent_px}")
        self.mask = mask.detach().float()  # stays where it was given (training: on the model's device)
        self.grow_latent_px = int(grow_latent_px)
        self._queries: dict = {}

    @property
    def images(self) -> int:
        return int(self.mask.shape[0])

    def queries(self, hw: tuple[int, int], latent_hw: tuple[int, int], device) -> torch.Tensor:
        """[Bm, h*w] bool: the product positions of a layer of size ``hw`` (computed once per layer
        size and device, where the mask lives, then moved once)."""
        key = (tuple(hw), tuple(latent_hw), str(device))
        cached = self._queries.get(key)
        if cached is None:
            m = grow(resize_to_layer(self.mask, *latent_hw), self.grow_latent_px)
            cached = (resize_to_layer(m, *hw) > 0.5).flatten(1).to(device)
            self._queries[key] = cached
        return cached

    def dit_tokens(self, latent_hw: tuple[int, int], patch: int) -> torch.Tensor:
        """[Bm, tokens] bool: the product image tokens of a DiT's patch grid (``dit.patch_tokens``),
        computed once per latent size and patch."""
        key = ("dit", tuple(latent_hw), int(patch))
        cached = self._queries.get(key)
        if cached is None:
            cached = self._queries[key] = patch_tokens(self.mask, tuple(latent_hw), patch, self.grow_latent_px)
        return cached

    def for_rows(self, rows: torch.Tensor, per_chunk: int, hw, latent_hw, device) -> torch.Tensor:
        """[len(rows), h*w] bool for batch ``rows`` (row r holds image r % per_chunk)."""
        product = self.queries(hw, latent_hw, device)
        if product.shape[0] == 1:
            return product.expand(len(rows), -1)
        return product[(rows % per_chunk).to(product.device)]

    def to(self, device) -> "ProductRegion":
        self.mask = self.mask.to(device)
        return self


class CategoryGate:
    """Keeps the category off product pixels: their queries attend ``free_context``.

    ``free_context``: ``[1, R, C]`` the prompt encoded with the identifier left out (ProductScene's
    Category Tokens and trainer make it with ``prompt.category_free_template``); its key/value rows
    are projected by each layer's own to_k/to_v. ``contexts``: the full conditioning(s) ``[1, N, C]``
    this gate belongs to; a host that sees the raw conditioning gates only the cond rows whose
    context is one of them (so ConditioningCombine of two categories gates each with its own). With
    no contexts (training, or a host that cannot match) every cond row is gated.

    ``strength`` s: a product position's output is ``(1 - s) * full + s * free`` (the output of
    attention to the full and to the category-free context): 0 = no gate, 1 = exactly the free one.
    """

    def __init__(self, mask: torch.Tensor, free_context: torch.Tensor, strength: float = 1.0,
                 grow_latent_px: int = 0, contexts: Sequence[torch.Tensor] = ()):
        self.region = ProductRegion(mask, grow_latent_px)
        if not isinstance(free_context, torch.Tensor) or free_context.dim() != 3 or free_context.shape[0] != 1:
            raise ProductSceneError(
                "category_tokens: expected the category-free context as a [1, rows, width] tensor, got "
                f"{list(free_context.shape) if isinstance(free_context, torch.Tensor) else type(free_context).__name__}")
        if not torch.isfinite(free_context).all():
            raise ProductSceneError("category_tokens: the category-free context contains NaN/inf")
        if not 0.0 <= float(strength) <= 1.0:
            raise ProductSceneError(f"strength: expected a value from 0 to 1, got {strength}")
        self.free_context = free_context.detach()
        self.contexts = tuple(c.detach() for c in contexts)
        for c in self.contexts:
            if c.dim() != 3 or c.shape[0] != 1 or c.shape[-1] != free_context.shape[-1]:
                raise ProductSceneError(
                    f"category_tokens: a context of shape {list(c.shape)} does not pair with a free context of "
                    f"width {free_context.shape[-1]}")
        self.strength = float(strength)
        self._on: dict = {}

    @property
    def mask(self) -> torch.Tensor:
        return self.region.mask

    def product_queries(self, hw, latent_hw, device) -> torch.Tensor:
        return self.region.queries(hw, latent_hw, device)

    def matches(self, context: torch.Tensor) -> bool:
        """Whether one batch row's context ``[N, C]`` is a conditioning this gate belongs to
        (ComfyUI repeats a shorter context to a common length: every repeat must be the gate's own,
        so a prompt concatenated after it does not match)."""
        for c in self.contexts:
            rows = c.shape[1]
            if context.shape[0] % rows == 0 and context.shape[-1] == c.shape[-1]:
                key = (str(context.device), context.dtype, id(c))
                ref = self._on.get(key)
                if ref is None:
                    ref = self._on[key] = c[0].to(device=context.device, dtype=context.dtype)
                if torch.equal(context.reshape(-1, rows, context.shape[-1]), ref.expand(context.shape[0] // rows, -1, -1)):
                    return True
        return False

    def free_projection(self, project: Projector, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (k, v) of the category-free context, ``[1, R, inner]`` each."""
        return project(self.free_context.to(device=device, dtype=dtype))

    def to(self, device) -> "CategoryGate":
        """Move the tensors where the model runs (the host's load hand-off); values never change."""
        self.region.to(device)
        self.free_context = self.free_context.to(device)
        return self

    def __deepcopy__(self, memo):  # immutable: ComfyUI deep-copies model_options on every clone
        return self


class AttentionCapture:
    """Records, for each named token, its attention map at the layers a loss needs.

    ``token_rows`` maps a name to the context rows of its token (several rows are summed): one
    sequence of rows for every prompt of the batch, or one sequence per prompt (prompts of a batch
    may hold different tokens at different rows, e.g. Break-A-Scene's union sampling; an empty
    sequence gives a zero map for that prompt). ``downsample`` selects layers whose size is the
    latent's divided by it (Break-A-Scene uses 16x16 at 512 px: 4); ``None`` captures every
    cross-attention layer. Maps keep their autograd graph, so a loss on them trains the UNet and
    the embeddings. Only the selected token columns are kept, never full probabilities.
    """

    def __init__(self, token_rows: Mapping[str, Sequence[int] | Sequence[Sequence[int]]],
                 downsample: int | None = None):
        if not token_rows:
            raise ProductSceneError("token_rows: expected at least one token to capture")
        self.token_rows = {}
        for name, rows in token_rows.items():
            rows = list(rows)
            per_prompt = bool(rows) and not isinstance(rows[0], numbers.Integral)
            self.token_rows[name] = (tuple(tuple(int(r) for r in item) for item in rows) if per_prompt
                                     else tuple(int(r) for r in rows))
        self.downsample = downsample
        self._maps: dict[str, list[torch.Tensor]] = {name: [] for name in self.token_rows}
        self._columns: dict = {}

    def wants(self, layer: LayerInfo) -> bool:
        return self.downsample is None or tuple(layer.hw) == downsampled_hw(layer.latent_hw, self.downsample)

    def columns(self, name: str, batch: int, nk: int, device) -> torch.Tensor:
        """[batch, Nk] 0/1: the key columns of ``name`` for every prompt of the batch."""
        key = (name, batch, nk, str(device))
        cached = self._columns.get(key)
        if cached is None:
            rows = self.token_rows[name]
            per_prompt = rows if rows and not isinstance(rows[0], int) else (rows,)
            if batch % len(per_prompt):
                raise ProductSceneError(f"capture: {len(per_prompt)} prompts' rows for a batch of {batch}")
            cached = torch.zeros(len(per_prompt), nk)
            for i, item in enumerate(per_prompt):
                cached[i, [r for r in item if r < nk]] = 1.0
            cached = cached.repeat(batch // len(per_prompt), 1).to(device)
            self._columns[key] = cached
        return cached

    def record(self, probs: torch.Tensor, layer: LayerInfo, weight: torch.Tensor | None = None) -> None:
        """``probs`` [B, heads, Nq, Nk] of the full context; ``weight`` [B, Nq] the share of each
        query's output that came from it (a gate gives product queries the free context instead)."""
        h, w = layer.hw
        mean = probs.mean(dim=1)  # over heads: [B, Nq, Nk]
        b, _, nk = mean.shape
        for name in self.token_rows:
            cols = self.columns(name, b, nk, mean.device).to(mean.dtype)
            amap = (mean @ cols[:, :, None])[..., 0]
            if weight is not None:
                amap = amap * weight.to(amap.dtype)
            self._maps[name].append(amap.reshape(b, h, w))

    def maps(self) -> dict[str, torch.Tensor]:
        """name -> [B, h, w], the mean over captured layers (all captured layers share one size
        when ``downsample`` is set; with ``None`` each layer is resized to the largest first)."""
        out = {}
        for name, maps in self._maps.items():
            if not maps:
                raise ProductSceneError(
                    f"capture: no cross-attention layer matched for '{name}' (downsample={self.downsample})")
            size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
            resized = [m if m.shape[-2:] == size else F.interpolate(m[:, None], size=size, mode="nearest")[:, 0]
                       for m in maps]
            out[name] = torch.stack(resized).mean(0)
        return out

    def layer_maps(self, name: str) -> list[torch.Tensor]:
        return list(self._maps[name])

    def clear(self) -> None:
        for maps in self._maps.values():
            maps.clear()


class ReferenceInjection:
    """Decoupled cross-attention to reference tokens (IP-Adapter style) gated to the background.

    ``tokens``: [1 or B, K, C] reference tokens for cond rows; ``negative``: the same for uncond
    rows (None: uncond rows get ``tokens`` too, so CFG does not amplify the reference and ``weight``
    alone sets its strength); ``projections``: layer key -> (to_k, to_v) linear modules
    mapping C to that layer's inner width; ``product_mask``: the product that must receive nothing.
    Active while ``start <= progress <= end``; ``weight`` 0 adds nothing. ``layer_weights``
    (``{layer key: weight}``, see ``productscene.blocks``) replaces ``weight`` per layer: a layer
    it does not name, or names with 0, is left exactly as it was.

    ``models``: the host's models that hold the projections' weights (ComfyUI: a ModelPatcher of
    the adapter), listed by :meth:`models` so the host loads, offloads and counts them with the
    UNet; the injection never moves them itself. Weights the host left on another device (a
    low-memory partial load) are copied to the queries' device for each call.
    """

    def __init__(self, tokens: torch.Tensor, projections: Mapping[tuple, tuple[torch.nn.Module, torch.nn.Module]],
                 product_mask: torch.Tensor, weight: float = 1.0, start: float = 0.0, end: float = 1.0,
                 negative: torch.Tensor | None = None, models: Sequence = (),
                 layer_weights: Mapping[tuple, float] | None = None):
        for name, t in (("reference tokens", tokens), ("negative reference tokens", negative)):
            if t is not None and t.ndim != 3:
                raise ProductSceneError(f"{name}: expected [B, K, C], got shape {tuple(t.shape)}")
        if not (math.isfinite(float(weight)) and 0.0 <= float(weight) <= 10.0):
            raise ProductSceneError(f"weight: expected a number from 0 to 10, got {weight!r}")
        if not (0.0 <= start < end <= 1.0):
            raise ProductSceneError(f"start/end: expected 0 <= start < end <= 1, got {start}, {end}")
        for key, w in (layer_weights or {}).items():
            if not (math.isfinite(float(w)) and 0.0 <= float(w) <= 10.0):
                raise ProductSceneError(f"block_weights: the weight of {key} must be from 0 to 10, got {w!r}")
        self.layer_weights = None if layer_weights is None else {tuple(k): float(w) for k, w in layer_weights.items()}
        self.tokens = tokens
        self.negative = negative
        self.projections = dict(projections)
        self.weight = float(weight)
        self.start, self.end = float(start), float(end)
        self.region = ProductRegion(product_mask, name="product_mask")
        self.host_models = tuple(models)

    @property
    def mask(self) -> torch.Tensor:
        return self.region.mask

    def weight_at(self, key: tuple) -> float:
        return self.weight if self.layer_weights is None else self.layer_weights.get(tuple(key), 0.0)

    def active(self, layer: LayerInfo) -> bool:
        if self.weight_at(layer.key) == 0.0 or layer.key not in self.projections:
            return False
        return layer.progress is None or self.start <= layer.progress <= self.end

    def _rows_tokens(self, tokens: torch.Tensor, n: int, q: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(device=q.device)
        if tokens.shape[0] == 1:
            return tokens.expand(n, -1, -1)
        if n % tokens.shape[0]:
            raise ProductSceneError(f"reference: {tokens.shape[0]} references for a batch of {n} images; "
                                    "give one reference (or combined references), or one per image")
        return tokens.repeat(n // tokens.shape[0], 1, 1)

    def __call__(self, q: torch.Tensor, layer: LayerInfo, kernel: Kernel) -> torch.Tensor:
        to_k, to_v = self.projections[layer.key]
        b = q.shape[0]
        chunks = layer.chunks if b % len(layer.chunks) == 0 else (0,)
        per_chunk = b // len(chunks)
        out = torch.zeros_like(q)
        for i, kind in enumerate(chunks):
            tokens = self.tokens if kind == 0 or self.negative is None else self.negative
            rows = slice(i * per_chunk, (i + 1) * per_chunk)
            t = self._rows_tokens(tokens, per_chunk, q)
            out[rows] = kernel(q[rows], _project(to_k, t, q), _project(to_v, t, q), layer.heads)
        product = self.region.queries(layer.hw, layer.latent_hw, q.device)
        background = (~product).to(q.dtype)
        background = background.repeat(per_chunk // background.shape[0], 1) if background.shape[0] != per_chunk \
            else background
        background = background.repeat(len(chunks), 1)
        return out * (self.weight_at(layer.key) * background[:, :, None])

    def to(self, device) -> "ReferenceInjection":
        """The per-image tensors follow the model; the projections are the host models' to move."""
        self.tokens = self.tokens.to(device)
        if self.negative is not None:
            self.negative = self.negative.to(device)
        self.region.to(device)
        return self

    def models(self) -> list:
        return list(self.host_models)

    def __deepcopy__(self, memo):
        return self


def _project(linear: torch.nn.Module, tokens: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``linear(tokens)`` in the weight's dtype on the queries' device, returned in the queries' dtype."""
    weight = linear.weight.to(q.device)
    bias = linear.bias.to(q.device) if linear.bias is not None else None
    return F.linear(tokens.to(device=q.device, dtype=weight.dtype), weight, bias).to(q.dtype)


class SceneAttention:
    """The attention object installed on every cross-attention layer of one model."""

    def __init__(self, gates: Sequence[CategoryGate] = (), capture: AttentionCapture | None = None,
                 injections: Sequence[ReferenceInjection] = ()):
        self.gates = tuple(gates)
        self.capture = capture
        self.injections = tuple(injections)

    def with_gate(self, gate: CategoryGate) -> "SceneAttention":
        return SceneAttention(self.gates + (gate,), self.capture, self.injections)

    def with_capture(self, capture: AttentionCapture | None) -> "SceneAttention":
        return SceneAttention(self.gates, capture, self.injections)

    def with_injection(self, injection: ReferenceInjection) -> "SceneAttention":
        return SceneAttention(self.gates, self.capture, self.injections + (injection,))

    def merged(self, other: "SceneAttention") -> "SceneAttention":
        """Both objects' parts in one (a second node patching an already patched model)."""
        return SceneAttention(self.gates + other.gates, other.capture or self.capture,
                              self.injections + other.injections)

    def __deepcopy__(self, memo):
        return self

    def to(self, device) -> "SceneAttention":
        """Host hand-off when the model moves: the parts' tensors follow it to ``device``."""
        for part in self.gates + self.injections:
            part.to(device)
        return self

    def models(self) -> list:
        """Models the parts need loaded beside the UNet (the host loads them with it)."""
        return [m for part in self.injections for m in part.models()]

    def check_batch(self, images: int) -> None:
        """Raise before sampling when a gate's mask batch cannot pair with ``images`` latents."""
        for gate in self.gates + self.injections:
            bm = gate.mask.shape[0]
            if bm not in (1, images):
                raise ProductSceneError(
                    f"mask: {bm} product masks for a batch of {images} images; give one mask, or one per image")

    def check_aspect(self, latent_hw: tuple[int, int], tolerance: float = 0.05) -> None:
        """Raise when a gate's mask has another aspect ratio than the latent it will be resized to."""
        lh, lw = latent_hw
        for gate in self.gates + self.injections:
            mh, mw = gate.mask.shape[-2:]
            if abs(mh / mw - lh / lw) > tolerance * (lh / lw):
                raise ProductSceneError(
                    f"mask: the product mask is {mw}x{mh} but the image being generated is {lw * 8}x{lh * 8}; "
                    "use the mask made from the same image as the latent")

    def check_contexts(self, positives: Sequence[torch.Tensor]) -> None:
        """Raise before sampling when a gate's conditioning is none of the sampler's positive ones
        (``[1, N, C]`` each): the gate would act on nothing and the category would reach the product."""
        for gate in self.gates:
            if gate.contexts and not any(gate.matches(c[0]) for c in positives if c is not None and c.dim() == 3):
                raise ProductSceneError(
                    "category_tokens: the positive conditioning reaching the sampler is not the prompt Category "
                    "Tokens encoded for Masked Category Attention. Connect Category Tokens' CONDITIONING to the "
                    "sampler's positive input (combining it with other conditioning, areas and masks keep it; "
                    "averaging, concatenating or re-encoding it do not).")

    def gated_rows(self, chunks: Sequence[int], batch: int, contexts: torch.Tensor | None = None) -> tuple:
        """Per gate, the batch rows it acts on (LongTensor): cond rows (chunk kind 0) whose context
        (``contexts[row]``, when given) is one the gate belongs to; every cond row for a gate that
        names none, or when no contexts are given."""
        chunks = tuple(chunks) if chunks and batch % len(chunks) == 0 else (0,)
        per_chunk = batch // len(chunks)
        cond = [i * per_chunk + j for i, kind in enumerate(chunks) if kind == 0 for j in range(per_chunk)]
        out = []
        for gate in self.gates:
            rows = cond if contexts is None or not gate.contexts else [r for r in cond if gate.matches(contexts[r])]
            out.append(torch.tensor(rows, dtype=torch.long))
        return tuple(out)

    def check_dit(self) -> None:
        """Raise before sampling what this object cannot do on a DiT yet: personality injection and
        attention capture have their place here (``dit_streams`` would hand them the image rows of
        each joint attention) but are not built; a gate strength between 0 and 1 has no single-call
        form in joint attention (the block mask chooses one stream per query)."""
        if self.injections or self.capture is not None:
            raise ProductSceneError("model: Apply Personality and attention capture are not available on DiT models "
                                    "(Flux, Z-Image) yet; only Masked Category Attention is")
        for gate in self.gates:
            if gate.strength not in (0.0, 1.0):
                raise ProductSceneError(f"strength: on DiT models (Flux, Z-Image) the gate is on (1) or off (0), got "
                                        f"{gate.strength:g}; a blend has no exact form in joint attention")

    def dit_streams(self, context: torch.Tensor, chunks: Sequence[int], latent_hw: tuple[int, int], patch: int):
        """What one DiT call needs for the two text streams (``productscene.dit``), or None when
        no gate acts on any row of this call: ``(free [B, Nf, C], free_valid [B], product [B, P],
        gated [B] bool)``. ``context``: the call's T ``[B, Nt, C]``; each row is matched to the gate
        whose conditioning it carries (every cond row when the gate names none); rows of no gate
        carry the first gate's F, unseen by their image tokens."""
        self.check_dit()
        b = context.shape[0]
        chunks = tuple(chunks) if chunks and b % len(chunks) == 0 else (0,)
        per_chunk = b // len(chunks)
        self.check_batch(per_chunk)
        owner = [-1] * b
        for g, rows in enumerate(self.gated_rows(chunks, b, context)):
            if self.gates[g].strength == 0.0:
                continue
            for r in rows.tolist():
                owner[r] = g if owner[r] < 0 else owner[r]
        if all(o < 0 for o in owner):
            return None
        width = max(g.free_context.shape[1] for g in self.gates)
        free = context.new_zeros(b, width, context.shape[-1])
        valid = torch.zeros(b, dtype=torch.long)
        product = torch.zeros(b, *(-(-int(s) // patch) for s in latent_hw), dtype=torch.bool).flatten(1)
        for r in range(b):
            gate = self.gates[max(owner[r], 0)]
            rows = gate.free_context.shape[1]
            free[r, :rows] = gate.free_context[0].to(device=context.device, dtype=context.dtype)
            valid[r] = rows
            if owner[r] >= 0:
                tokens = gate.region.dit_tokens(latent_hw, patch)
                product[r] = tokens[0 if tokens.shape[0] == 1 else r % per_chunk].cpu()
        gated = torch.tensor([o >= 0 for o in owner])
        return free, valid, product.to(context.device), gated

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerInfo,
                 kernel: Kernel = sdpa, project: Projector | None = None) -> torch.Tensor:
        """Cross-attention of one layer. ``project(context) -> (k, v)`` applies this layer's own
        to_k/to_v (the gates need it for their category-free contexts)."""
        b, nq, inner = q.shape
        capture = self.capture if self.capture is not None and self.capture.wants(layer) else None
        if capture is not None:
            probs = attention_probs(q, k, layer.heads)
            vh = v.reshape(b, -1, layer.heads, inner // layer.heads).transpose(1, 2)
            out = (probs.to(v.dtype) @ vh).transpose(1, 2).reshape(b, nq, inner)
        else:
            out = kernel(q, k, v, layer.heads)
        weight = None
        if self.gates:
            if project is None:
                raise ProductSceneError("scene: a category gate needs the layer's key/value projections")
            chunks = layer.chunks if b % len(layer.chunks) == 0 else (0,)
            per_chunk = b // len(chunks)
            self.check_batch(per_chunk)
            gated = layer.gated if layer.gated is not None else self.gated_rows(chunks, b)
            for gate, rows in zip(self.gates, gated):
                if gate.strength == 0.0 or rows.numel() == 0:
                    continue
                product = gate.region.for_rows(rows, per_chunk, layer.hw, layer.latent_hw, q.device)
                if product.shape[1] != nq:
                    raise ProductSceneError(
                        f"mask: layer {layer.key} has {nq} positions, expected {product.shape[1]} from its size {layer.hw}")
                fk, fv = gate.free_projection(project, q.device, k.dtype)
                n = rows.numel()
                whole = n == b  # every row gated (no CFG batch, training): no gather/scatter
                index = rows.to(q.device)
                q_rows = q if whole else q.index_select(0, index)
                free = kernel(q_rows, fk.expand(n, -1, -1), fv.expand(n, -1, -1), layer.heads)
                full = out if whole else out.index_select(0, index)
                mixed = free if gate.strength >= 1.0 else torch.lerp(full, free, gate.strength)
                blended = torch.where(product[:, :, None], mixed, full)
                out = blended if whole else out.index_copy(0, index, blended)
                if capture is not None:  # the full context's share of each query's output
                    weight = torch.ones(b, nq, device=q.device) if weight is None else weight
                    share = torch.where(product, 1.0 - gate.strength, 1.0).to(weight.dtype)
                    weight = weight.index_copy(0, index, weight.index_select(0, index) * share)
        if capture is not None:
            capture.record(probs, layer, weight)
        for injection in self.injections:
            if injection.active(layer):
                out = out + injection(q, layer, kernel)
        return out
