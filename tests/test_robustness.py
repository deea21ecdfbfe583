"""Issue 11, as a careless or hostile user meets it: through the real server's HTTP API and the
command line. Nothing lost (cancel keeps the last completed step, no silent overwrite, outputs
checked before any model work), the input folder as a boundary, one bad file never takes a node
down, and misuse refused with a named, early error."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from productscene.errors import ProductSceneError
from productscene.library import TokenLibrary
from productscene.train.engine import read_checkpoint_info
from devkit.comfy_env import COMFYUI_DIR, REPO_ROOT
from tests.support.cli_progress import read_until_step
from tests.test_workflows import _link_into

TRAIN_API = REPO_ROOT / "workflows" / "api" / "category_library_training.json"


def _cutouts(root: Path, size=64):
    g = np.random.default_rng(0)
    for category in ("perfume", "tools"):
        (root / category).mkdir(parents=True)
        for k in range(2):
            a = np.zeros((size, size, 4), np.uint8)
            a[..., :3] = g.integers(0, 255, 3)
            a[16 + 4 * k:44, 12:40] = (220, 220, 220, 255)
            Image.fromarray(a, "RGBA").save(root / category / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def trainer(comfy_server, default_model_files):
    """(server, client, make_prompt(**inputs) -> (prompt, train node id), base folder)."""
    server, client = comfy_server
    ckpt_name = _link_into(server, "checkpoints", Path(default_model_files[0]))
    base = Path(server.base_dir)
    api = json.loads(TRAIN_API.read_text())
    ids = {n["class_type"]: k for k, n in api.items()}
    train = ids["ProductSceneTrainCategoryLibrary"]

    def make(**inputs):
        prompt = json.loads(json.dumps(api))
        prompt[ids["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = ckpt_name
        prompt[train]["inputs"].update(dict(steps=2, resolution=64, batch_size=2, checkpoint_every=0,
                                            resume=False, lora_rank=2), **inputs)
        return prompt, train

    return server, client, make, base


def _failure(client, prompt) -> str:
    pid = client.queue(prompt)
    with pytest.raises(ProductSceneError) as e:
        client.wait(pid, timeout=300)
    return str(e.value)


# -- the input folder is a boundary -----------------------------------------------------------------
def test_data_folder_outside_the_input_folder_is_refused_without_naming_server_paths(trainer, tmp_path):
    server, client, make, base = trainer
    outside = _cutouts(tmp_path / "elsewhere")
    escape = os.path.relpath(outside, base / "input")
    for given in (escape, str(outside), "../../../etc"):
        message = _failure(client, make(data_folder=given, output_name=f"ps_escape_{uuid.uuid4().hex[:6]}")[0])
        assert "data_folder" in message and "outside ComfyUI's input folder" in message, message
        assert str(base) not in message and "PRODUCTSCENE_DATA_ROOTS" in message, message
    assert not list((base / "models" / "category_libraries").glob("ps_escape_*"))


# -- no silent overwrite, outputs checked first ----------------------------------------------------------
def test_training_never_replaces_an_existing_library_from_the_server(trainer):
    server, client, make, base = trainer
    tag = uuid.uuid4().hex[:8]
    _cutouts(base / "input" / f"ps_data_{tag}")
    name = f"ps_keep_{tag}"
    existing = base / "models" / "category_libraries" / f"{name}.safetensors"
    TokenLibrary.write(str(existing), ["marble"], {"clip_l": torch.zeros(1, 1, 768)}, "sd15")
    before = existing.read_bytes()
    message = _failure(client, make(data_folder=f"ps_data_{tag}", output_name=name)[0])
    assert "output_name" in message and "already exists" in message and "resume" in message, message
    assert existing.read_bytes() == before
    assert str(base) not in message


# -- cancel from the UI keeps the last completed step ----------------------------------------------------
def test_interrupt_inside_a_step_keeps_the_last_completed_step_and_resume_matches(trainer):
    """/interrupt lands inside a step (every ComfyUI op checks the flag): the state after the last
    completed step is saved, and resuming it ends where an uninterrupted run ends."""
    server, client, make, base = trainer
    tag = uuid.uuid4().hex[:8]
    _cutouts(base / "input" / f"ps_data_{tag}")
    steps = 6
    straight, _ = make(data_folder=f"ps_data_{tag}", output_name=f"ps_straight_{tag}", steps=steps)
    client.wait(client.queue(straight), timeout=600)

    prompt, node = make(data_folder=f"ps_data_{tag}", output_name=f"ps_cancel_{tag}", steps=steps)
    state = base / "user" / "productscene" / "checkpoints" / f"ps_cancel_{tag}.checkpoint.safetensors"
    ws = client.websocket()
    try:
        pid = client.queue(prompt)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            raw = ws.recv()
            msg = json.loads(raw) if isinstance(raw, str) else {}
            data = msg.get("data") or {}
            if msg.get("type") == "progress" and data.get("max") == steps and data.get("value", 0) >= 2:
                client.interrupt()  # the next op, inside the following step, raises
                break
    finally:
        ws.close()
    with pytest.raises(ProductSceneError, match="interrupted"):
        client.wait(pid, timeout=300)
    assert state.is_file(), "cancel saved no training state"
    info = read_checkpoint_info(state)
    assert 2 <= info["step"] < steps and len(info["history"]) == info["step"]
    assert not (base / "models" / "category_libraries" / f"ps_cancel_{tag}.safetensors").exists()

    resumed, _ = make(data_folder=f"ps_data_{tag}", output_name=f"ps_cancel_{tag}", steps=steps, resume=True)
    client.wait(client.queue(resumed), timeout=600)
    a = TokenLibrary.open(base / "models" / "category_libraries" / f"ps_straight_{tag}.safetensors")
    b = TokenLibrary.open(base / "models" / "category_libraries" / f"ps_cancel_{tag}.safetensors")
    for category in a.names:
        for enc, v in a.vectors(category).items():
            assert torch.allclose(v, b.vectors(category)[enc], atol=1e-5), (category, enc)


# -- the command line -------------------------------------------------------------------------------------
def _cli_env(**extra):
    return dict(os.environ, COMFYUI_PATH=str(COMFYUI_DIR), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **extra)


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "productscene", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=_cli_env(), cwd=REPO_ROOT)


def _train_args(data, checkpoint, out, tmp_path, steps=2):
    return ["train-categories", "--data", data, "--checkpoint", checkpoint, "--out", out, "--steps", steps,
            "--resolution", 64, "--batch-size", 2, "--rank", 2, "--cpu", "--cache-dir", tmp_path / "cache",
            "--checkpoint-every", 0]


def test_cli_out_that_cannot_be_written_is_refused_before_any_model_work(tmp_path, default_model_files):
    data = _cutouts(tmp_path / "data")
    (tmp_path / "afile").write_text("x")
    done = run_cli(*_train_args(data, default_model_files[0], tmp_path / "afile" / "lib.safetensors", tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--out" in done.stderr and "'afile' on its way is a file" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "cache").exists()  # no latent was encoded


def test_cli_never_replaces_an_existing_library_without_overwrite(tmp_path, default_model_files):
    data = _cutouts(tmp_path / "data")
    out = tmp_path / "lib.safetensors"
    TokenLibrary.write(str(out), ["marble"], {"clip_l": torch.zeros(1, 1, 768)}, "sd15")
    before = out.read_bytes()
    done = run_cli(*_train_args(data, default_model_files[0], out, tmp_path))
    assert done.returncode == 2 and "--out" in done.stderr and "already exists" in done.stderr, done.stderr[-2000:]
    assert "--overwrite" in done.stderr and out.read_bytes() == before
    done = run_cli(*_train_args(data, default_model_files[0], out, tmp_path), "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert TokenLibrary.open(out).names == ["perfume", "tools"]


def test_cli_refuses_a_library_given_as_the_model_checkpoint(tmp_path, default_model_files):
    data = _cutouts(tmp_path / "data")
    done = run_cli(*_train_args(data, default_model_files[1], tmp_path / "out.safetensors", tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "checkpoint:" in done.stderr and "category library, not a model" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def _start_training(args, tmp_path, min_step: int):
    """Start the command line; return (process, stderr so far) once training passed ``min_step``."""
    proc = subprocess.Popen([sys.executable, "-m", "productscene", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_cli_env(PRODUCTSCENE_PROGRESS="1"), cwd=REPO_ROOT)
    reached, seen = read_until_step(proc, min_step)
    if reached:
        return proc, seen
    proc.kill()
    raise AssertionError(seen.decode(errors="replace")[-3000:])


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_keeps_the_last_completed_step_and_resume_matches_an_uninterrupted_run(
        tmp_path, default_model_files, presses):
    data = _cutouts(tmp_path / "data")
    ckpt, steps = default_model_files[0], 10
    straight = tmp_path / "straight.safetensors"
    assert run_cli(*_train_args(data, ckpt, straight, tmp_path, steps)).returncode == 0

    out = tmp_path / "cancelled.safetensors"
    proc, _ = _start_training(_train_args(data, ckpt, out, tmp_path, steps), tmp_path, min_step=3)
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    _, err = proc.communicate(timeout=300)
    err = err.decode(errors="replace")
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    state = tmp_path / "cancelled.checkpoint.safetensors"
    info = read_checkpoint_info(state)
    assert 3 <= info["step"] < steps and len(info["history"]) == info["step"]
    assert f"step {info['step']} of {steps} (the last completed step) is saved" in err, err[-2000:]
    assert not out.exists()

    done = run_cli(*_train_args(data, ckpt, out, tmp_path, steps), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = TokenLibrary.open(straight), TokenLibrary.open(out)
    for category in a.names:
        for enc, v in a.vectors(category).items():
            assert torch.allclose(v, b.vectors(category)[enc], atol=1e-5), (category, enc)


# -- one bad file never takes a node down -----------------------------------------------------------------
def _broken_library(path: Path, **bad):
    from safetensors.torch import save_file
    TokenLibrary.write(str(path), ["marble", "wood"], {"clip_l": torch.zeros(2, 1, 768)}, "sd15")
    from productscene.files import read_header, load_tensors
    meta, _ = read_header(path)
    meta.update({k: json.dumps(v) for k, v in bad.items()})
    save_file(load_tensors(path), str(path), metadata=meta)


def test_a_broken_library_is_skipped_and_named_never_taking_the_node_down(comfy_server, tmp_path):
    server, client = comfy_server
    folder = Path(server.base_dir) / "models" / "category_libraries"
    folder.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:6]
    good = folder / f"ps_good_{tag}.safetensors"
    TokenLibrary.write(str(good), ["velvet"], {"clip_l": torch.zeros(1, 1, 768)}, "sd15")
    broken = {f"ps_bad_family_{tag}.safetensors": {"base_family": ["sd15"]},
              f"ps_bad_encoders_{tag}.safetensors": {"encoders": [768]},
              f"ps_bad_names_{tag}.safetensors": {"categories": "marble"},
              f"ps_bad_count_{tag}.safetensors": {"vectors_per_token": "one"}}
    for name, bad in broken.items():
        _broken_library(folder / name, **bad)
    try:
        info = client.object_info("ProductSceneCategoryTokens")  # was HTTP 500
        listed = info["ProductSceneCategoryTokens"]["input"]["required"]["library"]
        listed = listed[0] if isinstance(listed[0], list) else listed[1]["options"]
        assert good.name in listed and not any(n in listed for n in broken), listed
        summary = client.libraries()
        assert good.name in summary and not any(n in summary for n in broken)
        assert client.library_categories(good.name) == ["velvet"]
        log = server.log_tail(400)
        for name in broken:
            assert f"skipping the broken category library {name}" in log, name
    finally:
        for name in (good.name, *broken):
            (folder / name).unlink()


# -- silently wrong results, now said at the node that sees them first ------------------------------------
CATEGORY_API = REPO_ROOT / "workflows" / "api" / "category_background.json"
SAMPLE = REPO_ROOT / "samples" / "products" / "perfume_bottle.png"


@pytest.fixture(scope="module")
def category_graph(comfy_server, default_model_files, tmp_path_factory):
    """(client, prompt(**changes) -> API graph, the uploaded product's RGBA pixels)."""
    server, client = comfy_server
    ckpt, lib = default_model_files
    ckpt_name, lib_name = _link_into(server, "checkpoints", Path(ckpt)), _link_into(server, "category_libraries", Path(lib))
    folder = tmp_path_factory.mktemp("products")
    product = Image.open(SAMPLE).convert("RGBA").resize((96, 96), Image.LANCZOS)
    product.save(folder / "ps_robust_product.png")
    up = client.upload_image(folder / "ps_robust_product.png")
    api = json.loads(CATEGORY_API.read_text())

    def prompt(**changes):
        p = json.loads(json.dumps(api))
        p["1"]["inputs"]["ckpt_name"] = ckpt_name
        p["4"]["inputs"]["library"] = lib_name
        p["2"]["inputs"]["image"] = up["name"]
        p["10"]["inputs"]["steps"] = 1
        for node, inputs in changes.items():
            p[node] = inputs if "class_type" in inputs else {**p[node], "inputs": {**p[node]["inputs"], **inputs}}
        return p

    return client, prompt, np.asarray(product)


def test_lora_strength_nan_is_refused(category_graph):
    client, prompt, _ = category_graph
    message = _failure(client, prompt(**{"6": {"lora_strength": float("nan")}}))
    assert "ProductSceneMaskedCategoryAttention" in message and "lora_strength: expected a number from 0 to 2" in message


def test_grow_latent_px_that_protects_the_whole_latent_is_refused(category_graph):
    client, prompt, _ = category_graph
    message = _failure(client, prompt(**{"6": {"grow_latent_px": 16}}))
    assert "grow_latent_px" in message and "covers the whole 12x12 latent" in message, message


def test_loadimage_mask_given_as_a_product_mask_is_called_inverted(category_graph):
    client, prompt, _ = category_graph
    message = _failure(client, prompt(**{"3": {"source": "mask"}}))
    assert "ProductSceneProductMask" in message and "inverted mask" in message and "loadimage_mask" in message, message


def test_feather_that_leaves_no_background_is_named_at_product_mask(category_graph):
    client, prompt, _ = category_graph
    message = _failure(client, prompt(**{"3": {"feather_px": 256}}))
    assert "ProductSceneProductMask" in message and "feather_px" in message and "inverted" not in message, message


def test_image_sides_not_multiples_of_8_are_said_at_product_mask(comfy_server, category_graph, tmp_path):
    _, client = comfy_server
    _, prompt, _ = category_graph
    Image.open(SAMPLE).convert("RGBA").resize((100, 130)).save(tmp_path / "ps_robust_odd.png")
    up = client.upload_image(tmp_path / "ps_robust_odd.png")
    message = _failure(client, prompt(**{"2": {"image": up["name"]}}))
    assert "ProductSceneProductMask" in message and "multiples of 8" in message and "100x130" in message, message


def _mask_graph(prompt, composite_mask):
    """LoadImage -> (soft product mask) -> Product Composite(original, inverted original) -> SaveImage."""
    p = prompt()
    graph = {k: p[k] for k in ("2",)}
    graph["20"] = {"class_type": "InvertMask", "inputs": {"mask": ["2", 1]}}
    graph["21"] = {"class_type": "SolidMask", "inputs": {"value": 0.6, "width": 96, "height": 96}}
    graph["22"] = {"class_type": "MaskComposite", "inputs": {"destination": ["20", 0], "source": ["21", 0], "x": 0,
                                                              "y": 0, "operation": "multiply"}}
    graph["23"] = {"class_type": "ProductSceneProductMask", "inputs": {**p["3"]["inputs"], "image": ["2", 0],
                                                                        "source": "mask", "mask": ["22", 0]}}
    graph["24"] = {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}}
    graph["25"] = {"class_type": "ProductSceneComposite", "inputs": {"original": ["2", 0], "generated": ["24", 0],
                                                                      "product_mask": composite_mask, "feather_px": 0}}
    graph["26"] = {"class_type": "SaveImage", "inputs": {"images": ["25", 0], "filename_prefix": "ps_robust/soft"}}
    return graph


