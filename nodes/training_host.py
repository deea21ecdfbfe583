"""The ComfyUI adapter for training (shared by the training nodes and the command line).

From a ModelPatcher, a CLIP and a VAE it builds what the host-free engine needs
(:class:`ComfyTrainingHost`, the ``DiffusionHost`` of ``productscene.train.recipes``):

* a differentiable text encoder for identifier vectors: ComfyUI's tokenizer output with the live
  vectors spliced in (``clip.encode_from_tokens`` keeps the autograd graph from the spliced vectors
  to the conditioning; training code opens ``torch.inference_mode(False)`` and ``enable_grad``
  because ComfyUI runs nodes under inference mode);
* the noise prediction through ``model.model.apply_model`` with the model's own
  ``model_sampling`` (eps recovered from the denoised output: ``(x - denoised) / sigma``; SDXL gets
  its adm ``y``), the ``SceneAttention`` of the step passed per call in ``transformer_options``;
* the model loaded with ``comfy.model_management.load_models_gpu``; VAE latents for the cache
  (scaled into the model's latent space with ``process_latent_in``);
* progress through ``comfy.utils.ProgressBar``, cancel through
  ``comfy.model_management.processing_interrupted()`` (the engine saves a checkpoint, then the
  caller re-raises ComfyUI's interrupt so the UI shows the run as cancelled).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from dataclasses import dataclass

import torch

import comfy.clip_model
import comfy.model_management as mm
import comfy.utils

from productscene.attention import SceneAttention
from productscene.errors import ProductSceneError
from productscene.library import ENCODER_OF_TOKENIZER_KEY, TOKENIZER_KEYS, check_family, family_of_encoders
from productscene.prompt import tokenize_with_identifier
from productscene.train.datasets import LatentCache, check, open_dataset
from productscene.train.engine import Trainer, gradient_checkpointing, loss_graph
from productscene.train.recipes import Encoded
from productscene.train.recipes.categories import BG60K_LICENSE, CachedSource, CategoryConfig, CategoryRecipe
from .clip_text import clip_widths, token_embedding_fn
from .host import SCENE_KEY, install

CONTEXT_FAMILY = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


@contextlib.contextmanager
def training_mode():
    """Gradients on, even inside ComfyUI's ``torch.inference_mode()`` node execution."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _clip_layer_forward(self, x, mask=None, optimized_attention=None):
    """comfy.clip_model.CLIPLayer.forward without its in-place adds (``x += ...`` overwrites the
    input that layer_norm saved for backward, so autograd fails); same numbers."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


@contextlib.contextmanager
def differentiable_clip(clip):
    """Let gradients pass ComfyUI's CLIP text encoders (to spliced identifier vectors) while inside:
    every ``CLIPLayer`` of ``clip`` runs an out-of-place forward. Restored on exit."""
    patched = []
    try:
        for m in clip.cond_stage_model.modules():
            if isinstance(m, comfy.clip_model.CLIPLayer) and "forward" not in m.__dict__:
                m.forward = _clip_layer_forward.__get__(m)
                patched.append(m)
        yield clip
    finally:
        for m in patched:
            del m.forward


def trainable_copies_of_inference_tensors(module: torch.nn.Module) -> None:
    """Checkpoints loaded inside a ComfyUI run are created under ``torch.inference_mode``: their
    weights are inference tensors, which autograd cannot save for backward. Swap each for a normal
    copy (once; the copies stay in the model and serve inference the same)."""
    for child in module.modules():
        for name, p in list(child._parameters.items()):
            if p is not None and p.is_inference():
                child._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
        for name, b in list(child._buffers.items()):
            if b is not None and b.is_inference():
                child._buffers[name] = b.clone()


def model_family(model_patcher) -> str:
    cfg = getattr(model_patcher.model, "model_config", None)
    ctx = (getattr(cfg, "unet_config", None) or {}).get("context_dim")
    fam = CONTEXT_FAMILY.get(ctx)
    if fam is None:
        raise ProductSceneError(
            f"model: a UNet with context width {ctx} is not supported for training; expected SD1.5 (768), "
            f"SD2.x (1024) or SDXL (2048)")
    return fam


class ComfyTrainingHost:
    """``DiffusionHost`` for a ComfyUI model / CLIP / VAE (see the module docstring)."""

    lora_prefix = "diffusion_model."

    def __init__(self, model, clip, vae=None):
        if model is None or clip is None:
            raise ProductSceneError("model/clip: training needs a model and its CLIP (load a checkpoint)")
        self.family = model_family(model)
        widths = {ENCODER_OF_TOKENIZER_KEY[k]: w for k, w in clip_widths(clip).items()}
        self._embed_word = token_embedding_fn(clip)
        clip_family = family_of_encoders(widths)
        if clip_family != self.family:
            raise ProductSceneError(
                f"clip: its text encoders {widths} belong to {clip_family or 'an unsupported model'}, but the "
                f"model is {self.family}; use the CLIP of the same checkpoint")
        self.encoders = check_family(self.family)
        self.widths_by_key = {TOKENIZER_KEYS[e]: w for e, w in self.encoders.items()}
        self.model = install(model, SceneAttention())  # trampolines on every attn2 layer
        self.clip = clip
        self.vae = vae
        self.base = self.model.model
        self.unet = self.base.diffusion_model
        self.sampling = self.base.model_sampling
        self.num_timesteps = int(len(self.sampling.sigmas)) if hasattr(self.sampling, "sigmas") else 1000
        self.device = torch.device(self.model.load_device)
        self._tokens_cache: dict = {}
        self._loaded = False

    # -- session -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, gradient_checkpoint: bool = False):
        """Load the model on its device, freeze its weights, enable grad; undo on exit."""
        with training_mode():
            mm.load_models_gpu([self.model], memory_required=0, force_full_load=True)
            self._loaded = True
            for module in (self.base, self.clip.cond_stage_model):
                trainable_copies_of_inference_tensors(module)
            flags = [(p, p.requires_grad) for p in self.base.parameters()]
            for p, _ in flags:
                p.requires_grad_(False)
            blocks = []
            if gradient_checkpoint:
                for seq in list(self.unet.input_blocks) + [self.unet.middle_block] + list(self.unet.output_blocks):
                    blocks.append(seq)
            try:
                with gradient_checkpointing(blocks), differentiable_clip(self.clip):
                    yield self
            finally:
                for p, flag in flags:
                    p.requires_grad_(flag)

    # -- text ----------------------------------------------------------------------------------
    def token_vectors(self, word: str) -> dict[str, torch.Tensor]:
        """The CLIP's own embeddings of ``word``'s tokens (``[0, width]`` when it has none)."""
        try:
            return self._embed_word(word)
        except ProductSceneError:
            return {e: torch.zeros(0, w) for e, w in self.encoders.items()}

    def _template_tokens(self, template: str, n: int):
        key = (template, n)
        hit = self._tokens_cache.get(key)
        if hit is None:
            dummy = {k: torch.zeros(n, w) for k, w in self.widths_by_key.items()}
            tokens, rows, context_rows = tokenize_with_identifier(self.clip.tokenize, template, dummy, self.widths_by_key)
            positions = {k: [(c, p) for c, chunk in enumerate(chunks) for p, t in enumerate(chunk)
                             if isinstance(t[0], torch.Tensor)] for k, chunks in tokens.items()}
            hit = (tokens, tuple(rows), int(context_rows), positions)
            self._tokens_cache[key] = hit
        return hit

    def encode(self, template: str, vectors) -> Encoded:
        if not vectors:
            raise ProductSceneError("encode: no prompts to encode")
        n = int(next(iter(vectors[0].values())).shape[0])
        tokens, rows, context_rows, positions = self._template_tokens(template, n)
        conds, pooled = [], []
        for vec in vectors:
            live = {}
            for key, chunks in tokens.items():
                new = [list(chunk) for chunk in chunks]
                v = vec[ENCODER_OF_TOKENIZER_KEY[key]]
                for i, (c, p) in enumerate(positions[key]):
                    new[c][p] = (v[i],) + tuple(new[c][p][1:])
                live[key] = new
            cond, pool = self.clip.encode_from_tokens(live, return_pooled=True)
            conds.append(cond)
            pooled.append(pool)
        cond = torch.cat(conds).to(self.device)
        pooled_t = torch.cat(pooled).to(self.device) if all(p is not None for p in pooled) else None
        return Encoded(cond=cond, pooled=pooled_t, rows=rows, context_rows=context_rows)

    # -- diffusion -----------------------------------------------------------------------------
    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.sampling.sigma(timesteps.float()).to(self.device, torch.float32)

    def add_noise(self, latent, noise, sigma):
        return self.sampling.noise_scaling(sigma, noise, latent)

    def predict_noise(self, x, sigma, encoded: Encoded, scene=None):
        options = dict(self.model.model_options.get("transformer_options", {}))
        options[SCENE_KEY] = scene
        options["cond_or_uncond"] = [0]
        options["sigmas"] = sigma
        kwargs = {}
        if self.family == "sdxl":
            h, w = x.shape[-2] * 8, x.shape[-1] * 8
            if encoded.pooled is None:
                raise ProductSceneError("clip: SDXL training needs the pooled text output")
            kwargs["y"] = self.base.encode_adm(pooled_output=encoded.pooled, width=w, height=h,
                                               target_width=w, target_height=h).to(self.device)
        denoised = self.base.apply_model(x, sigma, c_crossattn=encoded.cond, transformer_options=options, **kwargs)
        s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(denoised.dtype)
        return (x.to(denoised.dtype) - denoised) / s

    # -- images --------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ProductSceneError("vae: training needs the VAE of the checkpoint to encode the images")
        with torch.inference_mode(False), torch.no_grad():
            latent = self.vae.encode(images[..., :3])
            return self.base.process_latent_in(latent.float()).cpu()

    @functools.cached_property
    def latent_namespace(self) -> str:
        """Identifies the VAE (and latent scaling) so a cache never mixes two VAEs."""
        h = hashlib.sha1(self.family.encode())
        if self.vae is not None:
            sd = self.vae.first_stage_model.state_dict()
            for k in sorted(sd)[:4] + sorted(sd)[-4:]:
                t = sd[k].detach().float().flatten()
                h.update(k.encode())
                h.update(f"{t.numel()}:{float(t[:64].sum()):.6e}:{float(t.abs().sum()):.6e}".encode())
        return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ runs
class ComfyProgress:
    """Engine progress -> ComfyUI progress bar (canvas) and an optional extra callback."""

    def __init__(self, total: int, extra=None):
        self.bar = comfy.utils.ProgressBar(total)
        self.extra = extra

    def __call__(self, step, total, loss):
        self.bar.update_absolute(step, total)
        if self.extra is not None:
            self.extra(step, total, loss)


@dataclass
class CategoryRun:
    library: str | None
    result: object
    report: object
    recipe: object
    graph: torch.Tensor


def check_data(data: str, layout: str, split: str = "train"):
    """Open the data set and check every file; raise one ProductSceneError listing every problem."""
    ds = open_dataset(data, layout, split)
    report = check(ds)
    report.raise_if_problems()
    return ds, report


def train_categories(model, clip, vae, data: str, layout: str, out_path: str, *, config: CategoryConfig,
                     seed: int = 0, checkpoint_path: str | None = None, checkpoint_every: int = 0,
                     resume: bool | str = False, cache_dir: str, autocast="auto", progress=None,
                     should_stop=None, license: str | None = None, gradient_checkpoint: bool = False,
                     split: str = "train") -> CategoryRun:
    """Check the data, train the category library, write it to ``out_path``.

    Data-set problems raise before any model work and nothing is written. When ``should_stop``
    ends the run early, the checkpoint is saved and ``library`` is None (the caller re-raises the
    host's interrupt). ``resume``: True = from ``checkpoint_path`` if it exists, or a path.
    """
    ds, report = check_data(data, layout, split)
    host = ComfyTrainingHost(model, clip, vae)
    resume_from = None
    if resume:
        resume_from = resume if isinstance(resume, (str, os.PathLike)) else checkpoint_path
        if resume_from is None or not os.path.isfile(resume_from):
            if isinstance(resume, (str, os.PathLike)):
                raise ProductSceneError(f"resume: checkpoint {resume!r} not found")
            resume_from = None  # nothing to resume yet: start fresh
    with host.session(gradient_checkpoint=gradient_checkpoint):
        cache = LatentCache(cache_dir, ds, host.encode_images, int(config.resolution), namespace=host.latent_namespace)
        recipe = CategoryRecipe(host, CachedSource(cache), ds.categories, config, seed=seed)
        trainer = Trainer(recipe, config.phases(), seed=seed, device=host.device, autocast=autocast,
                          checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
                          progress=progress, should_stop=should_stop, name="categories")
        result = trainer.run(resume=resume_from)
    graph = loss_graph(result.history)
    if result.cancelled:
        return CategoryRun(None, result, report, recipe, graph)
    if license is None and layout == "bg60k":
        license = BG60K_LICENSE
    summary = {
        "recipe": "categories", "steps": result.steps_done, "seed": seed, "images": len(ds),
        "categories": len(ds.categories), "layout": layout, "resolution": int(config.resolution),
        "final_loss": (sum(result.history[-20:]) / len(result.history[-20:])) if result.history else None,
        "first_loss": (sum(result.history[:20]) / len(result.history[:20])) if result.history else None,
        "config": recipe.describe()["config"], "latent_cache": {"hits": cache.hits, "misses": cache.misses},
    }
    path = recipe.write_library(out_path, training=summary, license=license)
    return CategoryRun(path, result, report, recipe, graph)
