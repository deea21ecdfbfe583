"""The category gate as a diffusers attention processor: the same definition as in ComfyUI."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from productscene.attention import CategoryGate, SceneAttention
from productscene.diffusers_processor import install_scene_processors

CONTEXT = 77


def small_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    ).eval()


def masks(latent_hw):
    h, w = latent_hw[0] * 8, latent_hw[1] * 8
    m = torch.zeros(2, h, w)
    m[0, : h // 2, : w // 3] = 1
    m[1, h // 3:, w // 2:] = 1
    return m


def contexts(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, CONTEXT, 32, generator=g)


def test_diffusers_processor_keeps_the_category_off_product_positions_in_every_layer():
    """The same definition as in ComfyUI: with identical hidden states, two prompts that differ
    from the identifier on (a causal text encoder) give bit-identical product-position outputs in
    every cross-attention layer; background positions differ; the uncond half is untouched."""
    latent_hw = (16, 12)
    unet = small_unet()
    mask = masks(latent_hw)
    free = contexts(9)  # the prompt encoded without the identifier
    prompt_a = contexts(1)
    prompt_b = prompt_a.clone()
    prompt_b[:, 3:] = contexts(2)[:, 3:]  # another category: its row and every later row differ
    uncond = contexts(3)
    scene = SceneAttention().with_gate(CategoryGate(mask, free, contexts=[prompt_a, prompt_b]))
    count = install_scene_processors(unet, scene, latent_hw, chunks=(1, 0))
    layers = {n: m for n, m in unet.named_modules() if n.endswith("attn2")}
    assert count == len(layers) == 4  # down 1, mid 1, up 2 (layers_per_block + 1)
    g = torch.Generator().manual_seed(4)
    for name, attn in layers.items():
        dim = attn.to_q.in_features
        nq = {32: 16 * 12, 64: 8 * 6}[dim]  # 32 channels at the latent size, 64 one level down
        hw = attn.processor.layer_hw(nq)
        hidden = torch.randn(4, nq, dim, generator=g)  # [uncond, uncond, cond, cond]
        with torch.no_grad():
            out_a = attn(hidden, encoder_hidden_states=torch.cat([uncond, uncond, prompt_a, prompt_a]))
            out_b = attn(hidden, encoder_hidden_states=torch.cat([uncond, uncond, prompt_b, prompt_b]))
        product = (F.adaptive_max_pool2d(mask[:, None], hw)[:, 0] > 0).flatten(1)  # [2, Nq]
        delta = (out_a - out_b).abs().amax(-1)
        assert float(delta[2:][product].max()) == 0.0, name
        assert float(delta[2:][~product].min()) > 0.0, name
        assert torch.equal(out_a[:2], out_b[:2])
        with torch.no_grad():  # a cond row whose prompt is not the gate's is not gated
            other = attn(hidden, encoder_hidden_states=torch.cat([uncond, uncond, uncond, uncond]))
            attn.set_processor(AttnProcessor())
            plain = attn(hidden, encoder_hidden_states=torch.cat([uncond, uncond, uncond, uncond]))
        torch.testing.assert_close(other, plain, rtol=1e-5, atol=1e-5)


def test_self_attention_processors_are_kept():
    unet = small_unet()
    before = {n: type(p) for n, p in unet.attn_processors.items()}
    install_scene_processors(unet, SceneAttention().with_gate(CategoryGate(masks((8, 8)), contexts(9))), (8, 8))
    after = {n: type(p).__name__ for n, p in unet.attn_processors.items()}
    assert all(after[n] == "SceneAttentionProcessor" for n in after if n.endswith("attn2.processor"))
    assert all(after[n] == before[n].__name__ for n in after if n.endswith("attn1.processor"))
