"""Personality adapters: a brand's style from one reference image (SPEC section 2). Host-free.

A personality adapter turns a reference image's CLIP-vision penultimate hidden states
(``[B, N, W]``: a class token and a grid of patch tokens) into ``K`` reference tokens of the
UNet's context width ``C`` (``tokens``), and holds one ``to_k``/``to_v`` pair per cross-attention
layer that projects those tokens into the layer's inner width. ``injection`` makes the
``ReferenceInjection`` part of the model's one ``SceneAttention``: decoupled cross-attention whose
output is added to the text attention's, times a weight, on background positions only, between a
start and an end fraction of the schedule.

The projection pools the patch tokens with ``K`` learned queries (one attention head, then a layer
norm). Patches that cover the reference's own product (``reference_mask``) are left out of the
pool, so the product in a reference never becomes part of its style.

File: ``productscene.format = personality_adapter``, version 1; metadata ``family``,
``vision_width``, ``context_dim``, ``tokens`` (K), ``layers`` (JSON ``{key: inner width}``, keys like
``input.4.0``), ``training`` (JSON, optional). Tensors ``proj.*`` and ``layers.<key>.to_k|to_v``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .attention import ReferenceInjection
from .errors import ProductSceneError
from .files import check_format, load_tensors, read_header, save_safetensors_atomic
from .library import FAMILIES, check_family

FORMAT = "personality_adapter"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
DEFAULT_TOKENS = 16


def context_dim_of(family: str) -> int:
    return sum(check_family(family).values())


def layer_name(key: Sequence) -> str:
    """``("input", 4, 0)`` -> ``"input.4.0"`` (file keys and metadata)."""
    return ".".join(str(k) for k in key)


def layer_key(name: str) -> tuple:
    block, index, t = name.split(".")
    return (block, int(index), int(t))


def _module_name(name: str) -> str:
    return name.replace(".", "_")


class PersonalityAdapter(torch.nn.Module):
    """Projection from CLIP-vision states to ``tokens`` reference tokens, plus per-layer to_k/to_v."""

    def __init__(self, family: str, vision_width: int, layers: Mapping[str, int], tokens: int = DEFAULT_TOKENS,
                 training: dict | None = None):
        super().__init__()
        if not isinstance(tokens, int) or not 1 <= tokens <= 256:
            raise ProductSceneError(f"tokens: expected a whole number from 1 to 256, got {tokens!r}")
        if not isinstance(vision_width, int) or vision_width < 1:
            raise ProductSceneError(f"vision_width: expected a positive whole number, got {vision_width!r}")
        if not layers:
            raise ProductSceneError("layers: an adapter needs at least one cross-attention layer")
        self.family = family
        self.vision_width = vision_width
        self.context_dim = context_dim_of(family)
        self.n_tokens = tokens
        self.layer_widths = {str(k): int(v) for k, v in layers.items()}
        self.training_summary = dict(training or {})
        c = self.context_dim
        self.queries = torch.nn.Parameter(torch.randn(tokens, c) / math.sqrt(c))
        self.proj_in = torch.nn.Linear(vision_width, c)
        self.norm_out = torch.nn.LayerNorm(c)
        self.to_k = torch.nn.ModuleDict({_module_name(n): torch.nn.Linear(c, w, bias=False)
                                         for n, w in self.layer_widths.items()})
        self.to_v = torch.nn.ModuleDict({_module_name(n): torch.nn.Linear(c, w, bias=False)
                                         for n, w in self.layer_widths.items()})

    @classmethod
    def for_layers(cls, family: str, vision_width: int, attn2_modules: Mapping[tuple, torch.nn.Module],
                   tokens: int = DEFAULT_TOKENS, seed: int = 0) -> "PersonalityAdapter":
        """A new adapter for these cross-attention layers, its to_k/to_v started from each layer's
        own text to_k/to_v (as IP-Adapter does), the projection seeded."""
        widths = {layer_name(k): m.to_k.weight.shape[0] for k, m in attn2_modules.items()}
        adapter = cls(family, vision_width, widths, tokens)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            c = adapter.context_dim
            adapter.queries.copy_(torch.randn(tokens, c, generator=g) / math.sqrt(c))
            adapter.proj_in.weight.copy_(torch.randn(c, vision_width, generator=g) / math.sqrt(vision_width))
            adapter.proj_in.bias.zero_()
        with torch.no_grad():
            for key, module in attn2_modules.items():
                name = _module_name(layer_name(key))
                for mine, theirs in ((adapter.to_k[name], module.to_k), (adapter.to_v[name], module.to_v)):
                    if theirs.weight.shape != mine.weight.shape:
                        raise ProductSceneError(
                            f"model: layer {layer_name(key)} projects {theirs.weight.shape[1]}-wide context, "
                            f"expected {adapter.context_dim} for {family}")
                    mine.weight.copy_(theirs.weight.detach().float())
        return adapter

    # --------------------------------------------------------------------------- tokens
    def check_states(self, states: torch.Tensor, what: str = "clip_vision") -> None:
        if not isinstance(states, torch.Tensor) or states.ndim != 3:
            raise ProductSceneError(f"{what}: expected hidden states [B, N, W], got "
                                    f"{tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__}")
        if states.shape[-1] != self.vision_width:
            raise ProductSceneError(
                f"{what}: this CLIP vision model gives {states.shape[-1]}-wide features, but the adapter was made "
                f"for {self.vision_width}-wide ones; use the CLIP vision model the adapter was trained with")

    def tokens(self, states: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N, W]`` states -> ``[B, K, C]`` tokens. ``keep`` ``[B, N]`` bool: states that may
        take part (False: a patch of the reference's own product)."""
        self.check_states(states)
        kv = self.proj_in(states.to(self.proj_in.weight.dtype))
        logits = torch.einsum("kc,bnc->bkn", self.queries.to(kv.dtype), kv) / math.sqrt(self.context_dim)
        if keep is not None:
            logits = logits.masked_fill(~keep[:, None, :].to(logits.device), float("-inf"))
        return self.norm_out(torch.softmax(logits, dim=-1) @ kv)

    def projections(self) -> dict[tuple, tuple[torch.nn.Module, torch.nn.Module]]:
        """``{layer key: (to_k, to_v)}``: the adapter's own modules, wherever they are."""
        return {layer_key(n): (self.to_k[_module_name(n)], self.to_v[_module_name(n)]) for n in self.layer_widths}

    def check_layers(self, layers: Mapping[tuple, int], what: str = "model") -> None:
        """Raise unless ``layers`` (``{key: inner width}`` of the model) are the adapter's layers."""
        mine = {layer_key(n): w for n, w in self.layer_widths.items()}
        theirs = {tuple(k): int(v) for k, v in layers.items()}
        if mine != theirs:
            missing = sorted(set(mine) - set(theirs))
            extra = sorted(set(theirs) - set(mine))
            wrong = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
            detail = "; ".join(s for s in (
                f"layers the model lacks: {[layer_name(k) for k in missing[:3]]}" if missing else "",
                f"layers the adapter lacks: {[layer_name(k) for k in extra[:3]]}" if extra else "",
                f"other widths at: {[layer_name(k) for k in wrong[:3]]}" if wrong else "") if s)
            raise ProductSceneError(
                f"{what}: the personality adapter was made for another UNet ({self.family}, {len(mine)} "
                f"cross-attention layers); {detail}. Use an adapter trained for this checkpoint's family")

    def injection(self, tokens: torch.Tensor, product_mask: torch.Tensor, weight: float = 1.0, start: float = 0.0,
                  end: float = 1.0, negative: torch.Tensor | None = None, models: Sequence = (),
                  layer_weights: Mapping[tuple, float] | None = None) -> ReferenceInjection:
        """The ``ReferenceInjection`` of ``tokens`` through this adapter's projections; ``models``:
        the host's models holding those weights; ``layer_weights``: per-layer weights replacing
        ``weight`` (see ``ReferenceInjection``)."""
        return ReferenceInjection(tokens, self.projections(), product_mask, weight=weight, start=start, end=end,
                                  negative=negative, models=models, layer_weights=layer_weights)

    # --------------------------------------------------------------------------- files
    def save(self, path, training: dict | None = None) -> str:
        tensors = {f"proj.{k}": v.detach().float().contiguous().cpu()
                   for k, v in self.state_dict().items() if not k.startswith(("to_k.", "to_v."))}
        for n in self.layer_widths:
            m = _module_name(n)
            tensors[f"layers.{n}.to_k"] = self.to_k[m].weight.detach().float().contiguous().cpu()
            tensors[f"layers.{n}.to_v"] = self.to_v[m].weight.detach().float().contiguous().cpu()
        meta = {"family": self.family, "vision_width": str(self.vision_width), "context_dim": str(self.context_dim),
                "tokens": str(self.n_tokens), "layers": json.dumps(self.layer_widths, sort_keys=True),
                "training": json.dumps(training if training is not None else self.training_summary)}
        save_safetensors_atomic(tensors, path, meta, kind=FORMAT, version=FORMAT_VERSION)
        return os.fspath(path)

    @classmethod
    def load(cls, path) -> "PersonalityAdapter":
        meta, index = read_header(path)
        check_format(meta, FORMAT, SUPPORTED_VERSIONS, path)
        base = os.path.basename(os.fspath(path))
        try:
            family = meta["family"]
            vision_width = int(meta["vision_width"])
            tokens = int(meta["tokens"])
            layers = json.loads(meta["layers"])
            training = json.loads(meta.get("training") or "{}")
            if not isinstance(layers, dict) or not isinstance(training, dict):
                raise ValueError("layers/training must be JSON objects")
        except (KeyError, ValueError, TypeError) as e:
            raise ProductSceneError(f"{base}: malformed personality adapter metadata ({e})") from None
        if family not in FAMILIES:
            raise ProductSceneError(f"{base}: unknown base model family {family!r}")
        adapter = cls(family, vision_width, layers, tokens, training)
        tensors = load_tensors(path)
        state = {k[len("proj."):]: v for k, v in tensors.items() if k.startswith("proj.")}
        for n in adapter.layer_widths:
            for part in ("to_k", "to_v"):
                state[f"{part}.{_module_name(n)}.weight"] = tensors.get(f"layers.{n}.{part}")
        expected = adapter.state_dict()
        for k, v in expected.items():
            got = state.get(k)
            if got is None or tuple(got.shape) != tuple(v.shape):
                raise ProductSceneError(
                    f"{base}: tensor {k} is {'missing' if got is None else tuple(got.shape)}, expected "
                    f"{tuple(v.shape)} from its metadata")
        adapter.load_state_dict({k: state[k].float() for k in expected})
        return adapter


