"""How faithfully an output kept its product: the product pixels (alpha 255 in the uploaded cut-out,
where the workflow's exact composite keeps the original) that came back unchanged."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image


class Fidelity(NamedTuple):
    unchanged: int              # product pixels identical in the output
    product: int                # product pixels (alpha 255)
    background_changed: float   # share of background pixels (alpha 0) that changed


def product_fidelity(product: Image.Image, result: Image.Image) -> Fidelity | None:
    """``product`` (with an alpha channel) against the ``result`` image; None when the product has
    no alpha (no mask says which pixels are the product). A result of another size keeps none."""
    if "A" not in product.getbands():
        return None
    a = np.asarray(product.convert("RGBA"))
    rgb, alpha = a[..., :3], a[..., 3]
    prod = alpha == 255
    out = np.asarray(result.convert("RGB"))
    if out.shape != rgb.shape:
        return Fidelity(0, int(prod.sum()), 0.0)
    same = (out == rgb).all(-1)
    bg = alpha == 0
    changed = float((~same[bg]).mean()) if bg.any() else 0.0
    return Fidelity(int(same[prod].sum()), int(prod.sum()), changed)
