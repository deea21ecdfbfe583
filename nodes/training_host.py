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
import comfy.patcher_extension
import comfy.utils

from productscene.attention import SceneAttention
from productscene.errors import ProductSceneError
from productscene.library import check_family, family_of_encoders
from productscene.prompt import (ENCODER_OF_TOKENIZER_KEY, TOKENIZER_KEYS, Prompt, PromptTemplate,
                                 category_free_template, only_keys)
from productscene.train.engine import gradient_checkpointing
from productscene.train.lora import DIT_TARGETS
from productscene.train.recipes import Encoded
from .clip_text import clip_widths, word_token_embeddings
from .dit_host import dit_family, install_dit
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


def _t5_attention_forward(self, x, mask=None, past_bias=None, optimized_attention=None):
    """comfy.text_encoders.t5.T5LayerSelfAttention.forward without its in-place add."""
    output, past_bias = self.SelfAttention(self.layer_norm(x), mask=mask, past_bias=past_bias,
                                           optimized_attention=optimized_attention)
    return x + output, past_bias


def _t5_ff_forward(self, x):
    """comfy.text_encoders.t5.T5LayerFF.forward without its in-place add."""
    return x + self.DenseReluDense(self.layer_norm(x))


def _llama_block_forward(self, x, attention_mask=None, freqs_cis=None, optimized_attention=None,
                         past_key_value=None):
    """comfy.text_encoders.llama.TransformerBlock.forward of the ComfyUI versions that write the
    second residual into the block's input (``torch.add(..., out=x)``, no autograd), out of place."""
    h, present = self.self_attn(hidden_states=self.input_layernorm(x), attention_mask=attention_mask,
                                freqs_cis=freqs_cis, optimized_attention=optimized_attention,
                                past_key_value=past_key_value)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), present


def _out_of_place_forwards() -> dict:
    """The text-encoder layers whose forward adds in place, and an out-of-place forward for each
    (CLIP for every family; T5-XXL for Flux.1; Qwen3's blocks where ComfyUI adds into the input)."""
    import inspect
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.t5 as t5
    out = {comfy.clip_model.CLIPLayer: _clip_layer_forward, t5.T5LayerSelfAttention: _t5_attention_forward,
           t5.T5LayerFF: _t5_ff_forward}
    if "out=output" in inspect.getsource(llama.TransformerBlock.forward):
        out[llama.TransformerBlock] = _llama_block_forward
    return out


@contextlib.contextmanager
def differentiable_clip(clip):
    """Let gradients pass ComfyUI's text encoders (to spliced vectors) while inside: every layer of
    ``clip`` that adds in place (CLIP's ``CLIPLayer``, T5's self-attention and feed-forward layers)
    runs an out-of-place forward. Restored on exit."""
    patched = []
    forwards = _out_of_place_forwards()
    try:
        for m in clip.cond_stage_model.modules():
            forward = next((f for cls, f in forwards.items() if isinstance(m, cls)), None)
            if forward is not None and "forward" not in m.__dict__:
                m.forward = forward.__get__(m)
                patched.append(m)
        yield clip
    finally:
        for m in patched:
            del m.forward


@contextlib.contextmanager
def norms_read_copies(root: torch.nn.Module):
    """While inside, every normalisation layer under ``root`` reads a copy of its input. ComfyUI's
    Flux blocks add their residuals in place (``img += ...``, ``x += ...``) into the tensor their
    pre-norms saved for backward, so autograd fails; with the norm saving its own copy, the
    residual stream is free to be updated in place (same numbers, one copy per norm)."""
    def copy_input(module, args):
        return (args[0].clone(),) + tuple(args[1:])

    handles = [m.register_forward_pre_hook(copy_input) for m in root.modules()
               if "Norm" in type(m).__name__]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


STREAM_ARGS = ("img", "txt", "x")  # the residual streams a Flux block updates in place


