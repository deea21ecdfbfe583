"""The small synthetic world (host-free): a product catalogue whose categories differ in a known
way, written in the BG60k layout, for the world base model (``devkit/world_model.py``) and every
learning test.

Each image is 64x64: one product (a box or an ellipse of a random colour, size and place) on a
background whose style is its category's:

==========  ====================  ===========================================  ==================
category    colour                texture                                      layout
==========  ====================  ===========================================  ==================
linen       warm beige            fine horizontal threads (2 px period 4)      darker floor below
                                                                               y=44; product on it
meadow      green                 fine vertical blades (2 px period 4)         product anywhere
ocean       blue                  smooth                                       lighter sky above
                                                                               y=24
brick       brick red             8 px checkerboard                            product anywhere
==========  ====================  ===========================================  ==================

Every image draws its own colour jitter, pattern phase and pixel noise. The checkerboard sits on
the 8 px grid (what an 8x-down latent sees as colour); the fine textures only show as orientation.
Only one category has a coarse pattern: a coarse pattern of random phase is something a prompt
cannot place, so two of them (world v2 had vertical 8 px bands on meadow) are told apart only where
the noisy image already shows the phase, and the held-out meadow images picked brick (top-1 87.5%).
Each category now has a feature no other has that needs no placing (a texture orientation, a
layout at an edge, a tint); the category proof's scores on both worlds are in BENCHMARKS.md.

Layout on disk (the BG60k reader's, ``productscene.train.datasets``)::

    root/bg60k_info.txt            train split: "image_name category" lines
    root/bg60k_imgs_0/<id>.png
    root/bg60k_masks/<id>_mask.png RGBA cut-out, alpha > 128 = product
    root/bg1k_info.txt             held-out split (the reader's ``split="test"``)
    root/bg1k_imgs_0/<id>.png
    root/bg1k_masks/<id>_mask.png
    root/world.json                what was written (version, seed, counts, categories)

Deterministic: the same ``seed`` and counts give byte-identical files.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from productscene.errors import ProductSceneError
from productscene.files import temp_prefix

WORLD_VERSION = 3
SIZE = 64
# Every category has its own hue: a grey category sits at the mean of the others, where a model
# that ignores the prompt is already right, and its identifier is measured against the others'
# strength alone (measured with a grey "slate": its margin +2..+4% while the others' were +12..+18%).
CATEGORIES = ("brick", "linen", "meadow", "ocean")
COLOURS = {"brick": (180, 70, 50), "linen": (205, 180, 140), "meadow": (70, 160, 70), "ocean": (50, 90, 205)}
SPLITS = {"train": "bg60k", "test": "bg1k"}
TRAIN_PER_CATEGORY = 24
HELDOUT_PER_CATEGORY = 8
SEED = 2026


def background(category: str, g: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """``[size, size, 3]`` float RGB (0..255) of one ``category`` background."""
    if category not in COLOURS:
        raise ProductSceneError(f"category: expected one of {', '.join(CATEGORIES)}, got {category!r}")
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.array(COLOURS[category], np.float32) + g.uniform(-15, 15, 3)
    phase = int(g.integers(0, 2))
    if category == "linen":
        shade = 1.0 - 0.18 * ((yy // 2 + phase) % 2)
        shade = np.where(yy >= 44, shade * 0.7, shade)
    elif category == "meadow":
        shade = 1.0 - 0.18 * ((xx // 2 + phase) % 2)
    elif category == "ocean":
        shade = np.where(yy < 24, 1.3, 1.0)
    else:
        shade = 1.0 - 0.3 * ((xx // 8 + yy // 8 + phase) % 2)
    rgb = base[None, None] * shade[..., None]
    return rgb + g.normal(0, 4, rgb.shape)


def product_mask(category: str, g: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """``[size, size]`` bool: a box or an ellipse; on linen it stands on the floor (y = 44)."""
    w, h = (int(v) for v in g.integers(14, 28, 2))
    x0 = int(g.integers(2, size - w - 2))
    y0 = 44 - h + int(g.integers(0, 6)) if category == "linen" else int(g.integers(2, size - h - 2))
    yy, xx = np.mgrid[0:size, 0:size]
    if g.random() < 0.5:
        return (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
    cx, cy = x0 + w / 2, y0 + h / 2
    return ((xx + 0.5 - cx) / (w / 2)) ** 2 + ((yy + 0.5 - cy) / (h / 2)) ** 2 <= 1.0


def catalogue_image(category: str, g: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb uint8 [size,size,3], product mask bool [size,size])`` of one catalogue photo."""
    rgb = background(category, g, size)
    mask = product_mask(category, g, size)
    colour = g.uniform(20, 235, 3).astype(np.float32)
    rgb[mask] = colour + g.normal(0, 2, (int(mask.sum()), 3))
    return np.clip(rgb, 0, 255).astype(np.uint8), mask


def _write_split(root: str, prefix: str, per_category: int, g: np.random.Generator) -> list[str]:
    from PIL import Image
    img_dir = os.path.join(root, f"{prefix}_imgs_0")
    mask_dir = os.path.join(root, f"{prefix}_masks")
    os.makedirs(img_dir)
    os.makedirs(mask_dir)
    lines = []
    for i in range(per_category):
        for category in CATEGORIES:
            name = f"{prefix}_{category}_{i:03d}"
            rgb, mask = catalogue_image(category, g)
            Image.fromarray(rgb, "RGB").save(os.path.join(img_dir, name + ".png"))
            cut = np.zeros((SIZE, SIZE, 4), np.uint8)
            cut[..., :3] = rgb
            cut[..., 3] = np.where(mask, 255, 0)
            Image.fromarray(cut, "RGBA").save(os.path.join(mask_dir, name + "_mask.png"))
            lines.append(f"{name}.png {category}")
    with open(os.path.join(root, f"{prefix}_info.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return lines


def describe(seed: int = SEED, train_per_category: int = TRAIN_PER_CATEGORY,
             heldout_per_category: int = HELDOUT_PER_CATEGORY) -> dict:
    return {"version": WORLD_VERSION, "seed": int(seed), "size": SIZE, "categories": list(CATEGORIES),
            "train_per_category": int(train_per_category), "heldout_per_category": int(heldout_per_category),
            "layout": "bg60k", "splits": dict(SPLITS)}


def write_world(root, seed: int = SEED, train_per_category: int = TRAIN_PER_CATEGORY,
                heldout_per_category: int = HELDOUT_PER_CATEGORY) -> str:
    """Write the catalogue to ``root`` (a new folder; written under a temporary name, then renamed).
    Returns ``root``. An existing ``root`` whose ``world.json`` matches is kept as it is."""
    root = os.fspath(root)
    want = describe(seed, train_per_category, heldout_per_category)
    if read_description(root) == want:
        return root
    if os.path.exists(root):
        shutil.rmtree(root)
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=temp_prefix(root), dir=parent)
    g = np.random.default_rng(seed)
    _write_split(tmp, SPLITS["train"], int(train_per_category), g)
    _write_split(tmp, SPLITS["test"], int(heldout_per_category), g)
    with open(os.path.join(tmp, "world.json"), "w", encoding="utf-8") as fh:
        json.dump(want, fh, indent=1)
    try:
        os.replace(tmp, root)
    except OSError:                      # another process wrote it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if read_description(root) != want:
            raise
    return root


def read_description(root) -> dict | None:
    try:
        with open(os.path.join(os.fspath(root), "world.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None
