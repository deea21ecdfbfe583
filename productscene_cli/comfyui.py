"""ComfyUI outside its server, for the training commands: find a ComfyUI tree, set its options before
``comfy.model_management`` reads them, import this repository as a ComfyUI pack (the way ComfyUI's
own loader imports a custom-node folder, under a name of ours: the folder may be called anything),
and load model files with ComfyUI's own loaders."""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

from productscene.errors import ProductSceneError

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "productscene_pack"


def find_comfyui(path: str | None = None) -> Path:
    candidates = [path, os.environ.get("COMFYUI_PATH"), str(REPO_ROOT / ".venv" / "comfyui")]
    for c in candidates:
        if not c:
            continue
        p = Path(c).expanduser().resolve()
        if (p / "comfy").is_dir() and (p / "comfy" / "model_management.py").is_file():
            return p
        if c is path or c == os.environ.get("COMFYUI_PATH"):
            raise ProductSceneError(f"comfyui: {c!r} is not a ComfyUI folder (no comfy/model_management.py)")
    raise ProductSceneError(
        "comfyui: no ComfyUI found; pass --comfyui PATH or set COMFYUI_PATH to a ComfyUI checkout")


def configure(comfyui_root: str, cpu: bool = False, **options) -> None:
    """Put ComfyUI first on ``sys.path`` (before this repository: ComfyUI's ``nodes.py`` must win
    over the pack's ``nodes/``) and set its options (``cpu`` and any other of its command-line
    arguments, e.g. ``base_directory``) before ``comfy.model_management`` reads them."""
    if comfyui_root in sys.path:
        sys.path.remove(comfyui_root)
    sys.path.insert(0, comfyui_root)
    import comfy.options  # noqa: F401  (ComfyUI parses no argv unless asked)
    import comfy.cli_args as cli_args
    if cpu:
        cli_args.args.cpu = True
    for name, value in options.items():
        setattr(cli_args.args, name, value)
    import comfy.model_management  # noqa: F401
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False  # the command line draws its own bar


def import_repo_as_pack(name: str) -> types.ModuleType:
    """This repository imported as a package called ``name``, the way ComfyUI's loader imports a
    custom-node folder (ComfyUI must be importable already). Imported once per name."""
    pack = sys.modules.get(name)
    if pack is None:
        spec = importlib.util.spec_from_file_location(
            name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[name] = pack
        try:
            spec.loader.exec_module(pack)
        except BaseException:
            del sys.modules[name]
            raise
    return pack


def load_pack(comfyui: str | None = None, cpu: bool = False) -> types.ModuleType:
    """ComfyUI from ``comfyui``, then this repository as a ComfyUI pack. The pack binds its core to
    the ``productscene`` already imported here, so the command line and the nodes share one core."""
    configure(str(find_comfyui(comfyui)), cpu=cpu)
    return import_repo_as_pack(PACK_NAME)


def load_host_adapter(comfyui: str | None = None, cpu: bool = False) -> types.ModuleType:
    """The pack's ComfyUI training adapter (``nodes/training_host.py``: the host only; the run
    itself is the core's), with ComfyUI loaded."""
    return load_pack(comfyui, cpu).nodes.training_host


def one_line(error: Exception) -> str:
    """ComfyUI's own message of ``error`` on one line (some span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def load_checkpoint(path: str):
    """(model, clip, vae) of a full checkpoint; a file ComfyUI cannot use is named as ``checkpoint``."""
    import comfy.sd
    if not os.path.isfile(path):
        raise ProductSceneError(f"checkpoint: {path!r} not found")
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    except Exception as e:  # ComfyUI cannot identify the model ("Could not detect model type"), or bad weights
        raise ProductSceneError(f"checkpoint: ComfyUI could not load {path} as a model checkpoint ({one_line(e)}); give a "
                                f"full checkpoint that CheckpointLoaderSimple takes (SD1.5, SD2.x, SDXL; for the category "
                                f"commands also an all-in-one Flux.1 or Z-Image checkpoint)") from None
    if model is None:
        raise ProductSceneError(f"checkpoint: ComfyUI does not detect a diffusion model in {path}")
    if clip is None or vae is None:
        raise ProductSceneError(f"checkpoint: {path} has no text encoder or no VAE; use a full checkpoint")
    return model, clip, vae


def load_clip_vision(path: str):
    """A ComfyUI CLIP vision model (what CLIPVisionLoader gives); a file it cannot use is named as
    ``clip-vision``."""
    import comfy.clip_vision
    if not os.path.isfile(path):
        raise ProductSceneError(f"clip-vision: {path!r} not found")
    try:
        clip_vision = comfy.clip_vision.load(path)
    except Exception as e:  # an unreadable file, or weights that do not fit the detected shape
        raise ProductSceneError(f"clip-vision: ComfyUI could not load {path} as a CLIP vision model ({one_line(e)})") from None
    if clip_vision is None:
        raise ProductSceneError(
            f"clip-vision: ComfyUI does not detect a CLIP vision model in {path}; give a CLIP vision "
            f"file that ComfyUI's CLIPVisionLoader takes (e.g. a ViT-L/14 or ViT-H/14 image encoder)")
    return clip_vision
