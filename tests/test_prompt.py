"""Identifier splicing in tokenized prompts: core (fake tokenizer) and host (real tiny CLIPs)."""
from __future__ import annotations

import pytest
import torch

from productscene.errors import ProductSceneError
from productscene.prompt import (MARKERS, PLACEHOLDER, CategoryTokens, PromptTemplate, check_template,
                                 choose_marker, context_rows, find_positions, init_vectors,
                                 library_vectors_by_key, marker_token_ids, tokenize_with_identifier)

START, END = 49406, 49407


class FakeTokenizer:
    """ComfyUI's tokenizer output structure: {key: [[(id, weight, word_id), ...77], ...]}.
    One token per whitespace word; chunks of 75 words between start and end; pad to 77."""

    def __init__(self, keys=("l",), pad=END, word_ids=False):
        self.keys, self.pad, self.word_ids = keys, pad, word_ids
        self.vocab = {}

    def id(self, word):
        return self.vocab.setdefault(word, 1000 + len(self.vocab))

    def __call__(self, text):
        words = text.split()
        chunks, chunk = [], [(START, 1.0, 0)]
        inside = False  # "(a b)" weights a and b by 1.5, like ComfyUI's "(a b:1.5)"
        for i, w in enumerate(words):
            inside = inside or w.startswith("(")
            weight = 1.5 if inside else 1.0
            inside = inside and not w.endswith(")")
            if not w.strip("()"):
                continue
            if len(chunk) == 76:
                chunk.append((END, 1.0, 0))
                chunks.append(chunk)
                chunk = [(START, 1.0, 0)]
            chunk.append((self.id(w.strip("()")), weight, i + 1))
        chunk.append((END, 1.0, 0))
        chunk += [(self.pad, 1.0, 0)] * (77 - len(chunk))
        chunks.append(chunk)
        if not self.word_ids:
            chunks = [[t[:2] for t in c] for c in chunks]
        return {k: [list(c) for c in chunks] for k in self.keys}


WIDTHS = {"l": 768, "g": 1280}


def vecs(keys, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, WIDTHS[k], generator=g) for k in keys}


def test_template_must_hold_placeholder_exactly_once():
    for bad in ("no placeholder", "{category} and {category}", ""):
        with pytest.raises(ProductSceneError, match="^template:"):
            check_template(bad)
    with pytest.raises(ProductSceneError, match="template"):
        tokenize_with_identifier(FakeTokenizer(), "twice {category} {category}", vecs("l"), WIDTHS)
    with pytest.raises(ProductSceneError, match="does not contain the placeholder '<b>'"):
        PromptTemplate(FakeTokenizer(), "a photo of <a>", {"<a>": 1, "<b>": 1}, WIDTHS)


def test_marker_ids_found_by_tokenizing_alone():
    tok = FakeTokenizer(keys=("l", "g"), pad=0)
    ids = marker_token_ids(tok, "olis")
    assert ids == {"l": tok.id("olis"), "g": tok.id("olis")}
    with pytest.raises(ProductSceneError, match="single token"):
        marker_token_ids(tok, "two words")


@pytest.mark.parametrize("word_ids", [False, True])
def test_splice_replaces_markers_and_records_rows(word_ids):
    tok = FakeTokenizer(keys=("l", "g"), word_ids=word_ids)
    v = vecs(("l", "g"), n=2)
    tokens, rows, ctx = tokenize_with_identifier(tok, "a photo on a {category} background", v, WIDTHS)
    # "<start> a photo on a M M background" -> markers at positions 5 and 6
    assert rows == (5, 6) and ctx == 77
    for k in ("l", "g"):
        chunk = tokens[k][0]
        assert torch.equal(chunk[5][0], v[k][0]) and torch.equal(chunk[6][0], v[k][1])
        assert all(isinstance(t[0], int) for i, t in enumerate(chunk) if i not in (5, 6))
        assert len(chunk[5]) == (3 if word_ids else 2)
        assert chunk[7][0] == tok.id("background")


def test_weights_and_word_ids_are_kept():
    tok = FakeTokenizer(word_ids=True)
    prompt = PromptTemplate(tok, "x ({category}) y", {PLACEHOLDER: 1}, WIDTHS)
    out = prompt.splice({PLACEHOLDER: vecs("l")})
    assert prompt.rows == {PLACEHOLDER: (2,)}
    assert out["l"][0][2][1:] == (1.5, 3)
    assert isinstance(prompt.tokens["l"][0][2][0], int)  # the template's own tokens are not modified


