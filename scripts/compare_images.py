"""Are two output folders' images the same to the bit? (e.g. the demo before and after a change)

    .venv/bin/python scripts/compare_images.py output/demo-before output/demo

Compares every PNG under the first folder with the file of the same relative path under the second
(pixels, not file bytes: PNG metadata may differ); exit 0 only when every one is there and identical.
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    first, second = map(Path, argv)
    names = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    if not names:
        print(f"no PNG under {first}", file=sys.stderr)
        return 2
    differ = 0
    for name in names:
        other = second / name
        a = np.asarray(Image.open(first / name))
        b = np.asarray(Image.open(other)) if other.is_file() else None
        same = b is not None and a.shape == b.shape and np.array_equal(a, b)
        differ += not same
        print(f"{name}: {'identical' if same else 'missing' if b is None else 'DIFFERENT'}")
    print(f"{len(names) - differ} of {len(names)} images identical")
    return 0 if differ == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
