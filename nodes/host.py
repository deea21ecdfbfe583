"""Installs the one ``SceneAttention`` object on a ComfyUI model.

The object lives in ``model_options["transformer_options"]["productscene"]``. Every cross-attention
layer gets a small trampoline as its attn2 replace that reads the object from ``extra_options`` at
call time, so a trainer passing a per-step object only swaps the object. An APPLY_MODEL wrapper
matches, once per model call, each gate to the batch rows whose raw conditioning is its own; an
OUTER_SAMPLE wrapper checks masks and conditioning once before sampling. Other packs' attn2
replaces (IPAdapter_plus in either order, others before the gate) compose with it: see
``Attn2Trampoline``; only a replace put after the gate on a layer's own key, where it would run
instead of the gate, is refused.
"""
from __future__ import annotations

import copy
import weakref

import torch

import comfy.patcher_extension
from comfy.ldm.modules import attention as comfy_attention

from productscene.attention import LayerInfo, SceneAttention, unet_cross_attention
from productscene.errors import ProductSceneError

SCENE_KEY = "productscene"
GATED_KEY = "productscene.gated"  # per model call: the batch rows each gate acts on
REPLACES_KEY = "productscene.attn2"  # per model call: the attn2 replace table
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
    return unet_cross_attention(model_patcher.model.diffusion_model)


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


def speaks_add_protocol(fn) -> bool:
    """IPAdapter_plus's patching protocol (cubiq's InstantID ships the same Attn2Replace): a node
    that finds a replace on a layer calls ``.add(callback, **kwargs)`` on it; the object keeps
    ``callback`` and ``kwargs`` lists and adds ``callback(out, q, k, v, extra_options, **kwargs)``
    to the layer's attention output while the step's sigma lies in ``[sigma_end, sigma_start]``."""
    return (callable(getattr(fn, "add", None)) and isinstance(getattr(fn, "callback", None), list)
            and isinstance(getattr(fn, "kwargs", None), list))


def run_added(out, q, k, v, extra_options, holders):
    """``out`` plus the callbacks ``holders`` (objects of the add protocol) hold, in order, as
    their own replace adds them (its per-device arguments included). IPAdapter's callbacks attend
    its image tokens from ``q`` alone: computed once per layer, they add nothing that depends on the
    text context."""
    sigmas = extra_options.get("sigmas")
    sigma = float(sigmas.detach().flatten()[0]) if sigmas is not None else float("inf")
    for holder in holders:
        per_device = holder.get_multigpu_kwargs(q.device) if hasattr(holder, "get_multigpu_kwargs") else holder.kwargs
        for callback, kwargs, call_kwargs in zip(holder.callback, holder.kwargs, per_device):
            if kwargs.get("sigma_end", float("-inf")) <= sigma <= kwargs.get("sigma_start", float("inf")):
                out = out + callback(out, q, k, v, extra_options, **call_kwargs)
    return out.to(q.dtype)


