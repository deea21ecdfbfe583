"""The rows of a batch job: a CSV manifest (every problem with its line number) or a folder."""
from __future__ import annotations

import csv
import functools
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ProductSceneError

COLUMNS = ("product", "category", "reference", "prompt", "negative_prompt", "seed", "output")
ALIASES = {"product_image": "product", "image": "product", "brand_reference": "reference",
           "reference_image": "reference", "negative": "negative_prompt", "output_name": "output"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Row:
    """A row as written (the manifest's cells, or a folder's image); checking and binding it
    (productscene.batch.plan) makes new values, never changes it."""
    where: str                    # how messages name the row: "line 7" or the image's file name
    product: Path
    line: int | None = None       # manifest line (the header is line 1)
    category: str | None = None
    reference: Path | None = None
    seed: str | None = None       # text as written; coerced against the server's spec
    output: str = ""
    cells: dict = field(default_factory=dict)   # prompt fields and "<title>.<input>" columns: raw text


def _column(name: str) -> str:
    if "." in name:                       # "<node title>.<input>": kept as written
        return name.strip()
    key = "_".join(name.strip().lower().replace("-", " ").split())
    return ALIASES.get(key, key)


class ManifestRows:
    """The rows of a CSV manifest (relative paths are relative to its folder), read from the file
    each time they are iterated, so a manifest of any size is never held in memory. ``problems``:
    every problem of the file itself found by the last iteration, each with its line number."""

    def __init__(self, path):
        self.path = Path(path)
        self.problems: list[str] = []

    def __iter__(self):
        path, problems = self.path, []
        self.problems = problems
        try:
            f = open(path, encoding="utf-8-sig", newline="")
        except OSError as e:
            raise ProductSceneError(f"manifest: cannot read {path}: {e.strerror or e}") from None
        base = path.parent
        with f:
            reader = csv.reader(f)
            columns, last_line, any_row = None, 0, False
            try:
                for record in reader:
                    line, last_line = last_line + 1, reader.line_num
                    if not any(c.strip() for c in record) or record[0].lstrip().startswith("#"):
                        continue
                    if columns is None:
                        columns = [_column(c) for c in record]
                        problems += _header_problems(columns, record, line)
                        continue
                    if len(record) != len(columns):
                        problems.append(f"line {line}: {len(record)} cells, but the header has {len(columns)} columns")
                        continue
                    cells = {c: v for c, v in zip(columns, record) if c}
                    product = cells.get("product", "").strip()
                    if not product:
                        problems.append(f"line {line}: product: empty (give the product image's path)")
                        continue
                    ref = cells.get("reference", "").strip()
                    any_row = True
                    yield Row(where=f"line {line}", line=line, product=_path(base, product),
                              category=cells.get("category", "").strip() or None,
                              reference=_path(base, ref) if ref else None,
                              seed=cells.get("seed", "").strip() or None, output=cells.get("output", "").strip(),
                              cells={c: v for c, v in cells.items() if c not in _NAMED and v != ""})
            except UnicodeDecodeError:
                raise ProductSceneError(f"manifest: {path} is not UTF-8 text (save the CSV as UTF-8)") from None
        if columns is None:
            problems.append(f"line 1: the manifest is empty (expected a header: {', '.join(COLUMNS)})")
        elif not any_row and not problems:
            problems.append("the manifest has a header but no rows")


_NAMED = ("product", "category", "reference", "seed", "output")


@functools.lru_cache(maxsize=4096)
def _path(base: Path, text: str) -> Path:
    """A cell's path (relative to the manifest's folder); a catalogue names the same images often."""
    return base / Path(text).expanduser()


def _header_problems(columns: list[str], record: list[str], line: int) -> list[str]:
    problems = []
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
    return problems


def read_manifest(path) -> tuple[list[Row], list[str]]:
    """Every row of a (small) CSV manifest in a list, and every problem of the file itself."""
    source = ManifestRows(path)
    rows = list(source)
    return rows, source.problems


def folder_rows(folder) -> list[Row]:
    """One row per image in ``folder`` (not its subfolders), by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ProductSceneError(f"folder: {str(folder)!r} is not a folder")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ProductSceneError(f"folder: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return [Row(where=p.name, product=p) for p in images]
