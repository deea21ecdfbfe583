"""What the pack promises about its ComfyUI hosts, checked on every host scripts/test.sh tests:

- inputs given to the launcher reach LoadImage through the server (copied into input/: ComfyUI 0.33
  refuses an input whose real path lies outside the input folder, so a symlink fails there);
- the launcher passes ``--cpu`` only when the machine has no usable GPU, unless told otherwise;
- the default model follows ``PRODUCTSCENE_COMFYUI`` and never quietly uses another ComfyUI tree;
- pyproject.toml's ``requires-comfyui`` range holds this host, and its ``comfy-api`` version is the
  one the pack imports and this host offers."""
from __future__ import annotations

import importlib
import io
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from PIL import Image

from devkit import launcher
from devkit.launcher import ComfyServer
from devkit import comfy_env

pytestmark = pytest.mark.host

ROOT = comfy_env.REPO_ROOT
SAMPLE = ROOT / "samples" / "products" / "perfume_bottle.png"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# ----------------------------------------------------------------------------- launcher inputs

def test_an_input_given_to_the_launcher_reaches_loadimage_through_the_server(comfy_server):
    server, client = comfy_server
    placed = Path(server.base_dir) / "input" / SAMPLE.name
    assert placed.is_file() and not placed.is_symlink(), "the launcher must copy inputs, not link them"
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": SAMPLE.name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ps_test_input"}},
    }
    pid = client.queue(prompt)
    client.wait(pid, timeout=120)
    images = client.outputs(pid, "2")
    assert len(images) == 1, images
    saved = np.asarray(Image.open(io.BytesIO(client.download(images[0]))).convert("RGB"))
    assert np.array_equal(saved, np.asarray(Image.open(SAMPLE).convert("RGB")))


# ----------------------------------------------------------------------------- launcher device

def test_launcher_uses_the_cpu_only_without_a_gpu_and_an_explicit_choice_wins(monkeypatch, tmp_path):
    def has_cpu_flag(**kwargs) -> bool:
        server = ComfyServer(comfy_env.COMFYUI_DIR, base_dir=tmp_path, **kwargs)
        server.port = 1
        return "--cpu" in server.command()

    monkeypatch.setattr(launcher, "gpu_usable", lambda *a, **k: False)
    assert has_cpu_flag()
    assert not has_cpu_flag(cpu=False)
    monkeypatch.setattr(launcher, "gpu_usable", lambda *a, **k: True)
    assert not has_cpu_flag()
    assert has_cpu_flag(cpu=True)


def test_gpu_detection_asks_the_servers_python(tmp_path):
    has_gpu = torch.cuda.is_available()
    assert launcher.gpu_usable() is has_gpu  # this interpreter, torch already loaded
    # another interpreter is asked in a subprocess (a wrapper around this one, so the answer is known)
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    assert launcher.gpu_usable(str(wrapper)) is has_gpu
    # it must say so when that interpreter hides the GPU, and when it cannot run at all
    assert launcher.gpu_usable(str(wrapper), env={"CUDA_VISIBLE_DEVICES": ""}) is False
    assert launcher.gpu_usable(str(tmp_path / "no-such-python")) is False


# ----------------------------------------------------------------------------- the default model

def _dev_kit(code: str, env: dict, cwd=ROOT) -> subprocess.CompletedProcess:
    """``code`` run in a fresh interpreter of this host, with the repository root importable."""
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT), **env), cwd=cwd,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_dev_kit_follows_productscene_comfyui(tmp_path):
    show = "from devkit import paths; print(paths.COMFYUI_DIR)"
    r = _dev_kit(show, {"PRODUCTSCENE_COMFYUI": str(comfy_env.COMFYUI_DIR), "COMFYUI_PATH": str(tmp_path)})
    assert r.stdout.strip() == str(comfy_env.COMFYUI_DIR), r.stderr
    env = {k: v for k, v in os.environ.items() if k != "PRODUCTSCENE_COMFYUI"}
    r = subprocess.run([sys.executable, "-c", show], env=dict(env, PYTHONPATH=str(ROOT), COMFYUI_PATH=str(tmp_path)),
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.stdout.strip() == str(tmp_path.resolve()), r.stderr  # the command line's variable, second

    # another ComfyUI tree while this one is imported: refused, nothing built
    other = tmp_path / "OtherComfyUI"
    (other / "comfy").mkdir(parents=True)
    (other / "main.py").write_text("")
    code = (f"import sys; sys.path.insert(0, {str(comfy_env.COMFYUI_DIR)!r}); import comfy\n"
            f"from devkit.default_model import ensure_default_model\n"
            f"ensure_default_model(cache_dir={str(tmp_path / 'cache')!r})")
    r = _dev_kit(code, {"PRODUCTSCENE_COMFYUI": str(other)})
    assert r.returncode != 0 and str(other.resolve()) in r.stderr and str(comfy_env.COMFYUI_DIR) in r.stderr, r.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_default_model_command_names_a_missing_tree(tmp_path):
    missing = tmp_path / "no-comfyui"
    r = subprocess.run([sys.executable, "-m", "devkit.default_model", "--cache-dir", str(tmp_path / "cache"),
                        "--no-verify"], env=dict(os.environ, PRODUCTSCENE_COMFYUI=str(missing)), cwd=ROOT,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert str(missing) in r.stderr and "PRODUCTSCENE_COMFYUI" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# ----------------------------------------------------------------------------- pyproject.toml

def test_requires_comfyui_holds_this_host():
    spec = SpecifierSet(PYPROJECT["tool"]["comfy"]["requires-comfyui"])
    assert Version(comfy_env.COMFYUI_VERSION) in spec, \
        f"ComfyUI {comfy_env.COMFYUI_VERSION} is tested but pyproject.toml says requires-comfyui {spec}"


def test_the_pack_imports_the_comfy_api_version_pyproject_states_and_the_host_offers_it():
    version = PYPROJECT["tool"]["productscene"]["comfy-api"]
    module = "v" + version.replace(".", "_")
    sources = [ROOT / "__init__.py", *sorted((ROOT / "nodes").glob("*.py"))]
    used = {m for path in sources for m in re.findall(r"comfy_api\.(v\d+_\d+_\d+|latest)\b", path.read_text())}
    assert used == {module}, f"the pack imports comfy_api {sorted(used)}, pyproject.toml says {module}"
    from comfy_api.version_list import supported_versions
    assert version in {getattr(v, "VERSION", None) for v in supported_versions}
    assert importlib.import_module(f"comfy_api.{module}").io.ComfyNode
