"""The DiT world base: a tiny Flux.1 model (ComfyUI's own Flux classes) PRETRAINED on the small
world of ``devkit.world`` exactly as the SD world base (``devkit/world_model.py``) is, for the DiT
learning proof (tests/test_dit_learning.py).

- Diffusion model: ComfyUI's ``supported_models.Flux`` -> ``model_base.Flux`` ->
  ``comfy.ldm.flux.model.Flux`` (guidance embedding, T5 context 4096, CLIP-L vector 768) at width
  :data:`HIDDEN` (``devkit.dit_models.flux_config``), pretrained here on the world's train split
  with category-agnostic prompts (``devkit.world_model.PROMPTS``) by ``devkit.denoising`` through
  the pack's DiT training host (flow matching: ComfyUI's own ``model_sampling``).
- Text encoder: ``devkit.dit_text``'s tiny Flux.1 encoders (CLIP-L + T5-XXL at their real widths,
  narrow layers), ComfyUI's own classes, not trained. ComfyUI's checkpoint detection fixes Flux.1's
  width (24 heads of 128) and T5-XXL's layer sizes, so these reduced models have their own loader
  path (:func:`load_dit_world_base`): the diffusion model through the family's supported-model class
  with the config stored in the file's metadata, the encoders through
  ``comfy.sd.load_text_encoder_state_dicts`` with the small configs as ``model_options``.
- VAE: ComfyUI's TAESD architecture with 16 latent channels (what ComfyUI's loader builds for a
  ``taesd_decoder.*`` state dict with 16 channels, as for ``taef1``) and CONSTRUCTED weights: the SD
  world base's four colour/texture channels (``world_model.taesd_state_dict``), the other twelve
  zero; scaled so that Flux.1's latent format (shift 0.1159, scale 0.3611) gives latents of about
  unit spread (:data:`world_model.LATENT_GAIN`).

Files (atomic; rebuilt when missing or when :data:`BUILDER_VERSION` or the world changes)::

    <repo>/.cache/productscene/dit-world-<BUILDER_VERSION>/dit-world-base.safetensors
    (the world data is the SD world base's: .cache/productscene/world-<version>/data)

Usage (the venv python, from the repository root): ``python -m devkit.dit_world [--force]`` builds
it; ``python -m devkit.dit_world cli evaluate-library --checkpoint <dit-world-base> ...`` runs a
``productscene`` command with this module's loader for the file (:func:`cli`).
"""
from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import comfy_env  # noqa: F401  (sys.path, CPU, quiet logging)
from . import default_model as dm
from . import world as world_mod
from . import world_model

BUILDER_VERSION = "1"
SEED = 20261207
CHECKPOINT_NAME = "dit-world-base.safetensors"
LATENT_CHANNELS = 16
FLUX_SHIFT, FLUX_SCALE = 0.1159, 0.3611     # comfy.latent_formats.Flux
HIDDEN, HEADS, DEPTH, SINGLE = 64, 2, 2, 2
PROMPTS = world_model.PROMPTS
# 1000 steps (about 40 s of CPU): the held-out loss falls 0.536 -> 0.070, levelling off (0.0709 at 900)
PRETRAIN_STEPS = 1000
PRETRAIN_BATCH = 8
PRETRAIN_LR = 1e-3
SETTLE_STEPS = 200
SETTLE_LR = 2e-4
EVAL_EVERY = 100
# T5-XXL pads every prompt to 256 tokens by default; the world's prompts are about 12 tokens, so the
# world base's text encoder pads to 16 (ComfyUI's own tokenizer option ``t5xxl_min_length``): the
# same encoder, 16x less text to carry through the T5 and every joint attention
T5_MIN_LENGTH = 16
# Of T5-XXL's 24 blocks (ComfyUI tells T5-XXL by its block 23) only the first T5_LAYERS compute:
# the others have zero output projections (``SelfAttention.o``, ``DenseReluDense.wo``), so each is
# exactly the identity, and the loader builds the encoder with T5_LAYERS blocks (the same
# encodings, twelve times less work: the SD world base does the same with its CLIP)
T5_LAYERS = 2
UNET_KEY = "model.diffusion_model."
TE_KEYS = ("text_encoders.clip_l.", "text_encoders.t5xxl.")
VAE_KEY = "vae."


def unet_config() -> dict:
    from .dit_models import flux_config
    return flux_config(hidden=HIDDEN, heads=HEADS, depth=DEPTH, single=SINGLE)


def flux_taesd_state_dict() -> dict:
    """16-channel TAESD weights: the SD world base's 4 channels, 12 zero channels, Flux.1 scaling."""
    import torch
    from comfy.taesd.taesd import TAESD
    four = world_model.taesd_state_dict()
    ae = TAESD(latent_channels=LATENT_CHANNELS)
    out = {}
    for k, v in ae.state_dict().items():
        src = four[k]
        t = torch.zeros(v.shape)
        t[tuple(slice(0, n) for n in src.shape)] = src
        out[k] = t
    out["vae_scale"] = torch.tensor(FLUX_SCALE / world_model.LATENT_GAIN)
    out["vae_shift"] = torch.tensor(FLUX_SHIFT)
    return out


