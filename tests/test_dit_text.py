"""The text side of the DiT bases (issue 26): category libraries for Flux.1 (T5-XXL) and Z-Image
(Qwen3-4B), and Category Tokens on their text encoders, built with ComfyUI's own classes and loaded
through ComfyUI's CLIP loader path (devkit/dit_text.py: real tokenizers, vocabularies and widths)."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import productscene.errors
from productscene.library import FAMILIES, TokenLibrary
from productscene.prompt import category_free_template
from devkit import comfy_env, dit_text

import comfy.sd  # noqa: F401  (a host-level module: every test here runs on each ComfyUI host)
from tests.test_category_tokens_node import folders, make_library, run  # noqa: F401  (fixture)

Err = productscene.errors.ProductSceneError
TEMPLATE = "a product photo on a {category} background, professional studio lighting"
# one token each (after a space) in T5's and Qwen's vocabularies
WORDS = {"tea": "chalk", "tools": "wagon", "perfume": "turtle"}
CARRIER = {"flux": "t5xxl", "z_image": "qwen3_4b"}
DIT = ["flux", "z_image"]


@pytest.fixture(scope="module")
def dit(request):
    return {f: dit_text.tiny_text_encoder(f) for f in DIT}


def word_library(pack, path, clip, family, words=WORDS):
    """A library whose identifiers are the text encoder's own embeddings of one-token words."""
    embed = pack.nodes.clip_text.word_token_embeddings(clip, FAMILIES[family])
    for word in words.values():
        assert embed(word)[CARRIER[family]].shape[0] == 1, word
    TokenLibrary.from_words(words, family, embed).write(path, license="test")
    return path


def ids(tokens, key):
    return [t[0] for chunk in tokens[key] for t in chunk]


# -------------------------------------------------------------------------------------------- libraries
@pytest.mark.parametrize("family", DIT)
def test_build_library_from_words_and_embeddings_for_dit_families(pack, family, dit, tmp_path, monkeypatch):
    """`build-library` makes a library for the DiT family from init words (the text encoder files
    loaded by ComfyUI's load_clip) and from embedding files; the family and the encoder that carries
    the prompt are in the metadata."""
    import productscene_cli
    from productscene_cli import build_library
    clip = dit[family]
    files = dit_text.save(family, tmp_path)
    monkeypatch.setattr(build_library, "TEXT_ENCODER_OPTIONS",
                        {k: dict(v) for k, v in dit_text.MODEL_OPTIONS[family].items()})
    out = tmp_path / "words.safetensors"
    args = ["build-library", "--from-words", "tea=chalk,tools=wagon", "--family", family, "--out", str(out),
            "--comfyui", str(comfy_env.COMFYUI_DIR), "--cpu"]
    for f in files:
        args += ["--text-encoder", f]
    assert productscene_cli.main(args) == 0
    lib = TokenLibrary.open(out)
    width = FAMILIES[family][CARRIER[family]]
    assert lib.family == family and lib.metadata["base_family"] == f'"{family}"'
    assert lib.encoders == {CARRIER[family]: width} and lib.names == ["tea", "tools"]
    assert lib.init_words == {"tea": "chalk", "tools": "wagon"}
    embed = pack.nodes.clip_text.word_token_embeddings(clip)
    assert torch.equal(lib.vectors("tea")[CARRIER[family]], embed("chalk")[CARRIER[family]])
    assert not torch.equal(lib.vectors("tools")[CARRIER[family]], lib.vectors("tea")[CARRIER[family]])

    folder = tmp_path / "embeddings"
    folder.mkdir()
    for i, name in enumerate(("marble", "bamboo")):
        save_file({CARRIER[family]: torch.full((2, width), float(i))}, str(folder / f"{name}.safetensors"))
    out2 = tmp_path / "emb.safetensors"
    assert productscene_cli.main(["build-library", "--from-embeddings", str(folder), "--family", family,
                                  "--out", str(out2)]) == 0
    lib2 = TokenLibrary.open(out2)
    assert lib2.family == family and lib2.vectors_per_token == 2 and lib2.encoders == {CARRIER[family]: width}
    assert torch.equal(lib2.vectors("bamboo")[CARRIER[family]], torch.full((2, width), 1.0))


def test_build_library_refuses_a_text_encoder_of_another_family(tmp_path, dit, monkeypatch, capsys):
    import productscene_cli
    from productscene_cli import build_library
    files = dit_text.save("z_image", tmp_path)
    monkeypatch.setattr(build_library, "TEXT_ENCODER_OPTIONS",
                        {k: dict(v) for k, v in dit_text.MODEL_OPTIONS["z_image"].items()})
    monkeypatch.setattr(build_library, "CLIP_TYPES", {"flux": "LUMINA2", "z_image": "LUMINA2"})  # loads, wrong family
    out = tmp_path / "x.safetensors"
    code = productscene_cli.main(["build-library", "--from-words", "tea=chalk", "--family", "flux", "--out", str(out),
                                  "--text-encoder", files[0], "--comfyui", str(comfy_env.COMFYUI_DIR), "--cpu"])
    assert code == 2 and not out.exists()
    assert "family: 'flux' was asked for, but the text encoder is z_image (qwen3_4b 2560)" in capsys.readouterr().err