def test_a_soft_product_mask_keeps_product_pixels_bit_identical(category_graph):
    client, prompt, rgba = category_graph
    pid = client.queue(_mask_graph(prompt, ["23", 0]))  # through Product Mask: product pixels become 1
    client.wait(pid, timeout=300)
    out = np.asarray(Image.open(__import__("io").BytesIO(client.download(client.outputs(pid, "26")[0]))))[..., :3]
    product = rgba[..., 3] / 255.0 * 0.6 >= 0.5
    assert product.sum() > 100
    assert np.array_equal(out[product], rgba[..., :3][product])
    # wired straight to the composite, a mask with no pixel at 1 is refused, not blended
    message = _failure(client, _mask_graph(prompt, ["22", 0]))
    assert "ProductSceneComposite" in message and "product_mask: no pixel is exactly 1" in message, message


# -- graph misuse (the gate's fingerprint of its own conditioning, checked before the first step) ---------
@pytest.mark.parametrize("misuse", ["tokens_of_another_node", "concatenated", "on_the_negative"])
def test_graph_misuse_is_refused_before_sampling(category_graph, misuse):
    client, prompt, _ = category_graph
    other = {"class_type": "ProductSceneCategoryTokens",
             "inputs": {**prompt()["4"]["inputs"], "category": "tools", "clip": ["1", 1]}}
    changes = {}
    if misuse == "tokens_of_another_node":  # the sampler gets node 4's prompt, the gate node 30's tokens
        changes = {"30": other, "6": {"category_tokens": ["30", 1]}}
    elif misuse == "concatenated":
        changes = {"31": {"class_type": "ConditioningConcat",
                          "inputs": {"conditioning_to": ["4", 0], "conditioning_from": ["5", 0]}},
                   "10": {"positive": ["31", 0]}}
    elif misuse == "on_the_negative":
        changes = {"10": {"positive": ["5", 0], "negative": ["4", 0]}}
    message = _failure(client, prompt(**changes))
    assert "category_tokens: the positive conditioning reaching the sampler is not the prompt" in message, message
