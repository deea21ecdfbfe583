"""Sampling time with a personality reference (Apply Personality) against the vanilla model, and
with reference + category gate, in one process.

    .venv/bin/python bench/bench_personality.py [--model full|tiny] [--latent 32] [--steps 6] [--repeats 3]

Euler with CFG 5, the same seed and conditioning for every arm, interleaved repeats, median ratios
of interleaved pairs (bench/bench_gate.py's ``time_arms``). The reference: 16 tokens from a random
adapter for the timed UNet's layers (CLIP-vision width 1280, as ViT-H), injected into every
cross-attention layer on the background. The tokens are computed once, as Personality Reference
does, so the figure is the sampling cost. With a GPU (PRODUCTSCENE_COMFY_GPU=1): --latent 64.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_gate import sampling_setup, time_arms  # noqa: E402
from productscene.personality import PersonalityAdapter  # noqa: E402

TOKENS = 16
VISION_WIDTH = 1280


def main() -> None:
    args, pack, tiny, model, positive, negative, tokens, mask = sampling_setup(__doc__)
    personality = pack.nodes.personality
    adapter = PersonalityAdapter.for_layers("sd15", VISION_WIDTH, pack.nodes.host.cross_attention_layers(model),
                                            tokens=TOKENS, seed=0).requires_grad_(False)
    with torch.no_grad():
        ref_tokens = adapter.tokens(torch.randn(1, 257, VISION_WIDTH, generator=torch.Generator().manual_seed(1)))
    reference = personality.PersonalityReference(adapter, ref_tokens, "bench")
    apply = personality.ProductSceneApplyPersonality.execute
    gate = pack.nodes.category_attention.MaskedCategoryAttention.execute
    arms = {
        "vanilla": model,
        "reference": apply(model, reference, mask, 1.0, 0.0, 1.0).result[0],
        "reference + gate": apply(gate(model, mask, tokens, 1.0, 1, 0.0).result[0], reference, mask,
                                  1.0, 0.0, 1.0).result[0],
    }
    print(f"reference tokens: {tuple(ref_tokens.shape)}, {len(adapter.layer_widths)} cross-attention layers")
    time_arms(arms, "vanilla", args, positive, negative)


if __name__ == "__main__":
    main()
