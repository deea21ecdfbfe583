"""Checking a whole batch job before anything is uploaded or queued: the workflow's bindings, every
row's files and values against what each server offers, and what an earlier run already did."""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .. import graph
from ..client import ComfyClient
from ..errors import ProductSceneError
from ..images import header
from .manifest import Row
from .records import JOURNAL_NAME, PROVENANCE_NAME, read_journal, read_provenance

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


@dataclass
class Plan:
    options: Options
    workflow: dict                # the API graph with the --set values bound
    workflow_sha256: str          # of the workflow file's graph as written
    rows: list[Row]
    todo: list[Row]               # rows to run (all of them, or the unfinished ones on --resume)
    adopt: dict                   # output name -> (server, prompt id) queued by an earlier run
    client_id: str
    notes: list[str] = field(default_factory=list)


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


def plan(options: Options, rows: list[Row], source: str) -> Plan:
    """Check the whole job against the workflow and every server; BatchError with every problem
    (each row's with its line) before anything is uploaded or queued."""
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
    for r in rows:
        r.category = r.category or o.category
        r.seed = r.seed or o.seed
        r.reference = r.reference or o.reference

    problems += _check_bindings(workflow, rows, o)
    set_values, set_problems = _set_values(workflow, o.sets, inventories)
    problems += set_problems
    try:
        bound = graph.bind(workflow, set_values)
    except ProductSceneError as e:
        raise BatchError(source, problems + [str(e)]) from None
    if inventories:
        problems += _check_against_servers(bound, rows, inventories, o.workflow.name)
    problems += _check_files(rows)
    if problems:
        raise BatchError(source, problems)

    for r in rows:
        r.sha256["product"] = _sha256_file(r.product)
        if r.reference is not None:
            r.sha256["reference"] = _sha256_file(r.reference)
        r.fingerprint = hashlib.sha256(json.dumps(
            {"workflow": graph.workflow_hash(bound), "inputs": r.sha256, "values": r.values},
            sort_keys=True, default=str).encode()).hexdigest()
    todo, adopt, client_id, notes = _left_to_do(rows, o, source)
    return Plan(options=o, workflow=bound, workflow_sha256=graph.workflow_hash(workflow), rows=rows, todo=todo,
                adopt=adopt, client_id=client_id or uuid.uuid4().hex, notes=notes)


def _check_bindings(workflow: dict, rows: list[Row], o: Options) -> list[str]:
    """The workflow has a node (by the binding convention) for everything the rows give."""
    problems = []
    for role in ("product", "output"):
        try:
            graph.target(workflow, role)
        except ProductSceneError as e:
            problems.append(f"{e} (see docs/batch.md: the binding convention)")
    has = {role: graph.has_role(workflow, role) for role in graph.ROLES}
    name, title = o.workflow.name, {role: repr(r.title) for role, r in graph.ROLES.items()}
    refs = [r for r in rows if r.reference is not None]
    if refs and not has["reference"]:
        problems.append(f"{_lines(refs)}: a brand reference is given, but workflow {name} has no node titled "
                        f"{title['reference']} to take it (use a workflow with a brand reference input, e.g. "
                        f"PersonalityReference, or leave the reference column empty)")
    if has["reference"] and len(refs) < len(rows):
        problems.append(f"{_lines([r for r in rows if r.reference is None])}: no brand reference, but workflow "
                        f"{name} needs one (its node titled {title['reference']}); fill the reference column "
                        f"or pass --reference FILE")
    if has["category"]:
        missing = [r for r in rows if not r.category]
        if missing:
            problems.append(f"{_lines(missing)}: category: empty (fill the category column or pass --category)")
    elif any(r.category for r in rows):
        problems.append(f"workflow {name}: no node titled {title['category']} to take the rows' categories")
    if any(r.seed for r in rows) and not has["seed"]:
        problems.append(f"workflow {name}: no node titled {title['seed']} to take the seed")
    for key in sorted({k for r in rows for k in r.cells}):
        try:
            graph.target(workflow, key)
        except ProductSceneError as e:
            problems.append(f"column {key!r}: {e}")
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