class Attn2Trampoline:
    """The attn2 replace on one layer: runs the model's SceneAttention, and what else acts there.

    ComfyUI hands an attn2 replace the already projected q, k, v; the category gate also needs this
    layer's key/value rows of its category-free context, so the trampoline keeps a *weak* reference
    to the layer's attn2 module and projects with the module's own to_k/to_v (weight patches, LoRA
    and low-VRAM casting apply as for ComfyUI's own projection; a weak reference survives the deep
    copy ComfyUI makes of model_options on every clone without copying the UNet). ``scene`` is the
    object installed with it (for ComfyUI's ``.to()`` / ``models()`` hand-offs when the model is
    loaded or offloaded); the call reads the object from the options, so a trainer can pass a
    per-step one.

    Other packs' patches on the layer, in either order (``previous``: the replace that sat on the
    layer's own key when the gate was installed; a block entry: one a node put on the block's 2-tuple
    key, which the trampoline's 3-tuple key shadows in ComfyUI's lookup, found at call time):
    - a replace of the add protocol (``speaks_add_protocol``: IPAdapter_plus's ``Attn2Replace``) has
      its callbacks run, once per layer, added to the gated output; a node after the gate that finds
      the trampoline on a layer key ``.add``s its callback to the trampoline itself;
    - any other replace is a black box and becomes the attention kernel: product queries get
      ``foreign(q, k_free, v_free)``, the rest ``foreign(q, k, v)``; exact, at the price of calling
      it twice on gated rows.
    """

    def __init__(self, key, attn2=None, previous=None, scene: SceneAttention | None = None, callbacks=()):
        self.key = key
        self.attn2 = weakref.ref(attn2) if attn2 is not None else None
        self.previous = previous
        self.scene = scene
        self.callback = [c for c, _ in callbacks]
        self.kwargs = [kw for _, kw in callbacks]

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def callbacks(self) -> list:
        return list(zip(self.callback, self.kwargs))

    def fork(self) -> "Attn2Trampoline":
        """A copy with its own callback lists (their arguments, IPAdapter's model, are shared)."""
        twin = Attn2Trampoline.__new__(Attn2Trampoline)
        twin.__dict__.update(self.__dict__)
        twin.callback, twin.kwargs = list(self.callback), [dict(kw) for kw in self.kwargs]
        return twin

    def __deepcopy__(self, memo):  # ComfyUI 0.3.x deep-copies model_options on every clone
        twin = self.fork()
        memo[id(self)] = twin
        twin.previous = copy.deepcopy(self.previous, memo)
        return twin

    def project(self, context):
        module = self.attn2() if self.attn2 is not None else None
        if module is None:
            raise ProductSceneError(f"model: the cross-attention layer {self.key} is gone; patch the model again")
        return module.to_k(context), module.to_v(context)

    def shadowed(self, extra_options):
        """The replace a node put on this layer's block key (SD1.5 IPAdapter: ``("input", 1)``) that
        ComfyUI would run here if the trampoline were not on the layer's own key."""
        if self.previous is not None or len(self.key) != 3:  # ComfyUI would run the layer key's
            return None
        entry = (extra_options.get(REPLACES_KEY) or {}).get(self.key[:2])
        return None if entry is None or isinstance(entry, Attn2Trampoline) else entry

    def __call__(self, q, k, v, extra_options):
        scene = extra_options.get(SCENE_KEY)
        heads = extra_options["n_heads"]
        other = self.previous if self.previous is not None else self.shadowed(extra_options)
        foreign, holders = (None, [other, self]) if speaks_add_protocol(other) else (other, [self])
        kernel = attention_kernel(foreign, q.shape[0], extra_options)
        if scene is None:
            out = kernel(q, k, v, heads)
        else:
            out = scene(q, k, v, layer_info(extra_options, scene), kernel=kernel, project=self.project)
        return run_added(out, q, k, v, extra_options, holders)

    def to(self, device_or_dtype):
        if isinstance(device_or_dtype, (torch.device, str)) and self.scene is not None:
            self.scene.to(torch.device(device_or_dtype))
        if hasattr(self.previous, "to"):
            self.previous = self.previous.to(device_or_dtype)
        return self

    def models(self) -> list:
        own = self.scene.models() if self.scene is not None else []
        return own + (self.previous.models() if hasattr(self.previous, "models") else [])


def attention_kernel(foreign, batch: int, extra_options):
    """``kernel(q, k, v, heads)`` for the scene: ComfyUI's attention, or a foreign replace that
    owned the layer. A gate calls the kernel with only its cond rows; the foreign replace then gets
    options that say so (one cond chunk), as packs size their own tokens by ``cond_or_uncond``."""
    if foreign is None:
        return lambda q, k, v, heads: comfy_kernel(q, k, v, heads, extra_options=extra_options)
    rows_options = dict(extra_options, cond_or_uncond=[0])
    return lambda q, k, v, heads: foreign(q, k, v, extra_options if q.shape[0] == batch else rows_options)


def scene_of(model_patcher) -> SceneAttention | None:
    return model_patcher.model_options.get("transformer_options", {}).get(SCENE_KEY)


