"""Masked Category Attention on DiT joint attention (SPEC section 6): the host-free parts.

On a DiT (Flux, Z-Image, ...) text and image tokens meet in one attention and the text tokens are
themselves updated in every block, so the UNet's trick (product queries attend another context in
cross-attention) has no place to act. Instead two text streams go through the whole model:

    sequence = [ T (Nt tokens: the prompt with the identifier) | F (Nf: the category-free prompt) | image ]

and every joint attention gets one block mask (``joint_mask``):

    queries \\ keys      T      F      image
    T                   yes    no     yes
    F                   no     yes    yes
    product image       no     yes    yes     (and image tokens that are no pixel: padding, references)
    background image    yes    no     yes

F never attends T, so with the image-token and F states of a block held fixed, a product image
token's attention output is exactly independent of the category, in every block (double or single
stream, refiner or main), and the identifier gets exactly zero gradient through product tokens
(a masked key gets probability exactly 0: ``exp(-inf)``). Rows the gate does not act on (uncond,
another prompt) attend T with every image token: F is carried but unseen there.

``DitFamily`` is the table of what differs between families (patch size, where text positions
start); the host adapter (nodes/dit_host.py) walks the blocks. This module never imports a host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ProductSceneError
from .masks import grow, resize_to_layer


@dataclass(frozen=True)
class DitFamily:
    """What the gate needs to know about one DiT family.

    ``patch``: latent pixels per image token side. ``text_positions``: ``"zero"`` (every text token
    at RoPE position 0, image at axis-0 position 0: Flux.1, so F's positions alone are T's) or
    ``"before_image"`` (text tokens at 1..N and the image right after them on axis 0: Z-Image /
    Lumina 2; F is placed so that its distance to the image is the one it has alone).
    ``pad_multiple``: the model pads each text stream to a multiple of this with its own pad token
    (Z-Image: 32), or None. ``global_vector``: the conditioning key of the pooled text vector the
    model receives (it must come from F), or None. ``encoder``: the text encoder that carries the
    identifier."""

    name: str
    patch: int
    text_positions: str
    pad_multiple: int | None
    global_vector: str | None
    encoder: str


DIT_FAMILIES = {
    "flux": DitFamily("flux", patch=2, text_positions="zero", pad_multiple=None, global_vector="pooled_output",
                      encoder="t5xxl"),
    "zimage": DitFamily("zimage", patch=2, text_positions="before_image", pad_multiple=32, global_vector=None,
                        encoder="qwen3_4b"),
}


def family(name: str) -> DitFamily:
    try:
        return DIT_FAMILIES[name]
    except KeyError:
        raise ProductSceneError(f"model: no DiT family '{name}'; expected one of {sorted(DIT_FAMILIES)}") from None


def token_grid(latent_hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """The image-token grid of a latent: the latent padded up to the patch size, then patched."""
    h, w = latent_hw
    return -(-int(h) // patch), -(-int(w) // patch)


def patch_tokens(mask: torch.Tensor, latent_hw: tuple[int, int], patch: int, grow_latent_px: int = 0) -> torch.Tensor:
    """``[Bm, h*w]`` bool: the image tokens that hold product. The mask is taken to the latent (a
    latent pixel touching product is product), grown there, padded with background to a multiple
    of the patch size (as the model pads the latent) and max-pooled patch by patch: a token with one
    product latent pixel is product."""
    m = grow(resize_to_layer(mask.float(), *latent_hw), grow_latent_px)
    h, w = latent_hw
    ph, pw = (-h) % patch, (-w) % patch
    if ph or pw:
        m = F.pad(m, (0, pw, 0, ph))
    tokens = F.max_pool2d(m[:, None], kernel_size=patch, stride=patch)[:, 0]
    return (tokens > 0.5).flatten(1)


def _streams(text: int, free: int, image: int, product: torch.Tensor, gated: torch.Tensor,
             free_valid: torch.Tensor | None):
    """Per query, which text stream it reads (``[B, L]`` bool, True = F), and per row the keys of
    F (``[B, L]`` bool: the real F tokens); T's keys are the first ``text`` columns, the image's the
    last ``image``."""
    b = product.shape[0]
    device = product.device
    total = text + free + image
    reads_free = torch.zeros(b, total, dtype=torch.bool, device=device)
    reads_free[:, text:text + free] = True
    img_free = gated.to(device)[:, None].expand(b, image).clone()  # tokens after the grid read F
    img_free[:, :product.shape[1]] &= product
    reads_free[:, text + free:] = img_free
    key_f = torch.zeros(b, total, dtype=torch.bool, device=device)
    if free_valid is None:
        key_f[:, text:text + free] = True
    else:
        cols = torch.arange(free, device=device)
        key_f[:, text:text + free] = cols[None, :] < free_valid.to(device)[:, None]
    return reads_free, key_f


def joint_mask(text: int, free: int, image: int, product: torch.Tensor, gated: torch.Tensor,
               free_valid: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
    """The additive mask ``[B, 1, L, L]`` (0 = attend, -inf = never), L = text + free + image, for
    the sequence ``[T | F | image]``.

    ``product``: ``[B, P]`` bool for the first P <= image image tokens (the patch grid); image tokens
    after it (the model's padding tokens, reference images) are no background pixel, so on a gated
    row they read F like the product: nothing but background pixels reads T. ``gated``: ``[B]`` bool, the rows the gate
    acts on (elsewhere every image token attends T); ``free_valid``: ``[B]`` the number of real F
    tokens of each row (the rest of the F slot is padding that only F attends), None = all."""
    b = product.shape[0]
    device = product.device
    total = text + free + image
    reads_free, key_f = _streams(text, free, image, product, gated, free_valid)
    key_t = torch.zeros(total, dtype=torch.bool, device=device)
    key_t[:text] = True
    key_img = torch.zeros(total, dtype=torch.bool, device=device)
    key_img[text + free:] = True
    # allowed[b, q, k] = image key, or the stream the query reads
    allowed = torch.where(reads_free[:, :, None], key_f[:, None, :], key_t[None, None, :]) | key_img[None, None, :]
    if free_valid is not None:  # an F padding query reads the real F tokens; make sure it reads something
        allowed[:, text:text + free, text:text + free] |= ~key_f[:, None, text:text + free].any(-1, keepdim=True)
    out = torch.zeros(b, 1, total, total, dtype=dtype, device=device)
    return out.masked_fill_(~allowed[:, None], float("-inf"))


@dataclass(frozen=True)
class JointGroups:
    """``joint_mask`` as two unmasked attention calls per batch row: the queries that read T (T,
    background image) against the keys ``[T | image]``, and those that read F (F, product image)
    against ``[F | image]``. The same attention as the mask (a masked key gets exactly nothing), but
    no mask: attention kernels without mask support (flash) stay usable, and no query is scored
    against keys it may not read. Per row: ``reads_t``, ``reads_f`` query indices; ``keys_t``,
    ``keys_f`` key indices."""

    reads_t: tuple
    reads_f: tuple
    keys_t: tuple
    keys_f: tuple


def joint_groups(text: int, free: int, image: int, product: torch.Tensor, gated: torch.Tensor,
                 free_valid: torch.Tensor | None = None) -> JointGroups | None:
    """The :class:`JointGroups` of ``joint_mask``'s pattern; None where a row has no real F token
    (the mask then lets F padding read the whole F slot: keep the mask for that case)."""
    reads_free, key_f = _streams(text, free, image, product, gated, free_valid)
    if not bool(key_f[:, text:text + free].any(-1).all()):
        return None
    total = text + free + image
    device = product.device
    key_img = torch.zeros(total, dtype=torch.bool, device=device)
    key_img[text + free:] = True
    key_t = key_img.clone()
    key_t[:text] = True
    keys_t = key_t.nonzero()[:, 0]
    rows = range(reads_free.shape[0])
    return JointGroups(reads_t=tuple((~reads_free[r]).nonzero()[:, 0] for r in rows),
                       reads_f=tuple(reads_free[r].nonzero()[:, 0] for r in rows),
                       keys_t=tuple(keys_t for _ in rows),
                       keys_f=tuple((key_f[r] | key_img).nonzero()[:, 0] for r in rows))


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: JointGroups, attend) -> torch.Tensor:
    """Joint attention by :class:`JointGroups`: ``q``, ``k``, ``v`` ``[B, H, L, D]``; ``attend(q, k,
    v)`` is one unmasked attention call on ``[1, H, n, D]`` tensors returning ``[1, H, n, D]``.
    Returns ``[B, H, L, D]``."""
    out = torch.empty_like(q)
    for r in range(q.shape[0]):
        for reads, keys in ((groups.reads_t[r], groups.keys_t[r]), (groups.reads_f[r], groups.keys_f[r])):
            if reads.numel():
                out[r:r + 1, :, reads] = attend(q[r:r + 1, :, reads], k[r:r + 1, :, keys], v[r:r + 1, :, keys])
    return out


def identifier_only_mask(text: int, image: int, product: torch.Tensor, identifier_rows, dtype=torch.float32):
    """The gate this design replaces, for counter-tests: ONE text stream, and product image queries
    skip only the identifier's own rows of T. Every other T row is computed from the identifier by
    the (bidirectional or causal) encoder and the joint blocks, so the category still reaches the
    product."""
    b = product.shape[0]
    total = text + image
    out = torch.zeros(b, 1, total, total, dtype=dtype, device=product.device)
    rows = torch.zeros(b, total, dtype=torch.bool, device=product.device)
    rows[:, text:text + product.shape[1]] = product
    cols = torch.zeros(total, dtype=torch.bool, device=product.device)
    cols[list(identifier_rows)] = True
    blocked = rows[:, :, None] & cols[None, None, :]
    return out.masked_fill_(blocked[:, None], float("-inf"))


def text_positions(fam: DitFamily, text: int, free: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Axis-0 RoPE positions of T and F (after the model's padding), each as it would be alone
    relative to the image: ``"before_image"`` puts T at 1..Nt and the image at Nt + 1, so F goes at
    Nt - Nf + 1 .. Nt (RoPE sees only differences: F's distance to every image token and to
    itself is the one it has alone)."""
    if fam.text_positions == "zero":
        return torch.zeros(text), torch.zeros(free)
    if fam.text_positions == "before_image":
        return torch.arange(text, dtype=torch.float32) + 1.0, torch.arange(free, dtype=torch.float32) + 1.0 + (text - free)
    raise ProductSceneError(f"model: unknown text positions '{fam.text_positions}' in the DiT table")
