"""Masked Category Attention inside the real ComfyUI UNet: the category never reaches the product.

Two categories of one library are encoded by the real Category Tokens node (tiny real CLIPs), each
gates a model clone, and ComfyUI's own sampler runs one CFG step on a batch of two images with
different masks. An attn2 patch records every cross-attention layer's input hidden states in the
first run and replays them in the second, so each layer sees identical queries and only the
conditioning differs; an attn2 output patch records each layer's output. Product positions must be
bit-identical in every layer (max |delta| = 0.0), background positions must differ. The same
check run on the identifier-rows-only gate (devkit/identifier_gate.py) fails: it is what the
category-free context fixes.
"""
from __future__ import annotations

import os

import pytest
import torch

import folder_paths
import comfy.ldm.modules.attention as comfy_attention

from productscene.attention import ProductRegion
from productscene.errors import ProductSceneError
from productscene.library import FAMILIES, TokenLibrary
from devkit import comfy_env
from devkit.identifier_gate import direct_product_queries, install_identifier_rows_gate
from devkit.models import encode, sample, tiny, tiny_sd15
from devkit.replay import Replay, per_layer

pack = comfy_env.import_pack()
nodes = comfy_env.import_comfy_nodes()
host = pack.nodes.host
gate_node = pack.nodes.category_attention.MaskedCategoryAttention
tokens_node = pack.nodes.category_tokens.ProductSceneCategoryTokens
TEMPLATE = "a product photo on a {category} background, soft light"


@pytest.fixture(scope="module")
def libraries():
    """One two-category library per family in ComfyUI's category_libraries folder."""
    folder = folder_paths.get_folder_paths("category_libraries")[0]
    os.makedirs(folder, exist_ok=True)
    names = {}
    for family, encoders in FAMILIES.items():
        g = torch.Generator().manual_seed(11)
        vectors = {e: torch.randn(2, 1, w, generator=g) * 0.02 for e, w in encoders.items()}
        name = f"independence_{family}.safetensors"
        TokenLibrary.write(os.path.join(folder, name), ["marble", "workbench"], vectors, family)
        names[family] = name
    folder_paths.filename_list_cache.pop("category_libraries", None)
    return names


def category_prompt(tm, library, category, template=TEMPLATE):
    return tokens_node.execute(tm.clip, library, category, template).result


