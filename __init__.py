"""ProductScene: category and brand backgrounds for product photos that never touch the product.

ComfyUI entry point. Everything here is wiring; the algorithms live in the host-free ``productscene``
package and the ComfyUI adapters in ``nodes/``.
"""
import importlib.util
import os
import sys


def _bind_core() -> None:
    """Make this pack's core importable as ``productscene`` (one module identity however the pack is
    loaded: ComfyUI's loader, the command line, tests), so an error class or a value type raised or
    made in the core is the same class in every node."""
    here = os.path.dirname(os.path.realpath(__file__))
    core = os.path.join(here, "productscene")
    loaded = sys.modules.get("productscene")
    if loaded is not None:
        where = os.path.dirname(os.path.realpath(getattr(loaded, "__file__", "") or ""))
        if where != core:
            raise ImportError(
                f"ProductScene: another copy of the pack's core is already loaded from {where}; "
                f"keep one ProductScene folder in custom_nodes (this one is {here})")
        return
    spec = importlib.util.spec_from_file_location(
        "productscene", os.path.join(core, "__init__.py"), submodule_search_locations=[core])
    module = importlib.util.module_from_spec(spec)
    sys.modules["productscene"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["productscene"]
        raise


_bind_core()

from comfy_api.v0_0_2 import ComfyExtension, io  # noqa: E402

from .nodes import NODES  # noqa: E402

WEB_DIRECTORY = "./js"


class ProductSceneExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> ProductSceneExtension:
    return ProductSceneExtension()
