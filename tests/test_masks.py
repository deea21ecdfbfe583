"""Core tests for productscene.masks (host-free, fast)."""
import math

import numpy as np
import pytest
import torch

from productscene.errors import ProductSceneError
from productscene.masks import (
    composite,
    feather,
    grow,
    grow_or_shrink,
    mask_from_alpha,
    mask_from_backdrop,
    resize_to_layer,
    shrink,
    validate_mask,
)


def blob_mask(b=1, h=48, w=40, seed=0):
    """Random blobby binary masks [b,h,w] with product and background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = torch.zeros(b, h, w)
    for i in range(b):
        for _ in range(3):
            cy, cx = torch.randint(h // 4, 3 * h // 4, (1,), generator=g), torch.randint(w // 4, 3 * w // 4, (1,), generator=g)
            r = int(torch.randint(2, max(3, min(h, w) // 4), (1,), generator=g))
            out[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1.0
    return out


# --------------------------------------------------------------------------- validate_mask
def test_validate_accepts_good_mask_and_broadcast_batch():
    m = blob_mask(1, 16, 12)
    assert validate_mask(m, "m", image_hw=(16, 12), batch=4) is m
    m3 = blob_mask(4, 16, 12)
    assert validate_mask(m3, "m", image_hw=(16, 12), batch=4) is m3


@pytest.mark.parametrize("bad, words", [
    (torch.ones(8, 8) * 0.0, "[B,H,W]"),               # 2-D
    (torch.zeros(1, 1, 8, 8), "[B,H,W]"),              # 4-D
    (np.zeros((1, 8, 8), np.float32), "[B,H,W]"),      # not a tensor
    (torch.zeros(1, 8, 8, dtype=torch.uint8), "floating-point"),
    (torch.zeros(1, 8, 8, dtype=torch.bool), "floating-point"),
])
def test_validate_rejects_shape_and_dtype(bad, words):
    with pytest.raises(ProductSceneError) as e:
        validate_mask(bad, "product_mask")
    msg = str(e.value)
    assert msg.startswith("product_mask:") and words in msg


def _half_mask(h=8, w=8):
    m = torch.zeros(1, h, w)
    m[:, : h // 2] = 1
    return m


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_validate_rejects_values_outside_0_1(value):
    m = _half_mask()
    m[0, 0, 0] = value
    with pytest.raises(ProductSceneError, match=r"^my_mask: expected mask values in 0\.\.1"):
        validate_mask(m, "my_mask")


def test_validate_rejects_empty_and_full_masks_with_batch_index():
    with pytest.raises(ProductSceneError, match=r"^mask: expected at least one product pixel.*empty"):
        validate_mask(torch.zeros(1, 8, 8))
    with pytest.raises(ProductSceneError, match=r"^mask: the mask covers the whole image"):
        validate_mask(torch.ones(1, 8, 8))
    batch = torch.cat([_half_mask(), torch.zeros(1, 8, 8)])
    with pytest.raises(ProductSceneError, match="batch index 1"):
        validate_mask(batch)
    # soft values below 0.5 everywhere are no product
    with pytest.raises(ProductSceneError, match="empty"):
        validate_mask(torch.full((1, 8, 8), 0.3))
    # require_content=False lets an empty mask through
    validate_mask(torch.zeros(1, 8, 8), require_content=False)


def test_validate_rejects_size_and_batch_mismatch():
    m = _half_mask(8, 8)
    with pytest.raises(ProductSceneError, match=r"^pm: expected the image's size 8x10.*got 8x8"):
        validate_mask(m, "pm", image_hw=(8, 10))
    with pytest.raises(ProductSceneError, match=r"^pm: expected a batch of 1 or 2 masks.*got 3"):
        validate_mask(m.expand(3, 8, 8), "pm", batch=2)


# --------------------------------------------------------------------------- resize_to_layer
def reference_layer(mask, h, w):
    """Slow, obviously right: cell (i, j) is the max of every pixel whose unit square overlaps the
    cell's area [i*H/h, (i+1)*H/h) x [j*W/w, (j+1)*W/w)."""
    B, H, W = mask.shape
    out = torch.zeros(B, h, w)
    for i in range(h):
        r0, r1 = math.floor(i * H / h), math.ceil((i + 1) * H / h)
        for j in range(w):
            c0, c1 = math.floor(j * W / w), math.ceil((j + 1) * W / w)
            out[:, i, j] = mask[:, r0:r1, c0:c1].amax(dim=(1, 2))
    return out


