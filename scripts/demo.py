"""ProductScene demo: new category backgrounds for the sample products through a real ComfyUI.

    bash scripts/demo.sh [--checkpoint PATH] [--server URL] [--out DIR] [--steps N] [--size PX]

Starts ComfyUI headless on loopback with this pack installed (unless ``--server`` points at a
running one), uploads every product of ``samples/products/``, runs the bundled API workflow
``workflows/api/category_background.json`` once per product with the product's category from
``samples/products/manifest.json`` (as a job of the batch client, productscene/batch.py), and
writes ``<out>/<product>.png``, ``<out>/provenance.jsonl`` and ``<out>/contact_sheet.png``
(input | product mask | result, one row per product). Then it runs the brand-style workflow
``workflows/api/category_brand_background.json`` on the same products, each with a sample brand
reference image (``samples/references/``), into ``<out>/brand/``, and adds those results to the
contact sheet (brand reference | category + brand style).

``--checkpoint`` may also be a Flux.1 or Z-Image diffusion model (what ComfyUI's UNETLoader loads):
the demo reads the file's keys (no model loads) and runs that family's workflow
(``workflows/api/category_background_flux.json`` / ``category_background_z_image.json``) with
``--text-encoder`` (clip_l + t5xxl for Flux, qwen_3_4b for Z-Image), ``--vae`` (ae.safetensors) and a
``--library`` built for the family, at the family's sampler settings (:data:`FAMILY_SETTINGS`).

With no ``--checkpoint`` it builds (once, cached in ``.cache/productscene``) and uses the embedded
default model: a reduced SD1.5-architecture checkpoint with random weights, a random-weight CLIP vision
model and an untrained personality adapter. See ``DEFAULT_NOTICE``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from devkit import default_model  # noqa: E402
from productscene.batch import PROVENANCE_NAME, BatchRun, Options, Row, check_job, read_provenance  # noqa: E402
from productscene.batch.fidelity import ProductPixels  # noqa: E402
from productscene.client import ComfyClient  # noqa: E402
from productscene.errors import ProductSceneError  # noqa: E402
from productscene.files import read_header  # noqa: E402

WORKFLOW = ROOT / "workflows" / "api" / "category_background.json"
BRAND_WORKFLOW = ROOT / "workflows" / "api" / "category_brand_background.json"
SAMPLES = ROOT / "samples" / "products"
# the category-background workflow of each base family (family_of_model_file tells them apart)
FAMILY_WORKFLOWS = {"sd": WORKFLOW,
                    "flux": ROOT / "workflows" / "api" / "category_background_flux.json",
                    "flux_schnell": ROOT / "workflows" / "api" / "category_background_flux.json",
                    "z_image": ROOT / "workflows" / "api" / "category_background_z_image.json"}
# default sampler settings per family (the workflows' own; Flux.1 [schnell]: 4 steps, no guidance)
FAMILY_SETTINGS = {"sd": {"steps": 20, "cfg": 7.0}, "flux": {"steps": 20, "cfg": 1.0},
                   "flux_schnell": {"steps": 4, "cfg": 1.0}, "z_image": {"steps": 8, "cfg": 1.0}}
# the text encoder files each DiT family's loader node takes, by node title and input
TEXT_ENCODER_INPUTS = {"flux": ("Text encoders.clip_name1", "Text encoders.clip_name2"),
                       "flux_schnell": ("Text encoders.clip_name1", "Text encoders.clip_name2"),
                       "z_image": ("Text encoder.clip_name",)}
REFERENCES = ROOT / "samples" / "references"

DEFAULT_NOTICE = """\
--------------------------------------------------------------------------------------------
No --checkpoint given: using ProductScene's embedded DEFAULT MODEL.
  What it is: a reduced SD1.5-architecture checkpoint (ComfyUI's real SD1.5 UNet class with
  fewer levels, the standard CLIP-L text encoder and SD VAE) with SEEDED RANDOM WEIGHTS, built
  on this machine and cached in .cache/productscene/. Its category library is UNTRAINED (each
  category's identifier is the model's own token embedding of the category word). The brand
  run uses a random-weight CLIP vision model (ViT-L/14 shape) and an UNTRAINED personality adapter.
  What it proves: the whole pipeline runs in a real ComfyUI (product mask, category tokens,
  masked category attention, background-only inpainting, exact composite) and the product
  pixels come back bit-identical.
  What it is NOT: it draws no meaningful background - expect coloured noise around the product.
  For real backgrounds: --checkpoint /path/to/an-sd15-checkpoint.safetensors (and a trained
  category library: --library PATH; for the brand run, --clip-vision PATH and a personality
  adapter trained for them: --adapter PATH).
