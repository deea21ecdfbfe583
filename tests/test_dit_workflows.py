"""The Flux.1 and Z-Image category-background workflows (workflows/api/category_background_flux.json,
category_background_z_image.json) through a real ComfyUI server, run AS SHIPPED: the loaders
(UNETLoader, DualCLIPLoader / CLIPLoader, VAELoader), their file names (flux1-dev.safetensors,
clip_l.safetensors + t5xxl_fp16.safetensors, z_image_turbo_bf16.safetensors, qwen_3_4b.safetensors,
ae.safetensors) and the family's sampler settings are the file's; the test binds only the product,
the category, the seed and the step count (2, to keep the CPU run short).

How tiny files go through ComfyUI's loaders: ComfyUI's detection fixes the real widths (Flux: heads
of 128, 24 of them on 0.3.75 whatever img_in holds; Z-Image: recognised at width 3840 only) and builds T5-XXL and
Qwen3-4B from fixed configs (4.7B / 4B parameters), so neither the real sizes (many GB, minutes per
step on CPU; a 3072-wide one-block Flux alone is a ~1 GB file) nor small files unchanged can run
here. devkit/dit_files.py writes the tiny files (ComfyUI's own classes, devkit/dit_models.py and
devkit/dit_text.py) with their small config in the safetensors metadata
(``productscene.devkit.tiny_config``); this test's server also loads devkit/tiny_dit_loaders, a
TEST-ONLY custom node folder (never in the pack) whose import makes ComfyUI's UNet detection and
CLIP loader honour that marker, for marked files only. The VAE needs no help: a full-size VAE of
Flux's ``ae`` layout (random weights) is detected by its keys. Everything else is ComfyUI's own
code: the nodes, the tokenizers, the encoders, sampling.

Evidence: every product pixel of the output equals the input's (bit-identical), the background is
generated anew, and two categories give two backgrounds. The shim itself: a marked file gets its
config, an unmarked one goes to ComfyUI's own function unchanged (and the unmarked VAE loads in
the same server)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devkit import comfy_env, dit_files
from tests.test_workflows import ROOT, SAMPLE, _run, _upload

pytestmark = pytest.mark.host

API = {"flux": ROOT / "workflows" / "api" / "category_background_flux.json",
       "z_image": ROOT / "workflows" / "api" / "category_background_z_image.json"}
LOADERS = ROOT / "devkit" / "tiny_dit_loaders"


@pytest.fixture(scope="module")
def dit_model_files():
    """The tiny files of both families, built once and cached (.cache/productscene/dit-files-<v>/)."""
    dit_files.ensure(log=lambda *_: None)
    return {family: dit_files.files(family) for family in dit_files.FAMILIES}


@pytest.fixture(scope="module")
def dit_server(dit_model_files):
    """A real ComfyUI server with the pack, the test-only loader shim and both families' files."""
    from devkit.launcher import ComfyServer
    from tests.conftest import TORCH_THREADS

    models: dict[str, list] = {}
    for per_family in dit_model_files.values():
        for folder, paths in per_family.items():
            models.setdefault(folder, [])
            models[folder] += [p for p in paths if p not in models[folder]]
    threads = str(TORCH_THREADS)
    with ComfyServer(comfy_env.COMFYUI_DIR, models=models, extra_custom_nodes=[LOADERS],
                     cpu=True if comfy_env.FORCE_CPU else None,
                     env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}) as server:
        yield server, server.client()


def test_shipped_file_names_are_the_tiny_files_names(dit_model_files):
    """The test runs the workflows' own file names: the tiny files carry them."""
    for family, api_path in API.items():
        api = json.loads(api_path.read_text())
        names = {v for n in api.values() for k, v in n["inputs"].items()
                 if k in ("unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name", "library")}
        have = {p.name for paths in dit_model_files[family].values() for p in paths}
        assert names == have, family


