"""Running a checked job on one event loop: per server ``concurrency`` workers (so the server's queue
never runs dry while the client uploads, downloads and writes) and one websocket listener for
completion and sampling progress; the rows are bound one at a time as workers take them
(:meth:`Plan.jobs`), so a catalogue of any size takes the same memory.

A server that stops answering hands its rows back to the others, or, when it is the only one, is
waited for; a prompt a restarted server lost is queued again; a row is written once (the first
result wins), atomically, with its provenance record. Rows are finished (output decoded for the
fidelity figure, written, recorded) by one writer thread, a few at a time; the loop only decides who
writes and hears of each batch once."""
from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import io
import json
import os
import queue
import re
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Callable

import aiohttp
from PIL import Image

from .. import graph
from ..client import AsyncComfyClient, ServerError, ServerUnreachable, execution_span, image_refs, outcome
from ..errors import ProductSceneError
from ..files import TEMP_SUFFIX, write_bytes_atomic
from .fidelity import ProductPixels
from .plan import UPLOADED, Job, Plan
from .records import JOURNAL_NAME, PROVENANCE_FORMAT, PROVENANCE_NAME, PROVENANCE_VERSION, LineFile
from .report import Progress, Summary

UPLOAD_SUBFOLDER = "productscene_batch"   # under the server's input/: the uploaded images
OUTPUT_SUBFOLDER = "productscene_batch"   # under the server's output/: <client id[:8]>/<output stem>


class _HandedBack(Exception):
    """The row went back to the shared queue (its server stopped answering)."""


class _Task:
    def __init__(self, job: Job, adopt=None):
        self.job = job
        self.adopt = adopt            # (server url, prompt id) from an earlier run
        self.state = "pending"        # pending | running | writing | done | failed
        self.lost = 0                 # prompts a server lost (restart)
        self.attempts = 0             # prompts queued for this row


class _Server:
    def __init__(self, url: str, session: aiohttp.ClientSession, client_id: str):
        self.url = url
        self.client = AsyncComfyClient(url, session, client_id=client_id)
        self.probe_client = AsyncComfyClient(url, session, timeout=5)
        self.up = True
        self.dead = False
        self.down_since = 0.0
        self.ever_down = False
        self.rows = 0
        self.uploads: dict[str, str] = {}     # sha256 -> the name LoadImage takes
        self.events: dict[str, asyncio.Event] = {}
        self.progress: dict[str, float] = {}  # prompt id -> sampling fraction
        self.adopted: deque[_Task] = deque()  # prompts an earlier run queued here
        self.ended: OrderedDict[str, None] = OrderedDict()   # prompts whose end came before anyone waited
        self.heard: OrderedDict[str, dict] = OrderedDict()   # prompt id -> its messages and outputs on /ws
        self.ws = None

    def event(self, prompt_id: str) -> asyncio.Event:
        event = self.events.setdefault(prompt_id, asyncio.Event())
        if self.ended.pop(prompt_id, 0) is None:
            event.set()
        return event

    def end(self, prompt_id: str) -> None:
        """The websocket says the prompt ended."""
        if prompt_id in self.events:
            self.events[prompt_id].set()
        else:        # a fast prompt can end before its worker waits for it
            self.ended[prompt_id] = None
            while len(self.ended) > 4096:
                self.ended.popitem(last=False)

    def signal(self, prompt_id: str | None = None) -> None:
        for e in (self.events.values() if prompt_id is None else [self.events.get(prompt_id)]):
            if e is not None:
                e.set()

    def forget(self, prompt_id: str) -> None:
        self.events.pop(prompt_id, None)
        self.progress.pop(prompt_id, None)
        self.heard.pop(prompt_id, None)

    def hear(self, prompt_id: str) -> dict:
        heard = self.heard.get(prompt_id)
        if heard is None:
            heard = self.heard[prompt_id] = {"messages": [], "outputs": {}}
            while len(self.heard) > 4096:       # prompts nobody waits for (handed back, another run's)
                self.heard.popitem(last=False)
        return heard

    def heard_entry(self, prompt_id: str, output_node: str) -> dict | None:
        """The prompt's history entry as the websocket told it (ComfyUI sends the same messages, with
        the same timestamps, that it keeps in the history), or None when something was missed (a
        reconnect, outputs served from the cache): then the history is asked."""
        heard = self.heard.get(prompt_id)
        if heard is None:
            return None
        kinds = {kind for kind, _ in heard["messages"]}
        if kinds & {"execution_error", "execution_interrupted"}:
            return {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                              "messages": heard["messages"]}}
        if {"execution_start", "execution_success"} <= kinds and output_node in heard["outputs"]:
            return {"outputs": heard["outputs"], "status": {"status_str": "success", "completed": True,
                                                            "messages": heard["messages"]}}
        return None


