"""The files a Flux.1 or Z-Image user puts in ComfyUI's model folders, tiny, for the DiT workflows'
server test (tests/test_dit_workflows.py) and the demo's family detection.

ComfyUI's file loaders fix the real widths (Flux detection: heads of 128, 24 of them on 0.3.75; Z-Image: width 3840;
the T5-XXL and Qwen3-4B encoders from fixed JSON configs, 4.7B / 4B parameters), so a small model
cannot go through them unchanged. Each small file therefore carries its small config in its
safetensors metadata under ``productscene.devkit.tiny_config`` (see devkit/tiny_dit_loaders: a
test-only custom node folder whose import teaches ComfyUI's loaders those configs, for marked files
only). What each file holds:

* ``flux/flux1-dev.safetensors``: the Flux.1-dev diffusion model of devkit/dit_models.py (ComfyUI's
  own class, width 64, 2 double + 2 single blocks, guidance embedding), keys as in the released
  file (``img_in.weight``, ``double_blocks.0...``), marked ``supported_model`` Flux;
* ``z_image/z_image_turbo_bf16.safetensors``: the Z-Image model of devkit/dit_models.py (width 256),
  marked ``supported_model`` ZImage;
* ``flux/clip_l.safetensors``, ``flux/t5xxl_fp16.safetensors``, ``z_image/qwen_3_4b.safetensors``:
  devkit/dit_text.py's encoders (real vocabularies, widths and tokenizers, narrow layers), marked
  with their ``model_options``;
* ``ae.safetensors``: a VAE of Flux's ``ae`` layout (16 latent channels, ComfyUI's 128-channel
  encoder/decoder, 84M parameters, seeded random weights, bfloat16), which ComfyUI detects by its
  keys with no help: no marker;
* ``flux/flux-categories.safetensors``, ``z_image/z_image-categories.safetensors``: UNTRAINED
  category libraries of the family (one seeded random identifier per sample category, at the
  encoder's embedding scale).

Cached in ``.cache/productscene/dit-files-<BUILDER_VERSION>/`` (atomic writes; a ``built`` stamp
written last), built once (about 1.4 GB, mostly the two text encoders' vocabulary tables).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .paths import CACHE_DIR

BUILDER_VERSION = "1"
MARKER = "productscene.devkit.tiny_config"
FAMILIES = ("flux", "z_image")
VAE_NAME = "ae.safetensors"
DIFFUSION_MODEL = {"flux": "flux1-dev.safetensors", "z_image": "z_image_turbo_bf16.safetensors"}
TEXT_ENCODERS = {"flux": ("clip_l.safetensors", "t5xxl_fp16.safetensors"), "z_image": ("qwen_3_4b.safetensors",)}
LIBRARY = {"flux": "flux-categories.safetensors", "z_image": "z_image-categories.safetensors"}
VAE_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def cache_dir(root: Path | None = None) -> Path:
    return Path(root or CACHE_DIR) / f"dit-files-{BUILDER_VERSION}"


def _save(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    """safetensors, atomically (tmp + rename), with no ProductScene format key: a model file."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _marker(spec: dict) -> dict:
    return {MARKER: json.dumps({"version": 1, **spec})}


def _diffusion_model(family: str, path: Path) -> Path:
    import torch
    from . import dit_models as dm
    build, config, name = {"flux": (dm.tiny_flux, dm.flux_config, "Flux"),
                           "z_image": (dm.tiny_zimage, dm.zimage_config, "ZImage")}[family]
    cfg = config()
    cfg.pop("txt_ids_dims", None)  # host-dependent: devkit/tiny_dit_loaders adds it where the host has it
    sd = {k: v.to(torch.bfloat16) for k, v in build().model.diffusion_model.state_dict().items()}
    return _save(sd, path, _marker({"kind": "diffusion_model", "supported_model": name, "unet_config": cfg}))


def _text_encoders(family: str, folder: Path) -> list[Path]:
    from . import dit_text
    options = {"flux": ({"model_config": dit_text.CLIP_L_CONFIG}, {"t5xxl_model_config": dit_text.T5_CONFIG}),
               "z_image": ({"qwen3_4b_model_config": dit_text.QWEN3_CONFIG},)}[family]
    return [_save(sd, folder / name, _marker({"kind": "text_encoder", "model_options": opts}))
            for name, sd, opts in zip(TEXT_ENCODERS[family], dit_text.state_dicts(family), options)]


def _vae(path: Path) -> Path:
    """Flux's ``ae`` layout (encoder.*, decoder.*; no quant convs), seeded, bfloat16."""
    import torch
    from . import comfy_env  # noqa: F401
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder
    from .dit_text import _random_state_dict
    with torch.device("meta"):
        enc, dec = Encoder(**VAE_DDCONFIG), Decoder(**VAE_DDCONFIG)
    sd = {f"encoder.{k}": v for k, v in _random_state_dict(enc, 21, 1.0).items()}
    sd.update({f"decoder.{k}": v for k, v in _random_state_dict(dec, 22, 1.0).items()})
    return _save(sd, path)


def _library(family: str, path: Path) -> Path:
    import torch
    from productscene.library import FAMILIES as LIB_FAMILIES, TokenLibrary
    from .default_model import sample_category_words
    words = sample_category_words()
    names = sorted(words)
    (enc, width), = LIB_FAMILIES[family].items()
    std = {"flux": 1.0, "z_image": 0.02}[family]  # the tiny encoders' token embedding scale
    g = torch.Generator().manual_seed(31)
    vectors = {enc: torch.randn(len(names), 1, width, generator=g) * std}
    TokenLibrary.write(path, names, vectors, family, init_words=words, license="test",
                       created_by=f"devkit.dit_files {BUILDER_VERSION} (untrained)")
    return path


def files(family: str, root: Path | None = None) -> dict:
    """``{folder: [paths]}`` of ``family``'s files under ComfyUI's model folder names
    (diffusion_models, text_encoders, vae, category_libraries)."""
    base = cache_dir(root)
    return {"diffusion_models": [base / family / DIFFUSION_MODEL[family]],
            "text_encoders": [base / family / n for n in TEXT_ENCODERS[family]],
            "vae": [base / VAE_NAME], "category_libraries": [base / family / LIBRARY[family]]}


def ensure(root: Path | None = None, log=print) -> Path:
    """Build every family's files once (cached); returns the cache folder."""
    base = cache_dir(root)
    stamp = base / "built"
    if stamp.exists():
        return base
    log(f"building the tiny Flux.1 and Z-Image files in {base} (once)")
    _vae(base / VAE_NAME)
    for family in FAMILIES:
        _diffusion_model(family, base / family / DIFFUSION_MODEL[family])
        _text_encoders(family, base / family)
        _library(family, base / family / LIBRARY[family])
    stamp.write_text(BUILDER_VERSION + "\n")
    return base