@pytest.mark.parametrize("H, W, h, w", [
    (64, 64, 9, 7), (48, 40, 9, 7), (37, 53, 8, 8), (64, 48, 13, 11), (40, 64, 5, 8),
    (64, 64, 8, 8), (5, 5, 9, 7), (33, 65, 17, 33),
])
def test_resize_to_layer_is_conservative_max_pool(H, W, h, w):
    g = torch.Generator().manual_seed(H * 1000 + W)
    m = (torch.rand(2, H, W, generator=g) > 0.97).float()   # sparse single product pixels
    out = resize_to_layer(m, h, w)
    assert out.shape == (2, h, w)
    assert torch.equal(out, reference_layer(m, h, w))
    # conservative: every cell containing (the centre of) a product pixel is 1
    ys, xs = torch.nonzero(m[0], as_tuple=True)
    for y, x in zip(ys.tolist(), xs.tolist()):
        cy, cx = min(int((y + 0.5) * h / H), h - 1), min(int((x + 0.5) * w / W), w - 1)
        assert out[0, cy, cx] == 1
    # never a blur: a binary mask stays binary
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_resize_to_layer_single_pixel_reaches_every_overlapping_cell():
    H, W, h, w = 64, 48, 9, 7
    for y, x in [(0, 0), (63, 47), (7, 6), (31, 20), (50, 13)]:
        m = torch.zeros(1, H, W)
        m[0, y, x] = 1
        out = resize_to_layer(m, h, w)[0]
        assert out.sum() >= 1
        for i in range(h):
            for j in range(w):
                overlaps = (i * H / h < y + 1 and y < (i + 1) * H / h) and (j * W / w < x + 1 and x < (j + 1) * W / w)
                assert bool(out[i, j] == 1) == overlaps, (y, x, i, j)


def test_resize_to_layer_same_size_and_soft_values():
    m = blob_mask(1, 16, 16)
    assert resize_to_layer(m, 16, 16) is m
    soft = torch.zeros(1, 4, 4)
    soft[0, 0, 0] = 0.25
    soft[0, 3, 3] = 0.75
    assert torch.equal(resize_to_layer(soft, 2, 2), torch.tensor([[[0.25, 0.0], [0.0, 0.75]]]))


# --------------------------------------------------------------------------- grow / shrink
def test_grow_single_pixel_gives_square():
    m = torch.zeros(1, 15, 15)
    m[0, 7, 7] = 1
    g = grow(m, 3)
    assert g.sum() == 49 and torch.equal(g[0, 4:11, 4:11], torch.ones(7, 7))
    assert torch.equal(grow(m, 0), m) and grow(m, 0) is not m


def test_shrink_is_inverse_on_square_and_keeps_edge_products():
    m = torch.zeros(1, 15, 15)
    m[0, 4:11, 4:11] = 1
    s = shrink(m, 3)
    assert s.sum() == 1 and s[0, 7, 7] == 1
    assert shrink(m, 4).sum() == 0
    assert torch.equal(shrink(m, 0), m)
    edge = torch.zeros(1, 10, 10)
    edge[0, :, :5] = 1                     # product touching the image edge
    assert torch.equal(shrink(edge, 2)[0, :, :3], torch.ones(10, 3))
    assert shrink(edge, 2)[0, :, 3:].sum() == 0


def test_grow_or_shrink_and_negative_px():
    m = blob_mask(2, 32, 32, seed=3)
    assert torch.equal(grow_or_shrink(m, 2), grow(m, 2))
    assert torch.equal(grow_or_shrink(m, -2), shrink(m, 2))
    assert (grow(m, 2) >= m).all() and (shrink(m, 2) <= m).all()
    with pytest.raises(ProductSceneError, match="grow"):
        grow(m, -1)
    with pytest.raises(ProductSceneError, match="shrink"):
        shrink(m, -1)


