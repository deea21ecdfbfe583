"""Command line: ``python -m productscene <command> ...``.

Commands
  train-categories  train a category library from a data set (BG60k or folder layout)
  train-personality train a personality adapter (the style a reference image carries) from a data set
  train-concepts    Break-A-Scene: learn several concept tokens (+ LoRA) from one image and its masks
  evaluate-library  score a category library on held-out images (confusion matrix, top-1 accuracy)
  check-dataset     check a data set and list every problem (nothing is written)
  build-library     build a category library from textual-inversion embedding files
  batch             run a workflow over a catalogue (CSV manifest or folder) on ComfyUI servers

The core never imports ComfyUI. The training commands find a ComfyUI tree (``--comfyui``, env
``COMFYUI_PATH``, default ``<repo>/.venv/comfyui``) and import this repository as a ComfyUI pack
(``load_pack``), so the node and the command line run the same code on the same core.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import sys
import types
from pathlib import Path

from .errors import ProductSceneError
from .prompt import DEFAULT_TEMPLATE

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "productscene_pack"


# ------------------------------------------------------------------------------ host loading
def find_comfyui(path: str | None = None) -> Path:
    candidates = [path, os.environ.get("COMFYUI_PATH"), str(REPO_ROOT / ".venv" / "comfyui")]
    for c in candidates:
        if not c:
            continue
        p = Path(c).expanduser().resolve()
        if (p / "comfy").is_dir() and (p / "comfy" / "model_management.py").is_file():
            return p
        if c is path or c == os.environ.get("COMFYUI_PATH"):
            raise ProductSceneError(f"comfyui: {c!r} is not a ComfyUI folder (no comfy/model_management.py)")
    raise ProductSceneError(
        "comfyui: no ComfyUI found; pass --comfyui PATH or set COMFYUI_PATH to a ComfyUI checkout")


def _standalone() -> types.ModuleType:
    """``nodes/standalone.py``, loaded by path: ComfyUI's bootstrap lives on the adapter side and
    must run before the pack (which imports ComfyUI) can be imported."""
    module = sys.modules.get(PACK_NAME + "_standalone")
    if module is None:
        spec = importlib.util.spec_from_file_location(PACK_NAME + "_standalone", REPO_ROOT / "nodes" / "standalone.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[spec.name] = module
    return module


def load_pack(comfyui: str | None = None, cpu: bool = False) -> types.ModuleType:
    """Import ComfyUI from ``comfyui``, then this repository as a ComfyUI pack (the way ComfyUI's
    loader does). The pack binds its core to the ``productscene`` already imported here, so the
    command line and the nodes share one core."""
    standalone = _standalone()
    standalone.configure(str(find_comfyui(comfyui)), cpu=cpu)
    return import_repo_as_pack(PACK_NAME)


def import_repo_as_pack(name: str) -> types.ModuleType:
    """This repository imported as a package called ``name``, the way ComfyUI's loader imports a
    custom-node folder (ComfyUI must be importable already). Imported once per name."""
    pack = sys.modules.get(name)
    if pack is None:
        spec = importlib.util.spec_from_file_location(
            name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[name] = pack
        try:
            spec.loader.exec_module(pack)
        except BaseException:
            del sys.modules[name]
            raise
    return pack


def load_host_adapter(comfyui: str | None = None, cpu: bool = False) -> types.ModuleType:
    """The pack's ComfyUI training adapter (``nodes/training_host.py``: the host only; the run
    itself is the core's), with ComfyUI loaded."""
    return importlib.import_module(load_pack(comfyui, cpu).__name__ + ".nodes.training_host")


# ------------------------------------------------------------------------------ commands
def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "productscene", "latents")


