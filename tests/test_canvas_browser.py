"""The canvas as a user meets it: the real ComfyUI server with this pack and its own frontend, driven
in headless chromium (tests/support/browser.py; scripts/setup_browser.sh installs the browser).

- every template the template browser lists opens with no unknown node type, no node error and no
  alert, no node overlapping another, text drawn after "fit view" at 1600x900, and a note;
- choosing a 5,000-category library fills the category menu with exactly its categories within a
  second; the search box finds one of them;
- the category workflow, queued from the canvas with the small default model, puts an image in its
  output node, and the Product Mask node shows the mask over the photo;
- a trainer node shows its progress (step, loss, time left) and the loss curve while it runs;
- with the Japanese locale the nodes carry their Japanese names.

One server (the session's ``comfy_server``) and one browser for the module. Screenshots go to
output/test-artifacts/canvas/ (PRODUCTSCENE_ARTIFACTS overrides the folder).
"""
from __future__ import annotations

import json
import os
import time
import urllib.parse
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from devkit.ipadapter_demo import write_ipadapter_file
from productscene.library import TokenLibrary
from tests.support.browser import BrowserMissing, canvas_browser, ensure_browser, overlaps

pytestmark = pytest.mark.host

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
SAMPLES = ROOT / "samples" / "products"
ARTIFACTS = Path(os.environ.get("PRODUCTSCENE_ARTIFACTS") or ROOT / "output" / "test-artifacts") / "canvas"
BIG = "browser_5000.safetensors"
BIG_NAMES = [f"category {i:04d}" for i in range(5000)]
# the file the Extract concepts workflow writes, which the Recompose one opens with
CONCEPTS = next(n["inputs"]["output_name"] for n in json.loads((WORKFLOWS / "api" / "concept_extraction.json").read_text()).values()
                if n["class_type"] == "ProductSceneMultiConceptInversion") + ".safetensors"
MIN_SCALE = 0.6  # fit-view zoom at which node text is still drawn comfortably (14 px font -> 8.4 px)


def workflow_id(path: Path) -> str:
    return json.loads(path.read_text())["extra"]["productscene"]["workflow"]


CANVAS = {workflow_id(p): p for p in sorted(WORKFLOWS.glob("*.json"))}
CANVAS_BY_NAME = {p.stem: p for p in CANVAS.values()}


@pytest.fixture(scope="module")
def site(comfy_server, default_model_files, reference_model_files):
    """The server, its models (default checkpoint and library, a 5,000-category library, the default
    CLIP vision model and personality adapter the brand template opens with)."""
    server, client = comfy_server
    ckpt, lib = default_model_files
    clip_vision, adapter = reference_model_files
    models = Path(server.base_dir) / "models"
    for folder, path in (("checkpoints", Path(ckpt)), ("category_libraries", Path(lib)),
                         ("clip_vision", Path(clip_vision)), ("personality_adapters", Path(adapter))):
        dst = models / folder / path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.symlink(path, dst)
    TokenLibrary.write(str(models / "category_libraries" / BIG), BIG_NAMES,
                          {"clip_l": torch.randn(len(BIG_NAMES), 1, 768) * 0.01}, "sd15")
    # what the Recompose template's note asks for first: the concept-token file that the Extract
    # template writes (a current frontend marks a node whose model-file choice is absent as an error)
    TokenLibrary.write(str(models / "category_libraries" / CONCEPTS), ["<perfume>", "<mug>"],
                          {"clip_l": torch.randn(2, 1, 768) * 0.01}, "sd15")
    # the Brand style with IPAdapter template opens with the file names of a user's SD1.5 setup: give
    # the site files of those names (stand-ins of the right kind: an IP-Adapter file of the real keys)
    for folder, name, path in (("checkpoints", "v1-5-pruned-emaonly.safetensors", Path(ckpt)),
                               ("clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", Path(clip_vision))):
        if not (models / folder / name).exists():
            os.symlink(path, models / folder / name)
    (models / "ipadapter").mkdir(exist_ok=True)
    write_ipadapter_file(models / "ipadapter" / "ip-adapter-plus_sd15.safetensors")
    # the Flux.1 and Z-Image templates open with those users' file names: devkit's tiny files carry them
    from devkit import dit_files
    dit_files.ensure(log=lambda *_: None)
    for family in dit_files.FAMILIES:
        for folder, paths in dit_files.files(family).items():
            for path in paths:
                (models / folder).mkdir(exist_ok=True)
                if not (models / folder / path.name).exists():
                    os.symlink(path, models / folder / path.name)
    return server, client, Path(ckpt).name, Path(lib).name


