"""``evaluate-library``: score a category library on held-out images."""
from __future__ import annotations

import json
import os

from productscene.errors import ProductSceneError
from productscene.train.datasets import open_dataset
from productscene.train.evaluate import evaluate_library

from . import comfyui
from .options import data_args, default_cache, host_args
from .progress import advance, bar


def register(sub) -> None:
    e = sub.add_parser("evaluate-library", help="score a category library on held-out images",
                       description="The held-out denoising loss of every image under every category's "
                                   "identifier (shared noise and timesteps): a confusion matrix (true category x "
                                   "identifier used), top-1 accuracy and each category's margin.")
    data_args(e)
    e.add_argument("--checkpoint", required=True, help="the base checkpoint the library was trained on")
    e.add_argument("--library", required=True, help="category library (.safetensors)")
    e.add_argument("--draws", type=int, default=4, help="noise draws per image (default 4)")
    e.add_argument("--seed", type=int, default=0, help="seed of the shared noise and timesteps")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--min-timestep", type=int, default=None, help="default: the library's training range")
    e.add_argument("--max-timestep", type=int, default=None, help="exclusive; default: the library's training range")
    e.add_argument("--resolution", type=int, default=None, help="default: the library's training resolution")
    e.add_argument("--cache-dir", default=None, help="latent cache folder (default ~/.cache/productscene/latents)")
    e.add_argument("--json", action="store_true", help="print the numbers as JSON")
    host_args(e)
    e.set_defaults(func=run)


def run(args) -> int:
    for what, path in (("checkpoint", args.checkpoint), ("library", args.library)):
        if not os.path.isfile(path):
            raise ProductSceneError(f"{what}: {path!r} not found")
    dataset = open_dataset(args.data, args.layout, args.split)
    host_mod = comfyui.load_host_adapter(args.comfyui, cpu=args.cpu)
    model, clip, vae = comfyui.load_checkpoint(args.checkpoint)
    latents = bar(len(dataset), "latents")
    batches = bar(None, "evaluating", unit="batch")
    try:
        score = evaluate_library(host_mod.training_host(model, clip, vae), dataset, args.library,
                                 cache_dir=args.cache_dir or default_cache(), draws=args.draws, seed=args.seed,
                                 batch_size=args.batch_size, min_timestep=args.min_timestep,
                                 max_timestep=args.max_timestep, resolution=args.resolution,
                                 progress=advance(batches), latent_progress=advance(latents))
    finally:
        for b in (latents, batches):
            if b is not None:
                b.close()
    print(json.dumps(score.to_json(), indent=1) if args.json else score.format())
    return 0
