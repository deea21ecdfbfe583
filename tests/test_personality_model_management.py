"""The brand adapter's weights are under ComfyUI's model management, as comfy_extras/
nodes_model_patch.py hands a patch's weights to a ModelPatcher: Apply Personality's patch lists the
adapter's patcher in ``models()``, so the sampler's own loading (``load_models_gpu`` through
``model_patches_models``) loads its modules beside the UNet, counts its bytes in the memory it asks
for, and offloads it as it offloads models. On the CPU a load moves nothing, so the test watches
ComfyUI's accounting: what it asks for, what it holds loaded, what it lets go."""
from __future__ import annotations

import comfy.model_management as mm

from devkit.models import encode, sample, tiny
from tests.test_personality import adapter_file, apply_node, encode_reference, personality, two_masks


def _bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def test_the_sampler_loads_counts_and_offloads_the_adapter_with_the_model(monkeypatch):
    tm = tiny("sd15")
    name = adapter_file("sd15", tm, seed=11)
    personality._ADAPTERS.clear()
    reference = encode_reference(name, 1)
    adapter = reference.adapter
    model = apply_node.execute(tm.model, reference, two_masks((8, 8))[:1], 1.0, 0.0, 1.0).result[0]
    adapter_bytes = _bytes(adapter.to_k, adapter.to_v)
    assert adapter_bytes > 0

    # what ComfyUI collects from the patched model's patches: one patcher holding the adapter's own modules
    patchers = list(dict.fromkeys(model.model_patches_models()))
    assert len(patchers) == 1
    patcher = patchers[0]
    assert patcher.model.to_k is adapter.to_k and patcher.model.to_v is adapter.to_v
    assert patcher.model_size() == adapter_bytes

    asked = []
    required = mm.LoadedModel.model_memory_required
    monkeypatch.setattr(mm.LoadedModel, "model_memory_required",
                        lambda self, device: asked.append((self.model, required(self, device))) or asked[-1][1])
    mm.unload_all_models()
    cond, negative = encode(tm, "a product photo"), encode(tm, "blurry")
    sample(tm, cond, negative, (8, 8), model=model)

    # the sampler's own loading loaded the adapter beside the UNet and asked for its bytes too
    sizes = {id(m): size for m, size in asked}
    assert sizes.get(id(patcher)) == adapter_bytes, [(type(m.model).__name__, s) for m, s in asked]
    unet = next(m for m, _ in asked if m.model is model.model)
    assert sum(sizes.values()) == unet.model_size() + adapter_bytes
    assert any(m is patcher for m in mm.loaded_models())
    assert patcher.loaded_size() == adapter_bytes

    # a second run finds it loaded: nothing more to ask for it
    asked.clear()
    sample(tm, cond, negative, (8, 8), model=model)
    assert dict((id(m), s) for m, s in asked).get(id(patcher)) == 0

    # offloading every model lets the adapter go with the UNet
    mm.unload_all_models()
    assert not any(m is patcher or m.model is model.model for m in mm.loaded_models())
    assert patcher.loaded_size() == 0
