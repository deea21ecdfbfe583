"""Apply Personality's per-block weights on UNets of the real SD1.5 and SDXL layouts (every block and
transformer layer, 64 channels): the layers whose output the reference changes are exactly the
preset's (listed here), every other layer is bit-identical to the unpatched model's (the same
hidden states replayed into every layer, devkit/replay.py), a block at weight 0 stays bit-identical,
and 'style and layout' scales the layout blocks by layout_weight (within 1e-5: the effect is read back as
the difference of two float32 outputs)."""
from __future__ import annotations

import pytest
import torch

from productscene.blocks import layer_weights
from productscene.errors import ProductSceneError
from productscene.personality import PersonalityAdapter
from devkit import comfy_env
from devkit.models import encode, full_layout_unet, tiny
from devkit.replay import Replay

pytestmark = pytest.mark.host  # ComfyUI's UNet and the pack's nodes, through devkit
pack = comfy_env.import_pack()
host, personality = pack.nodes.host, pack.nodes.personality
apply_node = personality.ProductSceneApplyPersonality
LATENT = (16, 16)

SDXL_STYLE = [("output", 1, t) for t in range(10)]  # up_blocks.0.attentions.1
SDXL_LAYOUT = [("input", 8, t) for t in range(10)]  # down_blocks.2.attentions.1
SD15_STYLE = [("input", i, 0) for i in (1, 2, 4, 5)] + [("output", i, 0) for i in range(5, 12)]
SD15_LAYOUT = [("input", 7, 0), ("input", 8, 0)]
EXPECTED = {
    ("sdxl", "style"): SDXL_STYLE, ("sdxl", "layout"): SDXL_LAYOUT, ("sdxl", "style and layout"): SDXL_STYLE + SDXL_LAYOUT,
    ("sd15", "style"): SD15_STYLE, ("sd15", "layout"): SD15_LAYOUT, ("sd15", "style and layout"): SD15_STYLE + SD15_LAYOUT,
}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def setup(request):
    family = request.param
    tm, unet = tiny(family), full_layout_unet(family)
    adapter = PersonalityAdapter.for_layers(family, 64, host.cross_attention_layers(unet), tokens=4, seed=3)
    g = torch.Generator().manual_seed(5)
    ref = personality.PersonalityReference(adapter, adapter.tokens(torch.randn(1, 17, 64, generator=g)).detach(), "t")
    masks = torch.zeros(1, LATENT[0] * 8, LATENT[1] * 8)
    masks[:, 16:48, 16:56] = 1.0  # inside one cell of the deepest (2x2) level: every layer keeps background
    cond, negative = encode(tm, "a product photo"), encode(tm, "blurry")
    plain = Replay().run(tm, unet, cond, negative, LATENT, batch=1)
    keys = host.cross_attention_keys(unet)  # the order ComfyUI runs them in
    assert len(plain.outputs) == len(keys) == (16 if family == "sd15" else 70)

    def run(**kw):
        model = apply_node.execute(unet, ref, masks, kw.pop("weight", 1.0), 0.0, 1.0, **kw).result[0]
        outs = Replay(plain.inputs).run(tm, model, cond, negative, LATENT, batch=1).outputs
        return {k: out - base for k, (*_, out), (*_, base) in zip(keys, outs, plain.outputs)}

    return family, run


def changed(effects) -> list[tuple]:
    return [k for k, e in effects.items() if not torch.equal(e, torch.zeros_like(e))]


@pytest.mark.parametrize("preset", ["style", "layout", "style and layout"])
def test_a_preset_reaches_exactly_its_blocks(setup, preset):
    family, run = setup
    assert changed(run(blocks=preset)) == sorted(EXPECTED[family, preset], key=list(run(blocks="all layers")).index)


def test_all_layers_and_the_per_block_string(setup):
    family, run = setup
    everything = run(blocks="all layers")
    assert changed(everything) == list(everything)  # every layer
    if family == "sdxl":
        text, expected = "output.1.3:1, input.4:0.5", [("input", 4, 0), ("input", 4, 1), ("output", 1, 3)]
    else:
        text, expected = "output.6:1, input.4:0.5", [("input", 4, 0), ("output", 6, 0)]
    effects = run(blocks="style", block_weights=text)  # the string replaces the preset
    assert changed(effects) == expected
    # the effect is linear in the weight: half the weight on input.4 is half of what weight 1 adds
    torch.testing.assert_close(effects[expected[0]], everything[expected[0]] * 0.5, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(effects[expected[-1]], everything[expected[-1]], atol=1e-5, rtol=1e-4)


def test_weight_0_on_a_block_leaves_it_bit_identical(setup):
    family, run = setup
    style, layout = (SDXL_STYLE, SDXL_LAYOUT) if family == "sdxl" else (SD15_STYLE, SD15_LAYOUT)
    effects = run(blocks="style and layout", layout_weight=0.0)
    assert changed(effects) == [k for k in effects if k in style]  # the layout blocks: exactly unchanged
    effects = run(block_weights="output.1:0, input.8:1" if family == "sdxl" else "output.5:0, input.8:1")
    assert changed(effects) == [k for k in effects if k[:2] == ("input", 8)]
    half = run(blocks="style and layout", layout_weight=0.5)
    full = run(blocks="style and layout")
    for key in layout:
        torch.testing.assert_close(half[key], full[key] * 0.5, atol=1e-5, rtol=1e-4)
    for key in style:
        assert torch.equal(half[key], full[key])


def test_bad_block_weights_are_refused_naming_the_input():
    keys = [("input", 1, 0), ("output", 3, 0)]
    with pytest.raises(ProductSceneError, match=r"^block_weights: 'input\.9' names no cross-attention layer of this "
                                                r"model; its blocks are input\.1, output\.3"):
        layer_weights("sd15", keys, 1.0, text="input.9:1")
    with pytest.raises(ProductSceneError, match=r"^block_weights: expected 'block:weight' items"):
        layer_weights("sd15", keys, 1.0, text="input.1=1")
    with pytest.raises(ProductSceneError, match=r"^block_weights: input\.1: expected a number from 0 to 10"):
        layer_weights("sd15", keys, 1.0, text="input.1:nan")
    with pytest.raises(ProductSceneError, match=r"^blocks: expected one of all layers, style"):
        layer_weights("sd15", keys, 1.0, preset="colour")
