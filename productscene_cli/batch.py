"""``batch``: run a workflow over a catalogue (CSV manifest or folder) on ComfyUI servers."""
from __future__ import annotations

import argparse
import sys
import urllib.parse
from pathlib import Path

from productscene.batch import BatchError, Options, run_batch
from productscene.errors import ProductSceneError

from .comfyui import REPO_ROOT
from .progress import bar

HELP = "run a workflow over a catalogue on one or more ComfyUI servers"
DESCRIPTION = ("Run an API-format workflow once per product: a CSV manifest or a folder in, images and a "
               "provenance record per row out (docs/batch.md).")
DEFAULT_WORKFLOW = REPO_ROOT / "workflows" / "api" / "category_background.json"


def add_arguments(j: argparse.ArgumentParser) -> None:
    j.add_argument("--server", action="append", default=[], metavar="URL",
                   help="ComfyUI server URL, e.g. http://127.0.0.1:8188; repeat to spread rows over several")
    j.add_argument("--servers-file", metavar="FILE",
                   help="a file of ComfyUI server URLs, one a line (blank lines and # comments skipped); "
                        "with or instead of --server")
    j.add_argument("--workflow", default=str(DEFAULT_WORKFLOW),
                   help="API-format workflow whose node titles follow the binding convention "
                        "(default: the bundled workflows/api/category_background.json)")
    src = j.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="CSV with columns product, category, reference, prompt, negative_prompt, "
                                        "seed, output (and '<node title>.<input>' columns)")
    src.add_argument("--folder", help="every image in this folder (not its subfolders), one category (--category)")
    j.add_argument("--out", required=True, help="output folder: images, provenance.jsonl")
    j.add_argument("--category", help="category of rows that name none (folder mode: of every image)")
    j.add_argument("--reference", help="brand reference image of rows that name none")
    j.add_argument("--seed", type=int, help="seed of rows that name none (default: the workflow's)")
    j.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="set an input of every row: a role (prompt, negative_prompt, ...) or "
                        "'<node title>.<input>', e.g. --set Checkpoint.ckpt_name=sd15.safetensors")
    j.add_argument("--concurrency", type=int, default=2, help="prompts in flight per server (default 2)")
    j.add_argument("--resume", action="store_true", help="skip the rows finished by an earlier run into --out")
    j.add_argument("--overwrite", action="store_true", help="start again in an --out that holds an earlier run")
    j.add_argument("--retries", type=int, default=3,
                   help="per row: retries of transient server errors and of prompts a server lost (default 3)")
    j.add_argument("--server-timeout", type=float, default=300.0,
                   help="seconds to wait for a server that stopped answering before giving it up (default 300)")
    j.add_argument("--row-timeout", type=float, default=3600.0,
                   help="seconds a queued prompt may take (default 3600)")
    j.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub) -> None:
    parser = sub.add_parser("batch", help=HELP, description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)


def read_servers_file(path) -> list[str]:
    """The URLs of a servers file, one a line; ProductSceneError naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProductSceneError(f"--servers-file: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    urls = []
    for n, line in enumerate(text.splitlines(), 1):
        url = line.split("#", 1)[0].strip()
        if not url:
            continue
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ProductSceneError(f"--servers-file: {path} line {n}: {url!r} is not an http:// or https:// URL")
        urls.append(url.rstrip("/"))
    if not urls:
        raise ProductSceneError(f"--servers-file: {path} lists no server URL")
    return urls


def options_from(args) -> Options:
    sets = {}
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ProductSceneError(f"--set {item!r}: expected KEY=VALUE, e.g. --set Sampler.steps=30")
        sets[key.strip()] = value
    servers = [u.rstrip("/") for u in args.server] + (read_servers_file(args.servers_file) if args.servers_file else [])
    return Options(
        workflow=Path(args.workflow), servers=servers, out=Path(args.out), sets=sets,
        category=args.category, reference=Path(args.reference) if args.reference else None,
        seed=None if args.seed is None else str(args.seed), concurrency=args.concurrency, resume=args.resume,
        overwrite=args.overwrite, retries=args.retries, server_timeout=args.server_timeout,
        row_timeout=args.row_timeout)


def run(args) -> int:
    options = options_from(args)
    shown = None

    def log(message):
        (shown.write if shown is not None else print)(message, file=sys.stderr)

    def progress(p):
        nonlocal shown
        if shown is None:
            shown = bar(p.total, "batch", unit="row", bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} "
                                                                 "rows [{elapsed}<{remaining}{postfix}]")
            if shown is None:
                return
        shown.n = p.done + p.failed + p.running
        shown.set_postfix(failed=p.failed, servers=f"{p.servers_up}/{p.servers}", refresh=False)
        shown.refresh()

    try:
        summary = run_batch(options, manifest=args.manifest, folder=args.folder,
                            progress=None if args.quiet else progress, log=log)
    except BatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if shown is not None:
            shown.close()
    print(summary.message())
    return summary.exit_code
