"""The one run skeleton of every trainer (category library, personality adapter, Break-A-Scene).

A recipe's run (``recipes.categories.train_category_library``, ``recipes.personality.
train_personality_adapter``, ``recipes.concepts.train_concepts``) adds only its own data, recipe and
files to what lives here:

* :class:`RunOptions`: what every run takes besides its config (seed, training state, resume,
  overwrite, autocast, gradient checkpointing, progress, cancel, previews), checked when made;
* the checks before any model work: outputs writable and replacing nothing unasked
  (:func:`check_outputs`), then, for a data-set run, every file once (:func:`checked_inputs`), and
  every latent encoded once (:func:`warm_latents`);
* :func:`run_recipe`: the engine inside the host's training session, resumed when asked; a cancel
  comes back as ``Trained.cancelled`` (the state of the last completed step is saved by then);
* :meth:`Trained.summary`: the training summary the written file carries (its losses:
  :func:`loss_span`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch

from ..errors import ProductSceneError
from ..files import check_writable, refuse_overwrite
from .distributed import SINGLE, World
from .datasets import BG60K_LICENSE, Dataset, DatasetReport, LatentCache, check, open_dataset
from .engine import Phase, Trainer, TrainResult, loss_graph, read_checkpoint_info, resolve_autocast, resume_source


@dataclass(frozen=True)
class RunOptions:
    """What every training run takes besides its recipe's config and data. A bad value is refused
    when the options are made, before any work."""
    seed: int = 0                                     # data order, noise, timesteps (and what the recipe draws)
    checkpoint_path: str | os.PathLike | None = None  # the training state: saved on cancel and at the end
    checkpoint_every: int = 0                         # ... and every N steps (0: only then)
    resume: bool | str | os.PathLike = False          # True: from checkpoint_path if it exists; a path: that file
    overwrite: bool = False                           # replace existing outputs and training state
    autocast: Any = "auto"                            # auto | off | bf16 | fp16 (engine.resolve_autocast)
    gradient_checkpoint: bool = False
    progress: Callable[[int, int, float], None] | None = None  # (step, total, loss) after every step
    should_stop: Callable[[], bool] | None = None     # asked before every step (and while caching): True cancels
    preview_every: int = 0                            # a preview every N steps and after the last (0: none)
    on_preview: Callable[[int, torch.Tensor], None] | None = None
    world: World | None = None                        # several processes (distributed.init); None: this one only

    def __post_init__(self):
        for name in ("checkpoint_every", "preview_every"):
            value = getattr(self, name)
            try:
                steps = int(value or 0)
            except (TypeError, ValueError):
                steps = -1
            if steps < 0:
                raise ProductSceneError(f"{name}: expected 0 (off) or a number of steps, got {value!r}")
        resolve_autocast(self.autocast, torch.device("cpu"))
        self.resume_from()

    @classmethod
    def of(cls, options: "RunOptions | None", fields: Mapping[str, Any]) -> "RunOptions":
        """``options`` (default: the defaults) with ``fields``, given by their names as keywords
        (``seed=3, should_stop=...``), replaced."""
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; a run takes its config, "
                            f"its data and RunOptions fields")
        return dataclasses.replace(options or cls(), **fields)

    @property
    def ranks(self) -> World:
        """The processes the run spans (:data:`.distributed.SINGLE` for one)."""
        return self.world or SINGLE

    def resume_from(self) -> str | os.PathLike | None:
        """The training state to continue from (None: a fresh start); a resume path that does not
        exist raises."""
        return resume_source(self.resume, self.checkpoint_path)


# ------------------------------------------------------------------------------ before any work
def check_outputs(out_path, checkpoint_path=None, *, resume: bool | str = False, overwrite: bool = False,
                  out: str = "out", shown_out: str | None = None, shown_state: str | None = None,
                  hint: str = "pass overwrite, choose another name, or resume its training",
                  also: Sequence[tuple] = ()) -> None:
    """Before any work: the output and the training state (and ``also``: ``(path, shown)`` of the
    other files the run writes next to it) can be written, and none replaces a file the user did not
    ask to replace (a resumed run continues its own state and files)."""
    others = [(p, shown) for p, shown in also if p is not None]
    check_writable(out_path, out, shown_out)
    for p, shown in others:
        check_writable(p, out, shown)
    if checkpoint_path is not None:
        check_writable(checkpoint_path, "training state", shown_state)
    if overwrite:
        return
    continuing = bool(resume) and (not isinstance(resume, bool) or
                                   (checkpoint_path is not None and os.path.isfile(checkpoint_path)))
    if continuing:
        return
    refuse_overwrite(out_path, out, hint, shown_out)
    for p, shown in others:
        refuse_overwrite(p, out, hint, shown)
    if checkpoint_path is not None and os.path.isfile(checkpoint_path):
        try:
            info = read_checkpoint_info(checkpoint_path)
            what = f"a run stopped at step {info.get('step')} of {info.get('total_steps')}"
        except ProductSceneError:
            what = "a damaged training state"
        raise ProductSceneError(
            f"{out}: {shown_state or os.fspath(checkpoint_path)!r} holds {what} and would be replaced by a new run; "
            f"{hint}")


def checked_dataset(data, layout: str = "folder", split: str = "train") -> tuple[Dataset, DatasetReport]:
    """Open a data set and check every file (one deep read); raise one ProductSceneError listing
    every problem."""
    ds = open_dataset(data, layout, split)
    report = check(ds)
    report.raise_if_problems()
    return ds, report


def checked_inputs(data, out_path, options: RunOptions, *, layout: str, split: str,
                   checked: DatasetReport | None) -> tuple[Dataset, DatasetReport]:
    """What a data-set run checks before any model work, in this order: its outputs (see
    :func:`check_outputs`), then every file of the data set (once; ``checked`` with an opened ``data``
    set reuses a report)."""
    check_outputs(out_path, options.checkpoint_path, resume=options.resume, overwrite=options.overwrite)
    if checked is None:
        return checked_dataset(data, layout, split)
    checked.raise_if_problems()
    return data, checked


class _Stopped(Exception):
    pass


def warm_latents(cache: LatentCache, progress: Callable[[int, int], None] | None,
                 should_stop: Callable[[], bool] | None, world: World | None = None) -> bool:
    """Encode every latent once, before the model is loaded to train; False when stopped. Several
    ranks: each encodes its shard into the shared cache folder (no image twice), then they meet; a
    stop on any rank stops them all."""
    world = world or SINGLE
    def done(n, total):
        if progress is not None:
            progress(n, total)
        if should_stop is not None and should_stop():
            raise _Stopped
    stopped = False
    try:
        cache.warm(world.shard(len(cache.dataset)) if world.distributed else None, progress=done)
    except _Stopped:
        stopped = True
    return not world.agree(stopped)


def license_of(license: str | None, layout: str) -> str | None:
    """The licence a file trained on a data set carries: the one given, else BG60k's own on that layout."""
    return BG60K_LICENSE if license is None and layout == "bg60k" else license