def cmd_check_dataset(args) -> int:
    from .train.datasets import check, open_dataset
    ds = open_dataset(args.data, args.layout, args.split)
    bar = _bar(len(ds), "checking")
    report = check(ds, deep=not args.shallow, progress=(lambda i, n: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.message(limit=None))
    return 0 if report.ok else 1


def _bar(total, desc, **options):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    options.setdefault("unit", "step" if desc == "training" else "img")
    return tqdm(total=total, desc=desc, dynamic_ncols=True,
                disable=not sys.stderr.isatty() and os.environ.get("PRODUCTSCENE_PROGRESS") != "1", **options)


def _advance(bar):
    """A ``(done, total)`` callback that moves ``bar`` (None: no bar)."""
    def update(done, total):
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()
    return update


class _TrainingBars:
    """The bars of a training command: ``latents`` (images encoded; only when ``images`` is given)
    and ``training`` (steps, with the loss)."""

    def __init__(self, steps: int, images: int | None = None):
        self.latents = _bar(images, "latents") if images is not None else None
        self.training = _bar(steps, "training")
        self.latent_progress = _advance(self.latents)

    def progress(self, step, total, loss):
        if self.training:
            self.training.n = step
            self.training.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.training.refresh()

    def close(self):
        for b in (self.latents, self.training):
            if b:
                b.close()


def _train_interruptibly(train, ckpt: str, steps: int, images: int | None = None):
    """Run ``train(bars, should_stop)`` (a core training run; ``bars``: its :class:`_TrainingBars`)
    under Ctrl-C: the first Ctrl-C asks the run to stop after its step (``should_stop``), a second
    stops inside it; either way the engine keeps the last completed step in ``ckpt``. Returns the
    run, or None when it was cancelled (said on stderr; Ctrl-C then stays ignored while the process
    winds down)."""
    bars = _TrainingBars(steps, images)
    stop = []

    def on_sigint(signum, frame):
        if stop:  # a second Ctrl-C: stop inside the step (the engine keeps the last completed one)
            raise KeyboardInterrupt
        stop.append(True)
        print("\nstopping after this step (Ctrl-C again to stop at once) ...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        run = train(bars, lambda: bool(stop))
    except KeyboardInterrupt:
        run = None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the cancel path below is not cut short
        bars.close()
    if run is None or run.cancelled:
        print("\ncancelled; " + _saved_state(ckpt), file=sys.stderr)
        return None
    signal.signal(signal.SIGINT, previous)
    return run


def _trained(result, ckpt: str) -> str:
    """The end of a training command's last line: steps, loss, time and the training state."""
    h = result.history
    loss = f"loss {h[0]:.4f} -> {sum(h[-20:]) / len(h[-20:]):.4f}" if h else "no loss recorded"
    return f"{result.steps_done} steps, {loss} in {result.seconds:.1f} s; checkpoint {ckpt}"


def _checked_training_inputs(args):
    """What a data-set training command checks before any model work: the model checkpoint, the
    outputs (``--out`` and the training state) and every file of the data set. Returns
    ``(training state path, data set, report)``, or None when the data set has problems (each one
    printed)."""
    from .train.datasets import check, open_dataset
    from .train.recipes.categories import check_outputs
    check_model_checkpoint(args.checkpoint)
    ckpt = args.state or (os.path.splitext(args.out)[0] + ".checkpoint.safetensors")
    check_outputs(args.out, ckpt, resume=args.resume, overwrite=args.overwrite, out="--out",
                  hint="pass --overwrite, choose another --out, or --resume its training")
    dataset = open_dataset(args.data, args.layout, args.split)
    report = check(dataset)
    if not report.ok:
        print(report.message(limit=None), file=sys.stderr)
        return None
    return ckpt, dataset, report


def cmd_train_categories(args) -> int:
    from .train.recipes.categories import CategoryConfig, train_category_library
    if args.check_only:
        args.shallow, args.json = False, False
        return cmd_check_dataset(args)
    # every data problem before any model work; the run reuses this report (one deep check)
    checked = _checked_training_inputs(args)
    if checked is None:
        return 1
    ckpt, dataset, report = checked
    config = CategoryConfig(template=args.template, vectors_per_token=args.vectors, rank=args.rank,
                            batch_size=args.batch_size, resolution=args.resolution, steps=args.steps,
                            lr_tokens=args.lr, lr_lora=args.lr_lora, init_word=args.init_word)
    host_mod = load_host_adapter(args.comfyui, cpu=args.cpu)
    model, clip, vae = _standalone().load_checkpoint(args.checkpoint, error=ProductSceneError)
    run = _train_interruptibly(lambda bars, should_stop: train_category_library(
        host_mod.ComfyTrainingHost(model, clip, vae), dataset, args.out, config, layout=args.layout,
        checked=report, seed=args.seed, cache_dir=args.cache_dir or _default_cache(), checkpoint_path=ckpt,
        checkpoint_every=args.checkpoint_every, resume=args.resume, autocast=args.autocast,
        progress=bars.progress, latent_progress=bars.latent_progress, license=args.license,
        gradient_checkpoint=args.gradient_checkpointing, should_stop=should_stop,
        overwrite=args.overwrite), ckpt, args.steps, images=len(dataset))
    if run is None:
        return 130
    print(f"wrote {run.library}: {len(run.recipe.categories)} categories, {_trained(run.result, ckpt)}")
    return 0


def check_clip_vision(path: str) -> None:
    """The CLIP vision file is a safetensors file of an image encoder (read by its header only), not
    a diffusion model or one of ProductScene's own files."""
    _check_weights_file(path, "clip-vision", ("vision_model.", "visual.", "encoder.layer."),
                        ("a CLIP vision model", "CLIP vision"),
                        "give --clip-vision a CLIP vision model (.safetensors) that ComfyUI's CLIPVisionLoader takes")


def cmd_train_personality(args) -> int:
    """Learn a personality adapter self-supervised from a data set (each image's own augmented
    background is its reference): the command-line twin of the Train Personality Adapter node, on
    the same core run. Only the adapter trains; the model and both encoders stay frozen."""
    from .train.recipes.personality import PersonalityConfig, train_personality_adapter
    check_clip_vision(args.clip_vision)
    config = PersonalityConfig(tokens=args.tokens, prompt=args.prompt, batch_size=args.batch_size,
                               resolution=args.resolution, steps=args.steps, lr=args.lr)
    checked = _checked_training_inputs(args)  # every data problem before any model work
    if checked is None:
        return 1
    ckpt, dataset, report = checked
    pack = load_pack(args.comfyui, cpu=args.cpu)
    host_mod = importlib.import_module(pack.__name__ + ".nodes.training_host")
    node = importlib.import_module(pack.__name__ + ".nodes.train_personality")
    layers_of = importlib.import_module(pack.__name__ + ".nodes.host").cross_attention_layers
    model, clip, vae = _standalone().load_checkpoint(args.checkpoint, error=ProductSceneError)
    clip_vision = _standalone().load_clip_vision(args.clip_vision, error=ProductSceneError)
    host = host_mod.ComfyTrainingHost(model, clip, vae)
    run = _train_interruptibly(lambda bars, should_stop: train_personality_adapter(
        host, dataset, args.out, config, encode_vision=node.vision_encoder(clip_vision),
        vision_width=node.vision_width(clip_vision), layers=layers_of(host.model), layout=args.layout,
        split=args.split, checked=report, seed=args.seed, cache_dir=args.cache_dir or _default_cache(),
        checkpoint_path=ckpt, checkpoint_every=args.checkpoint_every, resume=args.resume, autocast=args.autocast,
        progress=bars.progress, latent_progress=bars.latent_progress, should_stop=should_stop,
        overwrite=args.overwrite, license=args.license, gradient_checkpoint=args.gradient_checkpointing),
        ckpt, args.steps, images=len(dataset))
    if run is None:
        return 130
    print(f"wrote {run.adapter}: {config.tokens} reference tokens for {host.family}, {_trained(run.result, ckpt)}")
    return 0


def _read_image(path, what: str):
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError) as e:
        raise ProductSceneError(f"{what}: could not read {str(path)!r} as an image ({e})") from None


def read_scene(image_path, mask_paths):
    """``(IMAGE [1,H,W,3], MASK [N,h,w])`` from an image file and mask files (white = the concept;
    a mask with alpha uses its alpha)."""
    import numpy as np
    import torch
    if not mask_paths:
        raise ProductSceneError("mask: give at least one --mask file (white = the concept)")
    img = _read_image(image_path, "image").convert("RGB")
    image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
    masks = []
    size = None
    for p in mask_paths:
        m = _read_image(p, "mask")
        m = m.getchannel("A") if m.mode in ("RGBA", "LA") else m.convert("L")
        if size is not None and m.size != size:
            raise ProductSceneError(f"mask: {str(p)!r} is {m.size[0]}x{m.size[1]}, the other masks {size[0]}x{size[1]}; "
                                    "give every mask at one size")
        size = m.size
        masks.append(torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0))
    return image, torch.stack(masks)


