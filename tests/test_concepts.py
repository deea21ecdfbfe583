"""Break-A-Scene on the training engine (issue 13): phases (evidence 2), bad input (evidence 4),
files (token library, LoRA, textual inversion), on ComfyUI's real SD1.5/SD2/SDXL classes (tiny)."""
from __future__ import annotations

import json

import pytest
import torch

from productscene.errors import ProductSceneError
from productscene.files import load_tensors, read_header
from productscene.library import TokenLibrary
from productscene.train.recipes.concepts import (ConceptConfig, ConceptData, ConceptRecipe, MAX_CONCEPTS,
                                                 concept_names, prepare_scene, train_concepts)
from devkit.comfy_env import import_pack

pack = import_pack()
th = pack.nodes.training_host


def scene(size=128, n=2):
    """An image with ``n`` coloured squares on grey and their masks."""
    img = torch.full((1, size, size, 3), 0.5)
    masks = torch.zeros(n, size, size)
    boxes = [(8, 8, 56, 56), (64, 64, 120, 120), (8, 72, 56, 120), (72, 8, 120, 56)]
    colours = [(0.9, 0.1, 0.1), (0.1, 0.2, 0.9), (0.1, 0.8, 0.2), (0.9, 0.9, 0.1)]
    for i in range(n):
        y0, x0, y1, x1 = boxes[i]
        img[0, y0:y1, x0:x1] = torch.tensor(colours[i])
        masks[i, y0:y1, x0:x1] = 1.0
    return img, masks


def small(**kw):
    base = dict(resolution=0, phase1_steps=2, phase2_steps=2, lr_phase2=1e-3)
    base.update(kw)
    return ConceptConfig(**base)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    now = module.state_dict()
    return sorted(k for k, v in before.items() if not torch.equal(v, now[k]))


def test_lowest_cross_attention_level(sd15, sdxl):
    assert th.ComfyTrainingHost(sd15.model, sd15.clip, sd15.vae).attention_downsample == 2  # tiny: 2 levels
    assert th.ComfyTrainingHost(sdxl.model, sdxl.clip, sdxl.vae).attention_downsample == 2


def test_lowest_cross_attention_level_of_the_real_configs():
    """SD1.5/SD2.x: 16x16 at 512 px (latent / 4); SDXL: no 16x16 layer at 1024 px, its lowest are latent / 4
    = 32x32 (the middle block does not count)."""
    from types import SimpleNamespace
    from devkit.models import SD15_FULL_UNET
    sdxl = dict(channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10])
    for cfg, factor in ((SD15_FULL_UNET, 4), (sdxl, 4), (dict(channel_mult=[1, 2], num_res_blocks=1, transformer_depth=[0, 0]), None)):
        stub = SimpleNamespace(base=SimpleNamespace(model_config=SimpleNamespace(unet_config=cfg)))
        if factor is None:
            with pytest.raises(ProductSceneError, match="no cross-attention layer"):
                th.ComfyTrainingHost.attention_downsample.func(stub)
        else:
            assert th.ComfyTrainingHost.attention_downsample.func(stub) == factor


def test_phase1_changes_only_token_vectors_phase2_also_the_lora(sd15, tmp_path):
    host = th.ComfyTrainingHost(sd15.model, sd15.clip, sd15.vae)
    image, masks = scene()
    unet0, clip0 = snapshot(host.unet), snapshot(sd15.clip.cond_stage_model)
    seen = {}

    def progress(step, total, loss):
        rec = run_box["recipe"]
        seen[step] = ({e: v.detach().clone() for e, v in rec.vectors.items()},
                      {k: v.clone() for k, v in rec.lora.comfy_state_dict().items()},
                      changed(unet0, host.unet), changed(clip0, sd15.clip.cond_stage_model))

    run_box = {}
    orig_init = ConceptRecipe.__init__

    def capture_init(self, *a, **k):
        orig_init(self, *a, **k)
        run_box["recipe"] = self
        run_box["start"] = ({e: v.detach().clone() for e, v in self.vectors.items()},
                            {k2: v.clone() for k2, v in self.lora.comfy_state_dict().items()})

    ConceptRecipe.__init__ = capture_init
    try:
        run = train_concepts(host, image, masks, tmp_path / "c.safetensors", small(lr_phase1=1e-2),
                             lora_path=tmp_path / "c.lora.safetensors", embeddings_dir=tmp_path / "emb",
                             history_path=tmp_path / "h.json", seed=3, progress=progress)
    finally:
        ConceptRecipe.__init__ = orig_init
    vec0, lora0 = run_box["start"]
    # phase 1 (steps 1, 2): vectors move, LoRA and every model weight bit-identical
    for step in (1, 2):
        vecs, lora, unet_changed, clip_changed = seen[step]
        assert all(not torch.equal(vecs[e], vec0[e]) for e in vecs)
        assert all(torch.equal(lora[k], lora0[k]) for k in lora0)
        assert unet_changed == [] and clip_changed == []
    # phase 2: the LoRA moves too, the base weights still never change
    vecs, lora, unet_changed, clip_changed = seen[4]
    assert any(not torch.equal(lora[k], lora0[k]) for k in lora0 if k.endswith("lora_up.weight"))
    assert not torch.equal(vecs["clip_l"], seen[2][0]["clip_l"])
    assert unet_changed == [] and clip_changed == []
    # files: token library (Category Tokens' format), LoRA in ComfyUI keys, TI files, history
    lib = TokenLibrary.open(run.tokens)
    assert lib.names == ["<concept1>", "<concept2>"] and lib.family == "sd15" and lib.has_lora
    torch.testing.assert_close(lib.vectors("<concept2>")["clip_l"], vecs["clip_l"][1])
    assert lib.training["recipe"] == "concepts" and lib.init_words == {"<concept1>": "object", "<concept2>": "object"}
    meta, index = read_header(run.lora)
    assert meta["productscene.format"] == "lora"
    assert any(k.startswith("diffusion_model.") and k.endswith(".lora_up.weight") for k in index)
    ti = load_tensors(run.embeddings["<concept1>"])
    assert list(ti) == ["<concept1>"] and torch.equal(ti["<concept1>"], vecs["clip_l"][0])
    hist = json.loads((tmp_path / "h.json").read_text())
    assert hist["loss"] == run.result.history and len(hist["loss"]) == 4
    assert {"masked_loss", "attention_loss"} <= set(hist["logs"][0])


