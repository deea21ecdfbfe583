"""Tiny but real text encoders of the DiT families for tests: Flux.1 (CLIP-L + T5-XXL) and Z-Image
(Qwen3-4B), ComfyUI's own classes, loaded through ComfyUI's own CLIP loader path.

* The weights are a state dict per encoder with the key names of the released files, made by
  instantiating ComfyUI's own encoder class with a small config on the ``meta`` device (shapes
  only) and filling every tensor from a seeded ``torch.Generator``.
* They are loaded by ``comfy.sd.load_text_encoder_state_dicts`` (what ``CLIPLoader`` /
  ``DualCLIPLoader`` call after reading the files): ComfyUI detects the encoder from the weights
  and picks ``FluxClipModel`` + ``FluxTokenizer`` (``clip_type`` FLUX) or ``ZImageTEModel`` +
  ``ZImageTokenizer`` (its chat template) itself. The small configs go in ``model_options``
  (``t5xxl_model_config``, ``qwen3_4b_model_config``, and ``model_config`` which the loader turns
  into ``clip_l_model_config``), ComfyUI's own way to override a text encoder's config.
* Real tokenizers (shipped in ComfyUI's tree), real vocabularies and real widths (T5-XXL 4096,
  Qwen3-4B 2560, CLIP-L 768: what a category library must match), narrow layers: T5 keeps its 24
  blocks (ComfyUI recognises T5-XXL by its block 23) at ``d_ff`` 32, 2 heads of 16; Qwen3 has 3
  layers (Z-Image takes the second-to-last), 2 query heads / 1 key-value head of 128,
  ``intermediate_size`` 64; CLIP-L 3 layers.
* Weights are bfloat16 (the embedding tables are most of the size: 32128 x 4096 and
  151936 x 2560), so ComfyUI runs the encoders in bfloat16, as it does the released files.

Builders are cached per process: treat the CLIPs as shared and read-only (``clip.clone()``).
"""
from __future__ import annotations

import functools
import math

import torch

from . import comfy_env  # noqa: F401  (sys.path, CPU, quiet logging)

import comfy.ops
import comfy.sd
import comfy.sd1_clip
import comfy.text_encoders.llama
import comfy.text_encoders.sd3_clip

from .models import _quiet

DTYPE = torch.bfloat16
T5_CONFIG = {"num_layers": 24, "d_ff": 32, "num_heads": 2, "d_kv": 16}
CLIP_L_CONFIG = {"num_hidden_layers": 3, "intermediate_size": 768}
QWEN3_CONFIG = {"num_hidden_layers": 3, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}

# ComfyUI's loader sets ``clip_l_model_config`` itself from ``model_config`` (adding the position
# count it reads from the weights), so CLIP-L's small config goes there
FLUX_OPTIONS = {"t5xxl_model_config": T5_CONFIG, "model_config": CLIP_L_CONFIG}
Z_IMAGE_OPTIONS = {"qwen3_4b_model_config": QWEN3_CONFIG}
MODEL_OPTIONS = {"flux": FLUX_OPTIONS, "z_image": Z_IMAGE_OPTIONS}
CLIP_TYPE = {"flux": comfy.sd.CLIPType.FLUX, "z_image": comfy.sd.CLIPType.LUMINA2}


def _random_state_dict(module: torch.nn.Module, seed: int, embedding_std: float) -> dict[str, torch.Tensor]:
    """A weight for every entry of ``module``'s state dict (a ``meta`` module: shapes only):
    matrices uniform with std 1/sqrt(fan in), token embeddings normal(0, ``embedding_std``),
    norm scales 1, biases 0; generated row block by row block, stored as :data:`DTYPE`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if not t.is_floating_point():
            out[name] = torch.zeros(t.shape, dtype=t.dtype)
            continue
        w = torch.empty(t.shape, dtype=DTYPE)
        if t.dim() < 2:
            w.fill_(0.0 if leaf == "bias" else 1.0)
        else:
            embedding = "embed" in name or name.endswith("shared.weight")
            std = embedding_std if embedding else 1.0 / math.sqrt(t[0].numel())
            step = max(1, (1 << 22) // max(1, t[0].numel()))
            for i in range(0, t.shape[0], step):
                block = torch.empty((min(step, t.shape[0] - i),) + tuple(t.shape[1:]))
                if embedding:
                    block.normal_(0.0, std, generator=g)
                else:
                    a = std * math.sqrt(3.0)
                    block.uniform_(-a, a, generator=g)
                w[i:i + block.shape[0]] = block.to(DTYPE)
        out[name] = w
    return out


def t5xxl_state_dict(seed: int = 11) -> dict[str, torch.Tensor]:
    """T5-XXL encoder weights (key names of ``t5xxl_fp16.safetensors``), small config."""
    m = comfy.text_encoders.sd3_clip.T5XXLModel(device="meta", dtype=DTYPE,
                                                model_options={"t5xxl_model_config": T5_CONFIG})
    return _random_state_dict(m.transformer, seed, embedding_std=1.0)


def clip_l_state_dict(seed: int = 12) -> dict[str, torch.Tensor]:
    """CLIP-L text encoder weights (key names of ``clip_l.safetensors``), small config."""
    m = comfy.sd1_clip.SDClipModel(device="meta", dtype=DTYPE, model_options={"clip_l_model_config": CLIP_L_CONFIG})
    return _random_state_dict(m.transformer, seed, embedding_std=0.02)


def qwen3_4b_state_dict(seed: int = 13) -> dict[str, torch.Tensor]:
    """Qwen3-4B weights (key names of ``qwen_3_4b.safetensors``), small config."""
    m = comfy.text_encoders.llama.Qwen3_4B(QWEN3_CONFIG, DTYPE, "meta", comfy.ops.manual_cast)
    return _random_state_dict(m, seed, embedding_std=0.02)


def load(family: str, state_dicts, embedding_directory=None) -> "comfy.sd.CLIP":
    """``comfy.sd.CLIP`` from ``state_dicts`` through ComfyUI's loader (the small configs in ``model_options``)."""
    with _quiet():
        return comfy.sd.load_text_encoder_state_dicts(
            [dict(sd) for sd in state_dicts], embedding_directory=embedding_directory,
            clip_type=CLIP_TYPE[family], model_options={k: dict(v) for k, v in MODEL_OPTIONS[family].items()})


@functools.cache
def state_dicts(family: str) -> tuple:
    if family == "flux":
        return (clip_l_state_dict(), t5xxl_state_dict())
    if family == "z_image":
        return (qwen3_4b_state_dict(),)
    raise ValueError(f"family: expected flux or z_image, got {family!r}")


@comfy_env.cached_model
def tiny_text_encoder(family: str) -> "comfy.sd.CLIP":
    """The tiny text encoder of ``family`` ("flux": CLIP-L + T5-XXL, "z_image": Qwen3-4B), as
    DualCLIPLoader (type flux) / CLIPLoader (type lumina2) would give it."""
    return load(family, state_dicts(family))


def save(family: str, folder) -> list:
    """Write the state dicts as safetensors files (the files a user's text encoder folder holds);
    returns their paths."""
    from safetensors.torch import save_file
    names = {"flux": ("clip_l.safetensors", "t5xxl.safetensors"), "z_image": ("qwen_3_4b.safetensors",)}[family]
    paths = []
    for name, sd in zip(names, state_dicts(family)):
        path = f"{folder}/{name}"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
        paths.append(path)
    return paths
