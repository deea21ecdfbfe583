#!/usr/bin/env python
"""Draw the sample product cut-outs in samples/products/ (RGBA PNGs + manifest.json).

Deterministic (pure numpy geometry, 4x supersampled, no randomness, no PNG timestamps): running it
again gives byte-identical files. Usage: python scripts/make_sample_products.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

SS = 4  # supersampling factor for smooth, anti-aliased alpha edges
LIGHT = np.array([-0.55, -0.45, 0.70])  # from the upper left, towards the viewer
LIGHT = LIGHT / np.linalg.norm(LIGHT)


class Canvas:
    """Premultiplied RGBA canvas at SS x the output size; shapes are painted back to front."""

    def __init__(self, w, h):
        self.w, self.h = w, h
        ys, xs = np.mgrid[0:h * SS, 0:w * SS].astype(np.float64)
        self.x = (xs + 0.5) / SS  # output-pixel coordinates
        self.y = (ys + 0.5) / SS
        self.rgb = np.zeros((h * SS, w * SS, 3))
        self.a = np.zeros((h * SS, w * SS))

    def paint(self, inside, rgb, alpha=1.0):
        """Paint ``rgb`` ([H,W,3] or a colour) where the boolean ``inside`` holds."""
        a = inside.astype(np.float64) * alpha
        rgb = np.broadcast_to(np.asarray(rgb, dtype=np.float64), self.rgb.shape)
        self.rgb = rgb * a[..., None] + self.rgb * (1 - a[..., None])
        self.a = a + self.a * (1 - a)

    def image(self) -> Image.Image:
        h, w = self.h, self.w
        rgb = (self.rgb * self.a[..., None]).reshape(h, SS, w, SS, 3).mean(axis=(1, 3))
        a = self.a.reshape(h, SS, w, SS).mean(axis=(1, 3))
        colour = np.where(a[..., None] > 0, rgb / np.maximum(a[..., None], 1e-8), 0.0)
        out = np.concatenate([colour, a[..., None]], axis=-1)
        return Image.fromarray(np.round(np.clip(out, 0, 1) * 255).astype(np.uint8), "RGBA")


def rounded_rect(c, x0, y0, x1, y1, r):
    cx = np.clip(c.x, x0 + r, x1 - r)
    cy = np.clip(c.y, y0 + r, y1 - r)
    return (c.x - cx) ** 2 + (c.y - cy) ** 2 <= r * r


def ellipse(c, cx, cy, rx, ry):
    return ((c.x - cx) / rx) ** 2 + ((c.y - cy) / ry) ** 2 <= 1


def cylinder_shade(c, x0, x1, base, ambient=0.35, spec=0.5, shininess=30):
    """Colour of a vertical cylinder spanning x0..x1, lit by LIGHT: diffuse + specular."""
    u = np.clip((c.x - x0) / (x1 - x0) * 2 - 1, -1, 1)          # -1..1 across the body
    n = np.stack([u, np.zeros_like(u), np.sqrt(1 - u * u)], -1)  # surface normal
    diffuse = np.clip(n @ LIGHT, 0, 1)
    half = LIGHT + np.array([0, 0, 1.0])
    half /= np.linalg.norm(half)
    specular = np.clip(n @ half, 0, 1) ** shininess
    base = np.asarray(base, dtype=np.float64)
    return np.clip(base * (ambient + (1 - ambient) * diffuse)[..., None] + spec * specular[..., None], 0, 1)


def vertical_gradient(c, y0, y1, top, bottom):
    t = np.clip((c.y - y0) / (y1 - y0), 0, 1)[..., None]
    return np.asarray(top) * (1 - t) + np.asarray(bottom) * t


def perfume_bottle():
    c = Canvas(256, 256)
    # glass body: rounded rectangle, amber-pink liquid, cylinder-ish shading and a highlight stripe
    body = rounded_rect(c, 68, 96, 188, 236, 22)
    liquid = cylinder_shade(c, 68, 188, (0.93, 0.55, 0.62), ambient=0.45, spec=0.35)
    liquid = liquid * vertical_gradient(c, 96, 236, (1.0, 1.0, 1.0), (0.82, 0.78, 0.8))
    c.paint(body, liquid)
    stripe = body & (c.x > 84) & (c.x < 94) & (c.y > 108) & (c.y < 220)
    c.paint(stripe, (1.0, 0.97, 0.98), 0.55)
    # engraved label
    label = rounded_rect(c, 98, 150, 158, 184, 4)
    c.paint(label, (0.97, 0.93, 0.86), 0.9)
    c.paint(label & (np.abs(c.y - 167) < 1.5) & (np.abs(c.x - 128) < 20), (0.55, 0.42, 0.3))
    # neck and gold cap
    c.paint(rounded_rect(c, 110, 78, 146, 100, 3), cylinder_shade(c, 110, 146, (0.85, 0.82, 0.8)))
    cap = rounded_rect(c, 96, 28, 160, 82, 8)
    c.paint(cap, cylinder_shade(c, 96, 160, (0.86, 0.68, 0.3), ambient=0.3, spec=0.7, shininess=40))
    for k in range(6):   # ridges on the cap
        ridge = cap & (np.abs(c.x - (104 + k * 10)) < 0.8)
        c.paint(ridge, (0.55, 0.4, 0.15), 0.5)
    return c.image()


def tea_mug():
    c = Canvas(320, 256)
    x0, x1, y0, y1 = 70, 220, 60, 220
    # handle (behind the body on the right): a thick ring
    ring = ellipse(c, 222, 140, 52, 46) & ~ellipse(c, 222, 140, 32, 28)
    c.paint(ring & (c.x > 210), cylinder_shade(c, 170, 274, (0.2, 0.45, 0.42), ambient=0.4))
    # body: cylinder with a rounded bottom edge
    body = (c.x >= x0) & (c.x <= x1) & (c.y >= y0) & (c.y <= y1 - 10) | ellipse(c, 145, y1 - 10, 75, 12)
    c.paint(body, cylinder_shade(c, x0, x1, (0.24, 0.52, 0.48), ambient=0.35, spec=0.4))
    # a white band with a leaf motif
    band = body & (c.y > 120) & (c.y < 150)
    c.paint(band, cylinder_shade(c, x0, x1, (0.95, 0.94, 0.9), ambient=0.5, spec=0.2))
    leaf = ellipse(c, 145, 135, 16, 7) & band
    c.paint(leaf, (0.35, 0.55, 0.25))
    # rim and tea
    c.paint(ellipse(c, 145, y0, 75, 14), (0.2, 0.42, 0.39))
    c.paint(ellipse(c, 145, y0 + 1, 68, 11), vertical_gradient(c, y0 - 11, y0 + 12, (0.35, 0.2, 0.08), (0.6, 0.38, 0.15)))
    return c.image()


def gift_box():
    c = Canvas(256, 256)
    # an upright box seen slightly from above: front face, right side, lid top
    front = (c.x >= 52) & (c.x <= 168) & (c.y >= 90) & (c.y <= 230)
    side_top = 90 - (c.x - 168) * 0.45
    side = (c.x > 168) & (c.x <= 212) & (c.y >= side_top) & (c.y <= 230 - (c.x - 168) * 0.45)
    top = (c.y >= 70) & (c.y < 90) & (c.x >= 52 + (90 - c.y) * 2.2) & (c.x <= 168 + (90 - c.y) * 2.2)
    c.paint(front, vertical_gradient(c, 90, 230, (0.25, 0.33, 0.62), (0.16, 0.22, 0.45)))
    c.paint(side, vertical_gradient(c, 70, 230, (0.15, 0.2, 0.4), (0.09, 0.12, 0.27)))
    c.paint(top, (0.4, 0.5, 0.8))
    # gold ribbon across the front and the top, and a label
    ribbon = front & (np.abs(c.x - 110) < 7)
    c.paint(ribbon, cylinder_shade(c, 103, 117, (0.9, 0.72, 0.3), ambient=0.5, spec=0.5))
    c.paint(top & (np.abs(c.x - (110 + (90 - c.y) * 2.2)) < 7), (0.95, 0.8, 0.4))
    c.paint(side & (np.abs(c.y - side_top - 70) < 6), (0.7, 0.55, 0.22))
    c.paint(rounded_rect(c, 70, 180, 150, 210, 3), (0.96, 0.95, 0.92))
    c.paint(rounded_rect(c, 80, 191, 140, 195, 1), (0.3, 0.3, 0.35))
    return c.image()


def wrench():
    c = Canvas(320, 256)
    # diagonal combination wrench: rotate coordinates so the handle runs along u
    ang = np.deg2rad(-28)
    cx, cy = 160, 128
    u = (c.x - cx) * np.cos(ang) - (c.y - cy) * np.sin(ang)
    v = (c.x - cx) * np.sin(ang) + (c.y - cy) * np.cos(ang)
    handle = (np.abs(u) <= 95) & (np.abs(v) <= 13)
    open_end = ((u - 112) ** 2 + v ** 2 <= 30 ** 2) & ~((u > 112) & (np.abs(v) < 12))
    ring_end = ((u + 112) ** 2 + v ** 2 <= 27 ** 2) & ~((u + 112) ** 2 + v ** 2 <= 14 ** 2)
    metal = open_end | ring_end | handle
    # brushed steel: shading across the bar (v) + faint streaks along it
    t = np.clip(v / 30, -1, 1)
    shade = 0.55 + 0.35 * (1 - (t + 0.4) ** 2) + 0.03 * np.sin(u * 0.9)
    steel = np.clip(np.stack([shade * 0.86, shade * 0.88, shade * 0.93], -1), 0, 1)
    c.paint(metal, steel)
    # a red rubber grip on the handle
    grip = (np.abs(u + 5) <= 55) & (np.abs(v) <= 15)
    red = 0.75 * (0.6 + 0.4 * (1 - t * t))
    c.paint(grip, np.stack([red, np.full_like(t, 0.12), np.full_like(t, 0.1)], -1))
    for k in range(-4, 5):
        c.paint(grip & (np.abs(u + 5 - k * 12) < 1.2), (0.45, 0.06, 0.05))
    return c.image()


PRODUCTS = [
    ("perfume_bottle.png", perfume_bottle, "perfume",
     "Pink glass perfume bottle with a ribbed gold cap and a cream label."),
    ("tea_mug.png", tea_mug, "tea",
     "Teal ceramic tea mug with a white leaf band and a handle, filled with tea."),
    ("gift_box.png", gift_box, "cosmetics",
     "Navy gift box with a gold ribbon and a white label, seen slightly from above."),
    ("wrench.png", wrench, "tools",
     "Steel combination wrench with a red rubber grip, lying diagonally."),
]


def write_samples(argv, folder: str, key: str, items, **after) -> None:
    """Draw ``items`` (``(file name, draw, manifest fields)``) into ``samples/<folder>`` (or --out)
    with a manifest.json ``{key: [{file, ..., width, height, **after}]}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "samples" / folder))
    out = Path(parser.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for filename, draw, fields in items:
        img = draw()
        img.save(out / filename, format="PNG", optimize=True)
        manifest.append({"file": filename, **fields, "width": img.width, "height": img.height, **after})
    (out / "manifest.json").write_text(json.dumps({key: manifest}, indent=2) + "\n")
    print(f"wrote {len(manifest)} {key} to {out}")


def main(argv=None):
    write_samples(argv, "products", "products",
                  [(f, draw, {"category": c, "description": d}) for f, draw, c, d in PRODUCTS], mask="alpha")


if __name__ == "__main__":
    main()
