"""A small, honest stand-in for ``comfy.model_patcher.ModelPatcher`` for unit tests of node logic.

It has no weights and runs nothing. It records every patching call and keeps ``model_options``
exactly the way the real patcher does (same keys, same copy-on-write of ``patches_replace``,
deep copy on ``clone()``), and exposes a UNet *layout* with ComfyUI's attribute names so that a patch
installer can enumerate the cross-attention layers:

    m = MockModelPatcher()                       # SD1.5 layout (16 attn2 layers)
    m.model.model_config.unet_config             # the real SD1.5 unet_config dict
    m.model.diffusion_model.input_blocks[1][1]   # a SpatialTransformer-like object:
        .transformer_blocks[0].attn2             #   .heads, .dim_head, .context_dim, .inner_dim
    m.attn2_keys()                               # [("input", 1, 0), ..., ("output", 11, 0)]

The classes are named like ComfyUI's (``SpatialTransformer``, ``BasicTransformerBlock``,
``CrossAttention``) for duck typing, but ``isinstance(x, comfy...SpatialTransformer)`` is False:
code that needs real modules belongs in a test with ``devkit.models.tiny_sd15()``.

Recording: ``m.calls`` (shared by a patcher and all its clones, in order) holds
``(patcher_id, method, args)`` tuples; ``m.clones`` the clones made from it (recursively shared);
``m.replaces`` is a shortcut to ``model_options["transformer_options"]["patches_replace"]["attn2"]``.
This module imports neither comfy nor productscene.
"""
from __future__ import annotations

import copy
import itertools
import uuid
from types import SimpleNamespace

# ----------------------------------------------------------------------------- layouts

SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD2_UNET_CONFIG = dict(SD15_UNET_CONFIG, use_linear_in_transformer=True, context_dim=1024,
                       num_heads=-1, num_head_channels=64)
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_heads": -1, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
UNET_CONFIGS = {"sd15": SD15_UNET_CONFIG, "sd2": SD2_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}


class CrossAttention:
    def __init__(self, heads, dim_head, context_dim):
        self.heads, self.dim_head, self.context_dim = heads, dim_head, context_dim
        self.inner_dim = heads * dim_head


class BasicTransformerBlock:
    def __init__(self, heads, dim_head, context_dim):
        self.n_heads, self.d_head = heads, dim_head
        self.attn2 = CrossAttention(heads, dim_head, context_dim)


class SpatialTransformer:
    def __init__(self, channels, depth, heads, dim_head, context_dim, downsample):
        self.in_channels = channels
        self.downsample = downsample  # layer h, w = latent h, w // downsample (not a ComfyUI attribute)
        self.transformer_blocks = [BasicTransformerBlock(heads, dim_head, context_dim) for _ in range(depth)]


class ResBlock:
    def __init__(self, channels):
        self.out_channels = channels


class Downsample:
    pass


class Upsample:
    pass


def _heads(cfg, ch):
    if cfg.get("num_head_channels", -1) == -1:
        return cfg["num_heads"], ch // cfg["num_heads"]
    return ch // cfg["num_head_channels"], cfg["num_head_channels"]


def build_layout(cfg: dict) -> SimpleNamespace:
    """``diffusion_model``-like object (input_blocks / middle_block / output_blocks lists of lists)
    laid out the way ``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel`` builds them."""
    depth_in = list(cfg["transformer_depth"])
    depth_out = list(cfg["transformer_depth_output"])
    mult, nres, ctx = cfg["channel_mult"], cfg["num_res_blocks"], cfg["context_dim"]
    input_blocks = [[SimpleNamespace(kind="conv_in")]]
    ds = 1
    for level, m in enumerate(mult):
        ch = cfg["model_channels"] * m
        for _ in range(nres[level]):
            block = [ResBlock(ch)]
            d = depth_in.pop(0)
            if d > 0:
                block.append(SpatialTransformer(ch, d, *_heads(cfg, ch), ctx, ds))
            input_blocks.append(block)
        if level != len(mult) - 1:
            input_blocks.append([Downsample()])
            ds *= 2
    ch = cfg["model_channels"] * mult[-1]
    middle = [ResBlock(ch)]
    if cfg.get("transformer_depth_middle", 0) and cfg["transformer_depth_middle"] > 0:
        middle.append(SpatialTransformer(ch, cfg["transformer_depth_middle"], *_heads(cfg, ch), ctx, ds))
    middle.append(ResBlock(ch))
    output_blocks = []
    for level, m in list(enumerate(mult))[::-1]:
        ch = cfg["model_channels"] * m
        for i in range(nres[level] + 1):
            block = [ResBlock(ch)]
            d = depth_out.pop()  # ComfyUI pops from the end of transformer_depth_output
            if d > 0:
                block.append(SpatialTransformer(ch, d, *_heads(cfg, ch), ctx, ds))
            if level and i == nres[level]:
                block.append(Upsample())
                ds //= 2
            output_blocks.append(block)
    return SimpleNamespace(input_blocks=input_blocks, middle_block=middle, output_blocks=output_blocks,
                           model_channels=cfg["model_channels"], context_dim=ctx)


