"""Training recipes run by :class:`productscene.train.engine.Trainer`, and the host interface
they use (:class:`DiffusionHost`). The ComfyUI adapter (``nodes/training_host.py``) implements the
host; a diffusers adapter could implement the same protocol."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ContextManager, Mapping, Protocol, Sequence, runtime_checkable

import torch

from ...prompt import Prompt


@dataclass
class Encoded:
    """A differentiable text encoding of a batch of prompts."""
    cond: torch.Tensor                 # [B, rows, context_width]
    pooled: torch.Tensor | None        # [B, pooled_width] (SDXL needs it) or None
    rows: tuple[Mapping[str, tuple[int, ...]], ...]   # per prompt: {placeholder: its rows}
    context_rows: int                  # rows of each encoded prompt

    def select(self, index: torch.Tensor) -> "Encoded":
        """The prompts at ``index`` (e.g. one encoding per category, gathered per sample)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return Encoded(self.cond[idx.to(self.cond.device)],
                       self.pooled[idx.to(self.pooled.device)] if self.pooled is not None else None,
                       tuple(self.rows[int(i)] for i in idx), self.context_rows)


@runtime_checkable
class DiffusionHost(Protocol):
    """What a recipe needs from the diffusion framework.

    Optional: ``lora_targets`` (the LoRA's target patterns when a recipe keeps the default
    ``lora.DEFAULT_TARGETS``: a DiT host names its joint attention's projections) and
    ``euler_slope(x, sigma, encoded, scene)`` (dx/dsigma for previews, where the model's ODE slope
    is not its noise prediction: flow matching)."""
    family: str                        # sd15 | sd2 | sdxl | flux | z_image
    encoders: Mapping[str, int]        # library encoder name -> width, e.g. {"clip_l": 768}
    device: torch.device
    unet: torch.nn.Module              # module tree that LoRA targets are searched in
    lora_prefix: str                   # key prefix of that tree in ComfyUI LoRA files ("diffusion_model.")
    num_timesteps: int
    latent_namespace: str              # identifies the VAE (latent caches never mix two)
    attention_downsample: int          # latent size / size of the lowest-resolution cross-attention layers

    def session(self, lora=None, latent_shape: Sequence[int] | None = None,
                gradient_checkpoint: bool = False) -> ContextManager:
        """While inside: the model (with ``lora``'s weight functions attached once) and its text
        encoder loaded on ``device`` for training batches of ``latent_shape``, base weights frozen,
        gradients on. Everything is undone on exit."""

    def token_embeddings(self, word: str) -> Mapping[str, torch.Tensor]:
        """``{encoder: [t, width]}``: the word's token embeddings (no start/end tokens); raises
        ProductSceneError when the word has no tokens."""

    def encode(self, prompts: Sequence[Prompt]) -> Encoded:
        """Encode each prompt with its placeholders' vectors spliced in (one splicing path:
        ``productscene.prompt.PromptTemplate``). Gradients reach the vectors."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """VAE latents ``[B, C, h, w]`` (in the model's latent space) of ``[B, H, W, 3]`` images."""

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise levels of integer timesteps (on ``device``)."""

    def add_noise(self, latent: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The noisy latent the model sees at ``sigma``."""

    def predict_noise(self, x: torch.Tensor, sigma: torch.Tensor, encoded: Encoded, scene=None) -> torch.Tensor:
        """The model's noise prediction (``[B,C,h,w]``) with ``scene`` (a ``SceneAttention`` or None)
        acting on every cross-attention layer."""

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, 3]`` images (0..1, on the CPU) of latents in the model's latent space."""


PREVIEW_STEPS = 8


def sample_preview(host: DiffusionHost, encoded: Encoded, latent_shape: Sequence[int], generator: torch.Generator,
                   scene=None, steps: int = PREVIEW_STEPS) -> torch.Tensor:
    """What the model draws now for ``encoded``: a short Euler sample from pure noise (cond only,
    no CFG; ``scene`` on every cross-attention layer), decoded to ``[B, H, W, 3]``. For trainers'
    preview images; a few steps show the trend, not a finished picture."""
    t = torch.linspace(host.num_timesteps - 1, 0, int(steps)).round().long()
    sigmas = torch.cat([host.sigmas(t).float().cpu(), torch.zeros(1)])
    noise = torch.randn(tuple(latent_shape), generator=generator).to(host.device)
    x = host.add_noise(torch.zeros_like(noise), noise, sigmas[0].expand(noise.shape[0]).to(host.device))
    # the Euler step's slope dx/dsigma: the noise prediction on an eps model; a host whose model is
    # parameterised otherwise (flow matching: the velocity) gives it as ``euler_slope``
    slope = getattr(host, "euler_slope", host.predict_noise)
    for i in range(int(steps)):
        sigma = sigmas[i].expand(noise.shape[0]).to(host.device)
        eps = slope(x, sigma, encoded, scene).to(x.dtype)
        x = x + eps * float(sigmas[i + 1] - sigmas[i])
    return host.decode_images(x)
