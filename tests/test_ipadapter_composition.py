"""Masked Category Attention with the real ComfyUI_IPAdapter_plus, in either order.

IPAdapter_plus is loaded from the shared peers snapshot through ComfyUI's own custom-node loader
and applied with its own nodes (IPAdapterModelLoader, IPAdapterEmbeds) and random weights of its
real "Plus" shapes, on UNets of the real SD1.5 / SD2.x / SDXL layouts (every block, so its per-layer
keys land on the layers they land on in a real model; SD1.5's go on 2-tuple block keys, SDXL's on
3-tuple layer keys) at 64 channels, and on the tiny models (where few of its keys match a layer).
Every run replays the same cross-attention inputs (devkit/replay.py), so each layer's output
differs only by what acts on that layer:
- IPAdapter's per-layer effect with the gate (gate + IPAdapter minus gate) equals its effect alone
  (IPAdapter minus plain) on every layer where it fires, in both orders, and two IPAdapter nodes
  chained around the gate add up as they do without it;
- swapping the category changes no product position of any layer: exactly 0.0;
- a KSampler step runs with both.
"""
from __future__ import annotations

import types

import pytest
import torch

from devkit import ipadapter
from devkit.models import encode, full_layout_unet, tiny
from devkit.replay import Replay
from tests.test_category_attention import (category_prompt, compare, gate_node, host, libraries,  # noqa: F401
                                           two_masks)

pytestmark = [pytest.mark.skipif(ipadapter.skip_reason() is not None, reason=str(ipadapter.skip_reason())),
              pytest.mark.host]  # ComfyUI and IPAdapter_plus are loaded inside the tests

FIRING = {("sd15", "real layout"): 15, ("sd2", "real layout"): 15, ("sdxl", "real layout"): 60,  # its
          ("sd15", "tiny"): 2, ("sd2", "tiny"): 2, ("sdxl", "tiny"): 2}  # middle-block keys match no layer


@pytest.fixture(scope="module")
def plus_models():
    """(family, layout) -> (UNet, the IPADAPTER its own loader loaded for it)."""
    out = {}
    for family, layout in FIRING:
        unet = full_layout_unet(family) if layout == "real layout" else tiny(family).model
        name = ipadapter.write_plus_model(family, host.cross_attention_layers(unet),
                                          f"plus_{family}_{layout.replace(' ', '_')}.safetensors")
        out[family, layout] = (unet, ipadapter.load_model(name))
    return out


def layer_outputs(run: Replay) -> list[torch.Tensor]:
    return [out for *_, out in run.outputs]


