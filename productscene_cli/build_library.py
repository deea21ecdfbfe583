"""``build-library``: a category library from textual-inversion embedding files."""
from __future__ import annotations

from pathlib import Path

from productscene.errors import ProductSceneError
from productscene.library import TokenLibrary


def register(sub) -> None:
    b = sub.add_parser("build-library", help="build a category library from embedding files")
    b.add_argument("--from-embeddings", required=True, help="folder of <category>.safetensors TI files")
    b.add_argument("--family", choices=["sd15", "sd2", "sdxl"], required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--license", default=None)
    b.set_defaults(func=run)


def run(args) -> int:
    folder = Path(args.from_embeddings)
    if not folder.is_dir():
        raise ProductSceneError(f"from-embeddings: {str(folder)!r} is not a folder")
    files = {p.stem: str(p) for p in sorted(folder.glob("*.safetensors"))}
    if not files:
        raise ProductSceneError(f"from-embeddings: no .safetensors embedding files in {folder}")
    data = TokenLibrary.from_embedding_files(files, args.family)
    path = data.write(args.out, license=args.license)
    print(f"wrote {path}: {len(files)} categories ({args.family})")
    return 0
