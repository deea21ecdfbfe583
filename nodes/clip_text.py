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


def word_token_embeddings(clip):
    """``word -> {library encoder: [t, width]}``: the CLIP's own input embeddings of the word's
    ``t`` tokens (start/end/pad removed). ``productscene.prompt.init_vectors`` turns them into an
    identifier's initial vectors (the one meaning of "init word"); ``TokenLibrary.from_words``
    and the trainers do so."""
    widths = clip_widths(clip)
    empty = clip.tokenize("")

    def embed(word: str):
        tokens = clip.tokenize(word)
        out = {}
        for key in widths:
            special = {t[0] for c in empty[key] for t in c}
            ids = [t[0] for c in tokens[key] for t in c if isinstance(t[0], int) and t[0] not in special]
            if not ids:
                raise ProductSceneError(f"init word: {word!r} gives no tokens")
            emb = getattr(clip.cond_stage_model, f"clip_{key}").transformer.get_input_embeddings()
            out[ENCODER_OF_TOKENIZER_KEY[key]] = emb.weight[ids].detach().float().cpu().clone()
        return out

    return embed