def install(model_patcher, scene: SceneAttention):
    """A clone of ``model_patcher`` with ``scene`` merged into its attention object.

    On every cross-attention layer the trampoline takes the layer's own (3-tuple) key and keeps
    what was there (a trampoline's callbacks and previous replace, or the replace itself). A replace
    on the block's 2-tuple key stays in place and is run by the trampoline (``Attn2Trampoline.shadowed``)."""
    m = model_patcher.clone()
    existing = scene_of(m)
    merged = existing.merged(scene) if existing else scene
    m.model_options.setdefault("transformer_options", {})[SCENE_KEY] = merged
    replaces = m.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    for key, attn2 in cross_attention_layers(m).items():
        current = replaces.get(key)
        if isinstance(current, Attn2Trampoline):
            kept = dict(previous=current.previous, callbacks=current.callbacks())
        else:
            kept = dict(previous=current)
        m.set_model_attn2_replace(Attn2Trampoline(key, attn2, scene=merged, **kept), *key)
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, _check_before_sampling),
                          (comfy.patcher_extension.WrappersMP.APPLY_MODEL, _match_gated_rows)):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    m.remove_callbacks_with_key(comfy.patcher_extension.CallbacksMP.ON_CLONE, WRAPPER_KEY)
    m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLONE, WRAPPER_KEY, _own_trampolines)
    return m


def _own_trampolines(parent, clone) -> None:
    """Every clone of a patched model gets its own trampolines. A node after the gate (IPAdapter)
    clones the model and ``.add``s its callback to the trampoline at a key; current ComfyUI copies
    only the dicts and lists of model_options on a clone (0.3.x deep-copied them), so without this
    the callback would also land on the gate's own output, which ComfyUI caches and hands to other
    branches and to the next run."""
    def table(model):
        return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})

    theirs, ours = table(parent), table(clone)
    for key, fn in ours.items():
        if isinstance(fn, Attn2Trampoline) and theirs.get(key) is fn:
            ours[key] = fn.fork()


def _match_gated_rows(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                      **kwargs):
    """Once per model call, before any layer: which batch rows each gate acts on (a cond row whose
    raw conditioning is the gate's own), handed to every layer through the call's options, and the
    call's attn2 replace table (ComfyUI hands a replace the options without it)."""
    transformer_options[REPLACES_KEY] = transformer_options.get("patches_replace", {}).get("attn2", {})
    scene = transformer_options.get(SCENE_KEY)
    if scene is not None and scene.gates and c_crossattn is not None:
        transformer_options[GATED_KEY] = scene.gated_rows(
            tuple(transformer_options.get("cond_or_uncond") or (0,)), c_crossattn.shape[0], c_crossattn)
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def _check_before_sampling(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """Validation that needs the latent: runs once before the first step, never inside it."""
    options = executor.class_obj.model_options.get("transformer_options", {})
    scene = options.get(SCENE_KEY)
    if scene is not None and (scene.gates or scene.injections):
        scene.check_batch(noise.shape[0])
        scene.check_aspect(tuple(noise.shape[-2:]))
        conds = getattr(executor.class_obj, "conds", None) or {}
        scene.check_contexts([c.get("cross_attn") for c in conds.get("positive", [])])
        replaces = options.get("patches_replace", {}).get("attn2", {})
        patcher = getattr(executor.class_obj, "model_patcher", None)
        layers = cross_attention_keys(patcher) if patcher is not None else \
            [key for key, fn in replaces.items() if isinstance(fn, Attn2Trampoline)]
        taken = [key for key in layers if not isinstance(replaces.get(key), Attn2Trampoline)]
        if taken:
            raise ProductSceneError(
                f"model: a node after Masked Category Attention (or Apply Personality) replaced cross-attention "
                f"on {len(taken)} layers (first: {taken[0]}) and would run instead of it, letting the category "
                "reach the product (or dropping the reference). Connect that node (IPAdapter, InstantID, PuLID, "
                "...) before Masked Category Attention: MODEL -> that node -> Masked Category Attention -> KSampler.")
    return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
