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


class ProductPixels:
    """A cut-out's product pixels (alpha 255) and background pixels (alpha 0), taken apart once for
    the many outputs made from it."""

    def __init__(self, product: Image.Image):
        self.masked = "A" in product.getbands()
        if self.masked:
            a = np.asarray(product.convert("RGBA"))
            self.rgb, alpha = a[..., :3], a[..., 3]
            self.product, self.background = alpha == 255, alpha == 0
            self.count = int(self.product.sum())
            self.any_background = bool(self.background.any())

    def compare(self, result: Image.Image) -> Fidelity | None:
        """None when the product has no alpha (no mask says which pixels are the product). A result
        of another size keeps none."""
        if not self.masked:
            return None
        out = np.asarray(result.convert("RGB"))
        if out.shape != self.rgb.shape:
            return Fidelity(0, self.count, 0.0)
        same = (out == self.rgb).all(-1)
        changed = float((~same[self.background]).mean()) if self.any_background else 0.0
        return Fidelity(int(same[self.product].sum()), self.count, changed)

