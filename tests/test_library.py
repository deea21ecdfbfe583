"""Category library files: format, laziness, validation, atomic writes (host-free)."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import save_file

import productscene.library as library
from productscene.errors import ProductSceneError
from productscene.files import check_format, load_tensors, read_header, save_safetensors_atomic
from productscene.library import FAMILIES, TokenLibrary, LibraryData

G = torch.Generator().manual_seed(0)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=G).to(dtype)


def make_vectors(family, C, n=1, dtype=torch.float32):
    return {enc: rand(C, n, w, dtype=dtype) for enc, w in FAMILIES[family].items()}


LORA = {
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_up.weight": torch.ones(320, 4),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_down.weight": torch.full((4, 768), 2.0),
}


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl", "flux", "z_image"])
def test_round_trip(tmp_path, family):
    names = ["perfume", "tools", "tea"]
    vecs = make_vectors(family, 3, n=2)
    path = tmp_path / "lib.safetensors"
    TokenLibrary.write(path, names, vecs, family, {"perfume": "marble", "tea": "bamboo"},
                          lora=LORA, training={"steps": 10}, license="academic use only")
    lib = TokenLibrary.open(path)
    assert lib.names == names
    assert lib.family == family
    assert lib.encoders == FAMILIES[family]
    assert lib.vectors_per_token == 2
    assert lib.init_words == {"perfume": "marble", "tea": "bamboo"}
    assert lib.training == {"steps": 10}
    assert lib.license == "academic use only"
    assert len(lib) == 3 and "tea" in lib and "coffee" not in lib
    for i, name in enumerate(names):
        got = lib.vectors(name)
        assert set(got) == set(FAMILIES[family])
        for enc in got:
            assert got[enc].shape == (2, FAMILIES[family][enc])
            assert torch.equal(got[enc], vecs[enc][i])
    assert lib.has_lora
    sd = lib.lora_state_dict()
    assert set(sd) == set(LORA)
    for k in LORA:
        assert torch.equal(sd[k], LORA[k])
    allv = lib.all_vectors()
    for enc in vecs:
        assert torch.equal(allv[enc], vecs[enc])


def test_metadata_is_the_documented_format(tmp_path):
    path = tmp_path / "lib.safetensors"
    TokenLibrary.write(path, ["a", "b"], make_vectors("sdxl", 2), "sdxl", ["w1", "w2"], lora=LORA)
    meta, index = read_header(path)
    assert meta["productscene.format"] == "category_library"
    assert meta["productscene.format_version"] == "1"
    assert json.loads(meta["categories"]) == ["a", "b"]
    assert json.loads(meta["init_words"]) == ["w1", "w2"]
    assert json.loads(meta["base_family"]) == "sdxl"
    assert json.loads(meta["vectors_per_token"]) == 1
    assert json.loads(meta["encoders"]) == {"clip_l": 768, "clip_g": 1280}
    assert json.loads(meta["training"]) is None and json.loads(meta["license"]) is None
    assert "created_by" in meta
    assert index["vectors.clip_l"] == ("F32", (2, 1, 768))
    assert index["vectors.clip_g"] == ("F32", (2, 1, 1280))
    assert ("lora." + next(iter(LORA))) in index


def test_float16_vectors_come_back_as_float32(tmp_path):
    path = tmp_path / "lib.safetensors"
    vecs = make_vectors("sd15", 2, dtype=torch.float16)
    TokenLibrary.write(path, ["a", "b"], vecs, "sd15")
    v = TokenLibrary.open(path).vectors("b")["clip_l"]
    assert v.dtype == torch.float32
    assert torch.equal(v, vecs["clip_l"][1].float())


# --------------------------------------------------------------------------- laziness
class _SpySafeOpen:
    """Records every safe_open call and every get_slice / get_tensor made through it."""

    def __init__(self, real):
        self.real = real
        self.opens = []
        self.slices = []
        self.tensors = []

    def __call__(self, path, framework, device="cpu"):
        spy = self
        self.opens.append(os.fspath(path))
        inner = self.real(path, framework=framework, device=device)

        class Handle:
            def __enter__(self_):
                self_.f = inner.__enter__()
                return self_

            def __exit__(self_, *a):
                return inner.__exit__(*a)

            def keys(self_):
                return self_.f.keys()

            def get_tensor(self_, k):
                spy.tensors.append(k)
                return self_.f.get_tensor(k)

            def get_slice(self_, k):
                real_slice = self_.f.get_slice(k)

                class Slice:
                    def __getitem__(s, idx):
                        spy.slices.append((k, idx))
                        return real_slice[idx]
                return Slice()
        return Handle()


def test_open_reads_header_only_and_lora_only_on_demand(tmp_path, monkeypatch):
    path = tmp_path / "lib.safetensors"
    big_lora = {f"diffusion_model.k{i}.lora_up.weight": torch.ones(256, 256) for i in range(8)}
    TokenLibrary.write(path, ["a", "b", "c"], make_vectors("sdxl", 3), "sdxl", lora=big_lora)
    spy = _SpySafeOpen(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", spy)  # productscene.files imports it where it is used
    monkeypatch.setattr(library, "safe_open", spy)
    read_sizes = []
    real_open = open

    def counting_open(p, mode="r", *a, **k):
        fh = real_open(p, mode, *a, **k)
        if os.fspath(p) == os.fspath(path) and "b" in mode:
            real_read = fh.read

            class F:
                def __enter__(s):
                    return s

                def __exit__(s, *e):
                    fh.close()

                def read(s, n=-1):
                    data = real_read(n)
                    read_sizes.append(len(data))
                    return data
            return F()
        return fh

    monkeypatch.setattr("builtins.open", counting_open)
    lib = TokenLibrary.open(path)
    monkeypatch.setattr("builtins.open", real_open)
    assert spy.opens == []                                   # no tensor machinery at open
    header_len = int.from_bytes(real_open(path, "rb").read(8), "little")
    assert sum(read_sizes) == 8 + header_len                 # exactly the header bytes were read
    assert os.path.getsize(path) > 2_000_000 > sum(read_sizes)
    assert lib.has_lora and len(lib.lora_keys) == 8          # known from the header alone

    v = lib.vectors("b")
    assert spy.tensors == []                                 # no whole tensor loaded
    assert {k for k, _ in spy.slices} == {"vectors.clip_l", "vectors.clip_g"}
    assert all(idx == slice(1, 2) for _, idx in spy.slices)  # only row 1
    assert v["clip_g"].shape == (1, 1280)

    sd = lib.lora_state_dict()
    assert sorted(spy.tensors) == sorted("lora." + k for k in big_lora)
    assert set(sd) == set(big_lora)


def test_5000_categories_open_by_header_and_read_one_row(tmp_path, monkeypatch):
    """A catalogue-sized library: opening it reads no tensor and looking a category up reads its
    row only (the speed figure itself is bench/bench_library.py's, not a timed test)."""
    C = 5000
    names = [f"category_{i:05d}" for i in range(C)]
    vecs = {enc: torch.zeros(C, 1, w, dtype=torch.float16) for enc, w in FAMILIES["sdxl"].items()}
    vecs["clip_l"][4999] = 1.0
    path = tmp_path / "big.safetensors"
    TokenLibrary.write(path, names, vecs, "sdxl", {n: "background" for n in names}, lora=LORA)
    spy = _SpySafeOpen(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", spy)
    monkeypatch.setattr(library, "safe_open", spy)
    lib = TokenLibrary.open(path)
    assert len(lib) == C and lib.names[4321] == "category_04321"
    assert spy.tensors == [] and spy.slices == []
    v = lib.vectors("category_04999")
    assert spy.tensors == [] and spy.slices and all(idx == slice(4999, 5000) for _, idx in spy.slices)
    assert v["clip_l"].shape == (1, 768) and bool((v["clip_l"] == 1).all())


# --------------------------------------------------------------------------- bad files
def _assert_rejected(path):
    with pytest.raises(ProductSceneError) as e:
        TokenLibrary.open(path)
    msg = str(e.value)
    assert os.path.basename(path) in msg and "safetensors" in msg
    return msg


def test_pickle_files_are_rejected_without_unpickling(tmp_path, monkeypatch):
    def no_torch_load(*a, **k):
        raise AssertionError("torch.load must never be called")

    pt = tmp_path / "library.pt"
    torch.save({"vectors.clip_l": torch.zeros(1, 1, 768)}, pt)
    ckpt = tmp_path / "renamed.safetensors"            # a zip pickle with a safetensors name
    ckpt.write_bytes(pt.read_bytes())
    raw = tmp_path / "raw_pickle.safetensors"           # a plain (non-zip) pickle
    raw.write_bytes(pickle.dumps({"a": 1}))
    monkeypatch.setattr(torch, "load", no_torch_load)
    for p in (pt, ckpt, raw):
        msg = _assert_rejected(p)
        assert "pickle" in msg or "not a valid" in msg
        with pytest.raises(ProductSceneError):
            load_tensors(p)


def test_garbage_empty_and_truncated_files_are_rejected(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    good = tmp_path / "good.safetensors"
    TokenLibrary.write(good, ["a", "b"], make_vectors("sd15", 2), "sd15")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-100])                  # tensor data cut off
    cut_header = tmp_path / "cut_header.safetensors"
    cut_header.write_bytes(data[:40])                   # header cut off
    for p in (garbage, empty, truncated, cut_header):
        _assert_rejected(p)
    with pytest.raises(ProductSceneError, match="truncated"):
        read_header(truncated)
    with pytest.raises(ProductSceneError, match="not found"):
        TokenLibrary.open(tmp_path / "missing.safetensors")


def test_other_safetensors_are_not_libraries(tmp_path):
    ti = tmp_path / "ti.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, ti)
    assert not TokenLibrary.is_library(ti)
    with pytest.raises(ProductSceneError, match="category_library"):
        TokenLibrary.open(ti)
    lib = tmp_path / "lib.safetensors"
    TokenLibrary.write(lib, ["a"], make_vectors("sd15", 1), "sd15")
    assert TokenLibrary.is_library(lib)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    assert not TokenLibrary.is_library(garbage)


def test_check_format():
    meta = {"productscene.format": "category_library", "productscene.format_version": "1"}
    assert check_format(meta, "category_library", (1,)) == 1
    assert check_format(meta, "category_library", 3) == 1
    with pytest.raises(ProductSceneError, match="concept_tokens"):
        check_format(meta, "concept_tokens", (1,))
    with pytest.raises(ProductSceneError, match="version 2"):
        check_format({**meta, "productscene.format_version": "2"}, "category_library", (1,))
    with pytest.raises(ProductSceneError, match="not a ProductScene file"):
        check_format({}, "category_library", (1,))


def test_future_version_is_refused(tmp_path):
    path = tmp_path / "future.safetensors"
    TokenLibrary.write(path, ["a"], make_vectors("sd15", 1), "sd15")
    meta, _ = read_header(path)
    tensors = load_tensors(path)
    save_safetensors_atomic(tensors, path, {**meta, "productscene.format_version": "9"})
    with pytest.raises(ProductSceneError, match="version 9"):
        TokenLibrary.open(path)


# --------------------------------------------------------------------------- validation
def test_width_mismatch_and_missing_encoder_are_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    with pytest.raises(ProductSceneError, match="768"):
        TokenLibrary.write(p, ["a"], {"clip_l": torch.zeros(1, 1, 1024)}, "sd15")
    with pytest.raises(ProductSceneError, match="1024"):
        TokenLibrary.write(p, ["a"], {"clip_h": torch.zeros(1, 1, 768)}, "sd2")
    with pytest.raises(ProductSceneError, match="clip_g"):
        TokenLibrary.write(p, ["a"], {"clip_l": torch.zeros(1, 1, 768)}, "sdxl")
    with pytest.raises(ProductSceneError, match="rows"):
        TokenLibrary.write(p, ["a", "b"], {"clip_l": torch.zeros(3, 1, 768)}, "sd15")
    with pytest.raises(ProductSceneError, match="same vectors per token"):
        TokenLibrary.write(p, ["a"], {"clip_l": torch.zeros(1, 1, 768), "clip_g": torch.zeros(1, 2, 1280)}, "sdxl")
    with pytest.raises(ProductSceneError, match="unknown base model family 'sd3'"):
        TokenLibrary.write(p, ["a"], {"clip_l": torch.zeros(1, 1, 768)}, "sd3")
    with pytest.raises(ProductSceneError, match=r"family 'flux' needs encoders \['t5xxl'\], got \['clip_l'\]"):
        TokenLibrary.write(p, ["a"], {"clip_l": torch.zeros(1, 1, 768)}, "flux")  # CLIP-L carries no identifier
    with pytest.raises(ProductSceneError, match="2560"):
        TokenLibrary.write(p, ["a"], {"qwen3_4b": torch.zeros(1, 1, 4096)}, "z_image")
    with pytest.raises(ProductSceneError, match="NaN"):
        TokenLibrary.write(p, ["a"], {"clip_l": torch.full((1, 1, 768), float("nan"))}, "sd15")
    assert not p.exists()


def test_file_whose_tensors_disagree_with_its_family_is_refused(tmp_path):
    p = tmp_path / "forged.safetensors"
    TokenLibrary.write(p, ["a"], make_vectors("sd15", 1), "sd15")
    meta, _ = read_header(p)
    # metadata says sd2 but the tensor is clip_l 768
    save_safetensors_atomic(load_tensors(p), p, {**meta, "base_family": '"sd2"', "encoders": '{"clip_h": 1024}'})
    with pytest.raises(ProductSceneError, match="vectors.clip_h"):
        TokenLibrary.open(p)
    save_safetensors_atomic(load_tensors(p), p, {**meta, "base_family": '"sdxl"'})
    with pytest.raises(ProductSceneError, match="do not match family"):
        TokenLibrary.open(p)


def test_duplicate_and_empty_names_are_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    with pytest.raises(ProductSceneError, match="duplicate.*tea"):
        TokenLibrary.write(p, ["tea", "perfume", "tea"], make_vectors("sd15", 3), "sd15")
    with pytest.raises(ProductSceneError, match="non-empty"):
        TokenLibrary.write(p, ["tea", ""], make_vectors("sd15", 2), "sd15")
    assert not p.exists()


def test_unknown_category_suggests_close_names(tmp_path):
    p = tmp_path / "lib.safetensors"
    TokenLibrary.write(p, ["perfume", "power tools", "green tea"], make_vectors("sd15", 3), "sd15")
    lib = TokenLibrary.open(p)
    with pytest.raises(ProductSceneError) as e:
        lib.vectors("perfum")
    msg = str(e.value)
    assert msg.startswith("category:") and "'perfume'" in msg and "Did you mean" in msg
    with pytest.raises(ProductSceneError) as e:
        lib.index("Green Tea")
    assert "'green tea'" in str(e.value)
    with pytest.raises(ProductSceneError) as e:
        lib.index("zzzzzz")
    assert "Did you mean" not in str(e.value)


# --------------------------------------------------------------------------- atomic writes
def test_atomic_write_leaves_no_temp_file(tmp_path):
    p = tmp_path / "lib.safetensors"
    TokenLibrary.write(p, ["a"], make_vectors("sd15", 1), "sd15")
    TokenLibrary.write(p, ["a", "b"], make_vectors("sd15", 2), "sd15")   # overwrite
    assert sorted(os.listdir(tmp_path)) == ["lib.safetensors"]
    assert TokenLibrary.open(p).names == ["a", "b"]


def test_failed_write_keeps_old_file_and_leaves_no_half_file(tmp_path, monkeypatch):
    p = tmp_path / "lib.safetensors"
    TokenLibrary.write(p, ["old"], make_vectors("sd15", 1), "sd15")
    before = p.read_bytes()
    real_save = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:                 # leave half a file behind, then die
            fh.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)  # imported where it is used
    with pytest.raises(OSError, match="disk full"):
        TokenLibrary.write(p, ["new", "newer"], make_vectors("sd15", 2), "sd15")
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["lib.safetensors"]
    q = tmp_path / "fresh.safetensors"
    with pytest.raises(OSError):
        TokenLibrary.write(q, ["new"], make_vectors("sd15", 1), "sd15")
    assert not q.exists()
    assert os.listdir(tmp_path) == ["lib.safetensors"]


