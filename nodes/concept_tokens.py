"""Concept Tokens node: encode a prompt with Break-A-Scene concept names (``a photo of <bottle> on
a table``) from a concept-token file, apply its LoRA, and optionally a category identifier at
``{category}`` in the same prompt (for Masked Category Attention). Same file handling, placeholder
rules and errors as Category Tokens (a concept-token file is a token library)."""
from __future__ import annotations

import os
import re

from comfy_api.v0_0_2 import io

from productscene.errors import ProductSceneError
from productscene.library import suggest
from productscene.prompt import (PLACEHOLDER, CategoryTokens, PromptTemplate, category_free_template,
                                 check_template, library_vectors_by_key)
from .category_attention import apply_lora_of
from .category_tokens import CategoryTokensType, all_categories, category_conditioning, open_library
from .paths import list_libraries, resolve_library

NONE = "none"
CONCEPT = re.compile(r"<[A-Za-z0-9_\-]+>")


def concepts_in(text: str) -> list[str]:
    """The ``<name>`` placeholders of a prompt, in order of first appearance."""
    return list(dict.fromkeys(CONCEPT.findall(text)))


def encode_concept_prompt(clip, tokens_file: str, text: str, category_library: str = NONE, category: str = NONE):
    """Validate everything, then tokenize ``text`` with every concept's vectors (and the category
    identifier at ``{category}`` when a category is chosen) spliced in.
    Returns ``(tokens, free_tokens | None, CategoryTokens | None, concept path)``."""
    if not isinstance(text, str) or not text.strip():
        raise ProductSceneError("text: expected a prompt naming at least one concept, e.g. 'a photo of <concept1>'")
    path, lib, widths = open_library(tokens_file, clip, what="tokens")
    names = concepts_in(text)
    if not names:
        raise ProductSceneError(
            f"text: names no concept of {os.path.basename(path)}; write one of {', '.join(lib.names)} in the prompt")
    for n in names:
        if n not in lib:
            raise ProductSceneError(
                f"text: {n} is not a concept of {os.path.basename(path)} ({', '.join(lib.names)}).{suggest(n, lib.names)}")
    vectors = {n: library_vectors_by_key(lib.vectors(n)) for n in names}
    counts = {n: lib.vectors_per_token for n in names}
    use_category = category_library not in (None, "", NONE) or category not in (None, "", NONE)
    ct = None
    free_tokens = None
    if use_category:
        if category_library in (None, "", NONE) or category in (None, "", NONE):
            raise ProductSceneError("category: choose both a category library and a category (or neither)")
        check_template(text)
        cat_path, cat_lib, _ = open_library(category_library, clip)
        cat_vectors = cat_lib.vectors(category)
        vectors[PLACEHOLDER] = library_vectors_by_key(cat_vectors)
        counts[PLACEHOLDER] = cat_lib.vectors_per_token
    elif PLACEHOLDER in text:
        raise ProductSceneError(f"text: contains {PLACEHOLDER} but no category library and category are chosen")
    template = PromptTemplate(clip.tokenize, text, counts, widths)
    tokens = template.splice(vectors)
    if use_category:
        ct = CategoryTokens(library_path=cat_path, category=category, family=cat_lib.family,
                            rows=template.rows[PLACEHOLDER], context_rows=template.context_rows, vectors=cat_vectors)
        concepts_only = {n: vectors[n] for n in names}
        free = PromptTemplate(clip.tokenize, category_free_template(text), {n: counts[n] for n in names}, widths)
        free_tokens = free.splice(concepts_only)
    return tokens, free_tokens, ct, path


class ProductSceneConceptTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductSceneConceptTokens",
            display_name="Concept Tokens (ProductScene)",
            category="ProductScene",
            description=("Encodes a prompt that names concepts learned by Multi-Concept Inversion (e.g. 'a photo of "
                         "<bottle> on a table') and applies their LoRA. With a category library and category, "
                         "{category} in the same prompt takes the category identifier, for Masked Category Attention."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the concepts were learned on; their LoRA is applied to it."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint (SD1.5, SD2.x or SDXL)."),
                io.Combo.Input("tokens", options=list_libraries(),
                               tooltip="Concept-token file written by Multi-Concept Inversion (models/category_libraries)."),
                io.String.Input("text", multiline=True, default="a photo of <concept1> on a table",
                                tooltip="The prompt. Each <name> of the file is replaced by its learned token; "
                                        "{category} (once) takes the category identifier when a category is chosen. "
                                        "Weights like (word:1.2) and embedding:name work as usual."),
                io.Float.Input("lora_strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="Strength of the concepts' LoRA (0 = tokens only)."),
                io.Combo.Input("category_library", options=[NONE] + list_libraries(), default=NONE,
                               tooltip="Optional: a category library for {category} in the same prompt."),
                io.Combo.Input("category", options=[NONE] + all_categories(), default=NONE,
                               tooltip="Optional: the category whose identifier goes at {category}."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the concepts' LoRA applied."),
                io.Conditioning.Output(display_name="CONDITIONING",
                                       tooltip="The encoded prompt with the concept tokens. With a category, its "
                                               "global vector (SDXL's pooled text) is the prompt's without the "
                                               "category identifier, so the category reaches only what Masked "
                                               "Category Attention lets through."),
                CategoryTokensType.Output(display_name="CATEGORY_TOKENS",
                                          tooltip="For Masked Category Attention when a category is chosen (else empty)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, model, clip, tokens, text, lora_strength, category_library, category):
        stamps = []
        for name in (tokens, category_library):
            try:
                st = os.stat(resolve_library(name))
                stamps.append((name, st.st_mtime_ns, st.st_size))
            except (ProductSceneError, OSError):
                stamps.append((name, None))
        return (tuple(stamps), text, lora_strength, category)

    @classmethod
    def execute(cls, model, clip, tokens, text, lora_strength, category_library=NONE, category=NONE) -> io.NodeOutput:
        spliced, free_tokens, ct, path = encode_concept_prompt(clip, tokens, text, category_library, category)
        if ct is None:
            cond = clip.encode_from_tokens_scheduled(spliced)
        else:
            cond, ct = category_conditioning(clip, spliced, free_tokens, ct)
        return io.NodeOutput(apply_lora_of(model, path, lora_strength), cond, ct)


NODES = [ProductSceneConceptTokens]