def test_library_of_another_family_is_refused_like_the_unet_families(pack, folders, dit, sd15):  # noqa: F811
    """A Flux library with an SD1.5 CLIP or Z-Image's encoder, an SD1.5 library with Flux's encoder, a
    Z-Image library with Flux's: the error the UNet families give (tests/test_category_tokens_node.py)."""
    libs, _ = folders
    word_library(pack, libs / "flux.safetensors", dit["flux"], "flux")
    word_library(pack, libs / "zi.safetensors", dit["z_image"], "z_image")
    make_library(libs / "v15.safetensors", sd15.clip, "sd15")
    cases = [(sd15.clip, "flux.safetensors", r"^library: 'flux.safetensors' was made for flux \(t5xxl 4096\), "
                                             r"but the CLIP is sd15 \(clip_l 768\); choose a library trained"),
             (dit["z_image"], "flux.safetensors",
              r"^library:.*made for flux.*but the CLIP is z_image \(qwen3_4b 2560\)"),
             (dit["flux"], "v15.safetensors", r"^library:.*made for sd15 \(clip_l 768\), but the CLIP is flux "
                                              r"\(clip_l 768, t5xxl 4096\)"),
             (dit["flux"], "zi.safetensors", r"^library:.*made for z_image.*but the CLIP is flux")]
    for clip, name, pattern in cases:
        with pytest.raises(Err, match=pattern):
            run(pack, clip=clip, library=name, category="tea", template=TEMPLATE)


# -------------------------------------------------------------------------------------------- Category Tokens
@pytest.mark.parametrize("family", DIT)
def test_identifier_is_spliced_where_category_stands(pack, folders, comfy_nodes, dit, family):  # noqa: F811
    """A library whose 'tea' identifier is the encoder's own embedding of 'chalk' gives exactly the
    context CLIPTextEncode gives for the prompt with the word 'chalk': the vector sits in the slot of
    {category} (T5-XXL for Flux; Qwen3 inside Z-Image's chat template, in the user turn)."""
    clip = dit[family]
    libs, _ = folders
    word_library(pack, libs / "shop.safetensors", clip, family)
    cond, ct = run(pack, clip=clip, library="shop.safetensors", category="tea", template=TEMPLATE)
    (ref,) = comfy_nodes.CLIPTextEncode().encode(clip, TEMPLATE.replace("{category}", "chalk"))
    assert torch.equal(cond[0][0], ref[0][0])
    key = CARRIER[family]
    plain = ids(clip.tokenize(TEMPLATE.replace("{category}", "chalk")), key)
    chalk = ids(clip.tokenize(" chalk"), key)
    chalk = [t for t in chalk if t not in set(ids(clip.tokenize(""), key))]
    assert len(chalk) == 1 and [p for p, t in enumerate(plain) if t == chalk[0]] == list(ct.rows)
    assert ct.family == family and ct.context_rows == cond[0][0].shape[1]
    if family == "z_image":  # the chat template is kept: the identifier is in the user turn
        (r,) = ct.rows
        assert plain[:3] == ids(clip.tokenize(""), key)[:3]  # <|im_start|> user \n
        assert plain.index(151644) < r < plain.index(151645)  # <|im_start|> ... identifier ... <|im_end|>
        assert plain[plain.index(151645):] == ids(clip.tokenize(""), key)[3:]  # <|im_end|> \n <|im_start|>assistant \n
    else:
        assert cond[0][0].shape[1] == 256  # T5's padding, as ComfyUI pads


