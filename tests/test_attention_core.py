"""SceneAttention on its own (host-free): gate, capture and reference injection."""
from __future__ import annotations

import pytest
import torch

from productscene.attention import (AttentionCapture, CategoryGate, LayerInfo, ReferenceInjection,
                                    SceneAttention, attention_probs, downsampled_hw, sdpa)
from productscene.errors import ProductSceneError

HEADS, DIM = 2, 8


def qkv(b=2, hw=(4, 6), nk=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    nq = hw[0] * hw[1]
    return (torch.randn(b, nq, HEADS * DIM, generator=g), torch.randn(b, nk, HEADS * DIM, generator=g),
            torch.randn(b, nk, HEADS * DIM, generator=g))


def product_mask(hw=(4, 6), b=1):
    m = torch.zeros(b, hw[0] * 8, hw[1] * 8)
    m[:, :16, :16] = 1
    return m


def layer(hw=(4, 6), chunks=(0,), key=("input", 1, 0), progress=None):
    return LayerInfo(key=key, heads=HEADS, hw=hw, latent_hw=hw, chunks=chunks, progress=progress)


def test_without_parts_it_is_plain_attention():
    q, k, v = qkv()
    assert torch.allclose(SceneAttention()(q, k, v, layer()), sdpa(q, k, v, HEADS), atol=1e-6)


def test_gate_zeroes_identifier_on_product_rows_and_repeats_with_longer_contexts():
    q, k, v = qkv(nk=154)  # cond was 77 rows, repeated to 154 to match a longer uncond
    scene = SceneAttention().with_gate(CategoryGate(product_mask(), [5], 77))
    bias = scene.bias(layer(), 2, 24, 154, q.device, q.dtype)
    probs = attention_probs(q, k, HEADS, bias)
    product = torch.zeros(4, 6, dtype=torch.bool)
    product[:2, :2] = True
    product = product.flatten()
    assert float(probs[:, :, product][..., [5, 82]].max()) == 0.0
    assert float(probs[:, :, ~product][..., [5, 82]].min()) > 0.0
    with pytest.raises(ProductSceneError, match="conditioning reaching the sampler has 100 token rows"):
        scene.bias(layer(), 2, 24, 100, q.device, q.dtype)


def test_bias_is_built_once_per_layer_shape():
    q, k, v = qkv()
    scene = SceneAttention().with_gate(CategoryGate(product_mask(), [5], 77))
    first = scene.bias(layer(), 2, 24, 77, q.device, q.dtype)
    assert scene.bias(layer(key=("output", 3, 0)), 2, 24, 77, q.device, q.dtype) is first


def test_with_methods_return_copies():
    base = SceneAttention()
    gated = base.with_gate(CategoryGate(product_mask(), [5], 77))
    assert base.gates == () and len(gated.gates) == 1
    assert len(gated.merged(gated).gates) == 2


def test_capture_records_only_requested_layers_and_tokens_with_gradients():
    q, k, v = qkv(hw=(8, 8))
    q.requires_grad_(True)
    capture = AttentionCapture({"cat": [5, 6], "dog": [9]}, downsample=2)
    scene = SceneAttention(capture=capture)
    latent = (16, 16)
    full = LayerInfo(key=("input", 1, 0), heads=HEADS, hw=(16, 16), latent_hw=latent)
    half = LayerInfo(key=("input", 4, 0), heads=HEADS, hw=(8, 8), latent_hw=latent)
    out = scene(q, k, v, half)
    assert torch.allclose(out, sdpa(q, k, v, HEADS), atol=1e-5)  # capture does not change the result
    assert not capture.wants(full) and capture.wants(half)
    maps = capture.maps()
    probs = attention_probs(q, k, HEADS).mean(1)
    assert torch.allclose(maps["cat"], probs[..., [5, 6]].sum(-1).reshape(2, 8, 8), atol=1e-6)
    maps["dog"].sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    capture.clear()
    with pytest.raises(ProductSceneError, match="no cross-attention layer matched"):
        capture.maps()


def test_downsampled_sizes_round_up_like_stride_two_convolutions():
    assert downsampled_hw((64, 64), 4) == (16, 16)
    assert downsampled_hw((9, 13), 2) == (5, 7)
    assert downsampled_hw((9, 13), 4) == (3, 4)


def test_reference_injection_reaches_background_only_and_respects_its_window():
    q, k, v = qkv()
    torch.manual_seed(0)
    projections = {("input", 1, 0): (torch.nn.Linear(12, HEADS * DIM), torch.nn.Linear(12, HEADS * DIM))}
    tokens = torch.randn(1, 4, 12)
    injection = ReferenceInjection(tokens, projections, product_mask(), weight=0.7, start=0.2, end=0.6)
    scene = SceneAttention().with_injection(injection)
    plain = sdpa(q, k, v, HEADS)
    with torch.no_grad():
        inside = scene(q, k, v, layer(progress=0.5))
    delta = (inside - plain).abs().amax(-1)
    product = torch.zeros(4, 6, dtype=torch.bool)
    product[:2, :2] = True
    product = product.flatten()
    assert float(delta[:, product].max()) == 0.0
    assert float(delta[:, ~product].min()) > 0.0
    assert torch.equal(scene(q, k, v, layer(progress=0.9)), plain)  # outside start..end
    assert torch.equal(scene(q, k, v, layer(progress=0.5, key=("output", 9, 0))), plain)  # no projection there


def test_gate_rejects_bad_inputs():
    with pytest.raises(ProductSceneError, match="identifier rows"):
        CategoryGate(product_mask(), [80], 77)
    with pytest.raises(ProductSceneError, match="grow_latent_px"):
        CategoryGate(product_mask(), [5], 77, grow_latent_px=-1)
    with pytest.raises(ProductSceneError, match="start/end"):
        ReferenceInjection(torch.zeros(1, 4, 12), {}, product_mask(), start=0.8, end=0.2)