# --------------------------------------------------------------------------- feather
def test_feather_only_outside_and_ramps_down():
    m = blob_mask(2, 48, 40, seed=5)
    px = 6
    f = feather(m, px)
    assert f.shape == m.shape and f.dtype == m.dtype
    assert torch.equal(f[m == 1], torch.ones(int((m == 1).sum())))   # exactly 1 inside
    outside = m == 0
    assert (f[outside] < 1).all() and (f[outside] >= 0).all()
    ring = (grow(m, 1) == 1) & outside
    assert (f[ring] > 0.5).all()                                       # soft edge just outside
    assert (f[grow(m, px + 1) == 0] == 0).all()                        # nothing far away
    assert torch.equal(feather(m, 0), m)
    # a straight line away from a square product: strictly decreasing to 0 after px pixels
    sq = torch.zeros(1, 32, 48)
    sq[0, 8:24, 8:20] = 1
    line = feather(sq, px)[0, 16, 20:]
    assert (line[:px] > 0).all() and (line[:px - 1] > line[1:px]).all()
    assert (line[px:] == 0).all()


def test_feather_low_precision_stays_below_one_outside():
    m = blob_mask(1, 64, 64, seed=1).half()
    f = feather(m, 40)
    assert (f[m == 1] == 1).all() and (f[m == 0] < 1).all()


