"""What the template browser and a new user get with the canvas workflows (workflows/*.json): a
readable title (the frontend shows the file name), a same-name thumbnail, a note saying what to load
and what to expect, the registry id the pack publishes under, and the node translations
(locales/<lang>/nodeDefs.json) in step with the nodes."""
from __future__ import annotations

import json
import re
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from devkit import locales

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
CANVAS_FILES = sorted(WORKFLOWS.glob("*.json"))
LOCALES = ROOT / "locales"
LANGUAGES = ("en", "ja", "zh")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("path", CANVAS_FILES, ids=[p.stem for p in CANVAS_FILES])
def test_canvas_workflow_is_a_readable_template(path):
    # the template browser shows the file name as title and (with - and _ as spaces) as description
    assert re.fullmatch(r"[A-Z][A-Za-z0-9 ,()]+", path.stem) and len(path.stem) <= 28, path.stem
    thumbnail = path.with_suffix(".jpg")  # what the frontend asks for, for every custom-node template
    assert thumbnail.is_file(), f"{thumbnail.name} missing (scripts/make_thumbnails.py)"
    with Image.open(thumbnail) as im:
        assert im.format == "JPEG" and im.size == (512, 512)
        assert len(set(im.convert("RGB").resize((32, 32)).getdata())) > 50  # a picture, not a blank
    canvas = json.loads(path.read_text())
    notes = [n for n in canvas["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1, "one note saying what to load and what to expect"
    text = notes[0]["widgets_values"][0]
    assert "BEFORE YOU RUN" in text and "WHAT YOU GET" in text
    assert "transparent" in text and "cut-out" in text  # a cut-out PNG with alpha comes first


@pytest.mark.parametrize("path", CANVAS_FILES, ids=[p.stem for p in CANVAS_FILES])
def test_only_core_and_pack_nodes_with_the_registry_id_the_pack_publishes_under(path, object_info):
    # the registry's node id is pyproject's [project] name (compared case-insensitively); core nodes
    # belong to "comfy-core"
    pack_id = PROJECT["name"].lower()
    assert re.fullmatch(r"[a-z][a-z0-9_.-]*", pack_id)
    for node in json.loads(path.read_text())["nodes"]:
        if node["type"] == "Note":
            continue
        props = node["properties"]
        module = object_info[node["type"]]["python_module"]
        if module.startswith("custom_nodes."):
            assert node["type"].startswith("ProductScene"), node["type"]  # no other pack
            assert props["cnr_id"] == pack_id and props["ver"] == PROJECT["version"], node["id"]
        else:
            assert module == "nodes" or module.startswith("comfy_extras."), (node["type"], module)
            assert props["cnr_id"] == "comfy-core", node["id"]


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server[1].object_info()


def test_template_browser_serves_templates_and_thumbnails(comfy_server):
    server, client = comfy_server
    listed = client.get("/workflow_templates")[server.pack_name]
    assert sorted(listed) == sorted(p.stem for p in CANVAS_FILES)  # no API twins among them
    for name in listed:
        for suffix, kind in ((".json", "application/json"), (".jpg", "image/jpeg")):
            url = f"{server.url}/api/workflow_templates/{server.pack_name}/{urllib.parse.quote(name + suffix)}"
            with urllib.request.urlopen(url, timeout=30) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith(kind), (name, suffix)


def test_english_node_translations_match_the_nodes(comfy_server):
    _server, client = comfy_server
    english = locales.english_node_defs(client.object_info())
    saved = json.loads((LOCALES / "en" / "nodeDefs.json").read_text(encoding="utf-8"))
    assert saved == english, "locales/en/nodeDefs.json is stale: run scripts/update_locales.py"
    for node, entry in english.items():  # every input and output explains itself on the canvas
        untold = [k for k, v in {**entry["inputs"], **entry["outputs"]}.items() if not v.get("tooltip")]
        assert not untold and entry.get("description"), (node, untold)


@pytest.mark.parametrize("lang", [l for l in LANGUAGES if l != "en"])
def test_every_language_translates_every_name_and_tooltip(lang):
    gaps = locales.gaps
    english = json.loads((LOCALES / "en" / "nodeDefs.json").read_text(encoding="utf-8"))
    other = json.loads((LOCALES / lang / "nodeDefs.json").read_text(encoding="utf-8"))
    missing, extra = gaps(english, other)
    assert not missing and not extra, (missing, extra)
    for node, entry in other.items():
        assert entry["display_name"] != english[node]["display_name"], (lang, node)
        assert entry["display_name"].endswith("(ProductScene)")
        for name, item in entry["inputs"].items():
            assert item["tooltip"].strip() and item["tooltip"] != english[node]["inputs"][name]["tooltip"], (node, name)
    # the extension's own texts, with the same placeholders
    main = {l: json.loads((LOCALES / l / "main.json").read_text(encoding="utf-8"))["productscene"] for l in ("en", lang)}
    for group, texts in main["en"].items():
        for key, text in texts.items():
            translated = main[lang][group][key]
            assert sorted(re.findall(r"\{\w+\}", translated)) == sorted(re.findall(r"\{\w+\}", text)), (lang, key)


def test_server_serves_the_translations(comfy_server):
    _server, client = comfy_server
    served = client.get("/i18n")
    for lang in LANGUAGES:
        ours = json.loads((LOCALES / lang / "nodeDefs.json").read_text(encoding="utf-8"))
        for node, entry in ours.items():
            assert served[lang]["nodeDefs"][node]["display_name"] == entry["display_name"]
        assert served[lang]["productscene"]["categories"]["search"]


def test_server_puts_the_sample_cut_outs_in_its_input_folder(comfy_server):
    # the category workflow opens with productscene_perfume_bottle.png: it must exist for a new user
    server, _client = comfy_server
    samples = [p for folder in ("products", "scenes", "references") for p in sorted((ROOT / "samples" / folder).glob("*.png"))]
    assert any(p.parent.name == "references" for p in samples)
    for sample in samples:
        copy = Path(server.base_dir) / "input" / f"productscene_{sample.name}"
        assert copy.read_bytes() == sample.read_bytes(), copy
    loads = [n for p in CANVAS_FILES for n in json.loads(p.read_text())["nodes"] if n["type"] in ("LoadImage", "LoadImageMask")]
    assert loads and all(n["widgets_values"][0] in {f"productscene_{s.name}" for s in samples} for n in loads)


def test_sample_copies_never_replace_a_users_file(pack, tmp_path):
    samples = pack.nodes.samples
    (tmp_path / "productscene_wrench.png").write_bytes(b"the user's own file")
    written = samples.copy_samples(str(tmp_path))
    assert "productscene_wrench.png" not in written and "productscene_perfume_bottle.png" in written
    assert (tmp_path / "productscene_wrench.png").read_bytes() == b"the user's own file"
    assert not list(tmp_path.glob("*.partial"))
    assert samples.copy_samples(str(tmp_path)) == []  # idempotent


def test_recompose_opens_with_the_file_extract_writes():
    """The Recompose template's Concept Tokens choice is the file the Extract template writes, in the
    canvas workflows and their API twins: run one after the other, they chain with no edit."""
    def value(wf, node_type, index):
        return next(n["widgets_values"][index] for n in wf["nodes"] if n["type"] == node_type)

    def api_input(api, class_type, name):
        return next(n["inputs"][name] for n in api.values() if n["class_type"] == class_type)

    extract = json.loads((WORKFLOWS / "Extract concepts.json").read_text())
    recompose = json.loads((WORKFLOWS / "Recompose concepts.json").read_text())
    extract_api = json.loads((WORKFLOWS / "api" / "concept_extraction.json").read_text())
    recompose_api = json.loads((WORKFLOWS / "api" / "concept_recompose.json").read_text())
    written = api_input(extract_api, "ProductSceneMultiConceptInversion", "output_name") + ".safetensors"
    assert api_input(recompose_api, "ProductSceneConceptTokens", "tokens") == written
    assert value(recompose, "ProductSceneConceptTokens", 0) == written
    assert value(extract, "ProductSceneMultiConceptInversion", 12) + ".safetensors" == written
