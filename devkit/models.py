"""Tiny but real ComfyUI models for tests: ComfyUI's own classes, small seeded random weights.

Every builder returns a :class:`TinyModels` namespace:

* ``.model``  ``comfy.model_patcher.ModelPatcher`` around a ``comfy.model_base`` model
  (``SD15`` -> ``BaseModel``, ``SD20`` -> ``BaseModel``, ``SDXL`` -> ``model_base.SDXL``),
  built by ``comfy.supported_models.<Family>(unet_config).get_model({})``;
* ``.clip``   ``comfy.sd.CLIP`` with ComfyUI's real tokenizer (the vocab shipped in the tree) and a
  3-layer text transformer (the fewest that allow SD2/SDXL's penultimate-layer output) of the
  real hidden width (768 / 1024 / 768+1280), MLP width = hidden width, so
  ``clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)`` gives ``[1, 77, width]``;
* ``.vae``    ``comfy.sd.VAE`` (AutoencoderKL, 8x down, 4 latent channels) with ``ch=32`` (GroupNorm needs 32),
  one instance shared by all three families;
* ``.family`` ``"sd15" | "sd2" | "sdxl"``, plus ``.context_dim``, ``.pooled_dim`` and
  ``.unet_config`` (the dict the UNet was built from).

UNet layout of the tiny models (``model_channels=64``, ``channel_mult=(1, 2)``, one res block per
level, transformer depth 1):

* sd15 / sd2: attn2 keys ("input", 1, 0), ("input", 3, 0), ("middle", 0, 0), ("output", 0..3, 0);
  layer h, w = latent h, w at level 0 (input 1, output 2, 3) and latent // 2 at level 1;
* sdxl: like real SDXL the first level has no transformer: ("input", 3, 0), ("middle", 0, 0),
  ("output", 0, 0), ("output", 1, 0), all at latent // 2; adm 2816 (pooled 1280 + 6 * 256 sizes).
  Use the pack's ``nodes.host.cross_attention_keys`` rather than hard-coding these. sd15 has 8 heads (dim 8 / 16); sd2 and sdxl
  64-wide heads (1 / 2 heads).

Weights: every parameter and floating buffer is overwritten from a ``torch.Generator`` seeded with
``seed`` (fan-in scaled uniform noise of std 1/sqrt(fan_in); norm weights 1, biases 0), so builds are deterministic and outputs
finite (ComfyUI's own classes allocate uninitialised memory). Text encoders run in float32 (ComfyUI
would pick fp16 on the CPU; fp16 matmuls are slow there).

Builders are cached per process (``functools.cache``): treat the returned objects as shared and
read-only; ``model.clone()`` / ``clip.clone()`` before patching, exactly as ComfyUI nodes do.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch

from . import comfy_env  # noqa: F401  (sys.path, CPU, quiet logging)

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models as sm
from comfy.ldm.models.autoencoder import AutoencoderKL

FAMILIES = ("sd15", "sd2", "sdxl")
CONTEXT_DIM = {"sd15": 768, "sd2": 1024, "sdxl": 2048}
POOLED_DIM = {"sd15": 768, "sd2": 1024, "sdxl": 1280}
TOKENIZER_KEYS = {"sd15": ("l",), "sd2": ("h",), "sdxl": ("l", "g")}

# One small text transformer per encoder, real width; the vocabulary stays the real 49408 tokens.
_TEXT_ENCODERS = {
    "clip_l": {"hidden_size": 768, "num_attention_heads": 12},
    "clip_h": {"hidden_size": 1024, "num_attention_heads": 16},
    "clip_g": {"hidden_size": 1280, "num_attention_heads": 20},
}


@dataclass(frozen=True)
class TinyModels:
    model: "comfy.model_patcher.ModelPatcher"
    clip: "comfy.sd.CLIP"
    vae: "comfy.sd.VAE"
    family: str
    context_dim: int
    pooled_dim: int
    unet_config: dict


# ----------------------------------------------------------------------------- weights

@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int, scale: float = 1.0) -> None:
    """Overwrite every parameter / floating buffer of ``module`` deterministically (in place).
    The noise schedule (``model_sampling``'s sigma tables) is configuration, not weights: kept."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    tensors = list(module.named_parameters()) + [
        (n, b) for n, b in module.named_buffers()
        if b.is_floating_point() and not n.startswith("model_sampling.")]
    for name, p in tensors:
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim >= 2:
            std = scale / math.sqrt(p[0].numel())
        elif leaf == "bias":
            p.zero_()
            continue
        elif leaf == "weight":  # GroupNorm / LayerNorm scales
            p.fill_(1.0)
            continue
        else:  # odd 1-D / 0-D parameters (logit_scale, ...)
            std = 0.02
        a = std * math.sqrt(3.0)  # uniform(-a, a) has variance std**2 and is faster than normal_
        if p.dtype == torch.float32 and p.device.type == "cpu":
            p.uniform_(-a, a, generator=g)
        else:
            p.copy_(torch.empty(p.shape).uniform_(-a, a, generator=g).to(p.dtype))


