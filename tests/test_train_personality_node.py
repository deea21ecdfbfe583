"""The Train Personality Adapter node at host level (ComfyUI's real classes: tiny SD1.5, CLIP vision
built by ComfyUI's own class): it writes an adapter that Personality Reference and Apply
Personality accept, cancel keeps a loadable training state, resume finishes it, and an existing
adapter is never replaced without being asked."""
from __future__ import annotations

import os

import pytest
import torch

import productscene
from productscene.errors import ProductSceneError
from productscene.personality import PersonalityAdapter
from productscene.train.recipes.personality import PersonalityConfig
from devkit.clip_vision import build_clip_vision
from devkit.models import encode, sample
from tests.support.progress_hook import cancel_when
from tests.test_train_node import write_data


@pytest.fixture(autouse=True)
def data_anywhere_in_tmp(pack, tmp_path, monkeypatch):
    monkeypatch.setenv(pack.nodes.trainer_files.DATA_ROOTS_ENV, str(tmp_path))


def _kwargs(tm, data, **over):
    kw = dict(model=tm.model, clip=tm.clip, vae=tm.vae, clip_vision=build_clip_vision(64), data_folder=str(data),
              layout="folder", steps=3, lr=1e-3, tokens=4, resolution=64, batch_size=2, prompt="a product photo",
              output_name="node_personality", checkpoint_every=0, resume=False, seed=0)
    kw.update(over)
    return kw


def test_node_trains_an_adapter_the_reference_nodes_accept(pack, sd15, tmp_path):
    node = pack.nodes.train_personality.ProductSceneTrainPersonalityAdapter
    assert all(getattr(i, "tooltip", None) for i in node.define_schema().inputs)
    data = write_data(tmp_path / "data")
    with torch.inference_mode():  # as ComfyUI executes nodes
        name, graph = node.execute(**_kwargs(sd15, data)).args
    assert name == "node_personality.safetensors" and graph.shape[0] == 1 and graph.shape[-1] == 3
    path = os.path.join(pack.nodes.train_personality.adapter_folder(), name)
    adapter = PersonalityAdapter.load(path)
    assert adapter.family == "sd15" and adapter.vision_width == 64 and adapter.n_tokens == 4
    assert adapter.training_summary["steps"] == 3 and adapter.training_summary["recipe"] == "personality"
    # trained: the adapter's per-layer projections moved away from the text to_k/to_v they started from
    layers = pack.nodes.host.cross_attention_layers(sd15.model)
    start = PersonalityAdapter.for_layers("sd15", 64, layers, tokens=4, seed=0)
    assert not torch.equal(start.tokens(torch.ones(1, 17, 64)), adapter.tokens(torch.ones(1, 17, 64)))
    # the reference nodes take it, and it changes the background
    personality = pack.nodes.personality
    image = torch.rand(1, 64, 64, 3)
    with torch.inference_mode():
        ref = personality.ProductScenePersonalityReference.execute(build_clip_vision(64), image, name, "average").result[0]
        mask = torch.zeros(1, 64, 64)
        mask[:, 16:40, 16:40] = 1.0
        model = personality.ProductSceneApplyPersonality.execute(sd15.model, ref, mask, 1.0, 0.0, 1.0).result[0]
        cond, negative = encode(sd15, "a product photo"), encode(sd15, "blurry")
        assert not torch.equal(sample(sd15, cond, negative, model=model), sample(sd15, cond, negative))
    # never replaced without being asked
    with torch.inference_mode(), pytest.raises(ProductSceneError, match="^output_name: .* already exists"):
        node.execute(**_kwargs(sd15, data))


def test_cancel_leaves_a_loadable_checkpoint_and_resume_finishes(pack, sd15, tmp_path):
    import comfy.model_management as mm
    node = pack.nodes.train_personality.ProductSceneTrainPersonalityAdapter
    tp = pack.nodes.train_personality
    engine = productscene.train.engine
    data = write_data(tmp_path / "data")

    # the first training report (current ComfyUI throttles the others)
    with cancel_when(lambda value, total: total == 5 and 1 <= value < 5), torch.inference_mode(), \
            pytest.raises(mm.InterruptProcessingException):
        node.execute(**_kwargs(sd15, data, steps=5, output_name="cancel_personality"))
    state = os.path.join(pack.nodes.trainer_files.work_folder("checkpoints"),
                         "cancel_personality.personality-checkpoint.safetensors")
    info = engine.read_checkpoint_info(state)
    assert 1 <= info["step"] < 5 and len(info["history"]) == info["step"]
    assert not os.path.exists(os.path.join(tp.adapter_folder(), "cancel_personality.safetensors"))
    with torch.inference_mode():
        name = node.execute(**_kwargs(sd15, data, steps=5, output_name="cancel_personality", resume=True)).args[0]
    assert PersonalityAdapter.load(os.path.join(tp.adapter_folder(), name)).training_summary["steps"] == 5


