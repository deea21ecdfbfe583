"""Identical queries for every cross-attention layer across two sampling runs.

:class:`Replay` records each cross-attention layer's input hidden states in a first run (an attn2
patch, before the q/k/v projections) and feeds them back in a second run, so each layer of the
second run sees exactly the queries of the first and only the conditioning (or the patch) differs.
It also records each layer's output (an attn2 output patch) with the layer size and the batch's
cond/uncond chunks. Used by the gate's evidence tests and bench/free_context_choice.py.
"""
from __future__ import annotations

import torch

from .models import sample


class Replay:
    def __init__(self, inputs=None):
        self.inputs = [] if inputs is None else inputs
        self.replay = inputs is not None
        self.calls = 0
        self.outputs = []  # (hw, latent_hw, chunks, output [B, Nq, C])
        self.samples = None

    def patch(self, n, context, value, extra_options):
        if self.replay:
            n = self.inputs[self.calls]
        else:
            self.inputs.append(n.clone())
        self.calls += 1
        return n, context, value

    def output(self, n, extra_options):
        shape, latent = extra_options["activations_shape"], extra_options["original_shape"]
        self.outputs.append((tuple(shape[-2:]), tuple(latent[-2:]), tuple(extra_options["cond_or_uncond"]),
                             n.detach().clone()))
        return n

    def run(self, tm, model, positive, negative, latent_hw, batch, cfg=5.0, steps=1):
        m = model.clone()
        m.set_model_attn2_patch(self.patch)
        m.set_model_attn2_output_patch(self.output)
        self.samples = sample(tm, positive, negative, latent_hw=latent_hw, steps=steps, cfg=cfg, model=m, batch=batch)
        return self


def cond_rows(chunks, batch):
    """Batch rows of the cond chunks (ComfyUI lays the batch out chunk by chunk)."""
    per_chunk = batch // len(chunks)
    return [i * per_chunk + j for i, kind in enumerate(chunks) if kind == 0 for j in range(per_chunk)]


def per_layer(first: Replay, second: Replay, region):
    """For each layer: the cond rows' |delta| [rows, Nq] (largest over channels), its product
    positions [rows, Nq] (``region``: a ``ProductRegion``), and the uncond rows' largest |delta|."""
    assert len(first.outputs) == len(second.outputs) > 0
    out = []
    for (hw, latent_hw, chunks, a), (_, _, chunks_b, b) in zip(first.outputs, second.outputs):
        assert chunks == chunks_b
        rows = cond_rows(chunks, a.shape[0])
        others = [i for i in range(a.shape[0]) if i not in rows]
        delta = (a - b).abs().amax(-1)
        product = region.for_rows(torch.tensor(rows), a.shape[0] // len(chunks), hw, latent_hw, a.device)
        out.append((delta[rows], product, float(delta[others].max()) if others else 0.0, hw))
    return out
