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
    assert torch.equal(SceneAttention()(q, k, v, layer()), sdpa(q, k, v, HEADS))


WIDTH = 12


def projector(seed=7):
    g = torch.Generator().manual_seed(seed)
    wk, wv = torch.randn(WIDTH, HEADS * DIM, generator=g), torch.randn(WIDTH, HEADS * DIM, generator=g)
    return lambda c: (c @ wk, c @ wv)


def contexts(b=2, nk=77, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, nk, WIDTH, generator=g)


def product_rows(hw=(4, 6)):
    product = torch.zeros(*hw, dtype=torch.bool)
    product[:2, :2] = True
    return product.flatten()


def test_gate_product_rows_attend_exactly_the_free_context_and_ignore_the_category():
    project = projector()
    q = qkv(b=2)[0]
    free = contexts(1, 70, seed=3)
    scene = SceneAttention().with_gate(CategoryGate(product_mask(), free))
    lay = layer(chunks=(1, 0))  # [uncond, cond], one image each
    a = contexts(2, seed=1)
    b = a.clone()
    b[1, 5:] += torch.randn(72, WIDTH)  # another category: its row and every row after it differ
    out_a = scene(q, *project(a), lay, project=project)
    out_b = scene(q, *project(b), lay, project=project)
    product = product_rows()
    assert torch.equal(out_a[1, product], out_b[1, product])  # bit-identical on product positions
    assert (out_a[1, ~product] - out_b[1, ~product]).abs().amax(-1).min() > 1e-3  # the background sees it
    assert torch.equal(out_a[0], sdpa(q[:1], *project(a[:1]), HEADS)[0])  # uncond untouched
    fk, fv = project(free)
    assert torch.equal(out_a[1, product], sdpa(q[1:], fk, fv, HEADS)[0, product])
    assert torch.equal(out_a[1, ~product], sdpa(q[1:], *project(a[1:]), HEADS)[0, ~product])


def test_strength_blends_the_two_outputs_linearly():
    project = projector()
    q = qkv(b=1)[0]
    a, free = contexts(1, seed=1), contexts(1, 70, seed=3)
    full = sdpa(q, *project(a), HEADS)
    only_free = sdpa(q, *project(free), HEADS)
    product = product_rows()
    for s in (0.0, 0.3, 1.0):
        out = SceneAttention().with_gate(CategoryGate(product_mask(), free, strength=s))(q, *project(a), layer(), project=project)
        assert torch.equal(out[0, ~product], full[0, ~product])
        torch.testing.assert_close(out[0, product], torch.lerp(full, only_free, s)[0, product])
    zero = SceneAttention().with_gate(CategoryGate(product_mask(), free, strength=0.0))(q, *project(a), layer(), project=project)
    assert torch.equal(zero, full)


def test_gates_act_on_the_rows_whose_context_is_their_own():
    free = contexts(1, 70, seed=3)
    own, other = contexts(1, seed=1), contexts(1, seed=2)
    gate = CategoryGate(product_mask(), free, contexts=[own])
    scene = SceneAttention().with_gate(gate).with_gate(CategoryGate(product_mask(), free))
    # batch rows: cond chunk (own prompt, other prompt), then uncond chunk (the same two)
    mine, every = scene.gated_rows((0, 1), 4, torch.cat([own, other, own, other]))
    assert mine.tolist() == [0] and every.tolist() == [0, 1]  # uncond rows are never gated
    longer = own.repeat(1, 2, 1)  # ComfyUI repeats a shorter cond to a common length
    assert gate.matches(longer[0]) and not gate.matches(other[0])
    scene.check_contexts([other, own])
    with pytest.raises(ProductSceneError, match="^category_tokens: the positive conditioning"):
        scene.check_contexts([other])


def test_capture_sees_the_identifier_nowhere_on_product_positions():
    project = projector()
    q = qkv(b=1)[0]
    a, free = contexts(1, seed=1), contexts(1, 70, seed=3)
    capture = AttentionCapture({"identifier": [5]})
    scene = SceneAttention(capture=capture).with_gate(CategoryGate(product_mask(), free))
    scene(q, *project(a), layer(), project=project)
    amap = capture.layer_maps("identifier")[0].flatten(1)[0]
    product = product_rows()
    assert float(amap[product].abs().max()) == 0.0 and float(amap[~product].min()) > 0.0


def test_with_methods_return_copies():
    base = SceneAttention()
    gated = base.with_gate(CategoryGate(product_mask(), contexts(1, seed=3)))
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
    with pytest.raises(ProductSceneError, match="category-free context"):
        CategoryGate(product_mask(), torch.zeros(77, WIDTH))
    with pytest.raises(ProductSceneError, match="grow_latent_px"):
        CategoryGate(product_mask(), contexts(1), grow_latent_px=-1)
    with pytest.raises(ProductSceneError, match="strength"):
        CategoryGate(product_mask(), contexts(1), strength=1.5)
    with pytest.raises(ProductSceneError, match="mask"):
        CategoryGate(torch.zeros(1, 32, 32), contexts(1))
    with pytest.raises(ProductSceneError, match="start/end"):
        ReferenceInjection(torch.zeros(1, 4, 12), {}, product_mask(), start=0.8, end=0.2)
