"""LoRA on ``nn.Linear`` modules chosen by name patterns (host-free).

The adapters sit beside the model as forward hooks adding ``up(down(x)) * alpha / rank`` to a
layer's output (the model's own weights are never touched). ``LoRA.attached()`` installs them and
removes them on exit, so a shared model (ComfyUI clones share one) is left exactly as it was; a
training host attaches them once per session. Hooks act on the layer's output, so they work
whatever the host does to the weights themselves (weight patches, low-VRAM casting).

Why not ComfyUI's weight wrappers (``ModelPatcher.add_weight_wrapper``, as
``comfy_extras/nodes_train.py`` trains its LoRA)? They work (``tests/test_train_engine.py`` checks
the same model either way), but a wrapper builds ``W + up @ down`` for every wrapped layer in every
forward and autograd keeps that full-size weight for the backward pass, and computes a full-size
weight gradient: on the full SD1.5 UNet (float32, 32x32 latent, LoRA on every attention
projection) the tensors saved for backward grow from 575 to 857 MiB (+49%), and for SDXL in bf16 by
about the size of its attention projections (~1.6 GB). The hooks keep the low-rank path.

State dicts use ComfyUI's LoRA key format so ``LoraLoader`` / ``comfy.lora.load_lora`` apply them::

    <prefix><module path>.lora_up.weight    [out, rank]
    <prefix><module path>.lora_down.weight  [rank, in]
    <prefix><module path>.alpha             scalar (effective scale alpha / rank)

with ``prefix = "diffusion_model."`` for a UNet found at ``model.diffusion_model``.
"""
from __future__ import annotations

import contextlib
import re
from typing import Mapping, Sequence

import torch
from torch import nn

from ..errors import ProductSceneError

# attention projections of self- (attn1) and cross-attention (attn2)
DEFAULT_TARGETS = (
    r"(^|\.)attn[12]\.to_q$",
    r"(^|\.)attn[12]\.to_k$",
    r"(^|\.)attn[12]\.to_v$",
    r"(^|\.)attn[12]\.to_out\.0$",
)
CROSS_ATTENTION_TARGETS = (r"(^|\.)attn2\.to_k$", r"(^|\.)attn2\.to_v$")
# DiT joint attention (text and image tokens in one attention). Flux.1: each double-stream block's
# image and text q/k/v (``img_attn.qkv``, ``txt_attn.qkv``) and output projections (``*.proj``);
# each single-stream block's ``linear1`` (q/k/v fused with the MLP's input) and ``linear2`` (the
# attention output fused with the MLP's). Z-Image: every block's ``attention.qkv`` and
# ``attention.out`` (context refiner, noise refiner and main layers).
FLUX_TARGETS = (
    r"(^|\.)(img|txt)_attn\.qkv$",
    r"(^|\.)(img|txt)_attn\.proj$",
    r"(^|\.)single_blocks\.\d+\.linear[12]$",
)
Z_IMAGE_TARGETS = (r"(^|\.)attention\.qkv$", r"(^|\.)attention\.out$")
DIT_TARGETS = {"flux": FLUX_TARGETS, "z_image": Z_IMAGE_TARGETS}


class LoRALayer(nn.Module):
    """``up(down(x)) * alpha / rank`` added to one Linear's output."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None, dtype=torch.float32, device=None):
        super().__init__()
        self.rank = int(rank)
        self.alpha = float(alpha)
        down = torch.randn(self.rank, in_features, generator=generator, dtype=torch.float32) / self.rank
        self.down = nn.Parameter(down.to(device=device, dtype=dtype))
        self.up = nn.Parameter(torch.zeros(out_features, self.rank, device=device, dtype=dtype))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if torch.is_autocast_enabled() else self.down.dtype
        h = torch.nn.functional.linear(x.to(dtype), self.down.to(dtype))
        return torch.nn.functional.linear(h, self.up.to(dtype)) * self.scale


class LoRA(nn.Module):
    """Low-rank adapters on every ``nn.Linear`` of ``root`` whose name matches ``targets``."""

    def __init__(self, root: nn.Module, rank: int = 4, alpha: float | None = None,
                 targets: Sequence[str] = DEFAULT_TARGETS, prefix: str = "diffusion_model.",
                 seed: int | torch.Generator = 0, dtype=torch.float32, device=None):
        super().__init__()
        if int(rank) < 1:
            raise ProductSceneError(f"rank: expected a LoRA rank of 1 or more, got {rank}")
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.prefix = prefix
        self.targets = tuple(targets)
        patterns = [re.compile(t) for t in self.targets]
        gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
        self.paths: list[str] = []
        self._modules_by_path: dict[str, nn.Linear] = {}
        layers = {}
        for name, module in root.named_modules():
            if isinstance(module, nn.Linear) and any(p.search(name) for p in patterns):
                dev = device if device is not None else module.weight.device
                layers[_key(name)] = LoRALayer(module.in_features, module.out_features, self.rank, self.alpha,
                                               gen, dtype=dtype, device=dev)
                self.paths.append(name)
                self._modules_by_path[name] = module
        if not layers:
            raise ProductSceneError(
                f"lora targets: no Linear layer of the model matches {list(self.targets)}")
        self.layers = nn.ModuleDict(layers)
        self._handles: list = []

    def layer(self, path: str) -> LoRALayer:
        return self.layers[_key(path)]

    # -- attach / detach ---------------------------------------------------------------------------
    def _hook(self, path):
        layer = self.layers[_key(path)]

        def hook(module, args, output):
            return output + layer.delta(args[0]).to(output.dtype)
        return hook

    def attach(self) -> None:
        if self._handles:
            return
        for path in self.paths:
            self._handles.append(self._modules_by_path[path].register_forward_hook(self._hook(path)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def attached(self):
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    # -- ComfyUI key format ------------------------------------------------------------------------
    def comfy_state_dict(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        for path in self.paths:
            layer = self.layers[_key(path)]
            base = self.prefix + path
            out[base + ".lora_up.weight"] = layer.up.detach().to("cpu", dtype).contiguous()
            out[base + ".lora_down.weight"] = layer.down.detach().to("cpu", dtype).contiguous()
            out[base + ".alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
        return out

    def load_comfy_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        missing = []
        with torch.no_grad():
            for path in self.paths:
                base = self.prefix + path
                layer = self.layers[_key(path)]
                up, down = sd.get(base + ".lora_up.weight"), sd.get(base + ".lora_down.weight")
                if up is None or down is None:
                    missing.append(base)
                    continue
                if tuple(up.shape) != tuple(layer.up.shape) or tuple(down.shape) != tuple(layer.down.shape):
                    raise ProductSceneError(
                        f"lora: {base} has shape up {list(up.shape)} / down {list(down.shape)}, expected "
                        f"{list(layer.up.shape)} / {list(layer.down.shape)} (another rank or model?)")
                layer.up.copy_(up)
                layer.down.copy_(down)
                if base + ".alpha" in sd:
                    layer.alpha = float(sd[base + ".alpha"])
        if missing:
            raise ProductSceneError(f"lora: {len(missing)} target layers are missing from the state dict (first: {missing[0]})")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _key(path: str) -> str:
    return path.replace(".", "__")
