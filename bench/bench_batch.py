"""Batch client overhead and scaling on real ComfyUI servers on loopback, in one process.

    .venv/bin/python bench/bench_batch.py [--rows 40] [--size 64] [--steps 2] [--concurrency 2]

Two ComfyUI servers with the embedded default model (random-weight SD1.5 architecture,
devkit/default_model.py), one torch thread each. After one warm-up row per server (model load):

1. overhead: one server, ``--concurrency`` prompts in flight. Batch wall time (the whole
   ``run_batch`` call: checks, uploads, queueing, downloads, writes) divided by the sum of the
   server's own execution times (``execution_start`` -> ``execution_success`` of each prompt's
   history entry). 1.00 would mean the server never waited for the client. Bar: <= 1.05.
   For comparison: the same with one prompt in flight, and without the batch client, every prompt
   queued at once (the floor: the gaps left are ComfyUI's own work between two prompts).
2. scaling: the same rows on both servers; rows per minute against one server.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from devkit import default_model  # noqa: E402
from productscene.batch import Options, read_provenance, run_batch  # noqa: E402
from productscene.batch.records import PROVENANCE_NAME  # noqa: E402
from devkit.launcher import ComfyServer  # noqa: E402

CATEGORIES = ("perfume", "tea", "tools", "cosmetics")
WORKFLOW = ROOT / "workflows" / "api" / "category_background.json"


def make_catalogue(folder: Path, n: int, size: int, tag: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["product,category,seed,output"]
    for i in range(n):
        rng = np.random.default_rng(i)
        rgba = np.zeros((size, size, 4), np.uint8)
        rgba[..., :3] = rng.integers(0, 256, 3)
        rgba[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = [*rng.integers(0, 256, 3), 255]
        Image.fromarray(rgba, "RGBA").save(folder / f"{tag}{i:03d}.png")
        lines.append(f"{tag}{i:03d}.png,{CATEGORIES[i % 4]},{i},{tag}{i:03d}")
    (folder / f"{tag}.csv").write_text("\n".join(lines) + "\n")
    return folder / f"{tag}.csv"


def job(work: Path, servers, tag: str, rows: int, size: int, steps: int, concurrency: int):
    manifest = make_catalogue(work / "data", rows, size, tag)
    out = work / f"out-{tag}"
    options = Options(workflow=WORKFLOW, servers=[s.url for s in servers], out=out, concurrency=concurrency,
                      sets={"Sampler.steps": str(steps)})
    t0, c0 = time.perf_counter(), time.time()
    summary = run_batch(options, manifest=manifest)
    wall, c1 = time.perf_counter() - t0, time.time()
    if summary.exit_code:
        raise SystemExit(summary.message())
    records = read_provenance(out / PROVENANCE_NAME)
    busy = {s.url: sum(r["timings"]["execution_s"] for r in records if r["server"] == s.url) for s in servers}
    # where the rest went (one server): before the first prompt ran, between prompts, after the last
    spans = sorted((r["timings"]["server_start_ms"] / 1000, r["timings"]["server_end_ms"] / 1000) for r in records)
    parts = {"head": spans[0][0] - c0, "gaps": sum(max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:])),
             "tail": c1 - spans[-1][1]}
    return wall, busy, len(records), parts


def floor(work: Path, server, rows: int, size: int, steps: int) -> tuple[float, float, dict]:
    """The same rows without the batch client: upload everything, queue everything at once, poll
    only the last prompt. What is left between prompts is ComfyUI's own work."""
    import json
    from productscene import graph
    from productscene.client import ComfyClient
    manifest = make_catalogue(work / "data", rows, size, "floor-")
    client = ComfyClient(server.url)
    base = json.loads(WORKFLOW.read_text())
    prompts = []
    for line in manifest.read_text().splitlines()[1:]:
        name, category, seed, output = line.split(",")
        up = client.upload_image(manifest.parent / name, subfolder="floor")
        prompts.append(graph.bind(base, {"product": f"floor/{up['name']}", "category": category, "seed": int(seed),
                                         "output": f"floor/{output}", "Sampler.steps": steps}))
    ids = [client.queue(p) for p in prompts]
    client.wait(ids[-1], timeout=3600, poll=1.0)
    spans = sorted(ComfyClient.execution_span(client.history(i)) for i in ids)
    busy = sum(b - a for a, b in spans) / 1000
    gaps = sum(max(0, b[0] - a[1]) for a, b in zip(spans, spans[1:])) / 1000
    return (spans[-1][1] - spans[0][0]) / 1000, busy, {"gaps": gaps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--size", type=int, default=64, help="product image side in px (multiple of 16)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    args = parser.parse_args()

    ckpt, lib = default_model.ensure_defaults()
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    servers = [ComfyServer(default_model.COMFYUI_DIR, models={"checkpoints": [ckpt], "category_libraries": [lib]},
                           env=threads) for _ in range(2)]
    work = Path(tempfile.mkdtemp(prefix="productscene-bench-batch-"))
    try:
        starters = [threading.Thread(target=s.start) for s in servers]
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        for i, s in enumerate(servers):          # model load, outside every measurement
            job(work, [s], f"warm{i}-", 1, args.size, args.steps, 1)

        print(f"{args.rows} rows, {args.size} px, {args.steps} steps, default model, CPU, {args.threads} torch "
              f"thread(s) per server")
        one = servers[:1]
        wall, busy, n, parts = job(work, one, "one-", args.rows, args.size, args.steps, args.concurrency)
        ratio = wall / busy[one[0].url]
        where = ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
        print(f"one server, concurrency {args.concurrency}: wall {wall:.2f} s, server execution {busy[one[0].url]:.2f} s, "
              f"client overhead = wall / execution = {ratio:.3f} (bar <= 1.05); {60 * n / wall:.1f} rows/min")
        print(f"  the server not executing: {where}")
        wall1, busy1, _, parts1 = job(work, one, "serial-", args.rows, args.size, args.steps, 1)
        where = ", ".join(f"{k} {v:.2f} s" for k, v in parts1.items())
        print(f"one server, concurrency 1 (for comparison): wall {wall1:.2f} s, server execution "
              f"{busy1[one[0].url]:.2f} s, ratio {wall1 / busy1[one[0].url]:.3f}; not executing: {where}")
        span0, busy0, parts0 = floor(work, one[0], args.rows, args.size, args.steps)
        print(f"one server, no batch client, every prompt queued at once (ComfyUI's own floor): first start to "
              f"last end {span0:.2f} s, server execution {busy0:.2f} s, ratio {span0 / busy0:.3f}; "
              f"gaps {parts0['gaps']:.2f} s")
        wall2, busy2, n2, _ = job(work, servers, "two-", args.rows, args.size, args.steps, args.concurrency)
        split = ", ".join(f"{v:.1f} s" for v in busy2.values())
        print(f"two servers, concurrency {args.concurrency}: wall {wall2:.2f} s (server execution {split}); "
              f"{60 * n2 / wall2:.1f} rows/min = {wall / wall2:.2f}x one server")
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