def test_save_adds_format_keys_and_requires_string_metadata(tmp_path):
    p = tmp_path / "t.safetensors"
    save_safetensors_atomic({"x": torch.arange(4.0)}, p, {"note": "hi"}, kind="concept_tokens")
    meta, index = read_header(p)
    assert meta == {"note": "hi", "productscene.format": "concept_tokens", "productscene.format_version": "1"}
    assert index == {"x": ("F32", (4,))}
    assert torch.equal(load_tensors(p, ["x"])["x"], torch.arange(4.0))
    with pytest.raises(ProductSceneError, match="missing"):
        load_tensors(p, ["y"])
    with pytest.raises(ProductSceneError, match="string"):
        save_safetensors_atomic({"x": torch.zeros(1)}, p, {"n": 3})


# --------------------------------------------------------------------------- builders
def test_from_embedding_files_sd15_and_sdxl(tmp_path):
    a, b, c = rand(2, 768), rand(2, 768), rand(2, 768)
    save_file({"emb_params": a}, tmp_path / "a.safetensors")
    save_file({"string_to_param.*": b}, tmp_path / "b.safetensors")
    save_file({"clip_l": c}, tmp_path / "c.safetensors")
    data = TokenLibrary.from_embedding_files(
        {"perfume": tmp_path / "a.safetensors", "tools": tmp_path / "b.safetensors",
         "tea": tmp_path / "c.safetensors"}, "sd15")
    assert isinstance(data, LibraryData) and data.names == ["perfume", "tools", "tea"]
    out = data.write(tmp_path / "lib15.safetensors", license="mine")
    lib = TokenLibrary.open(out)
    assert lib.vectors_per_token == 2 and lib.license == "mine"
    assert torch.equal(lib.vectors("tools")["clip_l"], b)

    l, g = rand(1, 768), rand(1, 1280)
    save_file({"clip_l": l, "clip_g": g}, tmp_path / "xl.safetensors")
    save_file({"clip_l": rand(1, 768), "clip_g": rand(1, 1280)}, tmp_path / "xl2.safetensors")
    data = TokenLibrary.from_embedding_files(
        {"p": tmp_path / "xl.safetensors", "q": tmp_path / "xl2.safetensors"}, "sdxl")
    data.write(tmp_path / "libxl.safetensors")
    v = TokenLibrary.open(tmp_path / "libxl.safetensors").vectors("p")
    assert torch.equal(v["clip_l"], l) and torch.equal(v["clip_g"], g)


