"""Sampling time of IPAdapter + Masked Category Attention against IPAdapter alone, in one process.

    .venv/bin/python bench/bench_ipadapter.py [--model full|tiny] [--latent 32] [--steps 6] [--repeats 3]

The real ComfyUI_IPAdapter_plus (shared/peers/, loaded by ComfyUI's own loader, its own
IPAdapterModelLoader + IPAdapterEmbeds nodes, random weights of the real SD1.5 "Plus" shapes:
devkit/ipadapter.py) on the full SD1.5 UNet (860M parameters) or the tiny one. First prints
IPAdapter's per-layer effect alone and with the gate (both orders), then times the arms. Euler with
CFG, the same seed and conditioning (the real Category Tokens node) for every arm, interleaved
repeats: IPAdapter alone, IPAdapter then the gate (the documented order), the gate then IPAdapter;
median ratios of interleaved pairs printed. With the gate, IPAdapter's image attention still runs
once per layer (its callbacks are added to the gated output); the gate adds its category-free
attention over the cond rows.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from devkit import comfy_env  # noqa: E402  (puts the real ComfyUI on sys.path)
from devkit import ipadapter  # noqa: E402

comfy_env.import_comfy_nodes()  # ComfyUI's nodes.py, before bench_gate puts the repo (and its nodes/) first
from bench.bench_gate import sampling_setup, time_arms  # noqa: E402


def per_layer_effects(tiny, model, arms, gate, positive, negative, latent_side) -> None:
    """IPAdapter's effect on each cross-attention layer's output (one CFG step, every layer fed the
    same inputs: devkit/replay.py), alone (IPAdapter - plain) and with the gate in each order
    (gate + IPAdapter - gate): the layers where it fires and the largest relative difference."""
    from devkit.replay import Replay

    hw = (latent_side, latent_side)
    plain = Replay().run(tiny, model, positive, negative, hw, batch=1)
    outputs = lambda m: [o for *_, o in Replay(plain.inputs).run(tiny, m, positive, negative, hw, batch=1).outputs]
    base, gated = [o for *_, o in plain.outputs], outputs(gate(model))
    alone = [a - b for a, b in zip(outputs(arms["ipadapter"]), base)]
    firing = [i for i, e in enumerate(alone) if e.abs().max() > 0]
    sizes = [float(alone[i].abs().max()) for i in firing]
    print(f"IPAdapter fires on {len(firing)} of {len(alone)} cross-attention layers; its largest per-layer effect "
          f"alone: {min(sizes):.3f} to {max(sizes):.3f}")
    for name in ("ipadapter -> gate", "gate -> ipadapter"):
        with_gate = [a - g for a, g in zip(outputs(arms[name]), gated)]
        rel = max(float((with_gate[i] - alone[i]).abs().max() / alone[i].abs().max()) for i in firing)
        rest = max((float(with_gate[i].abs().max()) for i in range(len(alone)) if i not in firing), default=0.0)
        print(f"  {name}: effect with the gate on those layers differs from it alone by at most {rel:.2e} "
              f"(relative); on the other layers {rest}")


def main() -> None:
    if ipadapter.skip_reason():
        sys.exit(ipadapter.skip_reason())
    args, pack, tiny, model, positive, negative, tokens, mask = sampling_setup(__doc__)
    gate_node = pack.nodes.category_attention.MaskedCategoryAttention
    plus = ipadapter.load_model(ipadapter.write_plus_model("sd15", pack.nodes.host.cross_attention_layers(model),
                                                           f"bench_plus_{args.model}.safetensors"))
    gate = lambda m: gate_node.execute(m, mask, tokens, 1.0, 1, 0.0).result[0]
    arms = {
        "ipadapter": ipadapter.apply(model, plus),
        "ipadapter -> gate": gate(ipadapter.apply(model, plus)),
        "gate -> ipadapter": ipadapter.apply(gate(model), plus),
    }

    per_layer_effects(tiny, model, arms, gate, positive, negative, args.latent)
    _, outputs = time_arms(arms, "ipadapter", args, positive, negative)
    assert torch.equal(outputs["ipadapter -> gate"], outputs["gate -> ipadapter"])  # either order, same image


if __name__ == "__main__":
    main()
