"""Headless catalogue jobs through ComfyUI's HTTP API: a manifest in, images with provenance out.

    python -m productscene batch --server URL [--server URL ...] --workflow API.json \\
        --manifest products.csv --out DIR [--resume]

Host-free (standard library and PIL). The whole job is checked before anything is uploaded or
queued (:func:`plan`); then every server gets ``concurrency`` prompts in flight at a time, so its
queue never runs dry while the client uploads, downloads and writes. A server that stops answering
hands its rows back to the others (or, alone, is waited for); a prompt a restarted server lost is
queued again; each row is written once, atomically, with one provenance record (JSON lines).
See docs/batch.md for the manifest, the binding convention and the files written.
"""
from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import graph
from .client import ComfyClient, ServerError, ServerUnreachable
from .errors import ProductSceneError
from .files import TEMP_SUFFIX, temp_prefix, write_bytes_atomic
from .websocket import WebSocketClosed

PROVENANCE_FORMAT = "productscene.batch_provenance"
PROVENANCE_VERSION = 1
PROVENANCE_NAME = "provenance.jsonl"
JOURNAL_NAME = ".productscene-batch-journal.jsonl"
UPLOAD_SUBFOLDER = "productscene_batch"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

COLUMNS = ("product", "category", "reference", "prompt", "negative_prompt", "seed", "output")
ALIASES = {"product_image": "product", "image": "product", "brand_reference": "reference",
           "reference_image": "reference", "negative": "negative_prompt", "output_name": "output"}
UPLOADED = ("product", "reference")       # roles whose value is a file sent through /upload/image


# ------------------------------------------------------------------------------ rows
@dataclass
class Row:
    where: str                    # how messages name the row: "line 7" or the image's file name
    product: Path
    line: int | None = None       # manifest line (the header is line 1)
    category: str | None = None
    reference: Path | None = None
    seed: str | None = None       # text as written; coerced against the server's spec
    output: str = ""
    cells: dict = field(default_factory=dict)   # prompt fields and "<title>.<input>" columns: raw text
    values: dict = field(default_factory=dict)  # bound values (everything but uploads and output)
    sha256: dict = field(default_factory=dict)  # "product"/"reference" -> hash of the file
    fingerprint: str = ""