def _quiet():
    class _Ctx:
        def __enter__(self):
            self.prev = logging.root.manager.disable
            logging.disable(logging.WARNING)

        def __exit__(self, *exc):
            logging.disable(self.prev)

    return _Ctx()


# ----------------------------------------------------------------------------- UNet

_UNET_BASE = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "in_channels": 4, "use_temporal_attention": False, "use_temporal_resblock": False,
}


def unet_config(family: str, model_channels: int = 64, channel_mult=(1, 2)) -> dict:
    """A complete ``unet_config`` for ``family``; the real context widths and (SDXL) adm."""
    levels = len(channel_mult)
    cfg = dict(_UNET_BASE, model_channels=model_channels, channel_mult=list(channel_mult),
               num_res_blocks=[1] * levels, transformer_depth_middle=1)
    if family == "sd15":
        cfg.update(adm_in_channels=None, use_linear_in_transformer=False, context_dim=768,
                   transformer_depth=[1] * levels, transformer_depth_output=[1] * (2 * levels))
    elif family == "sd2":
        cfg.update(adm_in_channels=None, use_linear_in_transformer=True, context_dim=1024,
                   transformer_depth=[1] * levels, transformer_depth_output=[1] * (2 * levels))
    elif family == "sdxl":
        depth = [0] + [1] * (levels - 1)  # real SDXL: no transformer at the first level
        cfg.update(adm_in_channels=2816, num_classes="sequential", use_linear_in_transformer=True,
                   context_dim=2048, transformer_depth=depth,
                   transformer_depth_output=[d for d in depth for _ in range(2)])
    else:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    return cfg


def _model_config(family: str, cfg: dict, head_channels: int | None):
    cls = {"sd15": sm.SD15, "sd2": sm.SD20, "sdxl": sm.SDXL}[family]
    mc = cls(cfg)
    if family != "sd15" and head_channels is not None:
        # SD2 / SDXL use 64-wide heads; keep that when the level is wide enough.
        mc.unet_config["num_head_channels"] = head_channels
    mc.set_inference_dtype(torch.float32, None)
    return mc


def build_unet(family: str, *, model_channels: int = 64, channel_mult=(1, 2), seed: int = 0,
               head_channels: int | None = None, scale: float = 1.0):
    """``ModelPatcher`` around ComfyUI's own model class for ``family`` (random weights)."""
    cfg = unet_config(family, model_channels, channel_mult)
    mc = _model_config(family, cfg, head_channels if head_channels is not None else min(64, model_channels))
    device = mm.unet_offload_device()
    with _quiet():
        model = mc.get_model({}, "", device=device)
    init_weights(model, seed, scale)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return patcher, mc


# ----------------------------------------------------------------------------- CLIP

def build_clip(family: str, *, layers: int = 3, seed: int = 1) -> "comfy.sd.CLIP":
    """``comfy.sd.CLIP`` for ``family``: real tokenizer, ``layers``-layer text transformer(s)."""
    cls = {"sd15": sm.SD15, "sd2": sm.SD20, "sdxl": sm.SDXL}[family]
    target = cls(unet_config(family)).clip_target()
    model_options = {"dtype": torch.float32}
    for name, over in _TEXT_ENCODERS.items():
        model_options[f"{name}_model_config"] = dict(
            over, num_hidden_layers=layers, intermediate_size=over["hidden_size"],
            projection_dim=over["hidden_size"])
    with _quiet():
        clip = comfy.sd.CLIP(target, embedding_directory=None, model_options=model_options)
    init_weights(clip.cond_stage_model, seed, scale=1.0)
    with torch.no_grad():  # token / position embeddings at CLIP's own scale (std 0.02)
        g = torch.Generator().manual_seed(seed + 7)
        for name, p in clip.cond_stage_model.named_parameters():
            if name.endswith(("embeddings.token_embedding.weight", "embeddings.position_embedding.weight")):
                p.normal_(0.0, 0.02, generator=g)
    return clip


# ----------------------------------------------------------------------------- VAE

def build_vae(*, ch: int = 32, seed: int = 2) -> "comfy.sd.VAE":
    """``comfy.sd.VAE`` with a small AutoencoderKL (4 levels -> 8x, 4 latent channels)."""
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": ch, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
                "dropout": 0.0}
    config = {"params": {"embed_dim": 4, "ddconfig": ddconfig}}
    with _quiet():
        ae = AutoencoderKL(**config["params"])
        init_weights(ae, seed)
        sd = ae.state_dict()
        vae = comfy.sd.VAE(sd=sd, config=config, dtype=torch.float32)
    return vae


