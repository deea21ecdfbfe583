"""TEST-ONLY ComfyUI custom node folder (never shipped in the pack; devkit.launcher links it into a
test server's custom_nodes/ when asked: ``ComfyServer(..., extra_custom_nodes=[FOLDER])``).

ComfyUI's file loaders fix the real widths of the DiT families: Flux detection sets heads of 128 (24 of
them on ComfyUI 0.3.75 whatever the file holds), Z-Image is recognised only at width 3840, and the T5-XXL, CLIP-L and
Qwen3-4B text encoders are built from fixed JSON configs (4.7B and 4B parameters). Importing this
folder teaches ComfyUI's loaders the small configs of devkit's tiny files, and only of those: a
file carries them in its safetensors metadata under :data:`MARKER` (JSON, written by
devkit/dit_files.py)::

    {"version": 1, "kind": "diffusion_model", "supported_model": "Flux", "unet_config": {...}}
    {"version": 1, "kind": "text_encoder", "model_options": {"t5xxl_model_config": {...}}}

* ``comfy.model_detection.model_config_from_unet`` (what UNETLoader's ``load_diffusion_model``
  calls with the file's metadata): for a marked file, the named ``comfy.supported_models`` class
  built from the file's unet config (what detection returns for a real file); otherwise unchanged.
* ``comfy.sd.load_clip`` (CLIPLoader, DualCLIPLoader): for marked files, their ``model_options``
  (ComfyUI's own config-override options) are added; otherwise unchanged.

Imported as ``devkit.tiny_dit_loaders`` (tests) it installs nothing: call :func:`install`.
Everything after that is ComfyUI's own code path (weights loading, the encoders' classes and
tokenizers, sampling). Files without the marker load exactly as before.
"""
from __future__ import annotations

import dataclasses
import json
import logging

from safetensors import safe_open

import comfy.model_detection
import comfy.sd
import comfy.supported_models

MARKER = "productscene.devkit.tiny_config"
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}


def _marker(metadata) -> dict | None:
    if not metadata or MARKER not in metadata:
        return None
    spec = json.loads(metadata[MARKER])
    if spec.get("version") != 1:
        raise ValueError(f"{MARKER}: version {spec.get('version')!r}, expected 1")
    return spec


def _host_unet_config(spec: dict) -> dict:
    """The file's unet config with what this ComfyUI's classes need (newer Flux: ``txt_ids_dims``,
    [] for Flux.1 as its own detection sets)."""
    cfg = dict(spec["unet_config"])
    if cfg.get("image_model") == "flux":
        import comfy.ldm.flux.model as flux_model
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(flux_model.FluxParams)}:
            cfg.setdefault("txt_ids_dims", [])
    return cfg


_model_config_from_unet = comfy.model_detection.model_config_from_unet


def model_config_from_unet(state_dict, unet_key_prefix, *args, metadata=None, **kwargs):
    spec = _marker(metadata)
    if spec is None or spec.get("kind") != "diffusion_model":
        return _model_config_from_unet(state_dict, unet_key_prefix, *args, metadata=metadata, **kwargs)
    config_class = getattr(comfy.supported_models, spec["supported_model"])
    logging.info("productscene devkit: tiny %s diffusion model from its metadata", spec["supported_model"])
    return config_class(_host_unet_config(spec))


_load_clip = comfy.sd.load_clip


def _file_metadata(path) -> dict | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()
    except Exception:  # not a safetensors file: ComfyUI's loader says what is wrong with it
        return None


def load_clip(ckpt_paths, *args, model_options=None, **kwargs):
    options = dict(model_options or {})
    for path in ckpt_paths:
        spec = _marker(_file_metadata(path))
        if spec is not None and spec.get("kind") == "text_encoder":
            options.update(spec["model_options"])
    if model_options is None and not options:
        return _load_clip(ckpt_paths, *args, **kwargs)
    return _load_clip(ckpt_paths, *args, model_options=options, **kwargs)


def install() -> None:
    """Put the two wrappers in ComfyUI's modules (what ComfyUI's import of this folder does)."""
    comfy.model_detection.model_config_from_unet = model_config_from_unet
    comfy.sd.load_clip = load_clip


# ComfyUI imports this folder under its path; the tests import ``devkit.tiny_dit_loaders`` to call
# the wrappers directly, without changing the test process's ComfyUI
if __name__ != "devkit.tiny_dit_loaders":
    install()
