"""The gate ProductScene had before the category-free context, kept as a reference: an attn2
replace that only cuts the identifier's own key rows off product queries (additive -inf bias) in
the cond chunk. The evidence tests show it does NOT keep the category off the product (every row
after the identifier carries it too), and bench/bench_gate.py times it beside the current gate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from comfy.ldm.modules import attention as comfy_attention


class IdentifierRowsGate:
    def __init__(self, mask: torch.Tensor, rows, grow_latent_px: int = 0):
        from productscene.attention import ProductRegion
        self.region = ProductRegion(mask, grow_latent_px)
        self.rows = list(rows)
        self._bias: dict = {}

    def bias(self, extra_options, b, nq, nk, device, dtype):
        shape, latent = extra_options["activations_shape"], extra_options["original_shape"]
        chunks = tuple(extra_options.get("cond_or_uncond") or (0,))
        key = (tuple(shape[-2:]), tuple(latent[-2:]), chunks, b, nk, device, dtype)
        cached = self._bias.get(key)
        if cached is None:
            per_chunk = b // len(chunks)
            product = self.region.queries(tuple(shape[-2:]), tuple(latent[-2:]), device)
            product = product.expand(per_chunk, -1) if product.shape[0] == 1 else product
            cached = torch.zeros(b, nq, nk, device=device, dtype=dtype)
            cols = [r + rep for rep in range(0, nk, 77) for r in self.rows if r + rep < nk]
            for index, kind in enumerate(chunks):
                if kind == 0:
                    part = cached[index * per_chunk:(index + 1) * per_chunk]
                    part[:, :, cols] = torch.where(product[:, :, None], float("-inf"), 0.0).to(dtype)
            self._bias[key] = cached
        return cached

    def __call__(self, q, k, v, extra_options):
        bias = self.bias(extra_options, q.shape[0], q.shape[1], k.shape[1], q.device, q.dtype)
        return comfy_attention.optimized_attention_masked(q, k, v, extra_options["n_heads"], mask=bias)

    def __deepcopy__(self, memo):
        return self


def install_identifier_rows_gate(model, mask, rows, keys, grow_latent_px: int = 0):
    """A clone of ``model`` with the old gate on every cross-attention layer in ``keys``."""
    m = model.clone()
    gate = IdentifierRowsGate(mask, rows, grow_latent_px)
    for key in keys:
        m.set_model_attn2_replace(gate, *key)
    return m


def direct_product_queries(mask, hw):
    """Layer positions that hold any product pixel of ``mask`` (pooled straight to the layer)."""
    return (F.adaptive_max_pool2d(mask[:, None].float(), hw)[:, 0] > 0).flatten(1)