def test_from_embedding_files_errors(tmp_path):
    save_file({"emb_params": rand(2, 768)}, tmp_path / "two.safetensors")
    save_file({"emb_params": rand(1, 768)}, tmp_path / "one.safetensors")
    save_file({"emb_params": rand(1, 1024)}, tmp_path / "wide.safetensors")
    save_file({"clip_l": rand(1, 768)}, tmp_path / "l_only.safetensors")
    with pytest.raises(ProductSceneError, match="same count"):
        TokenLibrary.from_embedding_files({"a": tmp_path / "two.safetensors", "b": tmp_path / "one.safetensors"}, "sd15")
    with pytest.raises(ProductSceneError, match="wide.safetensors.*1024.*768"):
        TokenLibrary.from_embedding_files({"a": tmp_path / "wide.safetensors"}, "sd15")
    with pytest.raises(ProductSceneError, match="clip_g"):
        TokenLibrary.from_embedding_files({"a": tmp_path / "l_only.safetensors"}, "sdxl")
    pt = tmp_path / "old.pt"
    torch.save({"emb_params": torch.zeros(1, 768)}, pt)
    with pytest.raises(ProductSceneError, match="old.pt.*safetensors"):
        TokenLibrary.from_embedding_files({"a": pt}, "sd15")


def test_from_words():
    table = {"marble": 1.0, "bench": 2.0, "bamboo": 3.0}

    def emb(word):
        return {"clip_l": torch.full((1, 768), table[word]), "clip_g": torch.full((1, 1280), -table[word])}

    data = TokenLibrary.from_words({"perfume": "marble", "tools": "bench", "tea": "bamboo"}, "sdxl", emb)
    assert data.init_words == {"perfume": "marble", "tools": "bench", "tea": "bamboo"}
    assert data.vectors["clip_l"].shape == (3, 1, 768)
    assert torch.all(data.vectors["clip_g"][2] == -3.0)

    def bad_width(word):
        return {"clip_l": torch.zeros(1, 1024)}

    with pytest.raises(ProductSceneError, match="1024.*768"):
        TokenLibrary.from_words({"a": "marble"}, "sd15", bad_width)

    def tokens_of(word):  # words of different token counts: one init-word meaning for all
        return {"clip_l": torch.arange(float(len(word) % 3 + 1))[:, None].expand(-1, 768)}

    data = TokenLibrary.from_words({"a": "marble", "b": "bamboo12"}, "sd15", tokens_of, n=2)
    assert data.vectors["clip_l"].shape == (2, 2, 768)
    assert data.vectors["clip_l"][1, :, 0].tolist() == [0.0, 1.5]  # 3 tokens -> [t0, mean(t1, t2)]


