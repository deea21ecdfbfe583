"""Product mask and exact product composite nodes (thin adapters over productscene.masks)."""
from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io, ui

from productscene.errors import ProductSceneError
from productscene.masks import (
    check_not_inverted,
    check_vae_size,
    composite,
    harden_product,
    feather,
    grow_or_shrink,
    mask_from_alpha,
    mask_from_backdrop,
    validate_image,
    validate_mask,
)

CATEGORY = "ProductScene"
SOURCES = ["alpha", "loadimage_mask", "mask", "white_backdrop"]
PREVIEW_GREY = 0.5
OVERLAY_TINT = (0.1, 0.85, 0.35)  # the product mask drawn over the photo in green
OVERLAY_ALPHA = 0.45


def _as_batch_mask(mask):
    """ComfyUI nodes sometimes pass a single mask as [H,W]; make it [1,H,W]."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.unsqueeze(0)
    return mask


def cutout_preview(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The product over a flat grey background, [B,H,W,3]."""
    rgb = image[..., :3]
    m = mask.to(device=rgb.device, dtype=rgb.dtype).unsqueeze(-1)
    batch = max(rgb.shape[0], m.shape[0])
    return (rgb * m + PREVIEW_GREY * (1 - m)).expand(batch, *rgb.shape[1:]).contiguous()


