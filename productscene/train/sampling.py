"""Union sampling of concepts (Break-A-Scene), host-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ProductSceneError


@dataclass(frozen=True)
class UnionSample:
    indices: tuple[int, ...]     # drawn concepts, in ascending order
    names: tuple[str, ...]
    prompt: str                  # "a photo of <v_a> and <v_b>"
    mask: torch.Tensor | None    # union of the drawn masks [B,H,W] (None when no masks given)


def draw_concepts(n: int, generator: torch.Generator, k: int | None = None) -> tuple[int, ...]:
    """k ~ U{1..n} (unless given), then k distinct concepts, uniformly; sorted indices."""
    if n < 1:
        raise ProductSceneError("concepts: expected at least one concept")
    if k is None:
        k = int(torch.randint(1, n + 1, (1,), generator=generator))
    if not 1 <= k <= n:
        raise ProductSceneError(f"k: expected 1..{n} concepts, got {k}")
    perm = torch.randperm(n, generator=generator)[:k]
    return tuple(sorted(int(i) for i in perm))


def union_prompt(tokens: Sequence[str], template: str = "a photo of {}") -> str:
    """``"a photo of <v_a> and <v_b> and ..."``."""
    if not tokens:
        raise ProductSceneError("tokens: expected at least one token for the prompt")
    return template.format(" and ".join(tokens))


def union_mask(masks: torch.Tensor | Sequence[torch.Tensor], indices: Sequence[int]) -> torch.Tensor:
    """Union (element-wise max) of the chosen masks. ``masks``: ``[N,H,W]`` or a list of ``[H,W]``
    / ``[B,H,W]`` tensors. Returns ``[B,H,W]`` (B = 1 for ``[H,W]`` masks)."""
    chosen = [masks[i] for i in indices]
    out = chosen[0]
    for m in chosen[1:]:
        out = torch.maximum(out, m)
    return out if out.dim() == 3 else out[None]


def union_sample(names: Sequence[str], generator: torch.Generator, masks=None, k: int | None = None,
                 template: str = "a photo of {}") -> UnionSample:
    """One union-sampling draw: concepts, their prompt and (with ``masks``) the union mask."""
    idx = draw_concepts(len(names), generator, k)
    drawn = tuple(names[i] for i in idx)
    return UnionSample(idx, drawn, union_prompt(drawn, template),
                       union_mask(masks, idx) if masks is not None else None)
