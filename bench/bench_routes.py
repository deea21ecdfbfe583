"""Time the category route for a 5,000-category library on a real ComfyUI server, against
ComfyUI's own /object_info/ProductSceneCategoryTokens (the node definition, which carries the
same names in its combo), in the same process and server.

    .venv/bin/python bench/bench_routes.py [--categories 5000] [--repeats 50]

Prints the first (cold: header read, JSON encoded) and the median / worst warm times of
GET /productscene/libraries/categories?library=..., and the ratio warm median / baseline median.
The bar (issue 16): under 100 ms for 5,000 categories.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devkit import comfy_env  # noqa: E402  (the ComfyUI tree; private base dir)

import torch  # noqa: E402

from devkit.launcher import ComfyServer  # noqa: E402
from productscene.library import TokenLibrary  # noqa: E402


def timed_get(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        n = len(r.read())
    return time.perf_counter() - t0, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ps-bench-routes-") as tmp:
        lib = Path(tmp) / "bench_5000.safetensors"
        names = [f"product category {i:05d}" for i in range(args.categories)]
        TokenLibrary.write(str(lib), names, {"clip_l": torch.randn(len(names), 1, 768) * 0.01}, "sd15")
        with ComfyServer(comfy_env.COMFYUI_DIR, models={"category_libraries": [lib]}) as server:
            route = server.url + "/productscene/libraries/categories?library=" + urllib.parse.quote(lib.name)
            baseline = server.url + "/object_info/ProductSceneCategoryTokens"
            cold, size = timed_get(route)
            timed_get(baseline)
            ours, base = [], []
            for _ in range(args.repeats):  # interleaved
                ours.append(timed_get(route)[0])
                base.append(timed_get(baseline)[0])
    med, worst, bmed = statistics.median(ours), max(ours), statistics.median(base)
    print(f"categories route, {args.categories} categories ({size / 1024:.0f} KiB): first {cold * 1000:.1f} ms, "
          f"median {med * 1000:.1f} ms, worst {worst * 1000:.1f} ms of {args.repeats}")
    print(f"baseline /object_info/ProductSceneCategoryTokens: median {bmed * 1000:.1f} ms")
    print(f"ratio route / baseline (median): {med / bmed:.2f}; bar: < 100 ms -> "
          f"{'met' if max(cold, worst) < 0.1 else 'NOT met'}")


if __name__ == "__main__":
    main()
