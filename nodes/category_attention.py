"""MaskedCategoryAttention: the category identifier shapes only background pixels."""
from __future__ import annotations

import math

import comfy.sd
from comfy_api.v0_0_2 import io

from productscene.attention import CategoryGate, SceneAttention
from productscene.errors import ProductSceneError
from productscene.library import TokenLibrary
from productscene.masks import check_background_left
from productscene.prompt import CategoryTokens
from .category_tokens import CategoryTokensType
from .dit_host import dit_family, install_dit
from .host import install


def apply_library_lora(model, tokens: CategoryTokens, strength: float):
    """The library's shared LoRA on ``model``, read from the file only now that it is used."""
    return apply_lora_of(model, tokens.library_path, strength)


def apply_lora_of(model, library_path: str, strength: float):
    """The LoRA stored in a library (or concept-token) file on ``model`` (unchanged if none)."""
    if strength == 0.0:
        return model
    library = TokenLibrary.open(library_path)
    if not library.has_lora:
        return model
    patched, _ = comfy.sd.load_lora_for_models(model, None, library.lora_state_dict(), strength, 0.0)
    return patched


class MaskedCategoryAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductSceneMaskedCategoryAttention",
            display_name="Masked Category Attention (ProductScene)",
            category="ProductScene",
            description="Patches every cross-attention layer (SD1.5/SD2.x/SDXL) or every joint attention "
                        "(Flux.1, Z-Image) so the category cannot reach product pixels: product positions "
                        "attend the prompt encoded without the category identifier (at strength 1 their "
                        "attention output does not depend on the category at all), the background attends "
                        "the full prompt. On Flux.1 and Z-Image both prompts are carried through every block.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (SD1.5, SD2.x, SDXL, Flux.1 or Z-Image)."),
                io.Mask.Input("product_mask", tooltip="1 = product. One mask, or one per image of the batch; "
                              "same aspect ratio as the image being generated."),
                CategoryTokensType.Input("category_tokens", tooltip="From Category Tokens: the prompt without "
                                         "the identifier, and the library it came from. Its CONDITIONING must "
                                         "reach the sampler's positive input."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1 = product pixels attend only the prompt without the category; lower "
                                       "values blend linearly towards the full prompt (0 = no gate). Flux.1 "
                                       "and Z-Image take 1 or 0 only."),
                io.Int.Input("grow_latent_px", default=1, min=0, max=16,
                             tooltip="Grow the protected area by this many LATENT pixels (8 image pixels "
                                     "each) so the category does not colour the product's edge. (Product "
                                     "Mask's grow_px counts image pixels and changes the mask itself.)"),
                io.Float.Input("lora_strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="Strength of the library's shared LoRA, if it has one (0 = off)."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model; sample it with the Category Tokens "
                                             "conditioning as the positive prompt.")],
        )

    @classmethod
    def execute(cls, model, product_mask, category_tokens, strength, grow_latent_px, lora_strength) -> io.NodeOutput:
        if not isinstance(category_tokens, CategoryTokens) or category_tokens.free_context is None:
            raise ProductSceneError("category_tokens: expected the output of a Category Tokens node")
        for name, value, top in (("strength", strength, 1.0), ("lora_strength", lora_strength, 2.0)):
            if not (math.isfinite(float(value)) and 0.0 <= float(value) <= top):
                raise ProductSceneError(f"{name}: expected a number from 0 to {top:g}, got {value!r}")
        gate = CategoryGate(product_mask, category_tokens.free_context, strength=strength,
                            grow_latent_px=grow_latent_px, contexts=category_tokens.contexts)
        check_background_left(gate.region.mask, grow_latent_px)
        family = dit_family(model)
        net = getattr(getattr(model, "model", None), "diffusion_model", None)
        if family is None and net is not None and not hasattr(net, "input_blocks"):
            raise ProductSceneError(
                f"model: Masked Category Attention works on SD1.5, SD2.x, SDXL, Flux.1 and Z-Image; this model is "
                f"a {type(net).__name__} (docs/design.md, 'DiT bases', says what other DiTs need)")
        scene = SceneAttention().with_gate(gate)
        patched = install(model, scene) if family is None else install_dit(model, scene, family)
        return io.NodeOutput(apply_library_lora(patched, category_tokens, lora_strength))


NODES = [MaskedCategoryAttention]
