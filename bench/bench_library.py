"""Time TokenLibrary.open and a single category lookup on a large library.

    python bench/bench_library.py [--categories 5000] [--family sdxl] [--n 1]

Builds a library in a temporary folder (float16 vectors plus a small LoRA), then reports the time
to open it (header only), to read one category's vectors, and the file size, against a baseline in
the same process: the same categories as one textual-inversion file per category (listing them all
and reading one, as an embeddings folder would be used).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from productscene.library import FAMILIES, TokenLibrary  # noqa: E402


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
        TokenLibrary.write(path, names, vecs, args.family, {n: "background" for n in names}, lora=lora)
        t_write = time.perf_counter() - t0
        # baseline: the same categories as one textual-inversion file each (an embeddings folder)
        folder = os.path.join(d, "embeddings")
        os.makedirs(folder)
        for i, name in enumerate(names):
            save_file({e: v[i] for e, v in vecs.items()}, os.path.join(folder, name + ".safetensors"))
        opens, looks, full = [], [], []
        for r in range(args.repeat):
            t0 = time.perf_counter()
            for name in sorted(os.listdir(folder)):  # list every category and read one of them
                with safe_open(os.path.join(folder, name), "pt") as f:
                    f.keys()
            load_file(os.path.join(folder, names[(r * 7919) % C] + ".safetensors"))
            full.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lib = TokenLibrary.open(path)
            opens.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lib.vectors(names[(r * 7919) % C])
            looks.append(time.perf_counter() - t0)
        size = os.path.getsize(path) / 2**20
    print(f"library: {C} categories, family {args.family}, n={args.n}, file {size:.1f} MiB")
    print(f"write:   {t_write * 1000:.1f} ms")
    print(f"open:    best {min(opens) * 1000:.2f} ms, worst {max(opens) * 1000:.2f} ms (header only)")
    print(f"vectors: best {min(looks) * 1000:.2f} ms, worst {max(looks) * 1000:.2f} ms (one category)")
    print(f"baseline, one TI file per category: list + read one {min(full) * 1000:.1f} ms; "
          f"library / baseline = {(min(opens) + min(looks)) / min(full):.4f}")


if __name__ == "__main__":
    main()
