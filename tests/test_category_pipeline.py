"""The category background graph in-process with ComfyUI's real nodes (issue 3, evidence 2):
same seed, two categories -> the backgrounds differ and the product pixels are bit-identical."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from devkit import comfy_env
from devkit.models import tiny_sd15

import folder_paths

pack = comfy_env.import_pack()
nodes = comfy_env.import_comfy_nodes()
from productscene.library import TokenLibrary  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "samples", "products", "perfume_bottle.png")


def load_product():
    rgba = np.asarray(Image.open(SAMPLE).convert("RGBA").resize((128, 128)), dtype=np.float32) / 255.0
    image = torch.from_numpy(rgba[None, :, :, :3].copy())
    alpha = torch.from_numpy(rgba[None, :, :, 3].copy())
    return image, 1.0 - alpha  # what LoadImage gives: IMAGE and MASK = 1 - alpha


def write_library(name):
    folder = folder_paths.get_folder_paths("category_libraries")[0]
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    TokenLibrary.write(os.path.join(folder, name), ["marble", "workbench"],
                          {"clip_l": torch.randn(2, 2, 768, generator=g)}, "sd15",
                          init_words={"marble": "marble", "workbench": "wood"})
    return name


def render(tm, library, category, image, product):
    positive, tokens = pack.nodes.category_tokens.ProductSceneCategoryTokens.execute(
        tm.clip, library, category, "a product photo on a {category} background").result
    negative = nodes.CLIPTextEncode().encode(tm.clip, "blurry")[0]
    model = pack.nodes.category_attention.MaskedCategoryAttention.execute(
        tm.model, product, tokens, 1.0, 1, 1.0).result[0]
    latent = {"samples": tm.vae.encode(image), "noise_mask": 1.0 - product}
    samples = nodes.common_ksampler(model, 42, 3, 6.0, "euler", "normal", positive, negative, latent)[0]
    generated = tm.vae.decode(samples["samples"])
    return pack.nodes.product_mask.ProductSceneComposite.execute(image, generated, product, 2).result[0]


def test_two_categories_same_seed_change_only_the_background():
    tm = tiny_sd15()
    image, loadimage_mask = load_product()
    product = pack.nodes.product_mask.ProductSceneProductMask.execute(image, "loadimage_mask", loadimage_mask).result[0]
    library = write_library("pipeline_test.safetensors")

    a = render(tm, library, "marble", image, product)
    b = render(tm, library, "workbench", image, product)
    again = render(tm, library, "marble", image, product)

    inside = product[0] >= 1.0
    assert inside.sum() > 1000
    for out in (a, b):
        assert torch.equal(out[0][inside], image[0][inside])  # bit-identical product pixels
    background = product[0] == 0.0
    assert (a[0][background] - b[0][background]).abs().mean() > 1e-3  # the category changed the background
    assert torch.equal(a, again)  # same seed, same category: same image
