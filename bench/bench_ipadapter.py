"""Sampling time of IPAdapter + Masked Category Attention against IPAdapter alone, in one process.

    .venv/bin/python bench/bench_ipadapter.py [--model full|tiny] [--latent 32] [--steps 6] [--repeats 3]

The real ComfyUI_IPAdapter_plus (shared/peers/, loaded by ComfyUI's own loader, its own
IPAdapterModelLoader + IPAdapterEmbeds nodes, random weights of the real SD1.5 "Plus" shapes:
tests/support/ipadapter.py) on the full SD1.5 UNet (860M parameters) or the tiny one. First prints
IPAdapter's per-layer effect alone and with the gate (both orders), then times the arms. Euler with
CFG, the same seed and conditioning (the real Category Tokens node) for every arm, interleaved
repeats: IPAdapter alone, IPAdapter then the gate (the documented order), the gate then IPAdapter;
median ratios of interleaved pairs printed. With the gate, IPAdapter's image attention still runs
once per layer (its callbacks are added to the gated output); the gate adds its category-free
attention over the cond rows.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests.support import comfy_env  # noqa: E402  (puts the real ComfyUI on sys.path)
from tests.support import ipadapter, models  # noqa: E402

comfy_env.import_comfy_nodes()  # ComfyUI's nodes.py, before bench_gate puts the repo (and its nodes/) first
from bench.bench_gate import category_prompt  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402


def per_layer_effects(tiny, model, arms, gate, positive, negative, latent_side) -> None:
    """IPAdapter's effect on each cross-attention layer's output (one CFG step, every layer fed the
    same inputs: tests/support/replay.py), alone (IPAdapter - plain) and with the gate in each order
    (gate + IPAdapter - gate): the layers where it fires and the largest relative difference."""
    from tests.support.replay import Replay

    hw = (latent_side, latent_side)
    plain = Replay().run(tiny, model, positive, negative, hw, batch=1)
    outputs = lambda m: [o for *_, o in Replay(plain.inputs).run(tiny, m, positive, negative, hw, batch=1).outputs]
    base, gated = [o for *_, o in plain.outputs], outputs(gate(model))
    alone = [a - b for a, b in zip(outputs(arms["ipadapter"]), base)]
    firing = [i for i, e in enumerate(alone) if e.abs().max() > 0]
    print(f"IPAdapter fires on {len(firing)} of {len(alone)} cross-attention layers; its largest per-layer effect "
          f"alone: {min(float(alone[i].abs().max()) for i in firing):.3f} to {max(float(alone[i].abs().max()) for i in firing):.3f}")
    for name in ("ipadapter -> gate", "gate -> ipadapter"):
        with_gate = [a - g for a, g in zip(outputs(arms[name]), gated)]
        rel = max(float((with_gate[i] - alone[i]).abs().max() / alone[i].abs().max()) for i in firing)
        rest = max((float(with_gate[i].abs().max()) for i in range(len(alone)) if i not in firing), default=0.0)
        print(f"  {name}: effect with the gate on those layers differs from it alone by at most {rel:.2e} "
              f"(relative); on the other layers {rest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["full", "tiny"], default="full")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if ipadapter.skip_reason():
        sys.exit(ipadapter.skip_reason())

    pack = comfy_env.import_pack()
    host = pack.nodes.host
    gate_node = pack.nodes.category_attention.MaskedCategoryAttention
    tiny = models.tiny_sd15()
    model = models.full_sd15_unet() if args.model == "full" else tiny.model
    plus = ipadapter.load_model(ipadapter.write_plus_model("sd15", host.cross_attention_layers(model),
                                                           f"bench_plus_{args.model}.safetensors"))
    positive, tokens = category_prompt(tiny.clip, pack)
    negative = models.encode(tiny, "blurry, low quality")
    side = args.latent * 8
    mask = torch.zeros(1, side, side)
    mask[:, side // 4: 3 * side // 4, side // 3: 2 * side // 3] = 1.0
    gate = lambda m: gate_node.execute(m, mask, tokens, 1.0, 1, 0.0).result[0]
    arms = {
        "ipadapter": ipadapter.apply(model, plus),
        "ipadapter -> gate": gate(ipadapter.apply(model, plus)),
        "gate -> ipadapter": ipadapter.apply(gate(model), plus),
    }

    latent = torch.zeros(1, 4, args.latent, args.latent)
    noise = comfy.sample.prepare_noise(latent, 0)

    def run(m) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = comfy.sample.sample(m, noise, args.steps, 5.0, "euler", "normal", positive, negative, latent,
                                  disable_pbar=True, seed=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        return time.perf_counter() - start, out

    per_layer_effects(tiny, model, arms, gate, positive, negative, args.latent)
    outs = {name: run(m)[1] for name, m in arms.items()}  # warm-up: model load, caches
    assert torch.equal(outs["ipadapter -> gate"], outs["gate -> ipadapter"])  # either order, same image
    times = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, m in arms.items():
            times[name].append(run(m)[0])
    device = comfy.model_management.get_torch_device()
    print(f"model={args.model} latent={args.latent}x{args.latent} steps={args.steps} cfg=5 euler device={device} "
          f"threads={torch.get_num_threads()}")
    for name, ts in times.items():
        print(f"{name:>18} s/run: {', '.join(f'{t:.3f}' for t in ts)}  median {statistics.median(ts):.3f}")
    for name in ("ipadapter -> gate", "gate -> ipadapter"):
        ratio = statistics.median(g / v for g, v in zip(times[name], times["ipadapter"]))
        print(f"{name} / ipadapter alone (median of interleaved pairs): {ratio:.3f}")


if __name__ == "__main__":
    main()
