"""HTTP routes the canvas extension (js/productscene.js) reads. Registered only inside a running
ComfyUI server; importing the pack elsewhere (tests, scripts) adds nothing."""
from __future__ import annotations

from aiohttp import web

from .paths import list_libraries, open_cached, resolve_library


def libraries_index() -> dict[str, dict]:
    """library file name -> its categories and base family, read from headers (cached by mtime)."""
    index = {}
    for name in list_libraries():
        library = open_cached(resolve_library(name))
        if library is not None:
            index[name] = {"categories": list(library.names), "family": library.family}
    return index


def _register() -> None:
    try:
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is None:
        return

    @PromptServer.instance.routes.get("/productscene/libraries")
    async def libraries(request):
        return web.json_response(libraries_index())


_register()