@functools.cache
def tiny_flux_vae():
    """The world VAE (``comfy.sd.VAE`` detected from the state dict, as VAELoader builds it): shared."""
    import comfy.sd
    return comfy.sd.VAE(sd=flux_taesd_state_dict())


def flux_model(unet: dict | None = None, cfg: dict | None = None, seed: int = SEED):
    """A ModelPatcher of ComfyUI's Flux at ``cfg`` (default :func:`unet_config`): seeded weights,
    then ``unet`` (diffusion-model keys) loaded when given."""
    import comfy.supported_models as sm
    from .models import _patcher
    m = _patcher(sm.Flux, dict(cfg or unet_config()), seed)
    if unet is not None:
        m.model.diffusion_model.load_state_dict(unet, strict=True)
    return m


def load_dit_world_base(path):
    """(model, clip, vae) of a DiT world base file (the module doc's own loader path)."""
    from safetensors import safe_open
    import comfy.sd
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["productscene.unet_config"])
    unet = {k[len(UNET_KEY):]: v for k, v in tensors.items() if k.startswith(UNET_KEY)}
    model = flux_model(unet, cfg)
    tes = [{k[len(p):]: v for k, v in tensors.items() if k.startswith(p)} for p in TE_KEYS]
    clip = load_text_encoder(tes)
    vae = comfy.sd.VAE(sd={k[len(VAE_KEY):]: v.float() for k, v in tensors.items() if k.startswith(VAE_KEY)})
    return model, clip, vae


def _t5_identity_key(key: str) -> bool:
    """Keys that make T5 block >= T5_LAYERS the identity when zero (its two residual outputs)."""
    if not key.startswith("encoder.block."):
        return False
    block = int(key.split(".")[2])
    return block >= T5_LAYERS and (key.endswith("SelfAttention.o.weight") or key.endswith("DenseReluDense.wo.weight"))


def text_state_dicts() -> tuple:
    """(CLIP-L, T5-XXL) weights of the world base: devkit.dit_text's, T5's later blocks the identity."""
    from . import dit_text
    clip_l, t5 = dit_text.state_dicts("flux")
    return clip_l, {k: (v * 0 if _t5_identity_key(k) else v) for k, v in t5.items()}


def load_text_encoder(state_dicts):
    """The world base's text encoder through ComfyUI's loader: T5 built with :data:`T5_LAYERS`
    blocks (the identity blocks' keys are left unused), float32, prompts padded to
    :data:`T5_MIN_LENGTH` tokens (ComfyUI's tokenizer option ``t5xxl_min_length``)."""
    import logging
    import torch
    import comfy.sd
    from . import dit_text
    options = {k: dict(v) for k, v in dit_text.FLUX_OPTIONS.items()}
    options["t5xxl_model_config"]["num_layers"] = T5_LAYERS
    options["dtype"] = torch.float32
    prev = logging.root.manager.disable
    logging.disable(logging.WARNING)   # the identity blocks' keys are "unexpected" to the short encoder
    try:
        clip = comfy.sd.load_text_encoder_state_dicts([dict(sd) for sd in state_dicts], clip_type=comfy.sd.CLIPType.FLUX,
                                                      model_options=options)
    finally:
        logging.disable(prev)
    clip.set_tokenizer_option("t5xxl_min_length", T5_MIN_LENGTH)
    return clip


@dataclass(frozen=True)
class DitWorld:
    checkpoint: Path
    data: Path
    categories: tuple[str, ...]
    meta: dict


def cache_root(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or dm.CACHE_DIR) / f"dit-world-{BUILDER_VERSION}"


def _host_adapter():
    from productscene_cli.comfyui import load_host_adapter
    return load_host_adapter(cpu=True)