def test_full_unet_phase2_writes_a_diff_that_comfy_applies(sd15, tmp_path):
    import comfy.lora
    import comfy.sd
    tm = pack_tiny = sd15
    host = th.ComfyTrainingHost(pack_tiny.model, tm.clip, tm.vae)
    image, masks = scene()
    unet0 = snapshot(host.unet)
    run = train_concepts(host, image, masks, tmp_path / "f.safetensors", small(unet="full", phase1_steps=1, phase2_steps=1),
                         lora_path=tmp_path / "f.diff.safetensors", seed=1)
    assert changed(unet0, host.unet) == []  # the session put the shared model back
    diff = load_tensors(run.lora)
    assert diff and all(k.endswith(".diff") for k in diff)
    assert not TokenLibrary.open(run.tokens).has_lora
    model, _ = comfy.sd.load_lora_for_models(tm.model, None, diff, 1.0, 0)
    assert len(model.patches) == len(diff)


@pytest.mark.host  # its models come through request.getfixturevalue, which conftest cannot see
@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families_train_and_export(family, request, tmp_path):
    tm = request.getfixturevalue(family)
    host = th.ComfyTrainingHost(tm.model, tm.clip, tm.vae)
    image, masks = scene(n=1)
    run = train_concepts(host, image, masks, tmp_path / "t.safetensors", small(phase1_steps=1, phase2_steps=1, background=True),
                         embeddings_dir=tmp_path, seed=0)
    lib = TokenLibrary.open(run.tokens)
    assert lib.names == ["<concept1>", "<background>"] and lib.family == family
    ti = load_tensors(run.embeddings["<background>"])
    assert sorted(ti) == (["clip_g", "clip_l"] if family == "sdxl" else ["<background>"])


# ------------------------------------------------------------------ evidence 4: bad input
class NoWork:
    """A host that fails the test if any model work starts."""
    family, encoders, device = "sd15", {"clip_l": 768}, torch.device("cpu")

    def token_embeddings(self, word):
        if not any(c.isalnum() for c in word):
            raise ProductSceneError(f"word {word!r}: no tokens")
        return {"clip_l": torch.zeros(1, 768)}

    def encode_images(self, images):
        raise AssertionError("model work started")

    def session(self, *a, **k):
        raise AssertionError("model work started")


@pytest.mark.parametrize("case, match", [
    ("empty", "mask 2 of 2 is empty"),
    ("too_many", f"at most {MAX_CONCEPTS} concepts"),
    ("covers_nothing", "mask 1 covers nothing"),
    ("not_64", "multiples of 64"),
    ("init_words", "tokenizes to nothing"),
    ("names", "unique"),
    ("whole_image_background", "no background"),
])
def test_bad_input_is_a_clear_error_before_training(case, match, tmp_path):
    image, masks = scene()
    cfg = {}
    if case == "empty":
        masks[1] = 0
    elif case == "too_many":
        masks = masks[:1].repeat(MAX_CONCEPTS + 1, 1, 1)
    elif case == "covers_nothing":
        masks[0] = 0
        masks[0, 3, 3] = 1.0  # one pixel: nothing at the training resolution
    elif case == "not_64":
        image = torch.rand(1, 100, 150, 3)
        masks = torch.ones(2, 100, 150)
        cfg["resolution"] = 0
    elif case == "init_words":
        cfg["init_words"] = ("bottle", "...")
    elif case == "names":
        cfg["names"] = ("<a>", "a")
    elif case == "whole_image_background":
        masks[0] = 1.0
        cfg["background"] = True
    with pytest.raises(ProductSceneError, match=match):
        train_concepts(NoWork(), image, masks, tmp_path / "x.safetensors", small(**cfg))
    assert not list(tmp_path.iterdir())


