"""Break-A-Scene against the OFFICIAL code (google/break-a-scene, commit b142cf2), same model, same
image and masks, same machine (issue 30). Not part of CI.

Like for like: both sides train two concepts of one 512 px image with prior preservation on (one
class image, weight 1; the official ``train.py`` cannot run without it: with
``--no_prior_preservation`` its attention loss indexes a prompt that is not there), union sampling,
masked diffusion loss, cross-attention loss at 16x16, float32 on the CPU, batch size 1.

* official: its ``train.py`` as published (phase 1: the text encoder's whole input-embedding matrix
  under AdamW, the other rows put back after each step; phase 2: the full UNet AND the full text
  encoder, lr 2e-6; the image VAE-encoded every step; every attention layer of at most 32x32
  queries stored), run in its own environment (``.cache/break-a-scene-env``: python 3.10,
  torch 1.13.1, diffusers 0.12.1, transformers 4.28.1, accelerate 0.19.0 as its environment.yml
  pins), with ONE change for the CPU in float32: its attention controller writes into the attention
  probabilities it is handed in place (``attn[h // 2:] = ...``), which autograd refuses when the
  probabilities are the softmax output itself (in fp16 on a GPU they are a cast copy); the bench
  hands it a copy (``attention_probs.clone()``) in a patched copy of train.py kept in the cache;
* pack: ``train_concepts`` (productscene.train.recipes.concepts) with its defaults except the step
  counts, phase 2 = LoRA (the default) and, as a third arm, the full UNet.

The model: a small SD2-style model from the dev kit (ComfyUI's own SD2 UNet class, 3 levels with
cross-attention at 64, 32 and 16 latent pixels, so 512 px has the 16x16 layers both sides use; a
3-layer text encoder of OpenCLIP-H's width, SD2's penultimate layer; the dev kit's small VAE),
seeded random weights. The bench writes the SAME weights as a diffusers model folder for the
official code (``.cache/break-a-scene-bench/model``): UNet and VAE converted from ComfyUI's
LDM keys with diffusers' converters, the text encoder's first two layers (what SD2's penultimate
layer computes), ComfyUI's CLIP tokenizer files, a DDPM scheduler with SD's betas (epsilon).

Each run is its own process (``OMP_NUM_THREADS=1``, one torch thread, as the tests run); the arms
alternate for ``--rounds`` rounds. Per phase: the median time of one optimizer step (from one
``optimizer.step`` / progress call to the next, so the data, VAE and text-encoder work of the step
are in), after ``--warmup`` steps; the process's peak resident set (ru_maxrss) at the end of
phase 1 and at the end of phase 2 (the official run is stopped right after its last step, before it
saves a pipeline). Medians over rounds.

    .venv/bin/python bench/bench_concepts_official.py --prepare          # env + code + model folder
    .venv/bin/python bench/bench_concepts_official.py --rounds 2 --steps 6 --warmup 2   # BENCHMARKS.md

The official code comes from ``--official-git`` (a git directory holding commit b142cf2), else a
clone of https://github.com/google/break-a-scene into ``.cache/break-a-scene/src``. The
environment is made with ``--python`` (default: a python3.10 on PATH or under ~/.pyenv).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMMIT = "b142cf2"
CACHE = REPO / ".cache"
ENV = CACHE / "break-a-scene-env"
CODE = CACHE / "break-a-scene" / COMMIT
WORK = CACHE / "break-a-scene-bench"
MODEL = WORK / "model-v1"
PINS = ["torch==1.13.1", "torchvision==0.14.1", "diffusers==0.12.1", "transformers==4.28.1", "accelerate==0.19.0",
        "datasets==2.12.0", "pyarrow==11.0.0", "huggingface_hub==0.15.1", "numpy==1.24.3", "pillow==9.5.0", "opencv-python-headless==4.7.0.72", "tqdm", "psutil"]
# the one change: hand the attention controller a copy of the probabilities (it writes into them)
PATCH = ("self.controller(attention_probs, is_cross, self.place_in_unet)",
         "self.controller(attention_probs.clone(), is_cross, self.place_in_unet)")
MODEL_CHANNELS, CHANNEL_MULT, CLIP_LAYERS, SEED = 64, (1, 2, 2), 3, 0
CLASS_PROMPT = "a photo of an object"


# ------------------------------------------------------------------------------- preparation
def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def official_code(git_dir: str | None) -> Path:
    if (CODE / "train.py").exists():
        return CODE
    CODE.parent.mkdir(parents=True, exist_ok=True)
    if git_dir is None:
        src = CODE.parent / "src"
        if not src.exists():
            run(["git", "clone", "--quiet", "https://github.com/google/break-a-scene", src])
        git_dir = str(src / ".git")
    tmp = CODE.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    archive = subprocess.run(["git", "--git-dir", git_dir, "archive", COMMIT, "train.py", "ptp_utils.py", "environment.yml", "LICENSE"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    text = (tmp / "train.py").read_text()
    if text.count(PATCH[0]) != 1:
        raise SystemExit(f"train.py at {COMMIT}: the attention-controller call to patch was not found once")
    (tmp / "train_cpu_fp32.py").write_text(text.replace(*PATCH))
    tmp.rename(CODE)
    return CODE


def find_python310(given: str | None) -> str:
    if given:
        return given
    for cand in [shutil.which("python3.10"), *sorted(Path.home().glob(".pyenv/versions/3.10*/bin/python"))]:
        if cand:
            return str(cand)
    raise SystemExit("no python 3.10 found (torch 1.13.1 has wheels up to 3.10); pass --python")


def official_env(python: str | None) -> Path:
    py = ENV / "bin" / "python"
    if (ENV / "READY").exists():
        return py
    run([find_python310(python), "-m", "venv", ENV])
    run([py, "-m", "pip", "install", "-q", *PINS])
    (ENV / "READY").write_text(subprocess.run([py, "-c", "import torch, diffusers, transformers, accelerate; print("
                                               "torch.__version__, diffusers.__version__, transformers.__version__, "
                                               "accelerate.__version__)"], check=True, capture_output=True,
                                              text=True).stdout)
    return py


def build_models():
    """The small SD2-style model (ComfyUI's classes, seeded): ``devkit.models.build``."""
    from devkit import comfy_env  # noqa: F401  (ComfyUI importable, CPU)
    from devkit.models import build
    return build("sd2", model_channels=MODEL_CHANNELS, channel_mult=CHANNEL_MULT, seed=SEED, clip_layers=CLIP_LAYERS)


def comfy_dir() -> Path:
    from devkit import comfy_env
    return Path(comfy_env.COMFYUI_DIR) / "comfy"


def write_model_folder(m) -> None:
    """The same weights as a diffusers model folder the official code loads (diffusers 0.12.1 names)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    tmp = MODEL.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    uc = m.unet_config
    levels = len(uc["channel_mult"])
    unet_params = dict(in_channels=4, out_channels=4, model_channels=uc["model_channels"],
                       channel_mult=list(uc["channel_mult"]), attention_resolutions=[2 ** i for i in range(levels)],
                       num_res_blocks=1, transformer_depth=1, context_dim=uc["context_dim"],
                       num_head_channels=uc["num_head_channels"], use_linear_in_transformer=True)
    vae_sd = m.vae.first_stage_model.state_dict()
    ddconfig = dict(ch=vae_sd["encoder.conv_in.weight"].shape[0], ch_mult=[1, 2, 2, 2], in_channels=3, out_ch=3,
                    z_channels=4, num_res_blocks=1)
    original = {"model": {"params": {"unet_config": {"params": unet_params},
                                     "first_stage_config": {"params": {"ddconfig": ddconfig}},
                                     "scale_factor": 0.18215}}}
    ldm = {"model.diffusion_model." + k: v for k, v in m.model.model.diffusion_model.state_dict().items()}
    ucfg = sfu.create_unet_diffusers_config_from_ldm(original, ldm, image_size=512)
    ucfg.pop("transformer_layers_per_block", None)
    for k in ("class_embed_type", "addition_embed_type", "addition_time_embed_dim",
              "projection_class_embeddings_input_dim"):
        ucfg.pop(k, None)
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(ldm, unet.config), strict=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=False)
    vldm = {"first_stage_model." + k: v for k, v in vae_sd.items()}
    vcfg = sfu.create_vae_diffusers_config_from_ldm(original, vldm, image_size=512)
    vae = AutoencoderKL(**vcfg)
    vconv = sfu.convert_ldm_vae_checkpoint(vldm, vae.config)
    vae.load_state_dict(vconv, strict=True)
    vae.save_config(tmp / "vae")
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}  # diffusers 0.12 VAE attention
    renamed = {}
    for k, v in vconv.items():
        for new, old in old_names.items():
            if ".attentions.0." + new + "." in k:
                k = k.replace(".attentions.0." + new + ".", ".attentions.0." + old + ".")
        renamed[k] = v.contiguous()
    torch.save(renamed, tmp / "vae" / "diffusion_pytorch_model.bin")
    # text encoder: SD2 takes the penultimate layer (+ final norm): the first CLIP_LAYERS - 1 layers
    te_cfg = json.loads((comfy_dir() / "text_encoders" / "sd2_clip_config.json").read_text())
    te_cfg.update(num_hidden_layers=CLIP_LAYERS - 1, intermediate_size=te_cfg["hidden_size"],
                  projection_dim=te_cfg["hidden_size"])
    te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in te_cfg.items() if k not in ("architectures", "torch_dtype")}))
    sd = {}
    for k, v in m.clip.cond_stage_model.state_dict().items():
        if not k.startswith("clip_h.transformer.text_model."):
            continue
        k = k[len("clip_h.transformer."):]
        if ".encoder.layers." in k and int(k.split(".encoder.layers.")[1].split(".")[0]) >= CLIP_LAYERS - 1:
            continue
        sd[k] = v
    missing, unexpected = te.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise SystemExit(f"text encoder: missing {missing}, unexpected {unexpected}")
    te.save_pretrained(tmp / "text_encoder", safe_serialization=False)
    tok = comfy_dir() / "sd1_tokenizer"
    shutil.copytree(tok, tmp / "tokenizer")
    tcfg = json.loads((tmp / "tokenizer" / "tokenizer_config.json").read_text())
    tcfg["model_max_length"] = 77  # CLIP's context (ComfyUI's copy says more: it chunks long prompts itself)
    (tmp / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "trained_betas": None, "variance_type": "fixed_small"}))
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}))
    shutil.rmtree(MODEL, ignore_errors=True)
    tmp.rename(MODEL)


def scene_arrays():
    """The 512 px image (two shapes on grey), its two masks and one class image (uint8 arrays)."""
    import numpy as np
    s = 512
    yy, xx = np.mgrid[:s, :s]
    img = np.full((s, s, 3), 140, np.uint8)
    square = (yy >= 64) & (yy < 224) & (xx >= 64) & (xx < 224)
    disc = (yy - 352) ** 2 + (xx - 352) ** 2 < 96 ** 2
    img[square] = (230, 40, 25)
    img[disc] = (25, 60, 230)
    cls = np.full((s, s, 3), 120, np.uint8)
    cls[(yy - 256) ** 2 + (xx - 256) ** 2 < 120 ** 2] = (200, 180, 60)
    return img, [square.astype(np.uint8) * 255, disc.astype(np.uint8) * 255], cls


def write_scene() -> tuple[Path, Path]:
    from PIL import Image
    img, masks, cls = scene_arrays()
    inst, klass = WORK / "instance", WORK / "class"
    for d in (inst, klass):
        d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(inst / "img.jpg", quality=95)
    for i, m in enumerate(masks):
        Image.fromarray(m).save(inst / f"mask{i}.png")
    Image.fromarray(cls).save(klass / "class0.png")
    return inst, klass


def prepare(args):
    official_code(args.official_git)
    py = official_env(args.python)
    if not (MODEL / "model_index.json").exists():
        write_model_folder(build_models())
    write_scene()
    print("official environment:", (ENV / "READY").read_text().strip(), "at", py)
    return py


# ------------------------------------------------------------------------------- arms
OFFICIAL_DRIVER = r'''
import json, os, resource, sys, time
import torch
torch.set_num_threads(1)
n1, n2 = int(os.environ["BAS_STEPS1"]), int(os.environ["BAS_STEPS2"])
stamps, cpu, marks = [time.perf_counter()], [time.process_time()], {}
orig = torch.optim.AdamW.step
def step(self, *a, **k):
    out = orig(self, *a, **k)
    stamps.append(time.perf_counter())
    cpu.append(time.process_time())
    n = len(stamps) - 1
    if n == n1:
        marks["rss1_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if n == n1 + n2:
        marks["rss2_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        marks["steps"] = [b - a for a, b in zip(stamps, stamps[1:])]
        marks["cpu"] = [b - a for a, b in zip(cpu, cpu[1:])]
        print("RESULT " + json.dumps(marks), flush=True)
        sys.stdout.flush()
        os._exit(0)
    return out
torch.optim.AdamW.step = step
sys.argv = [os.environ["BAS_TRAIN"]] + json.loads(os.environ["BAS_ARGS"])
sys.path.insert(0, os.path.dirname(os.environ["BAS_TRAIN"]))
import train_cpu_fp32  # the patched train.py; its main guard does not run on import
train_cpu_fp32.SpatialDreambooth()  # what its "__main__" block does
'''


def official_arm(py, steps1, steps2, out_dir):
    inst, klass = WORK / "instance", WORK / "class"
    argv = ["--pretrained_model_name_or_path", str(MODEL), "--instance_data_dir", str(inst),
            "--num_of_assets", "2", "--initializer_tokens", "object", "object", "--class_data_dir", str(klass),
            "--class_prompt", CLASS_PROMPT, "--num_class_images", "1", "--phase1_train_steps", str(steps1),
            "--phase2_train_steps", str(steps2), "--output_dir", str(out_dir), "--mixed_precision", "no",
            "--report_to", "all", "--seed", "0", "--resolution", "512"]
    env = dict(os.environ, BAS_STEPS1=str(steps1), BAS_STEPS2=str(steps2), BAS_TRAIN=str(CODE / "train_cpu_fp32.py"),
               BAS_ARGS=json.dumps(argv), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    done = subprocess.run([str(py), "-c", OFFICIAL_DRIVER], capture_output=True, text=True, env=env, cwd=str(CODE))
    return parse(done, "official")


def pack_arm(unet: str, steps1: int, steps2: int) -> dict:
    """(in this process) the pack's run on the same model: per-step times and peak RSS per phase."""
    import resource
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from devkit.comfy_env import import_pack
    from productscene.train.recipes.concepts import ConceptConfig, train_concepts
    import tempfile
    pack = import_pack()
    m = build_models()
    img, masks, cls = scene_arrays()
    image = torch.from_numpy(img).float()[None] / 255
    mask = torch.from_numpy(np.stack(masks)).float() / 255
    class_images = torch.from_numpy(cls).float()[None] / 255
    host = pack.nodes.training_host.ComfyTrainingHost(m.model, m.clip, m.vae)
    cfg = ConceptConfig(phase1_steps=steps1, phase2_steps=steps2, unet=unet, init_words=("object", "object"),
                        prior_weight=1.0, class_prompt=CLASS_PROMPT)
    stamps, cpu, marks = [time.perf_counter()], [time.process_time()], {}
    marks["rss0_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # models built, nothing trained
    marks["params"] = {"unet": sum(p.numel() for p in m.model.model.diffusion_model.parameters()),
                       "text": sum(p.numel() for p in m.clip.cond_stage_model.parameters()),
                       "vae": sum(p.numel() for p in m.vae.first_stage_model.parameters())}

    def progress(step, total, loss):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        if step == steps1:
            marks["rss1_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as d:
        train_concepts(host, image, mask, Path(d) / "c.safetensors", cfg, class_images=class_images, seed=0,
                       progress=progress)
    marks["rss2_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    marks["steps"] = [b - a for a, b in zip(stamps, stamps[1:])]
    marks["cpu"] = [b - a for a, b in zip(cpu, cpu[1:])]
    return marks


def parse(done, arm):
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not line:
        print(done.stdout[-3000:], done.stderr[-6000:], file=sys.stderr)
        raise SystemExit(f"{arm} arm failed (exit {done.returncode})")
    return json.loads(line[-1][7:])


def summary(r, steps1, warmup):
    s, c = r["steps"], r["cpu"]
    return {"p1_s": statistics.median(s[warmup:steps1]), "p2_s": statistics.median(s[steps1 + warmup:]),
            "p1_cpu": statistics.median(c[warmup:steps1]), "p2_cpu": statistics.median(c[steps1 + warmup:]),
            "p1_mb": r["rss1_mb"], "p2_mb": r["rss2_mb"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", action="store_true", help="make the environment, code copy and model folder, then stop")
    ap.add_argument("--official-git", default=None, help="a git directory holding google/break-a-scene")
    ap.add_argument("--python", default=None, help="python 3.10 for the official environment")
    ap.add_argument("--steps", type=int, default=12, help="steps per phase (both sides)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps of each phase left out of the median")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arms", default="official,lora,full")
    ap.add_argument("--arm", choices=["lora", "full"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        print("RESULT " + json.dumps(pack_arm(args.arm, args.steps, args.steps)), flush=True)
        return
    py = prepare(args)
    if args.prepare:
        return
    arms = args.arms.split(",")
    results = {a: [] for a in arms}
    for rnd in range(args.rounds):
        for arm in arms:
            if arm == "official":
                r = official_arm(py, args.steps, args.steps, WORK / "out")
            else:
                cmd = [sys.executable, __file__, "--arm", arm, "--steps", str(args.steps)]
                r = parse(subprocess.run(cmd, capture_output=True, text=True,
                                         env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")), arm)
            s = summary(r, args.steps, args.warmup)
            if "rss0_mb" in r:
                print(f"round {rnd + 1} {arm:>8}: {r['rss0_mb']:.0f} MB before training (ComfyUI, torch, the models: "
                      f"{r['params']})", flush=True)
            results[arm].append(s)
            print(f"round {rnd + 1} {arm:>8}: phase 1 {s['p1_s']:.3f} s/step ({s['p1_cpu']:.3f} CPU s), peak "
                  f"{s['p1_mb']:.0f} MB; phase 2 {s['p2_s']:.3f} s/step ({s['p2_cpu']:.3f} CPU s), peak "
                  f"{s['p2_mb']:.0f} MB", flush=True)
    med = {a: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for a, rs in results.items()}
    print("MEDIANS " + json.dumps(med))
    if "official" in med:
        o = med["official"]
        for a in arms:
            if a != "official":
                p = med[a]
                print(f"pack ({a}) / official: phase 1 time {p['p1_s'] / o['p1_s']:.2f}x (CPU time "
                      f"{p['p1_cpu'] / o['p1_cpu']:.2f}x), memory {p['p1_mb'] / o['p1_mb']:.2f}x; phase 2 time "
                      f"{p['p2_s'] / o['p2_s']:.2f}x (CPU time {p['p2_cpu'] / o['p2_cpu']:.2f}x), memory "
                      f"{p['p2_mb'] / o['p2_mb']:.2f}x" + ("  (bars: time <= 0.6x, memory <= 0.85x)" if a == "lora" else ""))


if __name__ == "__main__":
    main()
