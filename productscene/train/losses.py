"""Training losses (host-free)."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import ProductSceneError
from ..masks import resize_to_layer
from .distributed import global_mean


def _mask4(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B,h,w] or [B,1,h,w] mask -> [B,1,h,w] at ``like``'s spatial size (area resize)."""
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4:
        raise ProductSceneError(f"mask: expected [B,H,W] or [B,1,H,W], got shape {list(mask.shape)}")
    h, w = like.shape[-2:]
    if tuple(mask.shape[-2:]) != (h, w):
        mask = F.adaptive_avg_pool2d(mask.float(), (h, w))
    return mask.to(device=like.device, dtype=like.dtype)


def masked_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                          normalize: str = "all") -> torch.Tensor:
    """MSE of ``pred * mask`` against ``target * mask`` (mask at latent resolution, 1 = counts).

    ``normalize="all"``: mean over every element (Break-A-Scene's published loss);
    ``"mask"``: divided by the mask's weight instead, so the loss is a mean over the counted pixels.
    """
    if pred.shape != target.shape:
        raise ProductSceneError(f"pred/target: shapes differ, {list(pred.shape)} vs {list(target.shape)}")
    m = _mask4(mask, pred)
    diff = (pred.float() - target.float()) * m.float()
    sq = diff.pow(2)
    if normalize == "all":
        return sq.mean()
    if normalize == "mask":
        denom = (m.float().expand_as(sq)).sum().clamp_min(1e-8)
        return sq.sum() / denom
    raise ProductSceneError(f"normalize: expected 'all' or 'mask', got {normalize!r}")


def background_weights(product_mask: torch.Tensor, latent_hw: Sequence[int], background: float = 1.0,
                       product: float = 0.1) -> torch.Tensor:
    """Per-pixel loss weights ``[B,1,h,w]`` at latent size for the category recipe: ``background``
    where there is no product, ``product`` on latent cells that touch the product (max-pool resize,
    so the product's edge counts as product)."""
    m = resize_to_layer(product_mask.float(), int(latent_hw[0]), int(latent_hw[1]))
    m = (m > 0.5).float()
    return (background * (1.0 - m) + product * m)[:, None]


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * (pred - target)^2) / sum(w)`` over channels and pixels (weights ``[B,1,h,w]``).
    In a step on several ranks ``sum(w)`` is the ranks' mean, so the mean of the ranks' losses (and
    gradients) is this loss over the global batch."""
    w = _mask4(weights, pred).float()
    sq = (pred.float() - target.float()).pow(2) * w
    return sq.sum() / global_mean(w.expand_as(sq).sum()).clamp_min(1e-8)


def per_sample_weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Like :func:`weighted_mse` but one value per batch item ``[B]`` (evaluation)."""
    w = _mask4(weights, pred).float()
    sq = (pred.float() - target.float()).pow(2) * w
    return sq.flatten(1).sum(1) / w.expand_as(sq).flatten(1).sum(1).clamp_min(1e-8)


def attention_loss(maps: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                   weight: float = 0.01, mode: str = "area") -> torch.Tensor:
    """Break-A-Scene's cross-attention loss.

    For every drawn token ``name``: its attention map ``[B,h,w]`` divided by its max (per image)
    against the token's mask resized to ``h x w``; MSE, summed over tokens, times ``weight``.
    """
    if not maps:
        raise ProductSceneError("attention_loss: no attention maps were captured")
    total = None
    for name, amap in maps.items():
        if name not in masks:
            raise ProductSceneError(f"attention_loss: no mask for token {name!r}")
        mask = masks[name]
        if mask.dim() == 4:
            mask = mask[:, 0]
        h, w = amap.shape[-2:]
        if mode == "area":
            target = F.adaptive_avg_pool2d(mask[:, None].float(), (h, w))[:, 0]
        elif mode == "nearest":
            target = F.interpolate(mask[:, None].float(), size=(h, w), mode="nearest")[:, 0]
        else:
            raise ProductSceneError(f"mode: expected 'area' or 'nearest', got {mode!r}")
        a = amap.float()
        a = a / a.flatten(1).amax(1).clamp_min(1e-8)[:, None, None]
        target = target.to(a.device)
        if target.shape[0] != a.shape[0]:
            target = target.expand(a.shape[0], -1, -1)
        term = F.mse_loss(a, target)
        total = term if total is None else total + term
    return total * float(weight)
