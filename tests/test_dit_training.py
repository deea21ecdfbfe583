"""Train Category Library on DiTs (issue 26): the node and the category run on tiny Flux.1 and
Z-Image models built by ComfyUI's own classes (devkit/dit_models.py), their own text encoders
(devkit/dit_text.py: T5-XXL / Qwen3-4B at real widths, narrow layers, through ComfyUI's loader) and
a 16-channel TAESD VAE (devkit/dit_world.py).

The learning itself is measured on the DiT world base (tests/test_dit_learning.py); here: the node
writes a library of the model's family that Category Tokens and ComfyUI's LoRA loader take, cancel
and resume, the gate inside every joint attention of a training step (exactly zero gradient from
the identifier through product image tokens, not zero on the background), the noise prediction
of a flow model, and the usual refusals.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import comfy.lora

import productscene.library
from productscene.errors import ProductSceneError
from productscene.train import engine
from productscene.train.lora import FLUX_TARGETS, Z_IMAGE_TARGETS
from productscene.train.recipes import categories as cats
from devkit import comfy_env
from devkit import dit_models, dit_text, dit_world
from tests.support.progress_hook import cancel_when

pack = comfy_env.import_pack()
th = pack.nodes.training_host
dit_host = pack.nodes.dit_host

CATS = ("perfume", "tea", "tools")
TEMPLATE = "a product photo on a {category} background"
LIBRARY_FAMILY = {"flux": "flux", "zimage": "z_image"}
BUILD = {"flux": dit_models.tiny_flux, "zimage": dit_models.tiny_zimage}


def text_encoder(fam: str):
    """The family's tiny text encoder; Flux.1's T5 padded to 8 tokens, not 256 (a ComfyUI tokenizer
    option: the same encoder, a shorter prompt, so the tests run fast)."""
    clip = dit_text.tiny_text_encoder(LIBRARY_FAMILY[fam]).clone()
    if fam == "flux":
        clip.set_tokenizer_option("t5xxl_min_length", 8)
    return clip


@pytest.fixture(autouse=True)
def data_anywhere_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv(pack.nodes.trainer_files.DATA_ROOTS_ENV, str(tmp_path))


def write_data(root, per_category=2, size=64, seed=0):
    g = np.random.default_rng(seed)
    for c in CATS:
        (root / c).mkdir(parents=True)
        for k in range(per_category):
            a = np.zeros((size, size, 4), np.uint8)
            a[..., :3] = g.integers(0, 255, 3)
            x0, y0 = g.integers(4, size - 28, 2)
            a[y0:y0 + 20, x0:x0 + 20, :3] = 250
            a[y0:y0 + 20, x0:x0 + 20, 3] = 255
            Image.fromarray(a, "RGBA").save(root / c / f"{k}.png")
    return root


def node_kwargs(fam, data, **over):
    kw = dict(model=BUILD[fam](), clip=text_encoder(fam), vae=dit_world.tiny_flux_vae(), data_folder=str(data),
              layout="folder", steps=3, lr_tokens=1e-2, lr_lora=1e-3, lora_rank=2, resolution=64, batch_size=2,
              template=TEMPLATE, output_name=f"dit_{fam}_lib", checkpoint_every=0, resume=False, seed=0)
    kw.update(over)
    return kw


@pytest.mark.parametrize("fam", ["flux", "zimage"])
def test_node_trains_a_dit_library_category_tokens_and_the_lora_loader_take(fam, tmp_path):
    node = pack.nodes.train_categories.ProductSceneTrainCategoryLibrary
    data = write_data(tmp_path / "data")
    with torch.inference_mode():  # as ComfyUI executes nodes
        name, graph = node.execute(**node_kwargs(fam, data)).args
    assert graph.shape[0] == 1 and graph.shape[-1] == 3
    lib = productscene.library.TokenLibrary.open(os.path.join(pack.nodes.train_categories.library_folder(), name))
    encoder, width = {"flux": ("t5xxl", 4096), "zimage": ("qwen3_4b", 2560)}[fam]
    assert lib.family == LIBRARY_FAMILY[fam] and lib.names == list(CATS) and lib.has_lora
    assert set(lib.vectors("tea")) == {encoder} and tuple(lib.vectors("tea")[encoder].shape) == (1, width)
    assert lib.training["steps"] == 3
    targets = {"flux": FLUX_TARGETS, "zimage": Z_IMAGE_TARGETS}[fam]
    assert tuple(lib.training["config"]["targets"]) == targets
    # the identifiers differ from one another and from their init words: they were trained
    assert not torch.equal(lib.vectors("tea")[encoder], lib.vectors("tools")[encoder])
    # Category Tokens takes the library with the family's own text encoder
    clip = text_encoder(fam)
    _, ct = pack.nodes.category_tokens.encode_category_prompt(clip, name, "tea", TEMPLATE)
    assert ct.family == LIBRARY_FAMILY[fam] and torch.equal(ct.vectors[encoder], lib.vectors("tea")[encoder])
    # the shared LoRA sits on the joint attention and loads with ComfyUI's own key mapping
    model = BUILD[fam]()
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lib.lora_state_dict(), key_map, log_missing=False)
    assert len(patches) == len(lib.lora_keys) // 3 > 0
    attention = ("img_attn.qkv", "txt_attn.proj", "single_blocks.1.linear1") if fam == "flux" else \
        ("context_refiner.0.attention.qkv", "noise_refiner.0.attention.out", "layers.1.attention.qkv")
    for part in attention:
        assert any(part in k for k in lib.lora_keys), part
    assert all(("attn" in k or "attention" in k or "linear" in k) for k in lib.lora_keys)


def test_cancel_leaves_a_checkpoint_and_resume_finishes_on_flux(tmp_path):
    import comfy.model_management as mm
    node = pack.nodes.train_categories.ProductSceneTrainCategoryLibrary
    data = write_data(tmp_path / "data")
    with cancel_when(lambda value, total: value == 2 and total == 5), torch.inference_mode(), \
            pytest.raises(mm.InterruptProcessingException):
        node.execute(**node_kwargs("flux", data, steps=5, output_name="dit_cancel_lib"))
    state = os.path.join(pack.nodes.trainer_files.work_folder("checkpoints"), "dit_cancel_lib.checkpoint.safetensors")
    info = engine.read_checkpoint_info(state)
    assert info["step"] == 2 and len(info["history"]) == 2
    assert not os.path.exists(os.path.join(pack.nodes.train_categories.library_folder(), "dit_cancel_lib.safetensors"))
    with torch.inference_mode():
        out = node.execute(**node_kwargs("flux", data, steps=5, output_name="dit_cancel_lib", resume=True))
    lib = productscene.library.TokenLibrary.open(os.path.join(pack.nodes.train_categories.library_folder(), out.args[0]))
    assert lib.training["steps"] == 5 and lib.family == "flux"
    assert engine.read_checkpoint_info(state)["step"] == 5


class Recorder:
    """A foreign ``optimized_attention_override``: records every attention call of the model."""

    def __init__(self):
        self.calls = []

    def __call__(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        self.calls.append(dict(func=func, q=args[0], k=args[1], v=args[2], heads=args[3],
                               mask=kwargs.get("mask", args[4] if len(args) > 4 else None),
                               streams=options.get(dit_host.STREAMS_KEY)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("fam", ["flux", "zimage"])
def test_the_identifier_gets_no_gradient_through_product_tokens_in_any_joint_attention(fam):
    """A training step of the category recipe on the DiT host: in every joint attention (Flux
    double and single blocks, Z-Image main layers), with the queries and the image and F rows of
    keys/values held fixed (detached), the attention output of product image tokens has exactly
    zero gradient with respect to the identifier; background tokens' output has not."""
    host = th.training_host(BUILD[fam](), text_encoder(fam), dit_world.tiny_flux_vae())
    assert isinstance(host, th.ComfyDitTrainingHost)
    rec = Recorder()
    host.model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = rec
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 8, 10)
    masks[0, 2:6, 2:6] = 1
    masks[1, 4:8, 5:9] = 1
    source = cats.MemorySource(torch.randn(2, 16, 8, 10, generator=g), masks, ["perfume", "tea"])
    config = cats.CategoryConfig(template=TEMPLATE, batch_size=2, resolution=64, steps=1)
    checked = 0
    with engine.training_mode():
        recipe = cats.CategoryRecipe(host, source, ["perfume", "tea"], config, seed=0)
        identifier = recipe.parameter_groups()["tokens"]
        with host.session(lora=recipe.lora):
            batch = recipe.batch(0, torch.Generator().manual_seed(3))
            *_, scene = recipe._forward(batch, capture_attention=False)
            product_tokens = scene.gates[0].region.dit_tokens((8, 10), 2)  # [2, 20]
            joint = [c for c in rec.calls if c["streams"] is not None and c["q"].shape[2] == sum(c["streams"])]
            assert len(joint) == {"flux": 4, "zimage": 2}[fam]
            for c in joint:
                text, free, image = c["streams"]
                assert c["mask"] is not None and c["mask"].shape[-1] == text + free + image
                keep = torch.zeros(c["k"].shape[2], dtype=torch.bool)
                keep[:text] = True
                k = torch.where(keep[None, None, :, None], c["k"], c["k"].detach())
                v = torch.where(keep[None, None, :, None], c["v"], c["v"].detach())
                out = c["func"](c["q"].detach(), k, v, c["heads"], mask=c["mask"], skip_reshape=True)
                rows = out[:, text + free:text + free + product_tokens.shape[1]]  # [2, P, C]
                on_product = torch.autograd.grad(rows[product_tokens].sum(), identifier, retain_graph=True,
                                                 allow_unused=True)
                on_background = torch.autograd.grad(rows[~product_tokens].sum(), identifier, retain_graph=True,
                                                     allow_unused=True)
                assert all(gr is None or float(gr.abs().max()) == 0.0 for gr in on_product)
                assert max(float(gr.abs().max()) for gr in on_background if gr is not None) > 0.0
                checked += 1
    assert checked == len(joint)


