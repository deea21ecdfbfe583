"""The small world and its pretrained base model (devkit/world_model.py, devkit/world.py):
deterministic data, a checkpoint that ComfyUI's CheckpointLoaderSimple loads as SD1.5, a fast
text encoder that encodes exactly as the full one, a VAE whose latents carry the image's colour,
and a UNet that has really learned to denoise the world (held-out loss far below its start and
levelled off)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from devkit import world as world_mod
from productscene.train.datasets import check, open_dataset


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_world_data_is_deterministic_and_reads_as_bg60k(tmp_path):
    a = world_mod.write_world(tmp_path / "a", seed=3, train_per_category=2, heldout_per_category=1)
    b = world_mod.write_world(tmp_path / "b", seed=3, train_per_category=2, heldout_per_category=1)
    c = world_mod.write_world(tmp_path / "c", seed=4, train_per_category=2, heldout_per_category=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    for split, n in (("train", 2), ("test", 1)):
        ds = open_dataset(a, "bg60k", split)
        report = check(ds)
        assert report.ok, report.message()
        assert ds.categories == list(world_mod.CATEGORIES) and len(ds) == n * len(world_mod.CATEGORIES)
        # masks come from the split's own folder
        assert all(f"{world_mod.SPLITS[split]}_masks" in it.mask for it in ds.items)
    # categories differ in colour: each background's chromaticity is nearest its own category's
    g = np.random.default_rng(0)

    def chroma(rgb):
        rgb = np.asarray(rgb, np.float64)
        return rgb / rgb.sum()

    for cat in world_mod.CATEGORIES:
        rgb, mask = world_mod.catalogue_image(cat, g)
        mean = chroma(rgb[~mask].reshape(-1, 3).mean(0))
        dist = {k: np.abs(mean - chroma(v)).sum() for k, v in world_mod.COLOURS.items()}
        assert min(dist, key=dist.get) == cat


def test_world_base_loads_through_checkpoint_loader_simple(world, world_models, comfy_nodes):
    import comfy.supported_models
    import folder_paths

    folder_paths.add_model_folder_path("checkpoints", str(world.checkpoint.parent))
    model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(world.checkpoint.name)[:3]
    assert type(model.model.model_config) is comfy.supported_models.SD15
    fast_model, fast_clip, fast_vae = world_models
    # the short text encoder gives the full encoder's encodings (the other layers are identities)
    text = "a product photo on a linen background"
    full = clip.encode_from_tokens(clip.tokenize(text)).float()
    short = fast_clip.encode_from_tokens(fast_clip.tokenize(text)).float()
    assert full.shape == short.shape == (1, 77, 768)
    assert torch.allclose(full, short, atol=2e-2 * float(short.abs().max())), float((full - short).abs().max())
    # the two loads hold the same pretrained UNet
    a = dict(model.model.diffusion_model.named_parameters())
    b = dict(fast_model.model.diffusion_model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_world_vae_keeps_the_colour_of_every_8x8_block(world, world_models):
    _, _, vae = world_models
    ds = open_dataset(world.data, "bg60k", "test")
    image, _ = ds.load(0, 64)
    with torch.no_grad():
        latent = vae.encode(image[None])
        decoded = vae.decode(latent)[0, ..., :3]
    model_latent = latent * 0.18215          # what the UNet sees (SD1.5's process_latent_in)
    assert model_latent.shape == (1, 4, 8, 8)
    assert 0.5 < float(model_latent.std()) < 2.0, float(model_latent.std())  # about a real SD VAE's spread
    blocks = torch.nn.functional.avg_pool2d(image.permute(2, 0, 1)[None], 8)[0].permute(1, 2, 0)
    expected = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)
    err = (decoded - expected).abs().mean()
    assert float(err) < 0.05, float(err)


def test_world_base_has_learned_to_denoise_the_world(world, world_models, pack):
    from importlib import import_module
    from devkit.denoising import DenoisingRecipe

    meta = json.loads(world.meta["productscene.pretrain"])
    curve = [v for _, v in meta["heldout_curve"]]
    print("held-out denoising loss while pretraining:", meta["heldout_curve"])
    assert curve[-1] < 0.1 * curve[0]
    # levelled off: the last stretch (40 steps) moved it by under 10% of itself, and by under 2%
    # of what pretraining took off
    change = abs(curve[-2] - curve[-1])
    assert change < 0.1 * curve[-1] and change < 0.02 * (curve[0] - curve[-1]), curve

    # measured again here, on the checkpoint as loaded: the held-out loss is the pretrained one
    th = import_module(pack.__name__ + ".nodes.training_host")
    model, clip, vae = world_models
    host = th.ComfyTrainingHost(model, clip, vae)
    held = open_dataset(world.data, "bg60k", "test")
    images = torch.stack([held.load(i, 64)[0] for i in range(len(held))])
    recipe = DenoisingRecipe(host, host.encode_images(images), ["a product photo"], batch_size=len(held))
    g = torch.Generator().manual_seed(7)
    loss = sum(recipe.evaluate(recipe.batch(0, g)) for _ in range(4)) / 4
    print(f"held-out loss of the loaded world base: {loss:.4f} (start of pretraining {curve[0]:.4f})")
    assert loss < 0.35 * curve[0]