def test_several_placeholders_in_text_order_each_with_its_vectors():
    tok = FakeTokenizer(keys=("l", "g"))
    prompt = PromptTemplate(tok, "a photo of <b> and <a> with <b>", {"<a>": 1, "<b>": 2}, WIDTHS)
    # "<start> a photo of B B and A with B B": every occurrence of <b> gets both of its vectors
    assert prompt.rows == {"<b>": (4, 5, 9, 10), "<a>": (7,)} and prompt.context_rows == 77
    va, vb = vecs(("l", "g"), n=1, seed=1), vecs(("l", "g"), n=2, seed=2)
    out = prompt.splice({"<a>": va, "<b>": vb})
    for k in ("l", "g"):
        chunk = out[k][0]
        assert torch.equal(chunk[7][0], va[k][0])
        assert torch.equal(chunk[4][0], vb[k][0]) and torch.equal(chunk[5][0], vb[k][1])
        assert torch.equal(chunk[9][0], vb[k][0]) and torch.equal(chunk[10][0], vb[k][1])
        assert chunk[8][0] == tok.id("with")
    with pytest.raises(ProductSceneError, match="<b> has 1 vectors"):
        prompt.splice({"<a>": va, "<b>": va})
    with pytest.raises(ProductSceneError, match="no vectors given for placeholder"):
        prompt.splice({"<a>": va})
    live = {k: v.clone().requires_grad_(True) for k, v in va.items()}
    spliced = prompt.splice({"<a>": live, "<b>": vb})
    spliced["g"][0][7][0].sum().backward()  # the spliced vector is the caller's, graph kept
    assert live["g"].grad is not None and float(live["g"].grad.sum()) == 1280.0


def test_init_word_meaning_is_the_resampled_token_embeddings():
    tokens = torch.arange(12.0).reshape(3, 4)  # a word of three tokens
    assert torch.equal(init_vectors(tokens, 1), tokens.mean(0, keepdim=True))
    assert torch.equal(init_vectors(tokens, 3), tokens)
    assert torch.equal(init_vectors(tokens[:1], 2), tokens[:1].expand(2, -1))
    assert torch.equal(init_vectors(tokens, 2), torch.stack([tokens[0], tokens[1:].mean(0)]))
    with pytest.raises(ProductSceneError, match="init word"):
        init_vectors(torch.zeros(0, 4), 1)


def test_wrong_width_raises_instead_of_being_dropped():
    tok = FakeTokenizer()
    with pytest.raises(ProductSceneError, match="1024 wide.*768"):
        tokenize_with_identifier(tok, "on {category}", {"l": torch.zeros(1, 1024)}, WIDTHS)
    with pytest.raises(ProductSceneError, match="encodes with"):
        tokenize_with_identifier(tok, "on {category}", vecs(("l", "g")), WIDTHS)


def test_explicit_marker_in_template_raises_and_auto_marker_avoids_it():
    tok = FakeTokenizer()
    with pytest.raises(ProductSceneError, match="^template:.*'olis'"):
        tokenize_with_identifier(tok, "olis on a {category}", vecs("l"), WIDTHS, marker="olis")
    marker, ids = choose_marker(tok, "olis on a {category}")
    assert marker == MARKERS[1] and ids["l"] == tok.id(MARKERS[1])
    tokens, rows, _ = tokenize_with_identifier(tok, "olis on a {category}", vecs("l"), WIDTHS)
    assert rows == (4,)
    assert tokens["l"][0][1][0] == tok.id("olis")  # the user's word stays a word
    with pytest.raises(ProductSceneError, match="^template:"):
        choose_marker(tok, " ".join(MARKERS) + " {category}")


def test_marker_count_and_alignment_are_checked():
    tok = FakeTokenizer(keys=("l",))

    def drops_a_marker_in_g(text):
        return {"l": tok(text)["l"], "g": tok(text.replace(" olis ", " ", 1))["l"]}

    def shifts_g(text):
        return {"l": tok(text)["l"], "g": tok(("x " + text) if " " in text else text)["l"]}

    with pytest.raises(ProductSceneError, match="expected 2 marker token.*'g', found 1"):
        PromptTemplate(drops_a_marker_in_g, "a {category} b", {PLACEHOLDER: 2}, WIDTHS)
    with pytest.raises(ProductSceneError, match="positions differ"):
        PromptTemplate(shifts_g, "a {category} b", {PLACEHOLDER: 1}, WIDTHS)


