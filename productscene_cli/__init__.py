"""Command line: ``python -m productscene <command> ...``.

Commands
  train-categories  train a category library from a data set (BG60k or folder layout)
  train-personality train a personality adapter (the style a reference image carries) from a data set
  train-concepts    Break-A-Scene: learn several concept tokens (+ LoRA) from one image and its masks
  evaluate-library  score a category library on held-out images (confusion matrix, top-1 accuracy)
  check-dataset     check a data set and list every problem (nothing is written)
  build-library     build a category library from textual-inversion embedding files or from words
  batch             run a workflow over a catalogue (CSV manifest or folder) on ComfyUI servers

This package sits above the host-free core (``productscene``) and the ComfyUI adapters (``nodes/``):
the training commands load ComfyUI and this repository as a ComfyUI pack (:mod:`.comfyui`), so the
node and the command line run the same code on the same core. One module per command, each with
``register(subparsers)``.
"""
from __future__ import annotations

import argparse
import sys

from productscene.errors import ProductSceneError


def commands(name: str | None = None) -> list:
    """The command modules (``name``: only that one, when it is ``batch``: a catalogue run needs none
    of the training commands' imports, torch among them)."""
    if name == "batch":
        from . import batch
        return [batch]
    from . import (batch, build_library, check_dataset, evaluate_library, train_categories, train_concepts,
                   train_personality)
    return [check_dataset, train_categories, train_personality, train_concepts, evaluate_library, build_library, batch]


def build_parser(name: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m productscene", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands(name):
        command.register(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    check = getattr(args, "check_args", None)
    if check is not None:
        problem = check(args)
        if problem:
            parser.error(problem)
    try:
        return int(args.func(args) or 0)
    except ProductSceneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