def two_masks(latent_hw):
    h, w = latent_hw[0] * 8, latent_hw[1] * 8
    masks = torch.zeros(2, h, w)
    masks[0, h // 4: h // 2, w // 4: w // 2] = 1.0  # top-left product
    masks[1, h // 2: h - 8, w // 2: w - 4] = 1.0  # bottom-right product, off the latent grid
    return masks


def compare(first: Replay, second: Replay, masks, grow_latent_px=0):
    """Per layer, over the cond rows: the largest |delta| on product positions and the smallest
    per-position |delta| on background positions; and per layer the uncond rows' largest |delta|."""
    product_deltas, background_deltas, uncond_deltas = [], [], []
    for delta, product, uncond, hw in per_layer(first, second, ProductRegion(masks, grow_latent_px)):
        if not grow_latent_px:  # the gate's own definition covers every pixel of the product
            assert (product >= direct_product_queries(masks, hw)).all()
        product_deltas.append(float(delta[product].max()))
        background_deltas.append(float(delta[~product].min()))
        uncond_deltas.append(uncond)
    return product_deltas, background_deltas, uncond_deltas


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_product_positions_ignore_the_category_in_every_layer(family, libraries):
    tm = tiny(family)
    latent_hw = (9, 13)  # odd and not square
    masks = two_masks(latent_hw)
    negative = encode(tm, "blurry")
    layers = len(host.cross_attention_keys(tm.model))
    cond_a, tokens_a = category_prompt(tm, libraries[family], "marble")
    cond_b, tokens_b = category_prompt(tm, libraries[family], "workbench")
    assert not torch.equal(cond_a[0][0], cond_b[0][0])
    changed_rows = int(((cond_a[0][0] - cond_b[0][0]).abs().amax(-1) > 0).sum())
    assert changed_rows > 60  # the causal encoder: far more than the identifier's own row changes
    assert torch.equal(tokens_a.free_context, tokens_b.free_context)  # the prompt without the identifier

    model_a = gate_node.execute(tm.model, masks, tokens_a, 1.0, 0, 0.0).result[0]
    model_b = gate_node.execute(tm.model, masks, tokens_b, 1.0, 0, 0.0).result[0]
    first = Replay().run(tm, model_a, cond_a, negative, latent_hw, batch=2)
    second = Replay(first.inputs).run(tm, model_b, cond_b, negative, latent_hw, batch=2)
    assert first.calls == second.calls == layers  # one CFG-batched call per cross-attention layer
    product, background, uncond = compare(first, second, masks)
    assert len(product) == len(background) == layers  # the cond chunk of every layer
    assert max(product) == 0.0  # bit-identical on every product position of every layer
    assert min(background) > 0.0  # while every background position sees the category
    assert max(uncond) == 0.0  # the negative prompt is the same in both runs


def _old_gate_check(family, libraries):
    tm = tiny(family)
    latent_hw = (9, 13)
    masks = two_masks(latent_hw)
    negative = encode(tm, "blurry")
    keys = host.cross_attention_keys(tm.model)
    cond_a, tokens_a = category_prompt(tm, libraries[family], "marble")
    cond_b, tokens_b = category_prompt(tm, libraries[family], "workbench")
    model_a = install_identifier_rows_gate(tm.model, masks, tokens_a.rows, keys)
    model_b = install_identifier_rows_gate(tm.model, masks, tokens_b.rows, keys)
    first = Replay().run(tm, model_a, cond_a, negative, latent_hw, batch=2)
    second = Replay(first.inputs).run(tm, model_b, cond_b, negative, latent_hw, batch=2)
    return compare(first, second, masks)


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_the_identifier_rows_only_gate_fails_the_same_check(family, libraries):
    """The check above can fail: the gate that only removes the identifier's own rows lets the
    category reach product positions through every later row, in every layer."""
    product, background, _ = _old_gate_check(family, libraries)
    assert min(product) > 1e-3
    assert max(product) > 0.1 * max(background)


def gated_runs(tm, library, latent_hw, strength=1.0, grow_latent_px=0):
    """Two categories, each gating its own model clone; the second run replays the first's
    cross-attention inputs. Returns (first, second, masks)."""
    masks = two_masks(latent_hw)
    negative = encode(tm, "blurry")
    runs = []
    for category in ("marble", "workbench"):
        cond, tokens = category_prompt(tm, library, category)
        model = gate_node.execute(tm.model, masks, tokens, strength, grow_latent_px, 0.0).result[0]
        runs.append(Replay(runs[0].inputs if runs else None).run(tm, model, cond, negative, latent_hw, batch=2))
    return runs[0], runs[1], masks


def test_strength_blends_smoothly_and_zero_is_no_gate(libraries):
    tm = tiny_sd15()
    changes = {}
    for strength in (0.0, 0.5, 1.0):
        first, second, masks = gated_runs(tm, libraries["sd15"], (8, 8), strength)
        changes[strength] = max(compare(first, second, masks)[0])
        if strength == 0.0:
            cond, _ = category_prompt(tm, libraries["sd15"], "marble")
            plain = Replay(first.inputs).run(tm, tm.model, cond, encode(tm, "blurry"), (8, 8), batch=2)
            assert all(torch.equal(a[-1], b[-1]) for a, b in zip(first.outputs, plain.outputs))  # 0 = no gate
    assert changes[1.0] == 0.0 < changes[0.5] < changes[0.0]


def test_grow_protects_a_wider_ring(libraries):
    first, second, masks = gated_runs(tiny_sd15(), libraries["sd15"], (16, 16), grow_latent_px=2)
    product, background, _ = compare(first, second, masks, grow_latent_px=2)
    assert max(product) == 0.0 and min(background) > 0.0
    assert max(compare(first, second, masks)[0]) == 0.0  # the ungrown product is inside the ring


def test_two_gates_on_combined_conditioning_each_keep_their_own_category_off_their_product(libraries):
    """ConditioningCombine of two category prompts, two gates stacked: each gate acts on the batch
    rows of its own prompt only (matched by the conditioning itself)."""
    tm = tiny_sd15()
    latent_hw = (8, 8)
    masks = two_masks(latent_hw)
    mask_a, mask_b = masks[:1], masks[1:]
    negative = encode(tm, "blurry")
    combine = nodes.ConditioningCombine().combine
    cond_a1, tokens_a1 = category_prompt(tm, libraries["sd15"], "marble")
    cond_a2, tokens_a2 = category_prompt(tm, libraries["sd15"], "workbench")
    cond_b, tokens_b = category_prompt(tm, libraries["sd15"], "marble", "a photo of {category} props")

    def gated(tokens_a):
        model = gate_node.execute(tm.model, mask_a, tokens_a, 1.0, 0, 0.0).result[0]
        return gate_node.execute(model, mask_b, tokens_b, 1.0, 0, 0.0).result[0]

    first = Replay().run(tm, gated(tokens_a1), combine(cond_a1, cond_b)[0], negative, latent_hw, batch=1)
    second = Replay(first.inputs).run(tm, gated(tokens_a2), combine(cond_a2, cond_b)[0], negative, latent_hw, batch=1)
    for (hw, latent, chunks, a), (_, _, _, b) in zip(first.outputs, second.outputs):
        assert chunks.count(0) == 2  # both prompts in one batch
        product_a = ProductRegion(mask_a).queries(hw, latent, a.device)[0]
        cond_rows = [i for i, kind in enumerate(chunks) if kind == 0]
        same = [i for i in cond_rows if torch.equal(a[i], b[i])]
        assert len(same) == 1  # prompt B's row: its prompt and gate are the same in both runs
        (row_a,) = set(cond_rows) - set(same)  # prompt A's row: its category changed
        assert float((a[row_a] - b[row_a]).abs().amax(-1)[product_a].max()) == 0.0
        assert float((a[row_a] - b[row_a]).abs().amax(-1)[~product_a].min()) > 0.0


def test_a_positive_conditioning_the_gate_was_not_made_for_is_refused_before_sampling(libraries, monkeypatch):
    tm = tiny_sd15()
    masks = two_masks((8, 8))
    _, tokens = category_prompt(tm, libraries["sd15"], "marble")
    calls = []
    monkeypatch.setattr(comfy_attention, "optimized_attention", lambda *a, **k: calls.append(1))
    model = gate_node.execute(tm.model, masks[:1], tokens, 1.0, 0, 0.0).result[0]
    with pytest.raises(ProductSceneError, match="^category_tokens: the positive conditioning"):
        sample(tm, encode(tm, "a bottle on marble"), encode(tm, "blurry"), latent_hw=(8, 8), model=model)
    assert calls == []


def test_composes_with_a_replace_already_on_the_layers(libraries):
    """A replace of no known protocol already on the layers keeps its effect and becomes the gate's
    attention kernel: product queries get it on the category-free context, so the category still
    never reaches the product, bit for bit (tests/test_ipadapter_composition.py: the real IPAdapter)."""
    tm = tiny_sd15()
    keys = host.cross_attention_keys(tm.model)
    foreign_calls = []

    def foreign(q, k, v, extra_options):
        foreign_calls.append(extra_options["block"])
        return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"]) + 0.25

    with_foreign = tm.model.clone()
    for key in keys:
        with_foreign.set_model_attn2_replace(foreign, *key)
    latent_hw = (8, 8)
    masks = two_masks(latent_hw)
    negative = encode(tm, "blurry")
    cond_a, tokens_a = category_prompt(tm, libraries["sd15"], "marble")
    cond_b, tokens_b = category_prompt(tm, libraries["sd15"], "workbench")
    both_a = gate_node.execute(with_foreign, masks, tokens_a, 1.0, 0, 0.0).result[0]
    ours_a = gate_node.execute(tm.model, masks, tokens_a, 1.0, 0, 0.0).result[0]
    both_b = gate_node.execute(with_foreign, masks, tokens_b, 1.0, 0, 0.0).result[0]
    first = Replay().run(tm, both_a, cond_a, negative, latent_hw, batch=2)
    ours = Replay(first.inputs).run(tm, ours_a, cond_a, negative, latent_hw, batch=2)
    second = Replay(first.inputs).run(tm, both_b, cond_b, negative, latent_hw, batch=2)
    assert len(foreign_calls) == 2 * 2 * len(keys)  # per layer and run: all rows, then the gated rows
    assert all((a[-1] - o[-1]).abs().max() > 1e-3 for a, o in zip(first.outputs, ours.outputs))  # its effect
    product, background, _ = compare(first, second, masks)
    assert max(product) == 0.0 and min(background) > 1e-3


class Reweight:
    """A foreign replace that re-weights text attention (not an addition to it): key rows 1-5 get
    3x the logit scale, as prompt-weighting and attention re-weighting packs do."""

    def __init__(self):
        self.calls = 0

    def __call__(self, q, k, v, extra_options):
        self.calls += 1
        weights = torch.ones(k.shape[1], 1, dtype=k.dtype)
        weights[1:6] = 3.0
        return comfy_attention.optimized_attention(q, k * weights, v, extra_options["n_heads"])

    def __deepcopy__(self, memo):
        return self


@pytest.mark.parametrize("placement", ["before, on layer keys", "before, on block keys", "after, on block keys"])
def test_a_replace_that_reweights_text_attention_keeps_its_effect_and_the_product_exact(placement, libraries):
    """A foreign replace of no known protocol is the gate's attention kernel: product queries get it
    on the category-free context. Its block-key (2-tuple) entries are shadowed by the gate's layer
    keys in ComfyUI's lookup, so the gate runs them in either order."""
    tm = tiny_sd15()
    keys = host.cross_attention_keys(tm.model)
    reweight = Reweight()

    def with_reweight(model):
        m = model.clone()
        for key in keys:
            m.set_model_attn2_replace(reweight, *(key if "layer" in placement else key[:2]))
        return m

    def build(tokens):
        if placement.startswith("before"):
            return gate_node.execute(with_reweight(tm.model), masks, tokens, 1.0, 0, 0.0).result[0]
        return with_reweight(gate_node.execute(tm.model, masks, tokens, 1.0, 0, 0.0).result[0])

    latent_hw = (8, 8)
    masks = two_masks(latent_hw)
    negative = encode(tm, "blurry")
    cond_a, tokens_a = category_prompt(tm, libraries["sd15"], "marble")
    cond_b, tokens_b = category_prompt(tm, libraries["sd15"], "workbench")
    first = Replay().run(tm, build(tokens_a), cond_a, negative, latent_hw, batch=2)
    assert reweight.calls == 2 * len(keys)  # every layer: all rows, then the gated rows on the free context
    gate_alone = Replay(first.inputs).run(tm, gate_node.execute(tm.model, masks, tokens_a, 1.0, 0, 0.0).result[0],
                                          cond_a, negative, latent_hw, batch=2)
    second = Replay(first.inputs).run(tm, build(tokens_b), cond_b, negative, latent_hw, batch=2)
    for (hw, latent, _, a), (*_, g) in zip(first.outputs, gate_alone.outputs):
        product = ProductRegion(masks).for_rows(torch.tensor([0, 1]), 2, hw, latent, a.device)
        delta = (a[:2] - g[:2]).abs().amax(-1)  # the cond rows
        assert float(delta[product].min()) > 0.0 and float(delta[~product].min()) > 0.0  # it acts everywhere
    product, background, _ = compare(first, second, masks)
    assert max(product) == 0.0 and min(background) > 0.0


def test_replace_installed_after_the_gate_is_refused_before_sampling(libraries, monkeypatch):
    tm = tiny_sd15()
    masks = two_masks((16, 16))
    cond, tokens = category_prompt(tm, libraries["sd15"], "marble")
    model = gate_node.execute(tm.model, masks[:1], tokens, 1.0, 0, 0.0).result[0].clone()
    key = host.cross_attention_keys(model)[0]
    model.set_model_attn2_replace(Reweight(), *key)
    model.set_model_attn2_replace(Reweight(), "middle", 1, 0)  # matches no layer: never refused
    calls = []
    monkeypatch.setattr(comfy_attention, "optimized_attention", lambda *a, **k: calls.append(1))
    with pytest.raises(ProductSceneError, match=r"^model: a node after Masked Category Attention \(or Apply Personality\) replaced "
                       r"cross-attention on 1 layers \(first: \('input', 1, 0\)\) .* Connect that node "
                       r"\(IPAdapter, .*\) before Masked Category Attention: MODEL -> that node -> Masked "
                       "Category Attention -> KSampler"):
        sample(tm, cond, encode(tm, "b"), latent_hw=(16, 16), model=model)
    assert calls == []  # refused before any attention ran


def test_bad_masks_are_refused_before_any_work(libraries):
    tm = tiny_sd15()
    cond, tokens = category_prompt(tm, libraries["sd15"], "marble")
    with pytest.raises(ProductSceneError, match="mask"):
        gate_node.execute(tm.model, torch.zeros(1, 64, 64), tokens, 1.0, 0, 0.0)  # empty
    with pytest.raises(ProductSceneError, match="mask"):
        gate_node.execute(tm.model, torch.ones(1, 64, 64), tokens, 1.0, 0, 0.0)  # covers everything
    with pytest.raises(ProductSceneError, match="strength"):
        gate_node.execute(tm.model, two_masks((8, 8)), tokens, 1.5, 0, 0.0)
    three = torch.cat([two_masks((16, 16)), two_masks((16, 16))[:1]])
    with pytest.raises(ProductSceneError, match="3 product masks for a batch of 2"):
        sample(tm, cond, encode(tm, "b"), latent_hw=(16, 16),
               model=gate_node.execute(tm.model, three, tokens, 1.0, 0, 0.0).result[0], batch=2)
    with pytest.raises(ProductSceneError, match="product mask is 128x128"):
        sample(tm, cond, encode(tm, "b"), latent_hw=(16, 24),
               model=gate_node.execute(tm.model, two_masks((16, 16))[:1], tokens, 1.0, 0, 0.0).result[0])


def test_patching_leaves_the_input_model_untouched(libraries):
    tm = tiny_sd15()
    _, tokens = category_prompt(tm, libraries["sd15"], "marble")
    before = dict(tm.model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {}))
    patched = gate_node.execute(tm.model, two_masks((8, 8)), tokens, 1.0, 0, 0.0).result[0]
    assert patched is not tm.model
    assert host.scene_of(tm.model) is None
    assert tm.model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {}) == before
    assert len(patched.model_options["transformer_options"]["patches_replace"]["attn2"]) == \
        len(host.cross_attention_keys(tm.model))


