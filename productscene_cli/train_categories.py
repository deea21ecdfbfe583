"""``train-categories``: learn every category's identifier and a shared LoRA from a data set."""
from __future__ import annotations

from productscene.prompt import DEFAULT_TEMPLATE
from productscene.train.recipes.categories import CategoryConfig, train_category_library

from . import check_dataset, comfyui
from .options import checked_training_inputs, data_args, default_cache, model_args, run_args, run_options
from .progress import train_interruptibly, trained


def register(sub) -> None:
    t = sub.add_parser("train-categories", help="train a category library")
    data_args(t)
    model_args(t, "category library", required=False)
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--lr", type=float, default=5e-3, help="learning rate of the identifier vectors")
    t.add_argument("--lr-lora", type=float, default=1e-4, help="learning rate of the shared LoRA")
    t.add_argument("--rank", type=int, default=4, help="LoRA rank")
    t.add_argument("--vectors", type=int, default=1, help="vectors per identifier")
    t.add_argument("--resolution", type=int, default=512, help="training resolution (multiple of 64)")
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--template", default=DEFAULT_TEMPLATE, help="training prompt; {category} marks the identifier")
    t.add_argument("--init-word", default=None, help="init every identifier from this word (default: each name's first word)")
    t.add_argument("--check-only", action="store_true", help="only check the data set")
    t.add_argument("--license", default=None, help="licence text stored in the library")
    run_args(t, "library")
    t.set_defaults(func=run, check_args=check_args)


def check_args(args) -> str | None:
    if not args.check_only and (not args.checkpoint or not args.out):
        return "train-categories needs --checkpoint and --out (or --check-only)"
    return None


def run(args) -> int:
    if args.check_only:
        args.shallow, args.json = False, False
        return check_dataset.run(args)
    # every data problem before any model work; the run reuses this report (one deep check)
    checked = checked_training_inputs(args)
    if checked is None:
        return 1
    ckpt, dataset, report = checked
    options = run_options(args, ckpt)
    config = CategoryConfig(template=args.template, vectors_per_token=args.vectors, rank=args.rank,
                            batch_size=args.batch_size, resolution=args.resolution, steps=args.steps,
                            lr_tokens=args.lr, lr_lora=args.lr_lora, init_word=args.init_word)
    host_mod = comfyui.load_host_adapter(args.comfyui, cpu=args.cpu)
    model, clip, vae = comfyui.load_checkpoint(args.checkpoint)
    done = train_interruptibly(lambda bars, should_stop: train_category_library(
        host_mod.training_host(model, clip, vae), dataset, args.out, config, options, layout=args.layout,
        checked=report, cache_dir=args.cache_dir or default_cache(), latent_progress=bars.latent_progress,
        license=args.license, progress=bars.progress, should_stop=should_stop), ckpt, args.steps, images=len(dataset), main=options.ranks.is_main)
    if done is None:
        return 130
    if not options.ranks.is_main:  # rank 0 wrote the file and says so
        return 0
    print(f"wrote {done.library}: {len(done.recipe.categories)} categories, {trained(done.result, ckpt)}")
    return 0
