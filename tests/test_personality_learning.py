"""THE evidence that a personality adapter learns (SPEC section 5), on the CPU with ComfyUI's real
SD1.5 classes, from the PRETRAINED world base (``world`` fixture), and CLIP vision built by
ComfyUI's own class (random weights: a fixed feature extractor, as a real one is frozen).

The whole run of the node and the command line (``train_personality_adapter``: output and data
checks, latent cache, engine, adapter file) trains the adapter self-supervised on the train split
(each image's own augmented background as its reference; the prompt names no style). Then every
held-out image is scored with the same noise and timesteps under a reference of its own style (a
train image of its category, product filled) and under a reference of every other style: for
every style, the own-style loss must be lower than the best other style's by at least 5%.

From an IP-Adapter file (issue 29): a 'plus' IP-Adapter file of the released format (keys, fp16,
ip-adapter-plus_sd15's resampler sizes: 16 tokens, dim 768, depth 4, 12 heads; the encoder's width)
for the world base's four cross-attention layers, as IP-Adapter's own training starts one
(devkit/ipadapter.py ``write_training_start``), read by the loader the node's ``from_ipadapter``
and ``train-personality --from-ipadapter`` call (``initial_from_ipadapter``), fine-tuned by the same
run at the recipe's defaults: its resampler is a group of its own at ``lr x projection_lr_scale``
(0.01: nearly kept, as a released file's is learned on millions of images) while the per-layer
to_k_ip/to_v_ip train at ``lr``. Measured own-style margins brick/linen/meadow/ocean, seed 0, lr 1.5e-3:

- resampler at the same rate (scale 1), 1000 steps: -2.3/+23.4/+19.4/+20.6% (brick FAILS: the meadow
  reference helps brick images more);
- scale 0.1, 400 steps: +6.1/+1.1/+9.8/+21.2% (linen fails);
- scale 0.01, 400 steps: +16.7/+9.2/+8.7/+28.0% (held; this test; the
  same run measured on: 600 steps +6.1/+34.5/+15.3/+29.2%, 800 steps +10.8/+39.7/+15.0/+26.1%, 1000 steps
  +6.4/+38.7/+29.1/+25.9%).

400 steps (not 1000) keep the learning lane's added time down; every margin is >= 7% there. This
test alone (the world base already built): 286 s user + 39 s system CPU, one thread (8.8 min wall on
the shared 2-core machine under other load).
"""
from __future__ import annotations

import os
from importlib import import_module

import pytest
import torch

from productscene.ipadapter import load_adapter
from productscene.personality import neutral_fill
from productscene.train.datasets import open_dataset
from productscene.train.recipes.personality import PersonalityConfig, initial_from_ipadapter, train_personality_adapter
from devkit import ipadapter
from devkit.clip_vision import build_clip_vision

pytestmark = pytest.mark.learning

SEED = 0
# measured on the world base v3, seed 0 (own-style margins brick/linen/meadow/ocean):
# 1000 steps at lr 1.5e-3: +15.0/+34.7/+13.9/+32.0%; at 3e-3: +14.6/+34.6/+14.2/+30.3%;
# 600 steps at 3e-3: +2.7/+27.3/+12.6/+17.6% (the meadow reference then helps every style)
STEPS = 1000
STEPS_IPA = 400
LR = 1.5e-3
T_MIN, T_MAX = 200, 900
MARGIN = 0.05
VISION_WIDTH = 64
DRAWS = 4
REFS = 3  # references per style; each loss is their mean


def vision_encoder():
    cv = build_clip_vision(VISION_WIDTH)
    return lambda images: cv.encode_image(images, crop=False)["penultimate_hidden_states"]


@pytest.fixture(scope="module")
def host(world_models, pack):
    th = import_module(pack.__name__ + ".nodes.training_host")
    return th.ComfyTrainingHost(*world_models)


def train(world, host, pack, tmp, steps, initial=None, progress=None):
    """The run from scratch, or from ``initial`` (an IP-Adapter file's adapter), as the node and the
    command line make it."""
    layers = import_module(pack.__name__ + ".nodes.host").cross_attention_layers(host.model)
    config = PersonalityConfig(tokens=4, batch_size=4, resolution=64, steps=steps, lr=LR,
                               min_timestep=T_MIN, max_timestep=T_MAX)
    run = train_personality_adapter(host, world.data, tmp / "world-personality.safetensors", config,
                                    encode_vision=vision_encoder(), vision_width=VISION_WIDTH, layers=layers,
                                    layout="bg60k", split="train", seed=SEED, cache_dir=tmp / "cache",
                                    initial=initial, progress=progress)
    return run, tmp


@pytest.fixture(scope="module")
def trained(world, host, pack, tmp_path_factory):
    return train(world, host, pack, tmp_path_factory.mktemp("personality"), STEPS)