def test_two_gates_for_two_products_of_one_prompt_stack_like_one_gate_on_both(libraries):
    tm = tiny_sd15()
    latent_hw = (8, 8)
    first_product, second_product = two_masks(latent_hw)[:1], torch.flip(two_masks(latent_hw)[1:], dims=(-1,))
    both = torch.maximum(first_product, second_product)  # two products in one image
    cond, tokens = category_prompt(tm, libraries["sd15"], "marble")
    negative = encode(tm, "blurry")
    stacked = gate_node.execute(gate_node.execute(tm.model, first_product, tokens, 1.0, 0, 0.0).result[0],
                                second_product, tokens, 1.0, 0, 0.0).result[0]
    single = gate_node.execute(tm.model, both, tokens, 1.0, 0, 0.0).result[0]
    first = Replay().run(tm, stacked, cond, negative, latent_hw, batch=1)
    second = Replay(first.inputs).run(tm, single, cond, negative, latent_hw, batch=1)
    assert len(host.scene_of(stacked).gates) == 2
    assert all(torch.equal(a[-1], b[-1]) for a, b in zip(first.outputs, second.outputs))


def received_global_vectors(tm, model, positive, negative, latent_hw=(8, 8)):
    """The ``y`` SDXL's UNet receives (what joins its time embedding) in one sampling step through
    ComfyUI's own ``comfy.sample.sample``: the input of every ``label_emb`` call."""
    seen = []
    hook = tm.model.model.diffusion_model.label_emb.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()))
    try:
        sample(tm, positive, negative, latent_hw, steps=1, model=model, batch=2)
    finally:
        hook.remove()
    assert seen
    return torch.cat(seen)


