"""The ComfyUI adapter for training (shared by the training nodes and the command line).

From a ModelPatcher, a CLIP and a VAE it builds what the host-free engine and recipes need
(:class:`ComfyTrainingHost`, the ``DiffusionHost`` of ``productscene.train.recipes``), using
ComfyUI's own plumbing:

* one training session per run (:meth:`ComfyTrainingHost.session`): the UNet and the text encoder
  loaded together with ``load_models_gpu`` and a memory estimate for the training batch (so other
  models are offloaded first), the recipe's LoRA attached once (forward hooks; why not weight
  wrappers: ``productscene/train/lora.py``), inference-tensor weights swapped for trainable copies
  only while the session lasts;
* text: prompts spliced through ``productscene.prompt.PromptTemplate`` and encoded by
  ``clip.encode_from_tokens`` (the autograd graph reaches the spliced vectors);
* the noise prediction through ``model.model.apply_model`` with the model's own
  ``model_sampling`` (eps recovered from the denoised output: ``(x - denoised) / sigma``; SDXL gets
  its adm ``y``), the step's ``SceneAttention`` passed in ``transformer_options``;
* VAE latents for the cache (scaled into the model's latent space with ``process_latent_in``);
* progress through ``comfy.utils.ProgressBar``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
from typing import Sequence

import torch

import comfy.clip_model
import comfy.model_management as mm
import comfy.utils

from productscene.attention import SceneAttention
from productscene.errors import ProductSceneError
from productscene.library import check_family, family_of_encoders
from productscene.prompt import ENCODER_OF_TOKENIZER_KEY, TOKENIZER_KEYS, Prompt, PromptTemplate
from productscene.train.engine import gradient_checkpointing
from productscene.train.recipes import Encoded
from .clip_text import clip_widths, word_token_embeddings
from .host import SCENE_KEY, install

CONTEXT_FAMILY = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
# Activations kept for the backward pass, as a multiple of ComfyUI's own inference estimate for the
# same latent batch (``BaseModel.memory_required``). Measured on the full SD1.5 UNet in float32 at a
# 32x32 latent: 490 MiB of saved activations against ComfyUI's 41 MiB estimate for that shape.
TRAINING_MEMORY_FACTOR = 12.0


def _clip_layer_forward(self, x, mask=None, optimized_attention=None):
    """comfy.clip_model.CLIPLayer.forward without its in-place adds (``x += ...`` overwrites the
    input that layer_norm saved for backward, so autograd fails); same numbers."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


@contextlib.contextmanager
def differentiable_clip(clip):
    """Let gradients pass ComfyUI's CLIP text encoders (to spliced vectors) while inside: every
    ``CLIPLayer`` of ``clip`` runs an out-of-place forward. Restored on exit."""
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


@contextlib.contextmanager
def trainable_weights(*modules: torch.nn.Module):
    """Checkpoints loaded inside a ComfyUI run are created under ``torch.inference_mode``: their
    weights are inference tensors, which autograd cannot save for backward. While inside, each is
    replaced by a normal copy; on exit by an inference copy again (the same values, as ComfyUI left
    them), so the shared model is what it was and never holds both copies for long."""
    swapped = []
    for module in modules:
        for child in module.modules():
            for table in (child._parameters, child._buffers):
                for name, t in list(table.items()):
                    if t is not None and t.is_inference():
                        copy = t.clone()
                        table[name] = torch.nn.Parameter(copy, requires_grad=t.requires_grad) \
                            if isinstance(t, torch.nn.Parameter) else copy
                        swapped.append((table, name))
    try:
        yield
    finally:
        with torch.inference_mode():
            for table, name in swapped:
                t = table[name]
                copy = t.detach().clone()
                table[name] = torch.nn.Parameter(copy, requires_grad=t.requires_grad) \
                    if isinstance(t, torch.nn.Parameter) else copy


