"""The category gate as a diffusers attention processor (issue 3, evidence 3)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from productscene.attention import CategoryGate, SceneAttention
from productscene.diffusers_processor import install_scene_processors

ROWS = (3, 4)
CONTEXT = 77


def small_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    ).eval()


def record_cross_attention(monkeypatch):
    """Replace torch's SDPA with an explicit one that records cross-attention probabilities."""
    calls = []

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        logits = (q @ k.transpose(-1, -2)) * (scale or 1.0 / math.sqrt(q.shape[-1]))
        if attn_mask is not None:
            logits = logits + attn_mask
        probs = logits.softmax(-1)
        if k.shape[-2] == CONTEXT:
            calls.append(probs.detach())
        return probs @ v

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def run(unet, monkeypatch, latent_hw):
    calls = record_cross_attention(monkeypatch)
    torch.manual_seed(1)
    x = torch.randn(4, 4, *latent_hw)  # [uncond, uncond, cond, cond], as diffusers batches CFG
    context = torch.randn(4, CONTEXT, 32)
    with torch.no_grad():
        unet(x, 10, encoder_hidden_states=context)
    monkeypatch.undo()
    return calls


def masks(latent_hw):
    h, w = latent_hw[0] * 8, latent_hw[1] * 8
    m = torch.zeros(2, h, w)
    m[0, : h // 2, : w // 3] = 1
    m[1, h // 3:, w // 2:] = 1
    return m


def test_diffusers_processor_gives_exactly_zero_on_product_pixels(monkeypatch):
    latent_hw = (16, 12)
    unet = small_unet()
    plain = run(unet, monkeypatch, latent_hw)
    mask = masks(latent_hw)
    count = install_scene_processors(unet, SceneAttention().with_gate(CategoryGate(mask, ROWS, CONTEXT)),
                                     latent_hw, chunks=(1, 0))
    gated = run(unet, monkeypatch, latent_hw)
    assert count == len(gated) == len(plain) == 4  # down 1, mid 1, up 2 (layers_per_block + 1)

    for probs_gated, probs_plain in zip(gated, plain):
        nq = probs_gated.shape[-2]
        hw = next((h, w) for h, w in [(16, 12), (8, 6)] if h * w == nq)
        product = (F.adaptive_max_pool2d(mask[:, None], hw)[:, 0] > 0).flatten(1)  # [2, Nq]
        cond_gated = probs_gated[2:][..., list(ROWS)].amax(dim=(1, 3))
        cond_plain = probs_plain[2:][..., list(ROWS)].amax(dim=(1, 3))
        assert float(cond_gated[product].max()) == 0.0
        assert float(cond_plain[product].min()) > 0.0
        assert float(cond_gated[~product].min()) > 0.0
        # uncond half untouched
        assert torch.equal(probs_gated[:2], probs_plain[:2])


def test_self_attention_processors_are_kept(monkeypatch):
    unet = small_unet()
    before = {n: type(p) for n, p in unet.attn_processors.items()}
    install_scene_processors(unet, SceneAttention().with_gate(CategoryGate(masks((8, 8)), ROWS, CONTEXT)), (8, 8))
    after = {n: type(p).__name__ for n, p in unet.attn_processors.items()}
    assert all(after[n] == "SceneAttentionProcessor" for n in after if n.endswith("attn2.processor"))
    assert all(after[n] == before[n].__name__ for n in after if n.endswith("attn1.processor"))
