"""Category Tokens into Masked Category Attention on Flux.1 and Z-Image, node to node, as a user's
graph wires them: the tiny DiT text encoders of devkit/dit_text.py (ComfyUI's own classes, real
tokenizers and widths) encode the prompt through the Category Tokens node, the node's CONDITIONING
and CATEGORY_TOKENS go to the Masked Category Attention node on a tiny model of the same family
(devkit/dit_models.py), and ComfyUI's sampler runs one CFG step with CLIPTextEncode's empty prompt
as the negative. The two helpers' halves (text side, gate side) are each tested on their own; this
is the seam between them: the real encoders' conditioning keys (Z-Image's all-ones attention mask,
Flux's pooled CLIP-L vector and guidance) must reach a gate that accepts them."""
from __future__ import annotations

import pytest
import torch

import comfy.sample

from devkit import dit_models as dm
from tests.test_category_tokens_node import folders, run  # noqa: F401  (fixture)
from tests.test_dit_text import TEMPLATE, word_library

MODEL = {"flux": dm.tiny_flux, "z_image": dm.tiny_zimage}
LATENT = (8, 10)


@pytest.fixture(scope="module")
def encoders():
    from devkit import dit_text
    return {f: dit_text.tiny_text_encoder(f) for f in MODEL}


def product_mask():
    m = torch.zeros(1, 64, 80)
    m[:, 8:40, 16:48] = 1
    return m


def sample(pack, comfy_nodes, clip, family, category, gated=True):
    positive, tokens = run(pack, clip=clip, library="shop.safetensors", category=category, template=TEMPLATE)
    (negative,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
    model = MODEL[family]()
    if gated:
        gate = pack.nodes.category_attention.MaskedCategoryAttention
        model = gate.execute(model, product_mask(), tokens, 1.0, 1, 0.0).args[0]
    latent = torch.zeros(1, 16, *LATENT)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, 1, 3.0, "euler", "simple", positive, negative, latent,
                               disable_pbar=True, seed=0)


@pytest.mark.parametrize("family", list(MODEL))
def test_category_tokens_drive_the_gate_on_dits(pack, folders, comfy_nodes, encoders, family):  # noqa: F811
    """The gated model samples (nothing the real encoders put in the conditioning is refused), two
    categories give two latents, and the gate changes what the ungated model samples."""
    clip = encoders[family]
    libs, _ = folders
    word_library(pack, libs / "shop.safetensors", clip, family)
    tea, tools = (sample(pack, comfy_nodes, clip, family, c) for c in ("tea", "tools"))
    assert torch.isfinite(tea).all() and (tea - tools).abs().max() > 0
    assert (tea - sample(pack, comfy_nodes, clip, family, "tea", gated=False)).abs().max() > 0
