"""Step throughput of the category trainer on 2 ranks (torchrun, gloo, CPU) against 1 process, one
thread per rank, the same batch per rank; and the communication share of a 2-rank step (the one
all-reduce per step: gradients of identifiers + LoRA, loss, stop flag; it includes waiting for the
slower rank). The two are interleaved round by round in this one driver process.

    python bench/bench_train_ranks.py                         # default SD1.5-shaped model, 64 px, CPU
    python bench/bench_train_ranks.py --rounds 3 --steps 8 --resolution 128

Throughput = images per second = ranks x batch / seconds per step; the ratio printed is 2-rank
throughput over 1-rank throughput (2.0 is perfect scaling; the bar on a 2-core machine is 1.6).
Each run is a fresh process (or pair) that loads the model through ComfyUI's loader and trains
``--warmup`` steps untimed, then ``--steps`` timed ones on latents held in memory (no VAE, no disk).

On N GPUs of one machine (a lent device), the worker alone, one rank per GPU (NCCL):

    torchrun --standalone --nproc-per-node N bench/bench_train_ranks.py --worker --gpu --resolution 512
    python bench/bench_train_ranks.py --worker --gpu --resolution 512     # the 1-GPU baseline
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(args) -> None:
    import torch
    torch.set_num_threads(1)
    from productscene.train import distributed
    world = distributed.init(cpu=not args.gpu)
    from productscene_cli import comfyui
    from devkit import default_model
    from productscene.train import engine
    from productscene.train.recipes.categories import CategoryConfig, CategoryRecipe, MemorySource

    checkpoint = str(args.checkpoint or default_model.ensure_defaults(log=lambda *_: None)[0])
    host_mod = comfyui.load_host_adapter(None, cpu=not args.gpu)
    model, clip, vae = comfyui.load_checkpoint(checkpoint)
    host = host_mod.ComfyTrainingHost(model, clip, vae)
    latent = args.resolution // 8
    g = torch.Generator().manual_seed(0)
    n = 16
    masks = torch.zeros(n, latent, latent)
    masks[:, latent // 4: 3 * latent // 4, latent // 4: 3 * latent // 4] = 1
    source = MemorySource(torch.randn(n, 4, latent, latent, generator=g), masks, ["a", "b", "c", "d"] * 4)
    total = args.warmup + args.steps
    config = CategoryConfig(batch_size=args.batch, resolution=args.resolution, steps=total, rank=4)
    times, comm = [], []
    with engine.training_mode():
        recipe = CategoryRecipe(host, source, ["a", "b", "c", "d"], config)
        with host.session(lora=recipe.lora, latent_shape=(args.batch, 4, latent, latent)):
            trainer = engine.Trainer(recipe, config.phases(), device=host.device, autocast="off", world=world)
            for _ in range(total):
                world.agree(False)  # every rank starts the timed step together
                c0, t0 = world.comm_seconds, time.perf_counter()
                trainer.train_step()
                if host.device.type == "cuda":
                    torch.cuda.synchronize(host.device)
                times.append(time.perf_counter() - t0)
                comm.append(world.comm_seconds - c0)
    times, comm = times[args.warmup:], comm[args.warmup:]
    if world.is_main:
        step = statistics.median(times)
        print("RESULT " + json.dumps({"ranks": world.size, "batch": args.batch, "step_s": step,
                                      "comm_share": statistics.median(comm) / step,
                                      "images_per_s": world.size * args.batch / step}), flush=True)


def run_one(args, ranks: int) -> dict:
    flags = ["--worker", "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--resolution", str(args.resolution)] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    script = [str(Path(__file__).resolve())]
    if ranks == 1:
        command = [sys.executable] + script + flags
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] \
            + script + flags
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{ranks}-rank run failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help="train and report (run by the driver, or under torchrun)")
    p.add_argument("--gpu", action="store_true", help="worker: one GPU per rank (NCCL)")
    p.add_argument("--checkpoint", default=None, help="model checkpoint (default: the demo's SD1.5-shaped one)")
    p.add_argument("--batch", type=int, default=2, help="batch per rank")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="1-rank and 2-rank runs, interleaved")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"bench_train_ranks: category recipe, batch {args.batch} per rank, {args.resolution} px, "
          f"{args.steps} timed steps per run, {args.rounds} rounds, CPU, 1 thread per rank, "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    ratios, shares = [], []
    for r in range(args.rounds):
        one = run_one(args, 1)
        two = run_one(args, 2)
        ratio = two["images_per_s"] / one["images_per_s"]
        ratios.append(ratio)
        shares.append(two["comm_share"])
        print(f"round {r + 1}: 1 rank {one['step_s']:.3f} s/step ({one['images_per_s']:.2f} img/s); "
              f"2 ranks {two['step_s']:.3f} s/step ({two['images_per_s']:.2f} img/s); "
              f"throughput x{ratio:.2f}; communication {100 * two['comm_share']:.1f}% of a 2-rank step")
    print(f"2 ranks / 1 rank throughput: x{statistics.median(ratios):.2f} (median of {len(ratios)}; bar x1.6); "
          f"communication share of a 2-rank step: {100 * statistics.median(shares):.1f}%; "
          f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