@pytest.mark.parametrize("family", list(API))
def test_dit_workflow_end_to_end(dit_server, family, tmp_path):
    server, client = dit_server
    product = Image.open(SAMPLE).convert("RGBA").resize((96, 96), Image.LANCZOS)
    uploaded = _upload(client, product, tmp_path / f"ps_test_{family}_product.png")
    rgba = np.asarray(product)
    rgb, inside, outside = rgba[..., :3], rgba[..., 3] == 255, rgba[..., 3] == 0
    assert inside.sum() > 100 and outside.sum() > 100

    api = json.loads(API[family].read_text())
    results = {c: _run(client, api, {"product": uploaded, "category": c, "Sampler.steps": 2, "seed": 7})
               for c in ("perfume", "tools")}
    for category, out in results.items():
        assert out.shape == rgb.shape, category
        assert np.array_equal(out[inside], rgb[inside]), f"{family}/{category}: product pixels changed"
        changed = (out[outside] != rgb[outside]).any(-1).mean()
        assert changed > 0.5, f"{family}/{category}: only {changed:.0%} of the background changed"
    a, b = results["perfume"], results["tools"]
    assert (a[outside] != b[outside]).any(-1).mean() > 0.1, f"{family}: two categories gave one background"
    assert np.array_equal(a[inside], b[inside])


def test_loader_shim_teaches_marked_files_only(dit_model_files, monkeypatch):
    """ComfyUI's own detection fixes the real widths (why the shim exists); the shim gives a marked
    file its own config and family class and hands an unmarked one to ComfyUI's function as is.
    Called directly here (``devkit.tiny_dit_loaders`` installs nothing when imported by the tests)."""
    import comfy.model_detection
    import comfy.sd
    import comfy.utils
    from devkit import dit_text, tiny_dit_loaders as shim

    assert comfy.model_detection.model_config_from_unet is not shim.model_config_from_unet  # not installed here
    for family, cls, width in (("flux", "Flux", ("hidden_size", 64)), ("z_image", "ZImage", ("dim", 256))):
        sd, meta = comfy.utils.load_torch_file(str(dit_model_files[family]["diffusion_models"][0]), return_metadata=True)
        own = comfy.model_detection.model_config_from_unet(sd, "", metadata=meta)
        mine = shim.model_config_from_unet(sd, "", metadata=meta)
        plain = shim.model_config_from_unet(sd, "", metadata={k: v for k, v in meta.items() if k != shim.MARKER})
        assert type(mine).__name__ == cls and mine.unet_config[width[0]] == width[1], family
        assert type(plain) is type(own) and plain.unet_config == own.unet_config, family
        if family == "flux":  # heads 128 wide whatever the file holds (0.3.75: always 24 of them; 0.33: width // 128)
            assert sum(own.unet_config["axes_dim"]) == 128 and own.unet_config["num_heads"] != 2
            assert mine.unet_config["num_heads"] == 2 and sum(mine.unet_config["axes_dim"]) == 32
        else:  # recognised as Z-Image only at width 3840
            assert type(own).__name__ != "ZImage"

    seen = []
    monkeypatch.setattr(shim, "_load_clip", lambda paths, *a, **kw: seen.append(kw.get("model_options")))
    vae = dit_model_files["flux"]["vae"][0]
    shim.load_clip([*dit_model_files["flux"]["text_encoders"], vae], clip_type=comfy.sd.CLIPType.FLUX,
                   model_options={"dtype": "kept"})
    shim.load_clip([vae], clip_type=comfy.sd.CLIPType.FLUX, model_options={"dtype": "kept"})
    assert seen == [{"dtype": "kept", **dit_text.FLUX_OPTIONS}, {"dtype": "kept"}]