def iter_attn2(diffusion_model):
    """Yield ``(key, transformer, block)`` for every cross-attention layer, key as ComfyUI uses it."""
    groups = (("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
              ("output", diffusion_model.output_blocks))
    for name, blocks in groups:
        for i, seq in enumerate(blocks):
            t_index = 0
            for layer in seq:
                for tb in getattr(layer, "transformer_blocks", ()):
                    yield (name, i, t_index), layer, tb
                    t_index += 1


# ----------------------------------------------------------------------------- the patcher

class MockModelPatcher:
    """Records patching calls; keeps model_options like ``comfy.model_patcher.ModelPatcher``."""

    _ids = itertools.count()

    def __init__(self, family: str = "sd15", unet_config: dict | None = None, *, _root=None):
        cfg = copy.deepcopy(unet_config if unet_config is not None else UNET_CONFIGS[family])
        self.family = family
        self.id = next(self._ids)
        self.load_device = "cpu"
        self.offload_device = "cpu"
        self.model_options = {"transformer_options": {}}
        self.patches: dict = {}
        self.object_patches: dict = {}
        self.weight_wrapper_patches: dict = {}
        self.wrappers: dict = {}
        self.callbacks: dict = {}
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        self.clones: list[MockModelPatcher] = []
        self.calls: list = _root.calls if _root is not None else []
        if _root is not None:
            self.model = _root.model
        else:
            self.model = SimpleNamespace(
                model_config=SimpleNamespace(unet_config=cfg),
                diffusion_model=build_layout(cfg),
                model_type=SimpleNamespace(name="EPS"),
            )

    # -- recording
    def _record(self, method, *args):
        self.calls.append((self.id, method, args))

    def calls_of(self, method: str) -> list:
        return [args for _, m, args in self.calls if m == method]

    # -- cloning
    def clone(self) -> "MockModelPatcher":
        self._record("clone")
        n = MockModelPatcher(self.family, _root=self)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.weight_wrapper_patches = self.weight_wrapper_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = copy.deepcopy(self.wrappers)
        n.callbacks = copy.deepcopy(self.callbacks)
        n.parent = self
        self.clones.append(n)
        for callbacks in self.callbacks.get("on_clone", {}).values():
            for callback in callbacks:
                callback(self, n)
        return n

    def is_clone(self, other) -> bool:
        return getattr(other, "model", None) is self.model

    # -- transformer_options patches (same storage as the real patcher)
    def set_model_patch(self, patch, name):
        self._record("set_model_patch", patch, name)
        self._set_patch(patch, name)

    def _set_patch(self, patch, name):
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        self._record("set_model_patch_replace", patch, name, block_name, number, transformer_index)
        self._set_replace(patch, name, block_name, number, transformer_index)

    def _set_replace(self, patch, name, block_name, number, transformer_index):
        to = self.model_options["transformer_options"].copy()
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"][name] = dict(to["patches_replace"].get(name, {}))
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        to["patches_replace"][name][key] = patch
        self.model_options["transformer_options"] = to

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        self._record("set_model_attn2_replace", patch, block_name, number, transformer_index)
        self._set_replace(patch, "attn2", block_name, number, transformer_index)

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self._record("set_model_attn1_replace", patch, block_name, number, transformer_index)
        self._set_replace(patch, "attn1", block_name, number, transformer_index)

    def set_model_attn2_patch(self, patch):
        self._record("set_model_attn2_patch", patch)
        self._set_patch(patch, "attn2_patch")

    def set_model_attn2_output_patch(self, patch):
        self._record("set_model_attn2_output_patch", patch)
        self._set_patch(patch, "attn2_output_patch")

    # -- wrappers / callbacks (ModelPatcher keeps them on itself, not in model_options)
    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self._record("add_wrapper_with_key", wrapper_type, key, wrapper)
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def add_wrapper(self, wrapper_type, wrapper):
        self._record("add_wrapper", wrapper_type, wrapper)
        self.wrappers.setdefault(wrapper_type, {}).setdefault(None, []).append(wrapper)

    def get_wrappers(self, wrapper_type, key):
        return self.wrappers.get(wrapper_type, {}).get(key, [])

    def remove_wrappers_with_key(self, wrapper_type, key):
        self._record("remove_wrappers_with_key", wrapper_type, key)
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def add_callback_with_key(self, call_type, key, callback):
        self._record("add_callback_with_key", call_type, key, callback)
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def remove_callbacks_with_key(self, call_type, key):
        self._record("remove_callbacks_with_key", call_type, key)
        self.callbacks.get(call_type, {}).pop(key, None)

    # -- weights
    def state_dict_keys(self) -> set[str]:
        """The attn2 projection keys a real model of this layout has (``diffusion_model.`` prefix)."""
        keys = set()
        for (block, i, t), _, _ in iter_attn2(self.model.diffusion_model):
            where = {"input": f"input_blocks.{i}.1", "middle": "middle_block.1",
                     "output": f"output_blocks.{i}.1"}[block]
            for proj in ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"):
                keys.add(f"diffusion_model.{where}.transformer_blocks.{t}.attn2.{proj}")
        return keys

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        """Like the real one: stores patches for known keys, returns the keys it accepted."""
        self._record("add_patches", patches, strength_patch, strength_model)
        known = self.state_dict_keys()
        accepted = []
        for k, v in patches.items():
            key = k if isinstance(k, str) else k[0]
            if key in known:
                self.patches.setdefault(key, []).append((strength_patch, v, strength_model, None, None))
                accepted.append(k)
        self.patches_uuid = uuid.uuid4()
        return accepted

    def add_object_patch(self, name, obj):
        self._record("add_object_patch", name, obj)
        self.object_patches[name] = obj

    def add_weight_wrapper(self, name, function):
        self._record("add_weight_wrapper", name, function)
        self.weight_wrapper_patches[name] = self.weight_wrapper_patches.get(name, []) + [function]

    def get_model_object(self, name: str):
        if name in self.object_patches:
            return self.object_patches[name]
        obj = self
        for part in name.split("."):
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        return obj

    # -- inspection helpers
    def attn2_keys(self) -> list[tuple[str, int, int]]:
        return [key for key, _, _ in iter_attn2(self.model.diffusion_model)]

    @property
    def replaces(self) -> dict:
        return self.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