@pytest.fixture(scope="module")
def canvas(site):
    server = site[0]
    try:
        ensure_browser()
    except BrowserMissing as e:
        pytest.fail(str(e))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with canvas_browser(server.url, settings={"Comfy.Locale": "en"}) as c:
        yield c


def shot(canvas, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    canvas.page.screenshot(path=str(path))
    return path


def load(canvas, workflow_id: str) -> None:
    canvas.reset_events()
    canvas.load_workflow(json.loads(CANVAS[workflow_id].read_text()))


def node_by_type(canvas, node_type: str) -> int:
    return canvas.evaluate("(t) => app.graph.nodes.find(n => n.type === t).id", node_type)


def set_widget(canvas, node_id: int, name: str, value, *, callback: bool = True) -> None:
    """What choosing a value in the widget does: set it, then run the widget's callback."""
    canvas.evaluate("""([id, name, value, callback]) => {
        const node = app.graph.getNodeById(id);
        const w = node.widgets.find(w => w.name === name);
        w.value = value;
        if (callback) w.callback?.(value, app.canvas, node, [0, 0], {});
        node.setDirtyCanvas(true, true);
    }""", [node_id, name, value, callback])


def widget_value(canvas, node_id: int, name: str):
    return canvas.evaluate("([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name).value",
                           [node_id, name])


def queue_from_canvas(canvas) -> str:
    """Press Run (queue the canvas graph as the frontend does) and return the prompt id."""
    return canvas.evaluate("""async () => {
        const original = app.api.queuePrompt.bind(app.api);
        let answer = null;
        app.api.queuePrompt = async (...args) => (answer = await original(...args));
        try { await app.queuePrompt(0, 1); } finally { app.api.queuePrompt = original; }
        return answer?.prompt_id ?? null;
    }""")


def wait_history(client, prompt_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = client.history(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        if entry and entry.get("status", {}).get("status_str") == "error":
            return entry
        time.sleep(0.3)
    raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


# ------------------------------------------------------------------------------------ templates
def test_template_browser_lists_the_canvas_workflows_with_thumbnails(site, canvas):
    pack = site[0].pack_name
    listed = canvas.evaluate("() => app.api.getWorkflowTemplates()")
    assert sorted(listed[pack]) == sorted(p.stem for p in CANVAS.values()), listed
    for name in listed[pack]:
        status, kind = canvas.evaluate("""async (url) => {
            const r = await fetch(url); return [r.status, r.headers.get('content-type')];
        }""", f"/api/workflow_templates/{urllib.parse.quote(pack)}/{urllib.parse.quote(name)}.jpg")
        assert status == 200 and kind == "image/jpeg", (name, status, kind)
    # the template browser itself: the pack's own section shows every tile with its thumbnail
    canvas.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    canvas.page.get_by_text(pack, exact=True).first.click(timeout=15_000)
    for name in listed[pack]:
        width = canvas.page.wait_for_function("""(name) => {
            const img = [...document.querySelectorAll('img')].find(i => i.alt === name);
            return img && img.complete && img.naturalWidth > 0 ? img.naturalWidth : null;
        }""", arg=name, timeout=15_000).json_value()
        assert width == 512, (name, width)
    titles = canvas.evaluate("() => [...document.querySelectorAll('h3')].map(h => h.textContent.trim())")
    assert set(listed[pack]) <= set(titles), titles
    canvas.page.wait_for_timeout(300)
    shot(canvas, "template_browser")
    canvas.close_dialogs()
    assert canvas.open_dialogs() == []


@pytest.mark.parametrize("workflow", sorted(CANVAS))
def test_each_template_opens_cleanly(site, canvas, workflow):
    pack = site[0].pack_name
    name = CANVAS[workflow].stem
    canvas.reset_events()
    # the template browser's own path: fetch the file the server serves, load it as a template
    canvas.evaluate("""async ([pack, name]) => {
        const url = app.api.apiURL(`/workflow_templates/${encodeURIComponent(pack)}/${encodeURIComponent(name)}.json`);
        const wf = await (await fetch(url)).json();
        await app.loadGraphData(wf, true, true, name, {openSource: 'template', showMissingNodesDialog: true});
    }""", [pack, name])
    canvas.page.wait_for_timeout(800)
    nodes = canvas.nodes()
    assert [n["type"] for n in nodes if not n["known"]] == [], "unknown node types"
    assert [n["id"] for n in nodes if n["has_errors"]] == [], "nodes with errors"
    assert canvas.dialogs == [], canvas.dialogs
    assert canvas.open_dialogs() == [], canvas.open_dialogs()
    assert canvas.page_errors == [], canvas.page_errors
    assert overlaps(nodes) == []
    notes = canvas.evaluate("() => app.graph.nodes.filter(n => n.type === 'Note').map(n => n.widgets[0].value)")
    assert len(notes) == 1 and "BEFORE YOU RUN" in notes[0] and "WHAT YOU GET" in notes[0]
    scale = canvas.fit_view()
    low = canvas.evaluate("() => app.canvas.low_quality")
    shot(canvas, f"template_{workflow}")
    assert scale >= MIN_SCALE and not low, f"fit view zooms to {scale:.2f}: text too small or not drawn"


# ------------------------------------------------------------------------------------ categories
def test_choosing_a_library_fills_the_category_menu_with_its_categories(site, canvas):
    _server, _client, _ckpt, default_library = site
    load(canvas, "category_background")
    node = node_by_type(canvas, "ProductSceneCategoryTokens")
    canvas.page.wait_for_function(
        "(id) => app.graph.getNodeById(id).productsceneCategories?.names", arg=node, timeout=10_000)
    default_names = TokenLibrary.open(str(Path(site[0].base_dir) / "models" / "category_libraries"
                                             / default_library)).names
    assert canvas.evaluate("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'category').options.values",
                           node) == list(default_names)

    elapsed = canvas.evaluate("""async ([id, library]) => {
        const node = app.graph.getNodeById(id);
        const w = node.widgets.find(w => w.name === 'library');
        const category = node.widgets.find(w => w.name === 'category');
        const t0 = performance.now();
        w.value = library;
        w.callback?.(library, app.canvas, node, [0, 0], {});
        while (category.options.values.length !== 5000) {
            if (performance.now() - t0 > 5000) return null;
            await new Promise(r => setTimeout(r, 5));
        }
        return performance.now() - t0;
    }""", [node, BIG])
    assert elapsed is not None, "the category menu never showed the 5,000 categories"
    values = canvas.evaluate("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'category').options.values",
                             node)
    assert values == BIG_NAMES
    assert widget_value(canvas, node, "category") == BIG_NAMES[0]  # the old choice is not in this library
    print(f"\n5,000 categories in the widget {elapsed:.0f} ms after choosing the library")
    assert elapsed < 1000, f"{elapsed:.0f} ms"

    # the search box: type, see the matches, Enter chooses
    canvas.evaluate("""(id) => app.graph.getNodeById(id).widgets
        .find(w => w.name === 'productscene_search_categories').callback()""", node)
    search = canvas.page.locator(".productscene-picker input")
    search.wait_for(timeout=5000)
    search.type("gory 432")
    expected = [n for n in BIG_NAMES if "432" in n and "gory" in n]
    items = canvas.page.locator(".productscene-picker-item")
    canvas.page.wait_for_timeout(200)
    assert items.all_inner_texts() == expected and len(expected) == 15
    shot(canvas, "category_search")
    search.press("ArrowDown")
    search.press("Enter")
    assert widget_value(canvas, node, "category") == expected[1]
    assert canvas.page.locator(".productscene-picker").count() == 0

    # back to the default library: its categories again, a valid choice
    set_widget(canvas, node, "library", default_library)
    canvas.page.wait_for_function(
        "([id, n]) => app.graph.getNodeById(id).widgets.find(w => w.name === 'category').options.values.length === n",
        arg=[node, len(default_names)], timeout=5000)
    assert widget_value(canvas, node, "category") in default_names


# ------------------------------------------------------------------------------------ running
def test_category_workflow_runs_from_the_canvas(site, canvas, tmp_path):
    _server, client, ckpt, default_library = site
    product = Image.open(SAMPLES / "perfume_bottle.png").convert("RGBA").resize((96, 96), Image.LANCZOS)
    local = tmp_path / f"ps_canvas_{uuid.uuid4().hex[:6]}.png"
    product.save(local)
    up = client.upload_image(local)
    uploaded = f"{up['subfolder']}/{up['name']}" if up.get("subfolder") else up["name"]

    load(canvas, "category_background")
    ids = {t: node_by_type(canvas, t) for t in ("CheckpointLoaderSimple", "LoadImage", "ProductSceneCategoryTokens",
                                                  "KSampler", "SaveImage", "ProductSceneProductMask")}
    set_widget(canvas, ids["CheckpointLoaderSimple"], "ckpt_name", ckpt)
    set_widget(canvas, ids["LoadImage"], "image", uploaded)
    set_widget(canvas, ids["ProductSceneCategoryTokens"], "library", default_library)
    set_widget(canvas, ids["KSampler"], "steps", 1)
    set_widget(canvas, ids["KSampler"], "seed", int(uuid.uuid4().int % 100000))  # never a cached result
    canvas.page.wait_for_timeout(300)

    prompt_id = queue_from_canvas(canvas)
    assert prompt_id, "the canvas did not queue a prompt"
    entry = wait_history(client, prompt_id)
    assert entry["status"].get("status_str") == "success", entry["status"]

    # the output node on the canvas shows the image the server saved
    save = str(ids["SaveImage"])
    saved = entry["outputs"][save]["images"]
    assert len(saved) == 1
    canvas.page.wait_for_function(
        "(id) => (app.nodeOutputs?.[String(id)]?.images?.length ?? 0) > 0", arg=ids["SaveImage"], timeout=10_000)
    shown = canvas.evaluate("(id) => app.nodeOutputs[String(id)].images", ids["SaveImage"])
    assert [i["filename"] for i in shown] == [saved[0]["filename"]]
    image = np.asarray(Image.open(__import__("io").BytesIO(client.download(saved[0]))).convert("RGB"))
    assert image.shape == (96, 96, 3)
    # ... and the Product Mask node shows the mask over the photo
    mask_preview = entry["outputs"][str(ids["ProductSceneProductMask"])]["images"]
    assert len(mask_preview) == 1 and mask_preview[0]["type"] == "temp"
    overlay = np.asarray(Image.open(__import__("io").BytesIO(client.download(mask_preview[0]))).convert("RGB"))
    alpha = np.asarray(product)[..., 3]
    inside, outside = alpha == 255, alpha == 0
    # product pixels tinted green over the photo, background darkened
    assert overlay[inside][:, 1].mean() > overlay[inside][:, 0].mean()
    assert overlay[outside].mean() < 0.6 * 255
    canvas.page.wait_for_timeout(500)
    canvas.fit_view()
    shot(canvas, "category_run")


def test_trainer_node_shows_progress_while_it_runs(site, canvas):
    server, client, ckpt, _library = site
    tag = uuid.uuid4().hex[:8]
    data = f"ps_canvas_train_{tag}"
    for category, sample in {"perfume": "perfume_bottle.png", "tools": "wrench.png"}.items():
        folder = Path(server.base_dir) / "input" / data / category
        folder.mkdir(parents=True)
        cut = Image.open(SAMPLES / sample).convert("RGBA").resize((64, 64), Image.LANCZOS)
        cut.save(folder / "a.png")
        cut.transpose(Image.FLIP_LEFT_RIGHT).save(folder / "b.png")

    load(canvas, "category_library_training")
    train = node_by_type(canvas, "ProductSceneTrainCategoryLibrary")
    set_widget(canvas, node_by_type(canvas, "CheckpointLoaderSimple"), "ckpt_name", ckpt)
    steps = 8
    for name, value in {"data_folder": data, "steps": steps, "resolution": 64, "batch_size": 2,
                        "output_name": f"ps_canvas_{tag}", "checkpoint_every": 0}.items():
        set_widget(canvas, train, name, value)
    prompt_id = queue_from_canvas(canvas)
    assert prompt_id

    # while it runs: the status line under the widgets, the progress bar and the loss-curve preview
    canvas.page.wait_for_function("""([id, total]) => {
        const n = app.graph.getNodeById(id);
        const d = n.productsceneTraining;
        return d && d.step >= 3 && d.step < total;
    }""", arg=[train, steps], timeout=240_000, polling=50)
    live = canvas.evaluate("""(id) => {
        const n = app.graph.getNodeById(id);
        const w = n.widgets.find(w => w.name === 'productscene_training_status');
        return {status: w?.element?.textContent ?? '', detail: n.productsceneTraining,
                visible: !!w?.element?.isConnected,
                progress: n.progress ?? null};
    }""", train)
    canvas.fit_view()
    shot(canvas, "training_live")
    detail = live["detail"]
    assert detail["total"] == steps and 3 <= detail["step"] < steps
    assert detail["per_step"] > 0 and detail["eta"] > 0
    assert f"Step {detail['step']} / {steps}" in live["status"] and "loss" in live["status"], live
    assert live["visible"]
    assert len(detail["losses"]) == detail["step"] and all(np.isfinite(detail["losses"]))

    entry = wait_history(client, prompt_id, timeout=300)
    assert entry["status"].get("status_str") == "success", entry["status"]
    final = canvas.evaluate("(id) => app.graph.getNodeById(id).productsceneTraining", train)
    assert final["step"] == steps
    # the loss curve was put on the node as its preview image while it ran
    previews = canvas.evaluate("""(id) => {
        const p = app.nodePreviewImages?.[String(id)] ?? app.nodeOutputs?.[String(id)]?.images;
        return p ? p.length : 0;
    }""", train)
    assert previews >= 1
    canvas.page.wait_for_timeout(300)
    shot(canvas, "training_done")


# ------------------------------------------------------------------------------------ locale
def test_japanese_locale_shows_translated_node_names(site, canvas):
    ja = json.loads((ROOT / "locales" / "ja" / "nodeDefs.json").read_text(encoding="utf-8"))
    server = site[0]
    from tests.support.browser import post_settings

    post_settings(server.url, {"Comfy.Locale": "ja"})
    try:
        canvas.open()
        load(canvas, "category_background")
        names = canvas.evaluate("""() => {
            const out = {};
            for (const [name, type] of Object.entries(LiteGraph.registered_node_types))
                if (name.startsWith('ProductScene')) out[name] = type.title ?? type.nodeData?.display_name;
            return out;
        }""")
        assert names == {k: v["display_name"] for k, v in ja.items()}
        mask = node_by_type(canvas, "ProductSceneProductMask")
        labels = canvas.evaluate("""(id) => Object.fromEntries(app.graph.getNodeById(id).widgets
            .filter(w => w.label).map(w => [w.name, w.label]))""", mask)
        assert labels.get("source") == ja["ProductSceneProductMask"]["inputs"]["source"]["name"], labels
        slots = canvas.evaluate("""(id) => app.graph.getNodeById(id).inputs.map(i => i.label ?? i.localized_name ?? i.name)""", mask)
        assert slots[:2] == [ja["ProductSceneProductMask"]["inputs"][k]["name"] for k in ("image", "mask")], slots
        canvas.fit_view()
        shot(canvas, "locale_ja")
    finally:
        post_settings(server.url, {"Comfy.Locale": "en"})
        canvas.open()
