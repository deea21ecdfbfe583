"""ProductScene: category and brand backgrounds for product photos that never touch the product.

ComfyUI entry point. Everything here is wiring; the algorithms live in the host-free ``productscene``
package and the ComfyUI adapters in ``nodes/``.
"""
from comfy_api.v0_0_2 import ComfyExtension, io

from .nodes import NODES

WEB_DIRECTORY = "./js"


class ProductSceneExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> ProductSceneExtension:
    return ProductSceneExtension()
