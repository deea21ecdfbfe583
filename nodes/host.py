"""Installs the one ``SceneAttention`` object on a ComfyUI model.

The object lives in ``model_options["transformer_options"]["productscene"]``. Every cross-attention
layer gets a small trampoline as its attn2 replace that reads the object from ``extra_options`` at
call time, so a trainer passing a per-step object only swaps the object. An APPLY_MODEL wrapper
matches, once per model call, each gate to the batch rows whose raw conditioning is its own; an
OUTER_SAMPLE wrapper checks masks and conditioning once before sampling. A replace another pack put
on a layer first (IPAdapter, InstantID, PuLID) is kept: its effect is added to ours as the
difference it makes to plain attention.
"""
from __future__ import annotations

import weakref

import torch

import comfy.patcher_extension
from comfy.ldm.modules import attention as comfy_attention

from productscene.attention import LayerInfo, SceneAttention
from productscene.errors import ProductSceneError

SCENE_KEY = "productscene"
GATED_KEY = "productscene.gated"  # per model call: the batch rows each gate acts on
WRAPPER_KEY = "productscene"


def comfy_kernel(q, k, v, heads, extra_options=None):
    """ComfyUI's attention, given the layer's options so that an ``optimized_attention_override``
    another pack put in ``transformer_options`` sees our calls too (the options ComfyUI hands an
    attn2 replace are ``transformer_options`` minus the patch tables). No mask: the gate needs none,
    so GPUs keep their fast kernels."""
    options = extra_options or {}
    return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=options.get("attn_precision"),
                                               transformer_options=options)


def cross_attention_layers(model_patcher) -> dict[tuple[str, int, int], object]:
    """``{key: attn2 module}`` of every cross-attention layer, keyed as ComfyUI keys attn2 replaces."""
    unet = model_patcher.model.diffusion_model
    groups = [("input", enumerate(unet.input_blocks)), ("middle", [(0, unet.middle_block)]),
              ("output", enumerate(unet.output_blocks))]
    layers = {}
    for name, blocks in groups:
        for index, block in blocks:
            for module in block:
                for t, transformer in enumerate(getattr(module, "transformer_blocks", ())):
                    if getattr(transformer, "attn2", None) is not None:
                        layers[(name, index, t)] = transformer.attn2
    if not layers:
        raise ProductSceneError("model: found no cross-attention layers; expected an SD1.5, SD2.x or SDXL UNet")
    return layers


def cross_attention_keys(model_patcher) -> list[tuple[str, int, int]]:
    """Keys of every cross-attention layer, as ComfyUI's attn2 replace patches are keyed."""
    return list(cross_attention_layers(model_patcher))


def _progress(extra_options) -> float | None:
    sigmas, schedule = extra_options.get("sigmas"), extra_options.get("sample_sigmas")
    if sigmas is None or schedule is None or len(schedule) < 2:
        return None
    sigma = float(sigmas.flatten()[0])
    done = int((schedule > sigma + 1e-6).sum())
    return min(1.0, done / (len(schedule) - 1))


def layer_info(extra_options, scene: SceneAttention) -> LayerInfo:
    block = extra_options["block"]
    shape = extra_options["activations_shape"]
    latent = extra_options["original_shape"]
    return LayerInfo(
        key=(block[0], block[1], extra_options.get("block_index", 0)),
        heads=extra_options["n_heads"],
        hw=(shape[-2], shape[-1]),
        latent_hw=(latent[-2], latent[-1]),
        chunks=tuple(extra_options.get("cond_or_uncond") or (0,)),
        progress=_progress(extra_options) if scene.injections else None,
        gated=extra_options.get(GATED_KEY),
    )


