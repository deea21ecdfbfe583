"""Checking a whole batch job before anything is uploaded or queued: the workflow's bindings, every
row's files and values against what each server offers, and what an earlier run already did.

The rows are read twice, never held all at once: once here, to check them and count what is left to
do, and again by the run (:meth:`Plan.jobs`), which binds each row the same way. Each step takes a
row and returns new values (:class:`Job`); a :class:`Row` is never changed."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import uuid
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .. import graph
from ..client import ComfyClient, ServerUnreachable
from ..errors import ProductSceneError
from ..images import header
from .manifest import Row
from .records import JOURNAL_NAME, PROVENANCE_NAME, iter_journal, iter_provenance

UPLOADED = ("product", "reference")       # roles whose value is a file sent through /upload/image


class BatchError(ProductSceneError):
    """A job rejected before anything was queued; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{source}: {len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}, "
                         f"nothing was queued:\n" + "\n".join("  " + p for p in self.problems))


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


@dataclass(frozen=True)
class Job:
    """One row, checked and bound: what the run sends and records."""
    row: Row                      # with the job's defaults (--category, --seed, --reference) filled in
    output: str = ""              # the output file name
    values: dict = field(default_factory=dict)   # typed values (everything but uploads and output)
    sha256: dict = field(default_factory=dict)   # "product"/"reference" -> hash of the file
    fingerprint: str = ""
    problem: str | None = None    # the row no longer passes its check (a file changed since)


@dataclass
class Plan:
    options: Options
    workflow: dict                # the API graph with the --set values bound
    workflow_sha256: str          # of the workflow file's graph as written
    rows: Iterable[Row]           # the job's rows (iterated again by jobs())
    total: int                    # rows in the job
    todo: int                     # rows to run (all of them, or the unfinished ones on --resume)
    adopt: dict                   # output name -> (server, prompt id) queued by an earlier run
    client_id: str
    binder: "_Binder"             # checks and binds a row (again, for the run)
    finished: "_Finished"         # rows an earlier run finished (on --resume)
    notes: list[str] = field(default_factory=list)

    def jobs(self) -> Iterator[Job]:
        """The rows to run, bound, in the job's order (a row that no longer passes its check comes
        with ``problem`` set)."""
        for row in self.rows:
            job, problems = self.binder.job(self.binder.defaults(row))
            if job is None:
                yield Job(row=row, output=row.output, problem="; ".join(problems))
            elif not self.finished.has(job):
                yield job


def _key(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest(), "little")


class _Finished:
    """The rows an earlier run finished (provenance records whose output file exists), as sorted
    64-bit keys: 8 bytes a row however large the catalogue."""

    def __init__(self, out: Path, read: bool = True):
        self.out = out
        done, names = array("Q"), array("Q")
        for rec in iter_provenance(out / PROVENANCE_NAME) if read else ():
            done.append(_key(str(rec.get("output")), str(rec.get("fingerprint"))))
            names.append(_key(str(rec.get("output"))))
        self.count = len(done)
        self.done = np.unique(np.frombuffer(done, np.uint64)) if done else np.zeros(0, np.uint64)
        self.names = np.unique(np.frombuffer(names, np.uint64)) if names else np.zeros(0, np.uint64)

    @staticmethod
    def _in(keys: np.ndarray, key: int) -> bool:
        i = int(np.searchsorted(keys, np.uint64(key)))
        return i < len(keys) and int(keys[i]) == key

    def recorded(self, output: str, fingerprint: str) -> bool:
        """A record of this output with this fingerprint exists."""
        return self.count > 0 and self._in(self.done, _key(output, fingerprint))

    def has(self, job: Job) -> bool:
        """The row is finished: recorded as it is now, and its output file is there."""
        return self.recorded(job.output, job.fingerprint) and _nonempty(self.out / job.output)

    def had_output(self, job: Job) -> bool:
        """Some record (of this row as it was before) names this output."""
        return self.count > 0 and self._in(self.names, _key(job.output))