# --------------------------------------------------------------------------- DiT families
def test_dit_families_hold_the_prompt_encoder_and_are_told_apart():
    """Flux.1: T5-XXL (its CLIP-L gives only the global vector, no identifier); Z-Image: Qwen3-4B.
    A text encoder's encoders (with Flux's CLIP-L) and a library's name the same family."""
    from productscene.library import GLOBAL_ENCODERS, clip_encoders, family_of_encoders
    assert FAMILIES["flux"] == {"t5xxl": 4096} and FAMILIES["z_image"] == {"qwen3_4b": 2560}
    assert GLOBAL_ENCODERS == {"flux": {"clip_l": 768}}
    assert clip_encoders("flux") == {"t5xxl": 4096, "clip_l": 768} and clip_encoders("sdxl") == FAMILIES["sdxl"]
    assert family_of_encoders({"clip_l": 768, "t5xxl": 4096}) == "flux"
    assert family_of_encoders({"t5xxl": 4096}) == "flux"
    assert family_of_encoders({"qwen3_4b": 2560}) == "z_image"
    assert family_of_encoders({"clip_l": 768}) == "sd15"
    assert family_of_encoders({"clip_l": 768, "clip_g": 1280, "t5xxl": 4096}) is None  # SD3: not supported
    assert family_of_encoders({"qwen3_4b": 4096}) is None


def test_dit_library_from_embedding_files(tmp_path):
    """Textual-inversion files for the DiT encoders: a tensor named after the encoder (the key
    ComfyUI's embedding: reads for T5-XXL / Qwen3-4B) or emb_params."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"t5xxl": torch.ones(2, 4096)}, str(a))
    save_file({"emb_params": torch.zeros(2, 4096)}, str(b))
    data = TokenLibrary.from_embedding_files({"a": a, "b": b}, "flux")
    assert data.vectors["t5xxl"].shape == (2, 2, 4096) and torch.equal(data.vectors["t5xxl"][0], torch.ones(2, 4096))
    with pytest.raises(ProductSceneError, match="4096 wide, family 'z_image' needs 2560"):
        TokenLibrary.from_embedding_files({"a": a}, "z_image")
