"""How the category learning proof holds across seeds (issue 10's evidence: three seeds, the margins
of each, top-1 accuracy), on the pretrained world base, with the learning test's own configuration
(tests/test_category_learning.py: ``config()``, steps, timesteps) and evaluation.

    .venv/bin/python bench/category_learning_seeds.py [--seeds 0 1 2] [--draws 8 32] [--steps N]

For every seed: the whole category run on the train split (``train_category_library``), then
``evaluate_library`` on the held-out split with each number of noise draws per image. Prints the
margins, top-1 accuracy, the lowest per-image margin and the picks per seed, and one full ``evaluate-library`` report.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devkit import comfy_env  # noqa: E402  (ComfyUI importable, CPU, private base dir)
from devkit import world_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--draws", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--steps", type=int, default=None, help="default: the learning test's")
    ap.add_argument("--lr-tokens", type=float, default=None, help="default: the learning test's")
    ap.add_argument("--lr-lora", type=float, default=None, help="default: the learning test's")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    from productscene.train.datasets import open_dataset
    from productscene.train.evaluate import evaluate_library
    from productscene.train.recipes.categories import train_category_library
    from tests import test_category_learning as proof

    pack = comfy_env.import_pack()

    world = world_model.ensure_world(host_adapter=import_module(pack.__name__ + ".nodes.training_host"), log=print)
    host = import_module(pack.__name__ + ".nodes.training_host").ComfyTrainingHost(
        *world_model.load_world_base(world.checkpoint))
    config = proof.config()
    for name, value in (("steps", args.steps), ("lr_tokens", args.lr_tokens), ("lr_lora", args.lr_lora)):
        if value is not None:
            setattr(config, name, value)
    held = open_dataset(world.data, "bg60k", "test")
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            t0 = time.time()
            run = train_category_library(host, world.data, Path(tmp) / f"seed{seed}.safetensors", config,
                                         layout="bg60k", split="train", seed=seed, cache_dir=Path(tmp) / "cache")
            trained_s = time.time() - t0
            for draws in args.draws:
                score = evaluate_library(host, held, run.library, cache_dir=Path(tmp) / "cache", draws=draws,
                                         seed=proof.EVAL_SEED)
                if seed == args.seeds[0] and draws == args.draws[0]:
                    print(f"\nevaluate-library, seed {seed}, {draws} draws:\n{score.format()}\n")
                margins = {c: 100 * m["relative"] for c, m in score.margins().items()}
                truth = torch.tensor(score.truth)
                own = score.per_image[torch.arange(len(truth)), truth]
                others = score.per_image.clone()
                others[torch.arange(len(truth)), truth] = float("inf")
                per_image = (others.min(1).values - own) / own      # each image's own margin
                low = int(per_image.argmin())
                line = (f"seed {seed}  draws {draws:>3}  steps {config.steps}  lr {config.lr_tokens:g}/{config.lr_lora:g}  "
                        f"train {trained_s:.0f} s  "
                        f"top-1 {100 * score.top1:.1f}%  margins "
                        + " ".join(f"{c} {v:+.1f}%" for c, v in margins.items())
                        + f"  lowest per-image margin {100 * float(per_image[low]):+.1f}% ({Path(held[low].image).stem})"
                        + f"  picks {score.picks.tolist()}")
                print(line, flush=True)
                summary.append(line)
    print("\nSUMMARY\n" + "\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
