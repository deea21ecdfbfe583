"""What ProductScene needs to know about a ComfyUI CLIP: its text encoders' widths and their own
token embeddings of a word (shared by the Category Tokens node and the training host)."""
from __future__ import annotations

from productscene.errors import ProductSceneError
from productscene.prompt import ENCODER_OF_TOKENIZER_KEY


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
        try:
            width = int(_input_embeddings(clip, key).weight.shape[1])
        except Exception:
            tok = _part(getattr(clip, "tokenizer", None), key)
            width = getattr(tok, "embedding_size", None)
        if width is None:
            raise ProductSceneError(f"clip: cannot tell the width of text encoder {key!r}; "
                                    f"ProductScene supports SD1.5, SD2.x, SDXL, Flux.1 and Z-Image text encoders")
        widths[key] = int(width)
    return widths


def _part(obj, key: str):
    """The encoder (or tokenizer) of tokenizer key ``key`` in a ComfyUI CLIP: ``clip_l``/``clip_g``
    for the CLIPs, ``t5xxl`` (Flux.1), ``qwen3_4b`` (Z-Image)."""
    part = getattr(obj, f"clip_{key}", None)
    return part if part is not None else getattr(obj, key, None)


def _input_embeddings(clip, key: str):
    return _part(clip.cond_stage_model, key).transformer.get_input_embeddings()


def word_token_embeddings(clip, encoders=None):
    """``word -> {library encoder: [t, width]}``: the CLIP's own input embeddings of the word's
    ``t`` tokens (start/end/pad and chat-template tokens removed; the word after a space, as it
    stands in a prompt). ``productscene.prompt.init_vectors`` turns them into an identifier's
    initial vectors (the one meaning of "init word"); ``TokenLibrary.from_words`` and the trainers
    do so. ``encoders``: only these library encoders (e.g. a family's, without Flux.1's CLIP-L)."""
    widths = clip_widths(clip)
    if encoders is not None:
        widths = {k: w for k, w in widths.items() if ENCODER_OF_TOKENIZER_KEY.get(k) in set(encoders)}
    empty = clip.tokenize("")

    def embed(word: str):
        tokens = clip.tokenize(" " + word)
        out = {}
        for key in widths:
            special = {t[0] for c in empty[key] for t in c}
            ids = [t[0] for c in tokens[key] for t in c if isinstance(t[0], int) and t[0] not in special]
            if not ids:
                raise ProductSceneError(f"init word: {word!r} gives no tokens")
            emb = _input_embeddings(clip, key)
            out[ENCODER_OF_TOKENIZER_KEY[key]] = emb.weight[ids].detach().float().cpu().clone()
        return out

    return embed
