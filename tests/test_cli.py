"""The command line, as a user runs it: ``python -m productscene ...`` in a fresh process."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from productscene.library import CategoryLibrary
from tests.support.comfy_env import COMFYUI_DIR, REPO_ROOT


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
    library = CategoryLibrary.open(out)
    assert library.names == ["bamboo", "marble"] and library.vectors_per_token == 2
    assert torch.equal(library.vectors("bamboo")["clip_l"], torch.full((2, 768), 1.0))


def test_train_categories_writes_a_library_the_loader_reads(dataset, tmp_path, default_model_files):
    checkpoint, _ = default_model_files
    out = tmp_path / "trained.safetensors"
    done = run_cli("train-categories", "--data", dataset, "--checkpoint", checkpoint, "--out", out,
                   "--steps", 2, "--resolution", 64, "--batch-size", 2, "--rank", 2, "--cpu",
                   "--cache-dir", tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    library = CategoryLibrary.open(out)
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
    library = CategoryLibrary.open(out)
    assert library.names == ["<red>", "<blue>"] and library.family == "sd15" and library.has_lora
    assert library.training["steps"] == 2 and library.training["recipe"] == "concepts"
    for f in ("scene_concepts.lora.safetensors", "scene_concepts_red.safetensors", "scene_concepts_blue.safetensors",
              "scene_concepts.loss.json", "scene_concepts.checkpoint.safetensors"):
        assert (tmp_path / f).is_file(), f


def test_train_concepts_refuses_bad_masks_before_loading_a_model(tmp_path, default_model_files):
    checkpoint, _ = default_model_files
    image, masks = _scene_files(tmp_path)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "empty.png")
    done = run_cli("train-concepts", "--checkpoint", checkpoint, "--image", image, "--mask", masks[0], "--mask",
                   tmp_path / "empty.png", "--out", tmp_path / "x.safetensors", "--cpu")
    assert done.returncode == 2 and "mask 2 of 2 is empty" in done.stderr
    assert "ComfyUI" not in done.stderr and not (tmp_path / "x.safetensors").exists()
