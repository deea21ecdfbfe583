"""Category Tokens node: encode a prompt with a category identifier from a category library."""
from __future__ import annotations

import os

from comfy_api.v0_0_2 import io

from ..productscene.errors import ProductSceneError
from ..productscene.library import (ENCODER_OF_TOKENIZER_KEY, FAMILIES, CategoryLibrary,
                                    family_of_encoders)
from ..productscene.prompt import (CategoryTokens, check_template, library_vectors_by_key,
                                   tokenize_with_identifier)
from .paths import list_libraries, open_cached, resolve_library

CategoryTokensType = io.Custom("CATEGORY_TOKENS")

DEFAULT_TEMPLATE = "a product photo on a {category} background, professional studio lighting"


def clip_widths(clip) -> dict[str, int]:
    """``{tokenizer key: width}`` of a ComfyUI CLIP, e.g. ``{"l": 768, "g": 1280}`` for SDXL.

    The width is the text encoder's real input-embedding width (what a spliced vector must match);
    the tokenizer's declared ``embedding_size`` is the fallback."""
    if clip is None:
        raise ProductSceneError(
            "clip: no CLIP model given (the checkpoint may contain no text encoder)")
    try:
        keys = list(clip.tokenize("").keys())
    except Exception as e:  # a host object that is not a CLIP
        raise ProductSceneError(f"clip: expected a CLIP text encoder ({e})") from None
    widths = {}
    for key in keys:
        width = None
        enc = getattr(getattr(clip, "cond_stage_model", None), f"clip_{key}", None)
        try:
            width = int(enc.transformer.get_input_embeddings().weight.shape[1])
        except Exception:
            tok = getattr(getattr(clip, "tokenizer", None), f"clip_{key}", None)
            width = getattr(tok, "embedding_size", None)
        if width is None:
            raise ProductSceneError(f"clip: cannot tell the width of text encoder {key!r}; "
                                    f"ProductScene supports SD1.5, SD2.x and SDXL CLIPs")
        widths[key] = int(width)
    return widths


def token_embedding_fn(clip):
    """``word -> {library encoder: [n, width]}``: the CLIP's own input embeddings of the word's
    tokens (start/end/pad removed). Feed it to ``CategoryLibrary.from_words`` to initialise a
    library from init words."""
    widths = clip_widths(clip)
    empty = clip.tokenize("")

    def embed(word: str):
        tokens = clip.tokenize(word)
        out = {}
        for key in widths:
            special = {t[0] for c in empty[key] for t in c}
            ids = [t[0] for c in tokens[key] for t in c if isinstance(t[0], int) and t[0] not in special]
            if not ids:
                raise ProductSceneError(f"words: {word!r} gives no tokens")
            emb = getattr(clip.cond_stage_model, f"clip_{key}").transformer.get_input_embeddings()
            out[ENCODER_OF_TOKENIZER_KEY[key]] = emb.weight[ids].detach().float().cpu().clone()
        return out

    return embed


def _describe(encoders: dict) -> str:
    fam = family_of_encoders(encoders)
    spec = ", ".join(f"{k} {v}" for k, v in encoders.items())
    return f"{fam} ({spec})" if fam else f"an unsupported model ({spec})"


def all_categories() -> list[str]:
    """Union of the category names of every listed library (headers only, cached by mtime)."""
    names: set[str] = set()
    for name in list_libraries():
        try:
            lib = open_cached(resolve_library(name))
        except ProductSceneError:
            lib = None
        if lib is not None:
            names.update(lib.names)
    return sorted(names)


class ProductSceneCategoryTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductSceneCategoryTokens",
            display_name="Category Tokens (ProductScene)",
            category="ProductScene",
            description=(
                "Encodes a prompt with a category's learned identifier spliced in at {category}, and "
                "outputs where the identifier sits so Masked Category Attention can keep it off the product."),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP text encoder of the checkpoint (SD1.5, SD2.x or SDXL). "
                              "It must match the library's base model family."),
                io.Combo.Input("library", options=list_libraries(),
                               tooltip="Category library file from models/category_libraries (or a category "
                                       "library placed in models/embeddings)."),
                io.Combo.Input("category", options=all_categories(),
                               tooltip="The product category whose background style to use; it must be in the "
                                       "chosen library."),
                io.String.Input("template", multiline=True, default=DEFAULT_TEMPLATE,
                                tooltip="The prompt. {category} (exactly once) marks where the category identifier "
                                        "goes. Weights like (word:1.2) and embedding:name work as usual."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="CONDITIONING",
                                       tooltip="The encoded prompt, with the identifier spliced in."),
                CategoryTokensType.Output(display_name="CATEGORY_TOKENS",
                                          tooltip="Where the identifier sits in the conditioning and its "
                                                  "vectors; connect to Masked Category Attention."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, clip, library, category, template):
        # a library replaced under the same name must re-run the node
        try:
            st = os.stat(resolve_library(library))
            return (library, st.st_mtime_ns, st.st_size, category, template)
        except (ProductSceneError, OSError):
            return (library, None, category, template)

    @classmethod
    def execute(cls, clip, library, category, template) -> io.NodeOutput:
        tokens, ct = encode_category_prompt(clip, library, category, template)
        cond = clip.encode_from_tokens_scheduled(tokens)
        rows = cond[0][0].shape[1]
        if rows != ct.context_rows or (ct.rows and max(ct.rows) >= rows):
            raise ProductSceneError(
                f"clip: the encoded prompt has {rows} rows but the identifier was placed for {ct.context_rows}")
        return io.NodeOutput(cond, ct)


def encode_category_prompt(clip, library: str, category: str, template: str):
    """Validate everything, then tokenize with the identifier spliced in.
    Returns ``(tokens, CategoryTokens)``; the caller encodes the tokens."""
    check_template(template)
    path = resolve_library(library, what="library")
    lib = CategoryLibrary.open(path)
    widths = clip_widths(clip)
    clip_encoders = {}
    for key, width in widths.items():
        if key not in ENCODER_OF_TOKENIZER_KEY:
            raise ProductSceneError(f"clip: text encoder {key!r} is not supported "
                                    f"(ProductScene supports {', '.join(FAMILIES)})")
        clip_encoders[ENCODER_OF_TOKENIZER_KEY[key]] = width
    if clip_encoders != lib.encoders:
        raise ProductSceneError(
            f"library: {library!r} was made for {_describe(lib.encoders)}, but the CLIP is "
            f"{_describe(clip_encoders)}; choose a library trained for this checkpoint's family")
    vectors = lib.vectors(category)  # unknown category -> error naming 'category' with suggestions
    tokens, rows, context_rows = tokenize_with_identifier(
        clip.tokenize, template, library_vectors_by_key(vectors), widths)
    ct = CategoryTokens(library_path=path, category=category, family=lib.family, rows=tuple(rows),
                        context_rows=int(context_rows), vectors=vectors)
    return tokens, ct


NODES = [ProductSceneCategoryTokens]
