"""The bundled workflows. Every canvas file in workflows/ (named for the template browser, which
shows the file name as the template's title) and its API twin (``api/<id>.json``, the id in the
canvas file's ``extra.productscene.workflow``) describe the same graph (the canvas's notes aside), their links are consistent and typed as the server's
/object_info says, and every node type is known to a real ComfyUI server. End to end through that
server, with the default (random-weight, detectable SD1.5) checkpoint:

- category background: on a sample product the product pixels come back bit-identical, the
  background changes, and two categories give two backgrounds;
- category and brand style: the same, with a brand reference image (CLIP vision + an untrained
  personality adapter): product pixels bit-identical, two references give two backgrounds, and
  weight 0 gives exactly the category workflow's image;
- category library training: a tiny folder data set trains a library (2 steps, 64 px) that the
  library reader opens with the data set's categories and a LoRA, the loss graph is saved, and the
  new library is offered by the Category Tokens node."""
from __future__ import annotations

import io
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from productscene.graph import bind, combo_options, target
from productscene.errors import ProductSceneError

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
API = WORKFLOWS / "api" / "category_background.json"
BRAND_API = WORKFLOWS / "api" / "category_brand_background.json"
BRAND_IPA_API = WORKFLOWS / "api" / "category_brand_background_ipadapter.json"
TRAIN_API = WORKFLOWS / "api" / "category_library_training.json"
SAMPLES = ROOT / "samples" / "products"
SAMPLE = SAMPLES / "perfume_bottle.png"

# every canvas workflow (workflows/<title>.json, listed by ComfyUI's template browser) with its API
# twin (workflows/api/<id>.json, which the template browser does not list)
CANVAS_FILES = sorted(WORKFLOWS.glob("*.json"))
API_FILES = sorted((WORKFLOWS / "api").glob("*.json"))
# frontend-only nodes: on the canvas, never in a prompt
VIRTUAL = {"Note", "MarkdownNote"}


def workflow_id(canvas_path: Path) -> str:
    return json.loads(canvas_path.read_text())["extra"]["productscene"]["workflow"]


def api_twin(canvas_path: Path) -> Path:
    return canvas_path.parent / "api" / f"{workflow_id(canvas_path)}.json"


def without_notes(canvas: dict) -> dict:
    return {**canvas, "nodes": [n for n in canvas["nodes"] if n["type"] not in VIRTUAL]}


workflow_params = pytest.mark.parametrize("canvas_path", CANVAS_FILES, ids=[workflow_id(p) for p in CANVAS_FILES])

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def _has_control_widget(name: str, spec) -> bool:
    """The frontend's rule (useIntWidget): an INT input gets a ``control_after_generate`` widget when
    its spec asks for one or, when the spec says nothing, when it is named ``seed``/``noise_seed``."""
    if spec[0] != "INT":
        return False
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    control = opts.get("control_after_generate")
    return bool(control) if control is not None else name in ("seed", "noise_seed")


def _input_specs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) in the order the frontend lays out the node's inputs (required, optional)."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            out.append((name, info["input"][section][name]))
    return out


def canvas_widgets(node: dict, info: dict) -> dict:
    """Map a canvas node's ``widgets_values`` to input names, dropping the frontend-only extra values
    (``control_after_generate`` after a seed, the upload button's value after LoadImage's image)."""
    values = list(node.get("widgets_values") or [])
    linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
    out = {}
    for name, spec in _input_specs(info):
        if not _is_widget(spec) or name in linked:
            continue
        assert values, f"node {node['id']} ({node['type']}): no widget value left for {name!r}"
        out[name] = values.pop(0)
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if _has_control_widget(name, spec):
            assert values and values[0] in ("fixed", "increment", "decrement", "randomize"), node["id"]
            values.pop(0)
        if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
            if values and values[0] in ("image", "video", "audio"):
                values.pop(0)
    assert not values, f"node {node['id']} ({node['type']}): widget values left over: {values}"
    return out