@functools.cache
def _shared_vae() -> "comfy.sd.VAE":
    return build_vae()


# ----------------------------------------------------------------------------- families

def build(family: str, *, model_channels: int = 64, channel_mult=(1, 2), seed: int = 0,
          clip_layers: int = 3) -> TinyModels:
    """Uncached builder (use the cached ``tiny_*`` for the defaults)."""
    model, mc = build_unet(family, model_channels=model_channels, channel_mult=tuple(channel_mult), seed=seed)
    clip = build_clip(family, layers=clip_layers, seed=seed + 1)
    vae = _shared_vae()
    return TinyModels(model=model, clip=clip, vae=vae, family=family, context_dim=CONTEXT_DIM[family],
                      pooled_dim=POOLED_DIM[family], unet_config=dict(mc.unet_config))


@functools.cache
def tiny_sd15() -> TinyModels:
    return build("sd15")


@functools.cache
def tiny_sd2() -> TinyModels:
    return build("sd2")


@functools.cache
def tiny_sdxl() -> TinyModels:
    return build("sdxl")


def tiny(family: str) -> TinyModels:
    """``tiny(family)`` -> the cached builder of that family."""
    return {"sd15": tiny_sd15, "sd2": tiny_sd2, "sdxl": tiny_sdxl}[family]()


# Real SD1.5 UNet config (860M parameters), as comfy.model_detection lists it.
SD15_FULL_UNET = dict(
    _UNET_BASE, adm_in_channels=None, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, num_heads=8,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
)


# Real SDXL UNet config (2.6B parameters), as comfy.model_detection lists it.
SDXL_FULL_UNET = dict(
    _UNET_BASE, adm_in_channels=2816, num_classes="sequential", model_channels=320, num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
    use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
)
SD2_FULL_UNET = dict(SD15_FULL_UNET, use_linear_in_transformer=True, context_dim=1024, num_heads=-1,
                     num_head_channels=64)
_FULL_UNETS = {"sd15": SD15_FULL_UNET, "sd2": SD2_FULL_UNET, "sdxl": SDXL_FULL_UNET}


def _patcher(family, cfg: dict, seed: int, dtype=torch.float32) -> "comfy.model_patcher.ModelPatcher":
    """A model of ComfyUI's ``family`` (a UNet family name, or a supported_models class) with seeded weights."""
    config_class = {"sd15": sm.SD15, "sd2": sm.SD20, "sdxl": sm.SDXL}.get(family, family)
    mc = config_class(cfg)
    mc.set_inference_dtype(dtype, None)
    with _quiet():
        model = mc.get_model({}, "", device=mm.unet_offload_device())
    init_weights(model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


@functools.cache
def full_sd15_unet(seed: int = 0) -> "comfy.model_patcher.ModelPatcher":
    """The real SD1.5 UNet (860M parameters) in a ModelPatcher, small seeded random weights.
    Several seconds to build and ~3.4 GB of RAM: for benchmarks, not unit tests."""
    return _patcher("sd15", SD15_FULL_UNET, seed)


@functools.cache
def full_layout_unet(family: str, model_channels: int = 64, seed: int = 0) -> "comfy.model_patcher.ModelPatcher":
    """The real UNet layout of ``family`` (every block, level and transformer depth of SD1.5's 16,
    SD2.x's 16 or SDXL's 70 cross-attention layers, so other packs' per-layer keys land where they
    do on the real model) at ``model_channels`` instead of 320: milliseconds per step."""
    cfg = dict(_FULL_UNETS[family], model_channels=model_channels)
    if family == "sd15":
        cfg["num_heads"] = min(8, model_channels // 8)
    return _patcher(family, cfg, seed)


# ----------------------------------------------------------------------------- helpers

def encode(tm: TinyModels, text: str):
    """``[[cond, {"pooled_output": pooled}]]`` conditioning, as CLIPTextEncode makes it."""
    tokens = tm.clip.tokenize(text)
    cond, pooled = tm.clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def sample(tm: TinyModels, positive, negative, latent_hw=(8, 8), *, steps: int = 2, cfg: float = 5.0,
           seed: int = 0, sampler: str = "euler", scheduler: str = "normal", model=None, batch: int = 1):
    """Run ComfyUI's KSampler path (``comfy.sample.sample``) on an empty latent; returns samples."""
    import comfy.sample

    model = model if model is not None else tm.model
    latent = torch.zeros([batch, 4, latent_hw[0], latent_hw[1]])
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               disable_pbar=True, seed=seed)

