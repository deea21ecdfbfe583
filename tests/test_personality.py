"""Personality Reference and Apply Personality inside the real ComfyUI UNet, with CLIP vision built
by ComfyUI's own class (devkit/clip_vision.py, random weights).

The reference never reaches the product: two references (or two references and two categories)
patch clones of one model, ComfyUI's sampler runs one CFG step on a batch of two images with
different masks at an odd, non-square latent, and every cross-attention layer is fed the same
hidden states in both runs (devkit/replay.py). Product positions must be bit-identical in
every layer, cond and uncond rows, while background positions differ. Weight 0 leaves the model's
output bit-identical; an adapter file reloads to identical outputs; bad input is refused before
sampling, naming the input.
"""
from __future__ import annotations

import os

import pytest
import torch

import folder_paths
import comfy.ldm.modules.attention as comfy_attention

from productscene.attention import ProductRegion
from productscene.errors import ProductSceneError
from productscene.library import TokenLibrary
from productscene.personality import PersonalityAdapter
from devkit import comfy_env
from devkit.clip_vision import build_clip_vision
from devkit.models import encode, sample, tiny
from devkit.replay import Replay

pack = comfy_env.import_pack()
host = pack.nodes.host
personality = pack.nodes.personality
reference_node = personality.ProductScenePersonalityReference
apply_node = personality.ProductSceneApplyPersonality
gate_node = pack.nodes.category_attention.MaskedCategoryAttention
tokens_node = pack.nodes.category_tokens.ProductSceneCategoryTokens
VISION_WIDTH = 64
LATENT = (10, 14)  # odd, non-square: lower layers 5x7 and 3x4


def adapter_file(family: str, tm, name: str | None = None, width: int = VISION_WIDTH, seed: int = 0) -> str:
    """A fresh adapter for ``tm``'s layers saved in models/personality_adapters; returns its name."""
    folder = folder_paths.get_folder_paths("personality_adapters")[0]
    os.makedirs(folder, exist_ok=True)
    name = name or f"test_{family}_{width}_{seed}.safetensors"
    adapter = PersonalityAdapter.for_layers(family, width, host.cross_attention_layers(tm.model), tokens=4, seed=seed)
    adapter.save(os.path.join(folder, name))
    return name


def reference_images(seed: int, n: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 48, 64, 3, generator=g)


def encode_reference(name: str, seed: int, **kw):
    return reference_node.execute(build_clip_vision(VISION_WIDTH), reference_images(seed), name,
                                  kw.pop("combine", "average"), **kw).result[0]


