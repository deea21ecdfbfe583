"""Per-block weights of a reference: which UNet blocks receive it, and how strongly. Host-free.

Blocks are named as ComfyUI keys them: ``input.8`` is every cross-attention layer of input block 8,
``input.8.3`` its fourth transformer layer only. The presets:

- ``style``: the blocks that carry style. SDXL: ``output.1`` (diffusers' ``up_blocks.0.attentions.1``),
  the block InstantStyle (Wang et al. 2024, section 3.3) found to carry style and IPAdapter_plus's
  "style transfer" weight type uses (its transformer index 6). SD1.5 / SD2.x: ``input.1``, ``input.2``,
  ``input.4``, ``input.5`` and ``output.5`` to ``output.11``, IPAdapter_plus's "style transfer" for
  SD1.5 (its indices 0-3 and 9-15).
- ``layout``: the blocks that carry composition. SDXL: ``input.8`` (``down_blocks.2.attentions.1``),
  InstantStyle's layout block and IPAdapter_plus's "composition" (index 3). SD1.5 / SD2.x:
  ``input.8`` and ``input.7`` at a quarter of the weight, IPAdapter_plus's "composition" (indices 5 and 4).
- ``style and layout``: both, the style blocks at ``weight``, the layout blocks at ``layout_weight``.
"""
from __future__ import annotations

import math
from typing import Iterable

from .errors import ProductSceneError

PRESETS = ("all layers", "style", "layout", "style and layout")
_SD15_STYLE = {("input", i): 1.0 for i in (1, 2, 4, 5)} | {("output", i): 1.0 for i in range(5, 12)}
PRESET_BLOCKS = {  # family -> preset -> {(block, index): factor}
    "sdxl": {"style": {("output", 1): 1.0}, "layout": {("input", 8): 1.0}},
    "sd15": {"style": _SD15_STYLE, "layout": {("input", 7): 0.25, ("input", 8): 1.0}},
}
PRESET_BLOCKS["sd2"] = PRESET_BLOCKS["sd15"]  # the same block layout


def describe(family: str, preset: str) -> str:
    """``input.7 x0.25, input.8`` for the README and errors."""
    return ", ".join(f"{b}.{i}" + ("" if f == 1.0 else f" x{f:g}") for (b, i), f in PRESET_BLOCKS[family][preset].items())


def _check_weight(value, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ProductSceneError(f"{what}: expected a number, got {value!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 10.0):
        raise ProductSceneError(f"{what}: expected a number from 0 to 10, got {value!r}")
    return value


def parse(text: str, keys: Iterable[tuple]) -> dict[tuple, float]:
    """``"output.1:1, input.8:0.5"`` -> ``{layer key: factor}`` over ``keys`` (a block name covers
    all its layers; a layer named twice takes the last value). Unnamed layers get 0."""
    keys = list(keys)
    out: dict[tuple, float] = {}
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        name, sep, value = item.partition(":")
        if not sep:
            raise ProductSceneError(f"block_weights: expected 'block:weight' items like 'output.1:1.0', got {item!r}")
        parts = name.strip().split(".")
        if not (len(parts) in (2, 3) and parts[0] in ("input", "middle", "output")
                and all(p.isdigit() for p in parts[1:])):
            raise ProductSceneError(f"block_weights: {name.strip()!r} is not a block name like 'input.8' or 'input.8.0'")
        prefix = (parts[0],) + tuple(int(p) for p in parts[1:])
        hit = [k for k in keys if tuple(k[:len(prefix)]) == prefix]
        if not hit:
            blocks = sorted({f"{k[0]}.{k[1]}" for k in keys}, key=lambda s: (s.split(".")[0], int(s.split(".")[1])))
            raise ProductSceneError(f"block_weights: {name.strip()!r} names no cross-attention layer of this model; "
                                    f"its blocks are {', '.join(blocks)}")
        factor = _check_weight(value.strip(), f"block_weights: {name.strip()}")
        out.update({k: factor for k in hit})
    if not out:
        raise ProductSceneError("block_weights: names no block; leave it empty to use the preset")
    return out


def layer_weights(family: str, keys: Iterable[tuple], weight: float, preset: str = "all layers",
                  layout_weight: float = 1.0, text: str = "") -> dict[tuple, float] | None:
    """The weight of every layer of ``keys`` (None: ``weight`` on every layer). ``text``, when
    given, replaces the preset: each block's value times ``weight`` (as IPAdapter_plus's layer weights)."""
    keys = list(keys)
    weight = _check_weight(weight, "weight")
    if text and str(text).strip():
        return {k: weight * f for k, f in parse(text, keys).items()}
    if preset not in PRESETS:
        raise ProductSceneError(f"blocks: expected one of {', '.join(PRESETS)}, got {preset!r}")
    if preset == "all layers":
        return None
    if family not in PRESET_BLOCKS:
        raise ProductSceneError(f"blocks: no {preset!r} preset for {family!r}")
    layout_weight = _check_weight(layout_weight, "layout_weight")
    out = {k: 0.0 for k in keys}
    parts = [("style", weight), ("layout", layout_weight)] if preset == "style and layout" else [(preset, weight)]
    for part, w in parts:
        for block, factor in PRESET_BLOCKS[family][part].items():
            for k in keys:
                if tuple(k[:2]) == block:
                    out[k] = w * factor
    return out
