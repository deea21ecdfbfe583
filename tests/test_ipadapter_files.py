"""IP-Adapter files as personality adapters, checked against the real ComfyUI_IPAdapter_plus.

For each supported kind (plain and 'plus' projection; SD1.5 and SDXL; the ViT-H and ViT-bigG
widths those files expect) a file with random weights of the real key names and shapes (built with
IPAdapter_plus's own projection classes, devkit/ipadapter.py) sits in models/ipadapter. IPAdapter_plus
loads it with its own loader and patches a UNet of the real layout with its own IPAdapterEmbeds node;
ProductScene loads the same file through Personality Reference's loader. For the same image
embeddings and weight:
- the reference tokens (cond and uncond) equal the ones IPAdapter_plus computed;
- on every cross-attention layer (its middle-block entry called directly: its node's key for it
  never fires in ComfyUI), the added attention output on background positions equals what its own
  attention callback returns for the same queries, and product positions get exactly 0.0.
Then the node path: an IP-Adapter file from models/ipadapter through Personality Reference and
Apply Personality leaves every product position of every layer bit-identical.
"""
from __future__ import annotations

import pytest
import torch

from productscene.attention import LayerInfo, ProductRegion, sdpa
from productscene.errors import ProductSceneError
from productscene.ipadapter import IPAdapterPersonality, layer_order, load_adapter, processor_order
from devkit import comfy_env, ipadapter
from devkit.clip_vision import build_clip_vision
from devkit.models import encode, full_layout_unet, tiny
from devkit.replay import Replay

pytestmark = [pytest.mark.skipif(ipadapter.skip_reason() is not None, reason=str(ipadapter.skip_reason())),
              pytest.mark.host]

pack = comfy_env.import_pack()
host, personality = pack.nodes.host, pack.nodes.personality
TOLERANCE = dict(atol=2e-5, rtol=1e-4)  # float32; two attention kernels summing in another order

# (family, kind, vision width): the files users have
KINDS = {
    "ip-adapter_sd15 (ViT-H)": ("sd15", "linear", 1024),
    "ip-adapter-plus_sd15 (ViT-H)": ("sd15", "plus", 1280),
    "ip-adapter_sdxl (ViT-bigG)": ("sdxl", "linear", 1280),
    "ip-adapter_sdxl_vit-h": ("sdxl", "linear", 1024),
    "ip-adapter-plus_sdxl_vit-h": ("sdxl", "plus", 1280),
}


