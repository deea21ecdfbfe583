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
from productscene.library import CategoryLibrary
from productscene.train.engine import read_checkpoint_info
from tests.support.comfy_env import COMFYUI_DIR, REPO_ROOT

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


def _link_into(server, folder: str, path: Path) -> str:
    dst = Path(server.base_dir) / "models" / folder / path.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(path, dst)
    return path.name


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
    CategoryLibrary.write(str(existing), ["marble"], {"clip_l": torch.zeros(1, 1, 768)}, "sd15")
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
    a = CategoryLibrary.open(base / "models" / "category_libraries" / f"ps_straight_{tag}.safetensors")
    b = CategoryLibrary.open(base / "models" / "category_libraries" / f"ps_cancel_{tag}.safetensors")
    for category in a.names:
        for enc, v in a.vectors(category).items():
            assert torch.allclose(v, b.vectors(category)[enc], atol=1e-5), (category, enc)
