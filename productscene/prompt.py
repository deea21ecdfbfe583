"""Placeholder splicing in tokenized prompts (host-agnostic): THE one path by which learned vectors
enter a prompt, for Category Tokens, the category trainer and Break-A-Scene alike.

Works on the structure ComfyUI's tokenizers return::

    {"l": [[(id, weight), ... 77], ...chunks], "g": ...}      # tuples may carry a 3rd word id

A template holds one or more named placeholders (``{category}``, ``<a>``, ``<b>`` ...; any literal
text). :class:`PromptTemplate` replaces each occurrence of a placeholder by ``n`` copies of one
rare single-token *marker* word, tokenizes once, and records which token slots belong to which
placeholder. :meth:`PromptTemplate.splice` then puts vectors into those slots (a 1-D tensor of the
encoder's width, which ComfyUI's text encoders use in place of a token embedding), as often as
needed with different vectors, keeping their autograd graph. Position ``p`` of chunk ``c`` is row
``c * 77 + p`` of the conditioning. A batch of prompts with different templates gets one
``PromptTemplate`` per template, hence its own rows per item.

The *init word* of a learned token has one meaning everywhere (:func:`init_vectors`).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .errors import ProductSceneError

PLACEHOLDER = "{category}"
# The one default prompt of the category nodes, trainer and command line (use the same wording for
# training and generation).
DEFAULT_TEMPLATE = "a product photo on a {category} background"
# Marker words: the first one that is a single token in every encoder the identifier goes into and
# absent from the template is used. Rare single-token words of the CLIP BPE vocabulary, then words
# that are one token (with their leading space) in T5's SentencePiece and Qwen's byte-level BPE
# vocabularies as well (Flux.1, Z-Image). A marker's own embedding is replaced, its meaning never used.
MARKERS = ("olis", "phol", "sks", "ohwx", "renal", "genome", "oxide", "stalk")
# library encoder name -> key of ComfyUI's tokenizer output
TOKENIZER_KEYS = {"clip_l": "l", "clip_h": "h", "clip_g": "g", "t5xxl": "t5xxl", "qwen3_4b": "qwen3_4b"}
ENCODER_OF_TOKENIZER_KEY = {v: k for k, v in TOKENIZER_KEYS.items()}

Tokens = dict  # {key: [[(id|tensor, weight[, word_id]), ...], ...]}
Vectors = Mapping[str, torch.Tensor]  # {tokenizer key: [n, width]}


@dataclass(frozen=True, eq=False)
class CategoryTokens:
    """The CATEGORY_TOKENS value passed between nodes."""
    library_path: str
    category: str
    family: str
    rows: tuple          # row indices of the identifier in the cond context (same for every encoder)
    context_rows: int    # rows of the encoded cond
    vectors: dict        # {encoder: [n, width]} (encoder names as in the library: clip_l, clip_g, clip_h)
    free_context: torch.Tensor | None = None  # [1, R, C]: the prompt encoded without the identifier
    contexts: tuple = ()  # the encoded conditioning(s) [1, N, C] the identifier is in


def category_free_template(template: str, placeholder: str = PLACEHOLDER) -> str:
    """THE category-free prompt: the template with the identifier left out (not replaced by its
    init word, which is itself category information; measured in BENCHMARKS.md). Product queries
    attend this prompt's encoding, so their output cannot depend on the category."""
    return template.replace(placeholder, " ")


@dataclass(frozen=True)
class Prompt:
    """One prompt of a batch: a template and, per placeholder, its vectors ``{encoder: [n, width]}``."""
    template: str
    vectors: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)


