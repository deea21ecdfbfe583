"""Personality Reference and Apply Personality: a brand's style from a reference image, on the
background only (SPEC section 2). The adapter, its tokens and the injection are the core's
(``productscene.personality``); these nodes translate ComfyUI's CLIP vision, IMAGE, MASK and MODEL."""
from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass

import folder_paths
import torch
import comfy.model_management
import comfy.model_patcher
from comfy_api.v0_0_2 import io

from productscene.attention import SceneAttention
from productscene.blocks import PRESETS, describe, layer_weights
from productscene.errors import ProductSceneError
from productscene.masks import check_background_left, validate_image
from productscene.ipadapter import is_ipadapter, load_adapter
from productscene.personality import PersonalityAdapter, combine, neutral_fill, patch_keep
from .host import cross_attention_layers, install
from .paths import IPADAPTER_FOLDER, PERSONALITY_FOLDER, resolve

PersonalityReferenceType = io.Custom("PERSONALITY_REFERENCE")
COMBINE = ("average", "concatenate")
_ADAPTERS: dict[str, tuple[int, int, PersonalityAdapter]] = {}
_PATCHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # adapter -> its ModelPatcher


@dataclass(frozen=True)
class PersonalityReference:
    """What Personality Reference hands to Apply Personality: the adapter and the reference tokens."""
    adapter: PersonalityAdapter
    tokens: torch.Tensor  # [1, K or R*K, C]
    adapter_name: str


class AdapterWeights(torch.nn.Module):
    """The part of an adapter that acts while sampling, its per-layer to_k/to_v (the same modules),
    as the model ComfyUI loads beside the UNet. The projection that makes the reference tokens runs
    once per reference, before sampling, and stays where it is."""

    def __init__(self, adapter: PersonalityAdapter):
        super().__init__()
        self.to_k, self.to_v = adapter.to_k, adapter.to_v


