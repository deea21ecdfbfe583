"""Host-level tests: the product mask and composite nodes imported as a ComfyUI pack, fed the way
ComfyUI's own LoadImage feeds them."""
import productscene
import productscene.errors
import productscene.masks
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from devkit import comfy_env

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "products"


@pytest.fixture(scope="module")
def manifest():
    return json.loads((SAMPLES / "manifest.json").read_text())["products"]


def load_like_comfy(comfy_nodes, path: Path, name=None):
    """Put the file in ComfyUI's input folder and run the real LoadImage node on it."""
    import folder_paths

    name = name or path.name
    shutil.copy(path, Path(folder_paths.get_input_directory()) / name)
    image, mask = comfy_nodes.LoadImage().load_image(name)
    return image, mask


def alpha_of(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGBA"))[..., 3].astype(np.float32) / 255.0)


def iou(a, b):
    return float((a & b).sum()) / float((a | b).sum())


def run(node_cls, **kwargs):
    out = node_cls.execute(**kwargs)
    return out.result if hasattr(out, "result") else out


def test_samples_exist_with_alpha_and_manifest(manifest):
    assert len(manifest) >= 3
    categories = {p["category"] for p in manifest}
    assert len(categories) == len(manifest)
    for p in manifest:
        img = Image.open(SAMPLES / p["file"])
        assert img.mode == "RGBA" and (img.width, img.height) == (p["width"], p["height"])
        a = alpha_of(SAMPLES / p["file"])
        frac = float((a > 0.5).float().mean())
        assert 0.05 < frac < 0.8, (p["file"], frac)      # a real object, with background around it
        assert a[0].max() == 0 and a[-1].max() == 0         # transparent border: a cut-out
        assert p["description"]


def test_schemas_have_ids_category_and_tooltips(pack):
    mod = pack.nodes.product_mask
    assert [n.define_schema().node_id for n in mod.NODES] == ["ProductSceneProductMask", "ProductSceneComposite"]
    assert all(n in pack.nodes.NODES for n in mod.NODES)
    for node in mod.NODES:
        schema = node.define_schema()
        assert schema.category == "ProductScene" and "(ProductScene)" in schema.display_name
        for inp in schema.inputs:
            assert inp.tooltip, (schema.node_id, inp.id)
    source = next(i for i in mod.ProductSceneProductMask.define_schema().inputs if i.id == "source")
    assert source.options == ["alpha", "loadimage_mask", "mask", "white_backdrop"]


def test_product_mask_from_loadimage_mask_matches_alpha(pack, comfy_nodes, manifest):
    node = pack.nodes.product_mask.ProductSceneProductMask
    for p in manifest:
        image, mask = load_like_comfy(comfy_nodes, SAMPLES / p["file"])
        assert image.shape[-1] == 3 and mask.shape == image.shape[:3]
        product, preview = run(node, image=image, source="loadimage_mask", mask=mask)
        alpha = alpha_of(SAMPLES / p["file"])
        assert product.shape == (1, p["height"], p["width"])
        # inverted LoadImage mask; every product pixel (>= 0.5) exactly 1, softer edges as they are
        hard = torch.where(alpha >= 0.5, torch.ones_like(alpha), alpha)
        assert torch.allclose(product[0], hard, atol=1e-6)
        assert torch.equal(product[0] == 1, alpha >= 0.5)
        assert preview.shape == image.shape
        outside = alpha == 0
        assert torch.allclose(preview[0][outside], torch.full_like(preview[0][outside], 0.5))
        inside = alpha == 1
        assert torch.equal(preview[0][inside], image[0][inside])
        # source 'mask' takes a MASK as is (1 = product, no inversion)
        same, _ = run(node, image=image, source="mask", mask=1.0 - mask)
        assert torch.equal(same, product)


def test_product_mask_alpha_source_and_grow_feather(pack, manifest):
    node = pack.nodes.product_mask.ProductSceneProductMask
    path = SAMPLES / manifest[0]["file"]
    rgba = torch.from_numpy(np.asarray(Image.open(path).convert("RGBA")).astype(np.float32) / 255.0)[None]
    product, _ = run(node, image=rgba, source="alpha")
    alpha = alpha_of(path)
    assert torch.equal(product[0], (alpha > 0.5).float())
    grown, _ = run(node, image=rgba, source="alpha", grow_px=4)
    shrunk, _ = run(node, image=rgba, source="alpha", grow_px=-4)
    assert grown.sum() > product.sum() > shrunk.sum() > 0
    assert (grown >= product).all() and (shrunk <= product).all()
    soft, _ = run(node, image=rgba, source="alpha", feather_px=8)
    assert torch.equal(soft[product == 1], torch.ones(int(product.sum())))
    ring = (soft > 0) & (soft < 1)
    assert ring.any() and (product[ring] == 0).all()


def test_product_mask_white_backdrop(pack, comfy_nodes, manifest, tmp_path):
    node = pack.nodes.product_mask.ProductSceneProductMask
    for p in manifest:
        cut = Image.open(SAMPLES / p["file"]).convert("RGBA")
        white = Image.new("RGBA", cut.size, (255, 255, 255, 255))
        Image.alpha_composite(white, cut).convert("RGB").save(tmp_path / p["file"])
        image, mask = load_like_comfy(comfy_nodes, tmp_path / p["file"], name="white_" + p["file"])
        truth = alpha_of(SAMPLES / p["file"]) > 0.5
        # fill_holes=False: the silhouette, holes (mug handle, wrench ring) stay background
        product, _ = run(node, image=image, source="white_backdrop", mask=mask, fill_holes=False)
        got = product[0] > 0.5
        assert not (truth & ~got).any(), p["file"]                      # no product pixel missed
        assert iou(got, truth) > 0.96, (p["file"], iou(got, truth))
        # fill_holes=True: enclosed backdrop (the hole of a handle) counts as product
        product, _ = run(node, image=image, source="white_backdrop", mask=mask, fill_holes=True)
        filled = torch.from_numpy(ndimage.binary_fill_holes(truth.numpy()))
        got = product[0] > 0.5
        assert not (filled & ~got).any() and iou(got, filled) > 0.96, (p["file"], iou(got, filled))


def test_product_mask_errors(pack, comfy_nodes, manifest, tmp_path):
    node = pack.nodes.product_mask.ProductSceneProductMask
    err = productscene.errors.ProductSceneError
    assert issubclass(err, ValueError)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "flat.png")
    image, mask = load_like_comfy(comfy_nodes, tmp_path / "flat.png")
    with pytest.raises(err, match=r"^mask: the LoadImage mask is all zero.*no alpha"):
        run(node, image=image, source="loadimage_mask", mask=mask)
    with pytest.raises(err, match=r"^mask: source 'mask' needs a MASK"):
        run(node, image=image, source="mask")
    with pytest.raises(err, match=r"^image: expected an RGBA image"):
        run(node, image=image, source="alpha")
    with pytest.raises(err, match=r"^mask: expected the image's size 48x64"):
        run(node, image=image, source="mask", mask=torch.cat([torch.ones(1, 32, 64), torch.zeros(1, 32, 64)], 1))
    good, _ = load_like_comfy(comfy_nodes, SAMPLES / manifest[0]["file"])
    _, m = load_like_comfy(comfy_nodes, SAMPLES / manifest[0]["file"])
    with pytest.raises(err, match=r"^grow_px: shrinking the mask by 200 px"):
        run(node, image=good, source="loadimage_mask", mask=m, grow_px=-200)


