"""Break-A-Scene step benchmark: our Multi-Concept Inversion (phase 2: tokens + LoRA, the heavier
phase, through ``train_concepts`` on the engine) against a faithful baseline of the published
implementation's behaviour on the same model and steps:

* baseline: attention probabilities computed explicitly and STORED for every attention layer (self
  and cross, as its AttentionStore does) for the step; the full UNet and the full text encoder
  trained in float32 with AdamW (lr 2e-6); the image VAE-encoded on every step; the same losses
  (masked diffusion loss + cross-attention loss on the lowest-resolution cross-attention maps);
* ours: the image encoded once, a LoRA (rank 4) + the token vectors trained, only the drawn tokens'
  columns of the lowest-resolution cross-attention layers captured, autocast as the node runs it
  ("auto": bf16 on CUDA, off on the CPU).

Model: ComfyUI's full SD1.5 UNet (860M parameters) and a text encoder of CLIP-L's shape (12 layers),
seeded random weights (devkit/models.py); both arms the same. Each arm runs in its own
process (peak memory is per process: CPU peak resident set, ru_maxrss; CUDA max_memory_allocated),
the arms alternate, and the script prints medians and ratios.

    python bench/bench_concepts.py                       # CPU, 32x32 latent (256 px)
    PRODUCTSCENE_COMFY_GPU=1 python bench/bench_concepts.py --latent 64   # GPU, 512 px
    python bench/bench_concepts.py --no-baseline-optimizer   # see below

``--no-baseline-optimizer``: the baseline's AdamW state for 980M float32 parameters is 7.8 GB and
its gradients 3.9 GB more; on a shared 24 GB machine that can starve other processes. With this flag
the baseline runs forward + backward (gradients for every weight kept) but no optimizer step, and
its AdamW state (exactly 2 x 4 bytes per trained parameter, what torch allocates on the first step)
is added to its measured peak; its step time then lacks the optimizer update (favouring the baseline).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def peak_mb(device) -> float:
    from bench_train import peak_mb as peak
    return peak(device)


def sync(device):
    from bench_train import sync as synchronize
    synchronize(device)


def models():
    from devkit.models import build_clip, build_vae, full_sd15_unet
    return full_sd15_unet(), build_clip("sd15", layers=12), build_vae()


def scene(latent: int):
    import torch
    s = latent * 8
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, s, s, 3, generator=g)
    masks = torch.zeros(2, s, s)
    masks[0, s // 8: s // 2, s // 8: s // 2] = 1
    masks[1, s // 2: 7 * s // 8, s // 3: 7 * s // 8] = 1
    return image, masks


def run_ours(latent: int, steps: int, warmup: int) -> dict:
    import torch
    from devkit import comfy_env
    pack = comfy_env.import_pack()
    from productscene.train.recipes.concepts import ConceptConfig, train_concepts
    model, clip, vae = models()
    host = pack.nodes.training_host.ComfyTrainingHost(model, clip, vae)
    image, masks = scene(latent)
    stamps = []

    def progress(step, total, loss):
        sync(host.device)
        stamps.append(time.perf_counter())

    cfg = ConceptConfig(resolution=0, phase1_steps=0, phase2_steps=warmup + steps + 1)
    start = time.perf_counter()
    train_concepts(host, image, masks, os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench_concepts.safetensors"),
                   cfg, progress=progress, autocast="auto", overwrite=True)  # every round writes the same file
    times = [b - a for a, b in zip([start] + stamps, stamps)][warmup + 1:]
    return {"step_s": statistics.median(times), "peak_mb": peak_mb(host.device), "device": str(host.device)}


def run_baseline(latent: int, steps: int, warmup: int, optimizer: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from devkit import comfy_env
    pack = comfy_env.import_pack()
    import comfy.ldm.modules.attention as attention
    import comfy.model_management as mm
    from productscene.train.losses import attention_loss, masked_diffusion_loss
    th = pack.nodes.training_host
    model, clip, vae = models()
    device = mm.get_torch_device()
    base = model.model.to(device)
    unet = base.diffusion_model
    te = clip.cond_stage_model.to(device)
    params = [p for p in list(unet.parameters()) + list(te.parameters()) if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=2e-6, weight_decay=1e-2) if optimizer else None
    image, masks = scene(latent)
    store: list = []  # every layer's probabilities, kept for the step (the published AttentionStore)

    def storing_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kw):
        b, nq, inner = q.shape
        d = inner // heads
        qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        probs = (qh @ kh.transpose(-1, -2) * d ** -0.5).softmax(-1)
        store.append(probs)
        return (probs @ vh).transpose(1, 2).reshape(b, nq, inner)

    g = torch.Generator().manual_seed(0)
    tokens = clip.tokenize("a photo of sks and olis")
    rows = (4, 6)  # "a photo of sks and olis": the two new tokens' positions (after the start token)
    low = -(-latent // 4)  # SD1.5's lowest cross-attention layers: latent / 4 (16x16 at 512 px)
    times = []
    old = attention.optimized_attention
    attention.optimized_attention = storing_attention
    try:
        with torch.inference_mode(False), torch.enable_grad(), th.differentiable_clip(clip):
            for i in range(warmup + steps):
                sync(device)
                t0 = time.perf_counter()
                flip = bool(torch.rand(1, generator=g) < 0.5)
                img = image.flip(2) if flip else image
                with torch.no_grad():  # the published loop encodes the image on every step
                    lat = base.process_latent_in(vae.encode(img).float()).to(device)
                m = (masks.flip(-1) if flip else masks).to(device)
                noise = torch.randn(lat.shape, generator=g).to(device)
                t = torch.randint(0, 1000, (1,), generator=g)
                sigma = base.model_sampling.sigma(t.float()).to(device)
                x = base.model_sampling.noise_scaling(sigma, noise, lat)
                cond = clip.encode_from_tokens(tokens).to(device)
                denoised = base.apply_model(x, sigma, c_crossattn=cond)
                pred = (x - denoised) / sigma.reshape(-1, 1, 1, 1)
                union = m.amax(0, keepdim=True)
                loss = masked_diffusion_loss(pred, noise, union)
                cross = [p for p in store if p.shape[-1] == cond.shape[1] and p.shape[-2] == low * low]
                agg = torch.stack([p.mean(1) for p in cross]).mean(0)[0]  # [Nq, 77]
                maps = {f"t{j}": agg[:, r].reshape(1, low, low) for j, r in enumerate(rows)}
                loss = loss + attention_loss(maps, {f"t{j}": m[j:j + 1] for j in range(2)}, 0.01)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=False)
                else:
                    for p in params:  # keep the gradients allocated, as zero_grad(set_to_none=False)
                        if p.grad is not None:
                            p.grad.zero_()
                store.clear()
                sync(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        attention.optimized_attention = old
    peak = peak_mb(device)
    if opt is None:
        peak += 2 * sum(p.numel() * p.element_size() for p in params) / 2**20
    return {"step_s": statistics.median(times), "peak_mb": peak, "device": str(device),
            "optimizer": "measured" if opt is not None else "AdamW state added (2 x params)"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=32, help="latent size (32 = 256 px, 64 = 512 px)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of (ours, baseline)")
    ap.add_argument("--no-baseline-optimizer", action="store_true")
    ap.add_argument("--arm", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        from devkit import comfy_env  # noqa: F401  (ComfyUI importable; CPU unless PRODUCTSCENE_COMFY_GPU=1)
        import torch
        # one thread by default, as in the tests: on a shared 2-core machine two threads per process make
        # every op wait for scheduler slices (measured here: 55 s/step for both arms with 2, 5-11 s with 1)
        torch.set_num_threads(int(os.environ.get("PRODUCTSCENE_TORCH_THREADS", "1")))
        out = (run_ours(args.latent, args.steps, args.warmup) if args.arm == "ours"
               else run_baseline(args.latent, args.steps, args.warmup, not args.no_baseline_optimizer))
        print("RESULT " + json.dumps(out), flush=True)
        return
    results = {"ours": [], "baseline": []}
    for _ in range(args.rounds):
        for arm in ("ours", "baseline"):
            cmd = [sys.executable, __file__, "--arm", arm, "--latent", str(args.latent), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)] + (["--no-baseline-optimizer"] if args.no_baseline_optimizer else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if done.returncode or not line:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{arm} arm failed (exit {done.returncode})")
            r = json.loads(line[-1][7:])
            results[arm].append(r)
            print(f"{arm:>8}: {r['step_s']:.3f} s/step, peak {r['peak_mb']:.0f} MB on {r['device']}"
                  + (f" ({r['optimizer']})" if "optimizer" in r else ""), flush=True)
    ours_t = statistics.median(r["step_s"] for r in results["ours"])
    base_t = statistics.median(r["step_s"] for r in results["baseline"])
    ours_m = max(r["peak_mb"] for r in results["ours"])
    base_m = max(r["peak_mb"] for r in results["baseline"])
    print(f"full SD1.5 UNet, latent {args.latent}x{args.latent}, phase 2: step time ours/baseline "
          f"{ours_t / base_t:.2f}x (bar <= 0.7), peak memory ours/baseline {ours_m / base_m:.2f}x (bar <= 0.5)")


if __name__ == "__main__":
    main()
