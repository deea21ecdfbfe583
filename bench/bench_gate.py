"""Sampling time with Masked Category Attention against the vanilla model, in one process.

    .venv/bin/python bench/bench_gate.py [--family sd15|sd2|sdxl] [--model full|layout|tiny] [--latent 32]
                                         [--steps 6] [--repeats 3]

Euler with CFG (so every step runs a cond+uncond batch), the same seed and conditioning for every
arm, interleaved repeats (vanilla, category-free-context gate, identifier-rows-only gate (the
previous gate, devkit/identifier_gate.py), vanilla, ...), median ratios printed. The
conditioning comes from the real Category Tokens node (tiny CLIP of the family's real widths; on SDXL
with its pooled output, so the model's ``y`` is what a user's run gives it). ``--model full`` is the
real UNet of the family (SD1.5 860M, SDXL 2.6B parameters), ``layout`` the real block layout (all 70
cross-attention layers of SDXL) at ``--channels`` instead of 320. Also prints the extra
text-encoder pass Category Tokens makes once per prompt (the category-free context), timed on a
full-size CLIP-L (12 layers, random weights). With a GPU (PRODUCTSCENE_COMFY_GPU=1) the same at
512 px: --latent 64.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from devkit import comfy_env  # noqa: E402  (puts the real ComfyUI on sys.path)
from devkit import models  # noqa: E402
from devkit.identifier_gate import install_identifier_rows_gate  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import folder_paths  # noqa: E402

TEMPLATE = "a product photo on a {category} background, professional studio lighting"


def category_prompt(clip, pack, family: str = "sd15"):
    from productscene.library import FAMILIES, TokenLibrary
    folder = folder_paths.get_folder_paths("category_libraries")[0]
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    TokenLibrary.write(os.path.join(folder, "bench.safetensors"), ["perfume", "tools"],
                          {e: torch.randn(2, 1, w, generator=g) * 0.02 for e, w in FAMILIES[family].items()}, family)
    folder_paths.filename_list_cache.pop("category_libraries", None)
    return pack.nodes.category_tokens.ProductSceneCategoryTokens.execute(clip, "bench.safetensors", "perfume",
                                                                          TEMPLATE).result


def text_encoder_seconds(repeats: int = 5) -> float:
    """One extra pass of a full-size CLIP-L over the category-free prompt (median)."""
    from productscene.prompt import category_free_template
    clip = models.build_clip("sd15", layers=12)
    tokens = clip.tokenize(category_free_template(TEMPLATE))
    clip.encode_from_tokens(tokens)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        clip.encode_from_tokens(tokens)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sampling_setup(doc: str):
    """The arguments both sampling benchmarks take, and what they share: (args, pack, tiny models,
    the UNet to time, positive, negative, Category Tokens' output, a product mask)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(models.FAMILIES), default="sd15")
    parser.add_argument("--model", choices=["full", "layout", "tiny"], default="full")
    parser.add_argument("--channels", type=int, default=128, help="model_channels of --model layout")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pack = comfy_env.import_pack()
    tiny = models.tiny(args.family)
    model = {"full": lambda: models.full_layout_unet(args.family, 320) if args.family != "sd15" else models.full_sd15_unet(),
             "layout": lambda: models.full_layout_unet(args.family, args.channels),
             "tiny": lambda: tiny.model}[args.model]()
    positive, tokens = category_prompt(tiny.clip, pack, args.family)
    negative = models.encode(tiny, "blurry, low quality")
    side = args.latent * 8
    mask = torch.zeros(1, side, side)
    mask[:, side // 4: 3 * side // 4, side // 3: 2 * side // 3] = 1.0
    return args, pack, tiny, model, positive, negative, tokens, mask


def time_arms(arms: dict, baseline: str, args, positive, negative):
    """Sample every arm once (warm-up: model load, caches; its outputs are returned), then
    ``args.repeats`` interleaved rounds; prints s/run and each arm's median ratio of interleaved pairs
    against ``baseline``. Returns ({arm: [seconds]}, {arm: warm-up samples})."""
    latent = torch.zeros(1, 4, args.latent, args.latent)
    noise = comfy.sample.prepare_noise(latent, 0)

    def run(m):
        start = time.perf_counter()
        out = comfy.sample.sample(m, noise, args.steps, 5.0, "euler", "normal", positive, negative, latent,
                                  disable_pbar=True, seed=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        return time.perf_counter() - start, out

    outputs = {name: run(m)[1] for name, m in arms.items()}
    times = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, m in arms.items():
            times[name].append(run(m)[0])
    device = comfy.model_management.get_torch_device()
    print(f"family={args.family} model={args.model} latent={args.latent}x{args.latent} steps={args.steps} cfg=5 euler device={device} "
          f"threads={torch.get_num_threads()}")
    width = max(len(name) for name in arms)
    for name, ts in times.items():
        print(f"{name:>{width}} s/run: {', '.join(f'{t:.3f}' for t in ts)}  median {statistics.median(ts):.3f}")
    for name in arms:
        if name != baseline:
            ratio = statistics.median(g / v for g, v in zip(times[name], times[baseline]))
            print(f"{name} / {baseline} (median of interleaved pairs): {ratio:.3f}")
    return times, outputs


def main() -> None:
    args, pack, tiny, model, positive, negative, tokens, mask = sampling_setup(__doc__)
    gate_node = pack.nodes.category_attention.MaskedCategoryAttention
    arms = {
        "vanilla": model,
        "new gate": gate_node.execute(model, mask, tokens, 1.0, 1, 0.0).result[0],
        "old gate": install_identifier_rows_gate(model, mask, tokens.rows, pack.nodes.host.cross_attention_keys(model),
                                                 grow_latent_px=1),
    }

    times, _ = time_arms(arms, "vanilla", args, positive, negative)
    te = text_encoder_seconds()
    print(f"extra text-encoder pass per prompt (category-free context, full-size CLIP-L): {te * 1000:.1f} ms "
          f"= {te / statistics.median(times['vanilla']):.4f} of one vanilla run")


if __name__ == "__main__":
    main()