def test_identifier_in_second_chunk():
    tok = FakeTokenizer(keys=("l", "g"))
    template = " ".join(f"w{i}" for i in range(80)) + " {category} end"
    tokens, rows, ctx = tokenize_with_identifier(tok, template, vecs(("l", "g"), n=3), WIDTHS)
    assert len(tokens["l"]) == 2 and ctx == 154
    # chunk 1 holds w75..w79 at positions 1..5, then the three markers
    assert rows == (77 + 6, 77 + 7, 77 + 8)
    assert find_positions(tok(template.replace("{category}", "x")), {"l": 1, "g": 1}) == {"l": [], "g": []}
    assert context_rows(tokens) == 154


def test_library_keys_and_category_tokens_value():
    by_key = library_vectors_by_key({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)})
    assert set(by_key) == {"l", "g"}
    with pytest.raises(ProductSceneError):
        library_vectors_by_key({"t5": torch.zeros(1, 4)})
    ct = CategoryTokens("/x.safetensors", "tea", "sdxl", (5,), 77, {"clip_l": torch.zeros(1, 768)})
    assert ct.rows == (5,) and ct.context_rows == 77
    with pytest.raises(Exception):
        ct.category = "other"  # frozen


# =============================================================================== host level
# Real ComfyUI CLIPs (real tokenizer, one-layer text transformer of the real width).

def _encode(clip, tokens):
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


def _widths(clip):
    keys = clip.tokenize("").keys()
    return {k: getattr(clip.cond_stage_model, f"clip_{k}").transformer.get_input_embeddings().weight.shape[1]
            for k in keys}


@pytest.fixture(params=["sd15", "sd2", "sdxl"])
def tiny(request):
    return request.getfixturevalue(request.param)


def _key_vectors(clip, seed, n=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, w, generator=g) for k, w in _widths(clip).items()}


@pytest.mark.host  # its models come through request.getfixturevalue, which conftest cannot see
def test_host_splice_changes_exactly_the_identifier_rows(tiny):
    """One-layer causal CLIP: rows before the identifier do not depend on it; the identifier rows
    change when (and only because) its vector changes; equal vectors give equal conds."""
    clip = tiny.clip
    template = "a product photo on a {category} background, studio lighting"
    va, vb = _key_vectors(clip, 1, n=2), _key_vectors(clip, 2, n=2)
    ta, rows_a, ctx = tokenize_with_identifier(clip.tokenize, template, va, _widths(clip))
    tb, rows_b, _ = tokenize_with_identifier(clip.tokenize, template, vb, _widths(clip))
    assert rows_a == rows_b and len(rows_a) == 2
    ca, _ = _encode(clip, ta)
    cb, _ = _encode(clip, tb)
    ca2, _ = _encode(clip, tokenize_with_identifier(clip.tokenize, template, va, _widths(clip))[0])
    assert ca.shape[1] == ctx == 77
    assert torch.equal(ca, ca2)
    first = rows_a[0]
    # rows 0..first-1 see only the prefix (causal mask): untouched by the identifier
    assert torch.allclose(ca[0, :first], cb[0, :first], atol=1e-6)
    # the identifier rows themselves change with the vector
    for r in rows_a:
        assert (ca[0, r] - cb[0, r]).abs().max() > 1e-3
    # the row right before is a real word; the markers sit right after "a"
    words = [t[0] for t in clip.tokenize(template.replace("{category}", "x"))[next(iter(va))][0]]
    assert words[first - 1] == clip.tokenize("a")[next(iter(va))][0][1][0]