@functools.lru_cache(maxsize=256)
def _product_pixels(path: Path, sha256: str) -> ProductPixels:
    """A product image, decoded once for the many rows that name it."""
    with Image.open(path) as image:
        return ProductPixels(image)


_TYPE = re.compile(r'\{\s*"type"\s*:\s*"(\w+)"')
_HEARD = {"progress", "execution_start", "execution_success", "execution_error", "execution_interrupted",
          "executed", "executing"}     # the websocket messages the run listens to


_second = (0, "")     # the last whole second formatted (one tuple: read whole from any thread)


def _now_iso() -> str:
    """UTC now, to the millisecond, as ``datetime.isoformat`` writes it (``...T12:00:00.123+00:00``);
    the seconds are formatted once a second (three stamps a row)."""
    global _second
    now = time.time()
    second, text = _second
    if second != int(now):
        second = int(now)
        text = datetime.datetime.fromtimestamp(second, datetime.timezone.utc).isoformat()[:-6]
        _second = (second, text)
    return f"{text}.{int((now - second) * 1000):03d}+00:00"


class _PromptJSON:
    """The workflow's ``POST /prompt`` graph as JSON with each bound value's place cut out, made once
    per set of bound keys: a row's graph is the pieces joined with its values' JSON (the same bytes
    as ``json.dumps(graph.bind(...))``, which costs more than the rest of queueing a row)."""

    def __init__(self, workflow: dict, targets: dict):
        self.workflow, self.targets = workflow, targets
        self.made: dict[tuple, tuple[list[bytes], tuple] | None] = {}

    def __call__(self, values: dict) -> bytes:
        keys = tuple(values)
        made = self.made.get(keys, 0)
        if made == 0:
            made = self.made[keys] = self._make(keys)
        if made is None:          # a mark that is not in the JSON exactly once: the slow, plain way
            return json.dumps(graph.bind(self.workflow, values, self.targets)).encode()
        pieces, order = made
        out = [pieces[0]]
        for key, piece in zip(order, pieces[1:]):
            out.append(json.dumps(values[key]).encode())
            out.append(piece)
        return b"".join(out)

    def _make(self, keys: tuple):
        marks = {key: f"\x00productscene-slot-{i}\x00" for i, key in enumerate(keys)}
        text = json.dumps(graph.bind(self.workflow, marks, self.targets))   # raises for a linked input
        where = {json.dumps(mark): key for key, mark in marks.items()}
        if any(text.count(m) != 1 for m in where):
            return None
        parts = re.split("(" + "|".join(re.escape(m) for m in where) + ")", text)
        return [p.encode() for p in parts[0::2]], tuple(where[m] for m in parts[1::2])