@pytest.mark.parametrize("layout", ["real layout", "tiny"])
@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_ipadapter_and_the_gate_compose_in_either_order(family, layout, libraries, plus_models):
    tm = tiny(family)  # its CLIP; the UNet is the real layout (64 channels) or the tiny one
    unet, plus = plus_models[family, layout]
    latent_hw = (16, 16)  # the real layout's deepest cross-attention level: 4x4
    masks = two_masks(latent_hw)
    negative = encode(tm, "blurry")
    cond_a, tokens_a = category_prompt(tm, libraries[family], "marble")
    cond_b, tokens_b = category_prompt(tm, libraries[family], "workbench")

    def gate(model, tokens):
        return gate_node.execute(model, masks, tokens, 1.0, 0, 0.0).result[0]

    plain = Replay().run(tm, unet, cond_a, negative, latent_hw, batch=2)
    replay = lambda model, cond: Replay(plain.inputs).run(tm, model, cond, negative, latent_hw, batch=2)
    effect = lambda model: [a - p for a, p in zip(layer_outputs(replay(model, cond_a)), layer_outputs(plain))]
    second_plus = lambda model: ipadapter.apply(model, plus, weight=0.5, seed=1)  # another IPAdapter node
    effect_alone, effect_chained = effect(ipadapter.apply(unet, plus)), effect(second_plus(ipadapter.apply(unet, plus)))
    firing = [i for i, e in enumerate(effect_alone) if e.abs().max() > 0]
    assert len(firing) == FIRING[family, layout]

    gate_first = gate(unet, tokens_a)
    gated = replay(gate_first, cond_a)
    orders = {
        "ipadapter, then the gate": lambda tokens: gate(ipadapter.apply(unet, plus), tokens),
        "the gate, then ipadapter": lambda tokens: ipadapter.apply(gate_first if tokens is tokens_a
                                                                   else gate(unet, tokens), plus),
        "ipadapter, the gate, ipadapter again": lambda tokens: second_plus(gate(ipadapter.apply(unet, plus), tokens)),
    }
    models = {}
    for order, build in orders.items():
        models[order] = build(tokens_a)
        first, second = replay(models[order], cond_a), replay(build(tokens_b), cond_b)
        effect_gated = [b - g for b, g in zip(layer_outputs(first), layer_outputs(gated))]
        reference = effect_chained if "again" in order else effect_alone
        for i, (with_gate, without) in enumerate(zip(effect_gated, reference)):
            scale = float(without.abs().max())
            if i in firing:
                assert scale > 0.1, (order, i)
                torch.testing.assert_close(with_gate, without, atol=1e-5 * max(1.0, scale), rtol=1e-4,
                                           msg=f"{order}: layer {i}")
            else:
                assert float(with_gate.abs().max()) == 0.0, (order, i)
        product, background, _ = compare(first, second, masks)
        assert max(product) == 0.0, order  # the category reaches no product position of any layer
        assert min(background) > 0.0, order

    # the patched models are clones: IPAdapter's .add() on the gate's trampolines left the gate's own
    # model as it was, and a KSampler step (ComfyUI's node) runs and gives the same image in both orders
    assert set(replaces(gate_first)) == set(host.cross_attention_keys(unet))
    assert all(not fn.callback for fn in replaces(gate_first).values())
    samples = [ksampler_step(models[order], cond_a, negative, latent_hw) for order in list(orders)[:2]]
    gate_only = ksampler_step(gate(unet, tokens_a), cond_a, negative, latent_hw)
    assert torch.isfinite(samples[0]).all() and torch.equal(samples[0], samples[1])
    assert float((samples[0] - gate_only).abs().max()) > 1e-3  # IPAdapter acted on the image


def replaces(model) -> dict:
    return model.model_options["transformer_options"]["patches_replace"]["attn2"]


def ksampler_step(model, positive, negative, latent_hw):
    nodes, _ = ipadapter.load()
    latent = {"samples": torch.zeros(2, 4, *latent_hw)}
    return nodes.KSampler().sample(model, 7, 1, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]