def mask_overlay(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The product mask over the product photo, [B,H,W,3]: green where the mask is 1 (half
    transparent), the background darkened, soft edges in between. Shown on the node after a run."""
    rgb = image[..., :3]
    m = mask.to(device=rgb.device, dtype=rgb.dtype).unsqueeze(-1)
    tint = torch.tensor(OVERLAY_TINT, device=rgb.device, dtype=rgb.dtype)
    product = rgb * (1 - OVERLAY_ALPHA) + tint * OVERLAY_ALPHA
    batch = max(rgb.shape[0], m.shape[0])
    return (product * m + rgb * 0.45 * (1 - m)).expand(batch, *rgb.shape[1:]).contiguous()


class ProductSceneProductMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductSceneProductMask",
            display_name="Product Mask (ProductScene)",
            category=CATEGORY,
            description="Makes the product mask (1 = product) that the ProductScene nodes protect: from an "
                        "RGBA image's alpha, from LoadImage's mask, from any MASK, or from a plain white "
                        "backdrop; then grows/shrinks and feathers it.",
            inputs=[
                io.Image.Input("image", tooltip="The product photo. For source 'alpha' it must have 4 "
                               "channels (RGBA); LoadImage gives 3 channels and puts the alpha in its MASK "
                               "output: use 'loadimage_mask' then."),
                io.Combo.Input("source", options=SOURCES, default="loadimage_mask",
                               tooltip="Where the product mask comes from. alpha: the image's 4th channel. "
                               "loadimage_mask: the MASK output of LoadImage (which is 1 - alpha, so it is "
                               "inverted here). mask: the MASK input as is (1 = product). white_backdrop: "
                               "pixels that differ from the plain backdrop colour seen on the image border."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Needed for the sources 'loadimage_mask' and 'mask'; ignored otherwise."),
                io.Float.Input("tolerance", default=0.06, min=0.0, max=1.0, step=0.01,
                               tooltip="white_backdrop only: how far (per channel, 0..1) a pixel may be from "
                               "the backdrop colour and still count as backdrop. Raise it for shadows or "
                               "JPEG noise, lower it for pale products."),
                io.Boolean.Input("fill_holes", default=True,
                                 tooltip="white_backdrop only: backdrop-coloured areas enclosed by the product "
                                 "(a white label) count as product."),
                io.Boolean.Input("largest_only", default=True,
                                 tooltip="white_backdrop only: keep only the largest connected product region "
                                 "(drops dust and specks)."),
                io.Int.Input("grow_px", default=0, min=-256, max=256, step=1,
                             tooltip="Grow the mask by this many pixels (negative shrinks it). Growing "
                             "protects a margin around the product."),
                io.Int.Input("feather_px", default=0, min=0, max=256, step=1,
                             tooltip="Soft edge of this many pixels OUTSIDE the product; the product "
                             "itself stays exactly 1."),
            ],
            outputs=[
                io.Mask.Output("product_mask", display_name="product_mask",
                               tooltip="[B,H,W] mask, 1 = product."),
                io.Image.Output("preview", display_name="preview",
                                tooltip="The cut-out product on grey, to check the mask."),
            ],
        )

    @classmethod
    def execute(cls, image, source, mask=None, tolerance=0.06, fill_holes=True, largest_only=True,
                grow_px=0, feather_px=0) -> io.NodeOutput:
        validate_image(image, "image")
        check_vae_size(image, "image")
        if source not in SOURCES:
            raise ProductSceneError(f"source: expected one of {', '.join(SOURCES)}, got {source!r}")
        hw, batch = tuple(image.shape[1:3]), image.shape[0]
        if source == "alpha":
            product = mask_from_alpha(image, name="image")
        elif source == "white_backdrop":
            product = mask_from_backdrop(image, tolerance=tolerance, fill_holes=fill_holes,
                                         largest_only=largest_only, name="image")
        else:
            if mask is None:
                raise ProductSceneError(f"mask: source '{source}' needs a MASK connected to the mask input")
            mask = _as_batch_mask(mask)
            validate_mask(mask, "mask", require_content=False)
            if source == "loadimage_mask":
                if not bool((mask > 0).any()):
                    raise ProductSceneError(
                        "mask: the LoadImage mask is all zero, which means the loaded image has no alpha "
                        "channel (no transparency); load a cut-out PNG with alpha, or use source "
                        "'white_backdrop' for a product on white")
                product = 1.0 - mask
            else:
                product = mask
        validate_mask(product, "mask" if source in ("mask", "loadimage_mask") else "image",
                      image_hw=hw, batch=batch)
        if source == "loadimage_mask":
            check_not_inverted(product, "mask", "LoadImage's MASK is 1 - alpha and source 'loadimage_mask' inverts "
                                                "it; for a MASK where 1 = product use source 'mask'")
        elif source == "mask":
            check_not_inverted(product, "mask", "LoadImage's MASK output is 1 - alpha: use source 'loadimage_mask' "
                                                "for it, or invert the mask")
        product = harden_product(product.to(torch.float32))
        if grow_px:
            product = grow_or_shrink(product, int(grow_px))
            if not bool((product >= 0.5).flatten(1).any(dim=1).all()):
                raise ProductSceneError(
                    f"grow_px: shrinking the mask by {-int(grow_px)} px leaves no product pixel; use a "
                    f"smaller shrink")
            if not bool((product < 0.5).flatten(1).any(dim=1).all()):
                raise ProductSceneError(
                    f"grow_px: growing the mask by {int(grow_px)} px covers the whole image, so no background is "
                    f"left to generate; use a smaller grow_px")
        if feather_px:
            product = feather(product, int(feather_px))
            if not bool((product < 0.5).flatten(1).any(dim=1).all()):
                raise ProductSceneError(
                    f"feather_px: a soft edge of {int(feather_px)} px reaches over the whole image, so no background "
                    f"(value < 0.5) is left for the category; use a smaller feather_px")
        return io.NodeOutput(product, cutout_preview(image, product),
                             ui=ui.PreviewImage(mask_overlay(image, product), cls=cls))


class ProductSceneComposite(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductSceneComposite",
            display_name="Product Composite (ProductScene)",
            category=CATEGORY,
            description="Pastes the original product back onto the generated image: wherever the product "
                        "mask is 1 the output is the original pixel, bit for bit.",
            inputs=[
                io.Image.Input("original", tooltip="The original product photo (the pixels to keep)."),
                io.Image.Input("generated", tooltip="The generated image with the new background. Must "
                               "have the original's width and height (a VAE rounds sizes to a multiple "
                               "of 8: use an original whose sides are multiples of 8)."),
                io.Mask.Input("product_mask", tooltip="1 = product. Where it is exactly 1 the original is "
                              "kept bit-identically; soft values blend."),
                io.Int.Input("feather_px", default=0, min=0, max=256, step=1,
                             tooltip="Blend the original into the generated image over this many pixels "
                             "just OUTSIDE the product, to hide the seam. The product itself is never "
                             "blended."),
            ],
            outputs=[io.Image.Output("image", display_name="image",
                                     tooltip="The composite, in the original's dtype.")],
        )

    @classmethod
    def execute(cls, original, generated, product_mask, feather_px=0) -> io.NodeOutput:
        product_mask = _as_batch_mask(product_mask)
        return io.NodeOutput(composite(original, generated, product_mask, feather_px=int(feather_px)))


NODES = [ProductSceneProductMask, ProductSceneComposite]
