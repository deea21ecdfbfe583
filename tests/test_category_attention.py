"""MaskedCategoryAttention inside the real ComfyUI UNet (issue 3, evidence 1, 4, 5).

A spy replaces ComfyUI's attention kernels for the duration of a sampling run and computes the
attention itself (softmax(QK^T/sqrt(d) + bias) V), so the probabilities it records are exactly the
ones the model used. An attn2 patch records, for each cross-attention call, the layer size and the
cond/uncond layout of the batch.
"""
from __future__ import annotations

import productscene
import productscene.errors
from productscene.prompt import CategoryTokens
import productscene.masks
import math
import types

import pytest
import torch
import torch.nn.functional as F

from tests.support import comfy_env
from tests.support.models import encode, sample, tiny, tiny_sd15

import comfy.ldm.modules.attention as comfy_attention

pack = comfy_env.import_pack()
ProductSceneError = productscene.errors.ProductSceneError
host = pack.nodes.host
node = pack.nodes.category_attention.MaskedCategoryAttention
IDENTIFIER_ROWS = (4, 5)


def tokens_value(rows=IDENTIFIER_ROWS, context_rows=77, library_path=""):
    return CategoryTokens(library_path=library_path, category="test", family="sd15", rows=tuple(rows),
                          context_rows=context_rows, vectors={})


def gate(model, mask, rows=IDENTIFIER_ROWS, strength=1.0, grow=0):
    return node.execute(model, mask, tokens_value(rows), strength, grow, 0.0).result[0]


class Spy:
    """Records the probabilities of every cross-attention call with its layer size and chunks."""

    def __init__(self, context_rows=(77,)):
        self.context_rows = context_rows
        self.layers = []  # (hw, chunks) from the attn2 patch, in call order
        self.calls = []  # probs [B, H, Nq, Nk] of cross-attention calls, in call order

    def attn2_patch(self, n, context, value, extra_options):
        shape = extra_options["activations_shape"]
        self.layers.append(((shape[-2], shape[-1]), tuple(extra_options["cond_or_uncond"])))
        return n, context, value

    def kernel(self, q, k, v, heads, mask=None, attn_precision=None, **kwargs):
        b, nq, inner = q.shape
        d = inner // heads
        qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        logits = (qh @ kh.transpose(-1, -2)) / math.sqrt(d)
        if mask is not None:
            logits = logits + (mask.unsqueeze(1) if mask.ndim == 3 else mask)
        probs = logits.softmax(-1)
        if k.shape[1] in self.context_rows and k.shape[1] != nq:
            self.calls.append(probs.detach())
        return (probs @ vh).transpose(1, 2).reshape(b, nq, inner)

    def run(self, monkeypatch, tm, model, masks_hw, batch, cfg=5.0, positive="a bottle on a table", negative="blurry"):
        model = model.clone()
        model.set_model_attn2_patch(self.attn2_patch)
        monkeypatch.setattr(comfy_attention, "optimized_attention", self.kernel)
        monkeypatch.setattr(comfy_attention, "optimized_attention_masked", self.kernel)
        sample(tm, encode(tm, positive), encode(tm, negative), latent_hw=masks_hw, steps=1, cfg=cfg,
               model=model, batch=batch)
        monkeypatch.undo()
        assert len(self.layers) == len(self.calls) > 0
        return list(zip(self.layers, self.calls))


def product_queries(mask, hw):
    """Layer positions that contain any product pixel (the definition the gate must honour)."""
    return (F.adaptive_max_pool2d(mask[:, None], hw)[:, 0] > 0).flatten(1)