class _Writer:
    """One thread that finishes rows (:meth:`BatchRun._write`), in the order they came, a few at a
    time: it takes what is waiting after a short pause and tells the loop of the whole batch in one
    call (a thread hand-off per row cost more than the write). A row's image is renamed into place
    before its provenance line is written, so a killed client leaves whole rows."""

    PAUSE = 0.01   # seconds it lets rows gather after the first: latency the workers do not wait on
    BACKLOG = 64   # rows waiting beyond which the workers wait for the writer

    def __init__(self, run: "BatchRun", loop: asyncio.AbstractEventLoop):
        self.run, self.loop = run, loop
        self.rows: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._main, name="batch-writer", daemon=True)
        self.thread.start()

    def put(self, item) -> None:
        self.rows.put(item)

    def close(self) -> None:
        """After the loop stopped: rows still waiting are not written (they run again on --resume)."""
        self.rows.put(None)
        self.thread.join()

    def _main(self) -> None:
        while True:
            item = self.rows.get()
            if item is None:
                return
            time.sleep(self.PAUSE)
            batch = [item]
            while True:
                try:
                    batch.append(self.rows.get_nowait())
                except queue.Empty:
                    break
            done = []
            for item in batch:
                if item is None or self.run.stopping:
                    return
                server, task, images, record = item
                try:
                    self.run._write(task.job, images, record)
                    done.append((server, task, None))
                except Exception as e:   # disk full, folder gone: the row fails, the job goes on
                    done.append((server, task, e))
            try:
                self.loop.call_soon_threadsafe(self.run._written, done)
            except RuntimeError:      # the loop has closed: the job is over
                return


