"""Token library: one safetensors file of learned tokens for one base model: the identifier vectors
of many categories (a category library) or Break-A-Scene's concept tokens (a concept-token file),
and their shared LoRA.

Format (``productscene.format = category_library``, version 1), see docs/design.md:
tensors ``vectors.<encoder>`` ``[C, n, width]`` for every encoder of the family and optional LoRA
tensors ``lora.<comfy lora key>``; metadata (JSON strings) ``categories``, ``init_words``,
``base_family``, ``vectors_per_token``, ``encoders``, ``training``, ``license``, ``created_by``.

Host-free. ``TokenLibrary.open`` reads the header only; a category's vectors are read row by row
(``safe_open`` + ``get_slice``) and the LoRA only when ``lora_state_dict()`` is called.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from safetensors import safe_open

from . import __version__
from .errors import ProductSceneError
from .files import check_format, load_tensors, read_header, save_safetensors_atomic
from .prompt import init_vectors

FORMAT = "category_library"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

FAMILIES: dict[str, dict[str, int]] = {
    "sd15": {"clip_l": 768},
    "sd2": {"clip_h": 1024},
    "sdxl": {"clip_l": 768, "clip_g": 1280},
    # DiT bases: the identifier lives in the input embedding space of the encoder that carries the
    # prompt (its rows are the joint attention's text tokens)
    "flux": {"t5xxl": 4096},       # Flux.1: T5-XXL
    "z_image": {"qwen3_4b": 2560},  # Z-Image: Qwen3-4B (its chat template around the prompt)
}
# Encoders of a family's text encoder that give only a global vector (Flux.1's CLIP-L: its pooled
# output joins the time embedding). A library holds no vectors for them, the identifier is never
# spliced there, and Category Tokens takes their output from the category-free prompt.
GLOBAL_ENCODERS: dict[str, dict[str, int]] = {
    "flux": {"clip_l": 768},
}

VECTOR_PREFIX = "vectors."
LORA_PREFIX = "lora."
_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
_HEADER_FLOAT_DTYPES = {"F32", "F16", "BF16"}


def check_family(family: str, what: str = "family") -> dict[str, int]:
    """Return ``{encoder: width}`` of a family or raise naming ``what``."""
    if family not in FAMILIES:
        raise ProductSceneError(
            f"{what}: unknown base model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return dict(FAMILIES[family])


def clip_encoders(family: str) -> dict[str, int]:
    """Every encoder of the family's text encoder (a ComfyUI CLIP): the library's plus the global-only ones."""
    return {**check_family(family), **GLOBAL_ENCODERS.get(family, {})}


def family_of_encoders(encoders: Mapping[str, int]) -> str | None:
    """The family whose encoders/widths are exactly ``encoders`` (a library's, or a CLIP's with its
    global-only encoders), else None."""
    enc = {str(k): int(v) for k, v in encoders.items()}
    for fam, spec in FAMILIES.items():
        if enc in (spec, clip_encoders(fam)):
            return fam
    return None


def suggest(name: str, names, limit: int = 3) -> str:
    """' Did you mean: a, b?' (or '') for an unknown name."""
    names = list(names)
    close = difflib.get_close_matches(name, names, n=limit, cutoff=0.6)
    lower = {n.lower(): n for n in names}
    if name.lower() in lower and lower[name.lower()] not in close:
        close.insert(0, lower[name.lower()])
    return f" Did you mean: {', '.join(repr(c) for c in close[:limit])}?" if close else ""


def _check_names(names) -> list[str]:
    names = list(names)
    if not names:
        raise ProductSceneError("names: a category library needs at least one category")
    seen = set()
    dups = []
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise ProductSceneError(f"names: category names must be non-empty strings, got {n!r}")
        if n in seen and n not in dups:
            dups.append(n)
        seen.add(n)
    if dups:
        raise ProductSceneError(f"names: duplicate category names {dups[:10]}; every category must be unique")
    return names


def _as_2d(t: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
        raise ProductSceneError(f"{what}: expected a float tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ProductSceneError(f"{what}: expected [n, width] vectors, got shape {list(t.shape)}")
    return t


# ----------------------------------------------------------------------------------------------
@dataclass
class LibraryData:
    """An in-memory library (what the builders return); ``write`` saves it."""
    names: list[str]
    family: str
    vectors: dict[str, torch.Tensor]          # {encoder: [C, n, width]}
    init_words: dict[str, str] = field(default_factory=dict)

    def write(self, path, lora=None, training=None, license=None, created_by=None) -> str:
        return TokenLibrary.write(path, self.names, self.vectors, self.family, self.init_words,
                                     lora=lora, training=training, license=license,
                                     created_by=created_by)


class TokenLibrary:
    """A token library file (category identifiers or concept tokens) opened from its header. Vectors
    and LoRA are read lazily. The file format keeps its name, ``category_library``."""

    def __init__(self, path: str, metadata: dict, index: dict):
        self.path = path
        self.metadata = metadata
        self._index = index
        base = os.path.basename(path)
        check_format(metadata, FORMAT, SUPPORTED_VERSIONS, path=path)
        self.format_version = int(metadata["productscene.format_version"])

        def field_json(key, default=None, required=True, expect=None):
            if key not in metadata:
                if required:
                    raise ProductSceneError(f"{base}: category library metadata lacks {key!r}")
                return default
            try:
                value = json.loads(metadata[key])
            except (json.JSONDecodeError, TypeError):
                raise ProductSceneError(f"{base}: metadata {key!r} is not valid JSON") from None
            if expect is not None and (not isinstance(value, expect) or isinstance(value, bool)):
                kinds = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
                raise ProductSceneError(
                    f"library {base}: metadata {key!r} should be a JSON {kinds}, got {type(value).__name__}")
            return value

        self.family = field_json("base_family", expect=str)
        check_family(self.family, what=f"library {base}")
        encoders = field_json("encoders", expect=dict)
        try:
            self.encoders = {str(k): int(v) for k, v in encoders.items()}
        except (TypeError, ValueError):
            raise ProductSceneError(f"library {base}: metadata 'encoders' should map encoder names to widths") from None
        if self.encoders != FAMILIES[self.family]:
            raise ProductSceneError(
                f"library {base}: encoders {self.encoders} do not match family {self.family!r} "
                f"(expected {FAMILIES[self.family]})")
        self.names = list(field_json("categories", expect=list))
        _check_names(self.names)
        self._row = {n: i for i, n in enumerate(self.names)}
        self.vectors_per_token = field_json("vectors_per_token", expect=int)
        if self.vectors_per_token < 1:
            raise ProductSceneError(f"library {base}: metadata 'vectors_per_token' should be >= 1")
        words = field_json("init_words", default=None, required=False)
        if isinstance(words, dict):
            self.init_words = {str(k): str(v) for k, v in words.items()}
        elif isinstance(words, list):
            self.init_words = {n: str(w) for n, w in zip(self.names, words) if w is not None}
        else:
            self.init_words = {}
        self.training = field_json("training", default=None, required=False)
        if not isinstance(self.training, (dict, type(None))):
            self.training = None
        lic = metadata.get("license")
        self.license = field_json("license", required=False) if lic is not None else None
        cb = metadata.get("created_by")
        self.created_by = field_json("created_by", required=False) if cb is not None else None

        C, n = len(self.names), self.vectors_per_token
        for enc, width in self.encoders.items():
            key = VECTOR_PREFIX + enc
            if key not in index:
                raise ProductSceneError(f"library {base}: tensor {key!r} is missing")
            dtype, shape = index[key]
            if dtype not in _HEADER_FLOAT_DTYPES or shape != (C, n, width):
                raise ProductSceneError(
                    f"library {base}: tensor {key!r} should be float [{C}, {n}, {width}], "
                    f"got {dtype} {list(shape)}")
        self.lora_keys = sorted(k[len(LORA_PREFIX):] for k in index if k.startswith(LORA_PREFIX))

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path) -> "TokenLibrary":
        """Read the header only (names, family, encoders, vectors_per_token, init words)."""
        path = os.fspath(path)
        metadata, index = read_header(path)
        return cls(path, metadata, index)

    @staticmethod
    def is_library(path) -> bool:
        """True if ``path`` is a safetensors file whose header says category library."""
        try:
            meta, _ = read_header(path)
        except (ProductSceneError, OSError):
            return False
        return meta.get("productscene.format") == FORMAT

    def __len__(self):
        return len(self.names)

    def __contains__(self, category):
        return category in self._row

    def __repr__(self):
        return (f"TokenLibrary({os.path.basename(self.path)!r}, family={self.family!r}, "
                f"categories={len(self.names)}, n={self.vectors_per_token}, lora={self.has_lora})")

    def index(self, category: str) -> int:
        """Row of ``category``; unknown names raise with close suggestions."""
        try:
            return self._row[category]
        except (KeyError, TypeError):
            raise ProductSceneError(
                f"category: {category!r} is not in library {os.path.basename(self.path)} "
                f"({len(self.names)} categories).{suggest(str(category), self.names)}") from None

    def vectors(self, category: str) -> dict[str, torch.Tensor]:
        """``{encoder: [n, width]}`` float32 for one category, reading only that row."""
        i = self.index(category)
        out = {}
        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                for enc in self.encoders:
                    out[enc] = f.get_slice(VECTOR_PREFIX + enc)[i:i + 1][0].to(torch.float32)
        except Exception as e:
            raise ProductSceneError(
                f"library {os.path.basename(self.path)}: could not read vectors of {category!r} ({e})") from None
        return out

    def all_vectors(self) -> dict[str, torch.Tensor]:
        """``{encoder: [C, n, width]}`` float32 for every category (trainers, CLI)."""
        t = load_tensors(self.path, [VECTOR_PREFIX + e for e in self.encoders])
        return {e: t[VECTOR_PREFIX + e].to(torch.float32) for e in self.encoders}

    @property
    def has_lora(self) -> bool:
        return bool(self.lora_keys)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The shared LoRA in ComfyUI LoRA key format (``lora.`` prefix removed); {} if none."""
        if not self.lora_keys:
            return {}
        t = load_tensors(self.path, [LORA_PREFIX + k for k in self.lora_keys])
        return {k: t[LORA_PREFIX + k] for k in self.lora_keys}

    # -- writing ---------------------------------------------------------------------------
    @staticmethod
    def write(path, names, vectors: Mapping[str, torch.Tensor], family: str, init_words=None,
              lora: Mapping[str, torch.Tensor] | None = None, training=None, license=None,
              created_by=None) -> str:
        """Validate and write a library atomically. ``vectors = {encoder: [C, n, width]}``;
        ``init_words`` a {name: word} dict or a list aligned with ``names``; ``lora`` a ComfyUI
        LoRA state dict (keys without the ``lora.`` prefix). Returns the path."""
        spec = check_family(family)
        names = _check_names(names)
        C = len(names)
        vectors = dict(vectors)
        if set(vectors) != set(spec):
            raise ProductSceneError(
                f"vectors: family {family!r} needs encoders {sorted(spec)}, got {sorted(vectors)}")
        n = None
        tensors = {}
        for enc, width in spec.items():
            t = vectors[enc]
            if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES or t.dim() != 3:
                raise ProductSceneError(
                    f"vectors: {enc} must be a float tensor [C, n, width], got "
                    f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.shape[0] != C:
                raise ProductSceneError(f"vectors: {enc} has {t.shape[0]} rows but there are {C} names")
            if t.shape[2] != width:
                raise ProductSceneError(
                    f"vectors: {enc} vectors are {t.shape[2]} wide, family {family!r} needs {width}")
            if n is None:
                n = int(t.shape[1])
            elif t.shape[1] != n:
                raise ProductSceneError(f"vectors: all encoders need the same vectors per token, got {n} and {t.shape[1]}")
            if n < 1:
                raise ProductSceneError("vectors: at least one vector per token is needed")
            if not torch.isfinite(t).all():
                raise ProductSceneError(f"vectors: {enc} contains NaN or infinite values")
            tensors[VECTOR_PREFIX + enc] = t.detach().cpu().contiguous()
        if init_words is None:
            words = [None] * C
        elif isinstance(init_words, Mapping):
            unknown = [k for k in init_words if k not in set(names)]
            if unknown:
                raise ProductSceneError(f"init_words: names not in the library: {unknown[:5]}")
            words = [init_words.get(nm) for nm in names]
        else:
            words = list(init_words)
            if len(words) != C:
                raise ProductSceneError(f"init_words: {len(words)} words for {C} categories")
        for k, v in (lora or {}).items():
            if not isinstance(v, torch.Tensor):
                raise ProductSceneError(f"lora: {k!r} must be a tensor")
            tensors[LORA_PREFIX + k] = v.detach().cpu().contiguous()
        metadata = {
            "categories": json.dumps(names, ensure_ascii=False),
            "init_words": json.dumps(words, ensure_ascii=False),
            "base_family": json.dumps(family),
            "vectors_per_token": json.dumps(n),
            "encoders": json.dumps(spec),
            "training": json.dumps(training, ensure_ascii=False, default=str),
            "license": json.dumps(license, ensure_ascii=False),
            "created_by": json.dumps(created_by or f"ProductScene {__version__}"),
        }
        save_safetensors_atomic(tensors, path, metadata, kind=FORMAT, version=FORMAT_VERSION)
        return os.fspath(path)

    # -- builders --------------------------------------------------------------------------
    @staticmethod
    def from_embedding_files(files: Mapping[str, str], family: str) -> LibraryData:
        """Build from standard textual-inversion safetensors files ``{category: path}``.

        SD1.5/SD2: ``emb_params`` ``[n, width]`` (or ``string_to_param.*``, or ``clip_l``/``clip_h``);
        SDXL: ``clip_l`` ``[n, 768]`` and ``clip_g`` ``[n, 1280]``. Every file must give the same n.
        """
        spec = check_family(family)
        names = _check_names(files.keys())
        per_enc: dict[str, list[torch.Tensor]] = {e: [] for e in spec}
        n = None
        first = None
        for name in names:
            path = os.fspath(files[name])
            base = os.path.basename(path)
            tensors = load_tensors(path)
            for enc, width in spec.items():
                t = _pick_embedding(tensors, enc, width, len(spec) == 1, f"embedding file {base}")
                t = _as_2d(t, f"embedding file {base} ({enc})")
                if t.shape[1] != width:
                    raise ProductSceneError(
                        f"embedding file {base}: {enc} vectors are {t.shape[1]} wide, "
                        f"family {family!r} needs {width}")
                if n is None:
                    n, first = t.shape[0], base
                elif t.shape[0] != n:
                    raise ProductSceneError(
                        f"embedding file {base}: has {t.shape[0]} vectors per token but {first} has {n}; "
                        f"all categories of a library need the same count")
                per_enc[enc].append(t.to(torch.float32))
        return LibraryData(names, family, {e: torch.stack(v) for e, v in per_enc.items()}, {})

    @staticmethod
    def from_words(words: Mapping[str, str], family: str,
                   token_embeddings: Callable[[str], Mapping[str, torch.Tensor]], n: int = 1) -> LibraryData:
        """Build by initialising each category from its init word: ``token_embeddings(word)``
        returns ``{encoder: [t, width]}`` (the text encoder's input embeddings of the word's
        tokens); each identifier is :func:`productscene.prompt.init_vectors` of them (``n`` vectors)."""
        spec = check_family(family)
        names = _check_names(words.keys())
        per_enc: dict[str, list[torch.Tensor]] = {e: [] for e in spec}
        for name in names:
            word = words[name]
            if not isinstance(word, str) or not word.strip():
                raise ProductSceneError(f"words: init word of {name!r} must be a non-empty string")
            emb = token_embeddings(word)
            if set(emb) != set(spec):
                raise ProductSceneError(
                    f"token_embeddings: returned encoders {sorted(emb)} for {word!r}, family {family!r} needs {sorted(spec)}")
            for enc, width in spec.items():
                t = _as_2d(emb[enc], f"token_embeddings({word!r})[{enc}]")
                if t.shape[1] != width:
                    raise ProductSceneError(
                        f"token_embeddings: {enc} vectors of {word!r} are {t.shape[1]} wide, family {family!r} needs {width}")
                per_enc[enc].append(init_vectors(t.detach().cpu(), n))
        return LibraryData(names, family, {e: torch.stack(v) for e, v in per_enc.items()},
                           {k: words[k] for k in names})


def _pick_embedding(tensors: dict, enc: str, width: int, single: bool, what: str) -> torch.Tensor:
    if enc in tensors:
        return tensors[enc]
    if single:
        if "emb_params" in tensors:
            return tensors["emb_params"]
        stp = [k for k in tensors if k.startswith("string_to_param.")]
        if len(stp) == 1:
            return tensors[stp[0]]
        if len(tensors) == 1:
            return next(iter(tensors.values()))
    raise ProductSceneError(
        f"{what}: no {enc} vectors found (keys: {sorted(tensors)[:8]}); expected "
        + ("'emb_params' or 'string_to_param.*'" if single else f"'{enc}'"))