def two_masks(latent_hw):
    h, w = latent_hw[0] * 8, latent_hw[1] * 8
    masks = torch.zeros(2, h, w)
    masks[0, h // 4: h // 2, w // 4: w // 2] = 1.0  # top-left product
    masks[1, h // 2: h - 8, w // 2: w - 4] = 1.0  # bottom-right product, off the latent grid
    return masks


def identifier_mass(records, masks, rows, chunk_kind):
    """Largest probability from a product query to an identifier key, per layer, in chunks of a kind."""
    out = []
    for (hw, chunks), probs in records:
        per_chunk = probs.shape[0] // len(chunks)
        product = product_queries(masks, hw)
        for index, kind in enumerate(chunks):
            if kind != chunk_kind:
                continue
            p = probs[index * per_chunk:(index + 1) * per_chunk]  # [b, H, Nq, Nk]
            id_probs = p[..., list(rows)].amax(dim=(1, 3))  # [b, Nq]
            out.append(float(id_probs[product].max()))
    return out


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
@pytest.mark.parametrize("latent_hw", [(16, 16), (10, 14)])
def test_identifier_never_reaches_product_pixels(monkeypatch, family, latent_hw):
    tm = tiny(family)
    masks = two_masks(latent_hw)
    layers = len(host.cross_attention_keys(tm.model))

    gated = Spy().run(monkeypatch, tm, gate(tm.model, masks), latent_hw, batch=2)
    plain = Spy().run(monkeypatch, tm, tm.model, latent_hw, batch=2)

    assert len(gated) == len(plain) == layers  # one CFG-batched call per cross-attention layer
    assert all(chunks == (1, 0) or chunks == (0, 1) for (_, chunks), _ in gated)
    half = (-(-latent_hw[0] // 2), -(-latent_hw[1] // 2))  # lower level, rounded up when odd
    assert half in {hw for (hw, _), _ in gated} <= {latent_hw, half}
    gated_mass = identifier_mass(gated, masks, IDENTIFIER_ROWS, chunk_kind=0)
    assert len(gated_mass) == layers and max(gated_mass) == 0.0
    assert min(identifier_mass(plain, masks, IDENTIFIER_ROWS, chunk_kind=0)) > 0.0
    # The negative prompt is untouched: the uncond chunk attends exactly as without the gate.
    assert identifier_mass(gated, masks, IDENTIFIER_ROWS, chunk_kind=1) == \
        identifier_mass(plain, masks, IDENTIFIER_ROWS, chunk_kind=1)


def test_background_pixels_still_attend_to_the_identifier(monkeypatch):
    tm = tiny_sd15()
    masks = two_masks((16, 16))
    records = Spy().run(monkeypatch, tm, gate(tm.model, masks), (16, 16), batch=2)
    for (hw, chunks), probs in records:
        background = ~product_queries(masks, hw)
        cond = chunks.index(0)
        p = probs[cond * 2:(cond + 1) * 2][..., list(IDENTIFIER_ROWS)].amax(dim=(1, 3))
        assert float(p[background].min()) > 0.0
        # and the gated rows renormalise: every query's probabilities still sum to 1
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


def test_cond_chunk_gated_without_cfg_batching(monkeypatch):
    """cfg=1 skips the uncond pass: the batch is a single cond chunk."""
    tm = tiny_sd15()
    masks = two_masks((16, 16))
    records = Spy().run(monkeypatch, tm, gate(tm.model, masks), (16, 16), batch=2, cfg=1.0)
    assert all(chunks == (0,) for (_, chunks), _ in records)
    assert max(identifier_mass(records, masks, IDENTIFIER_ROWS, chunk_kind=0)) == 0.0


def test_strength_weakens_the_gate_smoothly(monkeypatch):
    tm = tiny_sd15()
    masks = two_masks((16, 16))
    plain = identifier_mass(Spy().run(monkeypatch, tm, tm.model, (16, 16), batch=2), masks, IDENTIFIER_ROWS, 0)
    half = identifier_mass(Spy().run(monkeypatch, tm, gate(tm.model, masks, strength=0.5), (16, 16), batch=2),
                           masks, IDENTIFIER_ROWS, 0)
    assert all(0.0 < h < p for h, p in zip(half, plain))


def test_grow_protects_a_wider_ring(monkeypatch):
    tm = tiny_sd15()
    masks = two_masks((16, 16))
    records = Spy().run(monkeypatch, tm, gate(tm.model, masks, grow=2), (16, 16), batch=2)
    grown = F.max_pool2d(F.adaptive_max_pool2d(masks[:, None], (16, 16)), 5, 1, 2)[:, 0]
    for (hw, chunks), probs in records:
        cond = chunks.index(0)
        p = probs[cond * 2:(cond + 1) * 2][..., list(IDENTIFIER_ROWS)].amax(dim=(1, 3))
        ring = product_queries(grown, hw)
        assert float(p[ring].max()) == 0.0


def test_two_gates_stack(monkeypatch):
    """Two products, two categories: each identifier is kept off its own product only."""
    tm = tiny_sd15()
    masks = two_masks((16, 16))
    rows_a, rows_b = (3, 4), (7, 8)
    model = gate(gate(tm.model, masks[:1].expand(2, -1, -1), rows=rows_a), masks[1:].expand(2, -1, -1), rows=rows_b)
    assert host.scene_of(model).gates.__len__() == 2
    records = Spy().run(monkeypatch, tm, model, (16, 16), batch=2)
    a = masks[:1].expand(2, -1, -1)
    b = masks[1:].expand(2, -1, -1)
    assert max(identifier_mass(records, a, rows_a, 0)) == 0.0
    assert max(identifier_mass(records, b, rows_b, 0)) == 0.0
    assert min(identifier_mass(records, a, rows_b, 0)) > 0.0  # A's product still sees category B
    assert min(identifier_mass(records, b, rows_a, 0)) > 0.0


def layer_call(model, key, q, k, v, chunks=(0,), hw=(8, 8)):
    replace = model.model_options["transformer_options"]["patches_replace"]["attn2"][key]
    extra = dict(model.model_options["transformer_options"])
    extra.update(block=key[:2], block_index=key[2], n_heads=2, dim_head=q.shape[-1] // 2,
                 activations_shape=[q.shape[0], q.shape[-1], *hw], original_shape=[q.shape[0], 4, *hw],
                 cond_or_uncond=list(chunks))
    return replace(q, k, v, extra)


def test_composes_with_a_replace_already_on_the_layers():
    """An IPAdapter-like replace that adds its own output keeps its effect, and the gate holds."""
    tm = tiny_sd15()
    keys = host.cross_attention_keys(tm.model)
    foreign_calls = []

    def foreign(q, k, v, extra_options):
        foreign_calls.append(extra_options["block"])
        return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"]) + 0.25

    with_foreign = tm.model.clone()
    for key in keys:
        with_foreign.set_model_attn2_replace(foreign, *key)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:40, 8:32] = 1
    both = gate(with_foreign, mask)
    ours = gate(tm.model, mask)

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 64, 16), torch.randn(1, 77, 16), torch.randn(1, 77, 16)
    v2 = v.clone()
    v2[:, list(IDENTIFIER_ROWS)] += 5.0  # a different identifier
    product = product_queries(mask, (8, 8))[0]
    for key in keys:
        out_both = layer_call(both, key, q, k, v)
        out_ours = layer_call(ours, key, q, k, v)
        assert torch.allclose(out_both - out_ours, torch.full_like(out_ours, 0.25), atol=1e-5)  # foreign effect
        changed = (layer_call(both, key, q, k, v2) - out_both).abs().amax(-1)[0]
        assert float(changed[product].max()) < 1e-5  # the gate: product rows ignore the identifier
        assert float(changed[~product].min()) > 1e-3
    assert len(foreign_calls) == 2 * len(keys)  # out_both and the perturbed call


def test_replace_installed_after_the_gate_is_refused_before_sampling(monkeypatch):
    tm = tiny_sd15()
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:64, 32:64] = 1
    model = gate(tm.model, mask).clone()
    key = host.cross_attention_keys(model)[0]
    model.set_model_attn2_replace(lambda q, k, v, extra: comfy_attention.optimized_attention(q, k, v, extra["n_heads"]), *key)
    spy = Spy()
    monkeypatch.setattr(comfy_attention, "optimized_attention", spy.kernel)
    with pytest.raises(ProductSceneError, match="after Masked Category Attention"):
        sample(tm, encode(tm, "a"), encode(tm, "b"), latent_hw=(16, 16), model=model)
    assert spy.calls == []


def test_bad_masks_are_refused_before_any_work(monkeypatch):
    tm = tiny_sd15()
    with pytest.raises(ProductSceneError, match="mask"):
        gate(tm.model, torch.zeros(1, 64, 64))  # empty
    with pytest.raises(ProductSceneError, match="mask"):
        gate(tm.model, torch.ones(1, 64, 64))  # covers everything
    with pytest.raises(ProductSceneError, match="strength"):
        gate(tm.model, two_masks((8, 8)), strength=1.5)

    spy = Spy()
    monkeypatch.setattr(comfy_attention, "optimized_attention", spy.kernel)
    monkeypatch.setattr(comfy_attention, "optimized_attention_masked", spy.kernel)
    three = torch.cat([two_masks((16, 16)), two_masks((16, 16))[:1]])
    with pytest.raises(ProductSceneError, match="3 product masks for a batch of 2"):
        sample(tm, encode(tm, "a"), encode(tm, "b"), latent_hw=(16, 16), model=gate(tm.model, three), batch=2)
    with pytest.raises(ProductSceneError, match="product mask is 128x128"):
        sample(tm, encode(tm, "a"), encode(tm, "b"), latent_hw=(16, 24), model=gate(tm.model, two_masks((16, 16))[:1]))
    assert spy.calls == []


def test_patching_leaves_the_input_model_untouched():
    tm = tiny_sd15()
    before = dict(tm.model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {}))
    patched = gate(tm.model, two_masks((8, 8)))
    assert patched is not tm.model
    assert host.scene_of(tm.model) is None
    assert tm.model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {}) == before
    assert len(patched.model_options["transformer_options"]["patches_replace"]["attn2"]) == \
        len(host.cross_attention_keys(tm.model))
