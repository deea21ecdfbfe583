"""Draw the sample scene of the concept workflows: samples/scenes/desk.png (two sample products
side by side on a plain desk, 512x384) and one mask per product (desk_mask_1.png, desk_mask_2.png,
white = the product).

    .venv/bin/python scripts/make_sample_scene.py
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
SIZE = (512, 384)
PLACES = (("perfume_bottle.png", (40, 70), 250), ("tea_mug.png", (280, 110), 210))


def main() -> None:
    out = SAMPLES / "scenes"
    out.mkdir(parents=True, exist_ok=True)
    scene = Image.new("RGB", SIZE, (214, 196, 170))
    ImageDraw.Draw(scene).rectangle((0, 280, SIZE[0], SIZE[1]), fill=(150, 112, 80))
    for i, (name, (x, y), side) in enumerate(PLACES, 1):
        cut = Image.open(SAMPLES / "products" / name).convert("RGBA")
        cut.thumbnail((side, side), Image.LANCZOS)
        scene.paste(cut, (x, y), cut)
        mask = Image.new("L", SIZE, 0)
        mask.paste(cut.getchannel("A").point(lambda a: 255 if a >= 128 else 0), (x, y))
        mask.save(out / f"desk_mask_{i}.png")
    scene.save(out / "desk.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
