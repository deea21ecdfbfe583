"""Tiny but real DiT models for tests and benchmarks: ComfyUI's own classes (``comfy.supported_models
.Flux`` -> ``model_base.Flux`` -> ``comfy.ldm.flux.model.Flux``; ``supported_models.ZImage`` ->
``model_base.Lumina2`` -> ``comfy.ldm.lumina.model.NextDiT``), small seeded random weights, in a
``ModelPatcher`` as ComfyUI's loaders hand them out.

ComfyUI's state-dict detection fixes the widths of both families (Flux: 24 heads of 128; Z-Image:
dim 3840), so a tiny model is built from a unet config through the family's own supported-model
class, exactly as the loader does after detection (``model_config.get_model``), never by hand.

Text: no T5 or Qwen3 here. ``encode`` is a one-layer stand-in with the property the gate is about:
every output row depends on every input row (``causal=False``: T5-like, Flux) or on every row
before it (``causal=True``: a causal LLM, Z-Image), so an identifier embedding at one row changes
every row after it (and before it, for T5). T and F are two encodes of token sequences that differ
by the identifier's rows, as Category Tokens makes them.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import comfy_env  # noqa: F401  (sys.path, CPU, quiet logging)
from .models import _patcher

import comfy.model_patcher
import comfy.supported_models as sm


def flux_config(hidden: int = 64, heads: int = 2, depth: int = 2, single: int = 2, context: int = 4096,
                vec: int = 768) -> dict:
    """A Flux.1-dev unet config (guidance embedding, T5 context, CLIP-L pooled vector) at ``hidden``."""
    head = hidden // heads
    a = (head // 8) * 2
    rest = (head - a) // 2
    cfg = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=vec, context_in_dim=context,
               hidden_size=hidden, mlp_ratio=4.0, num_heads=heads, depth=depth, depth_single_blocks=single,
               axes_dim=[a, rest, head - a - rest], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
    import comfy.ldm.flux.model as flux_model
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(flux_model.FluxParams)}:
        cfg["txt_ids_dims"] = []  # newer ComfyUI: Flux.1 keeps every text token at position 0
    return cfg


def zimage_config(dim: int = 256, heads: int = 4, layers: int = 2, refiners: int = 2, context: int = 2560) -> dict:
    """A Z-Image unet config (Lumina 2 NextDiT with Z-Image's modulation, Qwen3-4B context) at ``dim``."""
    head = dim // heads
    a = head // 4
    rest = (head - a) // 2
    return dict(image_model="lumina2", patch_size=2, in_channels=16, dim=dim, cap_feat_dim=context, n_layers=layers,
                n_refiner_layers=refiners, qk_norm=True, n_heads=heads, n_kv_heads=heads,
                axes_dims=[a, rest, head - a - rest], axes_lens=[1536, 512, 512], rope_theta=256.0,
                ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)


@comfy_env.cached_model
def tiny_flux(seed: int = 0, **kwargs) -> "comfy.model_patcher.ModelPatcher":
    """Flux.1 (double-stream then single-stream blocks) at width 64: shared, clone before patching."""
    return _patcher(sm.Flux, flux_config(**kwargs), seed)


@comfy_env.cached_model
def tiny_zimage(seed: int = 0, **kwargs) -> "comfy.model_patcher.ModelPatcher":
    """Z-Image (context and noise refiners, then one stream) at width 256 (Z-Image modulation needs >= 256): shared, clone before patching."""
    return _patcher(sm.ZImage, zimage_config(**kwargs), seed)


def wide_flux(hidden: int = 3072, heads: int = 24, seed: int = 0):
    """Flux at real width, one double and one single block (benchmarks)."""
    return _patcher(sm.Flux, flux_config(hidden=hidden, heads=heads, depth=1, single=1), seed)


def wide_zimage(dim: int = 3840, heads: int = 30, seed: int = 0):
    """Z-Image at real width, one context refiner, one noise refiner and one main layer (benchmarks)."""
    return _patcher(sm.ZImage, zimage_config(dim=dim, heads=heads, layers=1, refiners=1), seed)


class StandInEncoder:
    """One attention layer over token embeddings ``[N, C]`` -> ``[1, N, C]`` (see the module doc)."""

    def __init__(self, width: int, causal: bool, seed: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.width, self.causal = width, causal
        self.wq, self.wk, self.wv = (torch.randn(width, width, generator=g) / math.sqrt(width) for _ in range(3))

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings.float()
        q, k, v = x @ self.wq, x @ self.wk, x @ self.wv
        logits = (q @ k.T) / math.sqrt(self.width)
        if self.causal:
            n = x.shape[0]
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return (x + logits.softmax(-1) @ v)[None]


def prompt_embeddings(tokens: int, width: int, seed: int = 4) -> torch.Tensor:
    """``[tokens, width]`` embeddings of a prompt's words (deterministic)."""
    return torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))


def identifier(width: int, category: int) -> torch.Tensor:
    """``[1, width]`` the embedding of category ``category``'s identifier."""
    return torch.randn(1, width, generator=torch.Generator().manual_seed(1000 + category))


def with_identifier(words: torch.Tensor, ident: torch.Tensor, at: int) -> torch.Tensor:
    """The prompt's embeddings with the identifier's rows inserted before word ``at``."""
    return torch.cat([words[:at], ident, words[at:]])