@contextlib.contextmanager
def blocks_read_copies(blocks):
    """While inside, each block runs on copies of the residual streams it is given (its first
    argument, and ``img``/``txt``/``x``), so its in-place residual adds never touch its caller's
    tensors: a checkpointed block (``gradient_checkpointing``, entered after this) recomputes from
    inputs that are still as they were."""
    def wrap(block):
        forward = type(block).forward

        def run(*args, **kwargs):
            args = tuple(a.clone() if i == 0 and torch.is_tensor(a) else a for i, a in enumerate(args))
            kwargs = {k: v.clone() if k in STREAM_ARGS and torch.is_tensor(v) else v for k, v in kwargs.items()}
            return forward(block, *args, **kwargs)
        return run

    patched = []
    try:
        for block in blocks:
            if "forward" not in block.__dict__:
                block.forward = wrap(block)
                patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward


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
            blocks = self.checkpoint_blocks() if gradient_checkpoint else []
            with trainable_weights(self.base, self.clip.cond_stage_model), loaded_once(self.clip), \
                    self.differentiable_model(), gradient_checkpointing(blocks), differentiable_clip(self.clip), \
                    (lora.attached() if lora is not None else contextlib.nullcontext()):
                flags = [(p, p.requires_grad) for p in self.base.parameters()]
                for p, _ in flags:
                    p.requires_grad_(False)
                try:
                    yield self
                finally:
                    for p, flag in flags:
                        p.requires_grad_(flag)

    def differentiable_model(self):
        """What the diffusion model needs so that autograd can pass it (nothing, on a UNet)."""
        return contextlib.nullcontext()

    def checkpoint_blocks(self) -> list:
        """The blocks gradient checkpointing recomputes: every input, middle and output block."""
        return list(self.unet.input_blocks) + [self.unet.middle_block] + list(self.unet.output_blocks)

    # -- text ----------------------------------------------------------------------------------
    def token_embeddings(self, word: str) -> dict[str, torch.Tensor]:
        return self._embed_word(word)

    def _template(self, template: str, counts: dict) -> PromptTemplate:
        key = (template, tuple(sorted(counts.items())))
        hit = self._templates.get(key)
        if hit is None:
            hit = self._templates[key] = PromptTemplate(self.template_tokenize, template, counts, self.widths_by_key)
        return hit

    def encode(self, prompts: Sequence[Prompt]) -> Encoded:
        if not prompts:
            raise ProductSceneError("encode: no prompts to encode")
        conds, pooled, rows = [], [], []
        for prompt in prompts:
            tokens, prompt_rows = self.tokens(prompt)
            rows.append(prompt_rows)
            cond, pool = self.clip.encode_from_tokens(tokens, return_pooled=True)
            conds.append(cond)
            pooled.append(pool)
        lengths = {c.shape[1] for c in conds}
        if len(lengths) != 1:
            raise ProductSceneError(f"encode: the prompts of one batch encode to different lengths {sorted(lengths)}")
        cond = torch.cat(conds).to(self.device)
        pooled_t = torch.cat(pooled).to(self.device) if all(p is not None for p in pooled) else None
        return Encoded(cond=cond, pooled=pooled_t, rows=tuple(rows), context_rows=int(cond.shape[1]))

    @property
    def template_tokenize(self):
        """The tokenizer a template with vectors is tokenized by (every encoder of the CLIP)."""
        return self.clip.tokenize

    def tokens(self, prompt: Prompt) -> tuple[dict, dict]:
        """``(tokens, {placeholder: rows})`` of one prompt, its vectors spliced in."""
        if not prompt.vectors:
            return self.clip.tokenize(prompt.template), {}
        counts = {name: int(next(iter(v.values())).shape[0]) for name, v in prompt.vectors.items()}
        template = self._template(prompt.template, counts)
        tokens = template.splice({name: {TOKENIZER_KEYS[e]: t for e, t in v.items()}
                                  for name, v in prompt.vectors.items()})
        return tokens, template.rows

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


# the gate's DiT family (nodes/dit_host.py) -> the library family
LIBRARY_FAMILY_OF_DIT = {"flux": "flux", "zimage": "z_image"}
FLUX_GUIDANCE = 3.5  # Flux.1-dev's distilled guidance during training (FluxGuidance's default)


def training_host(model, clip, vae=None):
    """The training host for ``model``: :class:`ComfyDitTrainingHost` for a DiT the gate knows
    (Flux.1, Z-Image: told by ComfyUI's model class), else :class:`ComfyTrainingHost` (a UNet)."""
    if model is not None and dit_family(model) is not None:
        return ComfyDitTrainingHost(model, clip, vae)
    return ComfyTrainingHost(model, clip, vae)


