"""The Train Category Library node at host level (ComfyUI's real classes, tiny models)."""
from __future__ import annotations

import productscene
import productscene.errors
import productscene.masks
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.progress_hook import cancel_when


CATS = ("perfume", "tea", "tools")


@pytest.fixture(autouse=True)
def data_anywhere_in_tmp(pack, tmp_path, monkeypatch):
    """These tests keep their data sets in tmp_path: the server owner's setting allows it."""
    monkeypatch.setenv(pack.nodes.trainer_files.DATA_ROOTS_ENV, str(tmp_path))


def write_data(root, per_category=2, size=64, seed=0):
    g = np.random.default_rng(seed)
    for i, c in enumerate(CATS):
        (root / c).mkdir(parents=True)
        for k in range(per_category):
            a = np.zeros((size, size, 4), np.uint8)
            a[..., :3] = g.integers(0, 255, 3)
            x0, y0 = g.integers(4, size - 28, 2)
            a[y0:y0 + 20, x0:x0 + 20, :3] = 250
            a[y0:y0 + 20, x0:x0 + 20, 3] = 255
            Image.fromarray(a, "RGBA").save(root / c / f"{k}.png")
    return root


def _kwargs(tm, data, **over):
    kw = dict(model=tm.model, clip=tm.clip, vae=tm.vae, data_folder=str(data), layout="folder", steps=3,
              lr_tokens=1e-2, lr_lora=1e-3, lora_rank=2, resolution=64, batch_size=2,
              template="a product photo on a {category} background", output_name="node_lib",
              checkpoint_every=0, resume=False, seed=0)
    kw.update(over)
    return kw


def test_node_schema(pack):
    schema = pack.nodes.train_categories.ProductSceneTrainCategoryLibrary.define_schema()
    assert schema.node_id == "ProductSceneTrainCategoryLibrary" and schema.category == "ProductScene/training"
    assert all(getattr(i, "tooltip", None) for i in schema.inputs)
    assert pack.nodes.train_categories.ProductSceneTrainCategoryLibrary in pack.nodes.train_categories.NODES


def test_node_trains_and_writes_a_library_the_loader_accepts(pack, sd15, tmp_path):
    import comfy.lora
    node = pack.nodes.train_categories.ProductSceneTrainCategoryLibrary
    data = write_data(tmp_path / "data")
    with torch.inference_mode():  # as ComfyUI executes nodes
        out = node.execute(**_kwargs(sd15, data, output_name="node_lib"))
    name, graph = out.args
    assert name == "node_lib.safetensors"
    assert graph.shape[0] == 1 and graph.shape[-1] == 3
    lib_mod = productscene.library
    path = os.path.join(pack.nodes.train_categories.library_folder(), name)
    lib = lib_mod.TokenLibrary.open(path)
    assert lib.names == list(CATS) and lib.family == "sd15" and lib.has_lora
    assert lib.training["steps"] == 3 and lib.training["categories"] == 3
    assert lib.init_words == {"perfume": "perfume", "tea": "tea", "tools": "tools"}
    # the Category Tokens loader's family check passes and encodes with the trained identifier
    tokens, ct = pack.nodes.category_tokens.encode_category_prompt(
        sd15.clip, name, "tea", "a product photo on a {category} background")
    assert ct.family == "sd15" and len(ct.rows) == 1
    assert torch.equal(ct.vectors["clip_l"], lib.vectors("tea")["clip_l"])
    # the shared LoRA loads with ComfyUI's LoRA loader key mapping
    key_map = comfy.lora.model_lora_keys_unet(sd15.model.model, {})
    patches = comfy.lora.load_lora(lib.lora_state_dict(), key_map, log_missing=False)
    assert len(patches) == len(lib.lora_keys) // 3 > 0


def test_bad_data_set_one_error_nothing_written(pack, sd15, tmp_path):
    node = pack.nodes.train_categories.ProductSceneTrainCategoryLibrary
    data = write_data(tmp_path / "data")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data / "tea" / "plain.png")
    (data / "tools" / "broken.png").write_bytes(b"garbage")
    Image.fromarray(np.zeros((64, 64, 4), np.uint8), "RGBA").save(data / "perfume" / "empty.png")
    err_type = productscene.errors.ProductSceneError
    with torch.inference_mode(), pytest.raises(err_type) as err:
        node.execute(**_kwargs(sd15, data, output_name="bad_lib"))
    msg = str(err.value)
    assert "3 problem(s)" in msg and "plain.png" in msg and "broken.png" in msg and "empty.png" in msg
    tc = pack.nodes.train_categories
    assert not os.path.exists(os.path.join(tc.library_folder(), "bad_lib.safetensors"))
    assert not os.path.exists(os.path.join(pack.nodes.trainer_files.work_folder("checkpoints"), "bad_lib.checkpoint.safetensors"))