class _Inventory:
    """What one server offers: node specs and, with ProductScene installed, each library's categories."""

    def __init__(self, url: str):
        client = ComfyClient(url, timeout=30)
        self.url = url
        self.info = client.object_info()
        self.client = client
        self.libraries = client.libraries()
        self._categories: dict[str, list[str]] = {}

    def spec(self, prompt: dict, key: str):
        node_id, name = graph.target(prompt, key)
        return graph.input_spec(self.info, prompt[node_id]["class_type"], name)

    def categories(self, prompt: dict) -> tuple[list[str] | None, str]:
        """Categories the bound category input accepts, and where they come from."""
        node_id, name = graph.target(prompt, "category")
        library = prompt[node_id]["inputs"].get("library")
        if self.libraries is not None and isinstance(library, str):
            if library not in self.libraries:
                return None, f"library {library!r}"
            if library not in self._categories:
                self._categories[library] = self.client.library_categories(library)
            return self._categories[library], f"library {library!r}"
        spec = graph.input_spec(self.info, prompt[node_id]["class_type"], name)
        return (graph.combo_options(spec) if spec else None), "the category input"


class _Servers:
    """Servers whose node specs (for the workflow's node types) and libraries are the same: a row's
    values are checked once per such group, not once per server."""

    def __init__(self, inventories: list[_Inventory]):
        self.inventories = inventories
        self.first = inventories[0]
        self.urls = [inv.url for inv in inventories]
        self._specs: dict = {}
        self._categories = None

    @property
    def name(self) -> str:
        return self.urls[0] + (f" (and {len(self.urls) - 1} more with the same nodes)" if len(self.urls) > 1 else "")

    def spec(self, prompt: dict, key: str):
        """The input spec ``key`` binds (None: no spec); ProductSceneError when no such input."""
        if key not in self._specs:
            try:
                self._specs[key] = self.first.spec(prompt, key)
            except ProductSceneError as e:
                self._specs[key] = e
        spec = self._specs[key]
        if isinstance(spec, ProductSceneError):
            raise spec
        return spec

    def categories(self, prompt: dict) -> tuple[set | None, str]:
        if self._categories is None:
            offered, origin = self.first.categories(prompt)
            self._categories = (None if offered is None else set(offered), origin)
        return self._categories


def _groups(bound: dict, inventories: list[_Inventory]) -> list[_Servers]:
    types = sorted({n["class_type"] for n in bound.values()})
    by_key: dict[str, list] = {}
    for inv in inventories:
        key = json.dumps([{t: inv.info.get(t) for t in types}, inv.libraries], sort_keys=True, default=str)
        by_key.setdefault(key, []).append(inv)
    return [_Servers(invs) for invs in by_key.values()]