# ------------------------------------------------------------------------------- references
def patch_keep(states_count: int, reference_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Which of ``states_count`` CLIP-vision states (a class token + a square patch grid) may take
    part, given the reference's own product ``[B or 1, H, W]`` (1 = product): a patch that holds any
    product pixel is left out (max-pool to the grid). None when there is no mask."""
    if reference_mask is None:
        return None
    grid = int(round(math.sqrt(states_count - 1)))
    if grid * grid != states_count - 1:
        raise ProductSceneError(f"clip_vision: {states_count} states are not a class token plus a square grid")
    m = reference_mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.shape[0] not in (1, batch):
        raise ProductSceneError(f"reference_mask: {m.shape[0]} masks for {batch} reference images")
    product = F.adaptive_max_pool2d(m[:, None], (grid, grid))[:, 0].flatten(1) > 0.5
    keep = torch.cat([torch.ones(product.shape[0], 1, dtype=torch.bool), ~product], dim=1)
    if not keep[:, 1:].any(dim=1).all():
        raise ProductSceneError("reference_mask: covers the whole reference image; nothing of its style is left")
    return keep.expand(batch, -1) if keep.shape[0] == 1 else keep


def neutral_fill(image: torch.Tensor, reference_mask: torch.Tensor | None,
                 fill=(0.48145466, 0.4578275, 0.40821073)) -> torch.Tensor:
    """``image`` ``[B, H, W, 3]`` with the reference's own product pixels set to CLIP's mean colour
    (so they carry nothing into the patches around them either)."""
    if reference_mask is None:
        return image
    m = reference_mask.float()
    m = m[None] if m.ndim == 2 else m
    if tuple(m.shape[-2:]) != tuple(image.shape[1:3]):
        raise ProductSceneError(f"reference_mask: is {m.shape[-1]}x{m.shape[-2]} but the reference image is "
                                f"{image.shape[2]}x{image.shape[1]}")
    colour = torch.tensor(fill, dtype=image.dtype, device=image.device)
    return torch.where(m[..., None].to(image.device) > 0.5, colour, image[..., :3])


def combine(tokens: torch.Tensor, how: str) -> torch.Tensor:
    """Several references ``[R, K, C]`` -> the tokens every image gets: ``average`` -> ``[1, K, C]``
    (their mean), ``concatenate`` -> ``[1, R*K, C]`` (all of them, attended together)."""
    if how == "average":
        return tokens.mean(0, keepdim=True)
    if how == "concatenate":
        return tokens.reshape(1, -1, tokens.shape[-1])
    raise ProductSceneError(f"combine: expected 'average' or 'concatenate', got {how!r}")
