"""Category Tokens node: encode a prompt with a category identifier from a category library."""
from __future__ import annotations

import dataclasses
import os

from comfy_api.v0_0_2 import io

from productscene.errors import ProductSceneError
from productscene.library import FAMILIES, TokenLibrary, family_of_encoders
from productscene.prompt import (DEFAULT_TEMPLATE, ENCODER_OF_TOKENIZER_KEY, CategoryTokens,
                                 category_free_template, check_template, library_vectors_by_key, only_keys,
                                 tokenize_with_identifier)
from .clip_text import clip_widths
from .paths import list_libraries, open_cached, resolve_library

CategoryTokensType = io.Custom("CATEGORY_TOKENS")
# conditioning entries that describe the context row by row: kept from the prompt with the identifier
ROW_KEYS = ("attention_mask",)


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
                "Encodes a prompt with a category's learned identifier spliced in at {category}, and the same "
                "prompt without it, so Masked Category Attention can keep the category off the product."),
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder: the checkpoint's CLIP (SD1.5, SD2.x or SDXL), Flux.1's "
                              "(DualCLIPLoader, type flux) or Z-Image's (CLIPLoader, type lumina2). It must match "
                              "the library's base model family."),
                io.Combo.Input("library", options=list_libraries(),
                               tooltip="Category library file from models/category_libraries (or a category "
                                       "library placed in models/embeddings)."),
                io.Combo.Input("category", options=all_categories(),
                               tooltip="The product category whose background style to use; it must be in the "
                                       "chosen library."),
                io.String.Input("template", multiline=True, default=DEFAULT_TEMPLATE,
                                tooltip="The prompt. {category} (exactly once) marks where the category identifier "
                                        "goes. Weights like (word:1.2) and embedding:name work as in CLIPTextEncode."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="CONDITIONING",
                                       tooltip="The encoded prompt, with the identifier spliced in. Its global "
                                               "vector (SDXL's pooled text, Flux.1's CLIP-L vector: they reach "
                                               "every pixel through the time embedding) is the prompt's without "
                                               "the identifier, so only the gated attention carries the category."),
                CategoryTokensType.Output(display_name="CATEGORY_TOKENS",
                                          tooltip="What Masked Category Attention needs: the same prompt encoded "
                                                  "without the identifier (the category-free context product "
                                                  "pixels attend), and where the identifier sits."),
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
        cond, ct = category_conditioning(clip, tokens, clip.tokenize(category_free_template(template)), ct)
        return io.NodeOutput(cond, ct)


def check_clip(lib: TokenLibrary, clip, name: str, what: str = "library") -> dict[str, int]:
    """The CLIP's tokenizer widths ``{key: width}`` after checking it is the family ``lib`` was
    made for (Category Tokens and Concept Tokens alike)."""
    widths = clip_widths(clip)
    clip_encoders = {}
    for key, width in widths.items():
        if key not in ENCODER_OF_TOKENIZER_KEY:
            raise ProductSceneError(f"clip: text encoder {key!r} is not supported "
                                    f"(ProductScene supports {', '.join(FAMILIES)})")
        clip_encoders[ENCODER_OF_TOKENIZER_KEY[key]] = width
    if family_of_encoders(clip_encoders) != lib.family:
        raise ProductSceneError(
            f"{what}: {name!r} was made for {_describe(lib.encoders)}, but the CLIP is "
            f"{_describe(clip_encoders)}; choose a {what} trained for this checkpoint's family")
    return {key: w for key, w in widths.items() if ENCODER_OF_TOKENIZER_KEY[key] in lib.encoders}


def open_library(name: str, clip, what: str = "library") -> tuple[str, TokenLibrary, dict[str, int]]:
    """``(path, library, clip widths)`` of a listed library name, checked against the CLIP."""
    path = resolve_library(name, what=what)
    lib = TokenLibrary.open(path)
    return path, lib, check_clip(lib, clip, name, what)


def encode_category_prompt(clip, library: str, category: str, template: str, free_tokens=None):
    """Validate everything, then tokenize with the identifier spliced in.
    Returns ``(tokens, CategoryTokens)``; the caller encodes the tokens.

    The identifier goes into the encoders the library has vectors for (``widths`` of
    :func:`check_clip`); a family's global-only encoder (Flux.1's CLIP-L) gets the tokens of the
    category-free prompt ``free_tokens`` (its output is taken from that prompt anyway)."""
    check_template(template)
    path, lib, widths = open_library(library, clip)
    vectors = lib.vectors(category)  # unknown category -> error naming 'category' with suggestions
    tokens, rows, context_rows = tokenize_with_identifier(
        only_keys(clip.tokenize, widths), template, library_vectors_by_key(vectors), widths)
    others = set(clip.tokenize("")) - set(tokens)
    if others:
        if free_tokens is None:
            free_tokens = clip.tokenize(category_free_template(template))
        tokens = {**{k: free_tokens[k] for k in others}, **tokens}
    ct = CategoryTokens(library_path=path, category=category, family=lib.family, rows=tuple(rows),
                        context_rows=int(context_rows), vectors=vectors)
    return tokens, ct


def category_conditioning(clip, tokens, free_tokens, ct: CategoryTokens):
    """The sampler's conditioning for ``tokens`` (the prompt with the identifier) and ``ct``
    completed for Masked Category Attention.

    Two encodes per prompt, never one per step: ``tokens`` gives the cross-attention context;
    ``free_tokens`` (the prompt without the identifier) gives the category-free context product
    pixels attend AND every global vector of the conditioning (SDXL's pooled output, which joins the
    time embedding and so reaches every position, product included): only the context carries the
    category, and the gate keeps it off the product.

    Entries that describe the context row by row (:data:`ROW_KEYS`: Z-Image's ``attention_mask``,
    from which ComfyUI takes the text token count) stay those of ``tokens``; Flux.1's
    ``pooled_output`` (CLIP-L) is a global vector, taken from ``free_tokens``."""
    spliced = clip.encode_from_tokens_scheduled(tokens)
    free = clip.encode_from_tokens_scheduled(free_tokens)
    rows = spliced[0][0].shape[1]
    if rows != ct.context_rows or (ct.rows and max(ct.rows) >= rows):
        raise ProductSceneError(
            f"clip: the encoded prompt has {rows} rows but the identifier was placed for {ct.context_rows}")
    if len(free) != len(spliced):
        raise ProductSceneError("clip: the prompt with and without the category encode to different schedules")
    cond = [[context, {**extra, **{k: v for k, v in free_extra.items() if k not in ROW_KEYS}}]
            for (context, extra), (_, free_extra) in zip(spliced, free)]
    ct = dataclasses.replace(ct, free_context=free[0][0], contexts=tuple(c[0] for c in cond))
    return cond, ct


NODES = [ProductSceneCategoryTokens]