def product_mask(latent_hw):
    h, w = latent_hw[0] * 8, latent_hw[1] * 8
    mask = torch.zeros(1, h, w)
    mask[:, h // 4: 3 * h // 4, w // 3: 2 * w // 3] = 1.0
    return mask


@pytest.mark.parametrize("what", list(KINDS))
def test_an_ipadapter_file_computes_what_ipadapter_plus_computes_off_the_product(what):
    family, kind, width = KINDS[what]
    unet = full_layout_unet(family)
    layers = host.cross_attention_layers(unet)
    name = ipadapter.write_plus_model(family, layers, f"ipa_{family}_{kind}_{width}.safetensors", seed=11,
                                      kind=kind, vision_width=width)
    states = ipadapter.clip_vision_states(3, (1, 257, width) if kind == "plus" else (1, width))
    weight = 0.8
    theirs = ipadapter.apply(unet, ipadapter.load_model(name), weight=weight, states=states)
    replaces = theirs.model_options["transformer_options"]["patches_replace"]["attn2"]

    assert name in personality.list_adapters()  # listed from models/ipadapter, recognised by its keys
    ours = personality.open_adapter(name)
    assert isinstance(ours, IPAdapterPersonality) and (ours.family, ours.kind) == (family, kind)
    with torch.no_grad():
        cond, uncond = ours.tokens(states[0]), ours.tokens(states[1])
    first = replaces[ipadapter.patched_keys(family)[0]].kwargs[0]
    assert cond.shape == first["cond"].shape == (1, 16 if kind == "plus" else 4, ipadapter.CONTEXT_WIDTH[family])
    torch.testing.assert_close(cond, first["cond"].float(), **TOLERANCE)
    torch.testing.assert_close(uncond, first["uncond"].float(), **TOLERANCE)

    latent_hw, hw = (12, 16), (6, 8)
    mask = product_mask(latent_hw)
    injection = ours.injection(cond, mask, weight=weight, negative=uncond)
    product = ProductRegion(mask).queries(hw, latent_hw, "cpu")[0]
    assert 0 < int(product.sum()) < product.numel()
    g = torch.Generator().manual_seed(0)
    their_keys, our_keys = ipadapter.patched_keys(family), layer_order(family)
    assert set(our_keys) == set(layers) and len(their_keys) == len(our_keys) == (16 if family == "sd15" else 70)
    assert processor_order(reversed(list(layers))) == our_keys  # the model's layers in processor order
    for index, (their_key, our_key) in enumerate(zip(their_keys, our_keys)):
        attn2 = layers[our_key]
        q = torch.randn(2, hw[0] * hw[1], attn2.to_k.out_features, generator=g)
        extra = {"n_heads": attn2.heads, "cond_or_uncond": [0, 1], "block": their_key[:2], "transformer_index": index,
                 "original_shape": [2, 4, *latent_hw], "sigmas": torch.tensor([1.0])}
        patch = replaces[their_key]
        with torch.inference_mode():
            expected = patch.callback[0](None, q, None, None, extra, **patch.kwargs[0]).float()
        got = injection(q, LayerInfo(our_key, attn2.heads, hw, latent_hw, chunks=(0, 1)), sdpa)
        assert float(expected[:, product].abs().max()) > 1e-3  # IPAdapter_plus would reach the product
        assert float(got[:, product].abs().max()) == 0.0, our_key
        torch.testing.assert_close(got[:, ~product], expected[:, ~product], **TOLERANCE, msg=f"{what}: {our_key}")


@pytest.mark.parametrize("kind", ["linear", "plus"])
def test_an_ipadapter_file_through_the_nodes_never_reaches_the_product(kind):
    """Personality Reference with a small CLIP vision (ComfyUI's own class; the file's projection
    sized to it) and Apply Personality on SD1.5's real UNet layout (what the file is made for):
    two references change the background of every layer, no product position of any layer (0.0)."""
    tm = tiny("sd15")  # its CLIP
    unet = full_layout_unet("sd15")
    cv = build_clip_vision(64)
    width = 64 if kind == "plus" else 32  # penultimate states / pooled image_embeds of that encoder
    name = ipadapter.write_plus_model("sd15", host.cross_attention_layers(unet), f"small_ipa_{kind}.safetensors",
                                      seed=2, kind=kind, vision_width=width)
    latent = (10, 14)
    masks = torch.zeros(2, 80, 112)
    masks[0, 20:40, 28:56] = 1.0
    masks[1, 40:72, 56:108] = 1.0
    g = torch.Generator().manual_seed(4)
    refs = [personality.ProductScenePersonalityReference.execute(cv, torch.rand(1, 48, 64, 3, generator=g), name,
                                                                 "average").result[0] for _ in range(2)]
    apply = personality.ProductSceneApplyPersonality.execute
    with pytest.raises(ProductSceneError, match=r"^reference: the personality adapter was made for another UNet"):
        apply(tm.model, refs[0], masks, 1.0, 0.0, 1.0)  # the tiny UNet has other layers than SD1.5's
    models = [apply(unet, ref, masks, 1.0, 0.0, 1.0).result[0] for ref in refs]
    cond, negative = encode(tm, "a product photo"), encode(tm, "blurry")
    first = Replay().run(tm, models[0], cond, negative, latent, batch=2)
    second = Replay(first.inputs).run(tm, models[1], cond, negative, latent, batch=2)
    from tests.test_personality import product_and_background
    product, background = product_and_background(first, second, masks)
    assert len(product) == 16 and max(product) == 0.0
    assert min(background) > 0.0


def test_ipadapter_files_that_need_more_than_clip_vision_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "ip-adapter-faceid_sd15.safetensors"
    save_file({"image_proj.proj.2.weight": torch.zeros(4, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(320, 768),
               "ip_adapter.0.to_q_lora.down.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ProductSceneError, match=r"^adapter: ip-adapter-faceid_sd15.safetensors is an IP-Adapter "
                                                r"(FaceID|FaceID / portrait) file"):
        IPAdapterPersonality.load(path)


def test_with_an_ipadapter_file_the_references_product_is_left_out_and_references_combine():
    """As with a trained adapter: with a 'plus' file the reference's own product (reference_mask) is
    left out of the resampler's attention (another product in the same place gives the same tokens),
    several references average or concatenate, and a negative reference is taken."""
    unet = full_layout_unet("sd15")
    cv = build_clip_vision(64)
    name = ipadapter.write_plus_model("sd15", host.cross_attention_layers(unet), "small_ipa_mask.safetensors",
                                      seed=6, kind="plus", vision_width=64)
    node = personality.ProductScenePersonalityReference
    g = torch.Generator().manual_seed(8)
    image = torch.rand(1, 48, 64, 3, generator=g)
    other = image.clone()
    other[:, 12:36, 16:40] = torch.rand(1, 24, 24, 3, generator=g)
    mask = torch.zeros(1, 48, 64)
    mask[:, 12:36, 16:40] = 1.0
    masked = [node.execute(cv, im, name, "average", reference_mask=mask).result[0].tokens for im in (image, other)]
    unmasked = [node.execute(cv, im, name, "average").result[0].tokens for im in (image, other)]
    assert torch.equal(masked[0], masked[1]) and not torch.equal(unmasked[0], unmasked[1])
    both = torch.cat([image, other])
    joined = node.execute(cv, both, name, "concatenate").result[0].tokens
    averaged = node.execute(cv, both, name, "average").result[0].tokens
    assert joined.shape == (1, 32, 768) and averaged.shape == (1, 16, 768)
    torch.testing.assert_close(joined, torch.cat(unmasked, dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(averaged, (unmasked[0] + unmasked[1]) / 2, atol=1e-5, rtol=1e-5)
    ref, negative = node.execute(cv, image, name, "average").result[0], node.execute(cv, other, name, "average").result[0]
    product = torch.zeros(1, 64, 64)
    product[:, 16:40, 16:40] = 1.0
    model = personality.ProductSceneApplyPersonality.execute(unet, ref, product, 1.0, 0.0, 1.0,
                                                             negative_reference=negative).result[0]
    injection = model.model_options["transformer_options"][host.SCENE_KEY].injections[0]
    assert torch.equal(injection.tokens, ref.tokens) and torch.equal(injection.negative, negative.tokens)


def test_an_ipadapter_file_maps_onto_any_models_layers_in_processor_order_and_refuses_another_layout(tmp_path):
    """A file of the released format for another UNet (the tiny SD1.5 layout) loads onto that model's
    cross-attention layers in IP-Adapter's processor order (pair 2i+1 -> the i-th layer: each
    to_k_ip here is its layer's own to_k); fine-tuned and written, it names its layers and loads
    without the model. A released SD1.5-layout file is refused on that model, and without a model
    the released layout is assumed, naming the counts."""
    from productscene.train.recipes.personality import initial_from_ipadapter

    tm = tiny("sd15")
    layers = host.cross_attention_layers(tm.model)
    assert len(layers) != 16
    path = ipadapter.write_training_start(tmp_path / "ipa_tiny.safetensors", layers, 64, tokens=4, dim=64, depth=1,
                                          heads=1)
    adapter = initial_from_ipadapter(path, "sd15", layers, 64)
    assert set(adapter.projections()) == set(layers)
    for i, key in enumerate(processor_order(layers)):  # input blocks, output blocks, then the middle
        to_k, to_v = adapter.projections()[key]
        torch.testing.assert_close(to_k.weight, layers[key].to_k.weight.half().float(), atol=0, rtol=0)
        torch.testing.assert_close(to_v.weight, layers[key].to_v.weight.half().float(), atol=0, rtol=0)
    assert processor_order(layers)[-1][0] == "middle" and processor_order(layers)[0][0] == "input"

    saved = adapter.save(tmp_path / "tuned.safetensors")
    again = load_adapter(saved)  # no model: its metadata names the layers
    assert isinstance(again, IPAdapterPersonality) and again.layer_widths == adapter.layer_widths
    for key, (to_k, _) in again.projections().items():
        assert torch.equal(to_k.weight, adapter.projections()[key][0].weight)

    with pytest.raises(ProductSceneError, match=r"^adapter: ipa_tiny.safetensors holds %d to_k_ip/to_v_ip pairs, "
                                                r"but sd15's released IP-Adapters have 16" % len(layers)):
        IPAdapterPersonality.load(path)
    released = ipadapter.write_plus_model("sd15", host.cross_attention_layers(full_layout_unet("sd15")),
                                          "ipa_released_layout.safetensors", seed=1, kind="plus", vision_width=64)
    import folder_paths
    released_path = folder_paths.get_full_path("ipadapter", released)
    with pytest.raises(ProductSceneError, match=r"^from_ipadapter: ipa_released_layout.safetensors holds 16 "
                                                r"to_k_ip/to_v_ip pairs, but the model has %d" % len(layers)):
        initial_from_ipadapter(released_path, "sd15", layers, 64)
    with pytest.raises(ProductSceneError, match=r"^from_ipadapter: ipa_released_layout.safetensors is an IP-Adapter "
                                                r"for sd15, but the model is sdxl"):
        initial_from_ipadapter(released_path, "sdxl", layers, 64)
