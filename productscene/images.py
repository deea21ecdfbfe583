"""Reading a user's image files: the one reader for training data sets, the batch plan and the
command line. Host-free (PIL, numpy, torch).

A file is seen as ComfyUI's LoadImage sees it, so a picture trains as it generates:

* EXIF orientation applied (``ImageOps.exif_transpose``): a phone JPEG stored sideways with an
  orientation tag is upright, like the mask drawn over it and like the canvas shows it;
* 16-bit greyscale (PIL's ``I;16`` / ``I``) scaled to 8 bits over its whole range (a plain
  ``convert("RGB")`` clips it to white); 16-bit colour PNGs PIL already reduces to 8 bits;
* alpha where the file has one: an alpha band (RGBA, LA, PA) or a palette with a transparent entry.

A file that is missing, not an image or damaged raises ProductSceneError naming the input and the
file; nothing is read before that check.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

from .errors import ProductSceneError

_ORIENTATION = 0x0112
_SIDEWAYS = (5, 6, 7, 8)      # orientations that turn the picture a quarter: width and height swap
_SIXTEEN_BIT = 257.0          # 65535 / 255


def _failure(path, what: str, error: Exception) -> ProductSceneError:
    """The error for an unreadable file; its ``reason`` (PIL's complaint) is for lists of problems
    that name the file themselves."""
    reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    failure = ProductSceneError(f"{what}: could not read {os.fspath(path)!r} as an image ({reason})")
    failure.reason = reason
    return failure


def open_image(path, what: str = "image") -> Image.Image:
    """The decoded picture of ``path`` (the first frame), upright, 16-bit greyscale at 8 bits.
    ``what`` names the input in the error a bad file raises."""
    try:
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for files that are no image
        raise _failure(path, what, e) from None
    if upright.mode.startswith("I"):
        grey = np.asarray(upright, dtype=np.float64) / _SIXTEEN_BIT
        upright = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    return upright


def header(path, what: str = "image") -> tuple[tuple[int, int], bool]:
    """``((width, height) of the upright picture, whether it has alpha)`` from the file's header
    only (no decoding: a damaged body passes here and fails in :func:`open_image`)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            turned = img.getexif().get(_ORIENTATION) in _SIDEWAYS
            transparent = has_alpha(img)
    except Exception as e:  # noqa: BLE001
        raise _failure(path, what, e) from None
    return ((height, width) if turned else (width, height)), transparent


def has_alpha(img: Image.Image) -> bool:
    return "A" in img.getbands() or (img.mode == "P" and "transparency" in img.info)


def alpha(img: Image.Image) -> np.ndarray | None:
    """The alpha channel ``uint8 [H, W]`` (255 = opaque), or None when the picture has none."""
    if not has_alpha(img):
        return None
    return np.asarray(img.convert("RGBA"))[..., 3]


def rgb(img: Image.Image) -> np.ndarray:
    """The colour channels ``uint8 [H, W, 3]``."""
    return np.asarray(img.convert("RGB"))


def luminance(img: Image.Image) -> np.ndarray:
    """Greyscale ``uint8 [H, W]``."""
    return np.asarray(img.convert("L"))


def as_tensor(picture: Image.Image | np.ndarray) -> "torch.Tensor":
    """``float32`` 0..1 of an 8-bit picture or array, channels last (``[H, W, C]``, or ``[H, W]`` for one channel)."""
    import torch  # on first use: the batch client reads images without torch
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)
