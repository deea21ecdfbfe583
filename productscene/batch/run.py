"""Running a checked job: worker threads per server (``concurrency`` prompts in flight each, so
the server's queue never runs dry while the client uploads, downloads and writes), one websocket
listener per server for completion and sampling progress, one shared queue of rows.

A server that stops answering hands its rows back to the others, or, when it is the only one, is
waited for; a prompt a restarted server lost is queued again; a row is written once (the first
result wins), atomically, with its provenance record."""
from __future__ import annotations

import datetime
import hashlib
import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from .. import graph
from ..client import ComfyClient, ServerError, ServerUnreachable
from ..errors import ProductSceneError
from ..files import TEMP_SUFFIX, temp_prefix, write_bytes_atomic
from ..websocket import WebSocketClosed
from .plan import UPLOADED, Plan, Row
from .report import Progress, Summary
from .records import JOURNAL_NAME, PROVENANCE_FORMAT, PROVENANCE_NAME, PROVENANCE_VERSION, LineFile

UPLOAD_SUBFOLDER = "productscene_batch"


class _HandedBack(Exception):
    """The row went back to the shared queue (its server stopped answering)."""


class _Task:
    def __init__(self, row: Row, adopt=None):
        self.row = row
        self.adopt = adopt            # (server url, prompt id) from an earlier run
        self.state = "pending"        # pending | running | done | failed
        self.lost = 0                 # prompts a server lost (restart)
        self.attempts = 0             # prompts queued for this row
        self.inputs = {}              # role -> {"path", "sha256"} as uploaded