def _check_against_servers(bound: dict, rows: list[Row], inventories: list, name: str) -> list[str]:
    """Every value the workflow and the rows bind, as each server's node specs (and, for categories,
    the chosen library) accept it. Fills ``row.values`` with the typed values."""
    problems = []
    row_keys = {k for r in rows for k in r.cells}
    row_keys |= {"category"} if any(r.category for r in rows) and graph.has_role(bound, "category") else set()
    row_keys |= {"seed"} if any(r.seed for r in rows) and graph.has_role(bound, "seed") else set()
    skip = set()
    for key in row_keys | set(UPLOADED) | {"output"}:
        try:
            skip.add(graph.target(bound, key))
        except ProductSceneError:
            pass
    categories = {}
    for inv in inventories:
        problems += [f"server {inv.url}: workflow {name}: {p}" for p in graph.check_prompt(bound, inv.info, skip=skip)]
        if "category" in row_keys:
            categories[inv.url] = inv.categories(bound)
    for r in rows:
        raw_values = {**r.cells, **({"category": r.category} if "category" in row_keys else {}),
                      **({"seed": r.seed} if r.seed and "seed" in row_keys else {})}
        r.values = {}
        for key, raw in raw_values.items():
            for inv in inventories:
                try:
                    spec = inv.spec(bound, key)
                except ProductSceneError:        # no such input: reported once, by _check_bindings
                    break
                try:
                    value = graph.coerce(spec, raw) if spec else raw
                except ProductSceneError as e:
                    problems.append(f"{r.where}: {key}: {e}")
                    break
                r.values[key] = value
                if key == "category":
                    offered, origin = categories[inv.url]
                    why = (None if offered is None or value in offered else
                           f"{value!r} is not in {origin} (it has: {graph.shorten(sorted(offered))})")
                else:
                    why = graph.check_value(spec, value) if spec else None
                if why:
                    problems.append(f"{r.where}: {key}: {why} (server {inv.url})")
                    break
    return problems


def _check_files(rows: list[Row]) -> list[str]:
    """Product and reference images readable; output names plain, unique .png names."""
    problems, outputs = [], {}
    for r in rows:
        for what, path in (("product", r.product), ("reference", r.reference)):
            why = _check_image(path, what) if path is not None else None
            if why:
                problems.append(f"{r.where}: {why}")
        name = _output_name(r)
        if name is None:
            problems.append(f"{r.where}: output: {r.output!r} is not a plain .png file name")
            continue
        r.output = name
        other = outputs.setdefault(name.casefold(), r)
        if other is not r:
            problems.append(f"{r.where}: output: {name!r} is already the output of {other.where} "
                            f"(output names must be unique)")
    return problems


def _left_to_do(rows: list[Row], o: Options, source: str):
    """(rows to run, prompts to collect from an earlier run, client id to reuse, notes)."""
    out = Path(o.out)
    records = read_provenance(out / PROVENANCE_NAME)
    if not (o.resume or o.overwrite):
        if records:
            raise BatchError(source, [f"out: {out} already holds {len(records)} finished rows of a batch "
                                      f"({PROVENANCE_NAME}); pass --resume to run only the unfinished rows, "
                                      f"--overwrite to start again, or choose another --out"])
        clash = [r for r in rows if (out / r.output).exists()]
        if clash:
            raise BatchError(source, [f"{r.where}: output: {out / r.output} already exists (pass --overwrite "
                                      f"to replace it, or choose another --out)" for r in clash])
    if not o.resume:
        return rows, {}, None, []
    journal = read_journal(out / JOURNAL_NAME)
    finished = {rec.get("output"): rec for rec in records}
    todo, adopt, changed = [], {}, 0
    for r in rows:
        rec = finished.get(r.output)
        if rec is not None and rec.get("fingerprint") == r.fingerprint and (out / r.output).is_file():
            continue
        changed += rec is not None
        todo.append(r)
        queued = journal["queued"].get(r.output)
        if queued and queued.get("fingerprint") == r.fingerprint and queued.get("server") in o.servers:
            adopt[r.output] = (queued["server"], queued["prompt_id"])
    note = f"resume: {len(rows) - len(todo)} of {len(rows)} rows already done"
    if changed:
        note += f"; {changed} finished rows changed since (inputs or workflow) and run again"
    if adopt:
        note += f"; {len(adopt)} prompts queued by the earlier run are collected, not queued again"
    return todo, adopt, journal["client_id"], [note]


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


def _lines(rows: list[Row]) -> str:
    """``line 4`` / ``lines 4, 9, 12`` / ``a.png, b.png`` (at most 20 named)."""
    more = f" and {len(rows) - 20} more" if len(rows) > 20 else ""
    if len(rows) > 1 and all(r.line is not None for r in rows):
        return "lines " + ", ".join(str(r.line) for r in rows[:20]) + more
    return ", ".join(r.where for r in rows[:20]) + more
