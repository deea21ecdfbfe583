"""Options several commands share, and what the data-set trainers check before any model work."""
from __future__ import annotations

import os
import sys

from productscene.errors import ProductSceneError
from productscene.train import distributed
from productscene.train.datasets import check, open_dataset
from productscene.train.run import RunOptions, check_outputs

from .model_files import check_model_checkpoint


def default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "productscene", "latents")


def data_args(sp):
    sp.add_argument("--data", required=True, help="data set folder")
    sp.add_argument("--layout", choices=["folder", "bg60k"], default="folder", help="data set layout")
    sp.add_argument("--split", choices=["train", "test"], default="train", help="BG60k split (bg60k / bg1k)")


def host_args(sp):
    sp.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH or <repo>/.venv/comfyui)")
    sp.add_argument("--cpu", action="store_true", help="run on the CPU")


def run_args(sp, out, data=True):
    """Training state, precision and host options; ``out``: what --out holds; ``data``: a data-set
    run (--cache-dir)."""
    sp.add_argument("--resume", nargs="?", const=True, default=False,
                    help="continue from the training checkpoint (default path, or the one given)")
    sp.add_argument("--overwrite", action="store_true",
                    help=f"replace an existing {out} at --out (and its training state); without it they are kept")
    sp.add_argument("--state", default=None, help="training checkpoint path (default: OUT.checkpoint.safetensors)")
    sp.add_argument("--checkpoint-every", type=int, default=100)
    if data:
        sp.add_argument("--cache-dir", default=None, help="latent cache folder (default ~/.cache/productscene/latents)")
    sp.add_argument("--autocast", choices=["auto", "off", "bf16", "fp16"], default="auto")
    sp.add_argument("--gradient-checkpointing", action="store_true")
    sp.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S, metavar="SECONDS",
                    help="under torchrun: a rank that waits this long for the others stops with an error "
                         "(a lost or hung rank)")
    host_args(sp)


def model_args(sp, out, required=True):
    sp.add_argument("--checkpoint", required=required, help="model checkpoint (.safetensors) with UNet, CLIP and VAE")
    sp.add_argument("--out", required=required, help=f"{out} to write (.safetensors)")


def run_options(args, ckpt: str, resume=None) -> RunOptions:
    """A training command's shared run options (made, so checked, before any model loads); the run
    adds its progress bars and Ctrl-C as keywords. Under ``torchrun`` this joins the process group
    (before the model loads: it picks this rank's GPU) and says so on rank 0."""
    world = distributed.init(cpu=getattr(args, "cpu", False), timeout_s=getattr(args, "dist_timeout", None))
    if world.distributed and args.command not in DISTRIBUTED:
        raise ProductSceneError(f"{args.command}: runs in one process; start it without torchrun "
                                f"(or with --nproc-per-node 1)")
    if world.distributed and world.is_main:
        batch = getattr(args, "batch_size", None)
        print(f"training on {world.describe()}: batch {batch} per rank, {batch * world.size} per step"
              if batch else f"training on {world.describe()}", file=sys.stderr, flush=True)
    return RunOptions(seed=args.seed, checkpoint_path=ckpt, checkpoint_every=args.checkpoint_every,
                      resume=args.resume if resume is None else resume, overwrite=args.overwrite,
                      autocast=args.autocast, gradient_checkpoint=args.gradient_checkpointing, world=world)


DISTRIBUTED = ("train-categories", "train-personality", "train-concepts")  # the commands that run on several ranks


def checked_training_inputs(args):
    """What a data-set training command checks before any model work: the model checkpoint, the
    outputs (``--out`` and the training state) and every file of the data set. Returns
    ``(training state path, data set, report)``, or None when the data set has problems (each one
    printed). A job torchrun restarted (``--max-restarts``) resumes by itself."""
    if distributed.restarted() and not args.resume:
        args.resume = True
    check_model_checkpoint(args.checkpoint)
    ckpt = args.state or (os.path.splitext(args.out)[0] + ".checkpoint.safetensors")
    if distributed.restarted() and distributed.env_world()[0] == 0:
        print(f"torchrun restarted this job: {resuming(ckpt)}", file=sys.stderr, flush=True)
    check_outputs(args.out, ckpt, resume=args.resume, overwrite=args.overwrite, out="--out",
                  hint="pass --overwrite, choose another --out, or --resume its training")
    dataset = open_dataset(args.data, args.layout, args.split)
    report = check(dataset)
    if not report.ok:
        print(report.message(limit=None), file=sys.stderr)
        return None
    return ckpt, dataset, report


def resuming(ckpt: str) -> str:
    """What a restarted job continues from."""
    from productscene.train.engine import read_checkpoint_info
    try:
        info = read_checkpoint_info(ckpt)
    except (ProductSceneError, OSError):
        return "no training state yet, starting afresh"
    return f"resuming from step {info['step']} of {info['total_steps']} in {ckpt}"
