"""A small CLIP vision model built with ComfyUI's own class (``comfy.clip_vision.ClipVisionModel``)
from a config, with seeded random weights: the real encoder code path (preprocessing, penultimate
hidden states) at a size that runs in milliseconds."""
from __future__ import annotations

import functools
import json
import os
import tempfile

from .models import _quiet, init_weights


def config(width: int = 64, image_size: int = 56, patch: int = 14, layers: int = 2) -> dict:
    return {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": width,
            "image_size": image_size, "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": width * 2, "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
            "num_attention_heads": 4, "num_channels": 3, "num_hidden_layers": layers, "patch_size": patch,
            "projection_dim": 32, "torch_dtype": "float32"}


@functools.lru_cache(maxsize=None)
def build_clip_vision(width: int = 64, seed: int = 5):
    """``comfy.clip_vision.ClipVisionModel`` with ``width``-wide states (16 patches + class token)."""
    import comfy.clip_vision

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "clip_vision_config.json")
        with open(path, "w") as f:
            json.dump(config(width), f)
        with _quiet():
            cv = comfy.clip_vision.ClipVisionModel(path)
    init_weights(cv.model, seed)
    return cv
