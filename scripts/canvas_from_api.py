"""Write a canvas workflow (workflows/<title>.json, what ComfyUI's template browser lists) from its
API twin (workflows/api/<id>.json), laid out left to right by depth, using a real ComfyUI server's
/object_info for inputs, outputs and widget order (the same rules tests/test_workflows.py checks).

    .venv/bin/python scripts/canvas_from_api.py <id> "<Title>" "<about text>" "<note text>"
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGETS


def _object_info() -> dict:
    from devkit.locales import server_object_info
    return server_object_info()


# hand-placed nodes (id -> (pos, size); "note" for the read-me), so nothing overlaps once the
# frontend draws the widgets and a 1600x900 view fits the graph at a readable zoom
LAYOUTS = {
    "concept_extraction": {
        "note": ([20, 80], [400, 380]), "1": ([20, 500], [400, 100]), "2": ([440, 80], [280, 320]),
        "7": ([440, 440], [280, 300]), "3": ([740, 80], [320, 300]), "4": ([1080, 80], [320, 300]),
        "5": ([740, 440], [320, 240]), "6": ([1420, 80], [480, 680])},
    "concept_recompose": {
        "note": ([20, 80], [420, 360]), "1": ([20, 480], [420, 100]), "2": ([470, 80], [400, 330]),
        "3": ([470, 450], [400, 160]), "5": ([900, 80], [300, 200]), "4": ([900, 320], [300, 340]),
        "6": ([900, 700], [300, 130]), "7": ([1230, 80], [300, 270]), "8": ([1230, 390], [300, 50]),
        "9": ([1560, 80], [360, 400])},
    "category_brand_background": {
        "note": ([20, 80], [300, 250]), "2": ([20, 380], [300, 340]), "14": ([20, 770], [300, 60]),
        "1": ([340, 80], [300, 100]), "3": ([340, 230], [300, 420]), "8": ([340, 700], [300, 50]),
        "7": ([340, 800], [300, 30]), "4": ([660, 80], [320, 250]), "5": ([660, 380], [320, 130]),
        "9": ([660, 560], [320, 50]), "6": ([660, 660], [320, 160]), "15": ([1000, 80], [300, 340]),
        "16": ([1000, 470], [300, 150]), "17": ([1000, 670], [300, 200]), "10": ([1320, 80], [300, 270]),
        "11": ([1320, 400], [300, 50]), "12": ([1320, 500], [300, 110]), "13": ([1320, 660], [300, 270])},
}
LAYOUTS["category_brand_background_ipadapter"] = LAYOUTS["category_brand_background"]
# Flux.1 and Z-Image: the same places (node 8 is FluxGuidance on Flux, ModelSamplingAuraFlow on Z-Image)
LAYOUTS["category_background_flux"] = LAYOUTS["category_background_z_image"] = {
    "note": ([20, 80], [320, 300]), "4": ([20, 430], [320, 340]),
    "1": ([360, 80], [320, 90]), "2": ([360, 220], [320, 140]), "3": ([360, 410], [320, 60]),
    "5": ([360, 520], [320, 420]),
    "6": ([700, 80], [340, 250]), "8": ([700, 380], [340, 60]), "7": ([700, 490], [340, 30]),
    "10": ([700, 570], [340, 30]), "11": ([700, 650], [340, 50]),
    "9": ([1060, 80], [320, 160]), "12": ([1060, 290], [320, 50]), "13": ([1060, 390], [320, 270]),
    "14": ([1400, 80], [300, 50]), "15": ([1400, 180], [300, 110]), "16": ([1400, 340], [300, 270])}


def _project() -> tuple[str, str]:
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["name"].lower(), project["version"]


def canvas(api: dict, info: dict, workflow_id: str, about: str, note: str) -> dict:
    pack_id, version = _project()
    depth: dict[str, int] = {}

    def d(nid):
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((d(u) for u in ups), default=-1)
        return depth[nid]

    for nid in api:
        d(nid)
    order = sorted(api, key=lambda k: (depth[k], int(k)))
    nodes, links, rows = {}, [], {}
    for i, nid in enumerate(order):
        node = api[nid]
        ni = info[node["class_type"]]
        seq = ni.get("input_order") or {s: list(ni["input"].get(s, {})) for s in ("required", "optional")}
        specs = [(name, ni["input"][s][name]) for s in ("required", "optional") for name in seq.get(s, [])]
        inputs, values = [], []
        for name, spec in specs:
            given = node["inputs"].get(name)
            if isinstance(given, list) or not _is_widget(spec):
                inputs.append({"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": None})
                continue
            values.append(given)
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                values.append("fixed")
            if opts.get("image_upload"):
                values.append("image")
        col = depth[nid]
        row = rows.get(col, 0)
        height = 60 + 26 * (len(inputs) + len(values))
        rows[col] = row + height + 40
        nodes[nid] = {"id": int(nid), "type": node["class_type"], "pos": [20 + 460 * col, 40 + row],
                      "size": [420, height], "flags": {}, "order": i, "mode": 0, "inputs": inputs,
                      "outputs": [{"name": name, "type": typ, "slot_index": j, "links": []}
                                  for j, (name, typ) in enumerate(zip(ni["output_name"], ni["output"]))],
                      "title": node["_meta"]["title"],
                      "properties": {"Node name for S&R": node["class_type"],
                                     **({"cnr_id": pack_id, "ver": version}
                                        if ni["python_module"].startswith("custom_nodes.")
                                        else {"cnr_id": "comfy-core", "ver": "0.3.75"})},
                      "widgets_values": values}
    for nid in order:
        for name, value in api[nid]["inputs"].items():
            if not isinstance(value, list):
                continue
            link_id = len(links) + 1
            slot = next(j for j, inp in enumerate(nodes[nid]["inputs"]) if inp["name"] == name)
            typ = nodes[value[0]]["outputs"][value[1]]["type"]
            nodes[nid]["inputs"][slot]["link"] = link_id
            nodes[nid]["inputs"][slot]["type"] = typ
            nodes[value[0]]["outputs"][value[1]]["links"].append(link_id)
            links.append([link_id, int(value[0]), int(value[1]), int(nid), slot, typ])
    layout = LAYOUTS.get(workflow_id, {})
    for nid, (pos, size) in layout.items():
        if nid in nodes:
            nodes[nid]["pos"], nodes[nid]["size"] = list(pos), list(size)
    note_pos, note_size = layout.get("note", ([20, 40 + max(rows.get(0, 0), 400)], [420, 360]))
    note_id = max(int(k) for k in api) + 1
    readme = {"id": note_id, "type": "Note", "pos": list(note_pos), "size": list(note_size),
              "flags": {}, "order": len(order), "mode": 0, "inputs": [], "outputs": [], "title": "Read me first",
              "properties": {}, "widgets_values": [note], "color": "#432", "bgcolor": "#653"}
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "productscene/" + workflow_id)), "revision": 0,
            "last_node_id": note_id, "last_link_id": len(links),
            "nodes": [nodes[k] for k in order] + [readme], "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [40, 60]},
                      "productscene": {"workflow": workflow_id, "version": 1, "about": about}},
            "version": 0.4}


def main(argv) -> int:
    workflow_id, title, about, note = argv[1], argv[2], argv[3], argv[4]
    api = json.loads((ROOT / "workflows" / "api" / f"{workflow_id}.json").read_text())
    out = ROOT / "workflows" / f"{title}.json"
    out.write_text(json.dumps(canvas(api, _object_info(), workflow_id, about, note), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