def test_cancel_leaves_a_loadable_checkpoint_and_resume_finishes(pack, sd15, tmp_path):
    import comfy.model_management as mm
    node = pack.nodes.train_categories.ProductSceneTrainCategoryLibrary
    tc = pack.nodes.train_categories
    engine = productscene.train.engine
    data = write_data(tmp_path / "data")

    # training step 2 of 5 (the latent cache reports 6 images first)
    with cancel_when(lambda value, total: value == 2 and total == 5), torch.inference_mode(), \
            pytest.raises(mm.InterruptProcessingException):
        node.execute(**_kwargs(sd15, data, steps=5, output_name="cancel_lib"))
    state = os.path.join(pack.nodes.trainer_files.work_folder("checkpoints"), "cancel_lib.checkpoint.safetensors")
    info = engine.read_checkpoint_info(state)
    assert info["step"] == 2 and len(info["history"]) == 2
    assert not os.path.exists(os.path.join(tc.library_folder(), "cancel_lib.safetensors"))

    with torch.inference_mode():
        out = node.execute(**_kwargs(sd15, data, steps=5, output_name="cancel_lib", resume=True))
    lib = productscene.library.TokenLibrary.open(os.path.join(tc.library_folder(), out.args[0]))
    assert lib.training["steps"] == 5
    assert engine.read_checkpoint_info(state)["step"] == 5


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_identifier_gets_no_gradient_through_product_positions_in_any_layer(pack, family, request):
    """The trainer's gate is the inference one: with every cross-attention layer's input held fixed
    (detached), the gradient of the layer's product-position output with respect to the identifier
    vectors is exactly zero in every layer, and not zero on background positions."""
    from productscene.attention import ProductRegion
    from productscene.train import engine
    from productscene.train.recipes import categories as cats
    tm = request.getfixturevalue(family)
    host = pack.nodes.training_host.ComfyTrainingHost(tm.model, tm.clip)
    outputs = []
    host.model.set_model_attn2_patch(lambda n, context, value, extra: (n.detach(), context, value))
    host.model.set_model_attn2_output_patch(lambda n, extra: outputs.append((extra["activations_shape"], n)) or n)
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 9, 13)
    masks[0, 2:5, 3:7] = 1
    masks[1, 5:8, 8:12] = 1
    source = cats.MemorySource(torch.randn(2, 4, 9, 13, generator=g), masks, ["perfume", "tea"])
    config = cats.CategoryConfig(template="a product photo on a {category} background", batch_size=2,
                                 resolution=64, steps=1)
    with engine.training_mode():
        recipe = cats.CategoryRecipe(host, source, ["perfume", "tea"], config, seed=0)
        with host.session(lora=recipe.lora):
            batch = recipe.batch(0, torch.Generator().manual_seed(3))
            recipe._forward(batch, capture_attention=False)
            identifier = recipe.parameter_groups()["tokens"]
            region = ProductRegion(batch["masks"])
            for shape, out in outputs:
                product = region.queries(tuple(shape[-2:]), (9, 13), out.device)  # [2, Nq]
                on_product = torch.autograd.grad(out[product].sum(), identifier, retain_graph=True, allow_unused=True)
                on_background = torch.autograd.grad(out[~product].sum(), identifier, retain_graph=True, allow_unused=True)
                assert all(gr is None or float(gr.abs().max()) == 0.0 for gr in on_product)
                assert max(float(gr.abs().max()) for gr in on_background if gr is not None) > 0.0
    assert len(outputs) == len(pack.nodes.host.cross_attention_keys(tm.model))


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_time_embedding_gets_no_gradient_from_the_identifier(pack, family, request):
    """The whole UNet forward of a training step, nothing held fixed: what modulates every ResBlock
    at every position (the time embedding, plus SDXL's ``y`` from the pooled text) has exactly zero
    gradient with respect to the identifier vectors. On SDXL the identifier prompt's own pooled
    output (what the trainer used before) gives it a gradient, so the check can fail; on SD1.5 and
    SD2.x there is no text in the time embedding at all."""
    from productscene.prompt import PLACEHOLDER, Prompt
    from productscene.train import engine
    from productscene.train.recipes import categories as cats
    tm = request.getfixturevalue(family)
    host = pack.nodes.training_host.ComfyTrainingHost(tm.model, tm.clip)
    embeddings = []
    hooks = [m.emb_layers.register_forward_pre_hook(lambda module, args: embeddings.append(args[0]))
             for m in host.unet.modules() if hasattr(m, "emb_layers")]
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 8, 8)
    masks[0, 2:5, 3:7] = 1
    masks[1, 4:7, 1:4] = 1
    source = cats.MemorySource(torch.randn(2, 4, 8, 8, generator=g), masks, ["perfume", "tea"])
    config = cats.CategoryConfig(template="a product photo on a {category} background", batch_size=2,
                                 resolution=64, steps=1)

    def time_embedding_gradient(identifier) -> float:
        assert embeddings
        total = sum(e.float().sum() for e in embeddings)
        embeddings.clear()
        if not total.requires_grad:  # no path from any trainable parameter at all
            return 0.0
        grads = torch.autograd.grad(total, identifier, allow_unused=True)
        return max((float(gr.abs().max()) for gr in grads if gr is not None), default=0.0)

    try:
        with engine.training_mode():
            recipe = cats.CategoryRecipe(host, source, ["perfume", "tea"], config, seed=0)
            identifier = recipe.parameter_groups()["tokens"]
            with host.session(lora=recipe.lora):
                batch = recipe.batch(0, torch.Generator().manual_seed(3))
                pred, *_ = recipe._forward(batch, capture_attention=False)
                assert time_embedding_gradient(identifier) == 0.0
                # the image still learns the category through the gated context
                assert max(float(gr.abs().max()) for gr in torch.autograd.grad(pred.sum(), identifier)) > 0.0
                # counter-check: the identifier prompt's own pooled output, as before
                spliced = host.encode([Prompt(config.template, {PLACEHOLDER: v})
                                       for v in recipe.vectors_for(batch["categories"])])
                sigma = host.sigmas(batch["timesteps"].to(host.device))
                host.predict_noise(host.add_noise(batch["latents"], batch["noise"], sigma), sigma, spliced)
                if family == "sdxl":
                    assert time_embedding_gradient(identifier) > 0.0
                else:
                    assert time_embedding_gradient(identifier) == 0.0
    finally:
        for hook in hooks:
            hook.remove()
