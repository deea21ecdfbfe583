"""ComfyUI outside its server, for the command line (``python -m productscene train-categories``).

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
