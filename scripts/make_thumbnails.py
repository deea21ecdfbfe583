"""Draw the template browser's thumbnails: workflows/<name>.jpg beside every canvas workflow.

    .venv/bin/python scripts/make_thumbnails.py

ComfyUI's frontend asks for a custom node template's thumbnail at
/api/workflow_templates/<pack folder>/<name>.jpg (always .jpg) and shows it in a square tile,
small. A screenshot of the graph is unreadable at that size, so each thumbnail is a picture of
what the template does, drawn from the sample products (samples/products): the cut-out you load
and what you get. The pictures are illustrations (no model runs here). tests/test_templates.py
checks that every canvas workflow has its thumbnail.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "products"
WORKFLOWS = ROOT / "workflows"
SIZE = 512
INK = (236, 236, 236)
DIM = (150, 150, 150)
PANEL = (28, 28, 30)


def font(size: int, bold: bool = False):
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu"):
        try:
            return ImageFont.truetype(f"{folder}/{name}", size)
        except OSError:
            pass
    return ImageFont.load_default(size)


def checkerboard(size: tuple[int, int], cell: int = 12) -> Image.Image:
    board = Image.new("RGB", size, (200, 200, 200))
    d = ImageDraw.Draw(board)
    for y in range(0, size[1], cell):
        for x in range(0, size[0], cell):
            if (x // cell + y // cell) % 2:
                d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(150, 150, 150))
    return board


def studio(size: tuple[int, int], top: tuple, bottom: tuple) -> Image.Image:
    w, h = size
    bg = Image.new("RGB", size)
    px = bg.load()
    for y in range(h):
        t = y / max(h - 1, 1)
        row = tuple(int(a + (b - a) * t) for a, b in zip(top, bottom))
        for x in range(w):
            px[x, y] = row
    return bg


def product(name: str, height: int) -> Image.Image:
    im = Image.open(SAMPLES / name).convert("RGBA")
    im = im.crop(im.getbbox())
    return im.resize((round(im.width * height / im.height), height), Image.LANCZOS)


def on_background(cut: Image.Image, bg: Image.Image, floor: float = 0.82) -> Image.Image:
    out = bg.copy()
    x = (out.width - cut.width) // 2
    y = int(out.height * floor) - cut.height
    shadow = Image.new("L", out.size, 0)
    ImageDraw.Draw(shadow).ellipse([x + cut.width * 0.1, y + cut.height - 8, x + cut.width * 0.9, y + cut.height + 10], fill=110)
    out.paste((40, 30, 30), (0, 0), shadow.filter(ImageFilter.GaussianBlur(6)))
    out.paste(cut, (x, y), cut)
    return out


def frame(canvas: Image.Image, tile: Image.Image, xy: tuple[int, int]) -> None:
    d = ImageDraw.Draw(canvas)
    x, y = xy
    d.rounded_rectangle([x - 3, y - 3, x + tile.width + 2, y + tile.height + 2], 8, outline=(90, 90, 95), width=2)
    canvas.paste(tile, xy)


def arrow(canvas: Image.Image, x0: int, x1: int, y: int) -> None:
    d = ImageDraw.Draw(canvas)
    d.line([(x0, y), (x1 - 10, y)], fill=INK, width=5)
    d.polygon([(x1, y), (x1 - 16, y - 11), (x1 - 16, y + 11)], fill=INK)


def header(canvas: Image.Image, title: str, subtitle: str) -> None:
    d = ImageDraw.Draw(canvas)
    d.text((28, 26), "ProductScene", font=font(20), fill=(120, 170, 255))
    d.text((28, 52), title, font=font(30, bold=True), fill=INK)
    d.text((28, 92), subtitle, font=font(17), fill=DIM)


def category_background(title: str = "Category background", base: str = "",
                        sample: str = "perfume_bottle.png", category: str = "perfume",
                        colours: tuple = ((250, 222, 228), (214, 160, 176))) -> Image.Image:
    canvas = Image.new("RGB", (SIZE, SIZE), PANEL)
    header(canvas, title, (f"on {base}: " if base else "your cut-out, ") + "a new background,\nthe product untouched")
    tile = (196, 240)
    cut = product(sample, 170)
    left = checkerboard(tile)
    left.paste(cut, ((tile[0] - cut.width) // 2, (tile[1] - cut.height) // 2), cut)
    right = on_background(cut, studio(tile, *colours))
    frame(canvas, left, (28, 180))
    frame(canvas, right, (SIZE - 28 - tile[0], 180))
    arrow(canvas, 236, 276, 300)
    d = ImageDraw.Draw(canvas)
    d.text((28, 436), "cut-out PNG (alpha)", font=font(16), fill=DIM)
    d.text((SIZE - 28 - tile[0], 436), f"category: {category}", font=font(16), fill=DIM)
    return canvas


def category_brand_background() -> Image.Image:
    canvas = Image.new("RGB", (SIZE, SIZE), PANEL)
    header(canvas, "Category and brand style", "a brand's reference image styles the\nbackground, the product untouched")
    tile = (140, 172)
    cut = product("perfume_bottle.png", 120)
    left = checkerboard(tile)
    left.paste(cut, ((tile[0] - cut.width) // 2, (tile[1] - cut.height) // 2), cut)
    with Image.open(ROOT / "samples" / "references" / "brand_terrazzo.png") as ref:
        reference = ref.convert("RGB").resize(tile, Image.LANCZOS)
    right = on_background(cut, reference.filter(ImageFilter.GaussianBlur(3)))
    x = [28, (SIZE - tile[0]) // 2, SIZE - 28 - tile[0]]
    for xi, im in zip(x, (left, reference, right)):
        frame(canvas, im, (xi, 200))
    d = ImageDraw.Draw(canvas)
    for xi, label in zip(x, ("cut-out PNG", "brand reference", "perfume + brand")):
        d.text((xi, 390), label, font=font(15), fill=DIM)
    return canvas


def category_training() -> Image.Image:
    canvas = Image.new("RGB", (SIZE, SIZE), PANEL)
    header(canvas, "Train a category library", "one folder of cut-outs per category,\none library for thousands of categories")
    d = ImageDraw.Draw(canvas)
    manifest = json.loads((SAMPLES / "manifest.json").read_text())["products"][:3]
    y = 178
    for item in manifest:
        d.text((28, y + 28), f"{item['category']}/", font=font(16, bold=True), fill=INK)
        for k in range(2):
            cut = product(item["file"], 64)
            if k:
                cut = cut.transpose(Image.FLIP_LEFT_RIGHT)
            board = checkerboard((72, 76), 8)
            board.paste(cut, ((72 - cut.width) // 2, 6), cut)
            frame(canvas, board, (150 + k * 82, y))
        y += 96
    arrow(canvas, 322, 358, 318)
    # the library file and a falling loss curve (schematic)
    d.rounded_rectangle([372, 196, 484, 300], 10, fill=(58, 74, 110), outline=(120, 170, 255), width=2)
    d.text((386, 212), "library", font=font(18, bold=True), fill=INK)
    d.text((386, 240), ".safetensors", font=font(14), fill=DIM)
    d.text((386, 264), "N categories", font=font(14), fill=DIM)
    box = (372, 330, 484, 430)
    d.rectangle(box, fill=(245, 245, 245))
    points = [(box[0] + 6 + i * 5, box[3] - 12 - int(74 * (0.75 ** (i / 2.2))) - (5 if i % 3 == 1 else 0))
              for i in range(21)]
    d.line(points, fill=(30, 60, 200), width=3)
    d.text((372, 436), "loss, live", font=font(14), fill=DIM)
    return canvas


def scene_tile(tile: tuple[int, int]) -> Image.Image:
    scene = Image.open(ROOT / "samples" / "scenes" / "desk.png").convert("RGB")
    scene.thumbnail(tile, Image.LANCZOS)
    board = Image.new("RGB", tile, PANEL)
    board.paste(scene, ((tile[0] - scene.width) // 2, (tile[1] - scene.height) // 2))
    return board


def concept_extraction() -> Image.Image:
    canvas = Image.new("RGB", (SIZE, SIZE), PANEL)
    header(canvas, "Extract concepts", "one photo, one mask per concept,\none learned token each")
    frame(canvas, scene_tile((220, 180)), (28, 200))
    arrow(canvas, 256, 292, 290)
    d = ImageDraw.Draw(canvas)
    for i, (name, colour) in enumerate((("<perfume>", (214, 130, 160)), ("<mug>", (40, 120, 110)))):
        y = 200 + i * 96
        d.rounded_rectangle([306, y, 484, y + 76], 10, fill=(58, 74, 110), outline=colour, width=3)
        d.text((322, y + 12), name, font=font(20, bold=True), fill=INK)
        d.text((322, y + 44), "token + LoRA", font=font(14), fill=DIM)
    d.text((28, 436), "photo + masks", font=font(16), fill=DIM)
    return canvas


def concept_recompose() -> Image.Image:
    canvas = Image.new("RGB", (SIZE, SIZE), PANEL)
    header(canvas, "Recompose concepts", "a learned concept on a\ncategory's background")
    d = ImageDraw.Draw(canvas)
    d.rounded_rectangle([28, 250, 190, 330], 10, fill=(58, 74, 110), outline=(214, 130, 160), width=3)
    d.text((44, 270), "<perfume>", font=font(20, bold=True), fill=INK)
    d.text((44, 300), "+ {category}", font=font(14), fill=DIM)
    arrow(canvas, 204, 244, 290)
    tile = (216, 240)
    frame(canvas, on_background(product("perfume_bottle.png", 170), studio(tile, (236, 236, 240), (150, 150, 165))),
          (SIZE - 28 - tile[0], 180))
    d.text((SIZE - 28 - tile[0], 436), "category: marble", font=font(16), fill=DIM)
    return canvas


def category_background_flux() -> Image.Image:
    return category_background("Category background (Flux)", "Flux.1", "gift_box.png", "cosmetics",
                               ((226, 236, 214), (150, 178, 132)))


def category_background_z_image() -> Image.Image:
    return category_background("Category background (ZImage)", "Z-Image", "perfume_bottle.png", "perfume",
                               ((236, 226, 206), (190, 160, 120)))


PICTURES = {"category_background": category_background, "category_background_flux": category_background_flux,
            "category_background_z_image": category_background_z_image, "category_library_training": category_training,
            "concept_extraction": concept_extraction, "concept_recompose": concept_recompose,
            "category_brand_background": category_brand_background,
            "category_brand_background_ipadapter": category_brand_background}


def main() -> int:
    missing = []
    for path in sorted(WORKFLOWS.glob("*.json")):
        workflow = json.loads(path.read_text())["extra"]["productscene"]["workflow"]
        draw = PICTURES.get(workflow)
        if draw is None:
            missing.append(path.name)
            continue
        out = path.with_suffix(".jpg")
        draw().save(out, quality=90, optimize=True)
        print(f"{out.relative_to(ROOT)}: {out.stat().st_size // 1024} KiB")
    for name in missing:
        print(f"no picture for {name}: add one to PICTURES", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
