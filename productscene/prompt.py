"""Identifier splicing in tokenized prompts (host-agnostic).

Works on the structure ComfyUI's tokenizers return::

    {"l": [[(id, weight), ... 77], ...chunks], "g": ...}      # tuples may carry a 3rd word id

A template holds ``{category}`` once. It is replaced by ``n`` copies of a single-token *marker*
word; after tokenizing, each marker token is replaced by the category's identifier vector of that
encoder (a 1-D tensor of the encoder's width, which ComfyUI's text encoders splice in place of a
token embedding). Position ``p`` of chunk ``c`` becomes row ``c * 77 + p`` of the conditioning.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .errors import ProductSceneError

PLACEHOLDER = "{category}"
# rare single-token words of the CLIP BPE vocabulary; the first one absent from a template is used
MARKERS = ("olis", "phol", "sks", "ohwx")

Tokens = dict  # {key: [[(id|tensor, weight[, word_id]), ...], ...]}


@dataclass(frozen=True, eq=False)
class CategoryTokens:
    """The CATEGORY_TOKENS value passed between nodes."""
    library_path: str
    category: str
    family: str
    rows: tuple          # row indices of the identifier in the cond context (same for every encoder)
    context_rows: int    # rows of the encoded cond
    vectors: dict        # {encoder: [n, width]} (encoder names as in the library: clip_l, clip_g, clip_h)


def placeholder_text(template: str, n: int, marker: str) -> str:
    """``template`` with ``{category}`` replaced by ``n`` copies of ``marker`` (space separated)."""
    check_template(template)
    if n < 1:
        raise ProductSceneError(f"vectors: need at least one vector per identifier, got {n}")
    return template.replace(PLACEHOLDER, " " + " ".join([marker] * n) + " ")


def check_template(template) -> None:
    if not isinstance(template, str):
        raise ProductSceneError(f"template: expected text, got {type(template).__name__}")
    count = template.count(PLACEHOLDER)
    if count != 1:
        raise ProductSceneError(
            f"template: must contain {PLACEHOLDER} exactly once to mark where the category identifier "
            f"goes, found it {count} times in {template!r}")


def _is_id(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def _ids(tokens: Tokens, key: str) -> list[int]:
    return [t[0] for chunk in tokens[key] for t in chunk if _is_id(t[0])]


def marker_token_ids(tokenize: Callable[[str], Tokens], marker: str) -> dict[str, int]:
    """Token id of ``marker`` in every encoder, found by tokenizing it alone (compared with the
    empty prompt, whose start/end/pad tokens are removed). The marker must be one token."""
    alone = tokenize(marker)
    empty = tokenize("")
    out = {}
    for key in alone:
        special = set(_ids(empty, key)) if key in empty else set()
        extra = [t for t in _ids(alone, key) if t not in special]
        if len(extra) != 1:
            raise ProductSceneError(
                f"marker: {marker!r} is not a single token for encoder {key!r} (got {len(extra)} tokens)")
        out[key] = int(extra[0])
    return out


def find_positions(tokens: Tokens, ids: Mapping[str, int]) -> dict[str, list[tuple[int, int]]]:
    """``{key: [(chunk, position), ...]}`` of the token ``ids[key]`` in each encoder."""
    out = {}
    for key, chunks in tokens.items():
        if key not in ids:
            raise ProductSceneError(f"tokens: no marker id for encoder {key!r}")
        tid = ids[key]
        out[key] = [(c, p) for c, chunk in enumerate(chunks) for p, t in enumerate(chunk)
                    if _is_id(t[0]) and int(t[0]) == tid]
    return out


def _row_offsets(chunks) -> list[int]:
    offs, total = [], 0
    for chunk in chunks:
        offs.append(total)
        total += len(chunk)
    return offs


def context_rows(tokens: Tokens) -> int:
    """Rows of the conditioning these tokens encode to (shortest encoder, as SDXL cuts)."""
    return min(sum(len(c) for c in chunks) for chunks in tokens.values())


def splice_vectors(tokens: Tokens, ids: Mapping[str, int], vectors: Mapping[str, torch.Tensor],
                   widths: Mapping[str, int]) -> tuple[Tokens, tuple[int, ...]]:
    """Replace the marker tokens by identifier vectors.

    ``ids``, ``vectors`` (``[n, width]``) and ``widths`` are keyed by tokenizer key ("l", "g",
    "h"). Every encoder must hold exactly ``n`` markers, at the same positions. Returns a new token
    structure (input untouched) and the sorted rows ``chunk_offset + position``.
    """
    keys = set(tokens)
    if set(vectors) != keys:
        raise ProductSceneError(
            f"vectors: the CLIP encodes with {sorted(keys)} but identifier vectors were given for {sorted(vectors)}")
    positions = find_positions(tokens, ids)
    ref_key = sorted(keys)[0]
    ref = positions[ref_key]
    prepared = {}
    for key in sorted(keys):
        v = vectors[key]
        if not isinstance(v, torch.Tensor):
            raise ProductSceneError(f"vectors: {key!r} must be a tensor, got {type(v).__name__}")
        if v.dim() == 1:
            v = v.unsqueeze(0)
        if v.dim() != 2:
            raise ProductSceneError(f"vectors: {key!r} must be [n, width], got shape {list(v.shape)}")
        width = widths.get(key)
        if width is None or v.shape[1] != int(width):
            raise ProductSceneError(
                f"vectors: identifier vectors for encoder {key!r} are {v.shape[1]} wide but that text "
                f"encoder is {width} wide (library made for another model family?)")
        if not torch.isfinite(v).all():
            raise ProductSceneError(f"vectors: identifier vectors for encoder {key!r} contain NaN/inf")
        n = v.shape[0]
        found = positions[key]
        if len(found) != n:
            raise ProductSceneError(
                f"template: expected the identifier's {n} marker token(s) in encoder {key!r}, found {len(found)}; "
                f"the template must not contain the marker word itself")
        if found != ref:
            raise ProductSceneError(
                f"tokens: identifier positions differ between encoders ({ref_key}: {ref}, {key}: {found})")
        prepared[key] = v.detach().to(torch.float32).cpu()

    out: Tokens = {}
    for key, chunks in tokens.items():
        new_chunks = [list(chunk) for chunk in chunks]
        for i, (c, p) in enumerate(positions[key]):
            old = new_chunks[c][p]
            new_chunks[c][p] = (prepared[key][i],) + tuple(old[1:])
        out[key] = new_chunks
    offs = _row_offsets(tokens[ref_key])
    rows = tuple(sorted(offs[c] + p for c, p in ref))
    return out, rows


def choose_marker(tokenize: Callable[[str], Tokens], template: str,
                  candidates=MARKERS) -> tuple[str, dict[str, int]]:
    """First candidate that is one token in every encoder and absent from the template."""
    check_template(template)
    rest = tokenize(template.replace(PLACEHOLDER, " "))
    for marker in candidates:
        try:
            ids = marker_token_ids(tokenize, marker)
        except ProductSceneError:
            continue
        if not any(ids[k] in set(_ids(rest, k)) for k in ids if k in rest):
            return marker, ids
    raise ProductSceneError(
        f"template: contains every marker word ProductScene can use ({', '.join(candidates)}); "
        f"remove one of them from the template")


def tokenize_with_identifier(tokenize: Callable[[str], Tokens], template: str,
                             vectors: Mapping[str, torch.Tensor], widths: Mapping[str, int],
                             marker: str | None = None) -> tuple[Tokens, tuple[int, ...], int]:
    """Tokenize ``template`` with the identifier vectors spliced in at ``{category}``.

    ``tokenize(text)`` is the host's tokenizer (ComfyUI: ``clip.tokenize``); ``vectors`` and
    ``widths`` are keyed by tokenizer key. With ``marker=None`` a marker absent from the template is
    chosen; with an explicit marker, a template already holding it raises. Returns
    ``(tokens, rows, context_rows)``.
    """
    check_template(template)
    ns = {k: (v.shape[0] if v.dim() == 2 else 1) for k, v in vectors.items()}
    if len(set(ns.values())) != 1:
        raise ProductSceneError(f"vectors: every encoder needs the same number of vectors, got {ns}")
    n = next(iter(ns.values()))
    if marker is None:
        marker, ids = choose_marker(tokenize, template)
    else:
        ids = marker_token_ids(tokenize, marker)
        rest = tokenize(template.replace(PLACEHOLDER, " "))
        for k in rest:
            if k in ids and ids[k] in set(_ids(rest, k)):
                raise ProductSceneError(
                    f"template: already contains the word {marker!r} that marks the identifier; "
                    f"remove it or choose another marker")
    tokens = tokenize(placeholder_text(template, n, marker))
    spliced, rows = splice_vectors(tokens, ids, vectors, widths)
    return spliced, rows, context_rows(tokens)


def library_vectors_by_key(vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Library encoder names (clip_l, clip_g, clip_h) -> tokenizer keys (l, g, h)."""
    from .library import TOKENIZER_KEYS
    out = {}
    for enc, v in vectors.items():
        if enc not in TOKENIZER_KEYS:
            raise ProductSceneError(f"vectors: unknown encoder {enc!r}")
        out[TOKENIZER_KEYS[enc]] = v
    return out
