"""Personality-adapter trainer benchmark: seconds per step and memory of the personality recipe on
the engine (``Trainer`` + ``PersonalityRecipe`` as ``train_personality_adapter`` runs it, data from an
in-memory ``ImageSource``: each step draws a batch, augments each image's own background as its
reference, runs CLIP vision on it, the adapter's projection, the UNet with the reference injected
on the background, the background-weighted MSE, AdamW on the adapter) against a baseline in the
same process: a plain forward + backward of the same UNet with the same injection (reference
tokens from fixed, precomputed CLIP-vision states through the same adapter) and a fixed context,
with no data, augmentation, vision encoder or optimizer. The arms are interleaved step by step;
medians and the median ratio of interleaved pairs are printed.

    .venv/bin/python bench/bench_train_personality.py --model tiny --threads 1 --steps 40
    .venv/bin/python bench/bench_train_personality.py --model full --threads 1 --steps 10
    PRODUCTSCENE_COMFY_GPU=1 .venv/bin/python bench/bench_train_personality.py --model full --latent 64

CLIP vision: ComfyUI's own ``ClipVisionModel`` from devkit/clip_vision.py
(``build_clip_vision(width)``: ``--vision-width`` wide, as ViT-H at 1280, but 2 layers on 56 px
images, 17 states, random weights), so its share of a step is smaller than a real ViT-H's.

Memory: on the CPU the process's peak resident set (ru_maxrss, as bench/bench_train.py), read after
the setup, after the baseline's warm-up steps alone (the baseline arm's peak) and at the end (both
arms: the engine's own peak is not separable from it in one process); on CUDA
``max_memory_allocated`` per arm (reset before each step). For both arms also the bytes of tensors
saved for backward in one step (``torch.autograd.graph.saved_tensors_hooks``; each storage once,
model and adapter weights left out): the activation memory the step's backward holds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devkit import comfy_env  # noqa: E402  (ComfyUI importable, CPU unless PRODUCTSCENE_COMFY_GPU=1)

import torch  # noqa: E402

from bench.bench_train import peak_mb, reset_peak, sync  # noqa: E402


def saved_for_backward(step, weights: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``step()`` runs, leaving out
    those in ``weights`` (data pointers of parameters and buffers)."""
    seen: set[int] = set()

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen.add((s.data_ptr(), s.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(n for _, n in seen)


def source(n: int, latent: int, batch_seed: int = 0):
    """An in-memory ``ImageSource`` of ``n`` items: random latents and images at 8x the latent, a
    product rectangle in each (so every reference has a background to keep)."""
    from productscene.train.recipes.personality import ImageSource
    g = torch.Generator().manual_seed(batch_seed)
    side = latent * 8
    latent_masks = torch.zeros(n, latent, latent)
    latent_masks[:, latent // 4: latent // 2, latent // 3: 2 * latent // 3] = 1
    masks = torch.nn.functional.interpolate(latent_masks[:, None], size=(side, side), mode="nearest")[:, 0]
    return ImageSource(torch.randn(n, 4, latent, latent, generator=g), latent_masks,
                       torch.rand(n, side, side, 3, generator=g), masks)


def interleave(arms: dict, warmup: int, steps: int, device) -> tuple[dict, dict]:
    """Warm-up steps per arm (the first arm's alone first: its CPU peak RSS), then ``steps`` rounds
    taking each arm once in turn. Returns ({arm: [s/step]}, memory readings in MB)."""
    memory = {}
    for arm, step in arms.items():
        for _ in range(warmup):
            step()
        memory[f"after {arm} warm-up"] = peak_mb(device)
    times = {arm: [] for arm in arms}
    peaks = dict.fromkeys(arms, 0.0)
    for _ in range(steps):  # interleaved, so load on a shared machine hits both alike
        for arm, step in arms.items():
            reset_peak(device)
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[arm].append(time.perf_counter() - start)
            peaks[arm] = max(peaks[arm], peak_mb(device))
    if device.type == "cuda":
        memory.update({f"{arm} step": mb for arm, mb in peaks.items()})
    else:
        memory["process (both arms)"] = peak_mb(device)
    return times, memory


def bench(args) -> dict:
    from devkit.clip_vision import build_clip_vision, config as vision_config
    from devkit.models import full_sd15_unet, tiny_sd15
    pack = comfy_env.import_pack()
    from productscene.personality import PersonalityAdapter, patch_keep
    from productscene.attention import SceneAttention
    from productscene.train import engine
    from productscene.train.recipes import Encoded
    from productscene.train.recipes.personality import PersonalityConfig, PersonalityRecipe

    tiny = tiny_sd15()
    model = full_sd15_unet() if args.model == "full" else tiny.model
    cv = build_clip_vision(args.vision_width)
    vcfg = vision_config(args.vision_width)
    host = pack.nodes.training_host.ComfyTrainingHost(model, tiny.clip, None)
    device = host.device
    b, lat = args.batch, args.latent
    data = source(8, lat)
    memory = {"after setup": peak_mb(device)}

    def encode_vision(images):
        return cv.encode_image(images, crop=False)["penultimate_hidden_states"]

    with engine.training_mode():
        adapter = PersonalityAdapter.for_layers(host.family, args.vision_width,
                                                pack.nodes.host.cross_attention_layers(host.model), tokens=args.tokens)
        cfg = PersonalityConfig(tokens=args.tokens, batch_size=b, resolution=lat * 8, steps=args.warmup + args.steps + 2)
        recipe = PersonalityRecipe(host, data, encode_vision, adapter, cfg)
        trainer = engine.Trainer(recipe, cfg.phases(), seed=0, device=device)
        with host.session(latent_shape=(b, 4, lat, lat)):
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():  # the baseline's reference: states of a fixed image, computed once
                refs, ref_masks = recipe.references(torch.zeros(b, dtype=torch.long), None)
                states = encode_vision(refs).float().to(device)
            keep = patch_keep(states.shape[1], ref_masks, b)
            fixed = Encoded(torch.randn(b, 77, 768, generator=g).to(device), None, ({},) * b, 77)
            x = torch.randn(b, 4, lat, lat, generator=g).to(device)
            target = torch.randn(b, 4, lat, lat, generator=g).to(device)
            sigma = torch.full((b,), 1.0, device=device)
            product = data.latent_masks[:b].to(device)

            def baseline_step():  # same UNet, adapter and injection; no data, augmentation, CLIP vision, optimizer
                scene = SceneAttention().with_injection(adapter.injection(adapter.tokens(states, keep), product))
                (host.predict_noise(x, sigma, fixed, scene) - target).float().pow(2).mean().backward()
                adapter.zero_grad(set_to_none=True)

            arms = {"baseline": baseline_step, "engine": trainer.train_step}
            times, more = interleave(arms, args.warmup, args.steps, device)
            memory.update(more)
            weights = {t.untyped_storage().data_ptr() for m in (host.base, adapter, cv.model)
                       for t in list(m.parameters()) + list(m.buffers())}
            saved = {arm: saved_for_backward(step, weights) for arm, step in arms.items()}

    proj = sum(p.numel() for n, p in adapter.named_parameters() if not n.startswith(("to_k.", "to_v.")))
    total = sum(p.numel() for p in adapter.parameters())
    unet = sum(p.numel() for p in host.unet.parameters())
    name = {"tiny": "tiny SD1.5 (tests' model)", "full": "full SD1.5 UNet"}[args.model]
    print(f"{name}: {unet / 1e6:.1f}M UNet parameters (frozen), {len(adapter.layer_widths)} cross-attention layers; "
          f"latent {lat}x{lat}, batch {b}, {args.tokens} tokens, on {device}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print(f"CLIP vision: ComfyUI ClipVisionModel, devkit/clip_vision.build_clip_vision({args.vision_width}): "
          f"width {vcfg['hidden_size']}, {vcfg['num_hidden_layers']} layers, {vcfg['image_size']} px, "
          f"{states.shape[1]} states, random weights (frozen)")
    print(f"adapter trainable parameters: {total:,} ({proj:,} projection + {total - proj:,} per-layer to_k/to_v); "
          f"float32 weights + grads + AdamW state = {16 * total / 2**20:.0f} MB")
    for arm in arms:
        print(f"{arm:>9}: " + ", ".join(f"{t:.3f}" for t in times[arm])
              + f" s/step, median {statistics.median(times[arm]):.3f}")
    ratio = statistics.median(e / s for e, s in zip(times["engine"], times["baseline"]))
    print(f"SUMMARY {name}, latent {lat}, batch {b}: engine {statistics.median(times['engine']):.3f} s/step, "
          f"baseline fwd+bwd {statistics.median(times['baseline']):.3f} s/step (medians of {args.steps}), "
          f"engine/baseline {ratio:.2f}x (median of interleaved pairs)")
    print("SUMMARY memory: " + ", ".join(f"peak {k} {v:.0f} MB" for k, v in memory.items())
          + f"; saved for backward: engine {saved['engine'] / 2**20:.2f} MB, baseline {saved['baseline'] / 2**20:.2f} MB")
    # CPU: the process peak (both arms) over the baseline's own peak, an upper bound of the engine's
    engine_mb, baseline_mb = ((memory["engine step"], memory["baseline step"]) if device.type == "cuda"
                              else (memory["process (both arms)"], memory["after baseline warm-up"]))
    print(f"SUMMARY memory engine/baseline: peak {engine_mb / baseline_mb:.3f}x ({engine_mb:.0f} / {baseline_mb:.0f} MB"
          f"{'' if device.type == 'cuda' else ', engine: the process peak with both arms'}), "
          f"saved for backward {saved['engine'] / saved['baseline']:.3f}x")
    return {"times": times, "ratio": ratio, "memory": memory, "saved": saved, "parameters": total}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--latent", type=int, default=32, help="latent size (32 = 256 px, 64 = 512 px)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--vision-width", type=int, default=1280, help="CLIP-vision width (1280 = ViT-H)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="timed interleaved rounds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per arm first")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench(args)


if __name__ == "__main__":
    main()
