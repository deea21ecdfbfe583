"""Session setup for every test: the real ComfyUI importable in-process (CPU, private base dir,
quiet), and the shared fixtures.

Fixtures (all built lazily, on first use):
  sd15, sd2, sdxl      (session) devkit.models.TinyModels: real ComfyUI ModelPatcher / CLIP / VAE
  mock_patcher         (function) tests.support.mock_patcher.MockModelPatcher, SD1.5 layout
  pack                 (session) the repo imported as a ComfyUI pack package (comfy_env.import_pack())
  comfy_nodes          (session) ComfyUI's ``nodes`` module (core nodes)
  comfy_server         (session) (ComfyServer, ComfyClient): a real ComfyUI server process with this
                       pack in custom_nodes/productscene_pack_under_test and the sample products
                       (samples/products/*.png) in its input folder (about 10-15 s to start)
  default_model_files  (session) the demo's default checkpoint and library, cached in .cache/
  reference_model_files (session) the demo's default CLIP vision model (random-weight ViT-L/14 shape,
                       which ComfyUI's CLIPVisionLoader detects) and untrained personality adapter
  world                (session) devkit.world_model.World: the small synthetic world and its
                       PRETRAINED base model (.checkpoint, .data, .categories, .meta), built once
                       and cached in .cache/productscene/world-<version>/ (minutes, first run only)
  world_models         (session) (model, clip, vae) of the world base through ComfyUI's loader
                       (fast text encoder; shared: clone before patching)

Host-level tests: every test that uses one of HOST_FIXTURES, every test in a module that imports
ComfyUI's own modules (comfy, nodes, comfy_api, ...), and every test marked ``pytest.mark.host`` (a
module that reaches ComfyUI some other way, e.g. its own ComfyServer or a subprocess, puts
``pytestmark = pytest.mark.host`` at its top). scripts/test.sh runs the whole suite on the first
host and the host-level tests on the second (PRODUCTSCENE_HOST_TESTS_ONLY=1 selects them), except
the learning proofs (``pytest.mark.learning``: they measure an algorithm on the world base, which
the second host's trainer tests already run; once is enough and keeps CI under 30 minutes).
"""
from devkit import comfy_env  # noqa: F401  (first: sys.path, CPU, private base dir)
from devkit import default_model, world_model

import os
import sys
import types
from pathlib import Path

import pytest
import torch

# One intra-op thread by default: on the shared 2-core dev machines torch's thread pool under
# oversubscription makes every small op wait for a scheduler slice (measured: a 2-step tiny-UNet
# sample 0.1 s with 1 thread vs 12 s with 2 threads under load). PRODUCTSCENE_TORCH_THREADS overrides.
TORCH_THREADS = int(os.environ.get("PRODUCTSCENE_TORCH_THREADS", "1"))
torch.set_num_threads(TORCH_THREADS)


# Fixtures that hand a test ComfyUI's own code (models, nodes, the loader, a server): a test that
# uses one of them (directly or through another fixture) is host-level. Add new ones here.
HOST_FIXTURES = frozenset({"sd15", "sd2", "sdxl", "pack", "comfy_nodes", "comfy_server", "default_model_files",
                           "reference_model_files"})
HOST_TESTS_ONLY = os.environ.get("PRODUCTSCENE_HOST_TESTS_ONLY", "") in ("1", "true", "yes")
HOST_LABEL = f"ComfyUI {comfy_env.COMFYUI_VERSION}"


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", r"ignore:builtin type [sS]wig:DeprecationWarning")
    config.addinivalue_line("markers", "host: a host-level test (runs on every ComfyUI host scripts/test.sh tests)")
    config.addinivalue_line("markers", "learning: a learning proof on the world base; it measures the algorithm, "
                                       "not the host, so it runs on the first host only")


def pytest_report_header(config):
    scope = "host-level tests only" if HOST_TESTS_ONLY else "all tests"
    return f"host: {HOST_LABEL} at {comfy_env.COMFYUI_DIR} (python {sys.executable}; {scope})"


