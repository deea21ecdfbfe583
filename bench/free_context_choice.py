"""Which category-free context should product positions attend: the prompt with the identifier
LEFT OUT, or with the identifier REPLACED BY ITS INIT WORD? (issue 8; the choice is documented in
productscene/prompt.py:category_free_template and BENCHMARKS.md).

    .venv/bin/python bench/free_context_choice.py [--threads 1]

Models: the demo's default model (reduced SD1.5 UNet, full-size CLIP-L, random weights; built by
devkit/default_model.py) and the tiny SDXL of the tests (two text encoders). Two categories whose
init words differ ("perfume", "tools": each name's first word, the trainer's default); each
identifier is its init word's embedding plus a drift (0 = untrained, 0.5 = half the init vector's
norm, standing in for training). Figures, each against an UNGATED run of the same prompt:

  rest of prompt  product positions' cross-attention output, every layer, hidden states replayed:
                  mean |gated - ungated| / mean |ungated|
  product edge    the sampled latent (6 steps, CFG 5) on the product's edge cells (product cells with
                  a background neighbour): mean |gated - ungated| / mean |ungated|
  category leak   largest |delta| at product positions between the two categories (replayed)
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from devkit import comfy_env  # noqa: E402
from devkit import models  # noqa: E402
from devkit.replay import Replay, per_layer  # noqa: E402

TEMPLATE = "a product photo on a {category} background, professional studio lighting"
WORDS = {"perfume": "perfume", "tools": "tools"}


def default_model():
    import comfy.sd
    from devkit.default_model import ensure_default_model
    ckpt = ensure_default_model(log=lambda *_: None)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)
    return models.TinyModels(model=model, clip=clip, vae=vae, family="sd15", context_dim=768, pooled_dim=768,
                             unet_config={})


def tokens_for(pack, tm, category, drift, seed):
    """(positive conditioning, CATEGORY_TOKENS left out, CATEGORY_TOKENS init word) for one category."""
    from productscene.prompt import TOKENIZER_KEYS
    from productscene.prompt import CategoryTokens, category_free_template, init_vectors, tokenize_with_identifier
    embed = pack.nodes.clip_text.word_token_embeddings(tm.clip)
    widths = pack.nodes.clip_text.clip_widths(tm.clip)
    init = {TOKENIZER_KEYS[e]: init_vectors(v, 1) for e, v in embed(WORDS[category]).items()}
    g = torch.Generator().manual_seed(seed)
    identifier = {}
    for k, v in init.items():
        noise = torch.randn(v.shape, generator=g)
        identifier[k] = v + drift * noise * (v.norm() / noise.norm())
    tokens, rows, context_rows = tokenize_with_identifier(tm.clip.tokenize, TEMPLATE, identifier, widths)
    cond = tm.clip.encode_from_tokens_scheduled(tokens)
    left_out = tm.clip.encode_from_tokens(tm.clip.tokenize(category_free_template(TEMPLATE)))
    init_word = tm.clip.encode_from_tokens(tokenize_with_identifier(tm.clip.tokenize, TEMPLATE, init, widths)[0])
    base = CategoryTokens("", category, tm.family, rows, context_rows, {}, contexts=(cond[0][0],))
    return cond, dataclasses.replace(base, free_context=left_out), dataclasses.replace(base, free_context=init_word)


def edge_cells(mask, latent_hw):
    from productscene.masks import resize_to_layer
    product = resize_to_layer(mask, *latent_hw)[0] > 0.5
    background = (~product).float()[None, None]
    near = F.max_pool2d(background, 3, 1, 1)[0, 0] > 0
    return product & near


def measure(pack, tm, name, drift, latent_hw=(24, 24)):
    gate = pack.nodes.category_attention.MaskedCategoryAttention
    negative = models.encode(tm, "blurry, low quality")
    side_h, side_w = latent_hw[0] * 8, latent_hw[1] * 8
    mask = torch.zeros(1, side_h, side_w)
    mask[:, side_h // 4: 3 * side_h // 4, side_w // 3: 2 * side_w // 3] = 1.0
    from productscene.attention import ProductRegion
    region = ProductRegion(mask)
    cond_a, out_a, init_a = tokens_for(pack, tm, "perfume", drift, 1)
    cond_b, out_b, init_b = tokens_for(pack, tm, "tools", drift, 2)
    plain = Replay().run(tm, tm.model, cond_a, negative, latent_hw, batch=1)
    sampled_plain = Replay().run(tm, tm.model, cond_a, negative, latent_hw, batch=1, steps=6).samples
    edges = edge_cells(mask, latent_hw)
    rows = []
    for variant, (ta, tb) in {"left out": (out_a, out_b), "init word": (init_a, init_b)}.items():
        model_a = gate.execute(tm.model, mask, ta, 1.0, 0, 0.0).result[0]
        model_b = gate.execute(tm.model, mask, tb, 1.0, 0, 0.0).result[0]
        gated = Replay(plain.inputs).run(tm, model_a, cond_a, negative, latent_hw, batch=1)
        other = Replay(plain.inputs).run(tm, model_b, cond_b, negative, latent_hw, batch=1)
        rest = []
        for (hw, lat, chunks, g), (_, _, _, p) in zip(gated.outputs, plain.outputs):
            row = chunks.index(0)
            product = region.queries(hw, lat, g.device)[0]
            rest.append(float((g[row, product] - p[row, product]).abs().mean() / p[row, product].abs().mean()))
        leak = max(float(d[prod].max()) for d, prod, _, _ in per_layer(gated, other, region))
        sampled = Replay().run(tm, model_a, cond_a, negative, latent_hw, batch=1, steps=6).samples
        edge = float((sampled - sampled_plain)[0][:, edges].abs().mean() / sampled_plain[0][:, edges].abs().mean())
        rows.append((variant, statistics.mean(rest), edge, leak))
    for variant, rest, edge, leak in rows:
        print(f"{name:>14} drift {drift:.1f} {variant:>9}: rest of prompt {rest:.4f}  product edge {edge:.4f}  "
              f"category leak {leak:.3g}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pack = comfy_env.import_pack()
    for name, tm in (("default SD1.5", default_model()), ("tiny SDXL", models.tiny_sdxl())):
        for drift in (0.0, 0.5):
            measure(pack, tm, name, drift, latent_hw=(24, 24) if name.startswith("default") else (16, 16))


if __name__ == "__main__":
    main()