def check_canvas_outputs(node: dict, info: dict) -> None:
    """A canvas node's outputs are the server's outputs, in order. A core node may have gained
    outputs since the file was saved (ComfyUI 0.33's SaveImage has an IMAGE output that 0.3.75's
    lacks): links name outputs by index, so outputs appended at the end leave the file valid and the
    canvas may lack them. Any other difference (another type, order or count) is a mismatch."""
    canvas = [o["type"] for o in node["outputs"]]
    server = list(info["output"])
    assert canvas == server[:len(canvas)], \
        f"node {node['id']} ({node['type']}): canvas outputs {canvas}, the server's {server}"


def canvas_graph(canvas: dict) -> tuple[dict, set]:
    nodes = {str(n["id"]): n for n in canvas["nodes"]}
    links = set()
    for link_id, origin, oslot, target, tslot, typ in canvas["links"]:
        tnode = nodes[str(target)]
        inp = tnode["inputs"][tslot]
        assert inp["link"] == link_id, f"link {link_id}: target input does not point back"
        onode = nodes[str(origin)]
        assert link_id in onode["outputs"][oslot]["links"], f"link {link_id}: origin output does not list it"
        assert onode["outputs"][oslot]["type"] == typ == inp["type"], f"link {link_id}: type mismatch"
        links.add((str(origin), int(oslot), str(target), inp["name"]))
    return nodes, links


def api_graph(api: dict) -> set:
    links = set()
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                links.add((str(value[0]), int(value[1]), nid, name))
    return links


def test_every_workflow_has_its_twin():
    assert CANVAS_FILES, "no workflows found"
    assert sorted(api_twin(p) for p in CANVAS_FILES) == API_FILES, "canvas and API files do not pair up"
    assert {workflow_id(p) for p in CANVAS_FILES} >= {"category_background", "category_library_training",
                                                     "category_background_flux", "category_background_z_image"}


@workflow_params
def test_canvas_file_shape(canvas_path):
    canvas = json.loads(canvas_path.read_text())
    assert canvas["version"] == 0.4
    ids = [n["id"] for n in canvas["nodes"]]
    assert len(ids) == len(set(ids))
    assert canvas["last_node_id"] >= max(ids)
    assert canvas["last_link_id"] >= max(l[0] for l in canvas["links"])
    link_ids = [l[0] for l in canvas["links"]]
    assert len(link_ids) == len(set(link_ids))
    for n in canvas["nodes"]:
        for key in ("id", "type", "pos", "size", "inputs", "outputs", "widgets_values", "mode", "order"):
            assert key in n, f"node {n.get('id')}: lacks {key!r}"
    canvas_graph(canvas)  # links consistent in both directions
    # every link an input or output names exists (no dangling ends)
    for n in canvas["nodes"]:
        for inp in n["inputs"]:
            assert inp.get("link") is None or inp["link"] in link_ids, f"node {n['id']}.{inp['name']}: dangling link"
        for out in n["outputs"]:
            for link in out.get("links") or []:
                assert link in link_ids, f"node {n['id']}.{out['name']}: dangling link {link}"


@pytest.fixture(scope="module")
def object_info(comfy_server):
    _server, client = comfy_server
    return client.object_info()