def _write_start(pack, layers, name, **size):
    """An IP-Adapter file (released key names, IP-Adapter's training initialisation) for ``layers``
    in models/ipadapter; returns its path."""
    import folder_paths
    from devkit import ipadapter

    folder = folder_paths.get_folder_paths(pack.nodes.paths.IPADAPTER_FOLDER)[0]
    path = ipadapter.write_training_start(os.path.join(folder, name), layers, 64, **size)
    folder_paths.filename_list_cache.clear()
    return str(path)


def test_node_fine_tunes_an_ipadapter_file_from_its_weights(pack, sd15, tmp_path):
    """from_ipadapter: the run starts from the file's weights (after one AdamW step every tensor is
    within one learning rate of the file's; a new adapter's start would be far off) and the result
    keeps the IP-Adapter layout and its token count; the combo offers the file and "none". A file
    that is no IP-Adapter, one for another family and one of another layout are refused before any
    work (nothing written)."""
    from safetensors.torch import load_file
    from productscene.ipadapter import IPAdapterPersonality, load_adapter

    node = pack.nodes.train_personality.ProductSceneTrainPersonalityAdapter
    tp = pack.nodes.train_personality
    layers = pack.nodes.host.cross_attention_layers(sd15.model)
    start = _write_start(pack, layers, "node_start_ipa.safetensors", tokens=8, dim=128, depth=2, heads=2)
    combo = next(i for i in node.define_schema().inputs if i.id == "from_ipadapter")
    assert combo.options[0] == "none" and "node_start_ipa.safetensors" in combo.options and combo.tooltip
    data = write_data(tmp_path / "data")
    lr = 1e-3
    with torch.inference_mode():
        name = node.execute(**_kwargs(sd15, data, steps=1, lr=lr, output_name="node_from_ipa",
                                      from_ipadapter="node_start_ipa.safetensors")).args[0]
    out = os.path.join(tp.adapter_folder(), name)
    tuned = load_adapter(out)
    assert isinstance(tuned, IPAdapterPersonality) and tuned.kind == "plus" and tuned.n_tokens == 8  # not tokens=4
    assert tuned.training_summary["steps"] == 1
    before = {k: v.float() for k, v in load_file(start).items()}
    after = load_file(out)
    assert set(after) == set(before)  # still an IP-Adapter file
    moved = {k: float((after[k] - before[k]).abs().max()) for k in before}
    assert max(moved.values()) <= 1.1 * lr, max(moved.items(), key=lambda kv: kv[1])
    assert max(moved.values()) > 0.1 * lr  # and it trained
    # its resampler at its own, lower rate (the layers' pairs at lr)
    rate = lr * PersonalityConfig().projection_lr_scale
    resampler = {k: v for k, v in moved.items() if k.startswith("image_proj.")}
    assert 0.1 * rate < max(resampler.values()) <= 1.1 * rate, max(resampler.items(), key=lambda kv: kv[1])
    # a fine-tuned file is offered as a start too
    assert name in tp.start_files()

    class Layer:  # an SDXL-wide layer: 2048-wide context
        to_k = to_v = torch.nn.Linear(2048, 640, bias=False)

    _write_start(pack, {("input", 4, 0): Layer()}, "node_sdxl_ipa.safetensors", tokens=4, dim=64, depth=1, heads=1)
    other_layout = dict(list(layers.items())[:-1])
    _write_start(pack, other_layout, "node_layout_ipa.safetensors", tokens=4, dim=64, depth=1, heads=1)
    PersonalityAdapter.for_layers("sd15", 64, layers, tokens=4).save(
        os.path.join(tp.adapter_folder(), "node_not_ipa.safetensors"))
    for start_name, said in (("node_not_ipa.safetensors", "node_not_ipa.safetensors is not an IP-Adapter file"),
                             ("node_sdxl_ipa.safetensors", "is an IP-Adapter for sdxl, but the model is sd15"),
                             ("node_layout_ipa.safetensors",
                              f"holds {len(layers) - 1} to_k_ip/to_v_ip pairs, but the model has {len(layers)}"),
                             ("nope.safetensors", "in neither models/personality_adapters nor models/ipadapter")):
        with torch.inference_mode(), pytest.raises(ProductSceneError, match="^from_ipadapter: .*" + said):
            node.execute(**_kwargs(sd15, data, steps=1, output_name="node_refused", from_ipadapter=start_name))
        assert not os.path.exists(os.path.join(tp.adapter_folder(), "node_refused.safetensors"))
