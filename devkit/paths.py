"""Where the development tools find things, without importing anything heavy: the repository, its
cache folder and the ComfyUI tree the tests, scripts and benchmarks run (``PRODUCTSCENE_COMFYUI``, as
``scripts/test.sh`` sets it for the second host, else ``COMFYUI_PATH``, as for the command line,
else the development host ``.venv/comfyui``). ``devkit.comfy_env`` imports that tree."""
from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache" / "productscene"
COMFYUI_DIR = Path(os.environ.get("PRODUCTSCENE_COMFYUI") or os.environ.get("COMFYUI_PATH")
                   or REPO_ROOT / ".venv" / "comfyui").resolve()


def comfyui_version(tree: Path = COMFYUI_DIR) -> str:
    """The version a ComfyUI tree declares in its comfyui_version.py ("unknown" without one)."""
    try:
        text = (Path(tree) / "comfyui_version.py").read_text()
    except OSError:
        return "unknown"
    m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return m.group(1) if m else "unknown"
