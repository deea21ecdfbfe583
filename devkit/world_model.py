"""Build and cache the small world (``devkit.world``) and its PRETRAINED base model.

The world base is the model every learning test starts from, as a real user starts from a
pretrained checkpoint. It is an SD1.5-family checkpoint that ComfyUI's ``CheckpointLoaderSimple``
detects as SD15 and loads as MODEL, CLIP and VAE:

- UNet: ComfyUI's own SD1.5 UNet class, ``model_channels`` 320 (what SD1.5 detection requires),
  ONE level (``channel_mult`` [1]), one res block, transformer depth 1 (about 26M parameters),
  PRETRAINED here on the world's train split with category-agnostic prompts (:data:`PROMPTS`) by the
  project's training engine (``devkit.denoising``) until its generic denoising
  loss has levelled off (the held-out loss curve is in the file's metadata);
- text encoder: CLIP-L's shape (12 layers, so the standard loader takes it), seeded random weights,
  of which only the first :data:`CLIP_LAYERS` layers compute anything: the others have zero output
  projections, so each is exactly the identity. Loading with ``clip_l_model_config.num_hidden_layers``
  = :data:`CLIP_LAYERS` (:func:`load_world_base`, ComfyUI's own loader with a text-encoder option)
  gives the same encodings six times faster; the text encoder is not trained;
- VAE: ComfyUI's TAESD architecture (the tiny SD autoencoder, which ComfyUI's loader detects by its
  keys) with CONSTRUCTED weights: the encoder averages 8x8 pixel blocks into four latent channels
  (luminance, red-green, blue-yellow, horizontal-minus-vertical fine texture), scaled so that the
  model sees latents of about unit size; the decoder paints each latent pixel's colour back as an
  8x8 block. Decoded images are blocky but show the background's colour and coarse pattern.
  Latents are scaled to about unit spread (:data:`LATENT_GAIN`), as a real SD VAE's are.

What it is NOT: it draws no photographic image, knows no words (its text encoder is random and was
frozen), and knows nothing outside the four world categories. It proves that learning happens on a
model that already denoises its data, in a few minutes on two CPU cores.

Files (atomic writes; rebuilt when missing or when :data:`BUILDER_VERSION` or the world changes)::

    <repo>/.cache/productscene/world-<BUILDER_VERSION>/data/          devkit.world catalogue
    <repo>/.cache/productscene/world-<BUILDER_VERSION>/world-base.safetensors

Usage (the venv python, from the repository root): ``python -m devkit.world_model [--force] [--cache-dir DIR]``.
Importable: :func:`ensure_world` -> :class:`World` (``.checkpoint``, ``.data``, ...),
:func:`load_world_base` (fast model, clip, vae through ComfyUI's loader).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import default_model as dm
from . import world as world_mod

ROOT = dm.ROOT

BUILDER_VERSION = "3"
SEED = 20261124
CHECKPOINT_NAME = "world-base.safetensors"
CLIP_LAYERS = 2
CLIP_LAYERS_TOTAL = 12
PROMPTS = ("a product photo", "a photo of a product on a background", "a product on display")
PRETRAIN_STEPS = 240
PRETRAIN_BATCH = 8
PRETRAIN_LR = 5e-4
SETTLE_STEPS = 80          # the last steps at a fifth of the rate: the loss settles instead of jittering
SETTLE_LR = 1e-4
EVAL_EVERY = 40
# The model sees encoder output / vae_scale * 0.18215 (SD1.5's latent scale) = LATENT_GAIN x the
# encoder's output: the world's latents then have about unit spread, like a real SD VAE's (at a
# tenth of that the backgrounds are a vanishing share of the signal next to unit noise, and
# category identifiers learn little: measured +0.9% .. +4% worst own-identifier margins at gain 1)
LATENT_GAIN = 2.5

UNET_CONFIG = dict(dm.UNET_CONFIG, channel_mult=[1], num_res_blocks=[1], transformer_depth=[1],
                   transformer_depth_output=[1, 1])


@dataclass(frozen=True)
class World:
    checkpoint: Path          # the pretrained world base (.safetensors)
    data: Path                # the catalogue: BG60k layout, split "train" (bg60k) and "test" (bg1k)
    categories: tuple[str, ...]
    meta: dict                # the checkpoint's productscene.* metadata


def cache_root(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or dm.CACHE_DIR) / f"world-{BUILDER_VERSION}"


def say(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# initial weights
def _clip_is_identity_layer(key: str) -> bool:
    """Keys that make CLIP layer >= CLIP_LAYERS the identity when zero (its two residual outputs)."""
    marker = "encoder.layers."
    if marker not in key:
        return False
    layer = int(key.split(marker, 1)[1].split(".", 1)[0])
    return layer >= CLIP_LAYERS and (".self_attn.out_proj." in key or ".mlp.fc2." in key)


def taesd_state_dict():
    """TAESD weights that pool 8x8 blocks into (luminance, red-green, blue-yellow, texture
    orientation) and paint the colour back (see the module docstring)."""
    dm._import_paths()
    import torch
    from comfy.taesd.taesd import TAESD

    ae = TAESD()
    with torch.no_grad():
        for p in ae.parameters():
            p.zero_()
        enc, dec = ae.taesd_encoder, ae.taesd_decoder
        luma = torch.tensor([0.299, 0.587, 0.114])
        w = enc[0].weight                      # [64, 3, 3, 3] on x in 0..1
        for c in range(3):
            w[c, c, 1, 1] = 1.0                # R, G, B
        w[3, :, 1, 1] = luma                   # L
        w[4, :, 1, 0], w[4, :, 1, 2] = luma, -luma   # L(x-1) - L(x+1), both signs (ReLU follows)
        w[5] = -w[4]
        w[6, :, 0, 1], w[6, :, 2, 1] = luma, -luma
        w[7] = -w[6]
        for i in (2, 6, 10):                   # stride-2 convs: 2x2 average of each channel
            for c in range(64):
                enc[i].weight[c, c, 1:3, 1:3] = 0.25
        out = enc[14]
        out.weight[0, 3, 1, 1], out.bias[0] = 2.0, -1.0               # 2 (L - 0.5)
        out.weight[1, 0, 1, 1], out.weight[1, 1, 1, 1] = 2.0, -2.0    # 2 (R - G)
        out.weight[2, 2, 1, 1] = 2.0                                  # 2 (B - (R + G) / 2)
        out.weight[2, 0, 1, 1] = out.weight[2, 1, 1, 1] = -1.0
        out.weight[3, 4:6, 1, 1], out.weight[3, 6:8, 1, 1] = 6.0, -6.0  # 6 (|dx| - |dy|)
        # decoder: latent -> R, G, B (the inverse of the colour rows above), then identity layers
        inv = torch.tensor([[0.5, 0.322, -0.057], [0.5, -0.178, -0.057], [0.5, 0.072, 0.443]])
        dec[1].weight[:3, :3, 1, 1] = inv
        dec[1].bias[:3] = 0.5
        for i in (7, 12, 17):
            for c in range(64):
                dec[i].weight[c, c, 1, 1] = 1.0
        for c in range(3):
            dec[19].weight[c, c, 1, 1] = 1.0
        ae.vae_scale.fill_(0.18215 / LATENT_GAIN)
        ae.vae_shift.fill_(0.0)
    return {k: v.detach().clone().float() for k, v in ae.state_dict().items()}


def initial_tensors(seed: int = SEED) -> dict:
    import torch
    shapes = dm._shapes(UNET_CONFIG, vae=False)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in sorted(shapes):
        t = dm._random_tensor(key, shapes[key], gen)
        if key.startswith("cond_stage_model.") and _clip_is_identity_layer(key):
            t = torch.zeros_like(t)
        tensors[key] = t.float()
    for k, v in taesd_state_dict().items():
        tensors["first_stage_model." + k] = v
    return tensors


# ----------------------------------------------------------------------------------------------
# loading
def load_world_base(path, fast_clip: bool = True):
    """(model, clip, vae) of a world base through ComfyUI's own checkpoint loader. ``fast_clip``:
    the text encoder built with only its computing layers (:data:`CLIP_LAYERS`; same encodings),
    in float32; without it exactly what ``CheckpointLoaderSimple`` returns."""
    dm._import_paths()
    import torch
    import comfy.sd
    te = {"dtype": torch.float32, "clip_l_model_config": {"num_hidden_layers": CLIP_LAYERS}} if fast_clip else {}
    import logging
    prev = logging.root.manager.disable
    logging.disable(logging.WARNING)   # the identity layers' keys are "unexpected" to the short encoder
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True, te_model_options=te)[:4]
    finally:
        logging.disable(prev)
    return model, clip, vae


def _host_adapter():
    """The pack's ComfyUI training adapter, loaded the way the command line loads it."""
    from productscene_cli.comfyui import load_host_adapter
    return load_host_adapter(cpu=True)