# --------------------------------------------------------------------------- mask sources
def test_mask_from_alpha_threshold_and_errors():
    rgba = torch.zeros(1, 4, 4, 4)
    rgba[0, :, :, 3] = torch.tensor([0.0, 0.5, 128 / 255, 1.0])
    m = mask_from_alpha(rgba)
    assert m.shape == (1, 4, 4) and m.dtype == torch.float32
    assert torch.equal(m[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))   # BG60k: alpha > 128 is product
    assert torch.equal(mask_from_alpha(rgba, threshold=0.0)[0, 0], torch.tensor([0.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ProductSceneError, match=r"^image: expected an RGBA image \(4 channels\).*got 3"):
        mask_from_alpha(torch.zeros(1, 4, 4, 3))
    with pytest.raises(ProductSceneError, match=r"^photo: expected a \[B,H,W,C\]"):
        mask_from_alpha(torch.zeros(4, 4, 4), name="photo")


def backdrop_scene(h=64, w=64, backdrop=(1.0, 1.0, 1.0)):
    img = torch.ones(1, h, w, 3) * torch.tensor(backdrop)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    disc = (yy - 32) ** 2 + (xx - 30) ** 2 <= 15 ** 2
    hole = (yy - 32) ** 2 + (xx - 30) ** 2 <= 5 ** 2      # a white label inside the product
    img[0][disc] = torch.tensor([0.3, 0.2, 0.6])
    img[0][hole] = torch.tensor(backdrop)
    img[0, 55:58, 55:58] = torch.tensor([0.1, 0.1, 0.1])  # a speck of dust
    img[0][(yy - 32) ** 2 + (xx - 30) ** 2 == 20 ** 2] += 0.02   # noise within tolerance
    return img.clamp(0, 1), disc, hole


def test_mask_from_backdrop_holes_and_components():
    img, disc, hole = backdrop_scene()
    m = mask_from_backdrop(img)
    assert m.shape == (1, 64, 64) and m.dtype == torch.float32
    assert torch.equal(m[0].bool(), disc)               # hole filled, speck dropped
    m_holes = mask_from_backdrop(img, fill_holes=False)
    assert m_holes[0][hole].sum() == 0 and m_holes[0][disc & ~hole].min() == 1
    m_all = mask_from_backdrop(img, largest_only=False)
    assert m_all[0, 56, 56] == 1 and m_all[0][disc].min() == 1
    # a grey backdrop works the same way (colour estimated from the border)
    grey, disc2, _ = backdrop_scene(backdrop=(0.8, 0.8, 0.78))
    assert torch.equal(mask_from_backdrop(grey)[0].bool(), disc2)


def test_mask_from_backdrop_errors():
    with pytest.raises(ProductSceneError, match=r"^image: no product found"):
        mask_from_backdrop(torch.ones(1, 32, 32, 3))
    noisy = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ProductSceneError, match=r"^image: expected a product on a plain backdrop"):
        mask_from_backdrop(noisy)
    with pytest.raises(ProductSceneError, match=r"^image: expected 3 or 4 channels"):
        mask_from_backdrop(torch.ones(1, 32, 32, 1))


# --------------------------------------------------------------------------- composite
def _images(b=2, h=48, w=40, c=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, c, generator=g).to(dtype), torch.rand(b, h, w, c, generator=g).to(dtype)


@pytest.mark.parametrize("feather_px", [0, 1, 5])
def test_composite_is_bit_identical_inside_mask(feather_px):
    for seed in range(3):
        orig, gen = _images(seed=seed)
        m = blob_mask(2, 48, 40, seed=seed)
        out = composite(orig, gen, m, feather_px=feather_px)
        assert out.shape == orig.shape and out.dtype == orig.dtype
        inside = (m == 1).unsqueeze(-1).expand_as(orig)
        assert torch.equal(out[inside], orig[inside])
        far = (grow(m, feather_px + 1) == 0).unsqueeze(-1).expand_as(orig)
        assert torch.equal(out[far], gen[far])              # untouched background
        if feather_px:
            ring = ((grow(m, 1) == 1) & (m == 0)).unsqueeze(-1).expand_as(orig)
            assert not torch.equal(out[ring], gen[ring])    # blended just outside
            lo, hi = torch.minimum(orig, gen), torch.maximum(orig, gen)
            assert ((out >= lo - 1e-6) & (out <= hi + 1e-6)).all()


def test_composite_inside_survives_garbage_generated_pixels():
    """Arithmetic blending (orig*a + gen*(1-a)) would turn NaN/inf into NaN inside the product."""
    orig, gen = _images(b=1)
    m = blob_mask(1, 48, 40, seed=9)
    gen = gen.clone()
    gen[0][m[0] == 1] = float("nan")
    gen[0, :2][m[0, :2] == 1] = float("inf")
    out = composite(orig, gen, m, feather_px=3)
    inside = (m == 1).unsqueeze(-1).expand_as(orig)
    assert torch.equal(out[inside], orig[inside])


def test_composite_soft_mask_blends_and_keeps_ones():
    orig, gen = _images(b=1, h=8, w=8)
    m = torch.zeros(1, 8, 8)
    m[0, :4] = 1.0
    m[0, 4] = 0.25
    out = composite(orig, gen, m)
    assert torch.equal(out[0, :4], orig[0, :4])
    assert torch.allclose(out[0, 4], 0.25 * orig[0, 4] + 0.75 * gen[0, 4])
    assert torch.equal(out[0, 5:], gen[0, 5:])


def test_composite_broadcasts_batch_and_keeps_dtype():
    orig, gen = _images(b=1, dtype=torch.float16)
    gen3 = torch.rand(3, 48, 40, 3)
    m = blob_mask(1, 48, 40)
    out = composite(orig, gen3, m, feather_px=2)
    assert out.shape == (3, 48, 40, 3) and out.dtype == torch.float16
    inside = (m[0] == 1)
    for i in range(3):
        assert torch.equal(out[i][inside], orig[0][inside])
    # several masks for one image pair
    masks = blob_mask(2, 48, 40, seed=4)
    out2 = composite(orig, gen3[:1], masks)
    assert out2.shape[0] == 2 and torch.equal(out2[1][masks[1] == 1], orig[0][masks[1] == 1])


def test_composite_errors_name_inputs():
    orig, gen = _images(b=2)
    m = blob_mask(2, 48, 40)
    with pytest.raises(ProductSceneError, match=r"^generated: expected the size of original, 48x40.*got 48x32.*multiple of 8"):
        composite(orig, gen[:, :, :32], m)
    with pytest.raises(ProductSceneError, match=r"^generated: expected 3 channels"):
        composite(orig, torch.rand(2, 48, 40, 4), m)
    with pytest.raises(ProductSceneError, match=r"^generated: expected a batch of 1 or 2"):
        composite(orig, torch.rand(3, 48, 40, 3), m)
    with pytest.raises(ProductSceneError, match=r"^product_mask: expected the image's size 48x40"):
        composite(orig, gen, blob_mask(2, 40, 48))
    with pytest.raises(ProductSceneError, match=r"^product_mask: expected a batch of 1 or 2"):
        composite(orig, gen, blob_mask(3, 48, 40))
    with pytest.raises(ProductSceneError, match=r"^product_mask: expected at least one product pixel"):
        composite(orig, gen, torch.zeros(1, 48, 40))
    with pytest.raises(ProductSceneError, match=r"^original: expected a \[B,H,W,C\]"):
        composite(orig[0], gen, m)
    with pytest.raises(ProductSceneError, match=r"^feather_px"):
        composite(orig, gen, m, feather_px=-1)
