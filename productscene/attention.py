"""The one cross-attention object per model.

``SceneAttention`` is installed once on every cross-attention layer of a UNet (by the host adapter)
and holds the parts that act there:

- ``CategoryGate``: the mask-guided gate of the Category-Wise Generator. Logits from product queries
  to the identifier's keys get an additive bias of -inf (strength 1), so after the softmax the
  identifier's weight on product pixels is exactly zero and the other tokens renormalise.
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

from .errors import ProductSceneError
from .masks import grow, resize_to_layer, validate_mask

Kernel = Callable[..., torch.Tensor]  # kernel(q, k, v, heads, bias) -> [B, Nq, heads*dim]


@dataclass(frozen=True)
class LayerInfo:
    """Where an attention call happens. Built by the host adapter for every call."""

    key: tuple
    heads: int
    hw: tuple[int, int]
    latent_hw: tuple[int, int]
    chunks: tuple[int, ...] = (0,)  # one entry per batch chunk: 0 = cond, 1 = uncond
    progress: float | None = None  # fraction of the sampling schedule done, 0..1


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference kernel: torch's scaled dot-product attention with an additive float bias."""
    b, nq, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if bias is not None and bias.ndim == 3:
        bias = bias.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return out.transpose(1, 2).reshape(b, nq, inner)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax probabilities [B, heads, Nq, Nk], computed explicitly (used only where captured)."""
    b, nq, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, nq, heads, d).transpose(1, 2)
    kh = k.reshape(b, -1, heads, d).transpose(1, 2)
    logits = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    if bias is not None:
        logits = logits + (bias.unsqueeze(1) if bias.ndim == 3 else bias)
    return logits.softmax(dim=-1)


def downsampled_hw(latent_hw: Sequence[int], factor: int) -> tuple[int, int]:
    """The h, w of the UNet level ``factor`` times below the latent (stride-2 convs round up)."""
    h, w = latent_hw
    while factor > 1:
        h, w, factor = -(-h // 2), -(-w // 2), factor // 2
    return int(h), int(w)


def _context_columns(token_rows: Sequence[int], context_rows: int, nk: int, what: str) -> torch.Tensor:
    """Key columns of the identifier in a context of ``nk`` rows. ComfyUI repeats a shorter context
    to a common length when cond and uncond differ, so the rows repeat every ``context_rows``."""
    if nk % context_rows:
        raise ProductSceneError(
            f"{what}: the conditioning reaching the sampler has {nk} token rows, but the identifier was "
            f"encoded in a prompt of {context_rows} rows. Connect the Category Tokens conditioning "
            "directly to the sampler's positive input (conditioning that was concatenated or "
            "combined after encoding moves the identifier)."
        )
    rows = torch.as_tensor(list(token_rows), dtype=torch.long)
    reps = torch.arange(nk // context_rows, dtype=torch.long) * context_rows
    return (reps[:, None] + rows[None, :]).flatten()


class CategoryGate:
    """Keeps the identifier tokens away from product pixels."""

    def __init__(self, mask: torch.Tensor, token_rows: Sequence[int], context_rows: int,
                 strength: float = 1.0, grow_latent_px: int = 0):
        validate_mask(mask, name="mask")
        rows = sorted(int(r) for r in token_rows)
        if not rows or rows[0] < 0 or rows[-1] >= context_rows:
            raise ProductSceneError(
                f"category_tokens: identifier rows {rows} do not lie inside the {context_rows}-row prompt")
        if not 0.0 <= float(strength) <= 1.0:
            raise ProductSceneError(f"strength: expected a value from 0 to 1, got {strength}")
        if int(grow_latent_px) < 0:
            raise ProductSceneError(f"grow_latent_px: expected 0 or more latent pixels, got {grow_latent_px}")
        self.mask = mask.detach().float()  # stays where it was given (training: on the model's device)
        self.token_rows = tuple(rows)
        self.context_rows = int(context_rows)
        self.strength = float(strength)
        self.grow_latent_px = int(grow_latent_px)
        self._queries: dict = {}

    @property
    def log_weight(self) -> float:
        """Additive logit bias: the identifier's pre-softmax weight is multiplied by (1 - strength)."""
        return -math.inf if self.strength >= 1.0 else math.log1p(-self.strength)

    def product_queries(self, hw: tuple[int, int], latent_hw: tuple[int, int], device) -> torch.Tensor:
        """[Bm, h*w] bool: which queries of a layer of size ``hw`` are product positions (computed
        once per layer size and device, where the mask lives, then moved once)."""
        key = (hw, latent_hw, str(device))
        cached = self._queries.get(key)
        if cached is None:
            m = grow(resize_to_layer(self.mask, *latent_hw), self.grow_latent_px)
            cached = (resize_to_layer(m, *hw) > 0.5).flatten(1).to(device)
            self._queries[key] = cached
        return cached

    def to(self, device) -> "CategoryGate":
        """Move the mask where the model runs (the host's load hand-off); values never change."""
        self.mask = self.mask.to(device)
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

    def record(self, probs: torch.Tensor, layer: LayerInfo) -> None:
        h, w = layer.hw
        mean = probs.mean(dim=1)  # over heads: [B, Nq, Nk]
        b, _, nk = mean.shape
        for name in self.token_rows:
            cols = self.columns(name, b, nk, mean.device).to(mean.dtype)
            self._maps[name].append((mean @ cols[:, :, None])[..., 0].reshape(b, h, w))

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

    ``tokens``: [B or 1, K, C] reference tokens; ``projections``: layer key -> (to_k, to_v) modules
    mapping C to that layer's inner width; ``product_mask``: the product that must receive nothing.
    Active while ``start <= progress <= end``.
    """

    def __init__(self, tokens: torch.Tensor, projections: Mapping[tuple, tuple[torch.nn.Module, torch.nn.Module]],
                 product_mask: torch.Tensor, weight: float = 1.0, start: float = 0.0, end: float = 1.0):
        validate_mask(product_mask, name="product_mask")
        if tokens.ndim != 3:
            raise ProductSceneError(f"reference tokens: expected [B, K, C], got shape {tuple(tokens.shape)}")
        if not 0.0 <= start <= end <= 1.0:
            raise ProductSceneError(f"start/end: expected 0 <= start <= end <= 1, got {start}, {end}")
        self.tokens = tokens
        self.projections = dict(projections)
        self.weight = float(weight)
        self.start, self.end = float(start), float(end)
        self._background = CategoryGate(product_mask, [0], 1)

    def active(self, layer: LayerInfo) -> bool:
        if self.weight == 0.0 or layer.key not in self.projections:
            return False
        return layer.progress is None or self.start <= layer.progress <= self.end

    def __call__(self, q: torch.Tensor, layer: LayerInfo, kernel: Kernel) -> torch.Tensor:
        to_k, to_v = self.projections[layer.key]
        b = q.shape[0]
        tokens = self.tokens.to(device=q.device, dtype=q.dtype)
        tokens = tokens.expand(b, -1, -1) if tokens.shape[0] == 1 else tokens.repeat(b // tokens.shape[0], 1, 1)
        out = kernel(q, to_k(tokens), to_v(tokens), layer.heads, None)
        product = self._background.product_queries(tuple(layer.hw), tuple(layer.latent_hw), q.device)
        background = (~product).to(q.dtype)
        background = background.repeat(b // background.shape[0], 1) if background.shape[0] != b else background
        return out * (self.weight * background[:, :, None])

    def to(self, device) -> "ReferenceInjection":
        self.tokens = self.tokens.to(device)
        self._background.to(device)
        return self

    def models(self) -> list:
        return []

    def __deepcopy__(self, memo):
        return self


class SceneAttention:
    """The attention object installed on every cross-attention layer of one model."""

    def __init__(self, gates: Sequence[CategoryGate] = (), capture: AttentionCapture | None = None,
                 injections: Sequence[ReferenceInjection] = ()):
        self.gates = tuple(gates)
        self.capture = capture
        self.injections = tuple(injections)
        self._bias: dict = {}

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
        for gate in self.gates:
            bm = gate.mask.shape[0]
            if bm not in (1, images):
                raise ProductSceneError(
                    f"mask: {bm} product masks for a batch of {images} images; give one mask, or one per image")

    def check_aspect(self, latent_hw: tuple[int, int], tolerance: float = 0.05) -> None:
        """Raise when a gate's mask has another aspect ratio than the latent it will be resized to."""
        lh, lw = latent_hw
        for gate in self.gates:
            mh, mw = gate.mask.shape[-2:]
            if abs(mh / mw - lh / lw) > tolerance * (lh / lw):
                raise ProductSceneError(
                    f"mask: the product mask is {mw}x{mh} but the image being generated is {lw * 8}x{lh * 8}; "
                    "use the mask made from the same image as the latent")

    def bias(self, layer: LayerInfo, batch: int, nq: int, nk: int, device, dtype) -> torch.Tensor | None:
        """Additive logit bias [batch, Nq, Nk] from every gate, built once per layer shape."""
        if not self.gates:
            return None
        key = (layer.hw, layer.latent_hw, layer.chunks, batch, nk, device, dtype)
        cached = self._bias.get(key)
        if cached is not None:
            return cached
        chunks = layer.chunks if batch % len(layer.chunks) == 0 else (0,)
        per_chunk = batch // len(chunks)
        self.check_batch(per_chunk)
        bias = torch.zeros(batch, nq, nk, device=device, dtype=dtype)
        for gate in self.gates:
            product = gate.product_queries(tuple(layer.hw), tuple(layer.latent_hw), device)  # [Bm, Nq]
            if product.shape[1] != nq:
                raise ProductSceneError(
                    f"mask: layer {layer.key} has {nq} positions, expected {product.shape[1]} from its size {layer.hw}")
            product = product.expand(per_chunk, -1) if product.shape[0] == 1 else product
            cols = _context_columns(gate.token_rows, gate.context_rows, nk, "category_tokens").to(device)
            blocked = torch.where(product[:, :, None], gate.log_weight, 0.0).to(dtype)  # [b, Nq, 1]
            for index, kind in enumerate(chunks):
                if kind == 0:  # the identifier lives only in the positive prompt
                    part = bias[index * per_chunk:(index + 1) * per_chunk]
                    part[:, :, cols] += blocked
        self._bias[key] = bias
        return bias

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerInfo,
                 kernel: Kernel = sdpa) -> torch.Tensor:
        bias = self.bias(layer, q.shape[0], q.shape[1], k.shape[1], q.device, q.dtype)
        if self.capture is not None and self.capture.wants(layer):
            probs = attention_probs(q, k, layer.heads, bias)
            self.capture.record(probs, layer)
            b, nq, inner = q.shape
            vh = v.reshape(b, -1, layer.heads, inner // layer.heads).transpose(1, 2)
            out = (probs.to(v.dtype) @ vh).transpose(1, 2).reshape(b, nq, inner)
        else:
            out = kernel(q, k, v, layer.heads, bias)
        for injection in self.injections:
            if injection.active(layer):
                out = out + injection(q, layer, kernel)
        return out
