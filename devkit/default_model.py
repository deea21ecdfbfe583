"""Build and cache the embedded default model and category library of the demo.

No diffusion weights can be downloaded where this project is built and tested, so the demo's
default model is a *reduced but detectable SD1.5 checkpoint with random weights*:

- UNet: ComfyUI's own SD1.5 UNet class with ``model_channels`` 320, ``context_dim`` 768,
  ``channel_mult`` [1, 2], one res block and transformer depth 1 per level (about 107M parameters);
- the standard CLIP-L text encoder (123M) and the standard SD VAE (84M);
- every tensor drawn from a seeded generator (small fan-in scaled normals, norms at 1, biases at 0;
  never uninitialised memory), saved in fp16 as one safetensors file of about 630 MB with keys
  ``model.diffusion_model.*``, ``cond_stage_model.transformer.text_model.*``,
  ``first_stage_model.*`` so that ComfyUI's CheckpointLoaderSimple detects it as SD1.5 and returns
  MODEL, CLIP and VAE.

It proves the pipeline (every node runs on ComfyUI's real model classes, the product pixels come
back untouched); it draws no meaningful background. Its category library holds one identifier per
sample category, initialised from this model's own CLIP token embedding of a describing word, and is
untrained.

For the brand-reference workflow it also builds a CLIP vision model and a personality adapter:

- a CLIP vision model of ComfyUI's ViT-L/14 shape (``clip_vision_config_vitl.json``, 303M parameters,
  1024-wide penultimate states), seeded random weights, fp16, about 610 MB: the smallest image
  encoder ComfyUI's CLIPVisionLoader detects;
- an UNTRAINED personality adapter for the default model and that encoder (16 tokens; its per-layer
  to_k/to_v start as each layer's own text to_k/to_v, its projection is seeded).

Files (atomic writes; rebuilt only when missing or when a builder version / the categories change):
    <repo>/.cache/productscene/default-sd15-random.safetensors
    <repo>/.cache/productscene/default-categories.safetensors
    <repo>/.cache/productscene/default-clip-vision-vitl-random.safetensors
    <repo>/.cache/productscene/default-personality-untrained.safetensors

Usage (the venv python, from the repository root): ``python -m devkit.default_model [--force] [--no-verify]``.
Importable: ``ensure_default_model()``, ``ensure_default_library()``, ``ensure_defaults()``,
``ensure_reference_defaults()``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

from .paths import CACHE_DIR, COMFYUI_DIR, REPO_ROOT as ROOT
CHECKPOINT_NAME = "default-sd15-random.safetensors"
LIBRARY_NAME = "default-categories.safetensors"
CLIP_VISION_NAME = "default-clip-vision-vitl-random.safetensors"
ADAPTER_NAME = "default-personality-untrained.safetensors"
MANIFEST = ROOT / "samples" / "products" / "manifest.json"

# Bump when what the builder writes changes: cached files of another version are rebuilt.
BUILDER_VERSION = "1"
REFERENCE_BUILDER_VERSION = "1"   # the CLIP vision model and the personality adapter
SEED = 20240531

UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1],
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0}

# Fallback when the samples manifest is missing: category -> describing word.
FALLBACK_WORDS = {"perfume": "perfume", "tools": "tools", "tea": "tea", "sneakers": "sneakers"}

DESCRIPTION = (
    "ProductScene embedded default model: a reduced SD1.5-architecture checkpoint (UNet "
    "model_channels 320, channel_mult [1,2], 1 res block and transformer depth 1 per level; "
    "standard CLIP-L text encoder and SD VAE) with SEEDED RANDOM weights. Not trained: it proves "
    "the ComfyUI pipeline and that product pixels stay untouched, and draws no meaningful "
    "background. Use a real SD1.5 checkpoint for real backgrounds.")


def say(msg: str) -> None:
    print(msg, flush=True)


def _import_paths() -> None:
    """ComfyUI importable in this process (the dev kit's one bootstrap), on first use only: importing
    this module stays light."""
    from . import comfy_env  # noqa: F401


def checkpoint_path(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or CACHE_DIR) / CHECKPOINT_NAME


def library_path(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or CACHE_DIR) / LIBRARY_NAME


def _header_meta(path: Path) -> dict | None:
    """Metadata of a safetensors file, header only; None when missing or unreadable."""
    _import_paths()
    from productscene.errors import ProductSceneError
    from productscene.files import read_header
    try:
        return read_header(path)[0]
    except (OSError, ProductSceneError):
        return None


# ----------------------------------------------------------------------------------------------
# the checkpoint
def _shapes(unet_config: dict | None = None, vae: bool = True) -> dict[str, tuple[int, ...]]:
    """``{checkpoint key: shape}`` of every tensor (the SD VAE's only when ``vae``), from ComfyUI's
    own classes built on the meta device (no memory, no initialisation)."""
    _import_paths()
    import torch
    import comfy.ops
    from comfy.clip_model import CLIPTextModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    clip_config = json.loads((COMFYUI_DIR / "comfy" / "sd1_clip_config.json").read_text())
    out = {}
    with torch.device("meta"):
        unet = UNetModel(**(unet_config or UNET_CONFIG), dtype=torch.float32, device="meta", operations=ops)
        for k, v in unet.state_dict().items():
            out["model.diffusion_model." + k] = tuple(v.shape)
        clip = CLIPTextModel(clip_config, torch.float32, "meta", ops)
        for k, v in clip.state_dict().items():
            # text_projection and logit_scale are not part of an SD1.5 checkpoint
            if k.startswith("text_projection") or "logit_scale" in k:
                continue
            out["cond_stage_model.transformer." + k] = tuple(v.shape)
        if vae:
            ae = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
            for k, v in ae.state_dict().items():
                out["first_stage_model." + k] = tuple(v.shape)
    return out


def _random_tensor(key: str, shape, gen):
    """Small seeded random values: fan-in scaled normals for weights, 1 for norm scales,
    0 for biases, 0.02 / 0.01 normals for token / position embeddings."""
    import torch
    if "position_ids" in key:
        return torch.arange(shape[-1], dtype=torch.float32).expand(*shape).clone()
    if key.endswith(".bias") or len(shape) == 0:
        return torch.zeros(shape)
    if len(shape) == 1 and "class_embedding" not in key:  # GroupNorm / LayerNorm scales
        return torch.ones(shape)
    if "token_embedding" in key:
        return torch.randn(shape, generator=gen) * 0.02
    if "position_embedding" in key:
        return torch.randn(shape, generator=gen) * 0.01
    if "class_embedding" in key:
        return torch.randn(shape, generator=gen) * 0.02
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) * (1.0 / math.sqrt(fan_in))


def build_checkpoint(path: Path, seed: int = SEED) -> Path:
    _import_paths()
    import torch
    from productscene.files import save_safetensors_atomic

    shapes = _shapes()
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    params = {"unet": 0, "clip": 0, "vae": 0}
    for key in sorted(shapes):
        t = _random_tensor(key, shapes[key], gen)
        tensors[key] = t.to(torch.float16)
        part = "unet" if key.startswith("model.") else "clip" if key.startswith("cond_stage") else "vae"
        params[part] += t.numel()
    metadata = {
        "productscene.default_model": DESCRIPTION,
        "productscene.builder_version": BUILDER_VERSION,
        "productscene.seed": str(seed),
        "productscene.trained": "false",
        "productscene.parameters": json.dumps(params),
        "productscene.unet_config": json.dumps(UNET_CONFIG),
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.title": "ProductScene default (random weights, SD1.5 architecture, reduced UNet)",
    }
    save_safetensors_atomic(tensors, path, metadata, kind="default_checkpoint", version=1)
    return path


def verify_checkpoint(path: Path) -> dict:
    """Load with ComfyUI's own loader; check SD1.5 detection, a CLIP and a VAE."""
    _import_paths()
    import comfy.sd
    import comfy.supported_models

    t0 = time.time()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:4]
    cfg = type(model.model.model_config)
    if cfg is not comfy.supported_models.SD15:
        raise RuntimeError(f"{path}: detected as {cfg.__name__}, expected SD15")
    if clip is None or vae is None:
        raise RuntimeError(f"{path}: loader returned clip={clip is not None} vae={vae is not None}")
    return {"detected": cfg.__name__, "load_s": round(time.time() - t0, 2)}


def ensure_default_model(cache_dir: Path | None = None, force: bool = False, verify: bool = True,
                         log=say) -> Path:
    """The cached default checkpoint; built (and verified) when missing or out of date."""
    path = checkpoint_path(cache_dir)
    meta = _header_meta(path)
    if not force and meta and meta.get("productscene.builder_version") == BUILDER_VERSION:
        return path
    log(f"building the default model (random-weight SD1.5 architecture, ~630 MB) at {path} ...")
    t0 = time.time()
    build_checkpoint(path)
    log(f"  written in {time.time() - t0:.1f} s")
    if verify:
        try:
            info = verify_checkpoint(path)
        except Exception:
            path.unlink(missing_ok=True)
            raise
        log(f"  verified: ComfyUI detects it as {info['detected']} with CLIP and VAE (load {info['load_s']} s)")
    return path


# ----------------------------------------------------------------------------------------------
# the category library
def sample_category_words(manifest: Path = MANIFEST) -> dict[str, str]:
    """``{category: describing word}`` for every sample category (the manifest's ``init_word``
    when given, else the category name with ``_``/``-`` as spaces)."""
    try:
        data = json.loads(Path(manifest).read_text())
    except (OSError, ValueError):
        return dict(FALLBACK_WORDS)
    items = data.get("products", data) if isinstance(data, dict) else data
    if isinstance(items, dict):
        items = [dict(v, name=k) if isinstance(v, dict) else {"name": k, "category": v}
                 for k, v in items.items()]
    words: dict[str, str] = {}
    for it in items:
        if not isinstance(it, dict) or not it.get("category"):
            continue
        cat = str(it["category"])
        words.setdefault(cat, str(it.get("init_word") or cat.replace("_", " ").replace("-", " ")))
    return words or dict(FALLBACK_WORDS)


def _tokenizer():
    _import_paths()
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(str(COMFYUI_DIR / "comfy" / "sd1_tokenizer"))


def _library_key(words: dict[str, str], ckpt_meta: dict) -> str:
    blob = json.dumps({"v": BUILDER_VERSION, "words": words,
                       "ckpt": [ckpt_meta.get("productscene.builder_version"), ckpt_meta.get("productscene.seed")]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


TOKEN_EMBEDDING_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def write_untrained_library(path: Path, ckpt: Path, words: dict[str, str], *, key: str = TOKEN_EMBEDDING_KEY,
                            license=None, created_by=None) -> Path:
    """An UNTRAINED SD1.5 library: each identifier is ``ckpt``'s own CLIP-L token embeddings of its
    category's word, one vector (``productscene.prompt.init_vectors``: the mean of the word's tokens)."""
    _import_paths()
    import torch
    from safetensors import safe_open
    from productscene.library import TokenLibrary

    with safe_open(str(ckpt), framework="pt") as f:
        table = f.get_tensor(key).to(torch.float32)
    tok = _tokenizer()

    def token_embeddings(word: str):
        ids = tok(word)["input_ids"][1:-1]      # drop start/end
        if not ids:
            raise ValueError(f"word {word!r} has no tokens")
        return {"clip_l": table[ids]}

    TokenLibrary.from_words(words, "sd15", token_embeddings).write(
        path, training=None, license=license, created_by=created_by)
    return path


def build_library(path: Path, ckpt: Path, words: dict[str, str]) -> Path:
    return write_untrained_library(
        path, ckpt, words,
        license="Same as the default model: generated by ProductScene, no training data.",
        created_by={
            "by": "devkit/default_model.py",
            "note": ("UNTRAINED default library: each identifier is the default model's own CLIP "
                     "token embedding of a describing word (init_words). It carries no learned "
                     "category style."),
            "builder_version": BUILDER_VERSION,
            "key": _library_key(words, _header_meta(ckpt) or {}),
            "checkpoint": CHECKPOINT_NAME,
        })


def ensure_default_library(checkpoint: Path | None = None, cache_dir: Path | None = None,
                           force: bool = False, log=say) -> Path:
    """The cached untrained default library for the sample categories."""
    ckpt = Path(checkpoint) if checkpoint else ensure_default_model(cache_dir, log=log)
    path = library_path(cache_dir)
    words = sample_category_words()
    want = _library_key(words, _header_meta(ckpt) or {})
    meta = _header_meta(path)
    if not force and meta:
        try:
            if json.loads(meta.get("created_by", "null")).get("key") == want:
                return path
        except (ValueError, TypeError, AttributeError):
            pass
    log(f"building the default category library ({', '.join(words)}; untrained) at {path}")
    build_library(path, ckpt, words)
    return path


def ensure_defaults(cache_dir: Path | None = None, force: bool = False, verify: bool = True,
                    log=say) -> tuple[Path, Path]:
    ckpt = ensure_default_model(cache_dir, force=force, verify=verify, log=log)
    lib = ensure_default_library(ckpt, cache_dir, force=force, log=log)
    return ckpt, lib



# ----------------------------------------------------------------------------------------------
# the brand-reference pieces: a CLIP vision model and an untrained personality adapter
CLIP_VISION_WIDTH = 1024
ADAPTER_TOKENS = 16


def clip_vision_path(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or CACHE_DIR) / CLIP_VISION_NAME


def adapter_path(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or CACHE_DIR) / ADAPTER_NAME


def build_clip_vision(path: Path, seed: int = SEED) -> Path:
    """A ViT-L/14 CLIP vision file (ComfyUI's ``clip_vision_config_vitl.json``; keys ``vision_model.*``
    and ``visual_projection.weight``) with seeded random weights, fp16."""
    _import_paths()
    import torch
    import comfy.ops
    from comfy.clip_model import CLIPVisionModelProjection
    from productscene.files import save_safetensors_atomic

    config = json.loads((COMFYUI_DIR / "comfy" / "clip_vision_config_vitl.json").read_text())
    with torch.device("meta"):
        model = CLIPVisionModelProjection(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    tensors = {k: _random_tensor(k, shapes[k], gen).to(torch.float16) for k in sorted(shapes)}
    metadata = {
        "productscene.default_model": "ProductScene embedded default CLIP vision model: ComfyUI's ViT-L/14 "
                                      "shape with SEEDED RANDOM weights (not trained; a fixed feature extractor).",
        "productscene.builder_version": REFERENCE_BUILDER_VERSION,
        "productscene.seed": str(seed + 1),
        "productscene.trained": "false",
    }
    save_safetensors_atomic(tensors, path, metadata, kind="default_clip_vision", version=1)
    return path


def verify_clip_vision(path: Path) -> dict:
    """Load with ComfyUI's own CLIP vision loader (what CLIPVisionLoader calls); finite states."""
    _import_paths()
    import torch
    import comfy.clip_vision

    t0 = time.time()
    cv = comfy.clip_vision.load(str(path))
    if cv is None:
        raise RuntimeError(f"{path}: ComfyUI's CLIP vision loader does not detect it")
    states = cv.encode_image(torch.rand(1, 64, 64, 3), crop=False)["penultimate_hidden_states"]
    if states.shape[-1] != CLIP_VISION_WIDTH or not torch.isfinite(states).all():
        raise RuntimeError(f"{path}: penultimate states {tuple(states.shape)}, finite={bool(torch.isfinite(states).all())}")
    return {"width": int(states.shape[-1]), "states": int(states.shape[1]), "load_s": round(time.time() - t0, 2)}


def build_adapter(path: Path, checkpoint: Path, seed: int = SEED) -> Path:
    """An UNTRAINED personality adapter for ``checkpoint`` (SD1.5) and the default CLIP vision
    model: ``PersonalityAdapter.for_layers`` on the checkpoint's own cross-attention layers."""
    _import_paths()
    import comfy.sd
    from productscene.attention import unet_cross_attention
    from productscene.personality import PersonalityAdapter

    model = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)[0]
    layers = unet_cross_attention(model.model.diffusion_model)
    adapter = PersonalityAdapter.for_layers("sd15", CLIP_VISION_WIDTH, layers, tokens=ADAPTER_TOKENS, seed=seed)
    adapter.save(path, training={
        "recipe": "untrained", "by": "devkit/default_model.py", "builder_version": REFERENCE_BUILDER_VERSION,
        "checkpoint": checkpoint.name, "clip_vision": CLIP_VISION_NAME,
        "note": ("UNTRAINED default personality adapter: per-layer to_k/to_v copied from the default model's "
                 "text to_k/to_v, seeded random projection. It carries no learned style.")})
    return path


def _current(path: Path) -> bool:
    meta = _header_meta(path)
    if not meta:
        return False
    if meta.get("productscene.builder_version") == REFERENCE_BUILDER_VERSION:
        return True
    try:
        return json.loads(meta.get("training", "{}")).get("builder_version") == REFERENCE_BUILDER_VERSION
    except (ValueError, AttributeError):
        return False


def ensure_reference_defaults(checkpoint: Path | None = None, cache_dir: Path | None = None,
                              force: bool = False, verify: bool = True, log=say) -> tuple[Path, Path]:
    """(CLIP vision model, untrained personality adapter) of the default model, built when missing."""
    ckpt = Path(checkpoint) if checkpoint else ensure_default_model(cache_dir, log=log)
    cv = clip_vision_path(cache_dir)
    if force or not _current(cv):
        log(f"building the default CLIP vision model (random-weight ViT-L/14 shape, ~610 MB) at {cv} ...")
        t0 = time.time()
        build_clip_vision(cv)
        log(f"  written in {time.time() - t0:.1f} s")
        if verify:
            try:
                info = verify_clip_vision(cv)
            except Exception:
                cv.unlink(missing_ok=True)
                raise
            log(f"  verified: ComfyUI's CLIP vision loader takes it ({info['states']} x {info['width']} states, "
                f"load {info['load_s']} s)")
    adapter = adapter_path(cache_dir)
    if force or not _current(adapter):
        log(f"building the default personality adapter (untrained) at {adapter}")
        build_adapter(adapter, ckpt)
    return cv, adapter


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even when the cached files are current")
    ap.add_argument("--no-verify", action="store_true", help="skip loading the new checkpoint with ComfyUI")
    ap.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    a = ap.parse_args(argv)
    t0 = time.time()
    try:
        ckpt, lib = ensure_defaults(a.cache_dir, force=a.force, verify=not a.no_verify)
        cv, adapter = ensure_reference_defaults(ckpt, a.cache_dir, force=a.force, verify=not a.no_verify)
    except RuntimeError as e:
        print(f"default_model: error: {e}", file=sys.stderr, flush=True)
        return 2
    say(f"default model:   {ckpt}")
    say(f"default library: {lib}")
    say(f"default CLIP vision model: {cv}")
    say(f"default personality adapter: {adapter}")
    say(f"({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
