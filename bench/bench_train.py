"""Training-step benchmark: seconds per step and peak memory of the category recipe on the engine,
against a baseline in the same process (a plain forward + backward of the same UNet with the same
LoRA, fixed context, no engine / CLIP / gate / optimizer), the two interleaved step by step.

    python bench/bench_train.py                 # tiny model + full SD1.5 UNet, 32x32 latent, CPU
    python bench/bench_train.py --model tiny    # only the tiny model
    PRODUCTSCENE_COMFY_GPU=1 python bench/bench_train.py --latent 64   # on a GPU: SD1.5 at 512 px

CPU peak memory is the process's peak resident set (ru_maxrss); on CUDA torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devkit import comfy_env  # noqa: E402,F401  (ComfyUI importable, CPU unless PRODUCTSCENE_COMFY_GPU=1)

import torch  # noqa: E402


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name, model, clip, latent: int, steps: int, warmup: int, rank: int, batch: int):
    pack = comfy_env.import_pack()
    th = pack.nodes.training_host
    from productscene.train import engine
    from productscene.train.recipes import categories as cats

    host = th.ComfyTrainingHost(model, clip, None)
    g = torch.Generator().manual_seed(0)
    n = 8
    latents = torch.randn(n, 4, latent, latent, generator=g)
    masks = torch.zeros(n, latent, latent)
    masks[:, latent // 4: latent // 2, latent // 4: latent // 2] = 1
    labels = ["a", "b", "c", "a", "b", "c", "a", "b"]
    shape = (batch, 4, latent, latent)
    out = {}
    with engine.training_mode():
        cfg = cats.CategoryConfig(template="a product photo on a {category} background", batch_size=batch,
                                  steps=warmup + steps, rank=rank, resolution=64)
        recipe = cats.CategoryRecipe(host, cats.MemorySource(latents, masks, labels), ["a", "b", "c"], cfg, seed=0)
        trainer = engine.Trainer(recipe, cfg.phases(), seed=0, device=host.device)
        with host.session(lora=recipe.lora, latent_shape=shape):
            device = host.device
            ctx = torch.randn(batch, 77, 768, generator=g).to(device)
            x = torch.randn(*shape, generator=g).to(device)
            sigma = torch.full((batch,), 1.0, device=device)

            def baseline_step():  # the same UNet and LoRA, fixed context: no engine, CLIP, gate or optimizer
                y = host.base.apply_model(x, sigma, c_crossattn=ctx)
                y.float().pow(2).mean().backward()
                for p in recipe.lora.parameters():
                    p.grad = None

            times = {"baseline": [], "engine": []}
            reset_peak(device)
            for i in range(warmup + steps):  # interleaved, so load on a shared machine hits both alike
                for arm, step in (("baseline", baseline_step), ("engine", trainer.train_step)):
                    sync(device)
                    t0 = time.perf_counter()
                    step()
                    sync(device)
                    if i >= warmup:
                        times[arm].append(time.perf_counter() - t0)
            out["peak_mb"] = peak_mb(device)
    out["baseline_s"] = statistics.median(times["baseline"])
    out["engine_s"] = statistics.median(times["engine"])
    out["ratio"] = statistics.median(e / b for e, b in zip(times["engine"], times["baseline"]))
    out["device"] = str(host.device)
    print(f"{name:>14} latent {latent}x{latent} batch {batch} rank {rank} on {out['device']}: "
          f"engine {out['engine_s']:.3f} s/step, baseline fwd+bwd {out['baseline_s']:.3f} s/step (medians), "
          f"engine/baseline {out['ratio']:.2f}x (median of interleaved pairs), peak {out['peak_mb']:.0f} MB",
          flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "full", "both"], default="both")
    ap.add_argument("--latent", type=int, default=32, help="latent size (32 = 256 px, 64 = 512 px)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from devkit.models import full_sd15_unet, tiny_sd15
    tm = tiny_sd15()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    if args.model in ("tiny", "both"):
        bench("tiny SD1.5", tm.model, tm.clip, args.latent, max(args.steps, 10), 2, args.rank, args.batch)
    if args.model in ("full", "both"):
        bench("full SD1.5", full_sd15_unet(), tm.clip, args.latent, args.steps, args.warmup, args.rank, args.batch)


if __name__ == "__main__":
    main()