--------------------------------------------------------------------------------------------"""


class DemoError(RuntimeError):
    """A problem the user can fix; printed without a traceback."""


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# inputs
def load_manifest() -> list[dict]:
    try:
        data = json.loads((SAMPLES / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise DemoError(f"cannot read {SAMPLES / 'manifest.json'}: {e}") from None
    items = data.get("products", []) if isinstance(data, dict) else data
    out = []
    for it in items:
        path = SAMPLES / it["file"]
        if not path.is_file():
            raise DemoError(f"sample product {path} listed in the manifest is missing")
        out.append({"file": it["file"], "path": path, "category": it["category"],
                     "name": Path(it["file"]).stem})
    if not out:
        raise DemoError("the samples manifest lists no products")
    return out


def load_references() -> list[Path]:
    """The sample brand reference images (samples/references/manifest.json)."""
    try:
        items = json.loads((REFERENCES / "manifest.json").read_text())["references"]
    except (OSError, ValueError, KeyError) as e:
        raise DemoError(f"cannot read {REFERENCES / 'manifest.json'}: {e}") from None
    paths = [REFERENCES / it["file"] for it in items]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise DemoError(f"sample brand references missing: {', '.join(missing) or 'none listed'}")
    return paths


def prepare_image(src: Path, size: int, dst: Path) -> Image.Image:
    """RGBA copy of ``src`` whose longest side is ``size`` (both sides multiples of 16, which the
    default model's UNet needs); ``size`` 0 keeps the size (rounded down to multiples of 16)."""
    im = Image.open(src).convert("RGBA")
    w, h = im.size
    scale = (size / max(w, h)) if size else 1.0
    nw, nh = max(16, int(round(w * scale / 16)) * 16), max(16, int(round(h * scale / 16)) * 16)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    im.save(dst)
    return im


def is_safetensors_sd15(path: Path) -> tuple[bool, str]:
    """(is an SD1.5 checkpoint with text encoder and VAE, token-embedding key) from the header."""
    try:
        _, index = read_header(path)
    except ProductSceneError as e:
        raise DemoError(f"--checkpoint {e}") from None
    keys = set(index)
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise DemoError(f"--checkpoint {path}: no UNet weights (model.diffusion_model.*); "
                        f"give a full checkpoint (UNet + text encoder + VAE)")
    if not any(k.startswith("first_stage_model.") for k in keys):
        raise DemoError(f"--checkpoint {path}: no VAE weights (first_stage_model.*)")
    for k in (default_model.TOKEN_EMBEDDING_KEY, "cond_stage_model.transformer.embeddings.token_embedding.weight"):
        if k in keys:
            return index[k][1][-1] == 768, k
    return False, ""


def family_of_keys(shapes: dict) -> str | None:
    """The base family of a model file from its tensor names and shapes (``{name: shape}``), the
    way ComfyUI's detection tells them apart: ``"sd"`` (a UNet checkpoint), ``"flux"`` (Flux.1
    [dev]: guidance embedding), ``"flux_schnell"``, ``"z_image"`` (Lumina 2 layout with Z-Image's
    caption pad token), or None. Diffusion-model files may carry ComfyUI's checkpoint prefix."""
    prefix = "model.diffusion_model."
    keys = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in shapes.items()}
    if "input_blocks.0.0.weight" in keys:
        return "sd"
    if "double_blocks.0.img_attn.norm.key_norm.scale" in keys and "img_in.weight" in keys:
        if "double_stream_modulation_img.lin.weight" in keys:
            return None  # Flux.2: not a Flux.1 workflow
        return "flux" if "guidance_in.in_layer.weight" in keys else "flux_schnell"
    if "cap_embedder.1.weight" in keys and "cap_pad_token" in keys:
        return "z_image"
    return None


