"""ComfyUI's own plumbing, used the way its core nodes use it (issue 7): another pack's
``optimized_attention_override`` sees the gate's attention calls; ComfyUI's device hand-off moves
every part of the attention object; a training session asks ComfyUI's loader for the memory a
training step needs (so other models are offloaded first) and leaves the shared model's weights as
it found them; the session does its one-time work once."""
from __future__ import annotations

from importlib import import_module

import torch

import comfy.model_management as mm

from productscene.personality import PersonalityAdapter
from devkit.models import encode, sample
from tests.test_category_attention import category_prompt, gate_node, host, libraries, two_masks  # noqa: F401

LATENT = (8, 8)


def gated(sd15, libraries, masks=None):  # noqa: F811
    cond, tokens = category_prompt(sd15, libraries["sd15"], "marble")
    masks = masks if masks is not None else two_masks(LATENT)[:1]
    return gate_node.execute(sd15.model, masks, tokens, 1.0, 0, 1.0).result[0], cond


def test_another_packs_attention_override_sees_the_gates_calls(sd15, libraries):  # noqa: F811
    model, cond = gated(sd15, libraries)
    negative = encode(sd15, "blurry")
    plain = sample(sd15, cond, negative, LATENT, model=model, steps=1)
    calls = []

    def override(func, *args, **kwargs):
        q, k = args[0], args[1]
        if k.shape[1] != q.shape[1]:  # a cross-attention call (keys are the prompt's rows)
            calls.append(tuple(k.shape))
        return func(*args, **kwargs)

    seen = model.clone()
    seen.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    out = sample(sd15, cond, negative, LATENT, model=seen, steps=1)
    layers = len(host.cross_attention_keys(model))
    # every layer: attention over the full context and over the category-free one, both seen
    assert len(calls) >= 2 * layers, (len(calls), layers)
    assert torch.equal(out, plain)  # an override that only watches changes nothing


def test_comfyuis_device_hand_off_moves_every_part_of_the_attention_object(sd15, libraries):  # noqa: F811
    model, _ = gated(sd15, libraries)
    layers = host.cross_attention_layers(sd15.model)
    adapter = PersonalityAdapter.for_layers("sd15", 64, layers, tokens=4)
    personality = host.__name__.rsplit(".", 1)[0] + ".personality"
    ref = import_module(personality).PersonalityReference(adapter, adapter.tokens(torch.randn(1, 17, 64)).detach(), "t")
    both = import_module(personality).ProductSceneApplyPersonality.execute(
        model, ref, two_masks(LATENT)[:1], 1.0, 0.0, 1.0).result[0]
    scene = host.scene_of(both)
    assert scene.gates and scene.injections
    both.model_patches_to(torch.device("meta"))  # what ComfyUI calls when it loads the model on a device
    gate, injection = scene.gates[0], scene.injections[0]
    assert gate.free_context.device.type == "meta" and gate.region.mask.device.type == "meta"
    assert injection.tokens.device.type == "meta" and injection.region.mask.device.type == "meta"
    # the adapter's own weights are not this hand-off's to move: they belong to the ModelPatcher the
    # scene lists in models(), which ComfyUI loads and offloads with the UNet
    # (tests/test_personality_model_management.py)
    (patcher,) = scene.models()
    held = {id(p) for p in patcher.model.parameters()}
    assert all(id(k.weight) in held and id(v.weight) in held for k, v in injection.projections.values())
    for m in (model, both):  # the parts now live on meta: nothing for ComfyUI to move back later
        m.model_options["transformer_options"]["patches_replace"] = {}


def test_a_training_session_asks_for_training_memory_and_leaves_the_model_as_it_found_it(pack, monkeypatch):
    from devkit.models import build

    th = import_module(pack.__name__ + ".nodes.training_host")
    fresh = build("sd15")  # its own model: its weights become inference tensors here
    asked = []
    real = mm.load_models_gpu

    def spy(models, memory_required=0, *args, **kwargs):
        asked.append(memory_required)
        return real(models, memory_required, *args, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", spy)
    host_ = th.ComfyTrainingHost(fresh.model, fresh.clip, fresh.vae)
    with torch.inference_mode():  # what a checkpoint loaded inside a ComfyUI run holds
        for module in host_.base.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    before = {k: (p, p.requires_grad) for k, p in host_.base.named_parameters()}
    assert all(p.is_inference() for p, _ in before.values())
    shape = (2, 4, 8, 8)
    with host_.session(latent_shape=shape):
        inside = dict(host_.base.named_parameters())
        assert not any(p.is_inference() for p in inside.values())  # trainable copies while inside
        assert not any(p.requires_grad for p in inside.values())  # the base stays frozen
    assert asked and asked[0] == host_.training_memory(shape) > 0
    assert asked[0] > host_.base.memory_required(list(shape))  # more than inference needs: saved activations
    after = dict(host_.base.named_parameters())
    assert all(p.is_inference() for p in after.values())  # as ComfyUI left them ...
    assert all(torch.equal(after[k], before[k][0]) and after[k].requires_grad == before[k][1] for k in before)