@pytest.mark.host  # its models come through request.getfixturevalue, which conftest cannot see
def test_host_identifier_vector_reaches_its_row(tiny):
    """Splicing the word's own token embedding at the identifier rows reproduces the plain prompt
    exactly: the vector lands at the recorded row and nowhere else."""
    clip = tiny.clip
    widths = _widths(clip)
    word = "marble"
    plain = clip.tokenize(f"a product photo on a {word} background")
    word_ids = {k: clip.tokenize(word)[k][0][1][0] for k in widths}
    vectors = {}
    for k in widths:
        emb = getattr(clip.cond_stage_model, f"clip_{k}").transformer.get_input_embeddings()
        vectors[k] = emb.weight[word_ids[k]].detach().float().unsqueeze(0).clone()
    tokens, rows, _ = tokenize_with_identifier(clip.tokenize, "a product photo on a {category} background",
                                               vectors, widths)
    for k in widths:  # same row as the word in the plain prompt
        assert [p for p, t in enumerate(plain[k][0]) if t[0] == word_ids[k]] == list(rows)
    c_plain, p_plain = _encode(clip, plain)
    c_splice, p_splice = _encode(clip, tokens)
    assert torch.allclose(c_plain, c_splice, atol=1e-5)
    if p_plain is not None:
        assert torch.allclose(p_plain, p_splice, atol=1e-5)


def test_host_sdxl_rows_align_in_both_encoders(sdxl):
    clip = sdxl.clip
    widths = _widths(clip)
    assert widths == {"l": 768, "g": 1280}
    template = "a photo on a {category} background"
    va, vb = _key_vectors(clip, 3), _key_vectors(clip, 4)
    vmix = {"l": va["l"], "g": vb["g"]}  # only the clip_g vector differs from va
    ta, rows, _ = tokenize_with_identifier(clip.tokenize, template, va, widths)
    tm, rows_m, _ = tokenize_with_identifier(clip.tokenize, template, vmix, widths)
    assert rows == rows_m
    for k in ("l", "g"):
        assert [p for p, t in enumerate(ta[k][0]) if torch.is_tensor(t[0])] == list(rows)
    ca, pa = _encode(clip, ta)
    cm, pm = _encode(clip, tm)
    assert ca.shape[-1] == 2048
    r = rows[0]
    # clip_l half identical everywhere; clip_g half changes at the identifier row, not before it
    assert torch.allclose(ca[0, :, :768], cm[0, :, :768], atol=1e-6)
    assert (ca[0, r, 768:] - cm[0, r, 768:]).abs().max() > 1e-3
    assert torch.allclose(ca[0, :r, 768:], cm[0, :r, 768:], atol=1e-6)
    assert pa.shape[-1] == 1280


@pytest.mark.host  # its models come through request.getfixturevalue, which conftest cannot see
def test_host_long_prompt_identifier_in_second_chunk(tiny):
    clip = tiny.clip
    widths = _widths(clip)
    filler = ", ".join(["soft light"] * 30)  # > 75 tokens
    template = f"{filler}, on a {{category}} background"
    va, vb = _key_vectors(clip, 5), _key_vectors(clip, 6)
    ta, rows, ctx = tokenize_with_identifier(clip.tokenize, template, va, widths)
    tb, _, _ = tokenize_with_identifier(clip.tokenize, template, vb, widths)
    key = next(iter(widths))
    assert len(ta[key]) == 2 and ctx == 154
    assert len(rows) == 1 and 77 < rows[0] < 154
    c, p = rows[0] // 77, rows[0] % 77
    assert torch.is_tensor(ta[key][c][p][0])
    ca, _ = _encode(clip, ta)
    cb, _ = _encode(clip, tb)
    assert ca.shape[1] == 154
    assert torch.allclose(ca[0, :rows[0]], cb[0, :rows[0]], atol=1e-6)   # chunk 1 and prefix of chunk 2
    assert (ca[0, rows[0]] - cb[0, rows[0]]).abs().max() > 1e-3


def test_host_wrong_width_raises_before_comfy_drops_it(sd15):
    with pytest.raises(ProductSceneError, match="1024 wide"):
        tokenize_with_identifier(sd15.clip.tokenize, "on {category}", {"l": torch.zeros(1, 1024)},
                                 _widths(sd15.clip))


