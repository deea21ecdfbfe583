"""Session setup for every test: the real ComfyUI importable in-process (CPU, private base dir,
quiet), and the shared fixtures.

Fixtures (all built lazily, on first use):
  sd15, sd2, sdxl      (session) tests.support.models.TinyModels: real ComfyUI ModelPatcher / CLIP / VAE
  mock_patcher         (function) tests.support.mock_patcher.MockModelPatcher, SD1.5 layout
  pack                 (session) the repo imported as a ComfyUI pack package (comfy_env.import_pack())
  comfy_nodes          (session) ComfyUI's ``nodes`` module (core nodes)
  comfy_server         (session) (ComfyServer, ComfyClient): a real ComfyUI server process with this
                       pack in custom_nodes/productscene_pack_under_test (about 10-15 s to start)
  default_model_files  (session) (checkpoint, library) of the demo's random-weight default model
  world                (session) scripts/world_model.World: the small synthetic world and its
                       PRETRAINED base model (.checkpoint, .data, .categories, .meta), built once
                       and cached in .cache/productscene/world-<version>/ (minutes, first run only)
  world_models         (session) (model, clip, vae) of the world base through ComfyUI's loader
                       (fast text encoder; shared: clone before patching)
"""
from tests.support import comfy_env  # noqa: F401  (first: sys.path, CPU, private base dir)
from tests.support.scripts import load_script

import os

import pytest
import torch

# One intra-op thread by default: on the shared 2-core dev machines torch's thread pool under
# oversubscription makes every small op wait for a scheduler slice (measured: a 2-step tiny-UNet
# sample 0.1 s with 1 thread vs 12 s with 2 threads under load). PRODUCTSCENE_TORCH_THREADS overrides.
TORCH_THREADS = int(os.environ.get("PRODUCTSCENE_TORCH_THREADS", "1"))
torch.set_num_threads(TORCH_THREADS)


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", r"ignore:builtin type [sS]wig:DeprecationWarning")


@pytest.fixture(scope="session")
def sd15():
    from tests.support.models import tiny_sd15
    return tiny_sd15()


@pytest.fixture(scope="session")
def sd2():
    from tests.support.models import tiny_sd2
    return tiny_sd2()


@pytest.fixture(scope="session")
def sdxl():
    from tests.support.models import tiny_sdxl
    return tiny_sdxl()


@pytest.fixture
def mock_patcher():
    from tests.support.mock_patcher import MockModelPatcher
    return MockModelPatcher("sd15")


@pytest.fixture(scope="session")
def pack():
    return comfy_env.import_pack()


@pytest.fixture(scope="session")
def comfy_nodes():
    return comfy_env.import_comfy_nodes()


@pytest.fixture(scope="session")
def comfy_server():
    from productscene.launcher import ComfyServer

    threads = str(TORCH_THREADS)
    with ComfyServer(comfy_env.COMFYUI_DIR, env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}) as server:
        yield server, server.client()


@pytest.fixture(scope="session")
def default_model_files():
    """(checkpoint, library) of the demo's embedded default model, built once and cached in
    .cache/productscene (scripts/default_model.py): a detectable SD1.5 checkpoint, random weights."""
    return load_script("default_model").ensure_defaults(log=lambda *_: None)


@pytest.fixture(scope="session")
def world(pack):
    """The world base (scripts/world_model.py): ``.checkpoint`` (an SD1.5-family checkpoint that
    CheckpointLoaderSimple loads), ``.data`` (BG60k layout: split "train" = bg60k_*, held-out split
    "test" = bg1k_*, RGBA mask cut-outs in <split>_masks/), ``.categories``."""
    import importlib

    host_adapter = importlib.import_module(pack.__name__ + ".nodes.training_host")
    return load_script("world_model").ensure_world(host_adapter=host_adapter, log=print)


@pytest.fixture(scope="session")
def world_models(world):
    return load_script("world_model").load_world_base(world.checkpoint)