class Attn2Trampoline:
    """The attn2 replace on one layer: runs the model's SceneAttention, plus what was there before.

    ComfyUI hands an attn2 replace the already projected q, k, v; the category gate also needs this
    layer's key/value rows of its category-free context, so the trampoline keeps a *weak* reference
    to the layer's attn2 module and projects with the module's own to_k/to_v (weight patches, LoRA
    and low-VRAM casting apply as for ComfyUI's own projection; a weak reference survives the deep
    copy ComfyUI makes of model_options on every clone without copying the UNet). ``scene`` is the
    object installed with it (for ComfyUI's ``.to()`` / ``models()`` hand-offs when the model is
    loaded or offloaded); the call reads the object from the options, so a trainer can pass a
    per-step one."""

    def __init__(self, key, attn2=None, previous=None, scene: SceneAttention | None = None):
        self.key = key
        self.attn2 = weakref.ref(attn2) if attn2 is not None else None
        self.previous = previous
        self.scene = scene

    def project(self, context):
        module = self.attn2() if self.attn2 is not None else None
        if module is None:
            raise ProductSceneError(f"model: the cross-attention layer {self.key} is gone; patch the model again")
        return module.to_k(context), module.to_v(context)

    def __call__(self, q, k, v, extra_options):
        scene = extra_options.get(SCENE_KEY)
        heads = extra_options["n_heads"]
        if scene is None:
            if self.previous is not None:
                return self.previous(q, k, v, extra_options)
            return comfy_kernel(q, k, v, heads, extra_options=extra_options)
        kernel = lambda q_, k_, v_, h_: comfy_kernel(q_, k_, v_, h_, extra_options=extra_options)
        out = scene(q, k, v, layer_info(extra_options, scene), kernel=kernel, project=self.project)
        if self.previous is not None:
            out = out + (self.previous(q, k, v, extra_options) - kernel(q, k, v, heads))
        return out

    def to(self, device_or_dtype):
        if isinstance(device_or_dtype, (torch.device, str)) and self.scene is not None:
            self.scene.to(torch.device(device_or_dtype))
        return self

    def models(self) -> list:
        return self.scene.models() if self.scene is not None else []


def scene_of(model_patcher) -> SceneAttention | None:
    return model_patcher.model_options.get("transformer_options", {}).get(SCENE_KEY)


def install(model_patcher, scene: SceneAttention):
    """A clone of ``model_patcher`` with ``scene`` merged into its attention object."""
    m = model_patcher.clone()
    existing = scene_of(m)
    merged = existing.merged(scene) if existing else scene
    m.model_options.setdefault("transformer_options", {})[SCENE_KEY] = merged
    replaces = m.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    for key, attn2 in cross_attention_layers(m).items():
        current = replaces.get(key)
        previous = current.previous if isinstance(current, Attn2Trampoline) else current
        m.set_model_attn2_replace(Attn2Trampoline(key, attn2, previous=previous, scene=merged), *key)
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, _check_before_sampling),
                          (comfy.patcher_extension.WrappersMP.APPLY_MODEL, _match_gated_rows)):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    return m


def _match_gated_rows(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                      **kwargs):
    """Once per model call, before any layer: which batch rows each gate acts on (a cond row whose
    raw conditioning is the gate's own), handed to every layer through the call's options."""
    scene = transformer_options.get(SCENE_KEY)
    if scene is not None and scene.gates and c_crossattn is not None:
        transformer_options[GATED_KEY] = scene.gated_rows(
            tuple(transformer_options.get("cond_or_uncond") or (0,)), c_crossattn.shape[0], c_crossattn)
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def _check_before_sampling(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """Validation that needs the latent: runs once before the first step, never inside it."""
    options = executor.class_obj.model_options.get("transformer_options", {})
    scene = options.get(SCENE_KEY)
    if scene is not None and scene.gates:
        scene.check_batch(noise.shape[0])
        scene.check_aspect(tuple(noise.shape[-2:]))
        conds = getattr(executor.class_obj, "conds", None) or {}
        scene.check_contexts([c.get("cross_attn") for c in conds.get("positive", [])])
        replaces = options.get("patches_replace", {}).get("attn2", {})
        taken = [key for key, fn in replaces.items() if not isinstance(fn, Attn2Trampoline)]
        if taken:
            raise ProductSceneError(
                f"model: a node after Masked Category Attention replaced cross-attention on {len(taken)} "
                f"layers (first: {taken[0]}), which would let the category reach the product. Put Masked "
                "Category Attention after that node (IPAdapter, InstantID, PuLID, ...) so both take effect.")
    return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
