"""A small client for ComfyUI's HTTP API (standard library only; host-free).

    client = ComfyClient("http://127.0.0.1:8188")
    ref = client.upload_image("product.png")             # -> {"name", "subfolder", "type"}
    pid = client.queue(api_prompt)                       # ProductSceneError with node_errors if rejected
    client.wait(pid, timeout=600)                        # ProductSceneError with the execution_error
    for image in client.outputs(pid):                    # ImageRef(filename, subfolder, type)
        png = client.download(image)

It is the base of the headless batch client (productscene/batch.py): every failure is a
ProductSceneError whose message says what the server said; failures worth retrying (the server is
unreachable or answered HTTP 5xx) are its subclass ServerError.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import NamedTuple

from .errors import ProductSceneError


class ServerError(ProductSceneError):
    """The server could not answer now (unreachable, or HTTP 5xx): the same request may succeed later."""


class ServerUnreachable(ServerError):
    """No connection to the server (not running, restarting, network down)."""


class ImageRef(NamedTuple):
    filename: str
    subfolder: str
    type: str  # "output" | "temp" | "input"


def _format_node_errors(node_errors: dict) -> str:
    lines = []
    for node_id, info in (node_errors or {}).items():
        cls = info.get("class_type", "?")
        for err in info.get("errors", []):
            detail = err.get("details") or ""
            lines.append(f"node {node_id} ({cls}): {err.get('message', '')}"
                         + (f": {detail}" if detail else ""))
    return "\n".join(lines)


class ComfyClient:
    def __init__(self, base_url: str, *, timeout: float = 60.0, client_id: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, *, data: bytes | None = None, headers: dict | None = None,
                 raw: bool = False):
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                payload = json.loads(body)
            except ValueError:
                payload = body.decode("utf-8", "replace")
            raise _HTTPError(e.code, payload, f"{method} {path}") from None
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            raise ServerUnreachable(f"ComfyUI at {self.base_url} is not reachable ({method} {path}): {e}") from None
        if raw:
            return body
        try:
            return json.loads(body) if body else None
        except ValueError:
            raise ProductSceneError(f"ComfyUI answered {method} {path} with something that is not JSON: "
                                    f"{body[:200]!r}") from None

    def _get(self, path: str, **params):
        if params:
            path += "?" + urllib.parse.urlencode(params)
        try:
            return self._request("GET", path)
        except _HTTPError as e:
            kind = ServerError if e.code >= 500 else ProductSceneError
            raise kind(f"ComfyUI answered {e.where} with HTTP {e.code}: {e.payload}") from None

    def _post_json(self, path: str, payload):
        return self._request("POST", path, data=json.dumps(payload).encode(),
                             headers={"Content-Type": "application/json"})

    # ------------------------------------------------------------------ API
    def object_info(self, node_class: str | None = None) -> dict:
        """``GET /object_info`` (every node) or ``/object_info/{node_class}``."""
        return self._get("/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else ""))

    def extensions(self) -> list[str]:
        """``GET /extensions``: URLs of every frontend extension script the server serves."""
        return self._get("/extensions")

    def system_stats(self) -> dict:
        return self._get("/system_stats")

    def upload_image(self, path_or_bytes, name: str | None = None, *, subfolder: str = "",
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
        boundary = uuid.uuid4().hex
        fields = {"type": type, "subfolder": subfolder, "overwrite": "true" if overwrite else "false"}
        parts = []
        for key, value in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
        parts.append((f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                      "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        try:
            return self._request("POST", "/upload/image", data=b"".join(parts),
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        except _HTTPError as e:
            kind = ServerError if e.code >= 500 else ProductSceneError
            raise kind(f"ComfyUI refused the upload of {name!r} (HTTP {e.code}): {e.payload}") from None

    def queue(self, prompt: dict, client_id: str | None = None, *, strict: bool = True) -> str:
        """``POST /prompt`` with an API-format graph; returns the prompt id.

        A rejected prompt raises ProductSceneError with the server's node_errors. With ``strict``
        (default) a prompt that was queued although some of its outputs failed validation raises
        too (the valid outputs still run; the message names the prompt id)."""
        payload = {"prompt": prompt, "client_id": client_id or self.client_id}
        try:
            answer = self._post_json("/prompt", payload)
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
        prompt_id = answer.get("prompt_id")
        if not prompt_id:
            raise ProductSceneError(f"ComfyUI did not queue the prompt: {answer}")
        if strict and answer.get("node_errors"):
            raise ProductSceneError(f"ComfyUI queued prompt {prompt_id} but rejected some outputs:\n"
                                    + _format_node_errors(answer["node_errors"]))
        return prompt_id

    def history(self, prompt_id: str) -> dict | None:
        """The history entry of ``prompt_id`` or None while it is queued or running."""
        return (self._get(f"/history/{urllib.parse.quote(prompt_id)}") or {}).get(prompt_id)

    def history_all(self) -> dict:
        """Every history entry the server holds (``GET /history``): ``{prompt_id: entry}``."""
        return self._get("/history") or {}

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> dict:
        """Poll ``GET /history/{prompt_id}`` until the run ends; returns its history entry.
        Raises ProductSceneError with ComfyUI's execution_error when the run failed, and on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or (status and not status.get("completed", True)):
                    raise ProductSceneError(self._failure_message(prompt_id, status))
                if status.get("completed", True):
                    return entry
            if time.monotonic() > deadline:
                raise ProductSceneError(f"prompt {prompt_id}: ComfyUI did not finish within {timeout:.0f} s")
            time.sleep(poll)

    @staticmethod
    def execution_span(entry: dict) -> tuple[int, int] | None:
        """(start, end) of a finished run in the server's own clock (ms since the epoch), from the
        ``execution_start`` and ``execution_success``/``execution_error`` messages of its history entry."""
        stamps = {kind: data.get("timestamp") for kind, data in (entry.get("status") or {}).get("messages", [])}
        start = stamps.get("execution_start")
        end = stamps.get("execution_success") or stamps.get("execution_error") or stamps.get("execution_interrupted")
        return (int(start), int(end)) if start is not None and end is not None else None

    @staticmethod
    def _failure_message(prompt_id: str, status: dict) -> str:
        for kind, data in status.get("messages", []):
            if kind == "execution_error":
                return (f"prompt {prompt_id} failed in node {data.get('node_id')} ({data.get('node_type')}): "
                        f"{data.get('exception_type', 'Error')}: {data.get('exception_message', '').strip()}")
            if kind == "execution_interrupted":
                return f"prompt {prompt_id} was interrupted in node {data.get('node_id')} ({data.get('node_type')})"
        return f"prompt {prompt_id} failed: {status}"

    def outputs(self, prompt_id: str, node_id: str | None = None, entry: dict | None = None) -> list[ImageRef]:
        """Images the finished run produced (all output nodes in node id order, or one node);
        ``entry``: its history entry when the caller has it already."""
        entry = entry if entry is not None else self.history(prompt_id)
        if entry is None:
            raise ProductSceneError(f"prompt {prompt_id}: no history (still queued or running, or unknown id)")
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

    def download(self, image_ref) -> bytes:
        """The bytes of an image via ``GET /view`` (ImageRef, (filename, subfolder, type) or a dict)."""
        if isinstance(image_ref, dict):
            filename, subfolder, kind = image_ref["filename"], image_ref.get("subfolder", ""), image_ref.get("type", "output")
        else:
            filename, subfolder, kind = image_ref
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": kind})
        try:
            return self._request("GET", f"/view?{query}", raw=True)
        except _HTTPError as e:
            error = ServerError if e.code >= 500 else ProductSceneError
            raise error(f"ComfyUI has no {kind} image {subfolder + '/' if subfolder else ''}{filename} "
                                    f"(HTTP {e.code})") from None

    def queue_ids(self) -> set[str]:
        """Ids of the prompts the server is running or has pending (``GET /queue``)."""
        state = self._get("/queue") or {}
        return {str(item[1]) for key in ("queue_running", "queue_pending") for item in state.get(key, [])
                if isinstance(item, list) and len(item) > 1}

    def libraries(self) -> dict[str, dict] | None:
        """``{library file: {"family", "count"}}`` from the pack's ``GET /productscene/libraries``;
        None when the server does not have that route (ProductScene not installed)."""
        try:
            return self._request("GET", "/productscene/libraries") or {}
        except _HTTPError as e:
            if e.code == 404:
                return None
            raise ServerError(f"ComfyUI answered GET /productscene/libraries with HTTP {e.code}") from None

    def library_categories(self, library: str) -> list[str]:
        """One library's category names (``GET /productscene/libraries/categories``)."""
        return list(self._get("/productscene/libraries/categories", library=library).get("categories", []))

    def websocket(self, poll: float = 0.5):
        """A websocket on ``/ws`` for this client's id: the server sends it the messages
        (``executing``, ``progress``, ``execution_error`` ...) of the prompts this client queued."""
        from .websocket import WebSocket
        scheme, _, rest = self.base_url.partition("://")
        url = ("wss" if scheme == "https" else "ws") + "://" + rest + "/ws?" + urllib.parse.urlencode(
            {"clientId": self.client_id})
        return WebSocket(url, timeout=self.timeout, poll=poll)

    def interrupt(self) -> None:
        self._request("POST", "/interrupt", data=b"")


class _HTTPError(ProductSceneError):
    def __init__(self, code: int, payload, where: str):
        super().__init__(f"{where}: HTTP {code}")
        self.code, self.payload, self.where = code, payload, where
