"""The harness is real: tiny models are ComfyUI's own classes and run through ComfyUI's sampler;
the mock patcher agrees with the real patcher and UNet layout; the server fixture is a real
ComfyUI that runs core-node graphs end to end."""
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from devkit import comfy_env
from devkit import models as M
from tests.support.mock_patcher import MockModelPatcher, iter_attn2

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models

from productscene.errors import ProductSceneError

FAMILY_CLASS = {"sd15": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20,
                "sdxl": comfy.supported_models.SDXL}


@pytest.fixture(params=["sd15", "sd2", "sdxl"])
def tm(request):
    return request.getfixturevalue(request.param)


def test_comfy_env_is_private_and_on_the_cpu():
    import folder_paths

    assert comfy.model_management.get_torch_device().type == "cpu"
    assert folder_paths.base_path == str(comfy_env.BASE_DIR)
    assert folder_paths.get_output_directory().startswith(str(comfy_env.BASE_DIR))
    assert Path(comfy.sd.__file__).resolve().is_relative_to(comfy_env.COMFYUI_DIR)
    import nodes  # ComfyUI's nodes.py, not the pack's nodes/ package

    assert Path(nodes.__file__).resolve() == comfy_env.COMFYUI_DIR / "nodes.py"


def test_tiny_models_are_comfyui_classes(tm):
    assert isinstance(tm.model, comfy.model_patcher.ModelPatcher)
    assert isinstance(tm.model.model, comfy.model_base.BaseModel)
    assert type(tm.model.model.model_config) is FAMILY_CLASS[tm.family]
    if tm.family == "sdxl":
        assert isinstance(tm.model.model, comfy.model_base.SDXL)
        assert tm.unet_config["adm_in_channels"] == 2816
    assert tm.unet_config["context_dim"] == {"sd15": 768, "sd2": 1024, "sdxl": 2048}[tm.family]
    assert isinstance(tm.clip, comfy.sd.CLIP) and isinstance(tm.vae, comfy.sd.VAE)
    for name, p in tm.model.model.state_dict().items():
        assert torch.isfinite(p).all(), name
    assert all(torch.isfinite(p).all() for p in tm.clip.cond_stage_model.parameters())
    assert comfy_env.import_pack().nodes.host.cross_attention_keys(tm.model)  # has cross attention


def test_builders_are_deterministic():
    a, _ = M.build_unet("sd15", seed=3)
    b, _ = M.build_unet("sd15", seed=3)
    c, _ = M.build_unet("sd15", seed=4)
    sa, sb, sc = (m.model.diffusion_model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].ndim >= 2)


def test_tokenize_and_encode_give_real_shapes(tm):
    tokens = tm.clip.tokenize("a photo of a bottle")
    assert sorted(tokens) == sorted(M.TOKENIZER_KEYS[tm.family])
    for key, chunks in tokens.items():
        ids = [t for t, _w in chunks[0]]
        assert len(ids) == 77 and ids[0] == 49406  # CLIP's start token from the real vocab
        assert ids[6] == 49407  # 5 words, then the end token
    cond, pooled = tm.clip.encode_from_tokens(tokens, return_pooled=True)
    assert cond.shape == (1, 77, M.CONTEXT_DIM[tm.family])
    assert pooled.shape == (1, M.POOLED_DIM[tm.family])
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()
    other, _ = tm.clip.encode_from_tokens(tm.clip.tokenize("a photo of a teapot"), return_pooled=True)
    assert not torch.allclose(cond[0, 5], other[0, 5])  # the word differs, so does its row
    assert torch.allclose(cond[0, :4], other[0, :4], atol=1e-5)  # causal text model: prefix equal


