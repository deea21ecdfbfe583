"""Modules of scripts/ (not a package) loaded by path, once per process."""
from __future__ import annotations

import importlib.util
import sys

from .comfy_env import REPO_ROOT


def load_script(name: str):
    """``scripts/<name>.py`` as a module (registered as ``productscene_<name>``)."""
    key = "productscene_" + name
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO_ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]