@pytest.mark.parametrize("family", DIT)
def test_category_free_context_and_global_vectors(pack, folders, comfy_nodes, dit, family):  # noqa: F811
    """F (CATEGORY_TOKENS.free_context) is what CLIPTextEncode gives for the category-free prompt, bit
    for bit, the same for every category, its positions those of that prompt alone. The conditioning's
    global vector (Flux: CLIP-L's pooled output) is F's, bit-identical for two categories; Z-Image has
    none, and its attention mask (ComfyUI's text token count) is the spliced prompt's. For the causal
    Qwen3, T equals F before the identifier; only from it on do they differ."""
    clip = dit[family]
    libs, _ = folders
    word_library(pack, libs / "shop.safetensors", clip, family)
    cond, ct = run(pack, clip=clip, library="shop.safetensors", category="tea", template=TEMPLATE)
    cond2, ct2 = run(pack, clip=clip, library="shop.safetensors", category="tools", template=TEMPLATE)
    (free,) = comfy_nodes.CLIPTextEncode().encode(clip, category_free_template(TEMPLATE))
    (word,) = comfy_nodes.CLIPTextEncode().encode(clip, TEMPLATE.replace("{category}", "chalk"))
    assert torch.equal(ct.free_context, free[0][0]) and torch.equal(ct2.free_context, free[0][0])
    # same length as T: T5 pads both to 256; Qwen's F holds a whitespace token where T has the identifier
    assert ct.free_context.shape == cond[0][0].shape
    (r,) = ct.rows
    assert ct2.rows == ct.rows and not torch.equal(cond[0][0][0, r], cond2[0][0][0, r])
    if family == "flux":
        assert set(cond[0][1]) == {"pooled_output"}
        assert torch.equal(cond[0][1]["pooled_output"], free[0][1]["pooled_output"])
        assert torch.equal(cond[0][1]["pooled_output"], cond2[0][1]["pooled_output"])
        assert not torch.equal(cond[0][1]["pooled_output"], word[0][1]["pooled_output"])
        # T5 is bidirectional: the identifier changes rows before it too
        assert not torch.equal(cond[0][0][0, :r], cond2[0][0][0, :r])
    else:
        assert cond[0][1]["pooled_output"] is None and free[0][1]["pooled_output"] is None
        mask = cond[0][1]["attention_mask"]
        assert mask.shape == (1, cond[0][0].shape[1]) and torch.equal(mask, cond2[0][1]["attention_mask"])
        assert torch.equal(mask, word[0][1]["attention_mask"])
        # causal: rows before the identifier are the category-free prompt's, the identifier row and after differ
        assert torch.equal(cond[0][0][0, :r], ct.free_context[0, :r])
        assert torch.equal(cond[0][0][0, :r], cond2[0][0][0, :r])
        assert all(not torch.equal(cond[0][0][0, i], cond2[0][0][0, i]) for i in range(r, cond[0][0].shape[1]))
    assert len(ct.contexts) == 1 and ct.contexts[0] is cond[0][0]


def test_t5_splice_equals_comfyuis_embedding_mechanism(pack, folders, comfy_nodes, dit, monkeypatch):  # noqa: F811
    """For the bidirectional T5 the encode with the spliced identifier equals ComfyUI's own encode of
    the prompt with the identifier given as ``embedding:name`` (a textual-inversion file, key t5xxl)."""
    clip = dit["flux"]
    libs, embs = folders
    g = torch.Generator().manual_seed(3)
    vectors = {"t5xxl": torch.randn(2, 2, 4096, generator=g)}
    TokenLibrary.write(libs / "rand.safetensors", ["tea", "tools"], vectors, "flux")
    save_file({"t5xxl": vectors["t5xxl"][0].clone()}, str(embs / "teaid.safetensors"))
    monkeypatch.setattr(clip.tokenizer.t5xxl, "embedding_directory", str(embs))
    cond, ct = run(pack, clip=clip, library="rand.safetensors", category="tea", template=TEMPLATE)
    (ref,) = comfy_nodes.CLIPTextEncode().encode(clip, TEMPLATE.replace("{category}", "embedding:teaid"))
    assert len(ct.rows) == 2 and torch.equal(cond[0][0], ref[0][0])
    (other,) = comfy_nodes.CLIPTextEncode().encode(clip, TEMPLATE.replace("{category}", "chalk"))
    assert not torch.equal(cond[0][0], other[0][0])


def test_z_image_row_entries_stay_the_spliced_prompts_when_f_is_shorter(pack, folders, comfy_nodes, dit):  # noqa: F811
    """Two vectors per identifier: T is one row longer than F (Qwen pads nothing). The attention
    mask, from which ComfyUI's Z-Image takes the text token count, must be T's; F is still
    CLIPTextEncode's encode of the category-free prompt, and T's rows before the identifier are F's."""
    clip = dit["z_image"]
    libs, _ = folders
    g = torch.Generator().manual_seed(4)
    TokenLibrary.write(libs / "two.safetensors", ["tea", "tools"], {"qwen3_4b": torch.randn(2, 2, 2560, generator=g) * 0.02},
                       "z_image")
    cond, ct = run(pack, clip=clip, library="two.safetensors", category="tea", template=TEMPLATE)
    (free,) = comfy_nodes.CLIPTextEncode().encode(clip, category_free_template(TEMPLATE))
    rows = cond[0][0].shape[1]
    assert torch.equal(ct.free_context, free[0][0]) and ct.free_context.shape[1] == rows - 1
    assert cond[0][1]["attention_mask"].shape == (1, rows) and int(cond[0][1]["attention_mask"].sum()) == rows
    r = ct.rows[0]
    assert ct.rows == (r, r + 1) and torch.equal(cond[0][0][0, :r], ct.free_context[0, :r])