def test_ksampler_runs_and_conditioning_matters(tm):
    pos, neg = M.encode(tm, "a bottle on marble"), M.encode(tm, "blurry")
    a = M.sample(tm, pos, neg, (8, 8), steps=2, seed=1)
    b = M.sample(tm, pos, neg, (8, 8), steps=2, seed=1)
    c = M.sample(tm, M.encode(tm, "a teapot on bamboo"), neg, (8, 8), steps=2, seed=1)
    assert a.shape == (1, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_common_ksampler_and_vae_round_trip(sd15, comfy_nodes):
    latent = {"samples": torch.zeros(1, 4, 16, 8)}
    (out,) = comfy_nodes.common_ksampler(sd15.model, 0, 1, 4.0, "euler", "normal", M.encode(sd15, "x"),
                                         M.encode(sd15, ""), latent)
    assert out["samples"].shape == (1, 4, 16, 8) and torch.isfinite(out["samples"]).all()
    image = sd15.vae.decode(out["samples"])
    assert image.shape == (1, 128, 64, 3)
    assert image.min() >= 0 and image.max() <= 1
    back = sd15.vae.encode(image)
    assert back.shape == (1, 4, 16, 8) and torch.isfinite(back).all()


def test_mock_patcher_layout_matches_comfyui_unet(tm):
    mock = MockModelPatcher(tm.family, unet_config=tm.unet_config)
    assert mock.attn2_keys() == comfy_env.import_pack().nodes.host.cross_attention_keys(tm.model)
    real = {key: (tb.attn2.heads, tb.attn2.dim_head) for key, _, tb in iter_attn2(tm.model.model.diffusion_model)}
    mocked = {key: (tb.attn2.heads, tb.attn2.dim_head) for key, _, tb in iter_attn2(mock.model.diffusion_model)}
    assert mocked == real


def test_mock_patcher_full_layouts():
    assert len(MockModelPatcher("sd15").attn2_keys()) == 16
    assert len(MockModelPatcher("sdxl").attn2_keys()) == 70
    keys = MockModelPatcher("sd15").attn2_keys()
    assert keys[0] == ("input", 1, 0) and ("middle", 0, 0) in keys and keys[-1] == ("output", 11, 0)


def test_mock_patcher_stores_patches_like_the_real_one(sd15, mock_patcher):
    def fn(q, k, v, extra_options):
        return q

    def patch(n, context, value, extra_options):
        return n, context, value

    real, mock = sd15.model.clone(), mock_patcher.clone()
    for p in (real, mock):
        p.set_model_attn2_replace(fn, "input", 1, 0)
        p.set_model_attn2_patch(patch)
        p.add_wrapper_with_key("apply_model", "productscene", fn)
    assert real.model_options["transformer_options"] == mock.model_options["transformer_options"]
    assert "patches_replace" not in sd15.model.model_options["transformer_options"]
    assert mock_patcher.model_options == {"transformer_options": {}}
    assert real.wrappers == mock.wrappers
    assert [m for _, m, _ in mock_patcher.calls] == [
        "clone", "set_model_attn2_replace", "set_model_attn2_patch", "add_wrapper_with_key"]
    assert mock.replaces == {("input", 1, 0): fn}
    grandchild = mock.clone()
    assert grandchild.replaces == {("input", 1, 0): fn} and grandchild.parent is mock
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert key in real.model.state_dict() and key in mock.state_dict_keys()
    assert mock.add_patches({key: ("diff", (torch.zeros(1),)), "nope": None}) == [key]


# ----------------------------------------------------------------------------- server

CORE_NODES = ("KSampler", "CheckpointLoaderSimple", "CLIPTextEncode", "VAEDecode", "SaveImage",
              "LoadImage", "EmptyImage", "EmptyLatentImage")


def test_server_serves_core_nodes(comfy_server):
    server, client = comfy_server
    assert server.running and server.pack_path.is_symlink()
    assert server.pack_path.name != comfy_env.REPO_ROOT.name
    info = client.object_info()
    for name in CORE_NODES:
        assert name in info, name
    assert "seed" in info["KSampler"]["input"]["required"]
    assert client.object_info("SaveImage")["SaveImage"]["output_node"] is True


def test_server_runs_a_core_graph_and_images_come_back(comfy_server):
    _, client = comfy_server
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 72, "height": 40, "batch_size": 1, "color": 0x10A0F0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "harness"}},
    }
    pid = client.queue(prompt)
    entry = client.wait(pid, timeout=60, poll=0.1)
    assert entry["status"]["status_str"] == "success"
    (ref,) = client.outputs(pid)
    assert ref.type == "output" and ref.filename.startswith("harness")
    img = Image.open(io.BytesIO(client.download(ref)))
    assert img.format == "PNG" and img.size == (72, 40)
    assert img.convert("RGB").getpixel((5, 5)) == (0x10, 0xA0, 0xF0)