def cmd_train_concepts(args) -> int:
    from .train.recipes.concepts import ConceptConfig, check_concept_outputs, concept_names, prepare_scene, train_concepts
    check_model_checkpoint(args.checkpoint)
    image, masks = read_scene(args.image, args.mask)
    split = lambda text: tuple(w.strip() for w in text.split(",")) if text else ()  # noqa: E731
    config = ConceptConfig(names=split(args.names), init_words=split(args.init_words), background=args.background,
                           phase1_steps=args.phase1_steps, phase2_steps=args.phase2_steps, lr_phase1=args.lr_phase1,
                           lr_phase2=args.lr_phase2, unet=args.unet, rank=args.rank, resolution=args.resolution,
                           batch_size=args.batch_size, attention_weight=args.attention_weight)
    prepare_scene(image, masks, config.resolution, config.background)  # every mask problem before loading a model
    stem = os.path.splitext(args.out)[0]
    ckpt = args.state or stem + ".checkpoint.safetensors"
    resume = args.resume if isinstance(args.resume, str) else bool(args.resume)
    outputs = dict(lora_path=args.lora or stem + (".unet.diff" if args.unet == "full" else ".lora") + ".safetensors",
                   embeddings_dir=args.embeddings_dir or os.path.dirname(os.path.abspath(args.out)),
                   checkpoint_path=ckpt, resume=resume, overwrite=args.overwrite)
    # every file the run writes, before a model loads
    check_concept_outputs(args.out, concept_names(len(masks), config.names, config.background), out="--out",
                          shown=os.fspath, hint="pass --overwrite, choose another --out, or --resume its training",
                          **outputs)
    host_mod = load_host_adapter(args.comfyui, cpu=args.cpu)
    model, clip, vae = _standalone().load_checkpoint(args.checkpoint, error=ProductSceneError)
    run = _train_interruptibly(lambda bars, should_stop: train_concepts(
        host_mod.ComfyTrainingHost(model, clip, vae), image, masks, args.out, config,
        history_path=args.history or stem + ".loss.json", seed=args.seed, checkpoint_every=args.checkpoint_every,
        autocast=args.autocast, progress=bars.progress, should_stop=should_stop,
        gradient_checkpoint=args.gradient_checkpointing, **outputs), ckpt, config.phase1_steps + config.phase2_steps)
    if run is None:
        return 130
    print(f"wrote {run.tokens}: {', '.join(run.recipe.names)}; LoRA {run.lora}; embeddings "
          f"{', '.join(os.path.basename(p) for p in run.embeddings.values())}; {_trained(run.result, ckpt)}")
    return 0