@workflow_params
def test_twins_describe_the_same_graph(canvas_path, object_info):
    canvas = without_notes(json.loads(canvas_path.read_text()))
    api = json.loads(api_twin(canvas_path).read_text())
    nodes, canvas_links = canvas_graph(canvas)

    assert {k: n["type"] for k, n in nodes.items()} == {k: n["class_type"] for k, n in api.items()}
    assert canvas_links == api_graph(api)
    unknown = sorted({n["class_type"] for n in api.values()} - set(object_info))
    assert not unknown, f"node types unknown to the server: {unknown}"

    for nid, node in nodes.items():
        info = object_info[node["type"]]
        api_widgets = {k: v for k, v in api[nid]["inputs"].items() if not isinstance(v, list)}
        assert canvas_widgets(node, info) == api_widgets, f"node {nid} ({node['type']}): widget values differ"
        assert node.get("title") == api[nid].get("_meta", {}).get("title")
        check_canvas_outputs(node, info)
        # every required input is given, links carry the type the input expects
        required = info["input"].get("required", {})
        optional = info["input"].get("optional", {})
        for name in required:
            assert name in api[nid]["inputs"], f"node {nid} ({node['type']}): required input {name!r} missing"
        for name, value in api[nid]["inputs"].items():
            spec = required.get(name) or optional.get(name)
            assert spec is not None, f"node {nid} ({node['type']}): unknown input {name!r}"
            if isinstance(value, list):
                origin = api[value[0]]["class_type"]
                out_type = object_info[origin]["output"][value[1]]
                want = spec[0]
                assert want == out_type or (isinstance(want, str) and out_type in want.split(",")), \
                    f"node {nid}.{name}: gets {out_type} from {origin}, expects {want}"


def test_output_check_accepts_gained_outputs_and_catches_a_real_mismatch(object_info):
    node = {"id": 1, "type": "CheckpointLoaderSimple",
            "outputs": [{"name": n, "type": t} for n, t in (("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE"))]}
    info = object_info["CheckpointLoaderSimple"]
    assert list(info["output"]) == ["MODEL", "CLIP", "VAE"]
    check_canvas_outputs(node, info)
    # saved before the node type gained its last output: accepted (SaveImage on 0.33: [] vs [IMAGE])
    check_canvas_outputs(dict(node, outputs=node["outputs"][:2]), info)
    check_canvas_outputs({"id": 2, "type": "SaveImage", "outputs": []}, dict(info, output=["IMAGE"]))
    # real mismatches: a swapped pair, a wrong type, an output the server does not have, a missing middle one
    swapped = [node["outputs"][0], node["outputs"][2], node["outputs"][1]]
    wrong = [dict(node["outputs"][0], type="LATENT")] + node["outputs"][1:]
    extra = node["outputs"] + [{"name": "LATENT", "type": "LATENT"}]
    gap = [node["outputs"][0], node["outputs"][2]]
    for outputs in (swapped, wrong, extra, gap):
        with pytest.raises(AssertionError, match="canvas outputs"):
            check_canvas_outputs(dict(node, outputs=outputs), info)


def _link_into(server, folder: str, path: Path) -> str:
    dst = Path(server.base_dir) / "models" / folder / path.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(path, dst)
    return path.name


def _run(client, api: dict, values: dict) -> np.ndarray:
    """Run the workflow with ``values`` bound by the binding convention (productscene.graph)."""
    prompt = bind(api, values)
    pid = client.queue(prompt)
    client.wait(pid, timeout=600)
    images = client.outputs(pid, target(prompt, "output")[0])
    assert len(images) == 1, images
    data = client.download(images[0])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_category_workflow_end_to_end(comfy_server, default_model_files, tmp_path):
    server, client = comfy_server
    ckpt, lib = default_model_files
    ckpt_name = _link_into(server, "checkpoints", Path(ckpt))
    lib_name = _link_into(server, "category_libraries", Path(lib))

    # a small copy of a sample product keeps the CPU run short (multiples of 16 px for the UNet)
    product = Image.open(SAMPLE).convert("RGBA").resize((96, 96), Image.LANCZOS)
    local = tmp_path / "ps_test_product.png"
    product.save(local)
    up = client.upload_image(local)
    uploaded = f"{up['subfolder']}/{up['name']}" if up.get("subfolder") else up["name"]
    rgba = np.asarray(product)
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    inside, outside = alpha == 255, alpha == 0
    assert inside.sum() > 100 and outside.sum() > 100

    # the API twin as shipped, bound the way the batch client binds it (node titles)
    api = json.loads(API.read_text())
    common = {"Checkpoint.ckpt_name": ckpt_name, "Category prompt.library": lib_name, "product": uploaded,
              "Sampler.steps": 1, "seed": 7}
    results = {}
    for category in ("perfume", "tools"):
        results[category] = _run(client, api, {**common, "category": category})

    for category, out in results.items():
        assert out.shape == rgb.shape, category
        # inside the product mask: the input's pixels, bit for bit
        assert np.array_equal(out[inside], rgb[inside]), f"{category}: product pixels changed"
        # the background was generated anew
        changed = (out[outside] != rgb[outside]).any(-1).mean()
        assert changed > 0.5, f"{category}: only {changed:.0%} of the background changed"
    # same seed, two categories: two different backgrounds, the same product
    a, b = results["perfume"], results["tools"]
    assert (a[outside] != b[outside]).any(-1).mean() > 0.1
    assert np.array_equal(a[inside], b[inside])