# ------------------------------------------------------------------------------ the engine
SPAN = 20  # steps a run's first and final loss are averaged over


def loss_span(history: Sequence[float]) -> tuple[float | None, float | None]:
    """``(first loss, final loss)`` of a run: the mean of its first and of its last :data:`SPAN`
    steps (None, None without steps)."""
    if not history:
        return None, None
    first, last = history[:SPAN], history[-SPAN:]
    return sum(first) / len(first), sum(last) / len(last)


@dataclass
class Trained:
    result: TrainResult
    graph: torch.Tensor          # the loss graph as an IMAGE tensor
    kept: Any = None             # what ``keep`` took from the session (a finished run only)
    ranks: int = 1               # processes the run spanned (each with the config's batch)

    @property
    def cancelled(self) -> bool:
        return self.result.cancelled

    def summary(self, recipe: str, seed: int, config: Mapping, **facts) -> dict:
        """The training summary a written file carries: the recipe, steps, seed, the run's own
        ``facts``, its :func:`loss_span` and the config; a config's ``batch_size`` is per rank,
        ``ranks`` and ``total_batch`` say what one step saw."""
        first, final = loss_span(self.result.history)
        batch = {}
        if "batch_size" in config:
            batch = {"ranks": int(self.ranks), "total_batch": int(config["batch_size"]) * int(self.ranks)}
        return {"recipe": recipe, "steps": self.result.steps_done, "seed": int(seed), **batch, **facts,
                "first_loss": first, "final_loss": final, "config": dict(config)}


def run_recipe(host, recipe, phases: Sequence[Phase], options: RunOptions, *, name: str,
               latent_shape: Sequence[int], lora=None, bound: Callable[[], ContextManager] | None = None,
               keep: Callable[[], Any] | None = None) -> Trained:
    """Train ``recipe`` through ``phases`` with the engine, inside the host's training session
    (``lora`` attached, memory estimated for batches of ``latent_shape``), from the training state
    when resuming. ``bound``: a context entered inside the session around the engine (a recipe that
    trains the session's own weights binds them there); ``keep``: what to take from the session
    before it closes when the run finished (not cancelled). Call inside ``engine.training_mode()``."""
    resume = options.resume_from()
    with host.session(lora=lora, latent_shape=tuple(latent_shape), gradient_checkpoint=options.gradient_checkpoint):
        with bound() if bound is not None else contextlib.nullcontext():
            trainer = Trainer(recipe, phases, seed=options.seed, device=host.device, autocast=options.autocast,
                              checkpoint_path=options.checkpoint_path, checkpoint_every=options.checkpoint_every,
                              progress=options.progress, should_stop=options.should_stop,
                              preview_every=options.preview_every, on_preview=options.on_preview, name=name,
                              world=options.ranks)
            result = trainer.run(resume=resume)
            kept = keep() if keep is not None and not result.cancelled else None
    return Trained(result, loss_graph(result.history), kept, options.ranks.size)
