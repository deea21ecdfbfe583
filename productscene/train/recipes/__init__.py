"""Training recipes run by :class:`productscene.train.engine.Trainer`, and the host interface
they use (:class:`DiffusionHost`). The ComfyUI adapter (``nodes/training_host.py``) implements the
host; a diffusers adapter could implement the same protocol."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch


@dataclass
class Encoded:
    """A differentiable text encoding of a batch of prompts."""
    cond: torch.Tensor                 # [B, rows, context_width]
    pooled: torch.Tensor | None        # [B, pooled_width] (SDXL needs it) or None
    rows: tuple[int, ...]              # rows of the identifier (same for every prompt of the batch)
    context_rows: int                  # rows of each encoded prompt


@runtime_checkable
class DiffusionHost(Protocol):
    """What a recipe needs from the diffusion framework."""
    family: str                        # sd15 | sd2 | sdxl
    encoders: Mapping[str, int]        # library encoder name -> width, e.g. {"clip_l": 768}
    device: torch.device
    unet: torch.nn.Module              # module tree that LoRA targets are searched in
    lora_prefix: str                   # key prefix of that tree in ComfyUI LoRA files ("diffusion_model.")
    num_timesteps: int

    def token_vectors(self, word: str) -> Mapping[str, torch.Tensor]:
        """``{encoder: [n_tokens, width]}``: the word's token embeddings (no start/end tokens)."""

    def encode(self, template: str, vectors: Sequence[Mapping[str, torch.Tensor]]) -> Encoded:
        """Encode ``template`` (holding ``{category}`` once) for each entry of ``vectors``
        (``{encoder: [n, width]}``), splicing the vectors in at ``{category}``. Gradients reach the
        vectors."""

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise levels of integer timesteps (on ``device``)."""

    def add_noise(self, latent: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The noisy latent the model sees at ``sigma``."""

    def predict_noise(self, x: torch.Tensor, sigma: torch.Tensor, encoded: Encoded, scene=None) -> torch.Tensor:
        """The model's noise prediction (``[B,C,h,w]``) with ``scene`` (a ``SceneAttention`` or None)
        acting on every cross-attention layer."""
