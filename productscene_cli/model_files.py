"""Model-file options checked by their safetensors header alone, before any model loads: the file
is there and holds the weights the option asks for, not one of ProductScene's own files."""
from __future__ import annotations

import os

from productscene.errors import ProductSceneError
from productscene.files import FORMAT_KEY, read_header


def check_model_checkpoint(path: str) -> None:
    """The model checkpoint is a safetensors file of a model, not one of ProductScene's own files."""
    check_weights_file(path, "checkpoint", ("model.diffusion_model.", "diffusion_model."), ("a model", "diffusion model"),
                       "give --checkpoint a full Stable Diffusion checkpoint (UNet, CLIP and VAE) to train for")


def check_clip_vision(path: str) -> None:
    """The CLIP vision file is a safetensors file of an image encoder, not a diffusion model or one
    of ProductScene's own files."""
    check_weights_file(path, "clip-vision", ("vision_model.", "visual.", "encoder.layer."),
                       ("a CLIP vision model", "CLIP vision"),
                       "give --clip-vision a CLIP vision model (.safetensors) that ComfyUI's CLIPVisionLoader takes")


def check_weights_file(path: str, name: str, prefixes: tuple[str, ...], wanted: tuple[str, str], hint: str) -> None:
    """``path`` is a safetensors file whose header (no tensor is read) names weights that start with
    one of ``prefixes``. Errors begin with ``name``; ``wanted``: (what the file should be, whose
    weights it should hold), e.g. ("a model", "diffusion model"); ``hint`` ends them."""
    if not os.path.isfile(path):
        raise ProductSceneError(f"{name}: {path!r} not found")
    try:
        meta, index = read_header(path)
    except ProductSceneError as e:
        raise ProductSceneError(f"{name}: {e}") from None
    if any(k.startswith(prefixes) for k in index):
        return
    kind = meta.get(FORMAT_KEY)
    what = f"is a ProductScene {kind.replace('_', ' ')}, not {wanted[0]}" if kind else f"holds no {wanted[1]} weights"
    raise ProductSceneError(f"{name}: {os.path.basename(path)} {what}; {hint}")


def check_ipadapter(path: str) -> str:
    """The file to fine-tune is a safetensors IP-Adapter file (its keys), before any model loads."""
    check_weights_file(path, "from-ipadapter", ("ip_adapter.",), ("an IP-Adapter file", "IP-Adapter"),
                       "give --from-ipadapter an IP-Adapter file such as ip-adapter-plus_sd15.safetensors")
    return path