class _Server:
    def __init__(self, url: str, client_id: str):
        self.url = url
        self.client = ComfyClient(url, client_id=client_id)
        self.probe_client = ComfyClient(url, timeout=5)
        self.up = True
        self.dead = False
        self.down_since = 0.0
        self.ever_down = False
        self.rows = 0
        self.uploads: dict[str, str] = {}     # sha256 -> the name LoadImage takes
        self.events: dict[str, threading.Event] = {}
        self.progress: dict[str, float] = {}  # prompt id -> sampling fraction
        self.lock = threading.Lock()
        self.ws = None

    def event(self, prompt_id: str) -> threading.Event:
        with self.lock:
            return self.events.setdefault(prompt_id, threading.Event())

    def signal(self, prompt_id: str | None = None) -> None:
        with self.lock:
            events = list(self.events.values()) if prompt_id is None else [self.events.get(prompt_id)]
        for e in events:
            if e is not None:
                e.set()

    def forget(self, prompt_id: str) -> None:
        with self.lock:
            self.events.pop(prompt_id, None)
            self.progress.pop(prompt_id, None)


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class BatchRun:
    """Runs a :class:`Plan`: worker threads per server (``concurrency`` each), one websocket
    listener per server, one shared queue of rows."""

    def __init__(self, plan: Plan, progress: Callable[[Progress], None] | None = None,
                 log: Callable[[str], None] | None = None):
        self.plan = plan
        o = self.o = plan.options
        self.out = Path(o.out)
        self.report = progress or (lambda p: None)
        self.log = log or (lambda msg: None)
        self.servers = [_Server(url, plan.client_id) for url in o.servers]
        self.tasks = [_Task(r, plan.adopt.get(r.output)) for r in plan.todo]
        self.queue = deque(t for t in self.tasks if t.adopt is None)
        self.adopted = {s.url: deque(t for t in self.tasks if t.adopt and t.adopt[0] == s.url) for s in self.servers}
        self.cond = threading.Condition()
        self.remaining = len(self.tasks)
        self.done = 0
        self.failures: list[tuple[str, str, str]] = []
        self.discarded = 0
        self.stopping = False
        self.last_report = 0.0
        self.output_node = graph.target(plan.workflow, "output")[0]
        self.tag = plan.client_id[:8]

    # -------------------------------------------------------------- shared state
    def _over(self) -> bool:
        return self.remaining == 0 or self.stopping

    def _take(self, server: _Server) -> _Task | None:
        with self.cond:
            while not self._over():
                if not server.up or server.dead:
                    return None
                source = self.adopted[server.url] or self.queue
                if source:
                    task = source.popleft()
                    task.state = "running"
                    return task
                self.cond.wait(0.5)
            return None

    def _hand_back(self, task: _Task) -> None:
        with self.cond:
            if task.state == "running":
                task.state = "pending"
                task.adopt = None
                self.queue.appendleft(task)
                self.cond.notify_all()

    def _fail(self, task: _Task, why: str) -> None:
        with self.cond:
            if task.state in ("done", "failed") or self.stopping:
                return
            task.state = "failed"
            self.remaining -= 1
            self.failures.append((task.row.where, task.row.output, why))
            self.journal.write({"event": "failed", "output": task.row.output, "why": why, "time": _now_iso()})
            self.cond.notify_all()
        self.log(f"failed: {task.row.where} ({task.row.output}): {why}")
        self._progress(force=True, last=task.row.output)

    def _finish(self, server: _Server, task: _Task, images: list[bytes], record: dict) -> bool:
        """Write the row's files and its provenance record, once: a second result is discarded."""
        with self.cond:
            if self.stopping:
                return False
            if task.state in ("done", "failed"):
                self.discarded += 1
                return False
            stem = Path(task.row.output).stem
            names = [task.row.output] + [f"{stem}-{i + 1}.png" for i in range(1, len(images))]
            files = []
            for name, data in zip(names, images):
                write_bytes_atomic(self.out / name, data)
                files.append({"name": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
            record["files"] = files
            record["finished_at"] = _now_iso()
            self.provenance.write(record)
            task.state = "done"
            self.remaining -= 1
            self.done += 1
            server.rows += 1
            self.cond.notify_all()
        self._progress(force=True, last=task.row.output)
        return True

    def _progress(self, force: bool = False, last: str = "") -> None:
        now = time.monotonic()
        if not force and now - self.last_report < 0.1:
            return
        self.last_report = now
        running = 0.0
        for s in self.servers:
            with s.lock:
                running += sum(s.progress.values())
        self.report(Progress(total=len(self.tasks), done=self.done, failed=len(self.failures),
                             running=running, servers_up=sum(s.up and not s.dead for s in self.servers),
                             servers=len(self.servers), last=last))

    # -------------------------------------------------------------- servers coming and going
    def _wait_for_server(self, server: _Server, task: _Task | None) -> bool:
        """After a failed connection: True once the server answers again; False when ``task`` went
        to another server (or failed) or the server was given up."""
        with self.cond:
            if server.up:
                server.up, server.down_since, server.ever_down = False, time.monotonic(), True
                server.uploads.clear()        # a restarted server may have lost its input folder
                for t in self.adopted[server.url]:   # prompts of an earlier run: queued anew elsewhere
                    t.adopt = None
                self.queue.extend(self.adopted[server.url])
                self.adopted[server.url].clear()
                self.cond.notify_all()
                self.log(f"server {server.url} stopped answering")
        delay = 0.2
        while not self._over():
            try:
                server.probe_client.queue_ids()
                with self.cond:
                    if not server.up and not server.dead:
                        server.up = True
                        self.log(f"server {server.url} answers again")
                        self.cond.notify_all()
                return not server.dead
            except ProductSceneError:
                pass
            with self.cond:
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
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        return False

    def _fail_all(self, why: str) -> None:
        with self.cond:
            self.queue.clear()
            for q in self.adopted.values():
                q.clear()
            for t in self.tasks:
                if t.state in ("pending", "running"):
                    self._fail(t, why)

    def _call(self, server: _Server, task: _Task, fn):
        """``fn()`` with the retries: an unreachable server is waited for (or the row handed to
        another), HTTP 5xx answers are retried with backoff up to ``retries`` times."""
        delay = 0.5
        tries = 0
        while True:
            if self.stopping:
                raise _HandedBack()
            try:
                return fn()
            except ServerUnreachable:
                if not self._wait_for_server(server, task):
                    raise _HandedBack() from None
            except ServerError:
                tries += 1
                if tries > self.o.retries:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    # -------------------------------------------------------------- one row
    def _upload(self, server: _Server, path: Path) -> tuple[str, str]:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        name = server.uploads.get(sha)
        if name is None:
            up = server.client.upload_image(data, f"{sha[:24]}{path.suffix.lower()}", subfolder=UPLOAD_SUBFOLDER,
                                            overwrite=False)
            name = f"{up['subfolder']}/{up['name']}" if up.get("subfolder") else up["name"]
            server.uploads[sha] = name
        return name, sha

    def _wait(self, server: _Server, task: _Task, prompt_id: str, deadline: float):
        """("done", entry) | ("error", message) | ("lost", None)."""
        event = server.event(prompt_id)
        client = server.client
        while True:
            entry = self._call(server, task, lambda: client.history(prompt_id))
            if entry is None:
                if prompt_id not in self._call(server, task, client.queue_ids):
                    entry = self._call(server, task, lambda: client.history(prompt_id))
                    if entry is None:
                        return "lost", None
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or not status.get("completed", True):
                    return "error", client._failure_message(prompt_id, status)
                return "done", entry
            if time.monotonic() > deadline:
                return "error", (f"prompt {prompt_id} did not finish within {self.o.row_timeout:.0f} s "
                                 f"(--row-timeout)")
            event.wait(self.o.poll)
            event.clear()

    def _process(self, server: _Server, task: _Task) -> None:
        row, o = task.row, self.o
        t_row = time.monotonic()
        timings = {"started_at": _now_iso()}
        prompt_id = None
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
                values = dict(row.values)
                inputs = {}
                for role in UPLOADED:
                    path = getattr(row, role)
                    if path is not None:
                        values[role], sha = self._call(server, task, lambda p=path: self._upload(server, p))
                        inputs[role] = {"path": str(path), "sha256": sha}
                values["output"] = f"{UPLOAD_SUBFOLDER}/{self.tag}/{Path(row.output).stem}"
                prompt = graph.bind(self.plan.workflow, values)
                timings["upload_s"] = round(time.monotonic() - t0, 4)
                prompt_id = self._call(server, task, lambda: server.client.queue(prompt))
                task.attempts += 1
                timings["queued_at"] = _now_iso()
                task.inputs = inputs
                self.journal.write({"event": "queued", "output": row.output, "fingerprint": row.fingerprint,
                                    "server": server.url, "prompt_id": prompt_id, "time": timings["queued_at"]})
            t_queued = time.monotonic()
            try:
                state, result = self._wait(server, task, prompt_id, t_queued + o.row_timeout)
            finally:
                server.forget(prompt_id)
            if state == "lost":
                server.uploads.clear()        # restarted: its input folder may be new as well
                task.lost += 1
                self.log(f"{row.where}: prompt {prompt_id} was lost by {server.url} (restarted?); queueing it again")
                prompt_id = None
                continue
            if state == "error":
                self._fail(task, result)
                return
            break
        entry = result
        timings["wait_s"] = round(time.monotonic() - t_queued, 4)
        span = ComfyClient.execution_span(entry)
        if span:
            timings["server_start_ms"], timings["server_end_ms"] = span
            timings["execution_s"] = round((span[1] - span[0]) / 1000, 3)
        t0 = time.monotonic()
        refs = server.client.outputs(prompt_id, self.output_node, entry=entry)
        if not refs:
            self._fail(task, f"prompt {prompt_id}: the node titled {graph.ROLES['output'].title!r} "
                             f"(node {self.output_node}) produced no image")
            return
        images = [self._call(server, task, lambda r=r: server.client.download(r)) for r in refs]
        timings["download_s"] = round(time.monotonic() - t0, 4)
        timings["total_s"] = round(time.monotonic() - t_row, 4)
        inputs = task.inputs or {
            role: {"path": str(getattr(row, role)), "sha256": row.sha256[role]} for role in row.sha256}
        record = {
            "format": PROVENANCE_FORMAT, "format_version": PROVENANCE_VERSION,
            "output": row.output, "line": row.line, "where": row.where,
            "product": inputs.get("product"), "reference": inputs.get("reference"),
            "category": row.values.get("category"), "seed": self._bound_seed(row),
            "values": {k: v for k, v in row.values.items() if k not in ("category", "seed")},
            "workflow": {"path": str(o.workflow), "sha256": self.plan.workflow_sha256,
                         "bound_sha256": graph.workflow_hash(self.plan.workflow)},
            "fingerprint": row.fingerprint, "server": server.url, "prompt_id": prompt_id,
            "attempts": task.attempts, "timings": timings,
        }
        self._finish(server, task, images, record)

    def _bound_seed(self, row: Row):
        if "seed" in row.values:
            return row.values["seed"]
        try:
            node_id, name = graph.target(self.plan.workflow, "seed")
            return self.plan.workflow[node_id]["inputs"][name]
        except ProductSceneError:
            return None

    # -------------------------------------------------------------- threads
    def _worker(self, server: _Server) -> None:
        while not self._over() and not server.dead:
            if not server.up:
                if not self._wait_for_server(server, None):
                    continue
            task = self._take(server)
            if task is None:
                continue
            try:
                self._process(server, task)
            except _HandedBack:
                pass
            except ProductSceneError as e:   # rejected prompt, failed upload, retries used up
                self._fail(task, str(e))
            except Exception as e:  # a bug must not hang the job: the row fails with it
                self._fail(task, f"internal error: {type(e).__name__}: {e}")

    def _listen(self, server: _Server) -> None:
        delay = 0.2
        while not self._over() and not server.dead:
            try:
                ws = server.client.websocket(poll=0.5)
            except ProductSceneError:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.2
            server.ws = ws
            server.signal()        # (re)connected: every prompt in flight checks its state now
            try:
                while not self._over():
                    message = ws.recv()
                    if isinstance(message, str):
                        self._on_message(server, message)
            except WebSocketClosed:
                pass
            finally:
                ws.close()
                server.ws = None
                server.signal()

    def _on_message(self, server: _Server, text: str) -> None:
        try:
            message = json.loads(text)
            kind, data = message.get("type"), message.get("data") or {}
        except (ValueError, AttributeError):
            return
        prompt_id = data.get("prompt_id")
        if not prompt_id or prompt_id not in server.events:
            return
        if kind == "progress" and data.get("max"):
            with server.lock:
                server.progress[prompt_id] = min(1.0, float(data.get("value", 0)) / float(data["max"]))
            self._progress()
        elif kind in ("execution_error", "execution_interrupted") or (kind == "executing" and data.get("node") is None):
            server.signal(prompt_id)

    def run(self) -> Summary:
        t0 = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        for r in self.plan.todo:                      # temporary files a killed run left behind
            for stale in self.out.glob(f"{temp_prefix(self.out / r.output)}*{TEMP_SUFFIX}"):
                stale.unlink(missing_ok=True)
        fresh = self.o.overwrite and not self.o.resume
        self.provenance = LineFile(self.out / PROVENANCE_NAME, truncate=fresh, sync=True)
        self.journal = LineFile(self.out / JOURNAL_NAME, truncate=fresh)
        self.journal.write({"event": "start", "client_id": self.plan.client_id, "time": _now_iso(),
                            "rows": len(self.tasks), "servers": self.o.servers})
        threads = [threading.Thread(target=self._listen, args=(s,), daemon=True) for s in self.servers]
        workers = [threading.Thread(target=self._worker, args=(s,), daemon=True)
                   for s in self.servers for _ in range(self.o.concurrency)]
        for t in threads + workers:
            t.start()
        self._progress(force=True)
        interrupted = False
        try:
            with self.cond:
                while self.remaining and any(w.is_alive() for w in workers):
                    self.cond.wait(0.5)
                for t in self.tasks:                     # every worker gave up: no server left
                    if t.state == "pending":
                        t.state = "failed"
                        self.remaining -= 1
                        self.failures.append((t.row.where, t.row.output, "no ComfyUI server left to run it"))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            with self.cond:   # no worker writes after this; unfinished rows stay for --resume
                self.stopping = True
                self.provenance.close()
                self.journal.close()
            for s in self.servers:
                if s.ws is not None:
                    s.ws.stop_requested = True
        return Summary(rows=len(self.plan.rows), skipped=len(self.plan.rows) - len(self.tasks), done=self.done,
                       failed=list(self.failures), seconds=time.monotonic() - t0, interrupted=interrupted,
                       servers={s.url: {"rows": s.rows, "down": s.ever_down or s.dead} for s in self.servers},
                       discarded=self.discarded, notes=list(self.plan.notes))