def adapter_patcher(adapter: PersonalityAdapter) -> comfy.model_patcher.ModelPatcher:
    """The adapter's weights under ComfyUI's model management (one patcher per adapter, as
    comfy_extras/nodes_model_patch.py hands a patch's weights to ComfyUI): the sampler loads them
    with the UNet through the patch's ``models()``, counts them in its memory estimate and offloads
    them as it offloads models."""
    patcher = _PATCHERS.get(adapter)
    if patcher is None:
        patcher = comfy.model_patcher.ModelPatcher(AdapterWeights(adapter),
                                                   load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        _PATCHERS[adapter] = patcher
    return patcher


def _safetensors(folder: str) -> list[str]:
    try:
        return [n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(".safetensors")]
    except KeyError:
        return []


def ipadapter_files(folder: str) -> list[str]:
    """The IP-Adapter files of a model folder (by their keys)."""
    names = []
    for name in _safetensors(folder):
        path = folder_paths.get_full_path(folder, name)
        if path and is_ipadapter(path):
            names.append(name)
    return names


def list_adapters() -> list[str]:
    """Files of models/personality_adapters, and the IP-Adapter files of models/ipadapter (by their keys)."""
    return sorted(set(_safetensors(PERSONALITY_FOLDER)) | set(ipadapter_files(IPADAPTER_FOLDER)))


def adapter_path(name: str) -> str:
    """models/personality_adapters first, then models/ipadapter."""
    try:
        return resolve(PERSONALITY_FOLDER, name, what="adapter")
    except ProductSceneError:
        if not (isinstance(name, str) and folder_paths.get_full_path(IPADAPTER_FOLDER, name)):
            raise
    return resolve(IPADAPTER_FOLDER, name, what="adapter")


def open_adapter(name: str) -> PersonalityAdapter:
    """The adapter file ``name`` (a personality adapter or an IP-Adapter file), cached by (mtime, size)."""
    path = adapter_path(name)
    st = os.stat(path)
    key = os.path.realpath(path)
    hit = _ADAPTERS.get(key)
    if hit is None or hit[:2] != (st.st_mtime_ns, st.st_size):
        with torch.inference_mode(False):
            adapter = load_adapter(path).eval().requires_grad_(False)
        hit = (st.st_mtime_ns, st.st_size, adapter)
        _ADAPTERS[key] = hit
    return hit[2]


def model_layers(model) -> dict[tuple, int]:
    """``{layer key: inner width}`` of every cross-attention layer of a ComfyUI model."""
    return {k: m.to_k.weight.shape[0] for k, m in cross_attention_layers(model).items()}


def model_context_dim(model) -> int:
    return next(iter(cross_attention_layers(model).values())).to_k.weight.shape[1]


def vision_states(clip_vision, image: torch.Tensor, reference_mask: torch.Tensor | None,
                  output: str = "penultimate_hidden_states") -> tuple:
    """CLIP vision penultimate states of ``image`` (the whole image, squashed to the encoder's
    square, so the mask maps onto the patch grid), with the reference's product filled. With
    ``output="image_embeds"`` (a plain IP-Adapter) the pooled embedding: the product can only be
    filled, there are no patches to leave out."""
    validate_image(image, "image", channels=(3, 4))
    if reference_mask is not None and reference_mask.ndim == 2:
        reference_mask = reference_mask[None]
    filled = neutral_fill(image[..., :3], reference_mask)
    with torch.no_grad():  # a frozen encoder: nothing flows back into it (its weights may be inference tensors)
        out = clip_vision.encode_image(filled, crop=False)
    states = out[output]
    if output == "image_embeds":
        return states, None
    return states, patch_keep(states.shape[1], reference_mask, states.shape[0])


def encode_reference(clip_vision, image, adapter: PersonalityAdapter, how: str = "average",
                     reference_mask=None) -> torch.Tensor:
    if how not in COMBINE:
        raise ProductSceneError(f"combine: expected one of {', '.join(COMBINE)}, got {how!r}")
    states, keep = vision_states(clip_vision, image, reference_mask,
                                 getattr(adapter, "vision_output", "penultimate_hidden_states"))
    adapter.check_states(states, "clip_vision")
    return combine(adapter.tokens(states.float(), keep), how)


class ProductScenePersonalityReference(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductScenePersonalityReference",
            display_name="Personality Reference (ProductScene)",
            category="ProductScene",
            description=("Encodes a brand's reference image (its layout, elements and colours) with CLIP vision and "
                         "a personality adapter into reference tokens for Apply Personality. The reference's own "
                         "product (reference_mask) is left out of what is encoded."),
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the adapter was trained with "
                                    "(its penultimate hidden states are used; a plain IP-Adapter file uses its "
                                    "pooled image embedding)."),
                io.Image.Input("image", tooltip="The reference image(s) in the brand's style. Several images "
                               "(a batch) are combined as 'combine' says. The whole image is seen (not a centre crop)."),
                io.Combo.Input("adapter", options=list_adapters(),
                               tooltip="Personality adapter file (models/personality_adapters), trained for "
                                       "this checkpoint's family and this CLIP vision model, or an IP-Adapter file "
                                       "(models/ipadapter: ip-adapter_sd15, ip-adapter-plus_sd15, ip-adapter_sdxl, "
                                       "ip-adapter_sdxl_vit-h, ip-adapter-plus_sdxl_vit-h) with the CLIP vision model "
                                       "it expects (ViT-H; ViT-bigG for ip-adapter_sdxl)."),
                io.Combo.Input("combine", options=list(COMBINE), default="average",
                               tooltip="Several references: 'average' their tokens (one blended style), or "
                                       "'concatenate' them (every reference's tokens, attended together)."),
                io.Mask.Input("reference_mask", optional=True,
                              tooltip="Optional: the reference's own product (1 = product), same size as the "
                                      "image. It is filled and its patches are left out, so only the style is taken."),
            ],
            outputs=[PersonalityReferenceType.Output(display_name="REFERENCE",
                                                     tooltip="Reference tokens for Apply Personality.")],
        )

    @classmethod
    def execute(cls, clip_vision, image, adapter, combine, reference_mask=None) -> io.NodeOutput:
        loaded = open_adapter(adapter)
        tokens = encode_reference(clip_vision, image, loaded, combine, reference_mask)
        return io.NodeOutput(PersonalityReference(loaded, tokens.detach().clone(), adapter))