def _upload(client, image: Image.Image, path: Path) -> str:
    image.save(path)
    up = client.upload_image(path)
    return f"{up['subfolder']}/{up['name']}" if up.get("subfolder") else up["name"]


def test_brand_style_workflow_end_to_end(comfy_server, default_model_files, reference_model_files, tmp_path):
    server, client = comfy_server
    ckpt, lib = default_model_files
    clip_vision, adapter = reference_model_files
    names = {"Checkpoint.ckpt_name": _link_into(server, "checkpoints", Path(ckpt)),
             "Category prompt.library": _link_into(server, "category_libraries", Path(lib)),
             "CLIP vision.clip_name": _link_into(server, "clip_vision", Path(clip_vision)),
             "Personality reference.adapter": _link_into(server, "personality_adapters", Path(adapter))}
    product = Image.open(SAMPLE).convert("RGBA").resize((96, 96), Image.LANCZOS)
    uploaded = _upload(client, product, tmp_path / "ps_test_brand_product.png")
    refs = {}
    for name in ("brand_terrazzo", "brand_botanical"):
        ref = Image.open(ROOT / "samples" / "references" / f"{name}.png").convert("RGB").resize((128, 128))
        refs[name] = _upload(client, ref, tmp_path / f"ps_test_{name}.png")
    rgba = np.asarray(product)
    rgb, inside, outside = rgba[..., :3], rgba[..., 3] == 255, rgba[..., 3] == 0

    brand = json.loads(BRAND_API.read_text())
    common = {**names, "product": uploaded, "category": "perfume", "Sampler.steps": 1, "seed": 7}
    results = {name: _run(client, brand, {**common, "reference": ref}) for name, ref in refs.items()}
    for name, out in results.items():
        assert out.shape == rgb.shape and np.array_equal(out[inside], rgb[inside]), f"{name}: product pixels changed"
    a, b = results.values()
    assert (a[outside] != b[outside]).any(-1).mean() > 0.1, "two references gave the same background"
    assert np.array_equal(a[inside], b[inside])
    # weight 0: Apply Personality leaves the model as it was, so the image is the category workflow's
    off = _run(client, brand, {**common, "reference": refs["brand_terrazzo"], "Apply personality.weight": 0.0})
    plain = _run(client, json.loads(API.read_text()), {k: v for k, v in common.items()
                                                      if not k.startswith(("CLIP vision", "Personality"))})
    assert np.array_equal(off, plain)
    assert (a[outside] != plain[outside]).any(-1).mean() > 0.1, "the reference changed nothing"