class BatchError(ProductSceneError):
    """A job rejected before anything was queued; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{source}: {len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}, "
                         f"nothing was queued:\n" + "\n".join("  " + p for p in self.problems))


def _column(name: str) -> str:
    if "." in name:                       # "<node title>.<input>": kept as written
        return name.strip()
    key = "_".join(name.strip().lower().replace("-", " ").split())
    return ALIASES.get(key, key)


def read_manifest(path) -> tuple[list[Row], list[str]]:
    """Rows of a CSV manifest (relative paths are relative to its folder) and every problem
    found in the file itself, each with its line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ProductSceneError(f"manifest: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ProductSceneError(f"manifest: {path} is not UTF-8 text (save the CSV as UTF-8)") from None
    base = path.parent
    reader = csv.reader(text.splitlines(keepends=True))
    rows, problems, columns, last_line = [], [], None, 0
    for record in reader:
        line, last_line = last_line + 1, reader.line_num
        if not any(c.strip() for c in record) or record[0].lstrip().startswith("#"):
            continue
        if columns is None:
            columns = [_column(c) for c in record]
            for i, c in enumerate(columns):
                if not c:
                    problems.append(f"line {line}: column {i + 1} has no name")
                elif c not in COLUMNS and "." not in c:
                    problems.append(f"line {line}: unknown column {record[i].strip()!r} (columns: "
                                    f"{', '.join(COLUMNS)}, or '<node title>.<input>')")
                elif columns.count(c) > 1 and columns.index(c) == i:
                    problems.append(f"line {line}: column {c!r} appears {columns.count(c)} times")
            if "product" not in columns:
                problems.append(f"line {line}: no 'product' column (the product image of each row)")
            continue
        if len(record) != len(columns):
            problems.append(f"line {line}: {len(record)} cells, but the header has {len(columns)} columns")
            continue
        cells = {c: v for c, v in zip(columns, record) if c}
        product = cells.get("product", "").strip()
        if not product:
            problems.append(f"line {line}: product: empty (give the product image's path)")
            continue
        row = Row(where=f"line {line}", line=line, product=base / Path(product).expanduser())
        row.category = cells.get("category", "").strip() or None
        ref = cells.get("reference", "").strip()
        row.reference = base / Path(ref).expanduser() if ref else None
        row.seed = cells.get("seed", "").strip() or None
        row.output = cells.get("output", "").strip()
        row.cells = {c: v for c, v in cells.items() if c not in ("product", "category", "reference", "seed", "output")
                     and v != ""}
        rows.append(row)
    if columns is None:
        problems.append(f"line 1: the manifest is empty (expected a header: {', '.join(COLUMNS)})")
    elif not rows and not problems:
        problems.append("the manifest has a header but no rows")
    return rows, problems


def folder_rows(folder) -> list[Row]:
    """One row per image in ``folder`` (not its subfolders), by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ProductSceneError(f"folder: {str(folder)!r} is not a folder")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ProductSceneError(f"folder: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return [Row(where=p.name, product=p) for p in images]


# ------------------------------------------------------------------------------ the plan
@dataclass
class Options:
    workflow: Path
    servers: list[str]
    out: Path
    sets: dict = field(default_factory=dict)   # "<role>" or "<title>.<input>" -> text, for every row
    category: str | None = None                # for rows without one
    reference: Path | None = None              # for rows without one
    seed: str | None = None                    # for rows without one (default: the workflow's)
    concurrency: int = 2                       # prompts in flight per server
    resume: bool = False
    overwrite: bool = False
    retries: int = 3                           # per row: transient errors and prompts a server lost
    server_timeout: float = 300.0              # give up on a server unreachable this long
    row_timeout: float = 3600.0                # a queued prompt must finish within this
    poll: float = 1.0                          # history/queue check while no websocket message comes


@dataclass
class Plan:
    options: Options
    workflow: dict                # the API graph with the --set values bound
    workflow_sha256: str
    rows: list[Row]
    todo: list[Row]               # rows to run (all of them, or the unfinished ones on --resume)
    adopt: dict                   # output name -> (server, prompt id) queued by an earlier run
    client_id: str
    notes: list[str] = field(default_factory=list)

    @property
    def output_node(self) -> str:
        return graph.target(self.workflow, "output")[0]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_image(path: Path, what: str) -> str | None:
    if not path.is_file():
        return f"{what}: file not found: {path}"
    try:
        from PIL import Image
        with Image.open(path) as im:
            _ = im.size
    except Exception as e:  # PIL raises many types for files that are no image
        return f"{what}: {path} is not an image PIL can read ({type(e).__name__})"
    return None


def _output_name(row: Row) -> str | None:
    """The row's output file name (a bare .png name), or the problem with it."""
    name = row.output or row.product.stem + ".png"
    if "/" in name or "\\" in name or name.startswith(".") or name in ("", "..") or any(ord(c) < 32 for c in name):
        return None
    if Path(name).suffix.lower() != ".png":
        if Path(name).suffix and row.output:
            return None
        name += ".png"
    return name


class _Inventory:
    """What one server offers: node specs and, with ProductScene installed, each library's categories."""

    def __init__(self, url: str):
        client = ComfyClient(url, timeout=30)
        self.url = url
        self.info = client.object_info()
        self.libraries = client.library_categories()

    def spec(self, prompt: dict, key: str):
        node_id, name = graph.target(prompt, key)
        return graph.input_spec(self.info, prompt[node_id]["class_type"], name)

    def categories(self, prompt: dict) -> tuple[list[str] | None, str]:
        """Categories the bound category input accepts, and where they come from."""
        node_id, name = graph.target(prompt, "category")
        library = prompt[node_id]["inputs"].get("library")
        if self.libraries is not None and isinstance(library, str):
            return self.libraries.get(library), f"library {library!r}"
        spec = graph.input_spec(self.info, prompt[node_id]["class_type"], name)
        return (graph.combo_options(spec) if spec else None), "the category input"


def plan(options: Options, rows: list[Row], source: str) -> Plan:
    """Check the whole job against the workflow and every server; BatchError with every problem
    (and its line) before anything is uploaded or queued."""
    o = options
    if o.concurrency < 1:
        raise ProductSceneError(f"concurrency: expected at least 1 prompt in flight per server, got {o.concurrency}")
    if not o.servers:
        raise ProductSceneError("server: give at least one ComfyUI URL (--server http://127.0.0.1:8188)")
    if len(set(o.servers)) != len(o.servers):
        raise ProductSceneError("server: the same URL is given twice")
    workflow = graph.load_workflow(o.workflow)
    problems: list[str] = []

    inventories = []
    for url in o.servers:
        try:
            inventories.append(_Inventory(url))
        except ProductSceneError as e:
            problems.append(f"server {url}: {e}")

    # the workflow: roles it must have for these rows
    for role in ("product", "output"):
        try:
            graph.target(workflow, role)
        except ProductSceneError as e:
            problems.append(f"{e} (see docs/batch.md: the binding convention)")
    has = {role: graph.has_role(workflow, role) for role in graph.ROLES}
    if o.reference is not None:
        rows_ref = [r for r in rows if r.reference is None]
        for r in rows_ref:
            r.reference = o.reference
    for r in rows:
        r.category = r.category or o.category
        r.seed = r.seed or o.seed
    refs = [r for r in rows if r.reference is not None]
    if refs and not has["reference"]:
        problems.append(
            f"{_lines(refs)}: a brand reference is given, but workflow {o.workflow.name} has no node titled "
            f"{graph.ROLES['reference'].title!r} to take it (use a workflow with a brand reference input, "
            f"e.g. PersonalityReference, or leave the reference column empty)")
    if has["reference"] and len(refs) < len(rows):
        problems.append(f"{_lines([r for r in rows if r.reference is None])}: no brand reference, but workflow "
                        f"{o.workflow.name} needs one (its node titled {graph.ROLES['reference'].title!r}); "
                        f"fill the reference column or pass --reference FILE")
    if has["category"]:
        missing = [r for r in rows if not r.category]
        if missing:
            problems.append(f"{_lines(missing)}: category: empty (fill the category column or pass --category)")
    elif any(r.category for r in rows):
        problems.append(f"workflow {o.workflow.name}: no node titled {graph.ROLES['category'].title!r} to take "
                        f"the rows' categories")
    for key in {k for r in rows for k in r.cells}:
        try:
            graph.target(workflow, key)
        except ProductSceneError as e:
            problems.append(f"column {key!r}: {e}")
    if any(r.seed for r in rows) and not has["seed"]:
        problems.append(f"workflow {o.workflow.name}: no node titled {graph.ROLES['seed'].title!r} to take the seed")

    # the --set values, on every server
    sets = dict(o.sets)
    for key in sets:
        if key in UPLOADED or key == "output":
            problems.append(f"--set {key}: {key} comes from each row (manifest column / folder), not from --set")
    set_values = {}
    for key, raw in sets.items():
        if key in UPLOADED or key == "output":
            continue
        try:
            graph.target(workflow, key)
        except ProductSceneError as e:
            problems.append(f"--set {key}: {e}")
            continue
        for inv in inventories[:1]:
            spec = inv.spec(workflow, key)
            try:
                set_values[key] = graph.coerce(spec, raw) if spec else raw
            except ProductSceneError as e:
                problems.append(f"--set {key}: {e}")
    if problems and not inventories:
        raise BatchError(source, problems)
    try:
        bound = graph.bind(workflow, set_values)
    except ProductSceneError as e:
        raise BatchError(source, problems + [str(e)]) from None

    # row-bound inputs are checked per row; everything else once per server
    row_keys = {k for r in rows for k in r.cells}
    row_keys |= {"category"} if has["category"] else set()
    row_keys |= {"seed"} if any(r.seed for r in rows) else set()
    skip = set()
    for key in row_keys | {"product", "output"} | ({"reference"} if has["reference"] else set()):
        try:
            skip.add(graph.target(bound, key))
        except ProductSceneError:
            pass
    for inv in inventories:
        for p in graph.check_prompt(bound, inv.info, skip=skip):
            problems.append(f"server {inv.url}: workflow {o.workflow.name}: {p}")

    # every row
    outputs: dict[str, Row] = {}
    category_sources = {}
    for inv in inventories:
        if has["category"]:
            try:
                category_sources[inv.url] = inv.categories(bound)
            except ProductSceneError:
                category_sources[inv.url] = (None, "")
    for r in rows:
        why = _check_image(r.product, "product")
        if why:
            problems.append(f"{r.where}: {why}")
        if r.reference is not None:
            why = _check_image(r.reference, "reference")
            if why:
                problems.append(f"{r.where}: {why}")
        name = _output_name(r)
        if name is None:
            problems.append(f"{r.where}: output: {r.output!r} is not a plain .png file name")
        else:
            r.output = name
            other = outputs.get(name.casefold())
            if other is not None:
                problems.append(f"{r.where}: output: {name!r} is already the output of {other.where} "
                                f"(output names must be unique)")
            else:
                outputs[name.casefold()] = r
        raw_values = dict(r.cells)
        if has["category"] and r.category:
            raw_values["category"] = r.category
        if r.seed:
            raw_values["seed"] = r.seed
        r.values = {}
        for key, raw in raw_values.items():
            for inv in inventories:
                try:
                    spec = inv.spec(bound, key)
                except ProductSceneError:
                    break  # reported above (no such input)
                try:
                    value = graph.coerce(spec, raw) if spec else raw
                except ProductSceneError as e:
                    problems.append(f"{r.where}: {key}: {e}")
                    break
                r.values[key] = value
                if key == "category":
                    offered, origin = category_sources.get(inv.url, (None, ""))
                    if offered is not None and value not in offered:
                        problems.append(f"{r.where}: category: {value!r} is not in {origin} on server {inv.url}"
                                        f" (it has: {graph._shorten(sorted(offered))})")
                    continue
                why = graph.check_value(spec, value) if spec else None
                if why:
                    problems.append(f"{r.where}: {key}: {why} (server {inv.url})")
                    break
    if problems:
        raise BatchError(source, problems)

    # provenance of earlier runs; what is left to do
    wf_sha = graph.workflow_hash(workflow)
    for r in rows:
        r.sha256["product"] = _sha256_file(r.product)
        if r.reference is not None:
            r.sha256["reference"] = _sha256_file(r.reference)
        r.fingerprint = hashlib.sha256(json.dumps(
            {"workflow": graph.workflow_hash(bound), "inputs": r.sha256, "values": r.values},
            sort_keys=True, default=str).encode()).hexdigest()
    out = Path(o.out)
    records = read_provenance(out / PROVENANCE_NAME)
    journal = _read_journal(out / JOURNAL_NAME)
    notes, adopt = [], {}
    if records and not (o.resume or o.overwrite):
        raise BatchError(source, [f"out: {out} already holds {len(records)} finished rows of a batch "
                                  f"({PROVENANCE_NAME}); pass --resume to run only the unfinished rows, "
                                  f"--overwrite to start again, or choose another --out"])
    if not (o.resume or o.overwrite):
        clash = [r for r in rows if (out / r.output).exists()]
        if clash:
            raise BatchError(source, [f"{r.where}: output: {out / r.output} already exists (pass --overwrite to "
                                      f"replace it, or choose another --out)" for r in clash])
    client_id = journal.get("client_id") if o.resume else None
    todo = rows
    if o.resume:
        finished = {rec.get("output"): rec for rec in records}
        todo, changed = [], 0
        for r in rows:
            rec = finished.get(r.output)
            if rec is not None and rec.get("fingerprint") == r.fingerprint and (out / r.output).is_file():
                continue
            changed += rec is not None
            todo.append(r)
            queued = journal["queued"].get(r.output)
            if queued and queued["fingerprint"] == r.fingerprint and queued["server"] in o.servers:
                adopt[r.output] = (queued["server"], queued["prompt_id"])
        notes.append(f"resume: {len(rows) - len(todo)} of {len(rows)} rows already done"
                     + (f"; {changed} done rows changed since (inputs or workflow) and run again" if changed else "")
                     + (f"; {len(adopt)} prompts an earlier run queued are collected, not queued again"
                        if adopt else ""))
    return Plan(options=o, workflow=bound, workflow_sha256=wf_sha, rows=rows, todo=todo, adopt=adopt,
                client_id=client_id or uuid.uuid4().hex, notes=notes)


def _lines(rows: list[Row]) -> str:
    """``line 4`` / ``lines 4, 9, 12`` / ``a.png, b.png`` (at most 20 named)."""
    more = f" and {len(rows) - 20} more" if len(rows) > 20 else ""
    if len(rows) > 1 and all(r.line is not None for r in rows):
        return "lines " + ", ".join(str(r.line) for r in rows[:20]) + more
    return ", ".join(r.where for r in rows[:20]) + more


# ------------------------------------------------------------------------------ files of a job
def read_provenance(path) -> list[dict]:
    """The records of a provenance file; a last line cut short by a killed run is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("format") == PROVENANCE_FORMAT:
            if int(rec.get("format_version", 0)) > PROVENANCE_VERSION:
                raise ProductSceneError(f"{path}: line {n} is provenance format version {rec['format_version']}, "
                                        f"newer than this ProductScene reads ({PROVENANCE_VERSION})")
            records.append(rec)
    return records


def _read_journal(path: Path) -> dict:
    state = {"client_id": None, "queued": {}}
    if not path.is_file():
        return state
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "start":
            state["client_id"] = event.get("client_id")
        elif event.get("event") == "queued":
            state["queued"][event["output"]] = event
    return state


class _LineFile:
    """An append-only JSON-lines file; each line is flushed (and with ``sync``, fsync'd) at once.
    A line left half-written by a killed run is cut off first, so appends start on a fresh line."""

    def __init__(self, path: Path, truncate: bool = False, sync: bool = False):
        self.sync = sync
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not truncate:
            with open(path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        self.f = open(path, "w" if truncate else "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        self.f.flush()
        if self.sync:
            os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# ------------------------------------------------------------------------------ running
@dataclass
class Progress:
    total: int
    done: int
    failed: int
    running: float        # sampling progress of the prompts in flight, in rows (0 .. in flight)
    servers_up: int
    servers: int
    last: str = ""        # the row that just finished or failed


@dataclass
class Summary:
    rows: int
    skipped: int                      # done by an earlier run (--resume)
    done: int
    failed: list[tuple[str, str, str]]  # (where, output, why)
    servers: dict                     # url -> {"rows": n, "down": bool}
    seconds: float
    interrupted: bool = False
    discarded: int = 0                # results of a row that another server had already delivered
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else (1 if self.failed else 0)

    def message(self) -> str:
        lines = list(self.notes)
        head = f"{self.rows} rows: {self.done} done" + (f", {self.skipped} already done" if self.skipped else "")
        head += f", {len(self.failed)} failed" + (", interrupted" if self.interrupted else "")
        lines.append(head + f" in {self.seconds:.1f} s")
        for url, s in self.servers.items():
            lines.append(f"  {url}: {s['rows']} rows" + ("; stopped answering" if s["down"] else ""))
        if self.failed:
            lines.append("failed rows:")
            lines.extend(f"  {where} ({output}): {why}" for where, output, why in self.failed)
        if self.interrupted:
            lines.append("interrupted: run the same command with --resume to finish the unfinished rows")
        elif self.failed:
            lines.append("run the same command with --resume to retry only the failed rows")
        return "\n".join(lines)


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
        self.output_node = plan.output_node
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
        self.provenance = _LineFile(self.out / PROVENANCE_NAME, truncate=fresh, sync=True)
        self.journal = _LineFile(self.out / JOURNAL_NAME, truncate=fresh)
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


def run_batch(options: Options, *, manifest=None, folder=None, progress=None, log=None) -> Summary:
    """Check the job (BatchError listing every problem, nothing queued), then run it."""
    if (manifest is None) == (folder is None):
        raise ProductSceneError("give a manifest (--manifest products.csv) or a folder (--folder DIR), not both")
    if manifest is not None:
        rows, problems = read_manifest(manifest)
        source = str(manifest)
        if problems:
            # the file itself is broken: still check the rows it has, so every problem shows at once
            try:
                plan(options, rows, source)
            except BatchError as e:
                problems += [p for p in e.problems if p not in problems]
            except ProductSceneError as e:
                problems.append(str(e))
            raise BatchError(source, problems)
    else:
        rows, source = folder_rows(folder), str(folder)
    job = plan(options, rows, source)
    return BatchRun(job, progress=progress, log=log).run()