def test_masks_of_any_size_overlapping_and_resolution():
    image, masks = scene(size=128)
    small_masks = torch.nn.functional.interpolate(masks[:, None], size=(32, 48), mode="nearest")[:, 0]
    small_masks[1] = torch.maximum(small_masks[1], small_masks[0])  # overlapping
    img, m = prepare_scene(image, small_masks, 256, background=True)
    assert img.shape == (1, 256, 256, 3) and m.shape == (3, 256, 256)
    assert float((m[0] * m[1]).sum()) > 0  # overlap kept
    torch.testing.assert_close(m[2], 1 - m[:2].amax(0))
    with pytest.raises(ProductSceneError, match="multiples of 64"):
        prepare_scene(torch.rand(1, 128, 100, 3), masks[:, :, :100], 512)  # 400 x 512
    img, _ = prepare_scene(torch.rand(1, 128, 96, 3), masks[:, :, :96], 512)  # any size -> 384 x 512
    assert img.shape == (1, 512, 384, 3)
    assert concept_names(2, ("bottle", "<cap>")) == ["<bottle>", "<cap>"]


def test_prior_preservation_adds_the_class_image_loss(sd15, tmp_path):
    host = th.ComfyTrainingHost(sd15.model, sd15.clip, sd15.vae)
    image, masks = scene()
    classes = torch.rand(2, 96, 96, 3, generator=torch.Generator().manual_seed(1))  # resized to the scene
    run = train_concepts(host, image, masks, tmp_path / "p.safetensors", small(prior_weight=0.5), class_images=classes, seed=2)
    for entry in run.result.logs:
        assert entry["prior_loss"] > 0
        assert entry["loss"] == pytest.approx(entry["masked_loss"] + entry["attention_loss"] + 0.5 * entry["prior_loss"], rel=1e-5)
    plain = train_concepts(host, image, masks, tmp_path / "q.safetensors", small(), seed=2)
    assert all("prior_loss" not in e for e in plain.result.logs)


def test_phase2_learning_rate_follows_the_unet_mode_in_config_node_and_cli():
    """One default, three places: None (config), 0 (node), no --lr-phase2 (CLI) all resolve by the
    phase-2 mode: the published 2e-6 for the full UNet, LR_PHASE2['lora'] for the LoRA."""
    import argparse

    from productscene.train.recipes.concepts import LR_PHASE2
    from productscene_cli import train_concepts as cli
    assert LR_PHASE2["full"] == 2e-6 and LR_PHASE2["lora"] >= 50 * LR_PHASE2["full"]
    assert ConceptConfig().lr_phase2 == LR_PHASE2["lora"] and ConceptConfig(unet="full").lr_phase2 == 2e-6
    assert ConceptConfig(lr_phase2=3e-5).lr_phase2 == 3e-5
    node_input = {i.id: i for i in pack.nodes.train_concepts.ProductSceneMultiConceptInversion.define_schema().inputs}
    assert node_input["lr_phase2"].default == 0.0 and node_input["phase2_steps"].default == ConceptConfig().phase2_steps
    sub = argparse.ArgumentParser().add_subparsers()
    cli.register(sub)
    parsed = sub.choices["train-concepts"].parse_args(["--checkpoint", "x", "--image", "i", "--mask", "m", "--out", "o"])
    assert parsed.lr_phase2 is None and parsed.lr_phase1 == ConceptConfig().lr_phase1
    assert parsed.attention_weight == ConceptConfig().attention_weight and parsed.rank == ConceptConfig().rank
    with pytest.raises(ProductSceneError, match="lr_phase2"):
        ConceptConfig(lr_phase2=0.0)


def test_default_phase2_moves_the_lora(sd15, tmp_path):
    """Evidence 2 (issue 30): at the default settings (only the step counts cut: phase 1 none, phase 2
    three steps) phase 2 moves the LoRA's up weights (which start at zero) by more than 1e-4 at the
    largest; at the published full-UNet rate 2e-6 it cannot: AdamW moves a weight by about the
    learning rate per step, so three steps give at most ~6e-6 (checked below as the control)."""
    host = th.ComfyTrainingHost(sd15.model, sd15.clip, sd15.vae)
    image, masks = scene()
    moved = {}
    for lr in (None, 2e-6):
        cfg = ConceptConfig(resolution=0, phase1_steps=0, phase2_steps=3, lr_phase2=lr)
        run = train_concepts(host, image, masks, tmp_path / f"d{lr}.safetensors", cfg, seed=0)
        ups = [v for k, v in run.recipe.lora.comfy_state_dict().items() if k.endswith("lora_up.weight")]
        moved[lr] = max(float(u.float().abs().max()) for u in ups)
    assert moved[None] > 1e-4, moved
    assert moved[2e-6] < 1e-5, moved