def build(folder: Path, data: Path, *, seed: int = SEED, steps: int = PRETRAIN_STEPS, host_adapter=None,
          log=world_model.say) -> DitWorld:
    import torch
    from productscene.train.datasets import open_dataset
    from productscene.train.engine import Phase, Trainer
    from .denoising import DenoisingRecipe

    th = host_adapter or _host_adapter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    model = flux_model()
    text = text_state_dicts()
    clip = load_text_encoder(text)
    vae = tiny_flux_vae()
    host = th.training_host(model, clip, vae)
    train = open_dataset(data, "bg60k", "train")
    held = open_dataset(data, "bg60k", "test")
    with torch.no_grad():
        lat = host.encode_images(world_model._images(train))
        lat = torch.cat([lat, lat.flip(-1)])
        held_lat = host.encode_images(world_model._images(held))
    recipe = DenoisingRecipe(host, lat, PROMPTS, batch_size=PRETRAIN_BATCH)
    g = torch.Generator().manual_seed(seed + 1)
    held_batches = [DenoisingRecipe(host, held_lat, PROMPTS, batch_size=len(held_lat)).batch(0, g) for _ in range(4)]
    curve = []

    def held_loss():
        return sum(recipe.evaluate(b) for b in held_batches) / len(held_batches)

    def progress(step, total, loss):
        if step % EVAL_EVERY == 0 or step == total:
            curve.append((step, round(held_loss(), 5)))
            log(f"  pretraining step {step}/{total}: train {loss:.4f}, held-out {curve[-1][1]:.4f}")

    settle = min(SETTLE_STEPS, steps // 3)
    phases = [Phase("denoise", steps - settle, {"unet": PRETRAIN_LR}), Phase("settle", settle, {"unet": SETTLE_LR})]
    trainer = Trainer(recipe, phases, seed=seed, device=host.device, autocast="off", progress=progress,
                      name="dit-world-base")
    with host.session(latent_shape=(PRETRAIN_BATCH,) + tuple(lat.shape[1:])):
        curve.append((0, round(held_loss(), 5)))
        t1 = time.time()
        result = trainer.run()
        train_s = time.time() - t1
    h = result.history
    path = write_base(folder / CHECKPOINT_NAME, host.unet, seed, {
        "productscene.world": json.dumps(world_mod.describe()),
        "productscene.pretrain": json.dumps({
            "steps": result.steps_done, "batch": PRETRAIN_BATCH, "lr": [PRETRAIN_LR, SETTLE_LR],
            "settle_steps": settle, "prompts": list(PROMPTS),
            "train_loss_first20": sum(h[:20]) / 20, "train_loss_last20": sum(h[-20:]) / 20,
            "heldout_curve": curve, "train_seconds": round(train_s, 1), "seconds": round(time.time() - t0, 1),
            "cpu_seconds": round(time.process_time() - c0, 1)})})
    return DitWorld(path, Path(data), tuple(world_mod.CATEGORIES), dm._header_meta(path))


def write_base(path, net, seed: int = SEED, extra: dict | None = None) -> Path:
    """A DiT world base file (:func:`load_dit_world_base` reads it) of the Flux model ``net``
    (``diffusion_model``), with the world base's text encoder and VAE; atomic."""
    from productscene.files import save_safetensors_atomic
    tensors = {UNET_KEY + k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
    for prefix, sd in zip(TE_KEYS, text_state_dicts()):
        tensors.update({prefix + k: v.contiguous() for k, v in sd.items()})
    tensors.update({VAE_KEY + k: v.contiguous() for k, v in flux_taesd_state_dict().items()})
    meta = {
        "productscene.dit_world_base": "ProductScene DiT world base: a tiny Flux.1 model pretrained on the "
                                       "synthetic world of devkit.world (see devkit/dit_world.py)",
        "productscene.builder_version": BUILDER_VERSION,
        "productscene.seed": str(seed),
        "productscene.unet_config": json.dumps(unet_config()),
        **(extra or {}),
    }
    save_safetensors_atomic(tensors, Path(path), meta, kind="dit_world_base", version=1)
    return Path(path)


def write_untrained(path, seed: int = SEED) -> Path:
    """The DiT world base's format with the model's seeded weights, not pretrained (seconds): for
    tests of the command line's DiT path that need a file, not learning."""
    return write_base(path, flux_model(seed=seed).model.diffusion_model, seed, {"productscene.pretrain": "null"})


def ensure_dit_world(cache_dir: Path | None = None, force: bool = False, host_adapter=None,
                     log=world_model.say) -> DitWorld:
    """The cached DiT world base (and the world's data, from the SD world base's folder: built
    there when missing); built when missing or out of date, once across processes (a lock file)."""
    import fcntl
    world = world_model.ensure_world(cache_dir, host_adapter=host_adapter, log=log)
    folder = cache_root(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            path = folder / CHECKPOINT_NAME
            meta = dm._header_meta(path)
            if (not force and meta and meta.get("productscene.builder_version") == BUILDER_VERSION
                    and meta.get("productscene.world") == json.dumps(world_mod.describe())):
                return DitWorld(path, world.data, world.categories, meta)
            log(f"building the DiT world base at {folder} ...")
            t0 = time.time()
            out = build(folder, world.data, host_adapter=host_adapter, log=log)
            log(f"  DiT world base built in {time.time() - t0:.1f} s")
            return out
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_dit_world_base(path) -> bool:
    meta = dm._header_meta(Path(path)) if Path(path).is_file() else None
    return bool(meta and "productscene.dit_world_base" in meta)


def cli(argv) -> int:
    """``python -m productscene <argv>`` with this module's loader for DiT world base files: the
    command line's ``--checkpoint`` takes a DiT world base (ComfyUI's checkpoint detection does not
    take the reduced Flux.1 and T5), any other file goes to the command line's own loader."""
    import productscene_cli
    from productscene_cli import comfyui
    own = comfyui.load_checkpoint

    def load_checkpoint(path):
        return load_dit_world_base(path) if is_dit_world_base(path) else own(path)

    comfyui.load_checkpoint = load_checkpoint
    return productscene_cli.main(list(argv))


def main(argv=None) -> int:
    import argparse
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["cli"]:
        return cli(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--cache-dir", type=Path, default=dm.CACHE_DIR)
    a = ap.parse_args(argv)
    w = ensure_dit_world(a.cache_dir, force=a.force)
    world_model.say(f"DiT world base: {w.checkpoint}\nworld data: {w.data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
