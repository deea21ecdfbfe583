"""ComfyUI outside its server, for the command line's training commands (``python -m productscene
train-categories``, ``train-personality``, ...).

Loaded by path from ``productscene/cli.py`` before anything else of ComfyUI is imported, so the
core never imports ComfyUI itself. No relative imports here: this module runs before the pack's
package exists.
"""
from __future__ import annotations

import os
import sys


def configure(comfyui_root: str, cpu: bool = False) -> None:
    """Put ComfyUI on ``sys.path`` and set its options before ``comfy.model_management`` reads them."""
    if comfyui_root not in sys.path:
        sys.path.insert(0, comfyui_root)
    import comfy.options  # noqa: F401  (ComfyUI parses no argv unless asked)
    import comfy.cli_args as cli_args
    if cpu:
        cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False  # the command line draws its own bar


def load_checkpoint(path: str, error=ValueError):
    """(model, clip, vae) of a full checkpoint, or ``error`` naming the input."""
    import comfy.sd
    if not os.path.isfile(path):
        raise error(f"checkpoint: {path!r} not found")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    if clip is None or vae is None:
        raise error(f"checkpoint: {path} has no text encoder or no VAE; use a full checkpoint")
    return model, clip, vae


def load_clip_vision(path: str, error=ValueError):
    """A ComfyUI CLIP vision model (what CLIPVisionLoader gives), or ``error`` naming the input."""
    import comfy.clip_vision
    if not os.path.isfile(path):
        raise error(f"clip-vision: {path!r} not found")
    try:
        clip_vision = comfy.clip_vision.load(path)
    except Exception as e:  # an unreadable file, or weights that do not fit the detected shape
        raise error(f"clip-vision: ComfyUI could not load {path} as a CLIP vision model ({e})") from None
    if clip_vision is None:
        raise error(f"clip-vision: ComfyUI does not detect a CLIP vision model in {path}; give a CLIP vision "
                    f"file that ComfyUI's CLIPVisionLoader takes (e.g. a ViT-L/14 or ViT-H/14 image encoder)")
    return clip_vision
