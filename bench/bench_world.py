"""Time to build the world base (devkit/world_model.py) from nothing, into a temporary folder.

Prints the wall and CPU seconds of the whole build (catalogue, initial weights, latents,
pretraining, checkpoint) and, as the in-process baseline, the same build's pretraining alone, with
the ratio total / pretraining (what the rest costs). CPU seconds next to wall seconds show how much
of the wall time went to waiting for a core on a shared machine.

    .venv/bin/python bench/bench_world.py [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    from devkit import world_model
    import torch
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.time(), time.process_time()
        world = world_model.build(Path(tmp), log=lambda *_: None)
        wall, cpu = time.time() - t0, time.process_time() - c0
    pre = json.loads(world.meta["productscene.pretrain"])
    print(f"world base build: {wall:.1f} s wall, {cpu:.1f} s CPU ({a.threads} torch thread(s))")
    print(f"  of which the {pre['steps']} pretraining steps (with held-out evaluations): {pre['train_seconds']:.1f} s "
          f"wall, {pre['train_cpu_seconds']:.1f} s CPU")
    print(f"  total / pretraining (wall): {wall / pre['train_seconds']:.2f}; CPU / wall: {cpu / wall:.2f}")
    print(f"  held-out loss curve: {pre['heldout_curve']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