# ----------------------------------------------------------------------------------------------
# the build
def _images(dataset):
    import torch
    imgs = [dataset.load(i, 64)[0] for i in range(len(dataset))]
    return torch.stack(imgs)


def build(folder: Path, *, seed: int = SEED, steps: int = PRETRAIN_STEPS, host_adapter=None, log=say) -> World:
    dm._import_paths()
    import torch
    from productscene.files import save_safetensors_atomic
    from productscene.train.datasets import open_dataset
    from productscene.train.engine import Phase, Trainer
    from .denoising import DenoisingRecipe

    th = host_adapter or _host_adapter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    data = Path(world_mod.write_world(folder / "data"))
    tensors = initial_tensors(seed)
    init_path = folder / "world-base-initial.safetensors"
    save_safetensors_atomic(tensors, init_path, {"productscene.builder_version": BUILDER_VERSION},
                            kind="world_base", version=1)
    model, clip, vae = load_world_base(init_path)
    host = th.ComfyTrainingHost(model, clip, vae)
    train = open_dataset(data, "bg60k", "train")
    held = open_dataset(data, "bg60k", "test")
    with torch.no_grad():
        lat = host.encode_images(_images(train))
        lat = torch.cat([lat, lat.flip(-1)])            # horizontal flips
        held_lat = host.encode_images(_images(held))
    recipe = DenoisingRecipe(host, lat, PROMPTS, batch_size=PRETRAIN_BATCH)
    g = torch.Generator().manual_seed(seed + 1)
    held_batches = []
    for _ in range(4):                                  # a fixed held-out evaluation set
        held_recipe = DenoisingRecipe(host, held_lat, PROMPTS, batch_size=len(held_lat))
        held_batches.append(held_recipe.batch(0, g))
    curve = []

    def held_loss():
        return sum(recipe.evaluate(b) for b in held_batches) / len(held_batches)

    def progress(step, total, loss):
        if step % EVAL_EVERY == 0 or step == total:
            curve.append((step, round(held_loss(), 5)))
            log(f"  pretraining step {step}/{total}: train {loss:.4f}, held-out {curve[-1][1]:.4f}")

    settle = min(SETTLE_STEPS, steps // 3)
    phases = [Phase("denoise", steps - settle, {"unet": PRETRAIN_LR}), Phase("settle", settle, {"unet": SETTLE_LR})]
    trainer = Trainer(recipe, phases, seed=seed, device=host.device,
                      autocast="off", progress=progress, name="world-base")
    with host.session(latent_shape=(PRETRAIN_BATCH,) + tuple(lat.shape[1:])):
        curve.append((0, round(held_loss(), 5)))
        t1, c1 = time.time(), time.process_time()
        result = trainer.run()
        train_s, train_cpu = time.time() - t1, time.process_time() - c1
    unet = {"model.diffusion_model." + k: v.detach().float().cpu().contiguous()
            for k, v in host.unet.state_dict().items()}
    missing = sorted(set(unet) ^ {k for k in tensors if k.startswith("model.diffusion_model.")})
    if missing:
        raise RuntimeError(f"world base: UNet keys differ after training: {missing[:5]}")
    tensors.update(unet)
    h = result.history
    meta = {
        "productscene.world_base": "ProductScene world base: a small SD1.5-family model pretrained on the "
                                   "synthetic world of devkit.world (see devkit/world_model.py)",
        "productscene.builder_version": BUILDER_VERSION,
        "productscene.seed": str(seed),
        "productscene.world": json.dumps(world_mod.describe()),
        "productscene.unet_config": json.dumps(UNET_CONFIG),
        "productscene.clip_layers": str(CLIP_LAYERS),
        "productscene.pretrain": json.dumps({
            "steps": result.steps_done, "batch": PRETRAIN_BATCH, "lr": [PRETRAIN_LR, SETTLE_LR], "settle_steps": settle, "prompts": list(PROMPTS),
            "train_loss_first20": sum(h[:20]) / 20, "train_loss_last20": sum(h[-20:]) / 20,
            "heldout_curve": curve, "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu, 1),
            "seconds": round(time.time() - t0, 1),
            "cpu_seconds": round(time.process_time() - c0, 1)}),
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.title": "ProductScene world base (tiny SD1.5 family, pretrained on a synthetic world)",
    }
    path = folder / CHECKPOINT_NAME
    save_safetensors_atomic(tensors, path, meta, kind="world_base", version=1)
    init_path.unlink(missing_ok=True)
    return World(path, data, tuple(world_mod.CATEGORIES), meta)


def ensure_world(cache_dir: Path | None = None, force: bool = False, host_adapter=None, log=say) -> World:
    """The cached world (data + pretrained base); built when missing or out of date. Processes
    sharing the cache build it once: the others wait for the first (a lock file in the folder)."""
    import fcntl
    folder = cache_root(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _ensure_world(folder, force, host_adapter, log)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _ensure_world(folder: Path, force: bool, host_adapter, log) -> World:
    path = folder / CHECKPOINT_NAME
    meta = dm._header_meta(path)
    if (not force and meta and meta.get("productscene.builder_version") == BUILDER_VERSION
            and meta.get("productscene.world") == json.dumps(world_mod.describe())
            and world_mod.read_description(folder / "data") == world_mod.describe()):
        return World(path, folder / "data", tuple(world_mod.CATEGORIES), meta)
    log(f"building the world base at {folder} (a few minutes) ...")
    t0 = time.time()
    out = build(folder, host_adapter=host_adapter, log=log)
    log(f"  world base built in {time.time() - t0:.1f} s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even when the cached files are current")
    ap.add_argument("--cache-dir", type=Path, default=dm.CACHE_DIR)
    a = ap.parse_args(argv)
    t0, c0 = time.time(), time.process_time()
    w = ensure_world(a.cache_dir, force=a.force)
    say(f"world base: {w.checkpoint}")
    say(f"world data: {w.data} (BG60k layout; train split bg60k, held-out split bg1k)")
    say(f"({time.time() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
