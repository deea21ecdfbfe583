"""Host-level tests of the Category Tokens node (imported as a ComfyUI pack) and nodes/paths.py."""
from __future__ import annotations

import productscene
import productscene.errors
import productscene.masks
import os

import pytest
import torch

from devkit import comfy_env

import folder_paths

from productscene.prompt import category_free_template
from productscene.library import FAMILIES, TokenLibrary

TEMPLATE = "a product photo on a {category} background, professional studio lighting"


@pytest.fixture
def folders(tmp_path, monkeypatch, pack):
    """Fresh category_libraries and embeddings folders for one test."""
    libs, embs = tmp_path / "category_libraries", tmp_path / "embeddings"
    libs.mkdir()
    embs.mkdir()
    fnp = folder_paths.folder_names_and_paths
    monkeypatch.setitem(fnp, "category_libraries", ([str(libs)], {".safetensors"}))
    monkeypatch.setitem(fnp, "embeddings", ([str(embs)], set(folder_paths.supported_pt_extensions)))
    for name in ("category_libraries", "embeddings"):
        monkeypatch.delitem(folder_paths.filename_list_cache, name, raising=False)
    yield libs, embs
    for name in ("category_libraries", "embeddings"):
        folder_paths.filename_list_cache.pop(name, None)


def word_vectors(clip, word):
    """{library encoder: [1, width]}: the CLIP's own token embedding of a one-token word."""
    out = {}
    for key in clip.tokenize("").keys():
        tid = clip.tokenize(word)[key][0][1][0]
        emb = getattr(clip.cond_stage_model, f"clip_{key}").transformer.get_input_embeddings()
        out[{"l": "clip_l", "g": "clip_g", "h": "clip_h"}[key]] = emb.weight[tid].detach().float()[None].clone()
    return out


def make_library(path, clip, family, words=("marble", "wood", "bamboo"), names=("perfume", "tools", "tea")):
    vecs = {enc: torch.stack([word_vectors(clip, w)[enc] for w in words]) for enc in FAMILIES[family]}
    TokenLibrary.write(path, list(names), vecs, family, dict(zip(names, words)), license="test")
    return path


def run(pack, **kw):
    out = pack.nodes.category_tokens.ProductSceneCategoryTokens.execute(**kw)
    return out.result


def test_paths_registers_folder_and_lists_libraries(pack, folders, sd15):
    libs, embs = folders
    paths = pack.nodes.paths
    # registration at import went to ComfyUI's models dir
    assert paths.LIBRARY_FOLDER == "category_libraries"
    make_library(libs / "shop.safetensors", sd15.clip, "sd15")
    (libs / "sub").mkdir()
    make_library(libs / "sub" / "more.safetensors", sd15.clip, "sd15", names=("a", "b", "c"))
    make_library(embs / "lib_in_embeddings.safetensors", sd15.clip, "sd15", names=("x", "y", "z"))
    from safetensors.torch import save_file
    save_file({"emb_params": torch.zeros(1, 768)}, str(embs / "plain_ti.safetensors"))
    torch.save({"a": 1}, embs / "old.pt")
    (libs / "notes.txt").write_text("x")
    listed = paths.list_libraries()
    assert listed == sorted(["shop.safetensors", os.path.join("sub", "more.safetensors"),
                             "lib_in_embeddings.safetensors"])
    assert paths.resolve_library("lib_in_embeddings.safetensors") == str(embs / "lib_in_embeddings.safetensors")
    assert paths.resolve("category_libraries", "shop.safetensors") == str(libs / "shop.safetensors")


def test_paths_registration_in_comfy_models_dir(pack):
    entry = folder_paths.folder_names_and_paths["category_libraries"]
    assert os.path.join(folder_paths.models_dir, "category_libraries") in entry[0]
    assert ".safetensors" in entry[1]


