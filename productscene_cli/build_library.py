"""``build-library``: a category library from textual-inversion embedding files, or from init words
(each category's identifier starts as the text encoder's own embedding of its word)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from productscene.errors import ProductSceneError
from productscene.library import FAMILIES, TokenLibrary, family_of_encoders
from productscene.prompt import ENCODER_OF_TOKENIZER_KEY

from . import comfyui
from .options import host_args

# DiT families: the text encoder files, loaded the way ComfyUI's (Dual)CLIPLoader loads them
CLIP_TYPES = {"flux": "FLUX", "z_image": "LUMINA2"}
TEXT_ENCODER_FILES = {"flux": "clip_l and t5xxl", "z_image": "qwen_3_4b"}
# ComfyUI ``model_options`` for load_clip (empty: the configs ComfyUI picks from the weights)
TEXT_ENCODER_OPTIONS: dict = {}


def register(sub) -> None:
    b = sub.add_parser("build-library", help="build a category library from embedding files or init words",
                       description="From a folder of <category>.safetensors textual-inversion files "
                                   "(--from-embeddings), or from init words (--from-words) embedded by the "
                                   "base model's text encoder: --checkpoint for sd15/sd2/sdxl, --text-encoder "
                                   "files for flux (clip_l and t5xxl) and z_image (qwen_3_4b).")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-embeddings", help="folder of <category>.safetensors TI files")
    src.add_argument("--from-words", help="category=word pairs, comma separated, or a JSON file {category: word}")
    b.add_argument("--family", choices=list(FAMILIES), required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--license", default=None)
    b.add_argument("--checkpoint", default=None, help="--from-words, sd15/sd2/sdxl: the base checkpoint")
    b.add_argument("--text-encoder", action="append", default=[],
                   help="--from-words, flux/z_image: a text encoder file (repeat: flux needs clip_l and t5xxl)")
    b.add_argument("--vectors", type=int, default=1, help="--from-words: vectors per identifier (default 1)")
    host_args(b)
    b.set_defaults(func=run, check_args=check_args)


def check_args(args) -> str | None:
    if args.from_embeddings is not None:
        if args.checkpoint or args.text_encoder:
            return "--checkpoint/--text-encoder are for --from-words"
        return None
    if args.family in CLIP_TYPES:
        if args.checkpoint or not args.text_encoder:
            return f"--from-words with --family {args.family} needs --text-encoder ({TEXT_ENCODER_FILES[args.family]})"
    elif args.text_encoder or not args.checkpoint:
        return f"--from-words with --family {args.family} needs --checkpoint"
    if args.vectors < 1:
        return "--vectors must be at least 1"
    return None


def parse_words(text: str) -> dict[str, str]:
    """``{category: word}`` from ``a=word,b=word`` or a JSON file holding such an object."""
    if os.path.isfile(text):
        try:
            with open(text, encoding="utf-8") as f:
                words = json.load(f)
        except (OSError, ValueError) as e:
            raise ProductSceneError(f"from-words: {text} is not a JSON file of {{category: word}} ({e})") from None
        if not isinstance(words, dict) or not all(isinstance(v, str) for v in words.values()):
            raise ProductSceneError(f"from-words: {text} should hold a JSON object {{category: word}}")
        return {str(k): v for k, v in words.items()}
    words = {}
    for pair in text.split(","):
        name, sep, word = pair.partition("=")
        if not sep or not name.strip() or not word.strip():
            raise ProductSceneError(f"from-words: expected category=word pairs separated by commas, got {pair!r}")
        if name.strip() in words:
            raise ProductSceneError(f"from-words: category {name.strip()!r} given twice")
        words[name.strip()] = word.strip()
    return words


def load_text_encoder(args):
    """The family's text encoder as ComfyUI loads it (checkpoint's CLIP, or the text encoder files)."""
    for path in [args.checkpoint] + list(args.text_encoder):
        if path and not os.path.isfile(path):
            raise ProductSceneError(f"{'checkpoint' if path == args.checkpoint else 'text-encoder'}: {path!r} not found")
    if args.checkpoint:
        return comfyui.load_checkpoint(args.checkpoint)[1]
    import comfy.sd
    try:
        return comfy.sd.load_clip(list(args.text_encoder), clip_type=getattr(comfy.sd.CLIPType, CLIP_TYPES[args.family]),
                                  model_options=TEXT_ENCODER_OPTIONS)
    except Exception as e:  # files ComfyUI cannot use as this family's text encoder
        raise ProductSceneError(f"text-encoder: ComfyUI could not load {', '.join(args.text_encoder)} as the "
                                f"{args.family} text encoder ({comfyui.one_line(e)}); give "
                                f"{TEXT_ENCODER_FILES[args.family]}") from None


def run(args) -> int:
    if args.from_embeddings is not None:
        folder = Path(args.from_embeddings)
        if not folder.is_dir():
            raise ProductSceneError(f"from-embeddings: {str(folder)!r} is not a folder")
        files = {p.stem: str(p) for p in sorted(folder.glob("*.safetensors"))}
        if not files:
            raise ProductSceneError(f"from-embeddings: no .safetensors embedding files in {folder}")
        data = TokenLibrary.from_embedding_files(files, args.family)
    else:
        words = parse_words(args.from_words)
        pack = comfyui.load_pack(args.comfyui, cpu=args.cpu)  # ComfyUI first: it reads its options once
        clip = load_text_encoder(args)
        widths = pack.nodes.clip_text.clip_widths(clip)
        encoders = {ENCODER_OF_TOKENIZER_KEY.get(k, k): w for k, w in widths.items()}
        found = family_of_encoders(encoders)
        if found != args.family:
            spec = ", ".join(f"{k} {w}" for k, w in encoders.items())
            raise ProductSceneError(f"family: {args.family!r} was asked for, but the text encoder is "
                                    f"{found or 'an unsupported model'} ({spec})")
        embed = pack.nodes.clip_text.word_token_embeddings(clip, FAMILIES[args.family])
        data = TokenLibrary.from_words(words, args.family, embed, n=args.vectors)
    path = data.write(args.out, license=args.license)
    print(f"wrote {path}: {len(data.names)} categories ({args.family})")
    return 0