def _imports_comfyui(module) -> bool:
    """Whether a test module holds one of ComfyUI's own modules (``import comfy.sd``, ``import nodes``)."""
    for value in vars(module).values():
        where = getattr(value, "__path__", None) or [getattr(value, "__file__", None) or ""]
        if isinstance(value, types.ModuleType) and any(
                p and Path(p).resolve().is_relative_to(comfy_env.COMFYUI_DIR) for p in where):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    comfy_modules = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module not in comfy_modules:
            comfy_modules[module] = _imports_comfyui(module)
        if HOST_FIXTURES.intersection(getattr(item, "fixturenames", ())) or comfy_modules.get(module):
            item.add_marker(pytest.mark.host)
    if HOST_TESTS_ONLY:
        keep = [i for i in items if i.get_closest_marker("host") and not i.get_closest_marker("learning")]
        dropped = [i for i in items if i not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line that says which host these results came from (scripts/test.sh collects them)."""
    if config.option.collectonly:
        return
    counts = {k: len(terminalreporter.stats.get(k, [])) for k in ("passed", "failed", "error", "skipped")}
    scope = "host-level tests" if HOST_TESTS_ONLY else "all tests"
    terminalreporter.write_line(
        f"[{HOST_LABEL}] {scope}: {counts['passed']} passed, {counts['failed'] + counts['error']} failed, "
        f"{counts['skipped']} skipped")


@pytest.fixture(scope="session")
def sd15():
    from devkit.models import tiny_sd15
    return tiny_sd15()


@pytest.fixture(scope="session")
def sd2():
    from devkit.models import tiny_sd2
    return tiny_sd2()


@pytest.fixture(scope="session")
def sdxl():
    from devkit.models import tiny_sdxl
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
    from devkit.launcher import ComfyServer

    threads = str(TORCH_THREADS)
    inputs = sorted((comfy_env.REPO_ROOT / "samples" / "products").glob("*.png"))
    with ComfyServer(comfy_env.COMFYUI_DIR, inputs=inputs, cpu=True if comfy_env.FORCE_CPU else None,
                     env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}) as server:
        yield server, server.client()


@pytest.fixture(scope="session")
def default_model_files():
    """(checkpoint, library) of the demo's embedded default model, built once and cached in
    .cache/productscene (devkit/default_model.py): a detectable SD1.5 checkpoint, random weights."""
    return default_model.ensure_defaults(log=lambda *_: None)


@pytest.fixture(scope="session")
def reference_model_files(default_model_files):
    """(CLIP vision model, personality adapter) of the demo's brand-reference workflow, built once and
    cached in .cache/productscene (devkit/default_model.py): random weights, an untrained adapter."""
    return default_model.ensure_reference_defaults(default_model_files[0], log=lambda *_: None)


@pytest.fixture(scope="session")
def world(pack):
    """The world base (devkit/world_model.py): ``.checkpoint`` (an SD1.5-family checkpoint that
    CheckpointLoaderSimple loads), ``.data`` (BG60k layout: split "train" = bg60k_*, held-out split
    "test" = bg1k_*, RGBA mask cut-outs in <split>_masks/), ``.categories``."""
    import importlib

    host_adapter = importlib.import_module(pack.__name__ + ".nodes.training_host")
    return world_model.ensure_world(host_adapter=host_adapter, log=print)


@pytest.fixture(scope="session")
def world_models(world):
    return world_model.load_world_base(world.checkpoint)


# -- the DiT world base (issue 26) ---------------------------------------------------------------
@pytest.fixture(scope="session")
def dit_world(pack):
    """The DiT world base (devkit/dit_world.py): ``.checkpoint`` (a tiny Flux.1 pretrained on the
    world, with its own loader ``dit_world.load_dit_world_base``), ``.data`` (the SD world's data),
    ``.categories``; built once and cached in .cache/productscene/dit-world-<version>/."""
    import importlib
    from devkit import dit_world as dit_world_mod

    host_adapter = importlib.import_module(pack.__name__ + ".nodes.training_host")
    return dit_world_mod.ensure_dit_world(host_adapter=host_adapter, log=print)


@pytest.fixture(scope="session")
def dit_world_models(dit_world):
    """(model, clip, vae) of the DiT world base (shared: clone before patching)."""
    from devkit import dit_world as dit_world_mod
    return dit_world_mod.load_dit_world_base(dit_world.checkpoint)
