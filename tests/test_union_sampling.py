"""Union sampling (Break-A-Scene): k ~ U{1..N}, then k distinct concepts; the union of their masks."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from productscene.errors import ProductSceneError
from productscene.train.sampling import draw_concepts, union_sample


def test_k_is_uniform_and_concepts_distinct():
    g = torch.Generator().manual_seed(0)
    draws = [draw_concepts(4, g) for _ in range(4000)]
    sizes = Counter(len(d) for d in draws)
    assert set(sizes) == {1, 2, 3, 4}
    assert all(abs(count / 4000 - 0.25) < 0.03 for count in sizes.values())
    assert all(len(set(d)) == len(d) and list(d) == sorted(d) for d in draws)
    singles = Counter(d[0] for d in draws if len(d) == 1)
    assert set(singles) == {0, 1, 2, 3}  # every concept gets drawn alone


def test_union_sample_prompt_and_mask():
    masks = torch.zeros(3, 8, 8)
    masks[0, :2] = 1
    masks[1, 4:6] = 1
    masks[2, :, :1] = 1
    s = union_sample(["<v1>", "<v2>", "<v3>"], torch.Generator().manual_seed(1), masks, k=2)
    assert len(s.indices) == 2 and s.prompt == "a photo of " + " and ".join(s.names)
    expected = torch.stack([masks[i] for i in s.indices]).amax(0)
    assert torch.equal(s.mask[0], expected)


def test_same_seed_same_draws_and_bad_k():
    a = [draw_concepts(3, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    with pytest.raises(ProductSceneError, match="k: expected 1..3"):
        draw_concepts(3, torch.Generator(), k=4)