def test_composite_node_keeps_product_pixels(pack, comfy_nodes, manifest):
    mask_node = pack.nodes.product_mask.ProductSceneProductMask
    comp_node = pack.nodes.product_mask.ProductSceneComposite
    for p in manifest:
        image, mask = load_like_comfy(comfy_nodes, SAMPLES / p["file"])
        product, _ = run(mask_node, image=image, source="loadimage_mask", mask=mask)
        g = torch.Generator().manual_seed(1)
        generated = torch.rand(image.shape, generator=g)
        for feather_px in (0, 6):
            (out,) = run(comp_node, original=image, generated=generated, product_mask=product, feather_px=feather_px)
            assert out.shape == image.shape and out.dtype == image.dtype
            inside = (product[0] == 1)
            assert inside.any()
            assert torch.equal(out[0][inside], image[0][inside])               # bit-identical
            far = (product[0] == 0) & (productscene.masks.grow(product, feather_px + 1)[0] == 0)
            assert torch.equal(out[0][far], generated[0][far])
            assert not torch.equal(out, image) and not torch.equal(out, generated)


def test_composite_node_refuses_vae_rounded_size(pack, comfy_nodes, manifest):
    comp_node = pack.nodes.product_mask.ProductSceneComposite
    err = productscene.errors.ProductSceneError
    image, mask = load_like_comfy(comfy_nodes, SAMPLES / manifest[0]["file"])
    generated = torch.rand(1, image.shape[1] - 8, image.shape[2], 3)
    with pytest.raises(err, match=r"^generated: expected the size of original"):
        run(comp_node, original=image, generated=generated, product_mask=1.0 - mask)