class _Binder:
    """Checks one row and binds it (:meth:`job`), with what that needs gathered once."""

    def __init__(self, bound: dict, groups: list[_Servers], options: Options):
        self.bound, self.groups, self.options = bound, groups, options
        self.bound_sha256 = graph.workflow_hash(bound)
        self.has = {role: graph.has_role(bound, role) for role in graph.ROLES}

    def defaults(self, row: Row) -> Row:
        o = self.options
        return dataclasses.replace(row, category=row.category or o.category, seed=row.seed or o.seed,
                                   reference=row.reference or o.reference)

    def raw_values(self, row: Row) -> dict:
        return {**row.cells, **({"category": row.category} if row.category and self.has["category"] else {}),
                **({"seed": row.seed} if row.seed and self.has["seed"] else {})}

    def values(self, row: Row) -> tuple[dict, list[str]]:
        """The row's values typed and checked as every server's node specs (and, for categories,
        the chosen library) accept them."""
        values, problems = {}, []
        for key, raw in self.raw_values(row).items():
            if not self.groups:
                values[key] = raw
            for group in self.groups:
                try:
                    spec = group.spec(self.bound, key)
                except ProductSceneError:        # no such input: reported once, by the binding check
                    break
                try:
                    value = graph.coerce(spec, raw) if spec else raw
                except ProductSceneError as e:
                    problems.append(f"{row.where}: {key}: {e}")
                    break
                values[key] = value
                if key == "category":
                    offered, origin = group.categories(self.bound)
                    why = (None if offered is None or value in offered else
                           f"{value!r} is not in {origin} (it has: {graph.shorten(sorted(offered))})")
                else:
                    why = graph.check_value(spec, value) if spec else None
                if why:
                    problems.append(f"{row.where}: {key}: {why} (server {group.name})")
                    break
        return values, problems

    def job(self, row: Row) -> tuple[Job, list[str]]:
        """The row checked and bound; with problems, a Job whose ``problem`` says them."""
        problems = []
        for what, path in (("product", row.product), ("reference", row.reference)):
            why = _image_problem(path, what) if path is not None else None
            if why:
                problems.append(f"{row.where}: {why}")
        name = _output_name(row)
        if name is None:
            problems.append(f"{row.where}: output: {row.output!r} is not a plain .png file name")
        values, value_problems = self.values(row)
        problems += value_problems
        if problems:
            return Job(row=row, output=name or "", values=values, problem="; ".join(problems)), problems
        sha = {"product": _sha256_file(row.product)}
        if row.reference is not None:
            sha["reference"] = _sha256_file(row.reference)
        fingerprint = hashlib.sha256(json.dumps({"workflow": self.bound_sha256, "inputs": sha, "values": values},
                                                sort_keys=True, default=str).encode()).hexdigest()
        return Job(row=row, output=name, values=values, sha256=sha, fingerprint=fingerprint), []


class _Lines:
    """Rows that share a problem, named as ``line 4`` / ``lines 4, 9, 12`` / ``a.png, b.png``
    (at most 20 named)."""

    def __init__(self):
        self.rows, self.count, self.numbered = [], 0, True

    def add(self, row: Row) -> None:
        self.count += 1
        self.numbered &= row.line is not None
        if len(self.rows) < 20:
            self.rows.append(row)

    def __bool__(self) -> bool:
        return self.count > 0

    def __str__(self) -> str:
        more = f" and {self.count - 20} more" if self.count > 20 else ""
        if self.count > 1 and self.numbered:
            return "lines " + ", ".join(str(r.line) for r in self.rows) + more
        return ", ".join(r.where for r in self.rows) + more