class BatchRun:
    """Runs a :class:`Plan` (see the module's docstring)."""

    def __init__(self, plan: Plan, progress: Callable[[Progress], None] | None = None,
                 log: Callable[[str], None] | None = None):
        self.plan = plan
        self.o = plan.options
        self.out = Path(self.o.out)
        self.report = progress
        self.log = log or (lambda msg: None)
        self.output_node = graph.target(plan.workflow, "output")[0]
        self.tag = plan.client_id[:8]
        self.done = 0
        self.failures: list[tuple[str, str, str]] = []
        self.discarded = 0
        self.stopping = False
        self.last_report = 0.0
        self.servers: list[_Server] = []
        self.targets: dict = {}          # graph.bind's targets, found once
        self.prompt_json = _PromptJSON(plan.workflow, self.targets)

    # -------------------------------------------------------------- shared state
    def _over(self) -> bool:
        return self.stopping or (self.exhausted and not self.retry and self.active == 0
                                 and not any(s.adopted for s in self.servers))

    def _changed(self) -> None:
        self.wake.set()
        self.wake = asyncio.Event()

    def _next(self, server: _Server) -> _Task | None:
        """The next row for ``server``: its adopted prompts, rows handed back, then new rows."""
        if server.adopted:
            return server.adopted.popleft()
        if self.retry:
            return self.retry.popleft()
        while not self.exhausted:
            job = next(self.jobs, None)
            if job is None:
                self.exhausted = True
                self._changed()
                return None
            task = _Task(job)
            if job.problem:
                self._fail(task, job.problem)
                continue
            earlier = self.plan.adopt.get(job.output)
            owner = next((s for s in self.servers if earlier and s.url == earlier[0] and s.up and not s.dead), None)
            if owner is None or owner is server:
                task.adopt = earlier if owner is server else None
                return task
            task.adopt = earlier
            owner.adopted.append(task)
            self._changed()
        return None

    async def _take(self, server: _Server) -> _Task | None:
        while not self._over():
            if not server.up or server.dead:
                return None
            task = self._next(server)
            if task is not None:
                self.active += 1
                task.state = "running"
                return task
            wake = self.wake
            try:
                await asyncio.wait_for(wake.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        return None

    def _hand_back(self, task: _Task) -> None:
        if task.state == "running":
            task.state = "pending"
            task.adopt = None
            self.retry.appendleft(task)
            self.active -= 1
            self._changed()

    def _fail(self, task: _Task, why: str) -> None:
        if task.state in ("done", "failed") or self.stopping:
            return
        if task.state in ("running", "writing"):
            self.active -= 1
        task.state = "failed"
        self.failures.append((task.job.row.where, task.job.output, why))
        self.journal.write({"event": "failed", "output": task.job.output, "why": why, "time": _now_iso()})
        self._changed()
        self.log(f"failed: {task.job.row.where} ({task.job.output}): {why}")
        self._progress(force=True, last=task.job.output)

    def _finish(self, server: _Server, task: _Task, images: list[bytes], record: dict) -> bool:
        """Hand the row to the writer, once: a second result is discarded. The worker goes on to its
        next row; :meth:`_written` hears when the row is on disk."""
        if self.stopping:
            return False
        if task.state != "running":
            self.discarded += 1
            return False
        task.state = "writing"   # from here no other server's result for this row is written
        self.writer.put((server, task, images, record))
        return True

    async def _writer_room(self) -> None:
        """While the writer has more than ``_Writer.BACKLOG`` rows waiting (a starved machine), the
        workers wait: what rows waiting to be written hold stays bounded."""
        while self.writer.rows.qsize() > _Writer.BACKLOG and not self.stopping:
            wake = self.wake
            try:
                await asyncio.wait_for(wake.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    def _written(self, batch: list) -> None:
        """On the loop: rows the writer finished (``error`` None) or could not write."""
        if self.stopping:
            return
        for server, task, error in batch:
            if error is not None:
                task.state = "running"
                self._fail(task, f"writing {task.job.output}: {type(error).__name__}: {error}")
                continue
            task.state = "done"
            self.active -= 1
            self.done += 1
            server.rows += 1
            self._progress(force=True, last=task.job.output)
        self._changed()

    def _write(self, job: Job, images: list[bytes], record: dict) -> None:
        """The output files (temporary name, then renamed) and then the provenance line. A killed
        client leaves whole files and lines either way; against a power cut everything written so
        far is made durable once a second (:meth:`_flush`), not file by file."""
        stem = Path(job.output).stem
        names = [job.output] + [f"{stem}-{i + 1}.png" for i in range(1, len(images))]
        files = []
        for name, data in zip(names, images):
            write_bytes_atomic(self.out / name, data, durable=False)
            files.append({"name": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
        record["files"] = files
        record["fidelity"] = self._fidelity(job, images[0])
        record["finished_at"] = _now_iso()
        self.provenance.write(record)

    @staticmethod
    def _flush(stop: threading.Event) -> None:
        """Once a second, what was written goes to disk (each image before the record naming it,
        written after it): a power cut loses at most the last second, whose rows run again."""
        while not stop.wait(1.0):
            os.sync()

    @staticmethod
    def _fidelity(job: Job, image: bytes) -> dict | None:
        """Product pixels that came back unchanged, for a product image with an alpha mask."""
        try:
            with Image.open(io.BytesIO(image)) as result:
                f = _product_pixels(job.row.product, job.sha256["product"]).compare(result)
        except (OSError, ValueError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
        if f is None:
            return None
        return {"product_pixels_unchanged": f.unchanged, "product_pixels": f.product,
                "background_changed": round(f.background_changed, 4)}

    def _progress(self, force: bool = False, last: str = "") -> None:
        now = time.monotonic()
        if self.report is None or (not force and now - self.last_report < 0.1):
            return
        self.last_report = now
        running = sum(sum(s.progress.values()) for s in self.servers)
        self.report(Progress(total=self.plan.todo, done=self.done, failed=len(self.failures),
                             running=running, servers_up=sum(s.up and not s.dead for s in self.servers),
                             servers=len(self.servers), last=last))

    # -------------------------------------------------------------- servers coming and going
    async def _wait_for_server(self, server: _Server, task: _Task | None) -> bool:
        """After a failed connection: True once the server answers again; False when ``task`` went
        to another server (or failed) or the server was given up."""
        if server.up:
            server.up, server.down_since, server.ever_down = False, time.monotonic(), True
            server.uploads.clear()        # a restarted server may have lost its input folder
            for t in server.adopted:      # prompts of an earlier run: queued anew elsewhere
                t.adopt = None
            self.retry.extend(server.adopted)
            server.adopted.clear()
            self._changed()
            self.log(f"server {server.url} stopped answering")
        delay = 0.2
        while not self._over():
            try:
                await server.probe_client.queue_ids()
                if not server.up and not server.dead:
                    server.up = True
                    self.log(f"server {server.url} answers again")
                    self._changed()
                return not server.dead
            except ProductSceneError:
                pass
            others = any(s.up and not s.dead for s in self.servers if s is not server)
            waited = time.monotonic() - server.down_since
            if task is not None and others and waited >= 2 * self.o.poll:
                self._hand_back(task)
                return False
            if waited > self.o.server_timeout and not server.dead:
                server.dead = True
                self.log(f"server {server.url} gave no answer for {self.o.server_timeout:.0f} s; giving it up")
                if all(s.dead for s in self.servers):
                    self._fail_all(f"no ComfyUI server answered for {self.o.server_timeout:.0f} s")
            if server.dead:
                if task is not None:
                    self._hand_back(task)
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        return False

    def _fail_all(self, why: str) -> None:
        """No server left: every row not yet done fails (the rest of the job with them)."""
        for task in list(self.retry) + [t for s in self.servers for t in s.adopted]:
            self._fail(task, why)
        self.retry.clear()
        for s in self.servers:
            s.adopted.clear()
        for job in self.jobs:
            self._fail(_Task(job), why)
        self.exhausted = True

    async def _call(self, server: _Server, task: _Task, fn):
        """``await fn()`` with the retries: an unreachable server is waited for (or the row handed
        to another), HTTP 5xx answers are retried with backoff up to ``retries`` times."""
        delay = 0.5
        tries = 0
        while True:
            if self.stopping:
                raise _HandedBack()
            try:
                return await fn()
            except ServerUnreachable:
                if not await self._wait_for_server(server, task):
                    raise _HandedBack() from None
            except ServerError:
                tries += 1
                if tries > self.o.retries:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    # -------------------------------------------------------------- one row
    async def _upload(self, server: _Server, role: str, job: Job) -> str:
        sha = job.sha256[role]
        name = server.uploads.get(sha)
        if name is None:
            path = getattr(job.row, role)
            up = await server.client.upload_image(path.read_bytes(), f"{sha[:24]}{path.suffix.lower()}",
                                                  subfolder=UPLOAD_SUBFOLDER, overwrite=False)
            name = f"{up['subfolder']}/{up['name']}" if up.get("subfolder") else up["name"]
            server.uploads[sha] = name
        return name

    async def _wait(self, server: _Server, task: _Task, prompt_id: str, deadline: float, fresh: bool):
        """("done", entry) | ("error", message) | ("lost", None). ``fresh``: just queued; while the
        websocket is connected it says when the prompt ended, so the history is asked only then (or
        after ``poll`` seconds of silence)."""
        event = server.event(prompt_id)
        client = server.client
        if fresh and server.ws is not None:
            await self._sleep_on(event)
        while True:
            entry = server.heard_entry(prompt_id, self.output_node)
            if entry is None:
                entry = await self._call(server, task, lambda: client.history(prompt_id))
            if entry is None and prompt_id not in await self._call(server, task, client.queue_ids):
                entry = await self._call(server, task, lambda: client.history(prompt_id))
                if entry is None:
                    return "lost", None
            state = outcome(prompt_id, entry)
            if state.state == "error":
                return "error", state.message
            if state.state == "done":
                return "done", entry
            if time.monotonic() > deadline:
                return "error", (f"prompt {prompt_id} did not finish within {self.o.row_timeout:.0f} s "
                                 f"(--row-timeout)")
            await self._sleep_on(event)

    async def _sleep_on(self, event: asyncio.Event) -> None:
        """Until ``event`` is set or ``poll`` seconds pass; the event is cleared after."""
        if not event.is_set():
            try:
                await asyncio.wait_for(event.wait(), self.o.poll)
            except asyncio.TimeoutError:
                pass
        event.clear()

    async def _process(self, server: _Server, task: _Task) -> None:
        job, o = task.job, self.o
        t_row = time.monotonic()
        timings = {"started_at": _now_iso()}
        prompt_id, fresh = None, False
        if task.adopt is not None and task.adopt[0] == server.url:
            prompt_id = task.adopt[1]
            task.adopt = None
            timings["collected_from_earlier_run"] = True
        while True:
            if prompt_id is None:
                if task.lost > o.retries:
                    self._fail(task, f"the server lost or failed this row's prompt {task.lost} times")
                    return
                t0 = time.monotonic()
                values = dict(job.values)
                for role in UPLOADED:
                    if role in job.sha256:
                        values[role] = await self._call(server, task, lambda r=role: self._upload(server, r, job))
                values["output"] = f"{OUTPUT_SUBFOLDER}/{self.tag}/{Path(job.output).stem}"
                prompt = self.prompt_json(values)
                timings["upload_s"] = round(time.monotonic() - t0, 4)
                prompt_id = await self._call(server, task, lambda: server.client.queue(prompt))
                fresh = True
                task.attempts += 1
                timings["queued_at"] = _now_iso()
                self.journal.write({"event": "queued", "output": job.output, "fingerprint": job.fingerprint,
                                    "server": server.url, "prompt_id": prompt_id, "time": timings["queued_at"]})
            t_queued = time.monotonic()
            try:
                state, result = await self._wait(server, task, prompt_id, t_queued + o.row_timeout,
                                                 fresh)
            finally:
                server.forget(prompt_id)
            if state == "lost":
                server.uploads.clear()        # restarted: its input folder may be new as well
                task.lost += 1
                self.log(f"{job.row.where}: prompt {prompt_id} was lost by {server.url} (restarted?); "
                         f"queueing it again")
                prompt_id = None
                continue
            if state == "error":
                self._fail(task, result)
                return
            break
        entry = result
        timings["wait_s"] = round(time.monotonic() - t_queued, 4)
        span = execution_span(entry)
        if span:
            timings["server_start_ms"], timings["server_end_ms"] = span
            timings["execution_s"] = round((span[1] - span[0]) / 1000, 3)
        t0 = time.monotonic()
        refs = image_refs(entry, self.output_node)
        if not refs:
            self._fail(task, f"prompt {prompt_id}: the node titled {graph.ROLES['output'].title!r} "
                             f"(node {self.output_node}) produced no image")
            return
        images = [await self._call(server, task, lambda r=r: server.client.download(r)) for r in refs]
        timings["download_s"] = round(time.monotonic() - t0, 4)
        timings["total_s"] = round(time.monotonic() - t_row, 4)
        inputs = {role: {"path": str(getattr(job.row, role)), "sha256": sha} for role, sha in job.sha256.items()}
        record = {
            "format": PROVENANCE_FORMAT, "format_version": PROVENANCE_VERSION,
            "output": job.output, "line": job.row.line, "where": job.row.where,
            "product": inputs.get("product"), "reference": inputs.get("reference"),
            "category": job.values.get("category"), "seed": self._bound_seed(job),
            "values": {k: v for k, v in job.values.items() if k not in ("category", "seed")},
            "workflow": {"path": str(o.workflow), "sha256": self.plan.workflow_sha256,
                         "bound_sha256": self.plan.binder.bound_sha256},
            "fingerprint": job.fingerprint, "server": server.url, "prompt_id": prompt_id,
            "attempts": task.attempts, "timings": timings,
        }
        if self._finish(server, task, images, record):
            await self._writer_room()

    def _bound_seed(self, job: Job):
        if "seed" in job.values:
            return job.values["seed"]
        try:
            node_id, name = graph.target(self.plan.workflow, "seed")
            return self.plan.workflow[node_id]["inputs"][name]
        except ProductSceneError:
            return None

    # -------------------------------------------------------------- tasks
    async def _worker(self, server: _Server) -> None:
        while not self._over() and not server.dead:
            if not server.up:
                if not await self._wait_for_server(server, None):
                    continue
            task = await self._take(server)
            if task is None:
                continue
            try:
                await self._process(server, task)
            except _HandedBack:
                pass
            except ProductSceneError as e:   # rejected prompt, failed upload, retries used up
                self._fail(task, str(e))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug must not hang the job: the row fails with it
                self._fail(task, f"internal error: {type(e).__name__}: {e}")

    async def _listen(self, server: _Server) -> None:
        delay = 0.2
        while not self._over() and not server.dead:
            try:
                ws = await server.client.websocket()
            except ProductSceneError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.2
            server.ws = ws
            server.signal()        # (re)connected: every prompt in flight checks its state now
            try:
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        self._on_message(server, message.data)
                    elif message.type == aiohttp.WSMsgType.ERROR:
                        break
            finally:
                await ws.close()
                server.ws = None
                server.signal()

    def _on_message(self, server: _Server, text: str) -> None:
        kind = _TYPE.match(text)
        if kind and (kind[1] not in _HEARD or (kind[1] == "progress" and self.report is None)):
            return      # most of ComfyUI's messages: not parsed at all
        try:
            message = json.loads(text)
            kind, data = message.get("type"), message.get("data") or {}
        except (ValueError, AttributeError):
            return
        prompt_id = data.get("prompt_id")
        if not prompt_id:
            return
        if kind == "progress" and data.get("max") and prompt_id in server.events:
            server.progress[prompt_id] = min(1.0, float(data.get("value", 0)) / float(data["max"]))
            self._progress()
        elif kind in ("execution_start", "execution_success", "execution_error", "execution_interrupted"):
            server.hear(prompt_id)["messages"].append([kind, data])
            if kind in ("execution_error", "execution_interrupted"):
                server.end(prompt_id)
        elif kind == "executed" and data.get("node") is not None:
            server.hear(prompt_id)["outputs"][str(data["node"])] = data.get("output") or {}
        elif kind == "executing" and data.get("node") is None:
            server.end(prompt_id)

    async def _main(self) -> None:
        self.wake = asyncio.Event()
        self.jobs = self.plan.jobs()
        self.retry: deque[_Task] = deque()
        self.exhausted = False
        self.active = 0           # rows taken and neither done nor failed nor handed back
        self.writer = _Writer(self, asyncio.get_running_loop())
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=self.o.concurrency + 4)
        async with aiohttp.ClientSession(connector=connector) as session:
            self.servers = [_Server(url, session, self.plan.client_id) for url in self.o.servers]
            listeners = [asyncio.ensure_future(self._listen(s)) for s in self.servers]
            workers = [asyncio.ensure_future(self._worker(s)) for s in self.servers for _ in range(self.o.concurrency)]
            self._progress(force=True)
            try:
                await asyncio.gather(*workers)
                for task in list(self.retry) + [t for s in self.servers for t in s.adopted]:
                    self._fail(task, "no ComfyUI server left to run it")   # every worker gave up
            finally:
                self.stopping = True      # no result is written after this; unfinished rows stay for --resume
                for s in self.servers:
                    if s.ws is not None:
                        await s.ws.close()   # a Close frame: the server forgets this client at once
                for t in workers + listeners:
                    t.cancel()
                await asyncio.gather(*workers, *listeners, return_exceptions=True)
                for s in self.servers:
                    s.client.close()
                    s.probe_client.close()

    def run(self) -> Summary:
        t0 = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        with os.scandir(self.out) as entries:         # temporary files a killed run left behind
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX):
                    os.unlink(entry.path)
        fresh = self.o.overwrite and not self.o.resume
        self.provenance = LineFile(self.out / PROVENANCE_NAME, truncate=fresh)
        self.journal = LineFile(self.out / JOURNAL_NAME, truncate=fresh)
        self.journal.write({"event": "start", "client_id": self.plan.client_id, "time": _now_iso(),
                            "rows": self.plan.todo, "servers": self.o.servers})
        interrupted = False
        stop = threading.Event()
        flusher = threading.Thread(target=self._flush, args=(stop,), name="batch-flush", daemon=True)
        flusher.start()
        self.writer = None
        try:
            asyncio.run(self._main())
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self.stopping = True
            if self.writer is not None:
                self.writer.close()       # before the provenance closes: a row being written ends whole
            self.provenance.close()
            self.journal.close()
            stop.set()
            flusher.join()
            os.sync()
        return Summary(rows=self.plan.total, skipped=self.plan.total - self.plan.todo, done=self.done,
                       failed=list(self.failures), seconds=time.monotonic() - t0, interrupted=interrupted,
                       servers={s.url: {"rows": s.rows, "down": s.ever_down or s.dead} for s in self.servers},
                       discarded=self.discarded, notes=list(self.plan.notes))
