"""Keep the node translations in locales/ in step with the nodes.

    .venv/bin/python scripts/update_locales.py          # rewrite locales/en/nodeDefs.json, list gaps
    .venv/bin/python scripts/update_locales.py --check  # exit 1 if en is stale or a language has gaps

(the script runs :func:`main`; the tests and scripts/canvas_from_api.py use the functions)

locales/en/nodeDefs.json is made from the node definitions a real ComfyUI server with this pack
reports (/object_info): display names, descriptions, input and output names and tooltips, in the
layout ComfyUI's frontend reads (nodeDefs.<node>.inputs.<input>.name|tooltip,
nodeDefs.<node>.outputs.<index>.name|tooltip). Every other language must have the same keys
(tests/test_locales.py checks both).
"""
from __future__ import annotations

import argparse
import json

from .paths import REPO_ROOT as ROOT
LOCALES = ROOT / "locales"
PREFIX = "ProductScene"


def english_node_defs(object_info: dict) -> dict:
    out = {}
    for name, info in sorted(object_info.items()):
        if not name.startswith(PREFIX):
            continue
        entry = {"display_name": info["display_name"]}
        if info.get("description"):
            entry["description"] = info["description"]
        inputs = {}
        order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
        for section in ("required", "optional"):
            for input_name in order.get(section, []):
                spec = info["input"][section][input_name]
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                item = {"name": input_name}
                if options.get("tooltip"):
                    item["tooltip"] = options["tooltip"]
                inputs[input_name] = item
        if inputs:
            entry["inputs"] = inputs
        outputs = {}
        tooltips = info.get("output_tooltips") or []
        for i, output_name in enumerate(info.get("output_name") or []):
            item = {"name": output_name}
            if i < len(tooltips) and tooltips[i]:
                item["tooltip"] = tooltips[i]
            outputs[str(i)] = item
        if outputs:
            entry["outputs"] = outputs
        out[name] = entry
    return out


def keys(tree, prefix=()) -> set[tuple]:
    if isinstance(tree, dict):
        return set().union(*(keys(v, prefix + (k,)) for k, v in tree.items())) if tree else set()
    return {prefix}


def gaps(english: dict, other: dict) -> tuple[list, list]:
    """(missing, extra) key paths of ``other`` against ``english``."""
    want, have = keys(english), keys(other)
    return sorted(".".join(k) for k in want - have), sorted(".".join(k) for k in have - want)


def server_object_info() -> dict:
    from . import comfy_env  # noqa: F401  (the ComfyUI tree)
    from .launcher import ComfyServer

    with ComfyServer(comfy_env.COMFYUI_DIR) as server:
        return server.client().object_info()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 on a stale or incomplete locale")
    args = parser.parse_args()
    english = english_node_defs(server_object_info())
    path = LOCALES / "en" / "nodeDefs.json"
    text = json.dumps(english, ensure_ascii=False, indent=2) + "\n"
    ok = True
    if path.exists() and path.read_text(encoding="utf-8") == text:
        print(f"{path.relative_to(ROOT)}: up to date")
    elif args.check:
        print(f"{path.relative_to(ROOT)}: stale (run scripts/update_locales.py)")
        ok = False
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: written")
    for lang in sorted(p.name for p in LOCALES.iterdir() if p.is_dir() and p.name != "en"):
        other = json.loads((LOCALES / lang / "nodeDefs.json").read_text(encoding="utf-8"))
        missing, extra = gaps(english, other)
        for k in missing:
            print(f"{lang}: missing {k}")
        for k in extra:
            print(f"{lang}: no longer used {k}")
        ok = ok and not missing and not extra
    return 0 if ok else 1

