"""The command line, as a user runs it: ``python -m productscene ...`` in a fresh process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from productscene.library import TokenLibrary
from productscene.personality import PersonalityAdapter
from productscene.train.engine import read_checkpoint_info
from devkit.comfy_env import COMFYUI_DIR, REPO_ROOT
from devkit import default_model, world_model
from tests.test_robustness import _start_training


def run_cli(*args, timeout=600):
    env = dict(os.environ, COMFYUI_PATH=str(COMFYUI_DIR), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "productscene", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO_ROOT)


def cutout(path, colour, size=64, box=(16, 16, 40, 44)):
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., :3] = colour
    x0, y0, x1, y1 = box
    rgba[y0:y1, x0:x1] = (200, 200, 200, 255)
    Image.fromarray(rgba, "RGBA").save(path)


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "catalogue"
    for category, colour in (("perfume", (230, 120, 150)), ("tools", (90, 70, 50))):
        (root / category).mkdir(parents=True)
        for i in range(2):
            cutout(root / category / f"{i}.png", colour, box=(10 + 8 * i, 12, 40, 50))
    return root


def test_check_dataset_reports_every_problem_and_exits_1(dataset):
    Image.fromarray(np.zeros((64, 64, 4), np.uint8), "RGBA").save(dataset / "tools" / "empty.png")
    (dataset / "perfume" / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(dataset / "perfume" / "nomask.jpg")
    done = run_cli("check-dataset", "--data", dataset, "--layout", "folder")
    assert done.returncode == 1
    for name in ("empty.png", "broken.png", "nomask.jpg"):
        assert name in done.stdout, done.stdout


def test_build_library_from_textual_inversion_files(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    for i, name in enumerate(("marble", "bamboo")):
        save_file({"emb_params": torch.full((2, 768), float(i))}, str(folder / f"{name}.safetensors"))
    out = tmp_path / "lib.safetensors"
    done = run_cli("build-library", "--from-embeddings", folder, "--family", "sd15", "--out", out)
    assert done.returncode == 0, done.stderr
    library = TokenLibrary.open(out)
    assert library.names == ["bamboo", "marble"] and library.vectors_per_token == 2
    assert torch.equal(library.vectors("bamboo")["clip_l"], torch.full((2, 768), 1.0))


def test_train_categories_writes_a_library_the_loader_reads(dataset, tmp_path, default_model_files):
    checkpoint, _ = default_model_files
    out = tmp_path / "trained.safetensors"
    done = run_cli("train-categories", "--data", dataset, "--checkpoint", checkpoint, "--out", out,
                   "--steps", 2, "--resolution", 64, "--batch-size", 2, "--rank", 2, "--cpu",
                   "--cache-dir", tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    library = TokenLibrary.open(out)
    assert library.names == ["perfume", "tools"] and library.family == "sd15" and library.has_lora
    assert library.training["steps"] == 2
    assert (tmp_path / "trained.checkpoint.safetensors").is_file()


def test_train_categories_refuses_a_missing_checkpoint_before_loading_anything(dataset, tmp_path):
    done = run_cli("train-categories", "--data", dataset, "--checkpoint", tmp_path / "nope.safetensors",
                   "--out", tmp_path / "x.safetensors", "--cpu")
    assert done.returncode != 0 and "checkpoint" in done.stderr and "not found" in done.stderr
    assert not (tmp_path / "x.safetensors").exists()


def _scene_files(tmp_path, size=64):
    img = np.full((size, size, 3), 128, np.uint8)
    img[8:32, 8:32] = (220, 30, 30)
    img[36:60, 30:58] = (30, 30, 220)
    Image.fromarray(img).save(tmp_path / "scene.png")
    for i, (y0, y1, x0, x1) in enumerate(((8, 32, 8, 32), (36, 60, 30, 58))):
        m = np.zeros((size // 2, size // 2), np.uint8)  # masks at another size than the image: resized
        m[y0 // 2:y1 // 2, x0 // 2:x1 // 2] = 255
        Image.fromarray(m).save(tmp_path / f"m{i}.png")
    return tmp_path / "scene.png", [tmp_path / "m0.png", tmp_path / "m1.png"]


def test_train_concepts_writes_tokens_lora_and_embeddings(tmp_path, default_model_files):
    checkpoint, _ = default_model_files
    image, masks = _scene_files(tmp_path)
    out = tmp_path / "scene_concepts.safetensors"
    done = run_cli("train-concepts", "--checkpoint", checkpoint, "--image", image, "--mask", masks[0], "--mask",
                   masks[1], "--names", "red,blue", "--out", out, "--phase1-steps", 1, "--phase2-steps", 1,
                   "--resolution", 64, "--cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    library = TokenLibrary.open(out)
    assert library.names == ["<red>", "<blue>"] and library.family == "sd15" and library.has_lora
    assert library.training["steps"] == 2 and library.training["recipe"] == "concepts"
    for f in ("scene_concepts.lora.safetensors", "scene_concepts_red.safetensors", "scene_concepts_blue.safetensors",
              "scene_concepts.loss.json", "scene_concepts.checkpoint.safetensors"):
        assert (tmp_path / f).is_file(), f
    # never replaced without --overwrite: refused before a model loads, every file kept
    written = {f: f.read_bytes() for f in tmp_path.glob("scene_concepts*")}
    again = run_cli("train-concepts", "--checkpoint", checkpoint, "--image", image, "--mask", masks[0], "--mask",
                    masks[1], "--names", "red,blue", "--out", out, "--phase1-steps", 1, "--phase2-steps", 1,
                    "--resolution", 64, "--cpu", timeout=120)
    assert again.returncode == 2 and "--out:" in again.stderr and "already exists" in again.stderr, again.stderr
    assert "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert {f: f.read_bytes() for f in tmp_path.glob("scene_concepts*")} == written


def test_train_concepts_refuses_bad_masks_before_loading_a_model(tmp_path, default_model_files):
    checkpoint, _ = default_model_files
    image, masks = _scene_files(tmp_path)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "empty.png")
    done = run_cli("train-concepts", "--checkpoint", checkpoint, "--image", image, "--mask", masks[0], "--mask",
                   tmp_path / "empty.png", "--out", tmp_path / "x.safetensors", "--cpu")
    assert done.returncode == 2 and "mask 2 of 2 is empty" in done.stderr
    assert "ComfyUI" not in done.stderr and not (tmp_path / "x.safetensors").exists()


def test_train_concepts_class_images_add_the_prior_loss(tmp_path, default_model_files):
    """--class-images (with --class-prompt and --prior-weight) turns on prior preservation: every
    step's loss then holds a prior term; without it no step does."""
    checkpoint, _ = default_model_files
    image, masks = _scene_files(tmp_path)
    classes = tmp_path / "class_images"
    classes.mkdir()
    for i, colour in enumerate(((200, 60, 60), (60, 60, 200))):
        Image.fromarray(np.full((48, 40, 3), colour, np.uint8)).save(classes / f"c{i}.png")  # any size: resized
    common = ["train-concepts", "--checkpoint", checkpoint, "--image", image, "--mask", masks[0], "--mask", masks[1],
              "--phase1-steps", 1, "--phase2-steps", 1, "--resolution", 64, "--cpu"]
    done = run_cli(*common, "--out", tmp_path / "prior.safetensors", "--class-images", classes,
                   "--class-prompt", "a photo of a bottle", "--prior-weight", 0.5)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = json.loads((tmp_path / "prior.loss.json").read_text())["logs"]
    assert len(logs) == 2 and all(entry["prior_loss"] > 0 for entry in logs)
    plain = run_cli(*common, "--out", tmp_path / "plain.safetensors")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert not any("prior_loss" in entry for entry in json.loads((tmp_path / "plain.loss.json").read_text())["logs"])