def cmd_evaluate_library(args) -> int:
    from .train.datasets import open_dataset
    from .train.evaluate import evaluate_library
    for what, path in (("checkpoint", args.checkpoint), ("library", args.library)):
        if not os.path.isfile(path):
            raise ProductSceneError(f"{what}: {path!r} not found")
    dataset = open_dataset(args.data, args.layout, args.split)
    host_mod = load_host_adapter(args.comfyui, cpu=args.cpu)
    model, clip, vae = _standalone().load_checkpoint(args.checkpoint, error=ProductSceneError)
    latents = _bar(len(dataset), "latents")
    bar = _bar(None, "evaluating", unit="batch")
    try:
        score = evaluate_library(host_mod.ComfyTrainingHost(model, clip, vae), dataset, args.library,
                                 cache_dir=args.cache_dir or _default_cache(), draws=args.draws, seed=args.seed,
                                 batch_size=args.batch_size, min_timestep=args.min_timestep,
                                 max_timestep=args.max_timestep, resolution=args.resolution,
                                 progress=_advance(bar), latent_progress=_advance(latents))
    finally:
        for b in (latents, bar):
            if b is not None:
                b.close()
    print(json.dumps(score.to_json(), indent=1) if args.json else score.format())
    return 0


def _saved_state(ckpt: str) -> str:
    from .train.engine import read_checkpoint_info
    try:
        info = read_checkpoint_info(ckpt)
    except (ProductSceneError, OSError):
        return "training had not begun, nothing to resume (the latents encoded so far stay cached)"
    return (f"step {info['step']} of {info['total_steps']} (the last completed step) is saved in {ckpt}; "
            f"continue with --resume")


def check_model_checkpoint(path: str) -> None:
    """The model checkpoint is a safetensors file of a model, not one of ProductScene's own files."""
    _check_weights_file(path, "checkpoint", ("model.diffusion_model.", "diffusion_model."), ("a model", "diffusion model"),
                        "give --checkpoint a full Stable Diffusion checkpoint (UNet, CLIP and VAE) to train for")


def _check_weights_file(path: str, name: str, prefixes: tuple[str, ...], wanted: tuple[str, str], hint: str) -> None:
    """``path`` is a safetensors file whose header (no tensor is read) names weights that start with
    one of ``prefixes``. Errors begin with ``name``; ``wanted``: (what the file should be, whose
    weights it should hold), e.g. ("a model", "diffusion model"); ``hint`` ends them."""
    from .files import FORMAT_KEY, read_header
    if not os.path.isfile(path):
        raise ProductSceneError(f"{name}: {path!r} not found")
    try:
        meta, index = read_header(path)
    except ProductSceneError as e:
        raise ProductSceneError(f"{name}: {e}") from None
    if any(k.startswith(prefixes) for k in index):
        return
    kind = meta.get(FORMAT_KEY)
    what = f"is a ProductScene {kind.replace('_', ' ')}, not {wanted[0]}" if kind else f"holds no {wanted[1]} weights"
    raise ProductSceneError(f"{name}: {os.path.basename(path)} {what}; {hint}")


