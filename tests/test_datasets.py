"""Training data sets: both layouts, one report of every problem, the latent cache."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from productscene.errors import ProductSceneError
from productscene.train.datasets import LatentCache, check, open_dataset


def _rgba(path, size=(32, 24), box=(8, 6, 20, 16), colour=(200, 30, 30)):
    a = np.zeros((size[1], size[0], 4), np.uint8)
    a[..., :3] = colour
    a[..., 3] = 0
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1, 3] = 255
    Image.fromarray(a, "RGBA").save(path)


def _rgb(path, size=(32, 24), colour=(10, 120, 40)):
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path)


def _mask(path, size=(32, 24), box=(4, 4, 12, 12)):
    m = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    Image.fromarray(m, "L").save(path)


def make_folder(root):
    for cat in ("perfume", "tools"):
        os.makedirs(root / cat)
    _rgba(root / "perfume" / "a.png")
    _rgba(root / "perfume" / "b.png", box=(0, 0, 5, 5))
    _rgb(root / "tools" / "c.jpg")
    _mask(root / "tools" / "c_mask.png")
    return root


def test_folder_layout_indexes_alpha_and_sibling_masks(tmp_path):
    ds = open_dataset(make_folder(tmp_path / "data"), "folder")
    assert ds.categories == ["perfume", "tools"] and len(ds) == 3
    by_name = {os.path.basename(it.image): it for it in ds.items}
    assert by_name["a.png"].mask is None and by_name["c.jpg"].mask.endswith("c_mask.png")
    assert check(ds).ok
    image, mask = ds.load(0, 16)
    assert image.shape == (16, 16, 3) and mask.shape == (16, 16)
    assert 0 < float(mask.sum()) < 256 and set(mask.unique().tolist()) <= {0.0, 1.0}
    # the product box (x 8..20, y 6..16 of 32x24) lands where it should after scale + centre crop
    rgb, full = ds.read(0)
    assert full.sum() == 12 * 10 and rgb.shape == (24, 32, 3)


def make_bg60k(root):
    os.makedirs(root / "bg60k_imgs_0")
    os.makedirs(root / "bg60k_imgs_1")
    os.makedirs(root / "masks")
    _rgb(root / "bg60k_imgs_0" / "1001.jpg")
    _rgb(root / "bg60k_imgs_1" / "1002.jpg", colour=(50, 50, 200))
    _rgba(root / "masks" / "1001_mask.png", box=(2, 2, 10, 10))
    _rgba(root / "bg60k_imgs_1" / "1002_mask.png")
    (root / "bg60k_info.txt").write_text("1001.jpg perfume\n1002.jpg garden tools\n")
    os.makedirs(root / "bg1k_imgs_0")
    _rgb(root / "bg1k_imgs_0" / "9001.jpg")
    _rgba(root / "bg1k_imgs_0" / "9001_mask.png")
    (root / "bg1k_info.txt").write_text("9001.jpg perfume\n")
    return root


def test_bg60k_layout_and_test_split(tmp_path):
    root = make_bg60k(tmp_path / "bg")
    ds = open_dataset(root, "bg60k")
    assert len(ds) == 2 and ds.categories == ["garden tools", "perfume"]
    assert all(it.mask.endswith("_mask.png") for it in ds.items)
    assert check(ds).ok
    _, mask = ds.read(0)
    assert mask.sum() == 64  # alpha > 128 of the 8x8 cut-out
    test = open_dataset(root, "bg60k", split="test")
    assert len(test) == 1 and test.items[0].image.endswith("9001.jpg")


def test_bad_folder_reports_every_problem_at_once(tmp_path):
    root = make_folder(tmp_path / "data")
    _rgb(root / "perfume" / "no_alpha.png")                                  # missing mask
    (root / "perfume" / "broken.png").write_bytes(b"not a png at all")       # unreadable
    _rgb(root / "tools" / "d.jpg")
    _mask(root / "tools" / "d_mask.png", size=(16, 16))                      # size mismatch
    _rgba(root / "tools" / "e.png", box=(0, 0, 0, 0))                        # empty mask
    os.makedirs(root / "shoes")
    _rgba(root / "shoes" / "f.png")                                          # unknown category
    ds = open_dataset(root, "folder")
    report = check(ds, categories=["perfume", "tools"])
    kinds = {(p.kind, os.path.basename(p.path)) for p in report.problems}
    assert kinds == {("missing mask", "no_alpha.png"), ("unreadable", "broken.png"),
                     ("size mismatch", "d_mask.png"), ("empty mask", "e.png"), ("unknown category", "f.png")}
    with pytest.raises(ProductSceneError) as err:
        report.raise_if_problems()
    msg = str(err.value)
    for name in ("no_alpha.png", "broken.png", "d_mask.png", "e.png", "f.png"):
        assert name in msg
    assert "5 problem(s)" in msg


def test_bad_bg60k_reports_missing_files_and_malformed_lines(tmp_path):
    root = make_bg60k(tmp_path / "bg")
    (root / "bg60k_info.txt").write_text("1001.jpg perfume\n1002.jpg garden tools\n1003.jpg perfume\nlonely\n")
    os.remove(root / "masks" / "1001_mask.png")
    report = check(open_dataset(root, "bg60k"))
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == ["malformed line", "missing image", "missing mask"]


def make_bg60k_with_decoys(root):
    """A BG60k tree with five known defects in the train split, good copies of every mask in a
    backup and an export folder elsewhere in the tree, and the missing mask in the test split's
    mask folder, as a user's real tree collects them."""
    import shutil
    os.makedirs(root / "bg60k_imgs_0")
    os.makedirs(root / "bg60k_masks")
    ids = range(2001, 2008)
    for i in ids:
        _rgb(root / "bg60k_imgs_0" / f"{i}.jpg")
        _rgba(root / "bg60k_masks" / f"{i}_mask.png")
    (root / "bg60k_info.txt").write_text("".join(f"{i}.jpg perfume\n" for i in ids))
    for folder in ("backup/bg60k_masks", "export/2024", "old_bg60k_masks"):
        shutil.copytree(root / "bg60k_masks", root / folder)
    os.makedirs(root / "bg1k_masks")
    shutil.copy(root / "bg60k_masks" / "2003_mask.png", root / "bg1k_masks" / "2003_mask.png")
    # the five defects, in the split's own mask folder only
    os.remove(root / "bg60k_masks" / "2003_mask.png")                               # missing mask
    _rgba(root / "bg60k_masks" / "2004_mask.png", box=(0, 0, 0, 0))                  # empty mask
    _rgba(root / "bg60k_masks" / "2005_mask.png", box=(0, 0, 32, 24))                # full mask
    _rgba(root / "bg60k_masks" / "2006_mask.png", size=(16, 16), box=(2, 2, 8, 8))   # size mismatch
    (root / "bg60k_masks" / "2007_mask.png").write_bytes(b"truncated")               # unreadable
    return root