def copy_dicts_and_lists(obj, memo=None):
    """How current ComfyUI (0.33) clones model_options: dicts and lists copied, every other object
    shared (0.3.75 deep-copies everything)."""
    if isinstance(obj, dict):
        return {k: copy_dicts_and_lists(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [copy_dicts_and_lists(v) for v in obj]
    return obj


def test_ipadapter_after_the_gate_changes_only_its_own_clone_on_current_comfyui(libraries, plus_models, monkeypatch):
    """IPAdapter .add()s its callback to the object at a key of the clone it made. With clones that
    share those objects, the gate's own output (which ComfyUI caches and hands to other branches and
    to the next run) must not gain the callback, and running the IPAdapter node again on it (a
    changed weight, a second branch) must not add it twice."""
    import comfy.model_patcher
    import comfy.utils

    if not hasattr(comfy.utils, "deepcopy_list_dict"):  # ComfyUI 0.3.x: emulate current ComfyUI's clone
        monkeypatch.setattr(comfy.model_patcher, "copy", types.SimpleNamespace(deepcopy=copy_dicts_and_lists))
    tm = tiny("sdxl")
    unet, plus = plus_models["sdxl", "tiny"]
    latent_hw = (16, 16)
    cond, tokens = category_prompt(tm, libraries["sdxl"], "marble")
    negative = encode(tm, "blurry")
    gated = gate_node.execute(unet, two_masks(latent_hw), tokens, 1.0, 0, 0.0).result[0]
    first, second = ipadapter.apply(gated, plus), ipadapter.apply(gated, plus)
    assert replaces(first)[("output", 0, 0)] is not replaces(gated)[("output", 0, 0)]
    assert all(not fn.callback for fn in replaces(gated).values())
    assert [len(replaces(m)[("output", 0, 0)].callback) for m in (first, second)] == [1, 1]
    samples = [ksampler_step(m, cond, negative, latent_hw) for m in (gated, first, second)]
    assert torch.equal(samples[1], samples[2]) and not torch.equal(samples[0], samples[1])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_ipadapter_the_gate_and_a_personality_reference_compose_in_any_order(family, libraries, plus_models):
    """The pack's own Personality Reference on the same layers as IPAdapter_plus and the gate, in
    three orders: IPAdapter's per-layer effect is its effect alone on every layer where it fires, and
    swapping both the category and the reference changes no product position of any layer (0.0)
    while the background changes."""
    from productscene.personality import PersonalityAdapter
    from devkit.comfy_env import import_pack

    apply_node = import_pack().nodes.personality.ProductSceneApplyPersonality
    reference_type = import_pack().nodes.personality.PersonalityReference
    tm = tiny(family)
    unet, plus = plus_models[family, "real layout"]
    latent_hw = (16, 16)
    masks = two_masks(latent_hw)
    negative = encode(tm, "blurry")
    cond_a, tokens_a = category_prompt(tm, libraries[family], "marble")
    cond_b, tokens_b = category_prompt(tm, libraries[family], "workbench")
    adapter = PersonalityAdapter.for_layers(family, 64, host.cross_attention_layers(unet), tokens=4, seed=3)
    g = torch.Generator().manual_seed(5)
    refs = {k: reference_type(adapter, adapter.tokens(torch.randn(1, 17, 64, generator=g)).detach(), "test")
            for k in ("a", "b")}

    def gate(model, tokens):
        return gate_node.execute(model, masks, tokens, 1.0, 0, 0.0).result[0]

    def brand(model, ref):
        return apply_node.execute(model, ref, masks, 1.0, 0.0, 1.0).result[0]

    orders = {
        "ipadapter, gate, reference": lambda t, r: brand(gate(ipadapter.apply(unet, plus), t), r),
        "reference, ipadapter, gate": lambda t, r: gate(ipadapter.apply(brand(unet, r), plus), t),
        "gate, reference, ipadapter": lambda t, r: ipadapter.apply(brand(gate(unet, t), r), plus),
    }
    plain = Replay().run(tm, unet, cond_a, negative, latent_hw, batch=2)
    replay = lambda model, cond: Replay(plain.inputs).run(tm, model, cond, negative, latent_hw, batch=2)
    effect_alone = [a - p for a, p in zip(layer_outputs(replay(ipadapter.apply(unet, plus), cond_a)),
                                          layer_outputs(plain))]
    firing = [i for i, e in enumerate(effect_alone) if e.abs().max() > 0]
    assert len(firing) == FIRING[family, "real layout"]
    without_ipadapter = layer_outputs(replay(brand(gate(unet, tokens_a), refs["a"]), cond_a))
    for order, build in orders.items():
        first = replay(build(tokens_a, refs["a"]), cond_a)
        for i, (out, base, alone) in enumerate(zip(layer_outputs(first), without_ipadapter, effect_alone)):
            scale = float(alone.abs().max())
            torch.testing.assert_close(out - base, alone, atol=1e-5 * max(1.0, scale), rtol=1e-4,
                                       msg=f"{order}: layer {i}")
        second = replay(build(tokens_b, refs["b"]), cond_b)
        product, background, _ = compare(first, second, masks)
        assert max(product) == 0.0, order  # neither the category nor the reference reaches the product
        assert min(background) > 0.0, order
