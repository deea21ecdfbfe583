"""ComfyUI adapters. Each module defines ``NODES``, a list of V3 node classes; this package
collects them in module order. An import error here is not swallowed: ComfyUI then reports the
pack as failed, and tests/test_loader.py fails."""
import importlib
import pkgutil

NODES = []
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    NODES.extend(getattr(_module, "NODES", ()))
