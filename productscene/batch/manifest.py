"""The rows of a batch job: a CSV manifest (every problem with its line number) or a folder."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ProductSceneError

COLUMNS = ("product", "category", "reference", "prompt", "negative_prompt", "seed", "output")
ALIASES = {"product_image": "product", "image": "product", "brand_reference": "reference",
           "reference_image": "reference", "negative": "negative_prompt", "output_name": "output"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


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
