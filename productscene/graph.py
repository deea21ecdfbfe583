"""API-format ComfyUI graphs: bind a workflow's inputs by node title, check values against a
server's ``/object_info``. Host-free, standard library only.

The binding convention (docs/batch.md): a node's title (``_meta.title`` in the API twin, ``title``
on the canvas) names what a headless run fills in. A title matches a name when it equals it, case
and surrounding spaces aside, or continues it with a remark in parentheses
(``Product image (PNG with alpha)`` matches ``Product image``). Each *role* below is one input of
the node with that title; any other input is addressed as ``"<title>.<input>"``::

    prompt = bind(workflow, {"product": "productscene_batch/ab12.png", "category": "perfume",
                             "seed": 7, "output": "catalogue/bottle",
                             "Checkpoint.ckpt_name": "sd15.safetensors", "Sampler.steps": 30})
"""
from __future__ import annotations

import json
from typing import NamedTuple

from .errors import ProductSceneError


class Role(NamedTuple):
    title: str                 # the node's title
    inputs: tuple[str, ...]    # the first of these the node has receives the value
    what: str                  # for documentation and errors


ROLES: dict[str, Role] = {
    "product": Role("Product image", ("image",), "the product photo, uploaded to the server"),
    "reference": Role("Brand reference", ("image",), "the brand reference image, uploaded to the server"),
    "category": Role("Category prompt", ("category",), "the product category"),
    "prompt": Role("Category prompt", ("template", "text"), "the prompt ({category} marks the identifier)"),
    "negative_prompt": Role("Negative prompt", ("text",), "the negative prompt"),
    "seed": Role("Sampler", ("seed", "noise_seed"), "the sampler's seed"),
    "output": Role("Output image", ("filename_prefix",), "the image to save; its filename prefix"),
}