class ProductSceneApplyPersonality(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductSceneApplyPersonality",
            display_name="Apply Personality (ProductScene)",
            category="ProductScene",
            description=("Patches every cross-attention layer with the reference's decoupled cross-attention, "
                         "added to the text attention on background positions only: the product receives "
                         "nothing from the reference. Works with Masked Category Attention on the same model."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.5, SD2.x or SDXL) the adapter was trained for."),
                PersonalityReferenceType.Input("reference", tooltip="From Personality Reference."),
                io.Mask.Input("product_mask", tooltip="1 = product. One mask, or one per image of the batch; same "
                              "aspect ratio as the image being generated. Product positions get nothing."),
                io.Float.Input("weight", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="How strongly the reference's attention is added (0 = off: the model is unchanged)."),
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule at which the reference starts acting (0 = first step)."),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule after which it stops (1 = last step); must be above start."),
                PersonalityReferenceType.Input("negative_reference", optional=True,
                                               tooltip="Optional: a reference for the negative (unconditional) "
                                                       "branch, a style to steer away from. Without one, both branches "
                                                       "get the reference and weight alone sets its strength."),
                io.Combo.Input("blocks", options=list(PRESETS), default="all layers", optional=True,
                               tooltip="Which UNet blocks receive the reference. 'style': SDXL " + describe("sdxl", "style")
                                       + " (InstantStyle's style block); SD1.5 " + describe("sd15", "style")
                                       + ". 'layout': SDXL " + describe("sdxl", "layout") + " (InstantStyle's "
                                       "layout block); SD1.5 " + describe("sd15", "layout") + ". SD1.5's follow "
                                       "IPAdapter_plus's 'style transfer' and 'composition' weight types. 'style and "
                                       "layout': both, the layout blocks at layout_weight. Other blocks are left "
                                       "exactly as they are."),
                io.Float.Input("layout_weight", default=1.0, min=0.0, max=2.0, step=0.01, optional=True,
                               tooltip="With blocks = 'style and layout': the weight of the layout blocks "
                                       "(weight is the style blocks')."),
                io.String.Input("block_weights", default="", optional=True,
                                tooltip="Advanced: per-block weights that replace the preset, e.g. "
                                        "'output.1:1.0, input.8:0.5' (ComfyUI block names; 'input.8.0' for one "
                                        "transformer layer), each times weight. Blocks not named get nothing."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model.")],
        )

    @classmethod
    def execute(cls, model, reference, product_mask, weight, start, end, negative_reference=None,
                blocks="all layers", layout_weight=1.0, block_weights="") -> io.NodeOutput:
        for name, value in (("reference", reference), ("negative_reference", negative_reference)):
            if value is not None and not isinstance(value, PersonalityReference):
                raise ProductSceneError(f"{name}: expected the output of a Personality Reference node")
        for name, value, top in (("weight", weight, 2.0), ("start", start, 1.0), ("end", end, 1.0),
                                 ("layout_weight", layout_weight, 2.0)):
            if not (math.isfinite(float(value)) and 0.0 <= float(value) <= top):
                raise ProductSceneError(f"{name}: expected a number from 0 to {top:g}, got {value!r}")
        if not start < end:
            raise ProductSceneError(f"start/end: start ({start}) must be below end ({end})")
        if blocks not in PRESETS:
            raise ProductSceneError(f"blocks: expected one of {', '.join(PRESETS)}, got {blocks!r}")
        if not isinstance(block_weights, str):
            raise ProductSceneError(f"block_weights: expected text like 'output.1:1.0', got {type(block_weights).__name__}")
        adapter = reference.adapter
        if negative_reference is not None and negative_reference.adapter_name != reference.adapter_name:
            raise ProductSceneError("negative_reference: made with another adapter than reference; use the same one")
        dim = model_context_dim(model)
        if dim != adapter.context_dim:
            raise ProductSceneError(
                f"reference: the adapter {reference.adapter_name} was made for {adapter.family} "
                f"({adapter.context_dim}-wide context), but this model's context is {dim} wide")
        layers = model_layers(model)
        adapter.check_layers(layers, "reference")
        per_layer = layer_weights(adapter.family, layers, weight, blocks, layout_weight, block_weights)
        injection = adapter.injection(reference.tokens, product_mask, weight=weight, start=start, end=end,
                                      negative=None if negative_reference is None else negative_reference.tokens,
                                      models=[adapter_patcher(adapter)], layer_weights=per_layer)
        check_background_left(injection.mask, 0, name="product_mask")
        return io.NodeOutput(install(model, SceneAttention().with_injection(injection)))


NODES = [ProductScenePersonalityReference, ProductSceneApplyPersonality]