def family_of_model_file(path: Path) -> str:
    """:func:`family_of_keys` of a safetensors file (its header only); DemoError when unknown."""
    try:
        _, index = read_header(path)
    except ProductSceneError as e:
        raise DemoError(f"--checkpoint {e}") from None
    family = family_of_keys({k: v[1] for k, v in index.items()})
    if family is None:
        raise DemoError(f"--checkpoint {path}: neither an SD checkpoint nor a Flux.1 or Z-Image diffusion model "
                        "(by its weight names)")
    if family != "sd" and any(k.startswith(("text_encoders.", "cond_stage_model.", "vae.", "first_stage_model."))
                              for k in index):
        raise DemoError(f"--checkpoint {path}: a {family} checkpoint with its text encoder and VAE inside; the "
                        f"demo's {family} workflow loads the diffusion model, text encoders and VAE as separate "
                        "files (UNETLoader, CLIPLoader, VAELoader): give those")
    return family


def library_for_checkpoint(ckpt: Path, words: dict[str, str]) -> Path:
    """An UNTRAINED library for a user's SD1.5 checkpoint: its own token embedding of each
    category word (cached by checkpoint path, size and mtime)."""
    import hashlib
    if ckpt.suffix.lower() != ".safetensors":
        raise DemoError(f"--checkpoint {ckpt}: the demo reads token embeddings only from .safetensors files; "
                        f"give a category library made for this model with --library PATH")
    ok, key = is_safetensors_sd15(ckpt)
    if not ok:
        raise DemoError(f"--checkpoint {ckpt}: not an SD1.5 checkpoint with a CLIP-L text encoder; "
                        f"the demo's untrained library needs one. Give a category library made for "
                        f"this model with --library PATH")
    st = ckpt.stat()
    tag = hashlib.sha256(f"{ckpt.resolve()}|{st.st_size}|{st.st_mtime_ns}|{sorted(words.items())}".encode()).hexdigest()[:12]
    out = default_model.CACHE_DIR / f"untrained-categories-{tag}.safetensors"
    if out.is_file():
        return out
    return default_model.write_untrained_library(
        out, ckpt, words, key=key,
        created_by={"by": "scripts/demo.py", "note": f"UNTRAINED: token embeddings of the category words "
                                                      f"from {ckpt.name}"})


def check_url(url: str) -> None:
    try:
        ComfyClient(url, timeout=10).system_stats()
    except ProductSceneError as e:
        raise DemoError(f"--server {url}: no ComfyUI answers there ({e}); start ComfyUI or leave "
                        f"--server out to let the demo start its own") from None