def test_the_noise_prediction_of_a_flow_model_is_its_eps():
    """Flux.1 is a flow model (``x = sigma eps + (1 - sigma) x0``): the host's noise prediction
    puts back exactly the model's denoised output, ``x - sigma eps_hat == (1 - sigma) x0_hat``, and
    its Euler slope is the model's ``(x - x0_hat) / sigma``; timestep 999 is pure noise."""
    host = th.training_host(BUILD["flux"](), text_encoder("flux"), dit_world.tiny_flux_vae())
    from productscene.prompt import Prompt
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 8, generator=g)
    sigma = host.sigmas(torch.tensor([200, 700]))
    assert 0 < float(sigma[0]) < float(sigma[1]) < 1 and float(host.sigmas(torch.tensor([999]))[0]) == 1.0
    with torch.no_grad(), host.session():
        enc = host.encode([Prompt("a product photo")] * 2)
        x0 = host._denoised(x, sigma, enc)
        eps = host.predict_noise(x, sigma, enc)
        slope = host.euler_slope(x, sigma, enc)
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(x - s * eps, (1 - s) * x0, atol=1e-5)
    assert torch.allclose(slope, (x - x0) / s, atol=1e-6)
    assert enc.pooled is not None and enc.pooled.shape == (2, 768)  # Flux.1's CLIP-L vector


