"""Files for running the brand workflow with an IP-Adapter file on a real server, random weights.

An IP-Adapter file holds one to_k_ip/to_v_ip pair for each of SD1.5's 16 cross-attention layers, so
it fits only a UNet with SD1.5's full block layout; the demo's default checkpoint is reduced (two
levels) and has other layers. :func:`ensure_full_layout_checkpoint` writes an SD1.5 checkpoint that
ComfyUI's loader detects as SD15, with SD1.5's full block layout (every level, two res blocks,
16 cross-attention layers) at 320 channels on every level (``channel_mult`` [1,1,1,1], so every layer
is 320 wide): about a tenth of SD1.5's UNet. :func:`write_ipadapter_file` writes a 'plus' IP-Adapter
file of the real key names for it, its resampler sized for the demo's default CLIP vision model
(ViT-L: 1024-wide penultimate states; the released files expect ViT-H's 1280, which the demo does
not ship).
"""
from __future__ import annotations

import json
from pathlib import Path

from . import default_model

FULL_LAYOUT_UNET = dict(default_model.UNET_CONFIG, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 1, 1, 1],
                        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
CHECKPOINT_NAME = "full-layout-sd15-320-random.safetensors"
IPADAPTER_NAME = "ip-adapter-plus_sd15-vitl-random.safetensors"
VERSION = "1"


def ensure_full_layout_checkpoint(cache_dir: Path | None = None) -> Path:
    import torch
    from productscene.files import read_header, save_safetensors_atomic

    path = Path(cache_dir or default_model.CACHE_DIR) / CHECKPOINT_NAME
    if path.is_file() and read_header(path)[0].get("productscene.builder_version") == VERSION:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = default_model._shapes(FULL_LAYOUT_UNET)
    gen = torch.Generator().manual_seed(default_model.SEED)
    tensors = {k: default_model._random_tensor(k, shapes[k], gen).to(torch.float16) for k in sorted(shapes)}
    meta = {"productscene.builder_version": VERSION, "productscene.trained": "false",
            "productscene.unet_config": json.dumps(FULL_LAYOUT_UNET),
            "modelspec.architecture": "stable-diffusion-v1"}
    save_safetensors_atomic(tensors, path, meta, kind="default_checkpoint", version=1)
    return path


def write_ipadapter_file(path: Path, vision_width: int = default_model.CLIP_VISION_WIDTH, seed: int = 0) -> Path:
    """A 'plus' IP-Adapter file (16 tokens, depth 4, 12 heads, SD1.5 context 768) for the full-layout
    checkpoint's 16 layers (320 wide), random weights, fp16 like the released files."""
    import torch
    from safetensors.torch import save_file
    from productscene.ipadapter import ResamplerProjection, layer_order
    from .models import init_weights

    projection = ResamplerProjection(vision_width, 768, 16, 768, depth=4, heads=12)
    init_weights(projection, seed)
    tensors = {f"image_proj.{k}": v for k, v in projection.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    for i, _ in enumerate(layer_order("sd15")):
        for part in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{2 * i + 1}.{part}.weight"] = torch.randn(320, 768, generator=g) / 768 ** 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, str(path))
    return path
