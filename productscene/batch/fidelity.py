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
    the many outputs made from it: their RGB values, one 3-byte item a pixel, and where they lie, so
    each output costs one comparison and two counts."""

    def __init__(self, product: Image.Image):
        self.masked = "A" in product.getbands()
        if self.masked:
            a = np.asarray(product.convert("RGBA"))
            self.size = product.size
            self.rgb = _pixels(np.ascontiguousarray(a[..., :3]).tobytes())
            alpha = a[..., 3].reshape(-1)
            self.product = np.flatnonzero(alpha == 255)
            self.background = np.flatnonzero(alpha == 0)
            self.count = len(self.product)

    def compare(self, result: Image.Image) -> Fidelity | None:
        """None when the product has no alpha (no mask says which pixels are the product). A result
        of another size keeps none."""
        if not self.masked:
            return None
        if result.size != self.size:
            return Fidelity(0, self.count, 0.0)
        if result.mode != "RGB":
            result = result.convert("RGB")
        changed = _pixels(result.tobytes()) != self.rgb
        kept = self.count - int(np.count_nonzero(changed[self.product]))
        background = len(self.background)
        share = int(np.count_nonzero(changed[self.background])) / background if background else 0.0
        return Fidelity(kept, self.count, share)


def _pixels(rgb: bytes) -> np.ndarray:
    """RGB bytes as one 3-byte item a pixel (compared whole, far faster than channel by channel)."""
    return np.frombuffer(rgb, "V3")