def check_job(options: Options, rows: Iterable[Row], source: str) -> Plan:
    """Check the whole job against the workflow and every server; BatchError with every problem
    (each row's with its line) before anything is uploaded or queued. ``rows`` is iterated twice
    (here and by the run): a list, :class:`~productscene.batch.manifest.ManifestRows` or the like;
    its ``problems`` (if it has them) are the file's own."""
    o = options
    if o.concurrency < 1:
        raise ProductSceneError(f"concurrency: expected at least 1 prompt in flight per server, got {o.concurrency}")
    if not o.servers:
        raise ProductSceneError("server: give at least one ComfyUI URL (--server http://127.0.0.1:8188)")
    if len(set(o.servers)) != len(o.servers):
        raise ProductSceneError("server: the same URL is given twice")
    if iter(rows) is rows:
        raise ProductSceneError("rows: expected rows that can be read twice (a list or ManifestRows), "
                                "not a one-shot iterator")
    workflow = graph.load_workflow(o.workflow)
    problems: list[str] = []
    inventories = []
    for url in o.servers:
        try:
            inventories.append(_Inventory(url))
        except ServerUnreachable as e:
            problems.append(f"server {url}: {e} (start it, or leave it out of --server/--servers-file to run on "
                            f"the others; --resume works with any set of servers)")
        except ProductSceneError as e:
            problems.append(f"server {url}: {e}")
    for role in ("product", "output"):
        try:
            graph.target(workflow, role)
        except ProductSceneError as e:
            problems.append(f"{e} (see docs/batch.md: the binding convention)")
    set_values, set_problems = _set_values(workflow, o.sets, inventories)
    problems += set_problems
    try:
        bound = graph.bind(workflow, set_values)
    except ProductSceneError as e:
        raise BatchError(source, problems + [str(e)]) from None
    groups = _groups(bound, inventories) if inventories else []
    binder = _Binder(bound, groups, o)
    out = Path(o.out)
    earlier = _Finished(out)
    finished = earlier if o.resume else _Finished(out, read=False)
    queued = _queued_unfinished(out, finished) if o.resume else {"client_id": None, "queued": {}}

    name = o.workflow.name
    refs, no_refs, no_category, categories, seeds = _Lines(), _Lines(), _Lines(), _Lines(), _Lines()
    cell_keys: set[str] = set()
    names, clash, adopt = array("Q"), [], {}
    total = todo = changed = 0
    row_problems: list[str] = []
    for row in rows:
        row = binder.defaults(row)
        total += 1
        (refs if row.reference is not None else no_refs).add(row)
        if row.category:
            categories.add(row)
        elif binder.has["category"]:
            no_category.add(row)
        if row.seed:
            seeds.add(row)
        cell_keys.update(row.cells)
        job, why = binder.job(row)
        row_problems += why
        if job.output:
            names.append(_key(job.output.casefold()))
        if why or finished.has(job):
            continue
        todo += 1
        changed += finished.had_output(job)
        if not (o.resume or o.overwrite) and (out / job.output).exists():
            clash.append(f"{row.where}: output: {out / job.output} already exists (pass --overwrite "
                         f"to replace it, or choose another --out)")
        prior = queued["queued"].get(job.output)
        if prior and prior.get("fingerprint") == job.fingerprint and prior.get("server") in o.servers:
            adopt[job.output] = (prior["server"], prior["prompt_id"])

    problems = list(getattr(rows, "problems", [])) + problems
    title = {role: repr(r.title) for role, r in graph.ROLES.items()}
    if refs and not binder.has["reference"]:
        problems.append(f"{refs}: a brand reference is given, but workflow {name} has no node titled "
                        f"{title['reference']} to take it (use a workflow with a brand reference input, e.g. "
                        f"PersonalityReference, or leave the reference column empty)")
    if binder.has["reference"] and no_refs:
        problems.append(f"{no_refs}: no brand reference, but workflow {name} needs one (its node titled "
                        f"{title['reference']}); fill the reference column or pass --reference FILE")
    if no_category:
        problems.append(f"{no_category}: category: empty (fill the category column or pass --category)")
    if categories and not binder.has["category"]:
        problems.append(f"workflow {name}: no node titled {title['category']} to take the rows' categories")
    if seeds and not binder.has["seed"]:
        problems.append(f"workflow {name}: no node titled {title['seed']} to take the seed")
    for key in sorted(cell_keys):
        try:
            graph.target(bound, key)
        except ProductSceneError as e:
            problems.append(f"column {key!r}: {e}")
    skip = set()
    bound_keys = cell_keys | ({"category"} if categories else set()) | ({"seed"} if seeds else set())
    for key in bound_keys | set(UPLOADED) | {"output"}:
        try:
            skip.add(graph.target(bound, key))
        except ProductSceneError:
            pass
    for group in groups:
        problems += [f"server {group.name}: workflow {name}: {p}"
                     for p in graph.check_prompt(bound, group.first.info, skip=skip)]
    problems += row_problems + _duplicate_outputs(rows, binder, names)
    if problems:
        raise BatchError(source, problems)
    if not (o.resume or o.overwrite):
        if earlier.count:
            raise BatchError(source, [f"out: {out} already holds {earlier.count} finished rows of a batch "
                                      f"({PROVENANCE_NAME}); pass --resume to run only the unfinished rows, "
                                      f"--overwrite to start again, or choose another --out"])
        if clash:
            raise BatchError(source, clash)
    notes = []
    if o.resume:
        note = f"resume: {total - todo} of {total} rows already done"
        if changed:
            note += f"; {changed} finished rows changed since (inputs or workflow) and run again"
        if adopt:
            note += f"; {len(adopt)} prompts queued by the earlier run are collected, not queued again"
        notes.append(note)
    return Plan(options=o, workflow=bound, workflow_sha256=graph.workflow_hash(workflow), rows=rows, total=total,
                todo=todo, adopt=adopt, client_id=queued["client_id"] or uuid.uuid4().hex, binder=binder,
                finished=finished, notes=notes)