# ----------------------------------------------------------------------------------------------
# results
def _checker(size, cell=8) -> Image.Image:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    c = (((yy // cell) + (xx // cell)) % 2) * 40 + 190
    return Image.fromarray(np.stack([c, c, c], -1).astype(np.uint8))


def contact_sheet(rows: list[dict], path: Path, cell: int = 256) -> None:
    """One row per product: input | product mask | category result, and, where the brand run
    happened, brand reference | category + brand result."""
    font = ImageFont.load_default()
    label_h, pad = 22, 8
    cols = ["input", "product mask", "category background"]
    if any("brand" in r for r in rows):
        cols += ["brand reference", "category + brand style"]
    W = pad + len(cols) * (cell + pad)
    H = label_h + pad + len(rows) * (cell + label_h + pad)
    sheet = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, c in enumerate(cols):
        draw.text((pad + j * (cell + pad), 4), c, fill=(0, 0, 0), font=font)
    for i, r in enumerate(rows):
        y = label_h + pad + i * (cell + label_h + pad)
        draw.text((pad, y), f"{r['name']}  [{r['category']}]  {r['note']}", fill=(0, 0, 0), font=font)
        inp = r["input"]
        shown = _checker(inp.size)
        shown.paste(inp, (0, 0), inp)
        alpha = inp.getchannel("A")
        mask = alpha.point(lambda v: 255 if v == 255 else (128 if v > 0 else 0)).convert("RGB")
        tiles = [shown, mask, r["result"].convert("RGB")]
        if "brand" in r:
            tiles += [r["reference"].convert("RGB"), r["brand"].convert("RGB")]
        for j, im in enumerate(tiles):
            im = im.copy()
            im.thumbnail((cell, cell), Image.LANCZOS)
            sheet.paste(im, (pad + j * (cell + pad) + (cell - im.width) // 2,
                             y + label_h + (cell - im.height) // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


# ----------------------------------------------------------------------------------------------
def _model_file(value: str | None, what: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser().absolute()
    if not path.is_file():
        raise DemoError(f"--{what} {value}: no such file")
    return path


def run(args) -> int:
    t_start = time.time()
    products = load_manifest()
    references = load_references()
    words = default_model.sample_category_words()
    out_dir = Path(args.out).resolve()
    brand_skipped = ("no brand-style run: give --clip-vision and --adapter (a CLIP vision model and a personality "
                     "adapter trained for this checkpoint and that model) to run workflows/api/"
                     "category_brand_background.json as well")

    # the model, library, CLIP vision model and personality adapter
    cv_file = adapter_file = None
    if args.server:
        check_url(args.server)
        if args.checkpoint is None or args.library is None:
            raise DemoError("with --server give --checkpoint NAME and --library NAME as the server lists them "
                            "(its models/checkpoints and models/category_libraries): the demo cannot copy "
                            "files into another ComfyUI")
        ckpt_file = lib_file = None
        names = {"checkpoint": args.checkpoint, "library": args.library,
                 "clip_vision": args.clip_vision, "adapter": args.adapter}
    else:
        if args.checkpoint is None:
            log(DEFAULT_NOTICE)
            t0 = time.time()
            ckpt_file, lib_file = default_model.ensure_defaults()
            cv_file, adapter_file = default_model.ensure_reference_defaults(ckpt_file)
            log(f"default model ready in {time.time() - t0:.1f} s: {ckpt_file}")
        else:
            ckpt_file = _model_file(args.checkpoint, "checkpoint")
            if args.family != "sd":
                return _run_dit(args, ckpt_file, products, references, out_dir, t_start)
            if ckpt_file.suffix.lower() == ".safetensors":
                is_safetensors_sd15(ckpt_file)   # clear error for files that are no checkpoint
            if args.library:
                lib_file = _model_file(args.library, "library")
            else:
                lib_file = library_for_checkpoint(ckpt_file, words)
                log(f"no --library: using an UNTRAINED library made from {ckpt_file.name}'s own token "
                    f"embeddings of the category words ({lib_file.name}); a trained library gives the "
                    f"real category styles")
            cv_file, adapter_file = _model_file(args.clip_vision, "clip-vision"), _model_file(args.adapter, "adapter")
        names = {"checkpoint": ckpt_file.name, "library": lib_file.name,
                 "clip_vision": cv_file.name if cv_file else None, "adapter": adapter_file.name if adapter_file else None}
    if (names["clip_vision"] is None) != (names["adapter"] is None):
        raise DemoError("give --clip-vision and --adapter together (the adapter was trained with that CLIP vision model)")
    if names["adapter"] is None:
        log(brand_skipped)

    if args.server:
        return _run_with(args.server, args, products, references, names, out_dir, t_start)
    from devkit.launcher import ComfyServer
    log("starting ComfyUI headless on loopback (" + ("a GPU where torch finds one" if args.gpu else "CPU; --gpu lets it use a GPU") + ") ...")
    t0 = time.time()
    models = {"checkpoints": [ckpt_file], "category_libraries": [lib_file]}
    if adapter_file is not None:
        models.update(clip_vision=[cv_file], personality_adapters=[adapter_file])
    try:
        server = ComfyServer(default_model.COMFYUI_DIR, models=models, cpu=None if args.gpu else True)
        server.start()
    except ProductSceneError as e:
        raise DemoError(f"ComfyUI could not be started: {e}") from None
    try:
        log(f"ComfyUI ready at {server.url} in {time.time() - t0:.1f} s")
        return _run_with(server.url, args, products, references, names, out_dir, t_start)
    except BaseException:
        log("last lines of the ComfyUI log:")
        log(server.log_tail(40))
        raise
    finally:
        server.stop()


def _run_dit(args, model_file: Path, products, references, out_dir: Path, t_start: float) -> int:
    """A Flux.1 or Z-Image diffusion model: that family's workflow, its text encoders, VAE and library."""
    family = args.family
    want = len(TEXT_ENCODER_INPUTS[family])
    encoders = [_model_file(f, "text-encoder") for f in args.text_encoder or []]
    if len(encoders) != want or args.vae is None or args.library is None:
        files = {"flux": "clip_l.safetensors and t5xxl_fp16.safetensors", "z_image": "qwen_3_4b.safetensors"}
        raise DemoError(f"--checkpoint {model_file.name} is a {family} diffusion model: give --text-encoder "
                        f"{files.get(family.split('_schnell')[0])} ({want} --text-encoder), --vae ae.safetensors and "
                        f"--library (a category library built for {family.split('_schnell')[0]}, e.g. productscene "
                        "build-library --family ...)")
    vae, lib = _model_file(args.vae, "vae"), _model_file(args.library, "library")
    if args.clip_vision or args.adapter:
        log(f"no brand-style run on {family}: the brand workflows are SD's")
    names = {"workflow": FAMILY_WORKFLOWS[family], "Diffusion model.unet_name": model_file.name,
             "VAE.vae_name": vae.name, "Category prompt.library": lib.name,
             **{k: f.name for k, f in zip(TEXT_ENCODER_INPUTS[family], encoders)}}
    from devkit import dit_files
    from devkit.launcher import ComfyServer
    models = {"diffusion_models": [model_file], "text_encoders": encoders, "vae": [vae], "category_libraries": [lib]}
    extra = []
    if dit_files.MARKER in read_header(model_file)[0]:  # devkit's tiny files (tests/test_dit_workflows.py)
        extra = [ROOT / "devkit" / "tiny_dit_loaders"]
        log("devkit tiny files: the server also loads devkit/tiny_dit_loaders (test-only) for their small configs")
    try:
        server = ComfyServer(default_model.COMFYUI_DIR, models=models, cpu=None if args.gpu else True,
                             extra_custom_nodes=extra)
        server.start()
    except ProductSceneError as e:
        raise DemoError(f"ComfyUI could not be started: {e}") from None
    try:
        log(f"ComfyUI ready at {server.url} ({family}: {names['workflow'].relative_to(ROOT)})")
        return _run_with(server.url, args, products, references,
                         {"checkpoint": None, "library": lib.name, "adapter": None, "dit": names}, out_dir, t_start)
    except BaseException:
        log("last lines of the ComfyUI log:")
        log(server.log_tail(40))
        raise
    finally:
        server.stop()


def _job(url: str, args, workflow: Path, rows: list, sets: dict, out_dir: Path, what: str) -> dict:
    """Run ``rows`` through ``workflow`` as one batch job (productscene.batch); the timings per output."""
    options = Options(workflow=workflow, servers=[url], out=out_dir, overwrite=True, seed=str(args.seed),
                      row_timeout=args.timeout, sets=sets)
    try:
        job = check_job(options, rows, what)
    except ProductSceneError as e:
        raise DemoError(f"the ComfyUI server did not answer as expected: {e}") from None
    summary = BatchRun(job, log=log).run()
    if summary.failed:
        hint = "a usable SD1.5 checkpoint" if workflow == WORKFLOW or workflow == BRAND_WORKFLOW else \
            "the family's diffusion model, with its text encoders and VAE"
        raise DemoError(f"{workflow.name} failed in ComfyUI (is the checkpoint {hint}?):\n"
                        + summary.message())
    return {rec["output"]: rec["timings"] for rec in read_provenance(out_dir / PROVENANCE_NAME)}


def _check(path: Path, uploaded: Image.Image, label: str, seconds: float) -> tuple[Image.Image, str, bool]:
    result = Image.open(path)
    same, total, changed = ProductPixels(uploaded).compare(result)
    note = f"product pixels unchanged {same}/{total}; background changed {changed:.0%}"
    log(f"  {label:<40} -> {path}  ({note}; {seconds:.1f} s on the server)")
    return result, note, same == total and total > 0


def _run_with(url, args, products, references, names, out_dir, t_start) -> int:
    """The sample products as batch jobs (productscene.batch) on the server at ``url``: the category
    workflow, then (with a CLIP vision model and an adapter) the brand-style workflow."""
    work = out_dir / ".inputs"
    inputs, rows, brand_rows = {}, [], []
    for i, p in enumerate(products):
        local = work / f"productscene_demo_{p['name']}.png"
        inputs[p["name"]] = prepare_image(p["path"], args.size, local)
        rows.append(Row(where=p["file"], product=local, category=p["category"], output=f"{p['name']}.png"))
        brand_rows.append(Row(where=p["file"], product=local, category=p["category"],
                              reference=references[i % len(references)], output=f"{p['name']}.png"))
    sets = {"Checkpoint.ckpt_name": names["checkpoint"], "Category prompt.library": names["library"],
            "Sampler.steps": str(args.steps), "Sampler.cfg": str(args.cfg)}
    workflow = WORKFLOW
    if names.get("dit"):  # a Flux.1 / Z-Image run: that family's workflow and loaders
        dit = dict(names["dit"])
        workflow = dit.pop("workflow")
        sets = {**dit, "Sampler.steps": str(args.steps), "Sampler.cfg": str(args.cfg)}
    log(f"category background ({workflow.relative_to(ROOT)}):")
    timings = _job(url, args, workflow, rows, sets, out_dir, "the sample products")
    brand_dir = out_dir / "brand"
    brand_timings = None
    if names["adapter"] is not None:
        log("category background in a brand's style (workflows/api/category_brand_background.json):")
        brand_timings = _job(url, args, BRAND_WORKFLOW, brand_rows,
                             {**sets, "CLIP vision.clip_name": names["clip_vision"],
                              "Personality reference.adapter": names["adapter"]},
                             brand_dir, "the sample products with brand references")
    results, all_ok = [], True
    for p, brand_row in zip(products, brand_rows):
        uploaded = inputs[p["name"]]
        name = f"{p['name']}.png"
        result, note, ok = _check(out_dir / name, uploaded, f"{p['file']} [{p['category']}]",
                                  timings[name].get("execution_s", 0.0))
        row = {"name": p["name"], "category": p["category"], "input": uploaded, "result": result, "note": note}
        if brand_timings is not None:
            brand, brand_note, brand_ok = _check(
                brand_dir / name, uploaded, f"{p['file']} [{p['category']} + {brand_row.reference.stem}]",
                brand_timings[name].get("execution_s", 0.0))
            row.update(brand=brand, reference=Image.open(brand_row.reference))
            row["note"] += f"; with brand style: {brand_note.split(';')[0]}"
            ok = ok and brand_ok
        all_ok &= ok
        results.append(row)
    sheet = out_dir / "contact_sheet.png"
    contact_sheet(results, sheet)
    log(f"contact sheet: {sheet}")
    log(f"provenance (one JSON record per image): {out_dir / PROVENANCE_NAME}"
        + (f" and {brand_dir / PROVENANCE_NAME}" if brand_timings is not None else ""))
    log(f"wall time: {time.time() - t_start:.1f} s")
    if not all_ok:
        log("WARNING: some product pixels changed (see above)")
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="New category backgrounds for the sample products, through a "
                                             "real ComfyUI (headless, loopback).")
    ap.add_argument("--checkpoint", help="SD1.5 checkpoint file (.safetensors), or a Flux.1 / Z-Image diffusion model "
                                         "(then give --text-encoder, --vae and --library). Default: the embedded "
                                         "random-weight default model (proves the pipeline, no real backgrounds). "
                                         "With --server: the checkpoint's name as that server lists it.")
    ap.add_argument("--library", help="category library file (default: an untrained one for the sample "
                                      "categories). With --server: its name as the server lists it.")
    ap.add_argument("--clip-vision", help="CLIP vision model file for the brand-style run (default: the embedded "
                                          "random-weight one with the default model). With --server: its name "
                                          "as that server lists it.")
    ap.add_argument("--adapter", help="personality adapter file trained for the checkpoint and --clip-vision "
                                      "(default: an untrained one with the default model). With --server: its "
                                      "name as that server lists it.")
    ap.add_argument("--text-encoder", action="append", help="with a Flux.1 / Z-Image --checkpoint: a text encoder "
                                                             "file (Flux: clip_l then t5xxl; Z-Image: qwen_3_4b)")
    ap.add_argument("--vae", help="with a Flux.1 / Z-Image --checkpoint: the VAE file (ae.safetensors)")
    ap.add_argument("--family", choices=sorted(FAMILY_WORKFLOWS),
                    help="the base family (default: read from --checkpoint's weight names; sd without one)")
    ap.add_argument("--server", help="URL of a running ComfyUI with ProductScene installed "
                                     "(default: start one on loopback)")
    ap.add_argument("--out", default=str(ROOT / "output" / "demo"), help="output folder (default output/demo)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 4 for the default model, "
                                                            "else the family's: SD 20, Flux.1 [dev] 20, [schnell] 4, Z-Image 8)")
    ap.add_argument("--size", type=int, default=None,
                    help="longest image side in px, rounded to multiples of 16 (default 256 for the default model, 512 otherwise)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cfg", type=float, default=None, help="CFG scale (default: SD 7, Flux.1 and Z-Image 1)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for each image")
    ap.add_argument("--gpu", action="store_true", help="let the started ComfyUI use a GPU (default: --cpu)")
    args = ap.parse_args(argv)
    default = args.checkpoint is None
    try:
        if args.family is None:
            local = not args.server and not default and Path(args.checkpoint).expanduser().is_file()
            args.family = family_of_model_file(Path(args.checkpoint).expanduser()) \
                if local and args.checkpoint.lower().endswith(".safetensors") else "sd"
    except DemoError as e:
        print(f"demo: error: {e}", file=sys.stderr, flush=True)
        return 2
    if args.server and args.family != "sd":
        ap.error("--server runs SD checkpoints only; the Flux.1 / Z-Image demo starts its own ComfyUI")
    if args.cfg is None:
        args.cfg = FAMILY_SETTINGS[args.family]["cfg"]
    if args.steps is None:
        args.steps = 4 if default else FAMILY_SETTINGS[args.family]["steps"]
    if args.size is None:
        args.size = 256 if default else 512
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    if args.size < 0 or (args.size and args.size < 16):
        ap.error("--size must be 0 (keep) or at least 16")
    try:
        return run(args)
    except DemoError as e:
        print(f"demo: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