class ComfyDitTrainingHost(ComfyTrainingHost):
    """``DiffusionHost`` for a ComfyUI DiT (Flux.1, Z-Image) and its text encoder.

    What differs from the UNet host: the family comes from the model's class (``dit_family``); the
    identifier is spliced only into the encoder that carries the prompt (T5-XXL / Qwen3-4B), other
    encoders (Flux.1's CLIP-L, a global vector) get the category-free prompt; the gate acts through
    the DiT walker (``install_dit``: ``[T | F | image]`` with one block mask per joint attention);
    the model is a flow-matching one (``CONST`` sampling), so the noise prediction is recovered from
    the denoised output through the model's own ``noise_scaling``; timesteps 0..999 index its sigma
    table (Flux.1 keeps 10000 entries); the LoRA goes on the joint attention's projections
    (``productscene.train.lora.DIT_TARGETS``)."""

    def __init__(self, model, clip, vae=None):
        if model is None or clip is None:
            raise ProductSceneError("model/clip: training needs a model and its text encoder")
        self.dit = dit_family(model)
        if self.dit is None:
            raise ProductSceneError("model: not a DiT this trainer knows; expected Flux.1 or Z-Image")
        self.family = LIBRARY_FAMILY_OF_DIT[self.dit]
        self.encoders = check_family(self.family)
        widths = {ENCODER_OF_TOKENIZER_KEY.get(k, k): w for k, w in clip_widths(clip).items()}
        clip_family = family_of_encoders(widths)
        if clip_family != self.family:
            raise ProductSceneError(
                f"clip: its text encoders {widths} belong to {clip_family or 'an unsupported model'}, but the "
                f"model is {self.family}; use the text encoder of the model (Flux.1: DualCLIPLoader type flux, "
                f"Z-Image: CLIPLoader type lumina2)")
        self._embed_word = word_token_embeddings(clip, encoders=self.encoders)
        self.widths_by_key = {TOKENIZER_KEYS[e]: w for e, w in self.encoders.items()}
        self.lora_targets = DIT_TARGETS[self.family]
        self.model = install_dit(model, SceneAttention(), self.dit)
        self.clip = clip
        self.vae = vae
        self.base = self.model.model
        self.unet = self.base.diffusion_model
        self.sampling = self.base.model_sampling
        self.num_timesteps = 1000
        self.device = torch.device(self.model.load_device)
        self._templates: dict = {}

    @property
    def attention_downsample(self) -> int:
        return int(self.unet.patch_size)

    @contextlib.contextmanager
    def differentiable_model(self):
        """Norms and Flux's blocks read copies (:func:`norms_read_copies`, :func:`blocks_read_copies`),
        and ComfyUI's own training flag is up
        where it has one (``model_management.in_training``: newer ComfyUI then applies RoPE with
        plain torch ops instead of a fused kernel that has no backward)."""
        had = hasattr(mm, "in_training")
        previous = getattr(mm, "in_training", None)
        if had:
            mm.in_training = True
        try:
            with norms_read_copies(self.unet), \
                    blocks_read_copies(self.checkpoint_blocks() if self.dit == "flux" else []):
                yield
        finally:
            if had:
                mm.in_training = previous

    def checkpoint_blocks(self) -> list:
        if self.dit == "flux":
            return list(self.unet.double_blocks) + list(self.unet.single_blocks)
        return list(self.unet.layers)

    # -- text ----------------------------------------------------------------------------------
    @property
    def template_tokenize(self):
        return only_keys(self.clip.tokenize, self.widths_by_key)

    def tokens(self, prompt: Prompt) -> tuple[dict, dict]:
        tokens, rows = super().tokens(prompt)
        others = set(self.clip.tokenize("")) - set(tokens)
        if others:  # global-only encoders: the prompt without any placeholder
            free = prompt.template
            for name in prompt.vectors:
                free = category_free_template(free, name)
            free_tokens = self.clip.tokenize(free)
            tokens = {**{k: free_tokens[k] for k in others}, **tokens}
        return tokens, rows

    # -- diffusion -----------------------------------------------------------------------------
    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        table = self.sampling.sigmas
        n = int(len(table))
        idx = ((timesteps.long().cpu() + 1) * n // self.num_timesteps - 1).clamp(0, n - 1)
        return table.detach().cpu()[idx].to(self.device, torch.float32)

    def _denoised(self, x, sigma, encoded: Encoded, scene=None):
        options = dict(self.model.model_options.get("transformer_options", {}))
        options[SCENE_KEY] = scene
        options["cond_or_uncond"] = [0]
        options["sigmas"] = sigma
        options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(
            options.get("wrappers", {}), self.model.wrappers, copy_dict1=True)
        kwargs = {}
        if self.dit == "flux":
            if encoded.pooled is None:
                raise ProductSceneError("clip: Flux.1 training needs the pooled CLIP-L output of its text encoder")
            kwargs["y"] = encoded.pooled.to(self.device)
            kwargs["guidance"] = torch.full((x.shape[0],), FLUX_GUIDANCE, device=self.device)
        else:
            kwargs["num_tokens"] = int(encoded.cond.shape[1])
        return self.base.apply_model(x, sigma, c_crossattn=encoded.cond, transformer_options=options, **kwargs)

    def predict_noise(self, x, sigma, encoded: Encoded, scene=None):
        """eps of ``x = noise_scaling(sigma, eps, x0)`` (flow: ``sigma eps + (1 - sigma) x0``) with
        the model's ``x0`` (its denoised output): ``(x - noise_scaling(sigma, 0, x0)) / sigma``."""
        denoised = self._denoised(x, sigma, encoded, scene)
        clean = self.sampling.noise_scaling(sigma.to(denoised.dtype), torch.zeros_like(denoised), denoised)
        s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(denoised.dtype)
        return (x.to(denoised.dtype) - clean) / s

    def euler_slope(self, x, sigma, encoded: Encoded, scene=None):
        """dx/dsigma of the model's ODE, ``(x - x0) / sigma`` (the velocity of a flow model)."""
        denoised = self._denoised(x, sigma, encoded, scene)
        s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(denoised.dtype)
        return (x.to(denoised.dtype) - denoised) / s


class ComfyProgress:
    """Engine progress -> ComfyUI progress bar (canvas) and an optional extra callback."""

    def __init__(self, total: int, extra=None):
        self.bar = comfy.utils.ProgressBar(total)
        self.extra = extra

    def __call__(self, step, total, loss=None):
        self.bar.update_absolute(step, total)
        if self.extra is not None:
            self.extra(step, total, loss)