def test_bg60k_masks_come_only_from_the_split_own_folders_decoys_hide_nothing(tmp_path):
    root = make_bg60k_with_decoys(tmp_path / "bg")
    ds = open_dataset(root, "bg60k")
    report = check(ds)
    found = {(p.kind, os.path.basename(p.path)) for p in report.problems}
    assert found == {("missing mask", "2003.jpg"), ("empty mask", "2004_mask.png"),
                     ("full mask", "2005_mask.png"), ("size mismatch", "2006_mask.png"),
                     ("unreadable", "2007_mask.png")}, report.message()
    # every mask used is the split's own
    assert all(os.path.dirname(it.mask) == str(root / "bg60k_masks") for it in ds.items)
    missing = next(p for p in report.problems if p.kind == "missing mask")
    assert "not used" in missing.detail  # the user learns where the stray copy is

    # the test split does not take the train split's masks either
    os.makedirs(root / "bg1k_imgs_0")
    _rgb(root / "bg1k_imgs_0" / "2001.jpg")
    (root / "bg1k_info.txt").write_text("2001.jpg perfume\n")
    kinds = [p.kind for p in check(open_dataset(root, "bg60k", split="test")).problems]
    assert kinds == ["missing mask"]


def test_bg60k_two_candidate_masks_are_an_ambiguous_match(tmp_path):
    root = make_bg60k_with_decoys(tmp_path / "bg")
    _rgba(root / "bg60k_imgs_0" / "2001_mask.png", box=(1, 1, 5, 5))   # beside the image too
    os.makedirs(root / "bg60k_masks_extra")
    _rgba(root / "bg60k_masks_extra" / "2002_mask.png")                # in two of the split's folders
    report = check(open_dataset(root, "bg60k"))
    ambiguous = sorted(os.path.basename(p.path) for p in report.problems if p.kind == "ambiguous mask")
    assert ambiguous == ["2001.jpg", "2002.jpg"], report.message()
    assert "2001_mask.png" in report.message()


def test_bg60k_images_come_only_from_the_split_image_folders(tmp_path):
    root = make_bg60k(tmp_path / "bg")
    os.makedirs(root / "backup" / "bg60k_imgs_0")
    _rgb(root / "backup" / "bg60k_imgs_0" / "1003.jpg")        # a stray image is not the listed one
    (root / "bg60k_info.txt").write_text("1001.jpg perfume\n1003.jpg perfume\n")
    assert [p.kind for p in open_dataset(root, "bg60k").index_problems] == ["missing image"]
    _rgb(root / "bg60k_imgs_1" / "1001.jpg")                   # the same name in two image folders
    assert [p.kind for p in open_dataset(root, "bg60k").index_problems] == ["ambiguous image", "missing image"]


def test_latent_cache_encodes_once_and_hits_on_the_second_pass(tmp_path):
    ds = open_dataset(make_folder(tmp_path / "data"), "folder")
    calls = []

    def encode(images):
        calls.append(images.shape)
        # a deterministic stand-in for a VAE: 8x average pooling + a fourth channel
        x = images.permute(0, 3, 1, 2)
        x = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([x, x.mean(1, keepdim=True)], 1)

    cache = LatentCache(tmp_path / "cache", ds, encode, resolution=16, namespace="vae-a")
    first = [cache.get(i) for i in range(len(ds))]
    assert cache.misses == 3 and cache.hits == 0 and len(calls) == 3
    cache2 = LatentCache(tmp_path / "cache", ds, encode, resolution=16, namespace="vae-a")
    second = [cache2.get(i) for i in range(len(ds))]
    assert cache2.hits == 3 and cache2.misses == 0 and len(calls) == 3
    for (l1, m1), (l2, m2) in zip(first, second):
        assert torch.equal(l1, l2) and torch.equal(m1, m2)
        assert l1.shape == (4, 2, 2) and m1.shape == (2, 2)
    # another resolution, another VAE or a changed file is a miss
    assert LatentCache(tmp_path / "cache", ds, encode, resolution=24, namespace="vae-a").key(0) != cache.key(0)
    assert LatentCache(tmp_path / "cache", ds, encode, resolution=16, namespace="vae-b").key(0) != cache.key(0)
    before = cache.key(0)
    _rgba(ds.items[0].image, box=(1, 1, 30, 20))
    os.utime(ds.items[0].image, ns=(1, 10**18))
    assert cache.key(0) != before


def test_unknown_layout_is_an_error(tmp_path):
    with pytest.raises(ProductSceneError, match="layout"):
        open_dataset(tmp_path, "coco")
