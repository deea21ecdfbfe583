"""The same SceneAttention as a diffusers attention processor, for diffusers pipelines.

Only the cross-attention (``attn2``) processors of a ``UNet2DConditionModel`` are swapped; self
attention keeps whatever processor it had. Diffusers' pipelines batch classifier-free guidance as
``[uncond, cond]``, hence the default ``chunks=(1, 0)``; use ``(0,)`` without guidance.

The category gate is the same definition as in ComfyUI and in training: give ``CategoryGate`` the
prompt encoded without the identifier (``prompt.category_free_template``) as its free context, and
the prompt embeddings with it as ``contexts`` to gate only the cond rows that carry them. Product
positions attend the free context through each layer's own to_k / to_v.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .attention import LayerInfo, SceneAttention, downsampled_hw
from .errors import ProductSceneError


class SceneAttentionProcessor:
    """A diffusers attention processor running ``scene`` on one cross-attention layer."""

    def __init__(self, scene: SceneAttention, latent_hw: Sequence[int], chunks: Sequence[int] = (1, 0),
                 key: str = ""):
        self.scene = scene
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.chunks = tuple(chunks)
        self.key = key
        self._hw: dict[int, tuple[int, int]] = {}

    def layer_hw(self, positions: int) -> tuple[int, int]:
        hw = self._hw.get(positions)
        if hw is None:
            for factor in (1, 2, 4, 8, 16, 32, 64):
                h, w = downsampled_hw(self.latent_hw, factor)
                if h * w == positions:
                    hw = self._hw[positions] = (h, w)
                    break
            else:
                raise ProductSceneError(
                    f"latent_hw: a layer with {positions} positions does not belong to a {self.latent_hw} latent")
        return hw

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is None:
            raise ProductSceneError("SceneAttentionProcessor belongs on cross-attention (attn2) layers only")
        if attention_mask is not None:
            raise ProductSceneError("SceneAttentionProcessor: text attention masks are not supported")
        residual = hidden_states
        batch = hidden_states.shape[0]
        gated = self.scene.gated_rows(self.chunks, batch, encoder_hidden_states) if self.scene.gates else None

        def project(context):  # this layer's own key/value projections (the gates' free contexts)
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            return attn.to_k(context), attn.to_v(context)

        q = attn.to_q(hidden_states)
        k, v = project(encoder_hidden_states)
        layer = LayerInfo(key=self.key, heads=attn.heads, hw=self.layer_hw(hidden_states.shape[1]),
                          latent_hw=self.latent_hw, chunks=self.chunks, gated=gated)
        out = self.scene(q, k, v, layer, project=project)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_scene_processors(unet: torch.nn.Module, scene: SceneAttention, latent_hw: Sequence[int],
                             chunks: Sequence[int] = (1, 0)) -> int:
    """Put ``scene`` on every cross-attention layer of a diffusers UNet; returns how many."""
    processors = {}
    count = 0
    for name, processor in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            processors[name] = SceneAttentionProcessor(scene, latent_hw, chunks, key=name)
            count += 1
        else:
            processors[name] = processor
    if not count:
        raise ProductSceneError("unet: found no cross-attention (attn2) layers to gate")
    unet.set_attn_processor(processors)
    return count