def test_training_workflow_end_to_end(comfy_server, default_model_files):
    from productscene.library import TokenLibrary

    server, client = comfy_server
    ckpt, _lib = default_model_files
    ckpt_name = _link_into(server, "checkpoints", Path(ckpt))
    base = Path(server.base_dir)

    # a tiny folder data set in the server's input folder: 2 categories x 2 cut-outs (alpha), 64 px
    tag = uuid.uuid4().hex[:8]
    data_name = f"ps_test_categories_{tag}"
    categories = {"perfume": "perfume_bottle.png", "tools": "wrench.png"}
    for category, sample in categories.items():
        folder = base / "input" / data_name / category
        folder.mkdir(parents=True)
        cut = Image.open(SAMPLES / sample).convert("RGBA").resize((64, 64), Image.LANCZOS)
        assert (np.asarray(cut)[..., 3] == 0).any() and (np.asarray(cut)[..., 3] == 255).any()
        cut.save(folder / "a.png")
        cut.transpose(Image.FLIP_LEFT_RIGHT).save(folder / "b.png")

    api = json.loads(TRAIN_API.read_text())
    ids = {n["class_type"]: k for k, n in api.items()}
    train = ids["ProductSceneTrainCategoryLibrary"]
    output_name = f"ps_test_library_{tag}"
    prompt = json.loads(json.dumps(api))
    prompt[ids["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = ckpt_name
    prompt[train]["inputs"].update(data_folder=data_name, steps=2, resolution=64, batch_size=2,
                                   output_name=output_name, checkpoint_every=0, resume=False)
    t0 = time.monotonic()
    pid = client.queue(prompt)
    client.wait(pid, timeout=300)
    elapsed = time.monotonic() - t0

    # the library: written where the node says, with the data set's categories and the shared LoRA
    library_name = output_name + ".safetensors"  # the node's ``library`` output (.safetensors added)
    path = base / "models" / "category_libraries" / library_name
    assert path.is_file(), f"no library at {path} (run took {elapsed:.1f} s)"
    lib = TokenLibrary.open(path)
    assert sorted(lib.names) == sorted(categories)
    assert lib.family == "sd15"
    assert lib.has_lora and lib.lora_keys
    assert lib.training["steps"] == 2 and lib.training["categories"] == 2

    # the loss graph was saved and is downloadable: a real picture, not a blank
    images = client.outputs(pid, ids["SaveImage"])
    assert len(images) == 1, images
    png = client.download(images[0])
    graph = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert graph.shape[0] >= 64 and graph.shape[1] >= 64, graph.shape
    assert len(np.unique(graph.reshape(-1, 3), axis=0)) >= 3, "loss graph is (nearly) one colour"

    # the new library is offered by Category Tokens (ComfyUI re-lists combo options per request)
    info = client.object_info("ProductSceneCategoryTokens")["ProductSceneCategoryTokens"]
    options = combo_options(info["input"]["required"]["library"])
    assert library_name in options, options
    listed = client.get("/productscene/libraries/categories", library=library_name)
    assert sorted(listed["categories"]) == sorted(categories)


EXTRACT_API = WORKFLOWS / "api" / "concept_extraction.json"
RECOMPOSE_API = WORKFLOWS / "api" / "concept_recompose.json"


def test_concept_workflows_end_to_end(comfy_server, default_model_files):
    """Extract concepts from the sample desk scene (2 steps, 256 px), then recompose one of them on a
    category background with the tokens just written: both as shipped, through the server."""
    from productscene.library import TokenLibrary

    server, client = comfy_server
    ckpt, lib = default_model_files
    ckpt_name = _link_into(server, "checkpoints", Path(ckpt))
    lib_name = _link_into(server, "category_libraries", Path(lib))
    base = Path(server.base_dir)
    tag = uuid.uuid4().hex[:8]
    output_name = f"ps_test_concepts_{tag}"

    api = json.loads(EXTRACT_API.read_text())
    prompt = bind(api, {"Checkpoint.ckpt_name": ckpt_name, "Multi-concept inversion.phase1_steps": 1,
                        "Multi-concept inversion.phase2_steps": 1, "Multi-concept inversion.resolution": 256,
                        "Multi-concept inversion.output_name": output_name,
                        "Multi-concept inversion.checkpoint_every": 0})
    pid = client.queue(prompt)
    client.wait(pid, timeout=600)
    tokens = base / "models" / "category_libraries" / f"{output_name}.safetensors"
    concepts = TokenLibrary.open(tokens)
    assert concepts.names == ["<perfume>", "<mug>"] and concepts.has_lora and concepts.training["steps"] == 2
    assert concepts.init_words == {"<perfume>": "bottle", "<mug>": "mug"}
    assert (base / "models" / "loras" / f"{output_name}.safetensors").is_file()
    for c in ("perfume", "mug"):
        assert (base / "models" / "embeddings" / f"{output_name}_{c}.safetensors").is_file()
    assert len(client.outputs(pid, next(k for k, n in api.items() if n["class_type"] == "SaveImage"))) == 1

    # the new file is offered by Concept Tokens, and the recompose workflow runs on it
    info = client.object_info()["ProductSceneConceptTokens"]["input"]["required"]["tokens"]
    assert f"{output_name}.safetensors" in combo_options(info)
    recompose = json.loads(RECOMPOSE_API.read_text())
    values = {"Checkpoint.ckpt_name": ckpt_name, "Concept prompt.tokens": f"{output_name}.safetensors",
              "Concept prompt.category_library": lib_name, "Sampler.steps": 1,
              "Image size (same aspect as the mask).width": 128, "Image size (same aspect as the mask).height": 96}
    out = _run(client, recompose, values)
    assert out.shape == (96, 128, 3) and out.std() > 0


def test_brand_style_workflow_with_an_ipadapter_file(comfy_server, default_model_files, reference_model_files,
                                                     tmp_path):
    """The brand workflow's IP-Adapter variant (an IP-Adapter file from models/ipadapter in Personality
    Reference, the 'style' blocks in Apply Personality), on a checkpoint of SD1.5's full block layout (the layers an IP-Adapter file is
    made for; devkit/ipadapter_demo.py: random weights, its resampler sized for the default ViT-L CLIP
    vision): every product pixel unchanged, the background changed, and weight 0 gives exactly the
    category workflow's image."""
    from devkit import ipadapter_demo

    server, client = comfy_server
    _, lib = default_model_files
    clip_vision, _ = reference_model_files
    ckpt = ipadapter_demo.ensure_full_layout_checkpoint()
    ipa = ipadapter_demo.write_ipadapter_file(tmp_path / ipadapter_demo.IPADAPTER_NAME)
    names = {"Checkpoint.ckpt_name": _link_into(server, "checkpoints", ckpt),
             "Category prompt.library": _link_into(server, "category_libraries", Path(lib)),
             "CLIP vision.clip_name": _link_into(server, "clip_vision", Path(clip_vision))}
    dst = Path(server.base_dir) / "models" / "ipadapter" / ipa.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    os.symlink(ipa, dst)
    product = Image.open(SAMPLE).convert("RGBA").resize((96, 96), Image.LANCZOS)
    uploaded = _upload(client, product, tmp_path / "ps_test_ipa_product.png")
    ref = Image.open(ROOT / "samples" / "references" / "brand_terrazzo.png").convert("RGB").resize((128, 128))
    reference = _upload(client, ref, tmp_path / "ps_test_ipa_reference.png")
    rgba = np.asarray(product)
    rgb, inside, outside = rgba[..., :3], rgba[..., 3] == 255, rgba[..., 3] == 0

    brand = json.loads(BRAND_IPA_API.read_text())
    common = {**names, "product": uploaded, "category": "perfume", "Sampler.steps": 1, "seed": 7}
    with_ipa = {**common, "reference": reference, "Personality reference.adapter": ipa.name}
    out = _run(client, brand, with_ipa)
    assert out.shape == rgb.shape and np.array_equal(out[inside], rgb[inside]), "product pixels changed"
    off = _run(client, brand, {**with_ipa, "Apply personality.weight": 0.0})
    plain = _run(client, json.loads(API.read_text()), {k: v for k, v in common.items() if not k.startswith("CLIP vision")})
    assert np.array_equal(off, plain)
    assert (out[outside] != plain[outside]).any(-1).mean() > 0.1, "the IP-Adapter file changed nothing"