def test_upload_then_load_image(comfy_server, tmp_path):
    _, client = comfy_server
    src = Image.new("RGBA", (24, 16), (200, 30, 40, 255))
    buf = io.BytesIO()
    src.save(buf, format="PNG")
    up = client.upload_image(buf.getvalue(), "harness_upload.png")
    assert up["name"] == "harness_upload.png" and up["type"] == "input"
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": up["name"]}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "harness_up"}},
    }
    pid = client.queue(prompt)
    client.wait(pid, timeout=60, poll=0.1)
    (ref,) = client.outputs(pid)
    img = Image.open(io.BytesIO(client.download(ref))).convert("RGB")
    assert img.size == (24, 16) and img.getpixel((3, 3)) == (200, 30, 40)


def test_rejected_and_failing_prompts_raise_with_the_server_message(comfy_server):
    _, client = comfy_server
    bad = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "x"}}}
    with pytest.raises(ProductSceneError, match="rejected the prompt"):
        client.queue(bad)
    with pytest.raises(ProductSceneError, match="NoSuchNode"):
        client.queue({"1": {"class_type": "NoSuchNode", "inputs": {}}})
    escaping = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "../../escape"}}}
    pid = client.queue(escaping)
    with pytest.raises(ProductSceneError, match=r"node 2 \(SaveImage\).*outside the output folder"):
        client.wait(pid, timeout=60, poll=0.1)
    with pytest.raises(ProductSceneError, match="no output image"):
        client.download(("does_not_exist.png", "", "output"))


# ----------------------------------------------------------------------------- launcher (no server)

def test_launcher_refuses_bad_setups(tmp_path):
    from devkit.launcher import ComfyServer

    with pytest.raises(ProductSceneError, match="main.py"):
        ComfyServer(tmp_path)
    with pytest.raises(ProductSceneError, match="other than the repo"):
        ComfyServer(comfy_env.COMFYUI_DIR, pack_name=comfy_env.REPO_ROOT.name)


def test_launcher_layout_is_private_and_hides_extra_model_paths(tmp_path):
    from devkit.launcher import ComfyServer

    tree = tmp_path / "ComfyUI"
    (tree / "comfy").mkdir(parents=True)
    (tree / "main.py").write_text("print('hi')\n")
    (tree / "extra_model_paths.yaml").write_text("a: {base_path: /nowhere}\n")
    ckpt = tmp_path / "tiny.safetensors"
    ckpt.write_bytes(b"x")
    server = ComfyServer(tree, models={"checkpoints": [ckpt], "category_libraries": [ckpt]},
                         base_dir=tmp_path / "base")
    server._prepare()
    server.port = 1234
    base = tmp_path / "base"
    assert (base / "custom_nodes" / "productscene_pack_under_test").resolve() == comfy_env.REPO_ROOT
    assert (base / "models" / "checkpoints" / "tiny.safetensors").resolve() == ckpt
    assert (base / "models" / "category_libraries" / "tiny.safetensors").is_file()
    for sub in ("input", "output", "user", "temp"):
        assert (base / sub).is_dir()
    assert server.main_py == base / "comfyui" / "main.py" and not server.main_py.is_symlink()
    assert not (base / "comfyui" / "extra_model_paths.yaml").exists()
    assert (base / "comfyui" / "comfy").resolve() == tree / "comfy"
    cmd = server.command()
    assert cmd[cmd.index("--base-directory") + 1] == str(base)
    assert cmd[cmd.index("--port") + 1] == "1234" and "--cpu" in cmd and "--disable-auto-launch" in cmd
    assert any(a.startswith("sqlite:///" + str(base)) for a in cmd)


def test_launcher_reports_a_dead_server_with_its_log_and_cleans_up():
    from devkit.launcher import ComfyServer

    server = ComfyServer(comfy_env.COMFYUI_DIR, extra_args=["--no-such-flag"], timeout=60)
    with pytest.raises(ProductSceneError, match=r"(?s)exited with code 2.*no-such-flag"):
        server.start()
    assert server.proc is None and not server.running
    assert not server.base_dir.exists()
