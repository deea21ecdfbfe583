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


def _lines(path: Path):
    """The complete lines of a JSON-lines file, parsed, with their numbers: a last line cut short by
    a killed run (no newline) is left out."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.endswith(b"\n") or not raw.strip():
                continue
            try:
                yield n, json.loads(raw)
            except ValueError:
                continue


def iter_provenance(path):
    """The records of a provenance file, one at a time."""
    path = Path(path)
    if not path.is_file():
        return
    for n, rec in _lines(path):
        if isinstance(rec, dict) and rec.get("format") == PROVENANCE_FORMAT:
            if int(rec.get("format_version", 0)) > PROVENANCE_VERSION:
                raise ProductSceneError(f"{path}: line {n} is provenance format version {rec['format_version']}, "
                                        f"newer than this ProductScene reads ({PROVENANCE_VERSION})")
            yield rec


def read_provenance(path) -> list[dict]:
    """The records of a provenance file; a last line cut short by a killed run is ignored."""
    return list(iter_provenance(path))


def iter_journal(path):
    """The events of a journal (``start``, ``queued``, ``failed``), one at a time."""
    path = Path(path)
    if path.is_file():
        for _, event in _lines(path):
            if isinstance(event, dict):
                yield event


class LineFile:
    """An append-only JSON-lines file. Each line goes to the file in one ``write`` call on a file
    opened for appending, so a client killed at any moment (kill -9) leaves whole lines, at most the
    last one cut short (when the system itself stops mid-write); that one is cut off when the file
    is opened again, so appends start on a fresh line."""

    def __init__(self, path: Path, truncate: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not truncate:
            with open(path, "rb+") as f:
                _cut_partial_line(f)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        self.fd = os.open(path, flags, 0o644)

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _cut_partial_line(f) -> None:
    """Truncate a file (open "rb+") after its last newline."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return
    keep = 0
    while end > 0:
        start = max(0, end - 65536)
        f.seek(start)
        cut = f.read(end - start).rfind(b"\n")
        if cut >= 0:
            keep = start + cut + 1
            break
        end = start
    f.truncate(keep)
