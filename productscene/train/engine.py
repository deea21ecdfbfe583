"""The one training loop of ProductScene (host-free: no ComfyUI import).

Every trainer (category library, Break-A-Scene, personality adapter) is a *recipe* run by
:class:`Trainer`. A recipe owns the model-specific work; the engine owns everything else:

* phases, each with its own trainable groups and learning rates (``Phase``);
* AdamW (one optimizer, one param group per named recipe group), grad-norm clip (1.0 by default);
* autocast (bf16 / fp16 on CUDA where supported; off on the CPU unless asked for);
* several processes (``world``, :mod:`.distributed`): gradients, loss and stop requests averaged /
  shared across ranks in one all-reduce per step, every rank stops after the same step, only rank
  0 writes checkpoints and previews;
* seeded determinism: ONE ``torch.Generator`` (on the CPU) is handed to the recipe for data order,
  noise and timesteps, and is saved in checkpoints;
* a progress callback ``(step, total, loss)`` and a ``should_stop()`` callback checked every step;
* preview images every ``preview_every`` steps (and after the last): a recipe that can draw one
  (``recipe.preview(generator) -> IMAGE [B,H,W,3]``) renders it with its own fixed generator, so
  previews never change what training computes, and ``on_preview(step, image)`` receives it;
* loss history; checkpoints every N steps and on cancel (atomic safetensors with trainables,
  optimizer state, RNG state and step in versioned metadata); resume from a checkpoint reaches the
  same state as an uninterrupted run.

Recipe protocol (duck-typed, see :class:`Recipe`)::

    recipe.parameter_groups() -> {group_name: [tensor, ...]}   # leaf tensors to train
    recipe.batch(step, generator) -> batch      # draw data/noise/timesteps from `generator` only
    recipe.loss(batch, step) -> (loss_tensor, {name: float})   # scalar loss + logs
    optional: recipe.on_phase(phase), recipe.extra_state() -> {str: tensor},
              recipe.load_extra_state(dict), recipe.describe() -> JSON-able dict (saved in metadata),
              recipe.preview(generator) -> IMAGE [B,H,W,3] (what the model draws now)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.utils.checkpoint
from PIL import Image, ImageDraw

from ..errors import ProductSceneError
from ..files import check_format, load_tensors, read_header, save_safetensors_atomic
from ..images import as_tensor
from . import distributed

CHECKPOINT_FORMAT = "training_checkpoint"
CHECKPOINT_VERSION = 1


@runtime_checkable
class Recipe(Protocol):
    def parameter_groups(self) -> Mapping[str, Sequence[torch.Tensor]]: ...

    def batch(self, step: int, generator: torch.Generator) -> Any: ...

    def loss(self, batch: Any, step: int) -> tuple[torch.Tensor, Mapping[str, float]]: ...


@dataclass(frozen=True)
class Phase:
    """``steps`` optimizer steps training the groups named in ``lr`` (group -> learning rate).
    Groups not named are frozen during the phase (``requires_grad`` off, no optimizer update)."""
    name: str
    steps: int
    lr: Mapping[str, float]
    weight_decay: Mapping[str, float] | None = None  # per group; default from the Trainer

    def __post_init__(self):
        if int(self.steps) < 0:
            raise ProductSceneError(f"phase {self.name!r}: steps must be >= 0, got {self.steps}")
        if not self.lr:
            raise ProductSceneError(f"phase {self.name!r}: name at least one trainable group with its learning rate")
        for g, v in self.lr.items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ProductSceneError(f"phase {self.name!r}: learning rate of {g!r} must be > 0, got {v!r}")


@dataclass
class TrainResult:
    steps_done: int
    total_steps: int
    history: list[float]
    cancelled: bool
    checkpoint: str | None
    seconds: float
    logs: list[dict] = field(default_factory=list)


def resolve_autocast(mode, device: torch.device) -> torch.dtype | None:
    """``mode``: None/"off"/"fp32" -> no autocast; "auto" -> bf16 (or fp16) on CUDA, off on the CPU;
    "bf16"/"fp16" or a torch dtype -> that dtype."""
    if mode in (None, "off", "fp32", "none", False, torch.float32):
        return None
    if isinstance(mode, torch.dtype):
        return mode
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    raise ProductSceneError(f"autocast: expected auto, off, bf16 or fp16, got {mode!r}")


class Trainer:
    """Runs a recipe through its phases. See the module docstring for the contract."""

    def __init__(self, recipe: Recipe, phases: Sequence[Phase], *, seed: int = 0,
                 device: str | torch.device = "cpu", autocast="auto", clip_grad: float | None = 1.0,
                 weight_decay: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8,
                 checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int = 0,
                 progress: Callable[[int, int, float], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 preview_every: int = 0, on_preview: Callable[[int, torch.Tensor], None] | None = None,
                 name: str = "training", world: distributed.World | None = None):
        if not isinstance(recipe, Recipe):
            raise ProductSceneError("recipe: expected an object with parameter_groups(), batch(step, generator) and loss(batch, step)")
        self.recipe = recipe
        self.phases = list(phases)
        if not self.phases:
            raise ProductSceneError("phases: expected at least one training phase")
        self.total_steps = sum(int(p.steps) for p in self.phases)
        if self.total_steps < 1:
            raise ProductSceneError("steps: expected at least one training step in total")
        self.seed = int(seed)
        self.device = torch.device(device)
        self.autocast_dtype = resolve_autocast(autocast, self.device)
        self.clip_grad = clip_grad
        self.weight_decay = float(weight_decay)
        self.checkpoint_path = os.fspath(checkpoint_path) if checkpoint_path is not None else None
        self.checkpoint_every = int(checkpoint_every or 0)
        if self.checkpoint_every < 0:
            raise ProductSceneError(f"checkpoint_every: expected 0 (off) or a number of steps, got {checkpoint_every}")
        self.progress = progress
        self.should_stop = should_stop
        self.preview_every = int(preview_every or 0)
        if self.preview_every < 0:
            raise ProductSceneError(f"preview_every: expected 0 (off) or a number of steps, got {preview_every}")
        self.world = world or distributed.SINGLE
        self.on_preview = on_preview if callable(getattr(recipe, "preview", None)) and self.world.is_main else None
        self.name = name
        self._stop_agreed = False  # several ranks: a stop every rank agreed on at the last step

        groups = {str(k): list(v) for k, v in recipe.parameter_groups().items()}
        if not groups:
            raise ProductSceneError("recipe: parameter_groups() returned no groups")
        for phase in self.phases:
            unknown = [g for g in phase.lr if g not in groups]
            if unknown:
                raise ProductSceneError(
                    f"phase {phase.name!r}: unknown parameter group(s) {unknown}; the recipe has {sorted(groups)}")
        seen = set()
        for g, params in groups.items():
            for p in params:
                if not isinstance(p, torch.Tensor) or not p.is_leaf or not p.is_floating_point():
                    raise ProductSceneError(f"recipe: group {g!r} must hold floating-point leaf tensors")
                if id(p) in seen:
                    raise ProductSceneError(f"recipe: a tensor appears in two groups (second: {g!r})")
                seen.add(id(p))
        self.groups = groups
        self.group_names = list(groups)
        self.optimizer = torch.optim.AdamW(
            [{"params": groups[g], "lr": 0.0, "weight_decay": self.weight_decay, "group_name": g}
             for g in self.group_names], lr=0.0, betas=tuple(betas), eps=eps, weight_decay=self.weight_decay)
        use_scaler = self.autocast_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self.step = 0
        self.history: list[float] = []
        self.logs: list[dict] = []
        self._phase_index: int | None = None

    # -- phases ----------------------------------------------------------------------------------
    def phase_at(self, step: int) -> tuple[int, Phase]:
        end = 0
        for i, phase in enumerate(self.phases):
            end += int(phase.steps)
            if step < end:
                return i, phase
        return len(self.phases) - 1, self.phases[-1]

    def _activate(self, index: int) -> None:
        phase = self.phases[index]
        decay = dict(phase.weight_decay or {})
        for pg in self.optimizer.param_groups:
            g = pg["group_name"]
            active = g in phase.lr
            pg["lr"] = float(phase.lr[g]) if active else 0.0
            pg["weight_decay"] = float(decay.get(g, self.weight_decay))
            for p in pg["params"]:
                p.requires_grad_(active)
                p.grad = None
        self._phase_index = index
        hook = getattr(self.recipe, "on_phase", None)
        if hook is not None:
            hook(phase)

    def trainable(self) -> list[torch.Tensor]:
        return [p for pg in self.optimizer.param_groups if pg["lr"] > 0 for p in pg["params"]]

    def current_lr(self) -> dict[str, float]:
        return {pg["group_name"]: pg["lr"] for pg in self.optimizer.param_groups}

    # -- the loop ------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> tuple[float, dict]:
        """One optimizer step at ``self.step``. Updates parameters, history and ``self.step``.

        Nothing the step changes is kept until the update is applied: an exception before it (an
        interrupt raised inside a model op) leaves the trainables at the last completed step and
        :meth:`run` rewinds the random state drawn for the unfinished step."""
        index, _ = self.phase_at(self.step)
        if index != self._phase_index:
            self._activate(index)
        with distributed.activate(self.world):  # the recipe draws the global batch and takes its rows
            batch = self.recipe.batch(self.step, self.generator)
            with self.autocast():
                loss, logs = self.recipe.loss(batch, self.step)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ProductSceneError("recipe: loss() must return a scalar tensor")
        value = float(loss.detach().float())
        if not self.world.distributed:
            self._check_finite(value)
        params = self.trainable()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.world.distributed:  # mean gradients and loss, and whether any rank asked to stop
            local_stop = bool(self.should_stop is not None and self.should_stop())
            value, self._stop_agreed = self.world.sync_step(params, value, local_stop)
            self._check_finite(value)
        with _deferred_sigint():  # the update is all or nothing, even for Ctrl-C
            grad_norm = None
            if self.clip_grad is not None and self.clip_grad > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float(self.clip_grad)))
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.history.append(value)
        entry = {"step": self.step, "loss": value}
        if grad_norm is not None:
            entry["grad_norm"] = grad_norm
        entry.update({str(k): float(v) for k, v in dict(logs or {}).items()})
        self.logs.append(entry)
        return value, entry

    def _check_finite(self, value: float) -> None:
        if not math.isfinite(value):
            raise ProductSceneError(
                f"training: the loss became {value} at step {self.step + 1}; lower the learning rate "
                f"(or turn off fp16) and resume from the last checkpoint")

    def _stop_requested(self) -> bool:
        """One process: ``should_stop()`` now. Several: what every rank agreed at the last step's
        all-reduce (so all stop after the same step)."""
        if self.world.distributed:
            return self._stop_agreed
        return self.should_stop is not None and self.should_stop()

    def _random_state(self) -> tuple:
        cuda = (torch.cuda.get_rng_state(self.device)
                if self.device.type == "cuda" and torch.cuda.is_available() else None)
        return self.generator.get_state(), torch.get_rng_state(), cuda

    def _rewind(self, state: tuple) -> None:
        generator, cpu, cuda = state
        self.generator.set_state(generator)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, resume: str | os.PathLike | None = None) -> TrainResult:
        """Train until every phase is done or ``should_stop()`` says so.

        On a stop request the state after the last completed step is checkpointed (when a
        checkpoint path is set) and the result says ``cancelled=True``. Any exception raised at any
        moment of a step (an interrupt from the host inside a model op, Ctrl-C) also saves the
        state after the last completed step, then propagates; resuming from it matches an
        uninterrupted run.
        """
        if resume is not None:
            self.load_checkpoint(resume)
        self._stop_agreed = False
        start = time.perf_counter()
        saved = None
        saved_step = -1
        try:
            while self.step < self.total_steps:
                if self._stop_requested():
                    saved = self._save_on_stop()
                    return TrainResult(self.step, self.total_steps, list(self.history), True, saved,
                                       time.perf_counter() - start, list(self.logs))
                before = self._random_state()
                done = self.step
                try:
                    value, _ = self.train_step()
                except BaseException:
                    if self.step == done:  # the unfinished step drew noise and data: give them back
                        self._rewind(before)
                    raise
                if self.checkpoint_path and self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint(self.checkpoint_path)
                    saved, saved_step = self.checkpoint_path, self.step
                if self.progress is not None:
                    self.progress(self.step, self.total_steps, value)
                if self.on_preview is not None and self.preview_every and (
                        self.step % self.preview_every == 0 or self.step == self.total_steps):
                    self.render_preview()
        except BaseException:
            if saved_step != self.step:
                with _deferred_sigint():  # a second Ctrl-C must not cut the save short
                    self._save_on_stop()
            raise
        if self.checkpoint_path and saved_step != self.step:
            self.save_checkpoint(self.checkpoint_path)
            saved = self.checkpoint_path
        return TrainResult(self.step, self.total_steps, list(self.history), False, saved,
                           time.perf_counter() - start, list(self.logs))

    def render_preview(self) -> torch.Tensor:
        """The recipe's preview at this step, handed to ``on_preview``. Drawn from a generator of its
        own (the same seed every time, so previews compare across steps) with gradients off: the
        training state and random streams are untouched."""
        generator = torch.Generator(device="cpu").manual_seed(self.seed + 104729)
        cpu = torch.get_rng_state()
        try:
            with torch.no_grad(), self.autocast():
                image = self.recipe.preview(generator)
        finally:
            torch.set_rng_state(cpu)
        image = image.detach().float().clamp(0, 1).cpu()
        if self.on_preview is not None:
            self.on_preview(self.step, image)
        return image

    def _save_on_stop(self) -> str | None:
        if not self.checkpoint_path:
            return None
        self.save_checkpoint(self.checkpoint_path)
        return self.checkpoint_path

    # -- checkpoints ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for g in self.group_names:
            for i, p in enumerate(self.groups[g]):
                tensors[f"param.{g}.{i}"] = p.detach().float().cpu()
                st = self.optimizer.state.get(p)
                if st:
                    for k, v in st.items():
                        t = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                        tensors[f"optim.{g}.{i}.{k}"] = t.detach().cpu().clone()
        tensors["rng.generator"] = self.generator.get_state().clone()
        tensors["rng.torch_cpu"] = torch.get_rng_state().clone()
        if self.device.type == "cuda" and torch.cuda.is_available():
            tensors["rng.torch_cuda"] = torch.cuda.get_rng_state(self.device).clone()
        if self.scaler is not None:
            tensors["scaler.scale"] = torch.tensor(float(self.scaler.get_scale()))
        extra = getattr(self.recipe, "extra_state", None)
        if extra is not None:
            for k, v in dict(extra()).items():
                tensors[f"extra.{k}"] = v.detach().cpu()
        return tensors

    def state_metadata(self) -> dict[str, str]:
        describe = getattr(self.recipe, "describe", None)
        return {
            "name": json.dumps(self.name),
            "step": json.dumps(self.step),
            "total_steps": json.dumps(self.total_steps),
            "seed": json.dumps(self.seed),
            "ranks": json.dumps(self.world.size),
            "phases": json.dumps([{"name": p.name, "steps": int(p.steps), "lr": dict(p.lr)} for p in self.phases]),
            "groups": json.dumps({g: [list(p.shape) for p in self.groups[g]] for g in self.group_names}),
            "history": json.dumps(self.history),
            "recipe": json.dumps(describe() if describe is not None else None, default=str),
        }

    def save_checkpoint(self, path) -> str:
        """Write the training state (rank 0 only: the ranks hold the same state)."""
        if not self.world.is_main:
            return os.fspath(path)
        save_safetensors_atomic(self.state_tensors(), path, self.state_metadata(),
                                kind=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
        return os.fspath(path)

    def load_checkpoint(self, path) -> None:
        """Restore trainables, optimizer, RNG, step and history from ``path`` (made by the same
        recipe with the same groups)."""
        path = os.fspath(path)
        base = os.path.basename(path)
        meta, index = read_header(path)
        check_format(meta, CHECKPOINT_FORMAT, (CHECKPOINT_VERSION,), path=path)
        try:
            shapes = json.loads(meta["groups"])
            step = int(json.loads(meta["step"]))
            history = [float(x) for x in json.loads(meta.get("history", "[]"))]
        except (KeyError, ValueError, TypeError):
            raise ProductSceneError(f"resume: {base} has damaged training metadata") from None
        mine = {g: [list(p.shape) for p in self.groups[g]] for g in self.group_names}
        if shapes != mine:
            raise ProductSceneError(
                f"resume: {base} was made for other trainables ({_summary(shapes)}) than this run has "
                f"({_summary(mine)}); resume with the same categories, rank and model family")
        if step > self.total_steps:
            raise ProductSceneError(f"resume: {base} is at step {step} but this run has only {self.total_steps} steps")
        t = load_tensors(path)
        with torch.no_grad():
            for g in self.group_names:
                for i, p in enumerate(self.groups[g]):
                    p.copy_(t[f"param.{g}.{i}"].to(p.device, p.dtype))
                    st = {}
                    prefix = f"optim.{g}.{i}."
                    for k, v in t.items():
                        if k.startswith(prefix):
                            name = k[len(prefix):]
                            st[name] = v.to(p.device) if name != "step" else v.clone()
                    if st:
                        self.optimizer.state[p] = st
                    else:
                        self.optimizer.state.pop(p, None)
        self.generator.set_state(t["rng.generator"])
        torch.set_rng_state(t["rng.torch_cpu"])
        if "rng.torch_cuda" in t and self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.set_rng_state(t["rng.torch_cuda"], self.device)
        if self.scaler is not None and "scaler.scale" in t:
            self.scaler.update(float(t["scaler.scale"]))
        loader = getattr(self.recipe, "load_extra_state", None)
        extra = {k[len("extra."):]: v for k, v in t.items() if k.startswith("extra.")}
        if loader is not None and extra:
            loader(extra)
        self.step = step
        self.history = history[:step]
        self.logs = [{"step": i + 1, "loss": v} for i, v in enumerate(self.history)]
        self._phase_index = None


@contextlib.contextmanager
def _deferred_sigint():
    """Hold Ctrl-C (SIGINT) back until the block is done, then deliver it. Only the main thread
    can set signal handlers; elsewhere (ComfyUI's worker thread) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    held = []
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: held.append((signum, frame)))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and callable(previous):
            previous(*held[0])


