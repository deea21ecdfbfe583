"""Training data sets (host-free): the BG60k layout and a simple folder layout.

Readers only index file paths; images are read one item at a time (a 60k-image set is never held
in memory). :func:`check` reads every file once and reports EVERY problem at once.
VAE latents are encoded once and cached on disk (:class:`LatentCache`).

Layouts
-------
``folder``: ``root/<category>/<name>.png`` with an alpha channel (alpha > 128 = product), or any
image (png/jpg/jpeg/webp) with a sibling ``<name>_mask.png`` (alpha > 128 if it has alpha, else
luminance >= 128 = product).

``bg60k`` (SPEC section 1): ``bg60k_info.txt`` lines ``image_name category_name``; images in
``bg60k_imgs_{k}/``; masks are RGBA cut-outs ``{id}_mask.png`` (alpha > 128 = product) beside the
image or in the split's own mask folders (``bg60k_masks*/``, or a shared ``masks/``) directly in
the root, never elsewhere in the tree nor in another split's folders; ``bg1k_*`` is the 1k test
split (``split="test"``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import ProductSceneError
from ..files import load_tensors, save_safetensors_atomic
from .. import images as image_files
from ..masks import resize_to_layer

BG60K_LICENSE = ("Trained on BG60k, which is licensed for academic research use only; these weights "
                 "inherit that restriction.")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MASK_SUFFIX = "_mask"
LAYOUTS = ("folder", "bg60k")


@dataclass(frozen=True)
class Item:
    image: str                 # path of the image
    mask: str | None           # path of a mask file, or None: the image's own alpha
    category: str


@dataclass(frozen=True)
class Problem:
    kind: str      # missing image | missing mask | unreadable | size mismatch | empty mask | full mask |
                   # unknown category | malformed line | no images | ambiguous image | ambiguous mask
    path: str
    detail: str = ""

    def __str__(self):
        return f"{self.kind}: {self.path}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class DatasetReport:
    root: str
    layout: str
    items: int
    categories: list[str]
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    def message(self, limit: int | None = 200) -> str:
        if self.ok:
            return (f"data ({self.layout}) {self.root}: {self.items} images in "
                    f"{len(self.categories)} categories, no problems")
        summary = ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))
        lines = [f"data ({self.layout}) {self.root}: {len(self.problems)} problem(s) found ({summary}); "
                 f"fix them and run again (nothing was written):"]
        shown = self.problems if limit is None else self.problems[:limit]
        lines += [f"  - {p}" for p in shown]
        if limit is not None and len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)

    def raise_if_problems(self) -> None:
        if self.problems:
            raise ProductSceneError(self.message())

    def to_json(self) -> dict:
        return {"root": self.root, "layout": self.layout, "items": self.items, "categories": len(self.categories),
                "problems": [{"kind": p.kind, "path": p.path, "detail": p.detail} for p in self.problems]}


class Dataset:
    """An indexed, lazy data set of (image, product mask, category) triples."""

    def __init__(self, root: str, layout: str, items: Sequence[Item], index_problems: Sequence[Problem] = ()):
        self.root = os.fspath(root)
        self.layout = layout
        self.items = list(items)
        self.index_problems = list(index_problems)
        self.categories = sorted({it.category for it in self.items})
        self._cat_index = {c: i for i, c in enumerate(self.categories)}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]

    def category_index(self, name: str) -> int:
        return self._cat_index[name]

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Full-size ``(rgb uint8 [H,W,3], product mask bool [H,W])`` of item ``i``."""
        return read_item(self.items[i])

    def load(self, i: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image [S,S,3] float 0..1, mask [S,S] float 0/1)`` with ``S = resolution``: shorter side
        scaled to S, centre crop; the mask is max-pooled (a pixel touching the product is product)."""
        rgb, mask = self.read(i)
        return prepare(rgb, mask, resolution)


def _alpha_mask(img) -> np.ndarray | None:
    a = image_files.alpha(img)
    return None if a is None else a > 128


def _mask_file(path) -> np.ndarray:
    img = image_files.open_image(path, "mask")
    m = _alpha_mask(img)
    return m if m is not None else image_files.luminance(img) >= 128


def read_item(item: Item) -> tuple[np.ndarray, np.ndarray]:
    img = image_files.open_image(item.image)
    if item.mask is None:
        mask = _alpha_mask(img)
        if mask is None:
            raise ProductSceneError(f"{item.image}: has no alpha channel and no sibling _mask.png")
    else:
        mask = _mask_file(item.mask)
    rgb = image_files.rgb(img)
    if mask.shape != rgb.shape[:2]:
        raise ProductSceneError(
            f"{item.mask or item.image}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
            f"{rgb.shape[1]}x{rgb.shape[0]}")
    return rgb, mask


def prepare(rgb: np.ndarray, mask: np.ndarray, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image
    s = int(resolution)
    if s < 8 or s % 8:
        raise ProductSceneError(f"resolution: expected a multiple of 8 (64 recommended), got {resolution}")
    h, w = mask.shape
    scale = s / min(h, w)
    nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
    top, left = (nh - s) // 2, (nw - s) // 2
    img = Image.fromarray(rgb)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.BICUBIC)
    image = image_files.as_tensor(img)[top:top + s, left:left + s]
    m = torch.from_numpy(mask.astype(np.float32))[None]
    m = resize_to_layer(m, nh, nw) if (nh, nw) != (h, w) else m
    m = (m[0, top:top + s, left:left + s] > 0.5).float()
    return image.contiguous(), m.contiguous()


# ------------------------------------------------------------------------------ layouts
def _is_mask_name(name: str) -> bool:
    stem, _ = os.path.splitext(name)
    return stem.endswith(MASK_SUFFIX)


def folder_dataset(root) -> Dataset:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ProductSceneError(f"data: folder {root!r} does not exist")
    items, problems = [], []
    for cat in sorted(os.listdir(root)):
        cdir = os.path.join(root, cat)
        if not os.path.isdir(cdir) or cat.startswith("."):
            continue
        names = sorted(os.listdir(cdir))
        present = set(names)
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS or _is_mask_name(name) or name.startswith("."):
                continue
            mask = None
            for mext in (".png", ".PNG"):
                if stem + MASK_SUFFIX + mext in present:
                    mask = os.path.join(cdir, stem + MASK_SUFFIX + mext)
                    break
            items.append(Item(os.path.join(cdir, name), mask, cat))
    if not items:
        problems.append(Problem("no images", root, "expected root/<category>/<image>.png"))
    return Dataset(root, "folder", items, problems)


def _walk_files(folder: str) -> Iterable[tuple[str, str]]:
    """``(file name, path)`` of every file under ``folder``, in a stable order."""
    for d, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            yield f, os.path.join(d, f)


def _index(folders: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for folder in folders:
        for f, path in _walk_files(folder):
            out.setdefault(f, []).append(path)
    return out


def split_folders(root: str, prefix: str) -> tuple[list[str], list[str]]:
    """``(image folders, mask folders)`` of a BG60k split, directly in ``root``: images in
    ``<prefix>_imgs*``; masks in ``<prefix>_*mask*`` (the split's own) or a shared ``masks``."""
    images, masks = [], []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        low = name.lower()
        if low == f"{prefix}_imgs" or low.startswith(f"{prefix}_imgs_"):
            images.append(path)
        elif (low.startswith(prefix + "_") and "mask" in low) or low == "masks":
            masks.append(path)
    return images, masks


def bg60k_dataset(root, split: str = "train") -> Dataset:
    """The BG60k reader, strict about where files come from: images only from the split's
    ``<prefix>_imgs*`` folders, masks only beside the image or in the split's own mask folders
    (:func:`split_folders`). A file of the right name anywhere else (a backup, an export, another
    split) is never used; two candidates are reported as an ambiguous match."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ProductSceneError(f"data: folder {root!r} does not exist")
    prefix = {"train": "bg60k", "test": "bg1k"}.get(split)
    if prefix is None:
        raise ProductSceneError(f"split: expected 'train' (bg60k) or 'test' (bg1k), got {split!r}")
    info = os.path.join(root, f"{prefix}_info.txt")
    if not os.path.isfile(info):
        raise ProductSceneError(f"data: {info} not found; a BG60k folder holds {prefix}_info.txt and {prefix}_imgs_*/")
    image_dirs, mask_dirs = split_folders(root, prefix)
    images = _index(image_dirs)
    masks = _index(mask_dirs)
    elsewhere: dict[str, str] | None = None    # built only when a mask is missing

    def stray(name: str) -> str | None:
        nonlocal elsewhere
        if elsewhere is None:
            elsewhere = {}
            allowed = set(image_dirs) | set(mask_dirs)
            for d, dirs, files in os.walk(root):
                dirs[:] = sorted(x for x in dirs if os.path.join(d, x) not in allowed)
                for f in files:
                    elsewhere.setdefault(f, os.path.join(d, f))
        return elsewhere.get(name)

    items, problems = [], []
    with open(info, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(None, 1)
            if len(parts) != 2 or not parts[1].strip():
                problems.append(Problem("malformed line", f"{info}:{lineno}", f"expected 'image_name category_name', got {line!r}"))
                continue
            name, cat = parts[0], parts[1].strip()
            found = images.get(os.path.basename(name), [])
            if not found:
                problems.append(Problem("missing image", os.path.join(root, f"{prefix}_imgs_*", name),
                                        f"listed in {os.path.basename(info)}:{lineno}"))
                continue
            if len(found) > 1:
                problems.append(Problem("ambiguous image", found[0], "the same name also at " + ", ".join(found[1:])))
                continue
            path = found[0]
            stem = os.path.splitext(os.path.basename(name))[0]
            mask_name = stem + MASK_SUFFIX + ".png"
            beside = os.path.join(os.path.dirname(path), mask_name)
            candidates = ([beside] if os.path.isfile(beside) else []) + masks.get(mask_name, [])
            if not candidates:
                other = stray(mask_name)
                detail = f"expected {mask_name} beside the image or in {prefix}_masks/"
                if other:
                    detail += f"; {other} is outside this split's mask folders and is not used"
                problems.append(Problem("missing mask", path, detail))
                continue
            if len(candidates) > 1:
                problems.append(Problem("ambiguous mask", path, "two masks match: " + ", ".join(candidates)))
                continue
            items.append(Item(path, candidates[0], cat))
    return Dataset(root, "bg60k", items, problems)


def open_dataset(root, layout: str = "folder", split: str = "train") -> Dataset:
    if layout == "folder":
        return folder_dataset(root)
    if layout == "bg60k":
        return bg60k_dataset(root, split)
    raise ProductSceneError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")


# ------------------------------------------------------------------------------ check
def check(dataset: Dataset, categories: Iterable[str] | None = None, deep: bool = True,
          progress: Callable[[int, int], None] | None = None) -> DatasetReport:
    """Every problem of ``dataset`` at once: missing images / masks, unreadable files, mask and image
    sizes that differ, empty masks (no product) and full masks (no background), categories not in
    ``categories`` (when given). ``deep=False`` reads only headers (no empty-mask test)."""
    problems = list(dataset.index_problems)
    known = set(categories) if categories is not None else None
    n = len(dataset)
    for i, item in enumerate(dataset.items):
        if known is not None and item.category not in known:
            problems.append(Problem("unknown category", item.image, f"{item.category!r} is not one of the run's categories"))
        try:
            if deep:
                img = image_files.open_image(item.image)
                size = img.size
                alpha_mask = _alpha_mask(img) if item.mask is None else None
                transparent = alpha_mask is not None
            else:
                size, transparent = image_files.header(item.image)
        except ProductSceneError as e:
            problems.append(Problem("unreadable", item.image, e.reason))
            continue
        mask = None
        if item.mask is None:
            if not transparent:
                problems.append(Problem("missing mask", item.image,
                                        "no alpha channel and no sibling " + os.path.splitext(os.path.basename(item.image))[0] + "_mask.png"))
                continue
            if deep:
                mask = alpha_mask
        else:
            try:
                if deep:
                    mask = _mask_file(item.mask)
                    msize = (mask.shape[1], mask.shape[0])
                else:
                    msize = image_files.header(item.mask, "mask")[0]
            except ProductSceneError as e:
                problems.append(Problem("unreadable", item.mask, e.reason))
                continue
            if msize != size:
                problems.append(Problem("size mismatch", item.mask, f"mask {msize[0]}x{msize[1]}, image {size[0]}x{size[1]}"))
                continue
        if mask is not None:
            if not mask.any():
                problems.append(Problem("empty mask", item.mask or item.image, "no product pixel"))
            elif mask.all():
                problems.append(Problem("full mask", item.mask or item.image, "no background pixel"))
        if progress is not None:
            progress(i + 1, n)
    return DatasetReport(dataset.root, dataset.layout, n, list(dataset.categories), problems)


# ------------------------------------------------------------------------------ latent cache
def _stat(path):
    st = os.stat(path)
    return [os.path.abspath(path), st.st_mtime_ns, st.st_size]


class LatentCache:
    """VAE latents of a data set, encoded once and kept on disk, one small safetensors file per
    item keyed by image (and mask) path + mtime + size + resolution + ``namespace`` (the VAE).

    ``encode(images [B,S,S,3] float 0..1) -> latents [B,C,S/8,S/8]``. ``get(i)`` returns
    ``(latent [C,h,w] float32, product mask [h,w] float at latent size)``. Nothing is kept in memory.
    """

    def __init__(self, folder, dataset: Dataset, encode: Callable[[torch.Tensor], torch.Tensor],
                 resolution: int, namespace: str = "", dtype=torch.float16):
        self.folder = os.fspath(folder)
        os.makedirs(self.folder, exist_ok=True)
        self.dataset = dataset
        self.encode = encode
        self.resolution = int(resolution)
        self.namespace = str(namespace)
        self.dtype = dtype
        self.hits = 0
        self.misses = 0

    def key(self, i: int) -> str:
        item = self.dataset[i]
        # the last part is the reader's version: 2 reads pictures upright (EXIF orientation), so
        # latents encoded from a sideways read are encoded again
        parts = [_stat(item.image), _stat(item.mask) if item.mask else None, self.resolution, self.namespace, 2]
        return hashlib.sha1(json.dumps(parts).encode()).hexdigest()

    def path(self, i: int) -> str:
        k = self.key(i)
        return os.path.join(self.folder, k[:2], k + ".safetensors")

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.path(i)
        if os.path.isfile(path):
            try:
                t = load_tensors(path, ["latent", "mask"])
                self.hits += 1
                return t["latent"].float(), t["mask"].float()
            except ProductSceneError:  # a damaged cache entry is re-encoded
                pass
        image, mask = self.dataset.load(i, self.resolution)
        with torch.no_grad():
            latent = self.encode(image[None])[0].detach().float().cpu()
        h, w = latent.shape[-2:]
        lmask = (resize_to_layer(mask[None], h, w)[0] > 0.5).to(torch.uint8)
        save_safetensors_atomic({"latent": latent.to(self.dtype), "mask": lmask}, path,
                                {"image": self.dataset[i].image, "resolution": str(self.resolution)},
                                kind="latent_cache", version=1)
        self.misses += 1
        return latent.to(self.dtype).float(), lmask.float()

    def warm(self, indices: Iterable[int] | None = None, progress: Callable[[int, int], None] | None = None) -> None:
        idx = list(range(len(self.dataset))) if indices is None else list(indices)
        for n, i in enumerate(idx, 1):
            if not os.path.isfile(self.path(i)):
                self.get(i)
            if progress is not None:
                progress(n, len(idx))
