"""Product masks and the exact product composite. Host-free: torch, numpy and scipy only.

Conventions (ComfyUI's):
- a mask is a float tensor ``[B, H, W]`` with values in 0..1, 1 = product, 0 = background;
- an image is a float tensor ``[B, H, W, C]`` with values in 0..1.

A pixel counts as *product* when its mask value is >= 0.5 (``PRODUCT_THRESHOLD``) for the checks in
``validate_mask`` (empty mask / no background left). ``composite`` keeps the original bit-identically
wherever the mask is exactly 1.

Sizes in ``composite``: the generated image must have the original's height and width. A VAE
round-trip of an image whose sides are not multiples of 8 comes back smaller; we refuse to guess a
resampling (that would move product edges) and raise an error naming both inputs instead: crop or
pad the original to a multiple of 8 before encoding, or scale the generated image back.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import ProductSceneError

PRODUCT_THRESHOLD = 0.5

__all__ = [
    "PRODUCT_THRESHOLD",
    "check_vae_size",
    "harden_product",
    "check_not_inverted",
    "check_background_left",
    "validate_mask",
    "validate_image",
    "resize_to_layer",
    "grow",
    "shrink",
    "grow_or_shrink",
    "feather",
    "mask_from_alpha",
    "mask_from_backdrop",
    "composite",
]


# --------------------------------------------------------------------------- validation
def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    return f"a {t.dtype} tensor of shape {list(t.shape)}"


def validate_mask(mask, name: str = "mask", image_hw=None, batch=None, require_content: bool = True):
    """Check a product mask and return it unchanged.

    Raises ProductSceneError naming ``name`` when the mask is not a float ``[B,H,W]`` tensor, has
    values outside 0..1 (or NaN), has no product pixel (>= 0.5) or no background pixel (< 0.5) in
    any batch item (only when ``require_content``), differs in size from ``image_hw=(H, W)``, or has a
    batch that is neither 1 nor ``batch``.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 3:
        raise ProductSceneError(f"{name}: expected a [B,H,W] mask tensor, got {_describe(mask)}")
    if not mask.is_floating_point():
        raise ProductSceneError(
            f"{name}: expected a floating-point mask with values 0..1, got dtype {mask.dtype}")
    if mask.numel() == 0:
        raise ProductSceneError(f"{name}: expected a non-empty [B,H,W] mask, got shape {list(mask.shape)}")
    if image_hw is not None and tuple(mask.shape[1:]) != tuple(int(s) for s in image_hw):
        raise ProductSceneError(
            f"{name}: expected the image's size {int(image_hw[0])}x{int(image_hw[1])} (HxW), "
            f"got {mask.shape[1]}x{mask.shape[2]}")
    if batch is not None and mask.shape[0] not in (1, int(batch)):
        raise ProductSceneError(
            f"{name}: expected a batch of 1 or {int(batch)} masks to match the images, got {mask.shape[0]}")
    lo, hi = torch.aminmax(mask.detach().float())
    if torch.isnan(mask).any() or lo.item() < 0.0 or hi.item() > 1.0:
        raise ProductSceneError(
            f"{name}: expected mask values in 0..1, got values from {lo.item():.4g} to {hi.item():.4g}")
    if require_content:
        product = mask.detach() >= PRODUCT_THRESHOLD
        has_product = product.flatten(1).any(dim=1)
        if not bool(has_product.all()):
            i = int((~has_product).nonzero()[0])
            raise ProductSceneError(
                f"{name}: expected at least one product pixel (value >= 0.5), got an empty mask"
                + (f" at batch index {i}" if mask.shape[0] > 1 else ""))
        has_background = (~product).flatten(1).any(dim=1)
        if not bool(has_background.all()):
            i = int((~has_background).nonzero()[0])
            raise ProductSceneError(
                f"{name}: the mask covers the whole image, so no background is left to generate"
                + (f" (batch index {i})" if mask.shape[0] > 1 else "")
                + "; expected some pixels < 0.5 (did you pass an inverted mask?)")
    return mask


def validate_image(image, name: str = "image", channels=None):
    """Check an IMAGE tensor ``[B,H,W,C]`` (float); ``channels`` = allowed C values, or None."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        raise ProductSceneError(f"{name}: expected a [B,H,W,C] image tensor, got {_describe(image)}")
    if not image.is_floating_point():
        raise ProductSceneError(f"{name}: expected a floating-point image with values 0..1, got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ProductSceneError(f"{name}: expected a non-empty image, got shape {list(image.shape)}")
    if channels is not None and image.shape[-1] not in tuple(channels):
        want = " or ".join(str(c) for c in channels)
        raise ProductSceneError(f"{name}: expected {want} channels, got {image.shape[-1]}")
    return image


# --------------------------------------------------------------------------- morphology
def resize_to_layer(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Resize ``[B,H,W]`` to ``[B,h,w]`` by adaptive max-pooling: a layer cell takes the maximum of
    every pixel that overlaps it (cell i spans rows floor(i*H/h) .. ceil((i+1)*H/h)-1), so a cell
    touching any product pixel is product. Never blurs. Works for any h, w (odd, non-dividing,
    non-square, or larger than H, W). One vectorised op; no validation (hot path)."""
    if mask.shape[-2] == h and mask.shape[-1] == w:
        return mask
    return F.adaptive_max_pool2d(mask.unsqueeze(1), (int(h), int(w))).squeeze(1)