def _summary(shapes: Mapping[str, list]) -> str:
    return ", ".join(f"{g}: {len(v)} tensors" for g, v in shapes.items())


def resume_source(resume, checkpoint_path) -> str | os.PathLike | None:
    """The checkpoint a run resumes from: ``resume`` True = ``checkpoint_path`` if it exists (else
    a fresh start), a path = that file (which must exist), False = none."""
    if not resume:
        return None
    source = resume if isinstance(resume, (str, os.PathLike)) else checkpoint_path
    if source is None or not os.path.isfile(source):
        if isinstance(resume, (str, os.PathLike)):
            raise ProductSceneError(f"resume: checkpoint {resume!r} not found")
        return None  # nothing to resume yet: start fresh
    return source


def read_checkpoint_info(path) -> dict:
    """Step, total, seed and history of a checkpoint (header only)."""
    meta, _ = read_header(path)
    check_format(meta, CHECKPOINT_FORMAT, (CHECKPOINT_VERSION,), path=path)
    return {k: json.loads(meta[k]) for k in ("name", "step", "total_steps", "seed", "phases", "history", "recipe") if k in meta}


@contextlib.contextmanager
def training_mode():
    """Gradients on, even inside a host's ``torch.inference_mode()`` (ComfyUI runs nodes in it):
    tensors made inside are normal tensors that autograd can save."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


@contextlib.contextmanager
def gradient_checkpointing(modules: Iterable[torch.nn.Module]):
    """Run each module's forward under ``torch.utils.checkpoint`` (recompute in backward, less
    activation memory) while inside; the original forwards come back on exit."""
    patched = []
    try:
        for m in modules:
            original = m.forward

            def run(*args, __f=original, **kwargs):
                if torch.is_grad_enabled():
                    return torch.utils.checkpoint.checkpoint(__f, *args, use_reentrant=False, **kwargs)
                return __f(*args, **kwargs)

            m.forward = run
            patched.append((m, original))
        yield
    finally:
        for m, original in patched:
            del m.forward  # back to the class's forward ...
            if m.forward != original:  # ... unless the original was an instance attribute itself
                m.forward = original


def loss_graph(history: Sequence[float], width: int = 512, height: int = 256, smooth: int | None = None) -> torch.Tensor:
    """The loss history drawn as an IMAGE tensor ``[1, H, W, 3]`` (float 0..1): raw loss in light
    blue, a moving average in dark blue, on a white background with a light grid."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    pad = 12
    for i in range(5):
        y = pad + i * (height - 2 * pad) / 4
        d.line([(pad, y), (width - pad, y)], fill=(230, 230, 230))
    values = [float(v) for v in history if math.isfinite(float(v))]
    if len(values) >= 1:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0

        def pt(i, v, n):
            x = pad + (width - 2 * pad) * (i / max(n - 1, 1))
            y = height - pad - (height - 2 * pad) * ((v - lo) / span)
            return (x, y)

        n = len(values)
        if n == 1:
            x, y = pt(0, values[0], 1)
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 60, 200))
        else:
            d.line([pt(i, v, n) for i, v in enumerate(values)], fill=(160, 190, 240), width=1)
            k = smooth or max(1, n // 20)
            avg = np.convolve(np.array(values), np.ones(k) / k, mode="valid")
            off = (k - 1) / 2
            d.line([pt(i + off, float(v), n) for i, v in enumerate(avg)], fill=(30, 60, 200), width=2)
    return as_tensor(img)[None]