def test_a_unet_library_or_text_encoder_is_refused_on_a_dit(sd15, tmp_path):
    from productscene.train.datasets import open_dataset
    from productscene.train.evaluate import evaluate_library
    host = th.training_host(BUILD["flux"](), text_encoder("flux"), dit_world.tiny_flux_vae())
    assert host.family == "flux"
    lib_sd = productscene.library.TokenLibrary.write(tmp_path / "sd15.safetensors", list(CATS),
                                                     {"clip_l": torch.randn(3, 1, 768)}, "sd15")
    data = write_data(tmp_path / "data")
    with pytest.raises(ProductSceneError, match=r"library: sd15\.safetensors is for sd15, but the checkpoint is flux"):
        evaluate_library(host, open_dataset(data, "folder"), lib_sd, cache_dir=tmp_path / "cache")
    with pytest.raises(ProductSceneError, match=r"clip: .*sd15.*but the model is flux"):
        th.training_host(BUILD["flux"](), sd15.clip, dit_world.tiny_flux_vae())
    with pytest.raises(ProductSceneError, match=r"clip: .*flux.*but the model is sd15"):
        th.training_host(sd15.model, text_encoder("flux"), sd15.vae)


def test_the_command_line_trains_and_scores_a_flux_library(tmp_path):
    """``train-categories`` then ``evaluate-library`` (their DiT path: the host chosen by the
    model's class) on a Flux.1 file in the DiT world base's format (untrained: this is about the
    commands, tests/test_dit_learning.py about learning), loaded by its own loader through
    ``python -m devkit.dit_world cli``."""
    import json
    import subprocess
    import sys
    from devkit.comfy_env import COMFYUI_DIR, REPO_ROOT

    base = dit_world.write_untrained(tmp_path / "flux-tiny.safetensors")
    data = write_data(tmp_path / "data")
    env = dict(os.environ, COMFYUI_PATH=str(COMFYUI_DIR), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "devkit.dit_world", "cli", *map(str, args)], capture_output=True,
                              text=True, timeout=600, env=env, cwd=REPO_ROOT)

    lib = tmp_path / "flux-lib.safetensors"
    done = cli("train-categories", "--data", data, "--checkpoint", base, "--out", lib, "--steps", 2, "--resolution", 64,
               "--batch-size", 2, "--rank", 2, "--cpu", "--cache-dir", tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    library = productscene.library.TokenLibrary.open(lib)
    assert library.family == "flux" and library.names == list(CATS) and library.training["steps"] == 2
    assert tuple(library.training["config"]["targets"]) == FLUX_TARGETS and library.has_lora
    done = cli("evaluate-library", "--data", data, "--checkpoint", base, "--library", lib, "--draws", 1, "--cpu",
               "--cache-dir", tmp_path / "cache", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    score = json.loads(done.stdout)
    assert score["identifiers"] == list(CATS) and score["images"] == 2 * len(CATS)
    assert torch.tensor(score["loss"]).shape == (len(CATS), len(CATS))


@pytest.mark.parametrize("fam", ["flux", "zimage"])
def test_gradient_checkpointing_gives_the_same_gradients(fam):
    """Flux.1's blocks add their residuals in place; with gradient checkpointing (recompute in the
    backward pass) the identifier's and the LoRA's gradients are exactly those without it."""
    host = th.training_host(BUILD[fam](), text_encoder(fam), dit_world.tiny_flux_vae())
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 8, 8)
    masks[0, 2:5, 3:7] = 1
    masks[1, 4:7, 1:4] = 1
    source = cats.MemorySource(torch.randn(2, 16, 8, 8, generator=g), masks, ["perfume", "tea"])
    config = cats.CategoryConfig(template=TEMPLATE, batch_size=2, resolution=64, steps=1)
    grads = []
    with engine.training_mode():
        recipe = cats.CategoryRecipe(host, source, ["perfume", "tea"], config, seed=0)
        trainables = recipe.parameter_groups()["tokens"] + recipe.parameter_groups()["lora"]
        for checkpointing in (False, True):
            with host.session(lora=recipe.lora, gradient_checkpoint=checkpointing):
                loss, _ = recipe.loss(recipe.batch(0, torch.Generator().manual_seed(3)), 0)
                grads.append(torch.autograd.grad(loss, trainables))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert max(float(a.abs().max()) for a in grads[0]) > 0.0


def test_the_node_shows_previews_drawn_by_the_flux_model(tmp_path):
    """preview_every on a DiT: the preview is a real sample of the flow model (Euler on its own
    slope) under the first categories' identifiers, decoded by the VAE, left of the loss curve."""
    from tests.support.progress_hook import progress_previews
    node = pack.nodes.train_categories.ProductSceneTrainCategoryLibrary
    live = pack.nodes.live_progress
    data = write_data(tmp_path / "data")
    with progress_previews() as shown, torch.inference_mode():
        node.execute(**node_kwargs("flux", data, steps=2, output_name="dit_preview_lib"), preview_every=2)
    with_sample = [(v, im) for v, im in shown if im.width > live.PREVIEW_SIZE[0]]
    assert [v for v, _ in with_sample][:1] == [2], [v for v, _ in shown]
    image = with_sample[-1][1]
    sample = image.crop((0, 0, image.width - live.PREVIEW_SIZE[0], live.PREVIEW_SIZE[1]))
    assert len(set(sample.convert("RGB").resize((16, 16)).getdata())) > 20  # a picture, not a blank
