"""Sampling time with Masked Category Attention against the vanilla model, in one process.

    .venv/bin/python bench/bench_gate.py [--model full|tiny] [--latent 32] [--steps 6] [--repeats 3]

Euler with CFG (so every step runs a cond+uncond batch), the same seed and conditioning for both
arms, interleaved repeats (vanilla, gated, vanilla, gated, ...), median ratio printed. With
a GPU (PRODUCTSCENE_COMFY_GPU=1) the same at 512 px: --latent 64.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests.support import comfy_env  # noqa: E402  (puts the real ComfyUI on sys.path)
from tests.support import models  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402


def build(kind: str):
    if kind == "full":
        return models.full_sd15_unet(), 768
    return models.tiny_sd15().model, 768


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["full", "tiny"], default="full")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pack = comfy_env.import_pack()
    gate_node = pack.nodes.category_attention.MaskedCategoryAttention
    model, width = build(args.model)
    torch.manual_seed(0)
    positive = [[torch.randn(1, 77, width) * 0.1, {}]]
    negative = [[torch.randn(1, 77, width) * 0.1, {}]]
    side = args.latent * 8
    mask = torch.zeros(1, side, side)
    mask[:, side // 4: 3 * side // 4, side // 3: 2 * side // 3] = 1.0
    tokens = types.SimpleNamespace(rows=(6, 7), context_rows=77, library_path="")
    gated = gate_node.execute(model, mask, tokens, 1.0, 1, 0.0).result[0]

    latent = torch.zeros(1, 4, args.latent, args.latent)
    noise = comfy.sample.prepare_noise(latent, 0)

    def run(m) -> float:
        start = time.perf_counter()
        out = comfy.sample.sample(m, noise, args.steps, 5.0, "euler", "normal", positive, negative, latent,
                                  disable_pbar=True, seed=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        return time.perf_counter() - start

    run(model), run(gated)  # warm-up: model load, caches
    vanilla_t, gated_t, ratios = [], [], []
    for _ in range(args.repeats):
        v, g = run(model), run(gated)
        vanilla_t.append(v)
        gated_t.append(g)
        ratios.append(g / v)
    device = comfy.model_management.get_torch_device()
    print(f"model={args.model} latent={args.latent}x{args.latent} steps={args.steps} cfg=5 euler device={device} "
          f"threads={torch.get_num_threads()}")
    print(f"vanilla s/run: {', '.join(f'{t:.2f}' for t in vanilla_t)}  median {statistics.median(vanilla_t):.2f}")
    print(f"gated   s/run: {', '.join(f'{t:.2f}' for t in gated_t)}  median {statistics.median(gated_t):.2f}")
    print(f"gated/vanilla ratio (median of interleaved pairs): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
