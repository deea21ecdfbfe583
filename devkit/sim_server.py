"""Simulated ComfyUI servers for the batch client's tests and benchmarks: aiohttp apps that speak the
part of ComfyUI's API the client uses, without models.

    farm = SimFarm()                                   # an event loop in a daemon thread
    server = farm.add(workflow=..., exec_time=0.005)   # listening on 127.0.0.1, a free port
    server.url; server.kill(); server.restart(); farm.close()

Routes, with ComfyUI's shapes: ``GET /object_info`` (made from a workflow's nodes by
:func:`object_info_for`), ``POST /upload/image``, ``POST /prompt``, ``GET /history[/{id}]``,
``GET /view``, ``GET /queue``, ``POST /interrupt``, ``GET /ws`` (``status``, ``execution_start``,
``execution_cached``, ``executing``, ``progress``, ``executed``, ``execution_success`` /
``execution_error``, sent to the client that queued the prompt), and ProductScene's
``GET /productscene/libraries[/categories]``.

Each server runs one prompt at a time, ``exec_time`` seconds (+- ``jitter``, uniform), and fails a
prompt with probability ``failure_rate`` (an ``execution_error``). Its output image is the image of
the first LoadImage upstream of each SaveImage, made opaque: pixels with alpha 255 are the product's
own, the rest a flat background, so the product's pixels come back bit for bit, as from the
shipped workflow's exact composite (``damage``: that many product pixels changed). A server killed
(``kill``, or ``script``: ``[(seconds after start, "die" | "restart"), ...]``) stops listening and
drops every connection, its queue and history; restarted (after half a second down, as a process
takes a while to start), it listens on the same port with an empty queue and history (its uploads,
"on disk", remain).

``python -m devkit.sim_server --config servers.json --urls urls.txt`` runs a farm in its own
process (benchmarks): the config is a list of :meth:`SimFarm.add` keyword dicts; the URLs are
written, one a line, once every server listens; SIGTERM ends it.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path

from aiohttp import WSMsgType, web
from PIL import Image

from productscene import graph

MAXIMUM_HISTORY_SIZE = 10000     # as ComfyUI: older history entries (and their outputs) are dropped
LIBRARY = "default-categories.safetensors"
CATEGORIES = ("perfume", "tea", "tools", "cosmetics")
BACKGROUND = (90, 140, 200)
_COMBO_INPUTS = ("ckpt_name", "library", "sampler_name", "scheduler", "source")


def object_info_for(*workflows: dict) -> dict:
    """An ``/object_info`` for the node types of these API workflows: each widget input typed by its
    value (whole numbers from 0, names of files and choices as one-option combos)."""
    info = {}
    for workflow in workflows:
        for node in workflow.values():
            entry = info.setdefault(node["class_type"], {
                "input": {"required": {}, "optional": {}}, "output": [], "name": node["class_type"],
                "display_name": node["class_type"], "output_node": node["class_type"] == "SaveImage"})
            required = entry["input"]["required"]
            for name, value in node.get("inputs", {}).items():
                if graph.is_link(value) or name in required:
                    continue
                if isinstance(value, bool):
                    required[name] = ["BOOLEAN", {"default": value}]
                elif isinstance(value, int):
                    required[name] = ["INT", {"default": value, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}]
                elif isinstance(value, float):
                    required[name] = ["FLOAT", {"default": value, "min": -100.0, "max": 100.0}]
                elif name in _COMBO_INPUTS:
                    required[name] = [[value], {}]
                else:
                    required[name] = ["STRING", {"default": value}]
    return info


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _flatten(data: bytes, damage: int = 0) -> bytes:
    """The uploaded image, opaque: alpha-255 pixels as they are (but the first ``damage`` of them,
    inverted), everything else BACKGROUND."""
    image = Image.open(io.BytesIO(data))
    if "A" not in image.getbands():
        return _png(image.convert("RGB"))
    rgba = image.convert("RGBA")
    out = Image.new("RGB", rgba.size, BACKGROUND)
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A").point(lambda v: 255 if v == 255 else 0))
    if damage:
        alpha = rgba.getchannel("A")
        spots = [(x, y) for y in range(rgba.height) for x in range(rgba.width) if alpha.getpixel((x, y)) == 255]
        for x, y in spots[:damage]:
            out.putpixel((x, y), tuple(255 - c for c in out.getpixel((x, y))))
    return _png(out)


_BLANK = _png(Image.new("RGB", (8, 8), BACKGROUND))


class SimServer:
    """One simulated server; made and driven by a :class:`SimFarm` (methods callable from any thread)."""

    def __init__(self, farm: "SimFarm", *, workflow: dict | None = None, exec_time: float = 0.005,
                 jitter: float = 0.0, failure_rate: float = 0.0, seed: int = 0, host: str = "127.0.0.1",
                 port: int | None = None, script=(), categories=CATEGORIES, validate=None, progress_steps: int = 2,
                 damage: int = 0):
        self.farm = farm
        default = json.loads((Path(__file__).resolve().parents[1] / "workflows" / "api" /
                              "category_background.json").read_text())
        self.object_info = object_info_for(default, *([workflow] if workflow else []))
        self.exec_time, self.jitter, self.failure_rate = exec_time, jitter, failure_rate
        self.random = random.Random(seed)
        self.host, self.port = host, port or 0      # 0: a free port, kept over restarts
        self.script = list(script)
        self.categories = list(categories)
        self.validate = validate               # prompt -> node_errors dict (empty: valid)
        self.progress_steps = progress_steps
        self.damage = damage                   # product pixels each output changes (a careless workflow)
        self.ws_hosts: list[str] = []          # the Host header of every websocket request
        self.base_dir = Path(tempfile.mkdtemp(prefix="productscene-sim-"))
        self.uploads: dict[str, bytes] = {}    # "subfolder/name" -> bytes (kept over restarts, like a disk)
        self._flat: dict[str, bytes] = {}
        self.executed = 0                      # prompts run to the end, over restarts
        self.close_codes: list[int] = []       # of every websocket the client ended with a Close frame
        self.runner = None
        self.running = False
        self._fresh_state()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _fresh_state(self) -> None:
        self.queue: asyncio.Queue | None = None
        self.pending: list[str] = []           # prompt ids, in order
        self.current: str | None = None
        self.prompts: dict[str, list] = {}     # id -> [number, id, prompt, extra, outputs]
        self.history: dict[str, dict] = {}
        self.outputs: dict[tuple[str, str], bytes] = {}
        self.sockets: dict[str, set] = {}      # client id -> websockets
        self.transports: set = set()
        self.counter = 0
        self.number = 0
        self.interrupted = False

    # ------------------------------------------------------------------ life
    async def _start(self) -> None:
        self._fresh_state()
        self.queue = asyncio.Queue()
        app = web.Application(client_max_size=256 * 1024 * 1024, middlewares=[self._track])
        app.add_routes([
            web.get("/object_info", self._object_info), web.get("/object_info/{node}", self._object_info),
            web.post("/upload/image", self._upload), web.post("/prompt", self._prompt),
            web.get("/history", self._history), web.get("/history/{prompt_id}", self._history),
            web.get("/view", self._view), web.get("/queue", self._queue), web.post("/interrupt", self._interrupt),
            web.get("/system_stats", self._system_stats), web.get("/ws", self._ws),
            web.get("/productscene/libraries", self._libraries),
            web.get("/productscene/libraries/categories", self._library_categories)])
        self.runner = web.AppRunner(app, shutdown_timeout=0.5, handle_signals=False, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.worker = asyncio.ensure_future(self._execute())
        self.running = True

    async def _kill(self) -> None:
        if not self.running:
            return
        self.running = False
        self.worker.cancel()
        for transport in list(self.transports):   # as a killed process: connections reset, no goodbye
            transport.abort()
        await self.runner.cleanup()

    def kill(self) -> None:
        self.farm.call(self._kill())

    def restart(self, down_for: float = 0.5) -> None:
        """Kill, stay down ``down_for`` seconds (a process takes a while to start), listen again."""
        self.farm.call(self._kill())
        time.sleep(down_for)
        self.farm.call(self._start())

    @web.middleware
    async def _track(self, request, handler):
        transport = request.transport
        if transport is not None:
            self.transports.add(transport)
        try:
            return await handler(request)
        finally:
            self.transports.discard(transport)

    # ------------------------------------------------------------------ routes
    async def _object_info(self, request):
        node = request.match_info.get("node")
        if node is not None:
            return web.json_response({node: self.object_info[node]} if node in self.object_info else {})
        return web.json_response(self.object_info)

    async def _system_stats(self, request):
        return web.json_response({"system": {"comfyui_version": "simulated"}, "devices": []})

    async def _libraries(self, request):
        return web.json_response({LIBRARY: {"family": "sd15", "count": len(self.categories)}})

    async def _library_categories(self, request):
        if request.query.get("library") != LIBRARY:
            return web.json_response({"error": "no such library"}, status=404)
        return web.json_response({"categories": self.categories})

    async def _upload(self, request):
        form = await request.post()
        image = form.get("image")
        if image is None or not hasattr(image, "file"):
            return web.Response(status=400)
        subfolder = str(form.get("subfolder", ""))
        name = f"{subfolder}/{image.filename}" if subfolder else image.filename
        data = image.file.read()
        if name not in self.uploads:
            self.uploads[name] = data
            path = self.base_dir / "input" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return web.json_response({"name": image.filename, "subfolder": subfolder, "type": "input"})

    async def _prompt(self, request):
        body = await request.json()
        prompt = body.get("prompt") or {}
        unknown = sorted({n.get("class_type") for n in prompt.values()} - set(self.object_info))
        if unknown:
            return web.json_response({"error": {"type": "invalid_prompt", "message": f"Cannot execute because "
                                     f"node {unknown[0]} does not exist.", "details": "", "extra_info": {}},
                                      "node_errors": {}}, status=400)
        node_errors = self.validate(prompt) if self.validate else {}
        if node_errors:
            return web.json_response({"error": {"type": "prompt_outputs_failed_validation", "message":
                                     "Prompt outputs failed validation", "details": "", "extra_info": {}},
                                      "node_errors": node_errors}, status=400)
        prompt_id = str(uuid.uuid4())
        outputs = [k for k, n in prompt.items() if n.get("class_type") == "SaveImage"]
        self.number += 1
        self.prompts[prompt_id] = [self.number, prompt_id, prompt, {"client_id": body.get("client_id")}, outputs]
        self.pending.append(prompt_id)
        self.queue.put_nowait(prompt_id)
        return web.json_response({"prompt_id": prompt_id, "number": self.number, "node_errors": {}})

    async def _history(self, request):
        prompt_id = request.match_info.get("prompt_id")
        if prompt_id is None:
            return web.json_response(self.history)
        entry = self.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry else {})

    async def _view(self, request):
        q = request.query
        data = self.outputs.get((q.get("subfolder", ""), q.get("filename", "")))
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="image/png")

    async def _queue(self, request):
        running = [self.prompts[self.current]] if self.current else []
        return web.json_response({"queue_running": running,
                                  "queue_pending": [self.prompts[p] for p in self.pending]})

    async def _interrupt(self, request):
        self.interrupted = True
        return web.Response()

    async def _ws(self, request):
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        self.ws_hosts.append(request.headers.get("Host", ""))
        self.sockets.setdefault(sid, set()).add(ws)
        await ws.send_json({"type": "status", "data": {"status": {"exec_info": {
            "queue_remaining": len(self.pending) + bool(self.current)}}, "sid": sid}})
        try:
            async for message in ws:
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            self.sockets.get(sid, set()).discard(ws)
        if ws.close_code is not None and ws.exception() is None and self.running:
            self.close_codes.append(int(ws.close_code))
        return ws

    # ------------------------------------------------------------------ execution
    async def _send(self, sid, kind: str, data: dict) -> None:
        for ws in list(self.sockets.get(sid, ())):
            try:
                await ws.send_json({"type": kind, "data": data})
            except (ConnectionError, RuntimeError):
                pass

    def _image_for(self, prompt: dict, save_id: str) -> bytes:
        """The opaque image of the first LoadImage upstream of node ``save_id``."""
        seen, stack = set(), [save_id]
        while stack:
            node_id = stack.pop(0)
            if node_id in seen or node_id not in prompt:
                continue
            seen.add(node_id)
            node = prompt[node_id]
            if node.get("class_type") == "LoadImage":
                name = node["inputs"].get("image")
                if name in self.uploads:
                    if name not in self._flat:
                        self._flat[name] = _flatten(self.uploads[name], self.damage)
                    return self._flat[name]
            stack.extend(str(v[0]) for v in node.get("inputs", {}).values() if graph.is_link(v))
        return _BLANK

    async def _execute(self) -> None:
        while True:
            prompt_id = await self.queue.get()
            self.pending.remove(prompt_id)
            self.current = prompt_id
            self.interrupted = False
            number, _, prompt, extra, outputs = self.prompts[prompt_id]
            sid = extra.get("client_id")
            messages = []

            async def say(kind, data):
                data = {**data, "prompt_id": prompt_id}
                if kind in ("execution_start", "execution_cached", "execution_success", "execution_error"):
                    data["timestamp"] = int(time.time() * 1000)
                    messages.append([kind, data])
                await self._send(sid, kind, data)

            await say("execution_start", {})
            await say("execution_cached", {"nodes": []})
            seconds = max(0.0, self.exec_time + self.random.uniform(-self.jitter, self.jitter))
            fails = self.random.random() < self.failure_rate
            steps = max(1, self.progress_steps)
            sampler = next((k for k, n in prompt.items() if n.get("class_type") == "KSampler"), None)
            await say("executing", {"node": sampler, "display_node": sampler})
            for step in range(1, steps + 1):
                await asyncio.sleep(seconds / steps)
                await say("progress", {"value": step, "max": steps, "node": sampler})
            entry_outputs = {}
            if fails or self.interrupted:
                await say("execution_error", {"node_id": sampler, "node_type": "KSampler", "executed": [],
                                              "exception_message": "simulated failure",
                                              "exception_type": "RuntimeError", "traceback": [],
                                              "current_inputs": {}, "current_outputs": {}})
                status = {"status_str": "error", "completed": False, "messages": messages}
            else:
                for save_id in outputs:
                    prefix = str(prompt[save_id]["inputs"].get("filename_prefix", "ComfyUI"))
                    subfolder, _, stem = prefix.rpartition("/")
                    self.counter += 1
                    filename = f"{stem}_{self.counter:05d}_.png"
                    self.outputs[(subfolder, filename)] = self._image_for(prompt, save_id)
                    images = [{"filename": filename, "subfolder": subfolder, "type": "output"}]
                    entry_outputs[save_id] = {"images": images}
                    await say("executed", {"node": save_id, "display_node": save_id, "output": {"images": images}})
                await say("execution_success", {})
                status = {"status_str": "success", "completed": True, "messages": messages}
            # as ComfyUI: the history entry is stored, then "executing" with no node says the prompt ended
            self.history[prompt_id] = {"prompt": self.prompts.pop(prompt_id), "outputs": entry_outputs,
                                       "status": status, "meta": {}}
            while len(self.history) > MAXIMUM_HISTORY_SIZE:
                old = self.history.pop(next(iter(self.history)))
                for out in old["outputs"].values():
                    for image in out["images"]:
                        self.outputs.pop((image["subfolder"], image["filename"]), None)
            self.current = None
            self.executed += 1
            if not (fails or self.interrupted):
                await say("executing", {"node": None})


class SimFarm:
    """Simulated servers on one event loop in a daemon thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sim-farm", daemon=True)
        self.thread.start()
        self.servers: list[SimServer] = []
        self.started = time.monotonic()

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add(self, **kwargs) -> SimServer:
        server = SimServer(self, **kwargs)
        self.call(server._start())
        self.servers.append(server)
        for at, action in server.script:
            self.loop.call_soon_threadsafe(self.loop.call_later, max(0.0, at), self._act, server, action)
        return server

    def _act(self, server: SimServer, action: str) -> None:
        if action == "die":
            asyncio.ensure_future(server._kill())
        elif action == "restart":
            async def again():
                await server._kill()
                await asyncio.sleep(0.5)
                await server._start()
            asyncio.ensure_future(again())
        else:
            raise ValueError(f"script: unknown action {action!r} (die, restart)")

    def close(self) -> None:
        for server in self.servers:
            self.call(server._kill())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON list of SimFarm.add keyword dicts")
    parser.add_argument("--urls", required=True, help="file to write the servers' URLs to, one a line")
    parser.add_argument("--stats", help="file to write each server's executed prompt count to at the end")
    args = parser.parse_args()
    farm = SimFarm()
    servers = [farm.add(**kw) for kw in json.loads(Path(args.config).read_text())]
    tmp = Path(args.urls + ".tmp")
    tmp.write_text("".join(s.url + "\n" for s in servers))
    tmp.replace(args.urls)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    if args.stats:
        Path(args.stats).write_text(json.dumps({s.url: s.executed for s in servers}))
    farm.close()


if __name__ == "__main__":
    main()