def _check_px(n, name):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ProductSceneError(f"{name}: expected a whole number of pixels >= 0, got {n!r}")
    return int(n)


def grow(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Dilate ``[B,H,W]`` by ``n`` pixels (square max-pool window 2n+1). ``n=0`` returns a copy."""
    n = _check_px(n, "grow")
    if n == 0:
        return mask.clone()
    return F.max_pool2d(mask.unsqueeze(1), kernel_size=2 * n + 1, stride=1, padding=n).squeeze(1)


def shrink(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Erode ``[B,H,W]`` by ``n`` pixels (the dual of ``grow``: ``1 - grow(1 - mask, n)``). The image
    border counts as neither product nor background, so a product touching the edge keeps it."""
    n = _check_px(n, "shrink")
    if n == 0:
        return mask.clone()
    return -F.max_pool2d(-mask.unsqueeze(1), kernel_size=2 * n + 1, stride=1, padding=n).squeeze(1)


def grow_or_shrink(mask: torch.Tensor, n: int) -> torch.Tensor:
    """``grow`` for n > 0, ``shrink`` for n < 0, a copy for 0."""
    n = int(n)
    return grow(mask, n) if n >= 0 else shrink(mask, -n)


def feather(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Soft edge OUTSIDE the product only. Returns ``max(mask, ramp)`` where the ramp falls from
    just below 1 next to the product (pixels >= 0.5) to 0 at a Euclidean distance of ``px + 1``,
    with a smoothstep profile. The result is exactly 1 wherever ``mask`` is 1 and never below
    ``mask``; ``px=0`` returns a copy."""
    px = _check_px(px, "feather_px")
    if px == 0:
        return mask.clone()
    product = (mask.detach() >= PRODUCT_THRESHOLD).cpu().numpy()
    ramps = []
    for item in product:
        if item.any():
            dist = ndimage.distance_transform_edt(~item)
        else:
            dist = np.full(item.shape, np.inf)
        t = np.clip(1.0 - dist / (px + 1.0), 0.0, 1.0)
        t[item] = 0.0  # inside is the mask's own value
        ramps.append(t * t * (3.0 - 2.0 * t))
    ramp = torch.from_numpy(np.stack(ramps)).to(device=mask.device, dtype=mask.dtype)
    # the ramp is < 1 in float64; keep it < 1 after rounding to a low-precision dtype too
    ramp = torch.clamp(ramp, max=1.0 - torch.finfo(mask.dtype).eps)
    return torch.maximum(mask, ramp)


# --------------------------------------------------------------------------- what the pipeline needs
VAE_FACTOR = 8  # image pixels per latent pixel (SD1.5, SD2.x, SDXL)
MIN_SIDE = 8  # one latent pixel


def check_vae_size(image: torch.Tensor, name: str = "image") -> None:
    """Sides that survive a VAE round-trip unchanged: multiples of 8 (at least one latent pixel). Said here,
    first, instead of a tensor-shape error in VAE Encode or a size error after the whole sampling."""
    h, w = int(image.shape[1]), int(image.shape[2])
    if h % VAE_FACTOR or w % VAE_FACTOR or h < MIN_SIDE or w < MIN_SIDE:
        fit_h, fit_w = max(MIN_SIDE, -(-h // VAE_FACTOR) * VAE_FACTOR), max(MIN_SIDE, -(-w // VAE_FACTOR) * VAE_FACTOR)
        raise ProductSceneError(
            f"{name}: expected width and height that are multiples of {VAE_FACTOR} and at least {MIN_SIDE} px "
            f"(the VAE works in {VAE_FACTOR}x{VAE_FACTOR} blocks), got {w}x{h} (WxH); pad the image to "
            f"{fit_w}x{fit_h}, or crop it, before Product Mask")


def harden_product(mask: torch.Tensor) -> torch.Tensor:
    """Every pixel that counts as product (>= 0.5) becomes exactly 1, so that the pixels the gate
    protects are the pixels the composite keeps bit for bit; softer values stay as they are."""
    return torch.where(mask >= PRODUCT_THRESHOLD, torch.ones_like(mask), mask)


def check_not_inverted(mask: torch.Tensor, name: str, hint: str) -> None:
    """A product photo has background at its border. A 'product' covering (nearly) the whole border
    of the image is almost always the background: an inverted mask (LoadImage's mask is 1 - alpha)."""
    border = torch.cat([mask[:, 0, :], mask[:, -1, :], mask[:, :, 0], mask[:, :, -1]], dim=1)
    covered = (border >= PRODUCT_THRESHOLD).float().mean(dim=1)
    inverted = [i for i, c in enumerate(covered.tolist()) if c >= 0.9]
    if inverted:
        raise ProductSceneError(
            f"{name}: the product covers {covered[inverted[0]]:.0%} of the image border"
            + (f" (image {inverted[0]})" if mask.shape[0] > 1 else "")
            + f"; this looks like an inverted mask (the background marked as product). {hint}")


def check_background_left(mask: torch.Tensor, grow_latent_px: int, name: str = "grow_latent_px") -> None:
    """The gate's protected area (the mask at latent size, grown by ``grow_latent_px``) must leave
    some background, or the category acts nowhere."""
    h, w = max(1, mask.shape[-2] // VAE_FACTOR), max(1, mask.shape[-1] // VAE_FACTOR)
    region = grow(resize_to_layer(mask.float(), h, w), int(grow_latent_px)) > 0.5
    full = [i for i, r in enumerate(region.flatten(1).all(dim=1).tolist()) if r]
    if full:
        raise ProductSceneError(
            f"{name}: the product grown by {int(grow_latent_px)} latent pixels covers the whole {w}x{h} latent"
            + (f" of image {full[0]}" if mask.shape[0] > 1 else "")
            + "; the category would act nowhere. Use a smaller value (or a smaller product mask)")


# --------------------------------------------------------------------------- mask sources
def mask_from_alpha(rgba: torch.Tensor, threshold: float = 0.5, name: str = "image") -> torch.Tensor:
    """Binary product mask ``[B,H,W]`` (float32) from an RGBA image's alpha: 1 where alpha > threshold
    (BG60k's masks use alpha > 128/255)."""
    validate_image(rgba, name)
    if rgba.shape[-1] != 4:
        raise ProductSceneError(
            f"{name}: expected an RGBA image (4 channels) to take the product mask from its alpha, "
            f"got {rgba.shape[-1]} channels; load the product with its alpha or pick another mask source")
    if not 0.0 <= float(threshold) < 1.0:
        raise ProductSceneError(f"threshold: expected a value in 0..1 (exclusive of 1), got {threshold}")
    return (rgba[..., 3] > float(threshold)).to(torch.float32)


def _border(a: np.ndarray, width: int) -> np.ndarray:
    """Pixels of the frame of ``width`` around ``a`` [H,W,C], as [N,C]."""
    return np.concatenate([
        a[:width].reshape(-1, a.shape[-1]), a[-width:].reshape(-1, a.shape[-1]),
        a[width:-width, :width].reshape(-1, a.shape[-1]), a[width:-width, -width:].reshape(-1, a.shape[-1]),
    ])


def mask_from_backdrop(image: torch.Tensor, tolerance: float = 0.06, fill_holes: bool = True,
                       largest_only: bool = True, name: str = "image") -> torch.Tensor:
    """Product mask ``[B,H,W]`` (float32, binary) of a product shot on a plain backdrop (white studio
    shots). The backdrop colour is the per-channel median of the image's border (2 px frame);
    background = pixels whose every channel lies within ``tolerance`` of it. ``fill_holes`` makes
    enclosed backdrop-coloured regions (a white label) product; ``largest_only`` keeps the largest
    8-connected product component (drops dust and noise).

    Raises ProductSceneError when the border is not a plain backdrop (fewer than half its pixels
    match the estimated colour) or no product is found."""
    validate_image(image, name, channels=(3, 4))
    if not 0.0 <= float(tolerance) <= 1.0:
        raise ProductSceneError(f"tolerance: expected a value in 0..1, got {tolerance}")
    arr = image[..., :3].detach().float().cpu().numpy()
    h, w = arr.shape[1:3]
    width = max(1, min(2, min(h, w) // 4))
    out = []
    for i, a in enumerate(arr):
        border = _border(a, width) if min(h, w) > 2 * width else a.reshape(-1, 3)
        colour = np.median(border, axis=0)
        border_match = (np.abs(border - colour) <= tolerance).all(axis=1).mean()
        where = f" (batch index {i})" if arr.shape[0] > 1 else ""
        if border_match < 0.5:
            raise ProductSceneError(
                f"{name}: expected a product on a plain backdrop{where}, but only {border_match:.0%} of "
                f"the border is within tolerance {tolerance} of its median colour "
                f"{tuple(round(float(c), 3) for c in colour)}; raise tolerance or use an alpha/mask source")
        product = ~(np.abs(a - colour) <= tolerance).all(axis=-1)
        if fill_holes:
            product = ndimage.binary_fill_holes(product)
        if largest_only and product.any():
            labels, count = ndimage.label(product, structure=np.ones((3, 3), dtype=bool))
            if count > 1:
                sizes = np.bincount(labels.ravel())
                sizes[0] = 0
                product = labels == int(sizes.argmax())
        if not product.any():
            raise ProductSceneError(
                f"{name}: no product found{where}: every pixel is within tolerance {tolerance} of the "
                f"backdrop colour {tuple(round(float(c), 3) for c in colour)}")
        out.append(product)
    return torch.from_numpy(np.stack(out).astype(np.float32)).to(image.device)


# --------------------------------------------------------------------------- composite
def composite(original: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor,
              feather_px: int = 0) -> torch.Tensor:
    """Paste the product back: ``[B,H,W,C]`` in ``original``'s dtype and device.

    Wherever ``mask == 1`` the output is ``original`` bit-identically (``torch.where``, no
    arithmetic); where the (feathered) mask is 0 it is ``generated`` exactly; in between (soft mask
    values, or the ``feather_px`` ring just outside the product) a linear blend. A batch of 1 in any
    input broadcasts. ``generated`` must have ``original``'s height, width and channels (see the
    module docstring for why sizes are never resampled here)."""
    validate_image(original, "original")
    validate_image(generated, "generated")
    if tuple(generated.shape[1:3]) != tuple(original.shape[1:3]):
        raise ProductSceneError(
            f"generated: expected the size of original, {original.shape[1]}x{original.shape[2]} (HxW), "
            f"got {generated.shape[1]}x{generated.shape[2]}; a VAE rounds sizes to a multiple of 8: "
            f"crop or pad the original to a multiple of 8 before encoding, or scale generated back")
    if generated.shape[-1] != original.shape[-1]:
        raise ProductSceneError(
            f"generated: expected {original.shape[-1]} channels like original, got {generated.shape[-1]}")
    b_img = {original.shape[0], generated.shape[0]} - {1}
    if len(b_img) > 1:
        raise ProductSceneError(
            f"generated: expected a batch of 1 or {original.shape[0]} images like original, got {generated.shape[0]}")
    batch = max(original.shape[0], generated.shape[0])
    validate_mask(mask, "product_mask", image_hw=original.shape[1:3], batch=batch if batch > 1 else None)
    batch = max(batch, mask.shape[0])
    soft = [i for i in range(mask.shape[0]) if not bool((mask[i] == 1.0).any())]
    if soft:
        raise ProductSceneError(
            "product_mask: no pixel is exactly 1" + (f" in mask {soft[0]}" if mask.shape[0] > 1 else "")
            + f" (largest value {float(mask[soft[0]].max()):.3g}), so no product pixel would be kept bit for bit "
            f"while the gate treats values >= {PRODUCT_THRESHOLD} as product; make the mask with Product Mask "
            f"(it sets every product pixel to exactly 1)")
    feather_px = _check_px(feather_px, "feather_px")

    dtype, device = original.dtype, original.device
    generated = generated.to(device=device, dtype=dtype)
    alpha = feather(mask, feather_px).to(device=device, dtype=dtype)
    inside = (mask.to(device) == 1.0).unsqueeze(-1)
    outside = (alpha == 0).unsqueeze(-1)
    a = alpha.unsqueeze(-1)
    shape = (batch,) + tuple(original.shape[1:])
    original_b, generated_b = original.expand(shape), generated.expand(shape)
    blended = original_b * a + generated_b * (1 - a)
    out = torch.where(outside, generated_b, blended)
    out = torch.where(inside.expand(shape), original_b, out)
    return out.contiguous()


def stack_masks(masks, name: str = "masks") -> torch.Tensor:
    """Several masks (each ``[H,W]`` or ``[B,H,W]``, any sizes) as one ``[N,H,W]`` batch at the
    first mask's size (bilinear resize); ``None`` entries are skipped."""
    flat = []
    for m in masks:
        if m is None:
            continue
        if not isinstance(m, torch.Tensor) or m.dim() not in (2, 3):
            raise ProductSceneError(f"{name}: expected masks [H, W] or [B, H, W], got {_describe(m)}")
        flat.extend(list(m[None] if m.dim() == 2 else m))
    if not flat:
        raise ProductSceneError(f"{name}: expected at least one mask")
    h, w = flat[0].shape
    out = [m.float() if tuple(m.shape) == (h, w) else
           torch.nn.functional.interpolate(m.float()[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
           for m in flat]
    return torch.stack(out).clamp(0, 1)
