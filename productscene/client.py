"""A client for ComfyUI's HTTP API and its ``/ws`` websocket; host-free. The requests go over the
client's own kept-alive HTTP/1.1 connections (:mod:`productscene.http1`), the websocket over aiohttp
(which every ComfyUI installs).

``AsyncComfyClient`` is the client: one aiohttp session, many servers, for the batch run's event
loop. ``ComfyClient`` is the same API for synchronous callers (tests, the demo, benchmarks)::

    client = ComfyClient("http://127.0.0.1:8188")
    ref = client.upload_image("product.png")             # -> {"name", "subfolder", "type"}
    pid = client.queue(api_prompt)                       # ProductSceneError with node_errors if rejected
    client.wait(pid, timeout=600)                        # ProductSceneError with the execution_error
    for image in client.outputs(pid):                    # ImageRef(filename, subfolder, type)
        png = client.download(image)

Every failure is a ProductSceneError whose message says what the server said; failures worth
retrying (the server is unreachable or answered HTTP 5xx) are its subclass ServerError.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import NamedTuple

import aiohttp
from yarl import URL

from .errors import ProductSceneError
from .http1 import HTTPConnectionError, HTTPPool


class ServerError(ProductSceneError):
    """The server could not answer now (unreachable, or HTTP 5xx): the same request may succeed later."""


class ServerUnreachable(ServerError):
    """No connection to the server (not running, restarting, network down)."""


class WebSocketClosed(ServerUnreachable):
    """The websocket ended (closed by either side, reset, or the server is gone)."""


class ImageRef(NamedTuple):
    filename: str
    subfolder: str
    type: str  # "output" | "temp" | "input"


class Outcome(NamedTuple):
    state: str              # "running" (no history entry or not finished) | "done" | "error"
    message: str = ""       # for "error": the node and exception ComfyUI reported


def outcome(prompt_id: str, entry: dict | None) -> Outcome:
    """What a prompt's history entry (None: not there yet) says about its run."""
    if entry is None:
        return Outcome("running")
    status = entry.get("status") or {}
    if status.get("status_str") == "error" or (status and not status.get("completed", True)):
        return Outcome("error", _failure_message(prompt_id, status))
    return Outcome("done")


def _failure_message(prompt_id: str, status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"prompt {prompt_id} failed in node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type', 'Error')}: {data.get('exception_message', '').strip()}")
        if kind == "execution_interrupted":
            return f"prompt {prompt_id} was interrupted in node {data.get('node_id')} ({data.get('node_type')})"
    return f"prompt {prompt_id} failed: {status}"


def execution_span(entry: dict) -> tuple[int, int] | None:
    """(start, end) of a finished run in the server's own clock (ms since the epoch), from the
    ``execution_start`` and ``execution_success``/``execution_error`` messages of its history entry."""
    stamps = {kind: data.get("timestamp") for kind, data in (entry.get("status") or {}).get("messages", [])}
    start = stamps.get("execution_start")
    end = stamps.get("execution_success") or stamps.get("execution_error") or stamps.get("execution_interrupted")
    return (int(start), int(end)) if start is not None and end is not None else None


def image_refs(entry: dict, node_id: str | None = None) -> list[ImageRef]:
    """Images a finished run produced (all output nodes in node id order, or one node)."""
    out = entry.get("outputs", {})

    def order(k):
        return (0, int(k)) if str(k).isdigit() else (1, str(k))

    refs = []
    for nid in sorted(out, key=order):
        if node_id is not None and str(nid) != str(node_id):
            continue
        for img in out[nid].get("images", []):
            refs.append(ImageRef(img["filename"], img.get("subfolder", ""), img.get("type", "output")))
    return refs


def _format_node_errors(node_errors: dict) -> str:
    lines = []
    for node_id, info in (node_errors or {}).items():
        cls = info.get("class_type", "?")
        for err in info.get("errors", []):
            detail = err.get("details") or ""
            lines.append(f"node {node_id} ({cls}): {err.get('message', '')}"
                         + (f": {detail}" if detail else ""))
    return "\n".join(lines)