def init_vectors(token_embeddings: torch.Tensor, n: int) -> torch.Tensor:
    """THE meaning of an init word: its ``t`` token embeddings (the text encoder's input embeddings,
    start/end/padding removed) resampled to ``n`` vectors. Vector ``i`` is the mean of the word's
    tokens ``i*t/n`` up to ``(i+1)*t/n`` (at least one token): one vector is the mean of all
    tokens, ``n == t`` gives the tokens themselves, ``n > t`` repeats them."""
    if not isinstance(token_embeddings, torch.Tensor) or token_embeddings.dim() != 2 or not len(token_embeddings):
        raise ProductSceneError("init word: expected its token embeddings as a non-empty [tokens, width] tensor")
    if int(n) < 1:
        raise ProductSceneError(f"vectors: need at least one vector per token, got {n}")
    t, n = token_embeddings.shape[0], int(n)
    rows = []
    for i in range(n):
        lo = i * t // n
        hi = max((i + 1) * t // n, lo + 1)
        rows.append(token_embeddings[lo:hi].float().mean(0))
    return torch.stack(rows)


def check_template(template, placeholder: str = PLACEHOLDER) -> None:
    """A category template: text holding ``placeholder`` exactly once."""
    if not isinstance(template, str):
        raise ProductSceneError(f"template: expected text, got {type(template).__name__}")
    count = template.count(placeholder)
    if count != 1:
        raise ProductSceneError(
            f"template: must contain {placeholder} exactly once to mark where the category identifier "
            f"goes, found it {count} times in {template!r}")


def _is_id(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def _ids(tokens: Tokens, key: str) -> list[int]:
    return [t[0] for chunk in tokens[key] for t in chunk if _is_id(t[0])]


def marker_token_ids(tokenize: Callable[[str], Tokens], marker: str) -> dict[str, int]:
    """Token id of ``marker`` in every encoder, found by tokenizing it alone (compared with the
    empty prompt, whose start/end/pad and chat-template tokens are removed). The form after a
    space, as the marker stands in a prompt, is preferred where it is one token (byte-level BPE
    such as Qwen's gives a word after a space a token of its own). The marker must be one token."""
    forms = (tokenize(" " + marker), tokenize(marker))
    empty = tokenize("")
    out = {}
    for key in forms[1]:
        special = set(_ids(empty, key)) if key in empty else set()
        extra = []
        for form in forms:
            extra = [t for t in _ids(form, key) if t not in special] if key in form else []
            if len(extra) == 1:
                break
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


def context_rows(tokens: Tokens) -> int:
    """Rows of the conditioning these tokens encode to (shortest encoder, as SDXL cuts)."""
    return min(sum(len(c) for c in chunks) for chunks in tokens.values())


def _without(template: str, placeholders) -> str:
    for name in placeholders:
        template = template.replace(name, " ")
    return template


def choose_marker(tokenize: Callable[[str], Tokens], template: str, placeholders=(PLACEHOLDER,),
                  candidates=MARKERS) -> tuple[str, dict[str, int]]:
    """First candidate that is one token in every encoder, that token also where the word follows
    a space (as in a prompt), and absent from the template."""
    rest = tokenize(_without(template, placeholders))
    for marker in candidates:
        try:
            ids = marker_token_ids(tokenize, marker)
        except ProductSceneError:
            continue
        spaced = tokenize(" " + marker)
        if not all(ids[k] in set(_ids(spaced, k)) for k in ids if k in spaced):
            continue
        if not any(ids[k] in set(_ids(rest, k)) for k in ids if k in rest):
            return marker, ids
    raise ProductSceneError(
        f"template: contains every marker word ProductScene can use ({', '.join(candidates)}); "
        f"remove one of them from the template")


def _occurrences(template: str, counts: Mapping[str, int]) -> list[tuple[int, str]]:
    """(text index, placeholder) of every occurrence, in text order; placeholders must not overlap."""
    found = []
    for name in counts:
        start = template.find(name)
        if start < 0:
            raise ProductSceneError(f"template: {template!r} does not contain the placeholder {name!r}")
        while start >= 0:
            found.append((start, name))
            start = template.find(name, start + len(name))
    found.sort()
    for (a, na), (b, _) in zip(found, found[1:]):
        if b < a + len(na):
            raise ProductSceneError(f"template: placeholders overlap in {template!r}")
    return found


def _marker_text(template: str, start: int, end: int, marker: str, n: int) -> str:
    """The ``n`` markers that stand for the placeholder at ``template[start:end]``: each after one
    space (the form :func:`marker_token_ids` finds) and no whitespace added beside the template's
    own, so the tokens before the identifier are those of the category-free prompt also for
    tokenizers that keep whitespace (Qwen's byte-level BPE); whitespace-blind tokenizers (CLIP,
    T5) see the same words either way."""
    lead = "" if start > 0 and template[start - 1] == " " else " "
    tail = " " if end < len(template) and not template[end].isspace() else ""
    return lead + " ".join([marker] * n) + tail


def only_keys(tokenize: Callable[[str], Tokens], keys) -> Callable[[str], Tokens]:
    """``tokenize`` restricted to the tokenizer ``keys`` the identifier goes into (Flux.1: T5-XXL,
    not the CLIP-L whose pooled output is taken from the category-free prompt)."""
    keys = set(keys)

    def restricted(text: str) -> Tokens:
        return {k: v for k, v in tokenize(text).items() if k in keys}

    return restricted


class PromptTemplate:
    """A template tokenized once with its placeholders marked; :meth:`splice` fills them.

    ``counts``: ``{placeholder: n}`` vectors per occurrence. ``rows``: ``{placeholder: rows}`` of
    the conditioning (every occurrence, sorted); ``context_rows``: rows the prompt encodes to.
    """

    def __init__(self, tokenize: Callable[[str], Tokens], template: str, counts: Mapping[str, int],
                 widths: Mapping[str, int], marker: str | None = None):
        if not isinstance(template, str):
            raise ProductSceneError(f"template: expected text, got {type(template).__name__}")
        if not counts:
            raise ProductSceneError("template: name at least one placeholder to splice")
        self.counts = {str(k): int(v) for k, v in counts.items()}
        for name, n in self.counts.items():
            if not name or n < 1:
                raise ProductSceneError(f"vectors: placeholder {name!r} needs at least one vector, got {n}")
        self.template = template
        self.widths = {k: int(w) for k, w in widths.items()}
        occurrences = _occurrences(template, self.counts)
        if marker is None:
            marker, ids = choose_marker(tokenize, template, self.counts)
        else:
            ids = marker_token_ids(tokenize, marker)
            rest = tokenize(_without(template, self.counts))
            if any(ids[k] in set(_ids(rest, k)) for k in ids if k in rest):
                raise ProductSceneError(
                    f"template: already contains the word {marker!r} that marks the identifier; "
                    f"remove it or choose another marker")
        text, end = [], 0
        for start, name in occurrences:
            text += [template[end:start], _marker_text(template, start, start + len(name), marker, self.counts[name])]
            end = start + len(name)
        self.tokens = tokenize("".join(text + [template[end:]]))
        if set(self.tokens) - set(self.widths):
            raise ProductSceneError(
                f"clip: no width known for text encoder(s) {sorted(set(self.tokens) - set(self.widths))}")
        # owner of every marker slot, in order: (placeholder, index within its n vectors)
        owners = [(name, i) for _, name in occurrences for i in range(self.counts[name])]
        positions = find_positions(self.tokens, ids)
        ref_key = sorted(self.tokens)[0]
        for key, found in positions.items():
            if len(found) != len(owners):
                raise ProductSceneError(
                    f"template: expected {len(owners)} marker token(s) in encoder {key!r}, found {len(found)}; "
                    f"the template must not contain the marker word {marker!r} itself")
        for key, found in positions.items():
            if found != positions[ref_key]:
                raise ProductSceneError(
                    f"tokens: placeholder positions differ between encoders ({ref_key}: {positions[ref_key]}, {key}: {found})")
        self.slots = [(c, p, name, i) for (c, p), (name, i) in zip(positions[ref_key], owners)]
        offsets, total = [], 0
        for chunk in self.tokens[ref_key]:
            offsets.append(total)
            total += len(chunk)
        self.rows = {name: tuple(sorted(offsets[c] + p for c, p, owner, _ in self.slots if owner == name))
                     for name in self.counts}
        self.context_rows = context_rows(self.tokens)

    def _check(self, name: str, key: str, v) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            raise ProductSceneError(f"vectors: {name} {key!r} must be a tensor, got {type(v).__name__}")
        if v.dim() == 1:
            v = v.unsqueeze(0)
        if v.dim() != 2:
            raise ProductSceneError(f"vectors: {name} {key!r} must be [n, width], got shape {list(v.shape)}")
        width = self.widths[key]
        if v.shape[1] != width:
            raise ProductSceneError(
                f"vectors: {name} vectors for encoder {key!r} are {v.shape[1]} wide but that text "
                f"encoder is {width} wide (library made for another model family?)")
        if v.shape[0] != self.counts[name]:
            raise ProductSceneError(
                f"vectors: {name} has {v.shape[0]} vectors for encoder {key!r}, the template was made for "
                f"{self.counts[name]}")
        if not torch.isfinite(v.detach()).all():
            raise ProductSceneError(f"vectors: {name} vectors for encoder {key!r} contain NaN/inf")
        return v.to(torch.float32)

    def splice(self, vectors: Mapping[str, Vectors]) -> Tokens:
        """A new token structure with ``vectors[placeholder][tokenizer key]`` (``[n, width]``) in
        the placeholder's slots (every occurrence). The vectors keep their autograd graph."""
        missing = set(self.counts) - set(vectors)
        if missing:
            raise ProductSceneError(f"vectors: no vectors given for placeholder(s) {sorted(missing)}")
        prepared = {}
        for name in self.counts:
            given = vectors[name]
            if set(given) != set(self.tokens):
                raise ProductSceneError(
                    f"vectors: the CLIP encodes with {sorted(self.tokens)} but {name} has vectors for {sorted(given)}")
            prepared[name] = {key: self._check(name, key, given[key]) for key in self.tokens}
        out: Tokens = {}
        for key, chunks in self.tokens.items():
            new = [list(chunk) for chunk in chunks]
            for c, p, name, i in self.slots:
                new[c][p] = (prepared[name][key][i],) + tuple(new[c][p][1:])
            out[key] = new
        return out


def tokenize_with_identifier(tokenize: Callable[[str], Tokens], template: str, vectors: Vectors,
                             widths: Mapping[str, int], marker: str | None = None) -> tuple[Tokens, tuple[int, ...], int]:
    """A category template (``{category}`` once) tokenized with the identifier ``vectors``
    (``{tokenizer key: [n, width]}``) spliced in. Returns ``(tokens, rows, context_rows)``."""
    check_template(template)
    ns = {k: (v.shape[0] if v.dim() == 2 else 1) for k, v in vectors.items()}
    if len(set(ns.values())) != 1:
        raise ProductSceneError(f"vectors: every encoder needs the same number of vectors, got {ns}")
    prompt = PromptTemplate(tokenize, template, {PLACEHOLDER: next(iter(ns.values()))}, widths, marker)
    return prompt.splice({PLACEHOLDER: vectors}), prompt.rows[PLACEHOLDER], prompt.context_rows


def library_vectors_by_key(vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Library encoder names (clip_l, clip_g, clip_h, t5xxl, qwen3_4b) -> tokenizer keys (l, g, h, t5xxl, qwen3_4b)."""
    out = {}
    for enc, v in vectors.items():
        if enc not in TOKENIZER_KEYS:
            raise ProductSceneError(f"vectors: unknown encoder {enc!r}")
        out[TOKENIZER_KEYS[enc]] = v
    return out