def two_masks(latent_hw):
    h, w = latent_hw[0] * 8, latent_hw[1] * 8
    masks = torch.zeros(2, h, w)
    masks[0, h // 4: h // 2, w // 4: w // 2] = 1.0
    masks[1, h // 2: h - 8, w // 2: w - 4] = 1.0
    return masks


def product_and_background(first: Replay, second: Replay, masks):
    """Per layer over all rows (cond and uncond): the largest |delta| on product positions and the
    largest on background positions."""
    product_deltas, background_deltas = [], []
    assert len(first.outputs) == len(second.outputs) > 0
    for (hw, latent_hw, chunks, a), (_, _, _, b) in zip(first.outputs, second.outputs):
        per_chunk = a.shape[0] // len(chunks)
        region = ProductRegion(masks).queries(hw, latent_hw, a.device)
        region = region.repeat(per_chunk // region.shape[0], 1).repeat(len(chunks), 1)
        delta = (a - b).abs().amax(-1)
        product_deltas.append(float(delta[region].max()))
        background_deltas.append(float(delta[~region].max()))
    return product_deltas, background_deltas


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_the_reference_never_reaches_the_product_in_any_layer(family):
    tm = tiny(family)
    name = adapter_file(family, tm)
    masks = two_masks(LATENT)
    cond, negative = encode(tm, "a product photo"), encode(tm, "blurry")
    model_a = apply_node.execute(tm.model, encode_reference(name, 1), masks, 1.0, 0.0, 1.0).result[0]
    model_b = apply_node.execute(tm.model, encode_reference(name, 2), masks, 1.0, 0.0, 1.0).result[0]
    first = Replay().run(tm, model_a, cond, negative, LATENT, batch=2)
    second = Replay(first.inputs).run(tm, model_b, cond, negative, LATENT, batch=2)
    product, background = product_and_background(first, second, masks)
    assert len(product) == len(host.cross_attention_keys(tm.model)) * 1  # one step, every layer
    assert max(product) == 0.0, product
    assert min(background) > 0.0, background  # the reference does act, in every layer

    # weight 0: the patched model's output is bit-identical to the unpatched one
    off = apply_node.execute(tm.model, encode_reference(name, 1), masks, 0.0, 0.0, 1.0).result[0]
    assert torch.equal(sample(tm, cond, negative, LATENT, model=off, batch=2),
                       sample(tm, cond, negative, LATENT, batch=2))


def test_category_gate_and_reference_together_keep_both_off_the_product():
    tm = tiny("sd15")
    folder = folder_paths.get_folder_paths("category_libraries")[0]
    os.makedirs(folder, exist_ok=True)
    library = "personality_and_category.safetensors"
    TokenLibrary.write(os.path.join(folder, library), ["marble", "workbench"],
                          {"clip_l": torch.randn(2, 1, 768, generator=torch.Generator().manual_seed(3)) * 0.02},
                          "sd15")
    folder_paths.filename_list_cache.pop("category_libraries", None)
    name = adapter_file("sd15", tm)
    masks = two_masks(LATENT)
    negative = encode(tm, "blurry")

    def patched(category, seed):
        cond, tokens = tokens_node.execute(tm.clip, library, category, "a product photo on a {category} background").result
        model = gate_node.execute(tm.model, masks, tokens, 1.0, 0, 0.0).result[0]
        return apply_node.execute(model, encode_reference(name, seed), masks, 1.0, 0.0, 1.0).result[0], cond

    model_a, cond_a = patched("marble", 1)
    model_b, cond_b = patched("workbench", 2)
    first = Replay().run(tm, model_a, cond_a, negative, LATENT, batch=2)
    second = Replay(first.inputs).run(tm, model_b, cond_b, negative, LATENT, batch=2)
    product, background = product_and_background(first, second, masks)
    assert max(product) == 0.0 and min(background) > 0.0


def test_the_references_own_product_is_left_out_of_what_is_encoded():
    tm = tiny("sd15")
    name = adapter_file("sd15", tm)
    cv = build_clip_vision(VISION_WIDTH)
    image = reference_images(4)
    mask = torch.zeros(1, 48, 64)
    mask[:, 12:36, 16:40] = 1.0
    other = image.clone()
    other[:, 12:36, 16:40] = torch.rand(1, 24, 24, 3, generator=torch.Generator().manual_seed(9))  # another product
    with_mask = [reference_node.execute(cv, im, name, "average", reference_mask=mask).result[0].tokens
                 for im in (image, other)]
    without = [reference_node.execute(cv, im, name, "average").result[0].tokens for im in (image, other)]
    assert torch.equal(with_mask[0], with_mask[1])
    assert not torch.equal(without[0], without[1])


def test_several_references_average_or_concatenate():
    tm = tiny("sd15")
    name = adapter_file("sd15", tm)
    cv = build_clip_vision(VISION_WIDTH)
    images = torch.cat([reference_images(1), reference_images(2)])
    one = [reference_node.execute(cv, images[i:i + 1], name, "average").result[0].tokens for i in range(2)]
    averaged = reference_node.execute(cv, images, name, "average").result[0].tokens
    joined = reference_node.execute(cv, images, name, "concatenate").result[0].tokens
    assert averaged.shape == (1, 4, 768) and joined.shape == (1, 8, 768)
    assert torch.allclose(averaged, (one[0] + one[1]) / 2, atol=1e-5)
    assert torch.allclose(joined, torch.cat(one, dim=1), atol=1e-5)


def test_an_adapter_file_reloads_to_identical_outputs(tmp_path):
    tm = tiny("sd15")
    adapter = PersonalityAdapter.for_layers("sd15", VISION_WIDTH, host.cross_attention_layers(tm.model), tokens=4, seed=7)
    states = torch.randn(2, 17, VISION_WIDTH)
    path = adapter.save(tmp_path / "a.safetensors", training={"steps": 3})
    again = PersonalityAdapter.load(path)
    assert again.family == "sd15" and again.n_tokens == 4 and again.training_summary == {"steps": 3}
    with torch.no_grad():
        assert torch.equal(adapter.tokens(states), again.tokens(states))
        for key, (k, v) in adapter.projections().items():
            k2, v2 = again.projections()[key]
            assert torch.equal(k.weight, k2.weight) and torch.equal(v.weight, v2.weight)
    # and through the nodes: the same file name, loaded afresh, samples the same image
    name = adapter_file("sd15", tm, seed=7)
    masks = two_masks((8, 8))[:1]
    cond, negative = encode(tm, "a product photo"), encode(tm, "blurry")
    runs = []
    for _ in range(2):
        personality._ADAPTERS.clear()
        model = apply_node.execute(tm.model, encode_reference(name, 1), masks, 1.0, 0.0, 1.0).result[0]
        runs.append(sample(tm, cond, negative, (8, 8), model=model))
    assert torch.equal(runs[0], runs[1])


def test_bad_input_is_refused_before_sampling(tmp_path, monkeypatch):
    tm = tiny("sd15")
    name = adapter_file("sd15", tm)
    masks = two_masks((8, 8))[:1]
    reference = encode_reference(name, 1)
    # an adapter for another family
    xl = tiny("sdxl")
    xl_name = adapter_file("sdxl", xl)
    with pytest.raises(ProductSceneError, match=r"^reference: the adapter .* was made for sdxl \(2048-wide context\)"):
        apply_node.execute(tm.model, encode_reference(xl_name, 1), masks, 1.0, 0.0, 1.0)
    # an adapter for another CLIP-vision width
    wide = adapter_file("sd15", tm, width=VISION_WIDTH * 2)
    with pytest.raises(ProductSceneError, match=r"^clip_vision: this CLIP vision model gives 64-wide features, "
                                                r"but the adapter was made for 128-wide ones"):
        encode_reference(wide, 1)
    # a reference batch of the wrong shape: a MASK where an IMAGE belongs
    with pytest.raises(ProductSceneError, match=r"^image: expected a \[B,H,W,C\] image tensor"):
        reference_node.execute(build_clip_vision(VISION_WIDTH), torch.rand(1, 48, 64), name, "average")
    with pytest.raises(ProductSceneError, match=r"^reference_mask: is 32x32 but the reference image is 64x48"):
        encode_reference(name, 1, reference_mask=torch.ones(1, 32, 32))
    # start >= end, weights out of range
    with pytest.raises(ProductSceneError, match=r"^start/end: start \(0.6\) must be below end \(0.6\)"):
        apply_node.execute(tm.model, reference, masks, 1.0, 0.6, 0.6)
    with pytest.raises(ProductSceneError, match=r"^weight: expected a number from 0 to 2"):
        apply_node.execute(tm.model, reference, masks, float("nan"), 0.0, 1.0)
    # a corrupt and a pickle adapter file
    folder = folder_paths.get_folder_paths("personality_adapters")[0]
    with open(os.path.join(folder, "corrupt.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with open(os.path.join(folder, "pickled.safetensors"), "wb") as f:
        f.write(b"\x80\x04\x95" + b"\x00" * 64)
    for bad in ("corrupt.safetensors", "pickled.safetensors"):
        with pytest.raises(ProductSceneError, match=rf"^{bad}: not a valid safetensors file"):
            encode_reference(bad, 1)
    # a category library is not an adapter
    lib = os.path.join(folder, "a_library.safetensors")
    TokenLibrary.write(lib, ["marble"], {"clip_l": torch.zeros(1, 1, 768)}, "sd15")
    with pytest.raises(ProductSceneError, match="expected a ProductScene 'personality_adapter' file"):
        encode_reference("a_library.safetensors", 1)
    # names that leave the folder
    with pytest.raises(ProductSceneError, match=r"^adapter: '\.\./x\.safetensors' is not allowed"):
        encode_reference("../x.safetensors", 1)
    # a mask batch that does not pair with the latents: refused before any attention runs
    calls = []
    model = apply_node.execute(tm.model, reference, two_masks((8, 8)), 1.0, 0.0, 1.0).result[0]
    monkeypatch.setattr(comfy_attention, "optimized_attention", lambda *a, **k: calls.append(1))
    with pytest.raises(ProductSceneError, match=r"^mask: 2 product masks for a batch of 3 images"):
        sample(tm, encode(tm, "a"), encode(tm, "b"), (8, 8), model=model, batch=3)
    assert calls == []
