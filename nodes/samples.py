"""The sample product cut-outs in ComfyUI's input folder, so that the bundled workflows open with an
image that exists and run as shipped (workflows/Category background.json loads
``productscene_perfume_bottle.png``).

Inside a running ComfyUI server only (like routes.py): on start, each ``samples/products/*.png`` (and
``samples/scenes/*.png``, ``samples/references/*.png``) is copied to ``<input>/productscene_<name>`` unless a file of that name is already there (a user's
file is never replaced). Copies go to a temporary name first, then are renamed into place.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .running_server import prompt_server

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "products"
SCENES = SAMPLES.parent / "scenes"  # the concept workflows' scene and its masks
REFERENCES = SAMPLES.parent / "references"  # the brand reference workflow's sample references
PREFIX = "productscene_"


def copy_samples(input_dir: str) -> list[str]:
    """Copy the sample cut-outs missing from ``input_dir``; returns the names written."""
    written = []
    for sample in sorted(SAMPLES.glob("*.png")) + sorted(SCENES.glob("*.png")) + sorted(REFERENCES.glob("*.png")):
        target = os.path.join(input_dir, PREFIX + sample.name)
        if os.path.exists(target):
            continue
        partial = f"{target}.{os.getpid()}.partial"
        try:
            shutil.copyfile(sample, partial)
            os.replace(partial, target)
            written.append(os.path.basename(target))
        except OSError as e:  # a read-only input folder: the workflows still open, the user uploads
            logging.info("ProductScene: could not copy the sample %s to %s: %s", sample.name, input_dir, e)
            if os.path.exists(partial):
                os.remove(partial)
    return written


def _install() -> None:
    if prompt_server() is None:
        return
    import folder_paths

    copy_samples(folder_paths.get_input_directory())


_install()