def _queued_unfinished(out: Path, finished: _Finished) -> dict:
    """From the journal: the client id of the last run and its queued prompts that did not finish."""
    state = {"client_id": None, "queued": {}}
    for event in iter_journal(out / JOURNAL_NAME):
        if event.get("event") == "start":
            state["client_id"] = event.get("client_id")
        elif event.get("event") == "queued":
            output = str(event.get("output"))
            if finished.recorded(output, str(event.get("fingerprint"))):
                state["queued"].pop(output, None)
            else:
                state["queued"][output] = event
    return state


def _duplicate_outputs(rows: Iterable[Row], binder: _Binder, names: array) -> list[str]:
    """Rows whose output name (ignoring case) an earlier row has: found from 8-byte keys, named
    by reading the rows again only when there are any."""
    keys = np.sort(np.frombuffer(names, np.uint64)) if names else np.zeros(0, np.uint64)
    repeated = keys[1:][keys[1:] == keys[:-1]]
    if not len(repeated):
        return []
    repeated = {int(k) for k in repeated}
    first, problems = {}, []
    for row in rows:
        row = binder.defaults(row)
        name = _output_name(row)
        if name is None or _key(name.casefold()) not in repeated:
            continue
        other = first.setdefault(name.casefold(), row)
        if other is not row:
            problems.append(f"{row.where}: output: {name!r} is already the output of {other.where} "
                            f"(output names must be unique)")
    return problems


def _set_values(workflow: dict, sets: dict, inventories: list) -> tuple[dict, list[str]]:
    """The ``--set`` values typed as the (first) server's node specs say."""
    values, problems = {}, []
    for key, raw in sets.items():
        if key in UPLOADED or key == "output":
            problems.append(f"--set {key}: {key} comes from each row (manifest column or folder), not from --set")
            continue
        try:
            graph.target(workflow, key)
            spec = inventories[0].spec(workflow, key) if inventories else None
            values[key] = graph.coerce(spec, raw) if spec else raw
        except ProductSceneError as e:
            problems.append(f"--set {key}: {e}")
    return values, problems


def _nonempty(path: Path) -> bool:
    """A file with something in it (a power cut can leave a renamed image empty)."""
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


def _stamp(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4096)
def _sha256_cached(path: Path, stamp) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    """sha256 of a file; a catalogue that names the same image on many rows reads it once."""
    return _sha256_cached(path, _stamp(path))


@functools.lru_cache(maxsize=4096)
def _image_problem_cached(path: Path, what: str, stamp) -> str | None:
    return _check_image(path, what)


def _image_problem(path: Path, what: str) -> str | None:
    return _image_problem_cached(path, what, _stamp(path))


def _check_image(path: Path, what: str) -> str | None:
    if not path.is_file():
        return f"{what}: file not found: {path}"
    try:
        header(path, what)
    except ProductSceneError as e:
        return str(e)
    return None


def _output_name(row: Row) -> str | None:
    """The row's output file name (a bare .png name; default: the product's name), or None."""
    name = row.output or row.product.stem + ".png"
    if "/" in name or "\\" in name or name.startswith(".") or any(ord(c) < 32 for c in name):
        return None
    if Path(name).suffix.lower() != ".png":
        if Path(name).suffix and row.output:
            return None
        name += ".png"
    return name