def _multipart(fields: dict[str, str], file_field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body as one bytes object, so a request is one socket write (aiohttp's
    FormData writes every part apart: about a dozen writes an upload)."""
    boundary = uuid.uuid4().hex
    quoted = urllib.parse.quote(filename, safe="")      # as aiohttp's FormData quotes it
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{quoted}"\r\n'
                 f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class _HTTPError(ProductSceneError):
    def __init__(self, code: int, payload, where: str):
        super().__init__(f"{where}: HTTP {code}")
        self.code, self.payload, self.where = code, payload, where


class AsyncComfyClient:
    """ComfyUI's API on one server. Requests go through the client's own kept-alive connections
    (:mod:`productscene.http1`; :meth:`close` closes them), the websocket through ``session`` (the
    caller's; shared by many clients)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, *, timeout: float = 60.0,
                 client_id: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex
        try:
            self._http = HTTPPool(str(URL(self.base_url)))     # URL(): an IDNA host, a quoted path
        except ValueError as e:
            raise ProductSceneError(f"server: {e}") from None

    def close(self) -> None:
        """Close the kept-alive connections (the next request opens a new one)."""
        self._http.close()

    # ------------------------------------------------------------------ transport
    async def _request(self, method: str, path: str, *, raw: bool = False, data: bytes | None = None,
                       content_type: str | None = None):
        """``path``: already quoted (every caller quotes what it puts in)."""
        try:
            status, _, body = await self._http.request(method, path, body=data, content_type=content_type,
                                                       timeout=self.timeout)
        except (HTTPConnectionError, asyncio.TimeoutError, OSError) as e:
            raise ServerUnreachable(f"ComfyUI at {self.base_url} is not reachable ({method} {path}): "
                                    f"{type(e).__name__}: {e}") from None
        if status >= 400:
            try:
                payload = json.loads(body)
            except ValueError:
                payload = body.decode("utf-8", "replace")
            raise _HTTPError(status, payload, f"{method} {path}")
        if raw:
            return body
        try:
            return json.loads(body) if body else None
        except ValueError:
            raise ProductSceneError(f"ComfyUI answered {method} {path} with something that is not JSON: "
                                    f"{body[:200]!r}") from None

    async def get(self, path: str, **params):
        """The JSON a GET of ``path`` (with query ``params``) answers; routes without a method here."""
        if params:
            path += "?" + urllib.parse.urlencode(params)
        try:
            return await self._request("GET", path)
        except _HTTPError as e:
            kind = ServerError if e.code >= 500 else ProductSceneError
            raise kind(f"ComfyUI answered {e.where} with HTTP {e.code}: {e.payload}") from None

    # ------------------------------------------------------------------ API
    async def object_info(self, node_class: str | None = None) -> dict:
        """``GET /object_info`` (every node) or ``/object_info/{node_class}``."""
        return await self.get("/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else ""))

    async def extensions(self) -> list[str]:
        """``GET /extensions``: URLs of every frontend extension script the server serves."""
        return await self.get("/extensions")

    async def system_stats(self) -> dict:
        return await self.get("/system_stats")

    async def upload_image(self, path_or_bytes, name: str | None = None, *, subfolder: str = "",
                           overwrite: bool = True, type: str = "input") -> dict:
        """``POST /upload/image`` (multipart). Returns ``{"name", "subfolder", "type"}``; use
        ``name`` (with ``subfolder/``) as LoadImage's ``image`` input."""
        if isinstance(path_or_bytes, (bytes, bytearray)):
            if not name:
                raise ProductSceneError("name: expected a file name when uploading raw bytes")
            data = bytes(path_or_bytes)
        else:
            path = Path(path_or_bytes)
            if not path.is_file():
                raise ProductSceneError(f"image: file not found: {path}")
            data = path.read_bytes()
            name = name or path.name
        body, content_type = _multipart({"type": type, "subfolder": subfolder,
                                         "overwrite": "true" if overwrite else "false"}, "image", name, data)
        try:
            return await self._request("POST", "/upload/image", data=body, content_type=content_type)
        except _HTTPError as e:
            kind = ServerError if e.code >= 500 else ProductSceneError
            raise kind(f"ComfyUI refused the upload of {name!r} (HTTP {e.code}): {e.payload}") from None

    async def queue(self, prompt: dict | bytes, client_id: str | None = None, *, strict: bool = True) -> str:
        """``POST /prompt`` with an API-format graph (a dict, or its JSON as bytes when the caller
        has it already); returns the prompt id.

        A rejected prompt raises ProductSceneError with the server's node_errors. With ``strict``
        (default) a prompt that was queued although some of its outputs failed validation raises
        too (the valid outputs still run; the message names the prompt id)."""
        graph_json = prompt if isinstance(prompt, bytes) else json.dumps(prompt).encode()
        body = b'{"prompt": ' + graph_json + b', "client_id": ' + json.dumps(client_id or self.client_id).encode() + b"}"
        try:
            answer = await self._request("POST", "/prompt", data=body, content_type="application/json")
        except _HTTPError as e:
            if e.code >= 500:
                raise ServerError(f"ComfyUI could not take the prompt (HTTP {e.code}): {e.payload}") from None
            p = e.payload if isinstance(e.payload, dict) else {"error": e.payload}
            err = p.get("error") or {}
            if isinstance(err, dict):
                head = err.get("message", "") + (f": {err['details']}" if err.get("details") else "")
            else:
                head = str(err)
            detail = _format_node_errors(p.get("node_errors", {}))
            raise ProductSceneError(f"ComfyUI rejected the prompt: {head}" + (f"\n{detail}" if detail else "")) from None
        prompt_id = (answer or {}).get("prompt_id")
        if not prompt_id:
            raise ProductSceneError(f"ComfyUI did not queue the prompt: {answer}")
        if strict and answer.get("node_errors"):
            raise ProductSceneError(f"ComfyUI queued prompt {prompt_id} but rejected some outputs:\n"
                                    + _format_node_errors(answer["node_errors"]))
        return prompt_id

    async def history(self, prompt_id: str) -> dict | None:
        """The history entry of ``prompt_id`` or None while it is queued or running."""
        return (await self.get(f"/history/{urllib.parse.quote(prompt_id)}") or {}).get(prompt_id)

    async def history_all(self) -> dict:
        """Every history entry the server holds (``GET /history``): ``{prompt_id: entry}``."""
        return await self.get("/history") or {}

    async def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> dict:
        """Poll ``GET /history/{prompt_id}`` until the run ends; returns its history entry.
        Raises ProductSceneError with ComfyUI's execution_error when the run failed, and on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            entry = await self.history(prompt_id)
            state = outcome(prompt_id, entry)
            if state.state == "error":
                raise ProductSceneError(state.message)
            if state.state == "done":
                return entry
            if time.monotonic() > deadline:
                raise ProductSceneError(f"prompt {prompt_id}: ComfyUI did not finish within {timeout:.0f} s")
            await asyncio.sleep(poll)

    async def outputs(self, prompt_id: str, node_id: str | None = None) -> list[ImageRef]:
        """Images the finished run produced (all output nodes in node id order, or one node)."""
        entry = await self.history(prompt_id)
        if entry is None:
            raise ProductSceneError(f"prompt {prompt_id}: no history (still queued or running, or unknown id)")
        return image_refs(entry, node_id)

    async def download(self, image_ref) -> bytes:
        """The bytes of an image via ``GET /view`` (ImageRef, (filename, subfolder, type) or a dict)."""
        if isinstance(image_ref, dict):
            filename, subfolder, kind = image_ref["filename"], image_ref.get("subfolder", ""), image_ref.get("type", "output")
        else:
            filename, subfolder, kind = image_ref
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": kind})
        try:
            return await self._request("GET", f"/view?{query}", raw=True)
        except _HTTPError as e:
            error = ServerError if e.code >= 500 else ProductSceneError
            raise error(f"ComfyUI has no {kind} image {subfolder + '/' if subfolder else ''}{filename} "
                        f"(HTTP {e.code})") from None

    async def queue_ids(self) -> set[str]:
        """Ids of the prompts the server is running or has pending (``GET /queue``)."""
        state = await self.get("/queue") or {}
        return {str(item[1]) for key in ("queue_running", "queue_pending") for item in state.get(key, [])
                if isinstance(item, list) and len(item) > 1}

    async def libraries(self) -> dict[str, dict] | None:
        """``{library file: {"family", "count"}}`` from the pack's ``GET /productscene/libraries``;
        None when the server does not have that route (ProductScene not installed)."""
        try:
            return await self._request("GET", "/productscene/libraries") or {}
        except _HTTPError as e:
            if e.code == 404:
                return None
            raise ServerError(f"ComfyUI answered GET /productscene/libraries with HTTP {e.code}") from None

    async def library_categories(self, library: str) -> list[str]:
        """One library's category names (``GET /productscene/libraries/categories``)."""
        return list((await self.get("/productscene/libraries/categories", library=library)).get("categories", []))

    async def websocket(self) -> aiohttp.ClientWebSocketResponse:
        """A websocket on ``/ws`` for this client's id: the server sends it the messages
        (``executing``, ``progress``, ``execution_error`` ...) of the prompts this client queued.
        Closing it (``await ws.close()``) sends a Close frame."""
        url = self.base_url + "/ws?" + urllib.parse.urlencode({"clientId": self.client_id})
        try:
            return await self.session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                                                 heartbeat=None, autoping=True, max_msg_size=64 * 1024 * 1024)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise WebSocketClosed(f"websocket: cannot connect to {url}: {type(e).__name__}: {e}") from None

    async def interrupt(self) -> None:
        await self._request("POST", "/interrupt")


# ---------------------------------------------------------------------- synchronous callers
_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    """One event loop in a daemon thread that runs the synchronous clients' calls."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="productscene-client", daemon=True).start()
        return _loop


def _run(coro):
    return asyncio.run_coroutine_threadsafe(coro, _background_loop()).result()


class ComfyClient:
    """The API of :class:`AsyncComfyClient` for synchronous code (each call its own session)."""

    def __init__(self, base_url: str, *, timeout: float = 60.0, client_id: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex

    def _call(self, name: str, *args, **kwargs):
        async def call():
            async with aiohttp.ClientSession() as session:
                client = AsyncComfyClient(self.base_url, session, timeout=self.timeout, client_id=self.client_id)
                try:
                    return await getattr(client, name)(*args, **kwargs)
                finally:
                    client.close()
        return _run(call())

    def get(self, path: str, **params):
        return self._call("get", path, **params)

    def object_info(self, node_class: str | None = None) -> dict:
        return self._call("object_info", node_class)

    def extensions(self) -> list[str]:
        return self._call("extensions")

    def system_stats(self) -> dict:
        return self._call("system_stats")

    def upload_image(self, path_or_bytes, name: str | None = None, *, subfolder: str = "",
                     overwrite: bool = True, type: str = "input") -> dict:
        return self._call("upload_image", path_or_bytes, name, subfolder=subfolder, overwrite=overwrite, type=type)

    def queue(self, prompt: dict | bytes, client_id: str | None = None, *, strict: bool = True) -> str:
        return self._call("queue", prompt, client_id, strict=strict)

    def history(self, prompt_id: str) -> dict | None:
        return self._call("history", prompt_id)

    def history_all(self) -> dict:
        return self._call("history_all")

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> dict:
        return self._call("wait", prompt_id, timeout, poll)

    execution_span = staticmethod(execution_span)

    def outputs(self, prompt_id: str, node_id: str | None = None, entry: dict | None = None) -> list[ImageRef]:
        """``entry``: the prompt's history entry when the caller has it already."""
        if entry is not None:
            return image_refs(entry, node_id)
        return self._call("outputs", prompt_id, node_id)

    def download(self, image_ref) -> bytes:
        return self._call("download", image_ref)

    def queue_ids(self) -> set[str]:
        return self._call("queue_ids")

    def libraries(self) -> dict[str, dict] | None:
        return self._call("libraries")

    def library_categories(self, library: str) -> list[str]:
        return self._call("library_categories", library)

    def interrupt(self) -> None:
        self._call("interrupt")

    def websocket(self) -> "WebSocket":
        """A websocket on ``/ws`` for this client's id (see :meth:`AsyncComfyClient.websocket`)."""
        async def connect():
            session = aiohttp.ClientSession()
            try:
                client = AsyncComfyClient(self.base_url, session, timeout=self.timeout, client_id=self.client_id)
                return session, await client.websocket()
            except BaseException:
                await session.close()
                raise
        return WebSocket(*_run(connect()))


class WebSocket:
    """A synchronous view of an aiohttp websocket: ``recv()`` the next message, ``close()``."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse):
        self._session, self._ws = session, ws

    def recv(self, timeout: float | None = None) -> str | bytes:
        """The next text (str) or binary (bytes) message; WebSocketClosed when the connection ends."""
        message = _run(self._ws.receive(timeout))
        if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            return message.data
        raise WebSocketClosed(f"websocket: the connection ended ({message.type.name})")

    def close(self) -> None:
        async def close():
            try:
                await self._ws.close()
            finally:
                await self._session.close()
        _run(close())