def cmd_build_library(args) -> int:
    from .library import CategoryLibrary
    folder = Path(args.from_embeddings)
    if not folder.is_dir():
        raise ProductSceneError(f"from-embeddings: {str(folder)!r} is not a folder")
    files = {p.stem: str(p) for p in sorted(folder.glob("*.safetensors"))}
    if not files:
        raise ProductSceneError(f"from-embeddings: no .safetensors embedding files in {folder}")
    data = CategoryLibrary.from_embedding_files(files, args.family)
    path = data.write(args.out, license=args.license)
    print(f"wrote {path}: {len(files)} categories ({args.family})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m productscene", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def data_args(sp):
        sp.add_argument("--data", required=True, help="data set folder")
        sp.add_argument("--layout", choices=["folder", "bg60k"], default="folder", help="data set layout")
        sp.add_argument("--split", choices=["train", "test"], default="train", help="BG60k split (bg60k / bg1k)")

    c = sub.add_parser("check-dataset", help="check a data set; list every problem")
    data_args(c)
    c.add_argument("--shallow", action="store_true", help="read headers only (no empty-mask test)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=cmd_check_dataset)

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
        host_args(sp)

    def model_args(sp, out, required=True):
        sp.add_argument("--checkpoint", required=required, help="model checkpoint (.safetensors) with UNet, CLIP and VAE")
        sp.add_argument("--out", required=required, help=f"{out} to write (.safetensors)")

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
    t.set_defaults(func=cmd_train_categories)

    r = sub.add_parser("train-personality", help="train a personality adapter (a brand's style from reference images)",
                       description=cmd_train_personality.__doc__)
    data_args(r)
    model_args(r, "personality adapter")
    r.add_argument("--clip-vision", required=True,
                   help="CLIP vision model (.safetensors) the references are encoded with; use the same one in "
                        "Personality Reference")
    r.add_argument("--tokens", type=int, default=16, help="reference tokens per image")
    r.add_argument("--prompt", default="a product photo",
                   help="the one training prompt; name no style, the reference is what should carry it")
    r.add_argument("--steps", type=int, default=1000)
    r.add_argument("--lr", type=float, default=1e-4, help="learning rate of the adapter")
    r.add_argument("--resolution", type=int, default=512, help="training resolution (multiple of 64)")
    r.add_argument("--batch-size", type=int, default=2)
    r.add_argument("--seed", type=int, default=0, help="seed of data order, augmentation, noise and timesteps")
    r.add_argument("--license", default=None, help="licence text stored in the adapter (BG60k's own by default "
                                                   "with --layout bg60k)")
    run_args(r, "adapter")
    r.set_defaults(func=cmd_train_personality)

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
    k.add_argument("--lr-phase2", type=float, default=2e-6)
    k.add_argument("--unet", choices=["lora", "full"], default="lora", help="what phase 2 trains beside the tokens")
    k.add_argument("--rank", type=int, default=4, help="LoRA rank")
    k.add_argument("--resolution", type=int, default=512, help="longer side (0 = keep); sides must be multiples of 64")
    k.add_argument("--batch-size", type=int, default=1)
    k.add_argument("--attention-weight", type=float, default=0.01)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--lora", default=None, help="LoRA file (default OUT.lora.safetensors)")
    k.add_argument("--embeddings-dir", default=None, help="folder of the per-token textual-inversion files (default: OUT's)")
    k.add_argument("--history", default=None, help="loss history JSON (default OUT.loss.json)")
    run_args(k, "concept-token file (with its LoRA and textual-inversion files)", data=False)
    k.set_defaults(func=cmd_train_concepts)

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
    e.set_defaults(func=cmd_evaluate_library)

    b = sub.add_parser("build-library", help="build a category library from embedding files")
    b.add_argument("--from-embeddings", required=True, help="folder of <category>.safetensors TI files")
    b.add_argument("--family", choices=["sd15", "sd2", "sdxl"], required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--license", default=None)
    b.set_defaults(func=cmd_build_library)

    from .batch import command as batch_command
    j = sub.add_parser("batch", help=batch_command.HELP, description=batch_command.DESCRIPTION)
    batch_command.add_arguments(j)
    j.set_defaults(func=batch_command.run)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train-categories" and not args.check_only and (not args.checkpoint or not args.out):
        parser.error("train-categories needs --checkpoint and --out (or --check-only)")
    try:
        return int(args.func(args) or 0)
    except ProductSceneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
