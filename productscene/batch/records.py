"""The files a batch job keeps in its output folder: the provenance file (one JSON record per
finished row, docs/formats.md) and the journal (prompts queued, rows failed) that --resume reads."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ProductSceneError

PROVENANCE_FORMAT = "productscene.batch_provenance"
PROVENANCE_VERSION = 1
PROVENANCE_NAME = "provenance.jsonl"
JOURNAL_NAME = ".productscene-batch-journal.jsonl"


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


def read_journal(path: Path) -> dict:
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


class LineFile:
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
