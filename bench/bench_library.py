"""Time CategoryLibrary.open and a single category lookup on a large library.

    python bench/bench_library.py [--categories 5000] [--family sdxl] [--n 1]

Builds a library in a temporary folder (float16 vectors plus a small LoRA), then reports the time
to open it (header only), to read one category's vectors, and the file size.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from productscene.library import FAMILIES, CategoryLibrary  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--categories", type=int, default=5000)
    ap.add_argument("--family", default="sdxl", choices=sorted(FAMILIES))
    ap.add_argument("--n", type=int, default=1, help="vectors per token")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    C = args.categories
    names = [f"category_{i:06d}" for i in range(C)]
    vecs = {e: torch.randn(C, args.n, w).half() for e, w in FAMILIES[args.family].items()}
    lora = {f"diffusion_model.block{i}.attn2.to_k.lora_up.weight": torch.zeros(640, 16) for i in range(16)}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench_library.safetensors")
        t0 = time.perf_counter()
        CategoryLibrary.write(path, names, vecs, args.family, {n: "background" for n in names}, lora=lora)
        t_write = time.perf_counter() - t0
        opens, looks = [], []
        for r in range(args.repeat):
            t0 = time.perf_counter()
            lib = CategoryLibrary.open(path)
            opens.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lib.vectors(names[(r * 7919) % C])
            looks.append(time.perf_counter() - t0)
        size = os.path.getsize(path) / 2**20
    print(f"library: {C} categories, family {args.family}, n={args.n}, file {size:.1f} MiB")
    print(f"write:   {t_write * 1000:.1f} ms")
    print(f"open:    best {min(opens) * 1000:.2f} ms, worst {max(opens) * 1000:.2f} ms (header only)")
    print(f"vectors: best {min(looks) * 1000:.2f} ms, worst {max(looks) * 1000:.2f} ms (one category)")


if __name__ == "__main__":
    main()
