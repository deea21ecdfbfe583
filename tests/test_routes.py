"""The canvas extension's data route on the real server: each library's own categories."""
from __future__ import annotations

import os

import torch

from productscene.library import CategoryLibrary


def test_libraries_route_lists_each_librarys_categories(comfy_server):
    server, client = comfy_server
    folder = os.path.join(server.base_dir, "models", "category_libraries")
    os.makedirs(folder, exist_ok=True)
    CategoryLibrary.write(os.path.join(folder, "route_a.safetensors"), ["perfume", "tea"],
                          {"clip_l": torch.zeros(2, 1, 768)}, "sd15")
    CategoryLibrary.write(os.path.join(folder, "route_b.safetensors"), ["tools"],
                          {"clip_l": torch.zeros(1, 1, 768), "clip_g": torch.zeros(1, 1, 1280)}, "sdxl")
    index = client._get("/productscene/libraries")
    assert index["route_a.safetensors"] == {"categories": ["perfume", "tea"], "family": "sd15"}
    assert index["route_b.safetensors"] == {"categories": ["tools"], "family": "sdxl"}
