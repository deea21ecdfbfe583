"""Make the real ComfyUI importable in this process, on the CPU, with a private base directory.

Import this module before anything imports ``comfy``, ``nodes`` or ``folder_paths``
(``tests/conftest.py`` does it at collection time; the dev kit's model builders before they use
ComfyUI). Importing it:

* puts the ComfyUI tree (``devkit.paths.COMFYUI_DIR``) on ``sys.path[0]`` with the command line's
  own bootstrap (``productscene_cli.comfyui.configure``: one way into ComfyUI outside its server).
  ``COMFYUI_VERSION`` is the tree's version.
  It must sit *before* the repo root: the repo has a ``nodes/`` package and ComfyUI a ``nodes.py``;
  ``import nodes`` must give ComfyUI's. (The pack's own ``nodes/`` is only ever imported as a
  subpackage of the pack, see :func:`import_pack`.)
* sets ComfyUI's parsed arguments before ``comfy.model_management`` reads them: ``--cpu``
  (``PRODUCTSCENE_COMFY_GPU=1`` leaves device choice to ComfyUI), and a temporary
  ``--base-directory`` so that ``folder_paths`` (models/, input/, output/, user/, temp/) never
  touches the shared tree. The directory is removed at interpreter exit.
* hides ComfyUI's import-time warnings (torchaudio missing, ...), and turns off tqdm progress bars.

Nothing here imports ``productscene``: the core stays host-free.
"""
from __future__ import annotations

import atexit
import functools
import gc
import logging
import os
import shutil
import sys
import tempfile
import types
import warnings
from pathlib import Path

from productscene_cli.comfyui import configure

from .paths import COMFYUI_DIR, REPO_ROOT, comfyui_version  # noqa: F401  (re-exported for the tests)

if not (COMFYUI_DIR / "main.py").is_file() or not (COMFYUI_DIR / "comfy").is_dir():
    raise RuntimeError(
        f"ComfyUI tree not found at {COMFYUI_DIR} (no main.py / comfy/). Run `bash scripts/setup_host.sh` "
        "or point PRODUCTSCENE_COMFYUI at a ComfyUI tree (0.3.75 or 0.33)."
    )

COMFYUI_VERSION = comfyui_version()

# Private base directory for folder_paths (models/, input/, output/, temp/, user/, custom_nodes/).
BASE_DIR = Path(tempfile.mkdtemp(prefix="productscene-comfy-base-"))
for _sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
    (BASE_DIR / _sub).mkdir()
atexit.register(shutil.rmtree, BASE_DIR, True)

# SWIG extension types (sentencepiece, ...) warn "builtin type ... has no __module__" on import and exit.
warnings.filterwarnings("ignore", message=r"builtin type swig", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r"builtin type Swig", category=DeprecationWarning)

FORCE_CPU = os.environ.get("PRODUCTSCENE_COMFY_GPU", "") not in ("1", "true", "yes")

_NOISY = ("torchaudio missing", "ACE model", "MMAudio")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # pragma: no cover - trivial
        msg = record.getMessage()
        return not any(n in msg for n in _NOISY)


def _configure() -> None:
    loaded = sys.modules.get("comfy")
    where = [Path(p).resolve().parent for p in getattr(loaded, "__path__", [])]
    if where and COMFYUI_DIR not in where:
        raise RuntimeError(f"ComfyUI is already imported from {where[0]}, but the dev kit was asked to use "
                           f"{COMFYUI_DIR} (PRODUCTSCENE_COMFYUI)")
    if "comfy.model_management" in sys.modules:
        import comfy.cli_args as cli_args
        if FORCE_CPU and not cli_args.args.cpu:
            raise RuntimeError("comfy.model_management was imported before devkit.comfy_env; "
                               "import comfy_env first so ComfyUI picks the CPU")
    root = logging.getLogger()
    noise = _DropNoise()
    root.addFilter(noise)
    for h in root.handlers:
        h.addFilter(noise)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # import-time chatter only
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # SWIG modules' "no __module__"
            configure(str(COMFYUI_DIR), cpu=FORCE_CPU, base_directory=str(BASE_DIR), disable_auto_launch=True,
                      auto_launch=False, database_url="sqlite:///:memory:")
            import folder_paths  # noqa: F401
    finally:
        logging.disable(previous)


_configure()


def import_comfy_nodes():
    """Import ComfyUI's ``nodes`` module (core nodes; the heavy part, ~5 s) quietly and return it."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import nodes
    finally:
        logging.disable(previous)
    return nodes


@functools.cache
def import_pack(name: str = "productscene_pack_under_test") -> types.ModuleType:
    """Import the repo as a ComfyUI pack package called ``name`` (not the repo folder's name), the
    way ComfyUI does, so ``nodes/*.py`` with their relative imports (``from ..productscene...``)
    can be unit-tested: ``pack = import_pack(); pack.nodes.product_mask.SomeNode``.
    Does not register anything in ``nodes.NODE_CLASS_MAPPINGS`` (tests/test_loader.py does that
    through ComfyUI's own loader)."""
    from productscene_cli.comfyui import import_repo_as_pack
    return import_repo_as_pack(name)


def cached_model(builder):
    """``functools.cache`` for a builder of ComfyUI models, emptied at interpreter exit while
    ComfyUI's modules still exist: a ModelPatcher freed during module teardown fails in its
    ``__del__`` and prints "Exception ignored in ModelPatcher.__del__"."""
    cached = functools.cache(builder)

    def release():
        cached.cache_clear()
        gc.collect()
    atexit.register(release)
    return cached
