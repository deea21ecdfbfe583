"""Installs the one ``SceneAttention`` object on a ComfyUI model.

The object lives in ``model_options["transformer_options"]["productscene"]``. Every cross-attention
layer gets a small trampoline as its attn2 replace that reads the object from ``extra_options`` at
call time, so later nodes (a second gate, a trainer passing a per-step capture) only swap the object,
never the trampolines. A replace another pack put on a layer first (IPAdapter, InstantID, PuLID) is
kept: its effect is added to ours as the difference it makes to plain attention.
"""
from __future__ import annotations

import torch

import comfy.patcher_extension
from comfy.ldm.modules import attention as comfy_attention

from productscene.attention import LayerInfo, SceneAttention
from productscene.errors import ProductSceneError

SCENE_KEY = "productscene"
WRAPPER_KEY = "productscene"


def comfy_kernel(q, k, v, heads, bias=None, extra_options=None):
    """ComfyUI's attention, given the layer's options so that an ``optimized_attention_override``
    another pack put in ``transformer_options`` sees our calls too (the options ComfyUI hands an
    attn2 replace are ``transformer_options`` minus the patch tables)."""
    options = extra_options or {}
    precision = options.get("attn_precision")
    if bias is None:
        return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=precision,
                                                   transformer_options=options)
    return comfy_attention.optimized_attention_masked(q, k, v, heads, mask=bias, attn_precision=precision,
                                                      transformer_options=options)


def cross_attention_keys(model_patcher) -> list[tuple[str, int, int]]:
    """Keys of every cross-attention layer, as ComfyUI's attn2 replace patches are keyed."""
    unet = model_patcher.model.diffusion_model
    groups = [("input", enumerate(unet.input_blocks)), ("middle", [(0, unet.middle_block)]),
              ("output", enumerate(unet.output_blocks))]
    keys = []
    for name, blocks in groups:
        for index, block in blocks:
            for module in block:
                for t, transformer in enumerate(getattr(module, "transformer_blocks", ())):
                    if getattr(transformer, "attn2", None) is not None:
                        keys.append((name, index, t))
    if not keys:
        raise ProductSceneError("model: found no cross-attention layers; expected an SD1.5, SD2.x or SDXL UNet")
    return keys


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
    )


class Attn2Trampoline:
    """The attn2 replace on one layer: runs the model's SceneAttention, plus what was there before.

    ``scene`` is the object installed with it (for ComfyUI's ``.to()`` / ``models()`` hand-offs
    when the model is loaded or offloaded); the call itself reads the object from the options, so
    a trainer can pass a per-step one."""

    def __init__(self, key, previous=None, scene: SceneAttention | None = None):
        self.key = key
        self.previous = previous
        self.scene = scene

    def __call__(self, q, k, v, extra_options):
        scene = extra_options.get(SCENE_KEY)
        heads = extra_options["n_heads"]
        if scene is None:
            if self.previous is not None:
                return self.previous(q, k, v, extra_options)
            return comfy_kernel(q, k, v, heads, extra_options=extra_options)
        kernel = lambda q_, k_, v_, h_, bias=None: comfy_kernel(q_, k_, v_, h_, bias, extra_options)
        out = scene(q, k, v, layer_info(extra_options, scene), kernel=kernel)
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
    for key in cross_attention_keys(m):
        current = replaces.get(key)
        previous = current.previous if isinstance(current, Attn2Trampoline) else current
        m.set_model_attn2_replace(Attn2Trampoline(key, previous=previous, scene=merged), *key)
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _check_before_sampling)
    return m


def _check_before_sampling(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """Validation that needs the latent: runs once before the first step, never inside it."""
    options = executor.class_obj.model_options.get("transformer_options", {})
    scene = options.get(SCENE_KEY)
    if scene is not None and scene.gates:
        scene.check_batch(noise.shape[0])
        scene.check_aspect(tuple(noise.shape[-2:]))
        replaces = options.get("patches_replace", {}).get("attn2", {})
        taken = [key for key, fn in replaces.items() if not isinstance(fn, Attn2Trampoline)]
        if taken:
            raise ProductSceneError(
                f"model: a node after Masked Category Attention replaced cross-attention on {len(taken)} "
                f"layers (first: {taken[0]}), which would let the category reach the product. Put Masked "
                "Category Attention after that node (IPAdapter, InstantID, PuLID, ...) so both take effect.")
    return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