def style_losses(world, host, run, tmp):
    """``[style of the image, style of the reference]`` mean held-out loss, shared noise and timesteps."""
    from productscene.train.datasets import LatentCache

    recipe = run.recipe
    recipe.adapter = load_adapter(run.adapter).to(host.device).eval()  # the file, as a user gets it
    train = open_dataset(world.data, "bg60k", "train")
    held = open_dataset(world.data, "bg60k", "test")
    cats = list(world.categories)
    # REFS references per style: the first train images of that category, product filled
    refs = {c: [train.load(i, 64) for i in [j for j in range(len(train)) if train[j].category == c][:REFS]]
            for c in cats}
    cache = LatentCache(tmp / "cache", held, host.encode_images, 64, namespace=host.latent_namespace)
    g = torch.Generator().manual_seed(1234)
    totals = torch.zeros(len(cats), len(cats))
    counts = torch.zeros(len(cats))
    references = torch.cat([neutral_fill(im[None], m[None]) for c in cats for im, m in refs[c]])
    reference_masks = torch.stack([m for c in cats for _, m in refs[c]])
    n = len(references)
    with host.session(latent_shape=(n, 4, 8, 8)):
        for i in range(len(held)):
            latent, mask = cache.get(i)
            row = cats.index(held[i].category)
            for _ in range(DRAWS):
                noise = torch.randn((1,) + tuple(latent.shape), generator=g)
                t = torch.randint(T_MIN, T_MAX, (1,), generator=g)
                loss = recipe.evaluate(latent[None].expand(n, -1, -1, -1), mask[None].expand(n, -1, -1),
                                       noise.expand(n, -1, -1, -1), t.expand(n), references, reference_masks)
                totals[row] += loss.reshape(len(cats), REFS).mean(1)
                counts[row] += 1
    return totals / counts[:, None]


def check_margins(world, host, run, tmp):
    assert run.adapter and os.path.isfile(run.adapter)
    h = run.result.history
    print(f"\nloss history: first 20 steps {sum(h[:20]) / 20:.4f} -> last 20 steps {sum(h[-20:]) / 20:.4f}")
    loss = style_losses(world, host, run, tmp)
    cats = list(world.categories)
    print("\nheld-out loss [image style x reference style]:\n" + "\n".join(
        f"{c:>8} " + " ".join(f"{float(v):.4f}" for v in loss[r]) for r, c in enumerate(cats)))
    margins = {}
    for r, c in enumerate(cats):
        other = min(float(loss[r, k]) for k in range(len(cats)) if k != r)
        margins[c] = (other - float(loss[r, r])) / other
    print("margins: " + ", ".join(f"{c} {100 * m:+.1f}%" for c, m in margins.items()))
    for c, m in margins.items():
        assert m >= MARGIN, f"{c}: own-style margin {100 * m:+.2f}% < 5%"


def test_a_personality_adapter_learns_to_carry_the_reference_style(world, host, trained):
    check_margins(world, host, *trained)



def test_a_fine_tuned_ipadapter_file_learns_to_carry_the_reference_style_as_well(world, host, pack, tmp_path_factory):
    """From an IP-Adapter training start (see the module docstring), read as the node and the
    command line read it: after the first step every tensor is within one learning rate of the
    file's (its resampler within one of its own rate, ``lr x projection_lr_scale``), the result keeps the file's layout and its
    16 tokens, and the margins hold."""
    from safetensors.torch import load_file
    from productscene.ipadapter import IPAdapterPersonality

    tmp = tmp_path_factory.mktemp("personality_ipa")
    layers = import_module(pack.__name__ + ".nodes.host").cross_attention_layers(host.model)
    path = ipadapter.write_training_start(tmp / "ip-adapter-plus_world.safetensors", layers, VISION_WIDTH, seed=SEED)
    start = {k: v.float() for k, v in load_file(str(path)).items()}
    initial = initial_from_ipadapter(path, host.family, layers, VISION_WIDTH)
    first = {}

    def progress(step, total, loss):
        if step == 1:
            first.update(load_file(initial.save(tmp / "step-1.safetensors")))

    run, tmp = train(world, host, pack, tmp, STEPS_IPA, initial, progress)
    assert set(first) == set(start)
    scale = PersonalityConfig().projection_lr_scale
    for k in start:
        moved = float((first[k] - start[k]).abs().max())
        rate = LR * scale if k.startswith("image_proj.") else LR
        assert 0.1 * rate < moved <= 1.1 * rate, (k, moved, rate)
    tuned = load_adapter(run.adapter)
    assert isinstance(tuned, IPAdapterPersonality) and tuned.kind == "plus" and tuned.n_tokens == 16  # not tokens=4
    assert set(load_file(run.adapter)) == set(start)
    check_margins(world, host, run, tmp)