def test_demo_picks_the_workflow_by_the_detected_family(dit_model_files, default_model_files, tmp_path, capsys):
    """scripts/demo.py reads a model file's weight names (header only, no model loads) and runs the
    family's workflow: the tiny files and the default SD checkpoint, and small fake key sets for
    what no file here holds (Flux.1 schnell, Flux.2, a checkpoint with the text encoder inside)."""
    from scripts import demo
    from productscene.files import save_safetensors_atomic
    import torch

    assert demo.family_of_model_file(dit_model_files["flux"]["diffusion_models"][0]) == "flux"
    assert demo.family_of_model_file(dit_model_files["z_image"]["diffusion_models"][0]) == "z_image"
    assert demo.family_of_model_file(Path(default_model_files[0])) == "sd"
    for family in ("sd", "flux", "z_image"):
        assert json.loads(demo.FAMILY_WORKFLOWS[family].read_text())  # the shipped twin
    assert demo.FAMILY_WORKFLOWS["flux"] == API["flux"] and demo.FAMILY_WORKFLOWS["z_image"] == API["z_image"]
    # the settings the demo binds by title exist in the family's workflow
    from productscene.graph import target
    for family, inputs in demo.TEXT_ENCODER_INPUTS.items():
        api = json.loads(demo.FAMILY_WORKFLOWS[family].read_text())
        for key in (*inputs, "Diffusion model.unet_name", "VAE.vae_name", "Category prompt.library",
                    "Sampler.steps", "Sampler.cfg"):
            target(api, key)
    assert (demo.FAMILY_SETTINGS["flux"], demo.FAMILY_SETTINGS["z_image"]) == ({"steps": 20, "cfg": 1.0},
                                                                                 {"steps": 8, "cfg": 1.0})

    flux = {"img_in.weight": (3072, 64), "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
            "guidance_in.in_layer.weight": (3072, 256)}
    assert demo.family_of_keys(flux) == "flux"
    assert demo.family_of_keys({k: v for k, v in flux.items() if not k.startswith("guidance")}) == "flux_schnell"
    assert demo.family_of_keys({f"model.diffusion_model.{k}": v for k, v in flux.items()}) == "flux"
    assert demo.family_of_keys({**flux, "double_stream_modulation_img.lin.weight": (1,)}) is None  # Flux.2
    assert demo.family_of_keys({"cap_embedder.1.weight": (3840, 2560), "cap_pad_token": (3840,)}) == "z_image"
    assert demo.family_of_keys({"cap_embedder.1.weight": (2304, 2304)}) is None  # Lumina 2
    assert demo.family_of_keys({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}) == "sd"

    allinone = tmp_path / "flux1-dev-fp8.safetensors"
    save_safetensors_atomic({f"model.diffusion_model.{k}": torch.zeros(1) for k in flux}
                            | {"text_encoders.t5xxl.x": torch.zeros(1)}, allinone)
    with pytest.raises(demo.DemoError, match="separate"):
        demo.family_of_model_file(allinone)
    other = tmp_path / "other.safetensors"
    save_safetensors_atomic({"foo.weight": torch.zeros(1)}, other)
    with pytest.raises(demo.DemoError, match="neither"):
        demo.family_of_model_file(other)
    # a DiT model without its text encoders: the demo says what to give before starting anything
    assert demo.main(["--checkpoint", str(dit_model_files["z_image"]["diffusion_models"][0]),
                      "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is a z_image diffusion model" in err and "qwen_3_4b.safetensors" in err, err


def test_launcher_links_extra_custom_node_folders(tmp_path):
    """``ComfyServer(extra_custom_nodes=...)``: each folder linked into custom_nodes/ under its own
    name beside the pack; a folder that is no custom node (no __init__.py) is refused up front."""
    from devkit.launcher import ComfyServer
    from productscene.errors import ProductSceneError

    server = ComfyServer(comfy_env.COMFYUI_DIR, extra_custom_nodes=[LOADERS], base_dir=tmp_path / "base")
    server._prepare()
    nodes = tmp_path / "base" / "custom_nodes"
    assert (nodes / "tiny_dit_loaders").resolve() == LOADERS
    assert (nodes / "productscene_pack_under_test").resolve() == comfy_env.REPO_ROOT
    with pytest.raises(ProductSceneError, match="extra_custom_nodes"):
        ComfyServer(comfy_env.COMFYUI_DIR, extra_custom_nodes=[tmp_path])
