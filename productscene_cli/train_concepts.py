"""``train-concepts``: Break-A-Scene, concept tokens (+ LoRA) from one image and its masks."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from productscene.errors import ProductSceneError
from productscene.images import alpha, as_tensor, luminance, open_image, rgb
from productscene.train import distributed
from productscene.train.recipes.concepts import (ConceptConfig, check_concept_outputs, concept_names, prepare_scene,
                                                 train_concepts)

from . import comfyui
from .model_files import check_model_checkpoint
from .options import model_args, run_args, run_options
from .progress import train_interruptibly, trained


def register(sub) -> None:
    k = sub.add_parser("train-concepts", help="Break-A-Scene: concept tokens (+ LoRA) from one image and its masks")
    model_args(k, "concept-token file")
    k.add_argument("--image", required=True, help="the image holding the concepts")
    k.add_argument("--mask", action="append", required=True,
                   help="mask image of one concept (white, or alpha = the concept); repeat, up to 8")
    k.add_argument("--names", default="", help="comma-separated concept names, one per mask (default concept1, ...)")
    k.add_argument("--init-words", default="", help="comma-separated init words (one per mask, or one for all)")
    k.add_argument("--background", action="store_true", help="learn the background as one more concept")
    k.add_argument("--phase1-steps", type=int, default=400)
    k.add_argument("--phase2-steps", type=int, default=400)
    k.add_argument("--lr-phase1", type=float, default=5e-4)
    k.add_argument("--lr-phase2", type=float, default=None,
                   help="phase 2's learning rate (default: follows --unet, 1e-4 for the LoRA, the published "
                        "2e-6 for the full UNet)")
    k.add_argument("--unet", choices=["lora", "full"], default="lora", help="what phase 2 trains beside the tokens")
    k.add_argument("--rank", type=int, default=4, help="LoRA rank")
    k.add_argument("--resolution", type=int, default=512, help="longer side (0 = keep); sides must be multiples of 64")
    k.add_argument("--batch-size", type=int, default=1)
    k.add_argument("--attention-weight", type=float, default=0.01)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--class-images", default=None, metavar="DIR",
                   help="prior preservation: a folder of images of the concepts' class made by the same model")
    k.add_argument("--class-prompt", default=None,
                   help="the prompt the class images were made with (default 'a photo of an object'; "
                        "only with --class-images)")
    k.add_argument("--prior-weight", type=float, default=None,
                   help="weight of the prior-preservation loss (default 1.0; only with --class-images)")
    k.add_argument("--lora", default=None, help="LoRA file (default OUT.lora.safetensors)")
    k.add_argument("--embeddings-dir", default=None, help="folder of the per-token textual-inversion files (default: OUT's)")
    k.add_argument("--history", default=None, help="loss history JSON (default OUT.loss.json)")
    run_args(k, "concept-token file (with its LoRA and textual-inversion files)", data=False)
    k.set_defaults(func=run)


def read_scene(image_path, mask_paths):
    """``(IMAGE [1,H,W,3], MASK [N,h,w])`` from an image file and mask files (white = the concept;
    a mask with alpha uses its alpha)."""
    if not mask_paths:
        raise ProductSceneError("mask: give at least one --mask file (white = the concept)")
    image = as_tensor(rgb(open_image(image_path, "image")))[None]
    masks = []
    size = None
    for p in mask_paths:
        m = open_image(p, "mask")
        if size is not None and m.size != size:
            raise ProductSceneError(f"mask: {str(p)!r} is {m.size[0]}x{m.size[1]}, the other masks {size[0]}x{size[1]}; "
                                    "give every mask at one size")
        size = m.size
        a = alpha(m)
        masks.append(as_tensor(a if a is not None else luminance(m)))
    return image, torch.stack(masks)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_class_images(folder, size: tuple[int, int]) -> torch.Tensor:
    """Every image in ``folder`` (not its subfolders), RGB, resized to ``size`` (w, h): ``[P, H, W, 3]``."""
    root = os.fspath(folder)
    if not os.path.isdir(root):
        raise ProductSceneError(f"--class-images: {root!r} is not a folder")
    names = sorted(n for n in os.listdir(root) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise ProductSceneError(f"--class-images: no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    images = [rgb(open_image(os.path.join(root, n), "--class-images").resize(size, Image.BICUBIC)) for n in names]
    return as_tensor(np.stack(images))


def prior_options(args, size: tuple[int, int]) -> dict:
    """The prior-preservation settings of the command line, checked: ``{}`` without class images."""
    if args.class_images is None:
        for option, value in (("--class-prompt", args.class_prompt), ("--prior-weight", args.prior_weight)):
            if value is not None:
                raise ProductSceneError(f"{option}: prior preservation needs --class-images DIR as well")
        return {}
    weight = 1.0 if args.prior_weight is None else float(args.prior_weight)
    if not weight > 0:
        raise ProductSceneError(f"--prior-weight: expected a number above 0 with --class-images, got {weight:g}")
    prompt = "a photo of an object" if args.class_prompt is None else args.class_prompt.strip()
    if not prompt:
        raise ProductSceneError("--class-prompt: expected the prompt the class images were made with")
    return {"class_images": read_class_images(args.class_images, size), "prior_weight": weight, "class_prompt": prompt}


def run(args) -> int:
    if distributed.restarted() and not args.resume:  # torchrun restarted the job: it resumes by itself
        args.resume = True
    check_model_checkpoint(args.checkpoint)
    image, masks = read_scene(args.image, args.mask)
    prior = prior_options(args, (image.shape[2], image.shape[1]))
    split = lambda text: tuple(w.strip() for w in text.split(",")) if text else ()  # noqa: E731
    config = ConceptConfig(names=split(args.names), init_words=split(args.init_words), background=args.background,
                           phase1_steps=args.phase1_steps, phase2_steps=args.phase2_steps, lr_phase1=args.lr_phase1,
                           lr_phase2=args.lr_phase2, unet=args.unet, rank=args.rank, resolution=args.resolution,
                           batch_size=args.batch_size, attention_weight=args.attention_weight,
                           **{k: v for k, v in prior.items() if k != "class_images"})
    prepare_scene(image, masks, config.resolution, config.background)  # every mask problem before loading a model
    stem = os.path.splitext(args.out)[0]
    ckpt = args.state or stem + ".checkpoint.safetensors"
    options = run_options(args, ckpt, resume=args.resume if isinstance(args.resume, str) else bool(args.resume))
    files = dict(lora_path=args.lora or stem + (".unet.diff" if args.unet == "full" else ".lora") + ".safetensors",
                 embeddings_dir=args.embeddings_dir or os.path.dirname(os.path.abspath(args.out)))
    # every file the run writes, before a model loads
    check_concept_outputs(args.out, concept_names(len(masks), config.names, config.background), out="--out",
                          shown=os.fspath, hint="pass --overwrite, choose another --out, or --resume its training",
                          checkpoint_path=ckpt, resume=options.resume, overwrite=options.overwrite, **files)
    host_mod = comfyui.load_host_adapter(args.comfyui, cpu=args.cpu)
    model, clip, vae = comfyui.load_checkpoint(args.checkpoint)
    done = train_interruptibly(lambda bars, should_stop: train_concepts(
        host_mod.ComfyTrainingHost(model, clip, vae), image, masks, args.out, config, options,
        history_path=args.history or stem + ".loss.json", class_images=prior.get("class_images"),
        progress=bars.progress, should_stop=should_stop, **files), ckpt, config.phase1_steps + config.phase2_steps,
        main=options.ranks.is_main)
    if done is None:
        return 130
    if not options.ranks.is_main:  # rank 0 wrote the files and says so
        return 0
    print(f"wrote {done.tokens}: {', '.join(done.recipe.names)}; LoRA {done.lora}; embeddings "
          f"{', '.join(os.path.basename(p) for p in done.embeddings.values())}; {trained(done.result, ckpt)}")
    return 0