def is_link(value) -> bool:
    """An input fed by another node's output: ``[node_id, output_index]``."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def title_of(node: dict) -> str:
    return str((node.get("_meta") or {}).get("title") or "")


def title_matches(title: str, name: str) -> bool:
    t, n = " ".join(title.split()).casefold(), " ".join(name.split()).casefold()
    return t == n or (t.startswith(n + " (") and t.endswith(")"))


def load_workflow(path) -> dict:
    """An API-format workflow (``{id: {"class_type", "inputs"}}``) from a JSON file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ProductSceneError(f"workflow: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ProductSceneError(f"workflow: {path} is not JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        raise ProductSceneError(
            f"workflow: {path} is a canvas-format workflow; give its API-format twin (workflows/api/<name>.json, "
            f"or on the canvas: Workflow > Export (API))")
    if (not isinstance(data, dict) or not data
            or not all(isinstance(n, dict) and "class_type" in n for n in data.values())):
        raise ProductSceneError(f"workflow: {path} is not an API-format ComfyUI workflow "
                                f"(expected {{node id: {{\"class_type\", \"inputs\"}}}})")
    return data


def workflow_hash(prompt: dict) -> str:
    """sha256 of the graph's canonical JSON (key order and white space do not count)."""
    import hashlib
    blob = json.dumps(prompt, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def find_node(prompt: dict, *, class_type: str | None = None, title: str | None = None) -> str:
    """The id of the one node with this class type and/or title (title matched as above)."""
    hits = [k for k, n in prompt.items()
            if (class_type is None or n.get("class_type") == class_type)
            and (title is None or title_matches(title_of(n), title))]
    if len(hits) != 1:
        what = " ".join(x for x in (class_type and f"{class_type} node", title and f"titled {title!r}") if x)
        found = "none" if not hits else f"{len(hits)} (nodes {', '.join(hits)})"
        raise ProductSceneError(f"workflow: expected exactly one node {what or ''}, found {found}")
    return hits[0]


def target(prompt: dict, key: str) -> tuple[str, str]:
    """``(node id, input name)`` that ``key`` (a role name or ``"<title>.<input>"``) binds.
    ProductSceneError naming the key when the workflow has no such node or input."""
    if key in ROLES:
        role = ROLES[key]
        titled = [k for k, n in prompt.items() if title_matches(title_of(n), role.title)]
        if not titled:
            raise ProductSceneError(f"workflow: no node titled {role.title!r} ({key}: {role.what})")
        fits = [(k, name) for k in titled for name in role.inputs if name in prompt[k].get("inputs", {})][:1]
        if len(titled) > 1:
            raise ProductSceneError(f"workflow: {len(titled)} nodes are titled {role.title!r} "
                                    f"(nodes {', '.join(titled)}); {key} needs exactly one")
        if not fits:
            raise ProductSceneError(f"workflow: the node titled {role.title!r} (node {titled[0]}, "
                                    f"{prompt[titled[0]].get('class_type')}) has no input "
                                    f"{' or '.join(map(repr, role.inputs))} for {key}")
        return fits[0]
    title, dot, name = key.rpartition(".")
    if not dot or not title or not name:
        raise ProductSceneError(f"{key!r}: expected a role ({', '.join(ROLES)}) or '<node title>.<input>'")
    node_id = find_node(prompt, title=title)
    if name not in prompt[node_id].get("inputs", {}):
        have = [k for k, v in prompt[node_id].get("inputs", {}).items() if not is_link(v)]
        raise ProductSceneError(f"{key!r}: the node titled {title!r} ({prompt[node_id].get('class_type')}) "
                                f"has no input {name!r} (it has: {', '.join(have)})")
    return node_id, name


def has_role(prompt: dict, role: str) -> bool:
    return any(title_matches(title_of(n), ROLES[role].title) for n in prompt.values())


def bind(prompt: dict, values: dict, targets: dict | None = None) -> dict:
    """A copy of ``prompt`` with ``values`` (keys as for :func:`target`) set. The nodes and their
    inputs are copied; what they hold is shared (never changed here). ``targets``: a dict this
    call fills with each key's target, for callers that bind the same graph many times."""
    out = {k: {**n, "inputs": dict(n.get("inputs", {}))} for k, n in prompt.items()}
    for key, value in values.items():
        if targets is None:
            node_id, name = target(out, key)
        else:
            if key not in targets:
                targets[key] = target(out, key)
            node_id, name = targets[key]
        if is_link(out[node_id]["inputs"][name]):
            raise ProductSceneError(f"{key!r}: input {name!r} of node {node_id} ({out[node_id].get('class_type')}) "
                                    f"is fed by another node; a bound input must be a widget value")
        out[node_id]["inputs"][name] = value
    return out


# ------------------------------------------------------------------------------ server checks
def combo_options(spec) -> list | None:
    """The options of a combo input spec (``[[...], {...}]`` or ``["COMBO", {"options": [...]}]``),
    None for any other spec."""
    if isinstance(spec[0], list):
        return list(spec[0])
    if spec[0] == "COMBO":
        return list((spec[1] if len(spec) > 1 else {}).get("options", []))
    return None


def input_spec(object_info: dict, class_type: str, name: str):
    info = object_info.get(class_type) or {}
    for section in ("required", "optional"):
        spec = (info.get("input") or {}).get(section, {}).get(name)
        if spec is not None:
            return spec
    return None


def shorten(options: list, n: int = 10) -> str:
    return ", ".join(map(repr, options[:n])) + (f" ... ({len(options)} in all)" if len(options) > n else "")


def check_value(spec, value) -> str | None:
    """What is wrong with ``value`` for an input with this ``/object_info`` spec, or None."""
    options = combo_options(spec)
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options is not None:
        return None if value in options else f"{value!r} is not offered (it has: {shorten(options)})"
    kind = spec[0]
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected a whole number, got {value!r}"
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"expected text, got {value!r}"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    else:
        return None
    if "min" in opts and value < opts["min"]:
        return f"{value} is below the minimum {opts['min']}"
    if "max" in opts and value > opts["max"]:
        return f"{value} is above the maximum {opts['max']}"
    return None


def coerce(spec, raw: str):
    """A text value (command line, CSV cell) as the type the spec wants; ProductSceneError if it is not one."""
    kind = spec[0] if combo_options(spec) is None else "COMBO"
    text = raw.strip() if kind in ("INT", "FLOAT", "BOOLEAN") else raw
    try:
        if kind == "INT":
            return int(text)
        if kind == "FLOAT":
            return float(text)
    except ValueError:
        raise ProductSceneError(f"expected {'a whole number' if kind == 'INT' else 'a number'}, got {raw!r}") from None
    if kind == "BOOLEAN":
        low = text.lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ProductSceneError(f"expected true or false, got {raw!r}")
    return raw


def check_prompt(prompt: dict, object_info: dict, skip=()) -> list[str]:
    """Every problem a server would have with this graph's node types and widget values
    (``skip``: ``(node id, input)`` pairs not to check, e.g. images uploaded later)."""
    problems = []
    missing = sorted({n.get("class_type") for n in prompt.values()} - set(object_info))
    if missing:
        problems.append(f"the server has no node type {', '.join(missing)} (install the custom node pack that "
                        f"provides it and restart the server)")
    skip = set(skip)
    for node_id, node in prompt.items():
        if node.get("class_type") in missing:
            continue
        for name, value in node.get("inputs", {}).items():
            if is_link(value) or (node_id, name) in skip:
                continue
            spec = input_spec(object_info, node["class_type"], name)
            why = check_value(spec, value) if spec is not None else None
            if why:
                problems.append(f"node {node_id} {title_of(node) or node['class_type']!r} input {name!r}: {why}")
    return problems