@contextlib.contextmanager
def loaded_once(clip):
    """``clip.encode_from_tokens`` calls ComfyUI's loader on every encode; inside a training session
    (which loaded the text encoder with the UNet) that call could offload the UNet in the middle of
    a step when memory is tight. While inside, the CLIP reports itself loaded instead."""
    clip.load_model = lambda *args, **kwargs: clip.patcher
    try:
        yield
    finally:
        del clip.load_model


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
        self._embed_word = word_token_embeddings(clip)
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
        self._templates: dict = {}

    @functools.cached_property
    def attention_downsample(self) -> int:
        """How many times the lowest-resolution cross-attention layers of the input/output blocks
        are below the latent (SD1.5/SD2.x: 4, 16x16 at 512 px; SDXL: 4, 32x32 at 1024 px; the
        middle block is not counted, as Break-A-Scene's published code leaves it out)."""
        cfg = self.base.model_config.unet_config
        depth, blocks = list(cfg.get("transformer_depth") or []), cfg.get("num_res_blocks")
        levels = len(cfg["channel_mult"])
        blocks = [blocks] * levels if isinstance(blocks, int) else list(blocks)
        lowest, at = None, 0
        for level in range(levels):
            if any(d > 0 for d in depth[at:at + blocks[level]]):
                lowest = level
            at += blocks[level]
        if lowest is None:
            raise ProductSceneError("model: this UNet has no cross-attention layer to train concept tokens on")
        return 2 ** lowest

    # -- session -------------------------------------------------------------------------------
    def training_memory(self, latent_shape: Sequence[int] | None, lora=None) -> float:
        """Bytes a training step needs beside the loaded weights: saved activations for the batch
        (ComfyUI's inference estimate times ``TRAINING_MEMORY_FACTOR``) and the trainables with
        their gradients and AdamW state."""
        if latent_shape is None:
            return 0.0
        activations = self.base.memory_required(list(latent_shape)) * TRAINING_MEMORY_FACTOR
        trainables = 4 * sum(p.numel() * p.element_size() for p in lora.parameters()) if lora is not None else 0
        return float(activations + trainables)

    @contextlib.contextmanager
    def session(self, lora=None, latent_shape=None, gradient_checkpoint: bool = False):
        """Load the UNet and text encoder for training, attach ``lora`` once, freeze the base
        weights, enable grad; undo on exit."""
        with torch.inference_mode(False), torch.enable_grad():
            mm.load_models_gpu([self.model, self.clip.patcher],
                               memory_required=self.training_memory(latent_shape, lora), force_full_load=True)
            blocks = list(self.unet.input_blocks) + [self.unet.middle_block] + list(self.unet.output_blocks) \
                if gradient_checkpoint else []
            with trainable_weights(self.base, self.clip.cond_stage_model), loaded_once(self.clip), \
                    gradient_checkpointing(blocks), differentiable_clip(self.clip), \
                    (lora.attached() if lora is not None else contextlib.nullcontext()):
                flags = [(p, p.requires_grad) for p in self.base.parameters()]
                for p, _ in flags:
                    p.requires_grad_(False)
                try:
                    yield self
                finally:
                    for p, flag in flags:
                        p.requires_grad_(flag)

    # -- text ----------------------------------------------------------------------------------
    def token_embeddings(self, word: str) -> dict[str, torch.Tensor]:
        return self._embed_word(word)

    def _template(self, template: str, counts: dict) -> PromptTemplate:
        key = (template, tuple(sorted(counts.items())))
        hit = self._templates.get(key)
        if hit is None:
            hit = self._templates[key] = PromptTemplate(self.clip.tokenize, template, counts, self.widths_by_key)
        return hit

    def encode(self, prompts: Sequence[Prompt]) -> Encoded:
        if not prompts:
            raise ProductSceneError("encode: no prompts to encode")
        conds, pooled, rows = [], [], []
        for prompt in prompts:
            if prompt.vectors:
                counts = {name: int(next(iter(v.values())).shape[0]) for name, v in prompt.vectors.items()}
                template = self._template(prompt.template, counts)
                tokens = template.splice({name: {TOKENIZER_KEYS[e]: t for e, t in v.items()}
                                          for name, v in prompt.vectors.items()})
                rows.append(template.rows)
            else:
                tokens = self.clip.tokenize(prompt.template)
                rows.append({})
            cond, pool = self.clip.encode_from_tokens(tokens, return_pooled=True)
            conds.append(cond)
            pooled.append(pool)
        lengths = {c.shape[1] for c in conds}
        if len(lengths) != 1:
            raise ProductSceneError(f"encode: the prompts of one batch encode to different lengths {sorted(lengths)}")
        cond = torch.cat(conds).to(self.device)
        pooled_t = torch.cat(pooled).to(self.device) if all(p is not None for p in pooled) else None
        return Encoded(cond=cond, pooled=pooled_t, rows=tuple(rows), context_rows=int(cond.shape[1]))

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

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ProductSceneError("vae: previews need the VAE of the checkpoint to decode the latents")
        with torch.inference_mode(False), torch.no_grad():
            images = self.vae.decode(self.base.process_latent_out(latents.float()))
            return images.reshape(-1, *images.shape[-3:]).float().clamp(0, 1).cpu()

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


class ComfyProgress:
    """Engine progress -> ComfyUI progress bar (canvas) and an optional extra callback."""

    def __init__(self, total: int, extra=None):
        self.bar = comfy.utils.ProgressBar(total)
        self.extra = extra

    def __call__(self, step, total, loss=None):
        self.bar.update_absolute(step, total)
        if self.extra is not None:
            self.extra(step, total, loss)
