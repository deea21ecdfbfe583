"""Sampling time with Masked Category Attention on DiTs against the vanilla model, in one process.

    .venv/bin/python bench/bench_gate_dit.py [--family flux|zimage|both] [--text 256,512]
                                             [--latent 128] [--repeats 3] [--threads 0]

ComfyUI's own classes at real width (devkit/dit_models.py): Flux.1 at hidden 3072 / 24 heads with
one double-stream and one single-stream block; Z-Image at dim 3840 / 30 heads with one context
refiner, one noise refiner and one main layer. A 128 x 128 latent is 64 x 64 = 4096 image tokens.
T is ``--text`` tokens of the encoder's width (T5-XXL 4096, Qwen3-4B 2560), F the same prompt with
the identifier's row left out (one token fewer). One Euler step at cfg 1 (ComfyUI then runs only the
cond batch: every call is gated, the worst case; with CFG the uncond half runs ungated), the same
noise for both arms; rounds interleave vanilla and gated; the median of the per-round ratios is
printed. Where the cost goes is printed too: the attention calls' share of a vanilla run (a
foreign-style ``optimized_attention_override`` that times them) and the mask's size.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from devkit import comfy_env  # noqa: E402  (puts the real ComfyUI on sys.path)
from devkit import dit_models  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402

from productscene.attention import CategoryGate, SceneAttention  # noqa: E402

WIDTH = {"flux": 4096, "zimage": 2560}
BUILD = {"flux": dit_models.wide_flux, "zimage": dit_models.wide_zimage}


class AttentionClock:
    """Times every attention call (an ``optimized_attention_override``, as another pack installs one)."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self, func, *args, **kwargs):
        start = time.perf_counter()
        out = func(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out


def arms(family: str, text: int, latent: int):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, text, WIDTH[family], generator=g)
    f = torch.cat([t[:, :3], t[:, 4:]], dim=1)  # the identifier's row left out
    extra = {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5} if family == "flux" else {}
    side = latent * 8
    mask = torch.zeros(1, side, side)
    mask[:, side // 4: 3 * side // 4, side // 3: 2 * side // 3] = 1.0
    return [[t, extra]], f, t, mask


def attention_only(heads: int, text: int, image: int, product: float, repeats: int) -> None:
    """The kernel alone, one joint attention at real width: vanilla ``[T | image]`` unmasked; the
    gate's one call over ``[T | F | image]`` with the block mask; and the alternative tried, two
    unmasked calls (``[T | image]`` for T and background queries, then F and the gathered product
    queries against ``[F | image]``). ComfyUI's CPU default (sub-quadratic) and torch SDPA."""
    import comfy.ldm.modules.attention as ca
    from productscene.dit import joint_mask
    g = torch.Generator().manual_seed(0)
    d, free = 128, text - 1
    prod = torch.zeros(1, image, dtype=torch.bool)
    prod[:, : int(image * product)] = True
    pcount = int(prod.sum())

    def qkv(n):
        return [torch.randn(1, heads, n, d, generator=g) for _ in range(3)]

    plain, both, split_q = qkv(text + image), qkv(text + free + image), torch.randn(1, heads, free + pcount, d, generator=g)
    fk = both[1][:, :, text:]  # [F | image] keys
    fv = both[2][:, :, text:]
    mask = joint_mask(text, free, image, prod, torch.tensor([True]))
    arms = {}
    for kernel in (ca.optimized_attention, ca.attention_pytorch):
        name = "comfy-default" if kernel is ca.optimized_attention else "sdpa"
        arms[f"{name} vanilla"] = lambda k=kernel: k(*plain, heads, skip_reshape=True)
        arms[f"{name} gate (mask)"] = lambda k=kernel: k(*both, heads, skip_reshape=True, mask=mask)
        arms[f"{name} two calls"] = lambda k=kernel: (k(*plain, heads, skip_reshape=True),
                                                    k(split_q, fk, fv, heads, skip_reshape=True))
    times = {name: [] for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(f"attention only: heads={heads} text={text} free={free} image={image} product tokens={pcount} "
          f"mask={mask.numel() * mask.element_size() / 2**20:.0f} MiB")
    for name, ts in times.items():
        base = None if name.endswith("vanilla") else times[name.split(" ")[0] + " vanilla"]
        ratio = "" if base is None else f"  / vanilla {statistics.median(a / b for a, b in zip(ts, base)):.3f}"
        print(f"  {name:>26}: median {statistics.median(ts):.2f} s{ratio}")


def encoder_pass(texts, repeats: int) -> None:
    """The extra text-encoder pass per prompt (Category Tokens encodes the prompt once more without
    the identifier, once per prompt, never per step), at the released encoders' real widths:
    ComfyUI's own T5-XXL (d_model 4096, d_ff 10240, 64 heads) and Qwen3-4B (2560, 9728, 32/8 heads)
    classes. The released depths (24 / 36 layers) do not fit this machine's time, so each is built
    with 1 and with 2 layers and the per-layer time (the difference) is scaled to the full depth."""
    import comfy.ops
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.t5 as t5
    import json as _json

    t5_config = _json.loads((Path(t5.__file__).parent / "t5_config_xxl.json").read_text())

    def t5_model(layers):
        return t5.T5(dict(t5_config, num_layers=layers), torch.float32, "cpu", comfy.ops.manual_cast)

    def qwen_model(layers):
        return llama.Qwen3_4B({"num_hidden_layers": layers}, torch.float32, "cpu", comfy.ops.manual_cast)

    for name, build, depth in (("T5-XXL", t5_model, 24), ("Qwen3-4B", qwen_model, 36)):
        for text in texts:
            times = {}
            for layers in (1, 2):
                model = build(layers)
                for p in model.parameters():
                    torch.nn.init.normal_(p, 0.0, 0.02)
                ids = torch.randint(0, 32000, (1, text))
                runs = []
                with torch.no_grad():
                    model(ids, None)  # warm-up
                    for _ in range(repeats):
                        start = time.perf_counter()
                        model(ids, None)
                        runs.append(time.perf_counter() - start)
                times[layers] = statistics.median(runs)
                del model
                gc.collect()
            per_layer = max(times[2] - times[1], 0.0)
            full = times[1] + per_layer * (depth - 1)
            print(f"extra encode {name} {text} tokens: per layer {per_layer * 1e3:.0f} ms, "
                  f"{depth} layers (scaled) {full:.2f} s per prompt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["flux", "zimage", "both"], default="both")
    parser.add_argument("--text", default="256,512", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--latent", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--attention-only", action="store_true",
                        help="time the joint-attention kernel alone (vanilla, gate mask, two calls)")
    parser.add_argument("--encoder", action="store_true",
                        help="time the extra text-encoder pass per prompt (T5-XXL, Qwen3-4B widths)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.encoder:
        encoder_pass([int(n) for n in args.text.split(",")], args.repeats)
        return
    if args.attention_only:
        for family in (["flux", "zimage"] if args.family == "both" else [args.family]):
            for text in (int(n) for n in args.text.split(",")):
                attention_only({"flux": 24, "zimage": 30}[family], text, (args.latent // 2) ** 2, 1 / 6, args.repeats)
        return
    pack = comfy_env.import_pack()
    install_dit = pack.nodes.dit_host.install_dit
    device = comfy.model_management.get_torch_device()
    families = ["flux", "zimage"] if args.family == "both" else [args.family]
    latent = torch.zeros(1, 16, args.latent, args.latent)
    noise = comfy.sample.prepare_noise(latent, 0)

    def run(m, positive):
        start = time.perf_counter()
        out = comfy.sample.sample(m, noise, 1, 1.0, "euler", "simple", positive, positive, latent,
                                  disable_pbar=True, seed=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        return time.perf_counter() - start

    for family in families:
        model = BUILD[family]()
        for text in (int(n) for n in args.text.split(",")):
            positive, free, t, mask = arms(family, text, args.latent)
            gated = install_dit(model, SceneAttention().with_gate(CategoryGate(mask, free, contexts=[t])), family)
            vanilla = model.clone()
            clocks = {"vanilla": AttentionClock(), "gated": AttentionClock()}
            for name, m in (("vanilla", vanilla), ("gated", gated)):
                m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = clocks[name]
            run(vanilla, positive), run(gated, positive)  # warm-up (load, caches)
            times = {"vanilla": [], "gated": []}
            for name in clocks:
                clocks[name].seconds = 0.0
            for _ in range(args.repeats):
                times["vanilla"].append(run(vanilla, positive))
                times["gated"].append(run(gated, positive))
            image = (args.latent // 2) ** 2
            ratio = statistics.median(g / v for g, v in zip(times["gated"], times["vanilla"]))
            print(f"family={family} width={model.model.diffusion_model.dim if family == 'zimage' else model.model.diffusion_model.hidden_size} "
                  f"image_tokens={image} text_tokens={text} free_tokens={free.shape[1]} device={device} "
                  f"threads={torch.get_num_threads()} steps=1 cfg=1")
            for name, ts in times.items():
                share = clocks[name].seconds / sum(ts)
                print(f"  {name:>7} s/run: {', '.join(f'{s:.2f}' for s in ts)}  median {statistics.median(ts):.2f}  "
                      f"attention share {share:.2f}")
            print(f"  gated / vanilla (median of interleaved pairs): {ratio:.3f}")
            del gated, vanilla
            gc.collect()
        del model
        gc.collect()


if __name__ == "__main__":
    main()