@pytest.mark.parametrize("bad", ["../secret.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                 "..\\x.safetensors"])
def test_names_reaching_outside_are_refused(pack, folders, bad, sd15):
    libs, _ = folders
    (libs.parent / "secret.safetensors").write_bytes(b"")
    paths = pack.nodes.paths
    with pytest.raises(productscene.errors.ProductSceneError, match="^library:.*not allowed"):
        paths.resolve_library(bad)
    with pytest.raises(productscene.errors.ProductSceneError, match="^library:"):
        run(pack, clip=sd15.clip, library=bad, category="tea", template=TEMPLATE)


def test_schema_tooltips_and_combos(pack, folders, sd15):
    libs, _ = folders
    make_library(libs / "shop.safetensors", sd15.clip, "sd15")
    node = pack.nodes.category_tokens.ProductSceneCategoryTokens
    schema = node.define_schema()
    assert schema.node_id == "ProductSceneCategoryTokens"
    assert schema.display_name == "Category Tokens (ProductScene)"
    assert schema.category == "ProductScene"
    assert all(i.tooltip for i in schema.inputs)
    inputs = {i.id: i for i in schema.inputs}
    assert inputs["library"].options == ["shop.safetensors"]
    assert inputs["category"].options == ["perfume", "tea", "tools"]
    assert "{category}" in inputs["template"].default
    assert [o.io_type for o in schema.outputs] == ["CONDITIONING", "CATEGORY_TOKENS"]
    assert pack.nodes.category_tokens.NODES == [node]


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_execute_matches_clip_text_encode_of_the_init_word(pack, folders, comfy_nodes, family, request):
    """A library whose 'tea' vector is the token embedding of 'bamboo' gives exactly the
    context CLIPTextEncode gives for the prompt with the word 'bamboo', and the global (pooled)
    vector it gives for the prompt without the category."""
    tm = request.getfixturevalue(family)
    libs, _ = folders
    make_library(libs / "shop.safetensors", tm.clip, family)
    cond, ct = run(pack, clip=tm.clip, library="shop.safetensors", category="tea", template=TEMPLATE)
    (ref,) = comfy_nodes.CLIPTextEncode().encode(tm.clip, TEMPLATE.replace("{category}", "bamboo"))
    assert len(cond) == 1 and len(ref) == 1
    assert torch.allclose(cond[0][0], ref[0][0], atol=1e-5)
    assert "pooled_output" in cond[0][1]
    (free,) = comfy_nodes.CLIPTextEncode().encode(tm.clip, category_free_template(TEMPLATE))
    assert torch.equal(cond[0][1]["pooled_output"], free[0][1]["pooled_output"])
    assert not torch.allclose(cond[0][1]["pooled_output"], ref[0][1]["pooled_output"], atol=1e-3)
    assert ct.category == "tea" and ct.family == family
    assert ct.library_path == str(libs / "shop.safetensors")
    assert ct.context_rows == cond[0][0].shape[1] == 77
    # the identifier sits where 'bamboo' sits in the plain prompt, same row in every encoder
    plain = tm.clip.tokenize(TEMPLATE.replace("{category}", "bamboo"))
    for key, chunks in plain.items():
        bamboo = tm.clip.tokenize("bamboo")[key][0][1][0]
        assert [p for p, t in enumerate(chunks[0]) if t[0] == bamboo] == list(ct.rows)
    assert set(ct.vectors) == set(FAMILIES[family])
    for enc, w in FAMILIES[family].items():
        assert ct.vectors[enc].shape == (1, w)
    # another category really changes the identifier row
    cond2, ct2 = run(pack, clip=tm.clip, library="shop.safetensors", category="perfume", template=TEMPLATE)
    assert ct2.rows == ct.rows
    r = ct.rows[0]
    assert torch.allclose(cond2[0][0][0, :r], cond[0][0][0, :r], atol=1e-6)
    assert (cond2[0][0][0, r] - cond[0][0][0, r]).abs().max() > 1e-3


def test_unknown_category_in_this_library(pack, folders, sd15):
    libs, _ = folders
    make_library(libs / "shop.safetensors", sd15.clip, "sd15")
    with pytest.raises(productscene.errors.ProductSceneError, match="^category:.*'tea'"):
        run(pack, clip=sd15.clip, library="shop.safetensors", category="te", template=TEMPLATE)


def test_library_of_another_family(pack, folders, sd15, sdxl, sd2):
    libs, _ = folders
    make_library(libs / "xl.safetensors", sdxl.clip, "sdxl")
    make_library(libs / "v15.safetensors", sd15.clip, "sd15")
    Err = productscene.errors.ProductSceneError
    with pytest.raises(Err, match="^library:.*sdxl.*sd15"):
        run(pack, clip=sd15.clip, library="xl.safetensors", category="tea", template=TEMPLATE)
    with pytest.raises(Err, match="^library:.*sd15.*sdxl"):
        run(pack, clip=sdxl.clip, library="v15.safetensors", category="tea", template=TEMPLATE)
    with pytest.raises(Err, match="^library:.*sd15.*sd2"):
        run(pack, clip=sd2.clip, library="v15.safetensors", category="tea", template=TEMPLATE)


def test_non_safetensors_library_file(pack, folders, sd15):
    libs, _ = folders
    torch.save({"vectors.clip_l": torch.zeros(3, 1, 768)}, libs / "pickled.safetensors")
    (libs / "garbage.safetensors").write_bytes(os.urandom(1000))
    Err = productscene.errors.ProductSceneError
    for name in ("pickled.safetensors", "garbage.safetensors"):
        with pytest.raises(Err, match=f"{name}.*safetensors"):
            run(pack, clip=sd15.clip, library=name, category="tea", template=TEMPLATE)
    # broken files are listed (they are .safetensors) but contribute no categories
    assert pack.nodes.category_tokens.all_categories() == []


def test_template_errors(pack, folders, sd15):
    libs, _ = folders
    make_library(libs / "shop.safetensors", sd15.clip, "sd15")
    Err = productscene.errors.ProductSceneError
    with pytest.raises(Err, match="^template:"):
        run(pack, clip=sd15.clip, library="shop.safetensors", category="tea", template="no placeholder")
    with pytest.raises(Err, match="^clip:"):
        run(pack, clip=None, library="shop.safetensors", category="tea", template=TEMPLATE)


def test_word_token_embeddings_build_a_library_from_words(pack, folders, sdxl, comfy_nodes):
    libs, _ = folders
    fn = pack.nodes.clip_text.word_token_embeddings(sdxl.clip)
    data = TokenLibrary.from_words({"tea": "bamboo", "tools": "wood"}, "sdxl", fn)
    assert torch.equal(data.vectors["clip_g"][0], word_vectors(sdxl.clip, "bamboo")["clip_g"])
    data.write(libs / "words.safetensors")
    cond, ct = run(pack, clip=sdxl.clip, library="words.safetensors", category="tea", template=TEMPLATE)
    (ref,) = comfy_nodes.CLIPTextEncode().encode(sdxl.clip, TEMPLATE.replace("{category}", "bamboo"))
    assert torch.allclose(cond[0][0], ref[0][0], atol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_category_tokens_carry_the_prompt_encoded_without_the_identifier(pack, folders, comfy_nodes, family,
                                                                        request, monkeypatch):
    """CATEGORY_TOKENS holds the category-free context the gate needs: the same prompt (longer than
    77 tokens, with a prompt weight and an embedding: name) encoded by ComfyUI without the identifier,
    the same for every category; and the conditioning it belongs to."""
    from safetensors.torch import save_file
    tm = request.getfixturevalue(family)
    libs, embs = folders
    make_library(libs / "shop.safetensors", tm.clip, family)
    widths = FAMILIES[family]
    g = torch.Generator().manual_seed(5)
    if family == "sdxl":
        embedding = {e: torch.randn(2, w, generator=g) * 0.02 for e, w in widths.items()}
    else:
        embedding = {"emb_params": torch.randn(2, next(iter(widths.values())), generator=g) * 0.02}
    save_file(embedding, str(embs / "studio.safetensors"))
    save_file({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in embedding.items()}, str(embs / "studio2.safetensors"))
    for key in tm.clip.tokenize("").keys():
        monkeypatch.setattr(getattr(tm.clip.tokenizer, f"clip_{key}"), "embedding_directory", str(embs))
    filler = ", ".join(["soft light"] * 30)
    template = f"a photo on a {{category}} background, (embedding:studio:1.2), {filler}"
    cond, ct = run(pack, clip=tm.clip, library="shop.safetensors", category="tea", template=template)
    _, ct2 = run(pack, clip=tm.clip, library="shop.safetensors", category="perfume", template=template)
    assert cond[0][0].shape[1] == 154 and ct.free_context.shape == (1, 154, cond[0][0].shape[-1])
    (free,) = comfy_nodes.CLIPTextEncode().encode(tm.clip, category_free_template(template))
    assert torch.equal(ct.free_context, free[0][0])
    assert torch.equal(ct.free_context, ct2.free_context)  # the same for every category
    (other,) = comfy_nodes.CLIPTextEncode().encode(tm.clip, category_free_template(template).replace("studio", "studio2"))
    assert (free[0][0] - other[0][0]).abs().max() > 1e-4  # the embedding's vectors took part
    assert len(ct.contexts) == 1 and ct.contexts[0] is cond[0][0]