def test_host_real_tokenizer_markers_are_single_tokens(sdxl, sd2):
    for clip in (sdxl.clip, sd2.clip):
        for m in MARKERS:
            ids = marker_token_ids(clip.tokenize, m)
            assert set(ids) == set(clip.tokenize("").keys())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_host_two_placeholders_with_rows_per_prompt_through_the_training_host(family, request, pack):
    """Break-A-Scene's case on the one splicing path: a batch whose prompts hold different
    placeholders at different rows ("<a> and <b>", then "<b>" alone), vectors that change per
    prompt. Splicing a word's own token embedding reproduces the plain prompt, so each vector
    landed on its rows; gradients reach every vector through the real CLIP."""
    tm = request.getfixturevalue(family)
    from productscene.prompt import Prompt
    host = pack.nodes.training_host.ComfyTrainingHost(tm.model, tm.clip)
    words = {"<a>": "marble", "<b>": "bamboo", "<c>": "wood"}
    embed = {w: host.token_embeddings(w) for w in words.values()}
    assert all(v.shape[0] == 1 for e in embed.values() for v in e.values())  # one token each
    live = {w: {e: v.clone().requires_grad_(True) for e, v in emb.items()} for w, emb in embed.items()}
    prompts = [Prompt("a photo of <a> and <b>", {"<a>": live["marble"], "<b>": live["bamboo"]}),
               Prompt("a photo of <b> on a table", {"<b>": live["wood"]})]
    with host.session():
        encoded = host.encode(prompts)
        (encoded.cond[0].sum() + encoded.cond[1].sum() + (encoded.pooled.sum() if family == "sdxl" else 0)).backward()
    assert encoded.rows == ({"<a>": (4,), "<b>": (6,)}, {"<b>": (4,)})
    assert encoded.cond.shape == (2, 77, tm.context_dim)
    plain = [tm.clip.encode_from_tokens(tm.clip.tokenize(t), return_pooled=True)
             for t in ("a photo of marble and bamboo", "a photo of wood on a table")]
    for i, (cond, pooled) in enumerate(plain):
        torch.testing.assert_close(encoded.cond[i:i + 1].detach(), cond, rtol=1e-5, atol=1e-5)
        if family == "sdxl":
            torch.testing.assert_close(encoded.pooled[i:i + 1].detach(), pooled, rtol=1e-5, atol=1e-5)
    for word, vectors in live.items():
        for enc, v in vectors.items():
            assert v.grad is not None and float(v.grad.abs().sum()) > 0, (word, enc)


class SpaceKeepingTokenizer:
    """Like a byte-level BPE (Qwen's): a word after a space is its own token (' olis' != 'olis'),
    runs of spaces are tokens, a chat template around the text; no padding."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text):
        import re
        pieces = ["<|im_start|>", "user", "\n"] + re.findall(r" ?[^\s]+|\s+(?!\S)|\s+", text) + ["<|im_end|>"]
        return {"q": [[(self.vocab.setdefault(p, 10 + len(self.vocab)), 1.0) for p in pieces]]}


def test_marker_stands_as_in_a_prompt_for_a_tokenizer_that_keeps_spaces():
    """For a whitespace-keeping tokenizer the marker is found in its after-a-space form and no
    whitespace is added beside the template's: the tokens before the identifier are exactly the
    category-free prompt's, after it too (the identifier takes the whitespace token's place)."""
    from productscene.prompt import category_free_template
    tok = SpaceKeepingTokenizer()
    assert marker_token_ids(tok, "olis") == {"q": tok(" olis")["q"][0][3][0]} != {"q": tok("olis")["q"][0][3][0]}
    for template in ("a photo on a {category} background", "{category} background", "on a {category}",
                     "a photo,{category},x"):
        p = PromptTemplate(tok, template, {PLACEHOLDER: 1}, {"q": 8})
        t = [x[0] for x in p.tokens["q"][0]]
        f = [x[0] for x in tok(category_free_template(template))["q"][0]]
        (r,) = p.rows[PLACEHOLDER]
        assert t[r] == marker_token_ids(tok, "olis")["q"]
        assert t[:r] == f[:r], template
    p = PromptTemplate(tok, "a photo on a {category} background", {PLACEHOLDER: 1}, {"q": 8})
    f = [x[0] for x in tok("a photo on a   background")["q"][0]]
    assert len(p.tokens["q"][0]) == len(f) and [x[0] for x in p.tokens["q"][0]][p.rows[PLACEHOLDER][0] + 1:] == f[p.rows[PLACEHOLDER][0] + 1:]


def test_only_keys_restricts_the_tokenizer_to_the_encoders_the_identifier_goes_into():
    from productscene.prompt import only_keys
    tok = FakeTokenizer(keys=("l", "t5xxl"))
    tokens, rows, n = tokenize_with_identifier(only_keys(tok, {"t5xxl"}), "a {category} b",
                                               {"t5xxl": torch.ones(1, 4096)}, {"t5xxl": 4096})
    assert set(tokens) == {"t5xxl"} and rows == (2,) and torch.equal(tokens["t5xxl"][0][2][0], torch.ones(4096))
