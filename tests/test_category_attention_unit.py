"""MaskedCategoryAttention's patching logic on the mocked model patcher (fast unit level)."""
from __future__ import annotations

import torch

from productscene.prompt import CategoryTokens

WRAPPERS = "outer_sample"


def tokens(rows=(4,)):
    return CategoryTokens(library_path="", category="test", family="sd15", rows=tuple(rows), context_rows=77,
                          vectors={}, free_context=torch.full((1, 77, 768), float(rows[0])))


def mask():
    m = torch.zeros(1, 64, 64)
    m[:, 10:30, 10:30] = 1
    return m


def apply(pack, model, rows=(4,)):
    node = pack.nodes.category_attention.MaskedCategoryAttention
    return node.execute(model, mask(), tokens(rows), 1.0, 0, 0.0).result[0]


def test_installs_one_trampoline_per_cross_attention_layer_on_a_clone(pack, mock_patcher):
    host = pack.nodes.host
    patched = apply(pack, mock_patcher)
    assert patched is not mock_patcher and patched in mock_patcher.clones
    assert sorted(patched.replaces) == sorted(mock_patcher.attn2_keys()) and len(patched.replaces) == 16
    assert all(isinstance(fn, host.Attn2Trampoline) and fn.previous is None for fn in patched.replaces.values())
    assert mock_patcher.replaces == {}  # the input model is untouched
    assert len(patched.get_wrappers(WRAPPERS, host.WRAPPER_KEY)) == 1


def test_a_second_gate_joins_the_same_object(pack, mock_patcher):
    host = pack.nodes.host
    once = apply(pack, mock_patcher, rows=(4,))
    twice = apply(pack, once, rows=(9,))
    assert [float(g.free_context[0, 0, 0]) for g in host.scene_of(twice).gates] == [4.0, 9.0]
    assert [float(g.free_context[0, 0, 0]) for g in host.scene_of(once).gates] == [4.0]
    assert len(twice.replaces) == 16
    # one trampoline per layer, each handing ComfyUI's device moves to the merged object
    assert all(isinstance(fn, host.Attn2Trampoline) and fn.previous is None and fn.scene is host.scene_of(twice)
               for fn in twice.replaces.values())
    assert all(fn.scene is host.scene_of(once) for fn in once.replaces.values())
    assert len(twice.get_wrappers(WRAPPERS, host.WRAPPER_KEY)) == 1
    assert len(twice.get_wrappers("apply_model", host.WRAPPER_KEY)) == 1


def test_a_foreign_replace_is_wrapped_not_overwritten(pack, mock_patcher):
    host = pack.nodes.host
    def foreign(q, k, v, extra_options):  # functions survive the deep copy a clone makes
        return q
    key = mock_patcher.attn2_keys()[3]
    mock_patcher.set_model_attn2_replace(foreign, *key)
    patched = apply(pack, mock_patcher)
    assert patched.replaces[key].previous is foreign
    assert all(fn.previous is None for k, fn in patched.replaces.items() if k != key)
