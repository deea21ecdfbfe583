"""HTTP routes the canvas extension (js/categories.js) reads. Registered only inside a running
ComfyUI server; importing the pack elsewhere (tests, scripts) adds nothing.

- ``GET /productscene/libraries``: every category library the Category Tokens node offers,
  ``{name: {"family": "sd15", "count": 5000}}`` (headers only, no category names).
- ``GET /productscene/libraries/categories?library=NAME``: one library's category names,
  ``{"library", "family", "count", "categories"}``. A name that is absolute, contains ``..`` or is
  not a listed library answers 400 / 404 with ``{"error": message}``. The encoded answer is cached
  per file (mtime, size) and carries an ETag, so a browser asking again gets 304.
"""
from __future__ import annotations

import json
import os

from aiohttp import web

from productscene.errors import ProductSceneError
from .paths import _check_name, list_libraries, open_cached, resolve_library
from .running_server import prompt_server

_BODIES: dict[str, tuple[tuple, bytes, str]] = {}


def libraries_summary() -> dict[str, dict]:
    """library name -> its base family and number of categories (headers, cached by mtime)."""
    out = {}
    for name in list_libraries():
        library = open_cached(resolve_library(name))
        if library is not None:
            out[name] = {"family": library.family, "count": len(library.names)}
    return out


def categories_body(name) -> tuple[bytes, str]:
    """The JSON answer for one library and its ETag; raises ProductSceneError (``status`` 400 or
    404) for a name that escapes the model folders or is not a listed library."""
    try:
        _check_name(name, "library")
    except ProductSceneError as e:
        e.status = 400
        raise
    if "\x00" in name or name not in list_libraries():
        error = ProductSceneError(f"library: {name!r} is not a category library in models/category_libraries "
                                  f"or models/embeddings")
        error.status = 404
        raise error
    path = resolve_library(name)
    st = os.stat(path)
    key = (st.st_mtime_ns, st.st_size)
    hit = _BODIES.get(name)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    library = open_cached(path)
    if library is None:
        error = ProductSceneError(f"library: {name!r} is not a readable category library")
        error.status = 404
        raise error
    names = list(library.names)
    body = json.dumps({"library": name, "family": library.family, "count": len(names),
                       "categories": names}, ensure_ascii=False, separators=(",", ":")).encode()
    etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}-{len(names):x}"'
    _BODIES[name] = (key, body, etag)
    return body, etag


def _register() -> None:
    server = prompt_server()
    if server is None:
        return
    routes = server.routes

    @routes.get("/productscene/libraries")
    async def libraries(request):
        return web.json_response(libraries_summary(), headers={"Cache-Control": "no-cache"})

    @routes.get("/productscene/libraries/categories")
    async def categories(request):
        name = request.query.get("library", "")
        try:
            body, etag = categories_body(name)
        except ProductSceneError as e:
            return web.json_response({"error": str(e)}, status=getattr(e, "status", 400))
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type="application/json", headers=headers)


_register()
