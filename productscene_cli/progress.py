"""What a terminal shows while a command works: progress bars, and Ctrl-C for training runs (the
first asks the run to stop after its step, a second stops inside it; the engine keeps the last
completed step either way)."""
from __future__ import annotations

import os
import signal
import sys

from productscene.errors import ProductSceneError


def bar(total, desc, **options):
    """A tqdm bar on stderr (None without tqdm; hidden when stderr is no terminal, unless
    ``PRODUCTSCENE_PROGRESS=1``)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    options.setdefault("unit", "step" if desc == "training" else "img")
    return tqdm(total=total, desc=desc, dynamic_ncols=True,
                disable=not sys.stderr.isatty() and os.environ.get("PRODUCTSCENE_PROGRESS") != "1", **options)


def advance(shown):
    """A ``(done, total)`` callback that moves ``shown`` (None: no bar)."""
    def update(done, total):
        if shown is not None:
            shown.total = total
            shown.n = done
            shown.refresh()
    return update


class TrainingBars:
    """The bars of a training command: ``latents`` (images encoded; only when ``images`` is given)
    and ``training`` (steps, with the loss)."""

    def __init__(self, steps: int, images: int | None = None, shown: bool = True):
        self.latents = bar(images, "latents") if images is not None and shown else None
        self.training = bar(steps, "training") if shown else None
        self.latent_progress = advance(self.latents)

    def progress(self, step, total, loss):
        if self.training:
            self.training.n = step
            self.training.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.training.refresh()

    def close(self):
        for b in (self.latents, self.training):
            if b:
                b.close()


def train_interruptibly(train, ckpt: str, steps: int, images: int | None = None, main: bool = True):
    """Run ``train(bars, should_stop)`` (a core training run; ``bars``: its :class:`TrainingBars`)
    under Ctrl-C and SIGTERM: the first Ctrl-C, or SIGTERM (what torchrun forwards), asks the run to
    stop after its step (``should_stop``; under torchrun every rank stops after the same step), a
    second Ctrl-C stops inside it; either way the engine keeps the last completed step in ``ckpt``.
    Returns the run, or None when it was cancelled (said on stderr; Ctrl-C then stays ignored while
    the process winds down). ``main``: this process shows bars and messages (rank 0 of several)."""
    bars = TrainingBars(steps, images, shown=main)
    stop = []

    def on_sigint(signum, frame):
        if stop and signum == signal.SIGINT:  # a second Ctrl-C: stop inside the step (the engine
            raise KeyboardInterrupt           # keeps the last completed one)
        if not stop and main:
            again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            print(f"\nstopping after this step{again} ...", file=sys.stderr)
        stop.append(True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    previous_term = signal.signal(signal.SIGTERM, on_sigint)
    try:
        run = train(bars, lambda: bool(stop))
    except KeyboardInterrupt:
        run = None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the cancel path below is not cut short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bars.close()
    if run is None or run.cancelled:
        if main:
            print("\ncancelled; " + saved_state(ckpt), file=sys.stderr)
        return None
    signal.signal(signal.SIGINT, previous)
    signal.signal(signal.SIGTERM, previous_term)
    return run


def trained(result, ckpt: str) -> str:
    """The end of a training command's last line: steps, loss, time and the training state."""
    h = result.history
    loss = f"loss {h[0]:.4f} -> {sum(h[-20:]) / len(h[-20:]):.4f}" if h else "no loss recorded"
    return f"{result.steps_done} steps, {loss} in {result.seconds:.1f} s; checkpoint {ckpt}"


def saved_state(ckpt: str) -> str:
    from productscene.train.engine import read_checkpoint_info  # torch: not for the batch command's bar
    try:
        info = read_checkpoint_info(ckpt)
    except (ProductSceneError, OSError):
        return "training had not begun, nothing to resume (the latents encoded so far stay cached)"
    return (f"step {info['step']} of {info['total_steps']} (the last completed step) is saved in {ckpt}; "
            f"continue with --resume")