@pytest.mark.parametrize("extra, message", [
    (["--prior-weight", "0.5"], "--prior-weight: prior preservation needs --class-images"),
    (["--class-prompt", "a bottle"], "--class-prompt: prior preservation needs --class-images"),
    (["--class-images", "EMPTY"], "--class-images: no images"),
    (["--class-images", "MISSING"], "is not a folder"),
    (["--class-images", "CLASSES", "--prior-weight", "0"], "--prior-weight: expected a number above 0"),
])
def test_train_concepts_prior_options_are_checked_before_a_model_loads(tmp_path, default_model_files, extra, message):
    checkpoint, _ = default_model_files
    image, masks = _scene_files(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "classes").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "classes" / "c.png")
    folders = {"EMPTY": tmp_path / "empty", "MISSING": tmp_path / "missing", "CLASSES": tmp_path / "classes"}
    extra = [folders.get(e, e) for e in extra]
    done = run_cli("train-concepts", "--checkpoint", checkpoint, "--image", image, "--mask", masks[0],
                   "--out", tmp_path / "x.safetensors", "--cpu", *extra, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "ComfyUI" not in done.stderr
    assert not list(tmp_path.glob("x*"))


def test_a_checkpoint_comfyui_cannot_identify_is_an_error_line(dataset, tmp_path):
    """A safetensors file that looks like a model by its keys but that ComfyUI cannot identify: every
    command that loads --checkpoint says so on one ``error: checkpoint:`` line, exit 2, nothing written."""
    odd = tmp_path / "odd.safetensors"
    save_file({"model.diffusion_model.some.weight": torch.zeros(3, 5)}, str(odd))
    image, masks = _scene_files(tmp_path)
    library = tmp_path / "lib.safetensors"
    TokenLibrary.write(library, ["perfume", "tools"], {"clip_l": torch.zeros(2, 1, 768)}, "sd15")
    commands = {
        "train-categories": ["--data", dataset, "--out", tmp_path / "cats.safetensors"],
        "train-concepts": ["--image", image, "--mask", masks[0], "--out", tmp_path / "concepts.safetensors"],
        "evaluate-library": ["--data", dataset, "--library", library],
    }
    before = set(tmp_path.iterdir())
    for command, args in commands.items():
        done = run_cli(command, "--checkpoint", odd, *args, "--cpu", timeout=300)
        assert done.returncode == 2, (command, done.stderr[-2000:])
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith(f"error: checkpoint: ComfyUI could not load {odd}"), (command, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, command
    assert set(tmp_path.iterdir()) == before


# -- train-personality ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_vision_file(default_model_files):
    """The demo's default CLIP vision model (random-weight ViT-L/14, ~610 MB), built once and cached
    in .cache/productscene beside the default checkpoint."""
    cv, _adapter = default_model.ensure_reference_defaults(default_model_files[0], log=lambda *_: None)
    return cv


def _personality_args(data, checkpoint, clip_vision, out, tmp_path, steps=2):
    return ["train-personality", "--data", data, "--checkpoint", checkpoint, "--clip-vision", clip_vision,
            "--out", out, "--resolution", 64, "--steps", steps, "--batch-size", 2, "--tokens", 4, "--cpu",
            "--cache-dir", tmp_path / "cache"]


def test_train_personality_writes_an_adapter_and_never_replaces_it_without_overwrite(
        dataset, tmp_path, default_model_files, clip_vision_file):
    out = tmp_path / "brand.safetensors"
    args = _personality_args(dataset, default_model_files[0], clip_vision_file, out, tmp_path)
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = PersonalityAdapter.load(out)
    assert adapter.family == "sd15" and adapter.vision_width == 1024 and adapter.n_tokens == 4
    assert adapter.training_summary["steps"] == 2 and adapter.training_summary["recipe"] == "personality"
    assert adapter.training_summary["images"] == 4
    assert (tmp_path / "brand.checkpoint.safetensors").is_file() and f"wrote {out}" in done.stdout

    before = out.read_bytes()
    again = run_cli(*args)
    assert again.returncode == 2, again.stderr[-3000:]
    assert again.stderr.startswith("error: --out:") and "already exists" in again.stderr, again.stderr[-2000:]
    assert "--overwrite" in again.stderr and out.read_bytes() == before


def test_train_personality_fine_tunes_an_ipadapter_file_from_its_weights(dataset, tmp_path, clip_vision_file):
    """--from-ipadapter: the run starts from the file's weights (after one AdamW step every tensor is
    within one learning rate of the file's; a new adapter's random start would be far off), the
    result keeps the IP-Adapter layout and loads as one; a file that is no IP-Adapter is refused
    before any model loads. On a checkpoint of SD1.5's full block layout (devkit/ipadapter_demo.py),
    the file's resampler sized for the default ViT-L CLIP vision model."""
    from safetensors.torch import load_file
    from devkit import ipadapter_demo
    from productscene.ipadapter import IPAdapterPersonality, load_adapter

    ckpt = ipadapter_demo.ensure_full_layout_checkpoint()
    start = ipadapter_demo.write_ipadapter_file(tmp_path / "ip-adapter-plus_sd15-vitl.safetensors")
    out = tmp_path / "brand_from_ipa.safetensors"
    lr = 1e-3
    args = _personality_args(dataset, ckpt, clip_vision_file, out, tmp_path, steps=1)
    done = run_cli(*args, "--from-ipadapter", start, "--lr", lr)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "16 reference tokens" in done.stdout  # the file's, not --tokens 4
    tuned = load_adapter(out)
    assert isinstance(tuned, IPAdapterPersonality) and tuned.kind == "plus" and tuned.training_summary["steps"] == 1
    before = {k: v.float() for k, v in load_file(str(start)).items()}
    after = load_file(str(out))
    assert set(after) == set(before)  # still an IP-Adapter file
    moved = {k: float((after[k] - before[k]).abs().max()) for k in before}
    assert max(moved.values()) <= 1.1 * lr + 1e-3 * lr, max(moved.items(), key=lambda kv: kv[1])
    assert max(moved.values()) > 0.1 * lr  # and it trained

    bad = run_cli(*_personality_args(dataset, ckpt, clip_vision_file, tmp_path / "x.safetensors", tmp_path),
                  "--from-ipadapter", clip_vision_file)
    assert bad.returncode == 2 and bad.stderr.startswith("error: from-ipadapter:"), bad.stderr[-2000:]


def _broken_image(data):
    (data / "perfume" / "broken.png").write_bytes(b"not a png")
    return data


@pytest.mark.parametrize("bad, code, said", [
    ("missing clip-vision", 2, ("clip-vision:", "nope.safetensors", "not found")),
    ("library as checkpoint", 2, ("checkpoint:", "category library, not a model")),
    ("broken image", 1, ("broken.png",)),
])
def test_train_personality_refuses_bad_input_before_loading_a_model(
        dataset, tmp_path, default_model_files, clip_vision_file, bad, code, said):
    checkpoint, library = default_model_files
    clip_vision = tmp_path / "nope.safetensors" if bad == "missing clip-vision" else clip_vision_file
    data = _broken_image(dataset) if bad == "broken image" else dataset
    out = tmp_path / "brand.safetensors"
    done = run_cli(*_personality_args(data, library if bad == "library as checkpoint" else checkpoint,
                                      clip_vision, out, tmp_path))
    assert done.returncode == code, done.stderr[-3000:]
    for text in said:
        assert text in done.stderr, done.stderr[-2000:]
    # no model was loaded: nothing but the refusal on stderr (ComfyUI's start-up warnings come first
    # otherwise), no latent encoded, nothing written
    assert "Traceback" not in done.stderr and "WARNING" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "cache").exists() and not out.exists()
    assert not (tmp_path / "brand.checkpoint.safetensors").exists()


def test_train_personality_ctrl_c_keeps_the_last_completed_step_and_resume_finishes(
        dataset, tmp_path, default_model_files, clip_vision_file):
    out, steps = tmp_path / "brand.safetensors", 3
    args = _personality_args(dataset, default_model_files[0], clip_vision_file, out, tmp_path, steps)
    proc, _ = _start_training(args + ["--checkpoint-every", 0], tmp_path, min_step=1)
    proc.send_signal(signal.SIGINT)  # once: the run stops after the step it is in
    _, err = proc.communicate(timeout=300)
    err = err.decode(errors="replace")
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    info = read_checkpoint_info(tmp_path / "brand.checkpoint.safetensors")
    assert 1 <= info["step"] < steps and len(info["history"]) == info["step"], info
    assert f"step {info['step']} of {steps} (the last completed step) is saved" in err, err[-2000:]
    assert not out.exists()

    done = run_cli(*args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert PersonalityAdapter.load(out).training_summary["steps"] == steps
    assert read_checkpoint_info(tmp_path / "brand.checkpoint.safetensors")["step"] == steps
