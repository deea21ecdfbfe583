"""The one image reader (productscene/images.py) on the files users have: a phone JPEG stored
sideways with an EXIF orientation tag trains upright against its mask in both data-set layouts
(and the batch plan sees its upright size), 16-bit greyscale PNGs keep their tones, palette PNGs
with a transparent entry give their alpha, and a file that is no image is named."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from productscene.batch.plan import _check_image
from productscene.errors import ProductSceneError
from productscene.images import header, open_image
from productscene.train.datasets import check, open_dataset

PRODUCT, BACKDROP = (220, 20, 20), (20, 160, 40)
ROTATE_90_CW = 6  # EXIF orientation: the stored pixels must be turned a quarter clockwise to show


def upright_scene(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb uint8 [H,W,3], product bool [H,W])``: a product box in the top-left quarter, so any
    quarter turn moves it off its mask."""
    product = np.zeros((height, width), bool)
    product[height // 8: height // 2, width // 8: width // 2] = True
    rgb = np.where(product[..., None], np.array(PRODUCT, np.uint8), np.array(BACKDROP, np.uint8))
    return rgb.astype(np.uint8), product


def save_phone_jpeg(path, rgb: np.ndarray) -> None:
    """``rgb`` as a camera saves it when held sideways: pixels stored turned a quarter
    counter-clockwise, with the orientation tag that turns them back."""
    exif = Image.Exif()
    exif[0x0112] = ROTATE_90_CW
    Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=100, subsampling=0,
                                                                     exif=exif)


def save_mask(path, product: np.ndarray, rgba: bool) -> None:
    if rgba:  # a BG60k cut-out: alpha > 128 marks the product
        a = np.zeros(product.shape + (4,), np.uint8)
        a[..., 3] = np.where(product, 255, 0)
        Image.fromarray(a, "RGBA").save(path)
    else:
        Image.fromarray(np.where(product, 255, 0).astype(np.uint8), "L").save(path)


def phone_dataset(root, layout: str, width: int, height: int):
    rgb, product = upright_scene(width, height)
    if layout == "folder":
        os.makedirs(root / "perfume")
        save_phone_jpeg(root / "perfume" / "phone.jpg", rgb)
        save_mask(root / "perfume" / "phone_mask.png", product, rgba=False)
        image = root / "perfume" / "phone.jpg"
    else:
        os.makedirs(root / "bg60k_imgs_0")
        os.makedirs(root / "bg60k_masks")
        save_phone_jpeg(root / "bg60k_imgs_0" / "3001.jpg", rgb)
        save_mask(root / "bg60k_masks" / "3001_mask.png", product, rgba=True)
        (root / "bg60k_info.txt").write_text("3001.jpg perfume\n")
        image = root / "bg60k_imgs_0" / "3001.jpg"
    with Image.open(image) as stored:  # the file really is stored sideways
        assert stored.size == (height, width)
    return open_dataset(root, layout), product


def is_product_colour(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] > 140) & (rgb[..., 1] < 90)


def inner(mask: np.ndarray) -> np.ndarray:
    """``mask`` less its edge pixels (JPEG blurs edges)."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


@pytest.mark.parametrize("layout", ["folder", "bg60k"])
@pytest.mark.parametrize("width,height", [(48, 32), (40, 40)])  # sideways sizes differ / a square hides the turn
def test_a_phone_jpeg_with_an_orientation_tag_trains_upright_against_its_mask(tmp_path, layout, width, height):
    ds, product = phone_dataset(tmp_path / "data", layout, width, height)
    report = check(ds)
    assert report.ok, report.message()
    assert check(ds, deep=False).ok
    rgb, mask = ds.read(0)
    assert rgb.shape == (height, width, 3) and mask.shape == (height, width)
    assert np.array_equal(mask, product)
    red = is_product_colour(rgb)
    assert red[inner(mask)].all() and not red[inner(~mask)].any()  # the product lies under its mask
    image, m = ds.load(0, 16)
    assert float(image[m > 0.5][:, 0].mean()) > float(image[m < 0.5][:, 0].mean()) + 0.4


def test_the_batch_plan_reads_the_same_upright_picture(tmp_path):
    rgb, _ = upright_scene(48, 32)
    save_phone_jpeg(tmp_path / "phone.jpg", rgb)
    assert _check_image(tmp_path / "phone.jpg", "product") is None
    assert header(tmp_path / "phone.jpg")[0] == (48, 32) == open_image(tmp_path / "phone.jpg").size


def png16(grey: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG of ``grey`` (uint16 [H,W]), written by hand: PIL writes it as I;16
    only from some modes, and this pins the exact file."""
    h, w = grey.shape
    rows = b"".join(b"\x00" + grey[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_16_bit_greyscale_png_keeps_its_tones(tmp_path):
    grey = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (24, 1))
    os.makedirs(tmp_path / "data" / "tools")
    (tmp_path / "data" / "tools" / "scan.png").write_bytes(png16(grey))
    _, product = upright_scene(32, 24)
    save_mask(tmp_path / "data" / "tools" / "scan_mask.png", product, rgba=False)
    ds = open_dataset(tmp_path / "data", "folder")
    assert check(ds).ok
    rgb, mask = ds.read(0)
    expected = np.rint(grey / 257.0)
    assert np.abs(rgb[..., 0].astype(float) - expected).max() <= 1  # not clipped to white
    assert np.array_equal(rgb[..., 0], rgb[..., 2]) and rgb[:, 0].max() == 0 and rgb[:, -1].min() == 255
    assert np.array_equal(mask, product)


def test_a_palette_png_with_a_transparent_entry_gives_its_alpha(tmp_path):
    _, product = upright_scene(32, 24)
    palette = Image.fromarray(np.where(product, 1, 0).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, *PRODUCT] + [0] * 762)
    os.makedirs(tmp_path / "data" / "perfume")
    palette.save(tmp_path / "data" / "perfume" / "cutout.png", transparency=0)
    ds = open_dataset(tmp_path / "data", "folder")
    assert ds.items[0].mask is None and check(ds).ok
    rgb, mask = ds.read(0)
    assert np.array_equal(mask, product)
    assert (rgb[mask] == PRODUCT).all()


def test_a_file_that_is_no_image_is_named(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"shopping list, not a photo")
    with pytest.raises(ProductSceneError, match=r"^reference: could not read '.*notes\.jpg' as an image "
                                                r"\(UnidentifiedImageError"):
        open_image(bad, "reference")
    with pytest.raises(ProductSceneError, match=r"^mask: could not read '.*notes\.jpg'"):
        header(bad, "mask")
    why = _check_image(bad, "product")
    assert why.startswith("product: could not read") and "notes.jpg" in why
    truncated = tmp_path / "cut.jpg"
    rgb, _ = upright_scene(48, 32)
    save_phone_jpeg(truncated, rgb)
    truncated.write_bytes(truncated.read_bytes()[:-200])
    with pytest.raises(ProductSceneError, match=r"^image: could not read '.*cut\.jpg' as an image \(OSError"):
        open_image(truncated)