def test_sdxl_global_vector_the_unet_receives_is_the_same_for_every_category(libraries):
    """SDXL's pooled text vector goes into ``y``, which shifts every ResBlock at every position:
    the Category Tokens conditioning must give the same ``y`` for every category (the category-free
    prompt's). With the identifier prompt's own pooled output (the conditioning before this rule)
    the two categories' ``y`` differ, so the check can fail."""
    tm = tiny("sdxl")
    latent_hw = (8, 8)
    masks = two_masks(latent_hw)
    negative = encode(tm, "blurry")
    received, spliced_pooled = {}, {}
    for category in ("marble", "workbench"):
        cond, tokens = category_prompt(tm, libraries["sdxl"], category)
        model = gate_node.execute(tm.model, masks, tokens, 1.0, 0, 0.0).result[0]
        received[category] = received_global_vectors(tm, model, cond, negative, latent_hw)
        spliced, _ = pack.nodes.category_tokens.encode_category_prompt(tm.clip, libraries["sdxl"], category, TEMPLATE)
        (old_cond,) = tm.clip.encode_from_tokens_scheduled(spliced)
        assert torch.equal(old_cond[0], cond[0][0])  # the cross-attention context still carries the category
        spliced_pooled[category] = received_global_vectors(tm, model, [old_cond], negative, latent_hw)
    assert torch.equal(received["marble"], received["workbench"])
    assert (spliced_pooled["marble"] - spliced_pooled["workbench"]).abs().max() > 1e-3
    assert (received["marble"] - spliced_pooled["marble"]).abs().max() > 1e-3
