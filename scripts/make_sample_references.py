#!/usr/bin/env python
"""Draw the sample brand reference images in samples/references/ (RGB PNGs + manifest.json).

Two brand styles, each a scene with a layout, elements and colours that words describe badly: what
Personality Reference takes from one image. Deterministic (pure numpy geometry, supersampled, no
randomness): running it again gives byte-identical files.
Usage: python scripts/make_sample_references.py [--out DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_products import Canvas, ellipse, rounded_rect, vertical_gradient, write_samples  # noqa: E402

SIZE = 256


def terrazzo():
    """Warm terracotta arch on a speckled cream terrazzo floor, a low plinth in the middle."""
    c = Canvas(SIZE, SIZE)
    c.paint(np.ones_like(c.x, dtype=bool), vertical_gradient(c, 0, SIZE, (0.93, 0.86, 0.78), (0.86, 0.74, 0.64)))
    arch = (np.abs(c.x - 128) <= 78) & (c.y >= 60) | (((c.x - 128) / 78) ** 2 + ((c.y - 60) / 60) ** 2 <= 1)
    c.paint(arch & (c.y <= 176), (0.80, 0.45, 0.32))
    c.paint(c.y >= 176, vertical_gradient(c, 176, SIZE, (0.95, 0.91, 0.85), (0.88, 0.83, 0.76)))
    for i in range(60):  # terrazzo chips on a fixed lattice
        x, y = 10 + (i * 37) % 236, 182 + (i * 13) % 70
        colour = ((0.72, 0.38, 0.28), (0.40, 0.50, 0.45), (0.95, 0.75, 0.55))[i % 3]
        c.paint(ellipse(c, x, y, 2.5 + i % 3, 1.6 + (i % 2)), colour)
    c.paint(rounded_rect(c, 88, 160, 168, 196, 4), (0.97, 0.94, 0.90))
    return c.image().convert("RGB")


def botanical():
    """Deep green backdrop with pale leaf shapes fanning in from both sides and a round gold sun."""
    c = Canvas(SIZE, SIZE)
    c.paint(np.ones_like(c.x, dtype=bool), vertical_gradient(c, 0, SIZE, (0.12, 0.30, 0.24), (0.06, 0.18, 0.15)))
    c.paint(ellipse(c, 128, 92, 46, 46), (0.93, 0.76, 0.36))
    for side in (-1, 1):
        for k in range(5):
            angle = np.deg2rad(-60 + 30 * k) * side
            cx, cy = 128 + side * 118, 150 + 18 * (k - 2)
            u = (c.x - cx) * np.cos(angle) + (c.y - cy) * np.sin(angle)
            v = -(c.x - cx) * np.sin(angle) + (c.y - cy) * np.cos(angle)
            leaf = (u / 70) ** 2 + (v / 14) ** 2 <= 1
            c.paint(leaf, (0.62 + 0.05 * k, 0.80, 0.62), alpha=0.9)
    c.paint(c.y >= 206, (0.80, 0.72, 0.58))
    return c.image().convert("RGB")


REFERENCES = [
    ("brand_terrazzo.png", terrazzo, "Warm terracotta arch over a cream terrazzo floor with a low plinth."),
    ("brand_botanical.png", botanical, "Deep green backdrop, pale leaves fanning in from both sides, a gold sun."),
]


def main(argv=None):
    write_samples(argv, "references", "references", [(f, draw, {"description": d}) for f, draw, d in REFERENCES])


if __name__ == "__main__":
    main()
