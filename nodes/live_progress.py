"""What the canvas shows while a trainer node runs (js/training.js draws it).

:class:`LiveProgress` is a training progress callback ``(step, total, loss)``, like
``training_host.ComfyProgress``, that also sends:

* the node's progress bar and, as the node's preview image, the loss curve drawn by
  ``productscene.train.engine.loss_graph`` (``ProgressBar.update_absolute(step, total,
  ("PNG", image, size))``; the frontend puts it on the running node), at most every
  ``preview_every`` seconds and always on the first and the last step; once the trainer has drawn
  a sample (:meth:`LiveProgress.sample`, the engine's ``on_preview``: what the model draws now,
  every N steps), the preview shows that sample left of the curve;
* a websocket message ``productscene.training`` to the client that queued the run, at most every
  ``message_every`` seconds and on the last step: ``{"node", "prompt_id", "step", "total", "loss",
  "elapsed", "per_step", "eta", "losses"}`` (times in seconds; ``losses`` is the history averaged
  down to at most ``MAX_POINTS`` points); the extension shows step, loss and time left from it.

Nothing here changes what training computes; a failure to reach the browser never stops a run.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
from PIL import Image

import comfy.utils

from productscene.train.engine import loss_graph
from .running_server import prompt_server

EVENT = "productscene.training"
MAX_POINTS = 200
PREVIEW_SIZE = (512, 256)


def downsample(values: list[float], points: int = MAX_POINTS) -> list[float]:
    """``values`` averaged in equal runs down to at most ``points`` numbers (order kept)."""
    if len(values) <= points:
        return [round(v, 6) for v in values]
    edges = np.linspace(0, len(values), points + 1).astype(int)
    arr = np.asarray(values, dtype=np.float64)
    return [round(float(arr[a:b].mean()), 6) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def to_pil(image) -> Image.Image:
    """One ``[H, W, 3]`` image (0..1) as a PIL image."""
    return Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def graph_image(history: list[float]) -> Image.Image:
    return to_pil(loss_graph(history, width=PREVIEW_SIZE[0], height=PREVIEW_SIZE[1])[0])


def beside(sample: Image.Image | None, graph: Image.Image) -> Image.Image:
    if sample is None:
        return graph
    out = Image.new("RGB", (sample.width + graph.width, max(sample.height, graph.height)), (255, 255, 255))
    out.paste(sample, (0, 0))
    out.paste(graph, (sample.width, 0))
    return out


def sample_strip(images, height: int = PREVIEW_SIZE[1]) -> Image.Image:
    """A batch of images ``[B, H, W, 3]`` side by side, each scaled to ``height``."""
    tiles = [to_pil(im) for im in images]
    tiles = [t.resize((max(1, round(t.width * height / t.height)), height), Image.LANCZOS) for t in tiles]
    strip = Image.new("RGB", (sum(t.width for t in tiles), height))
    x = 0
    for t in tiles:
        strip.paste(t, (x, 0))
        x += t.width
    return strip


class LiveProgress:
    """Training progress for the canvas: progress bar, loss-curve preview image, live message."""

    def __init__(self, total: int, extra=None, *, preview_every: float = 2.0, message_every: float = 0.25):
        self.bar = comfy.utils.ProgressBar(total)
        self.extra = extra
        self.preview_every = preview_every
        self.message_every = message_every
        self.history: list[float] = []
        self.latest_sample: Image.Image | None = None
        self.started = time.monotonic()
        self._first_step = None
        self._last_preview = -math.inf
        self._last_message = -math.inf
        self._server, self._node, self._prompt = _where()

    def __call__(self, step, total, loss=None):
        now = time.monotonic()
        if loss is not None and math.isfinite(float(loss)):
            self.history.append(float(loss))
        if self._first_step is None:
            self._first_step = (step, now)
        final = step >= total
        preview = None
        if self.history and (final or now - self._last_preview >= self.preview_every):
            preview = self._picture()
            self._last_preview = now
        self.bar.update_absolute(step, total, preview)
        if final or now - self._last_message >= self.message_every:
            self._last_message = now
            self._send(step, total, loss, now)
        if self.extra is not None:
            self.extra(step, total, loss)

    def sample(self, step: int, images) -> None:
        """A sample the trainer drew at ``step`` (``[B, H, W, 3]``): shown at once, beside the curve."""
        self.latest_sample = sample_strip(images)
        self._last_preview = time.monotonic()
        self.bar.update_absolute(step, self.bar.total, self._picture())

    def _picture(self):
        picture = beside(self.latest_sample, graph_image(self.history))
        return ("PNG", picture, picture.width)

    def _per_step(self, step: int, now: float) -> float | None:
        """Seconds per step since the first reported step (setup and caching left out)."""
        first, t0 = self._first_step
        done = step - first
        return (now - t0) / done if done > 0 and now > t0 else None

    def _send(self, step, total, loss, now) -> None:
        if self._server is None or self._node is None:
            return
        per_step = self._per_step(step, now)
        message = {
            "node": self._node, "prompt_id": self._prompt, "step": int(step), "total": int(total),
            "loss": None if loss is None or not math.isfinite(float(loss)) else float(loss),
            "elapsed": round(now - self.started, 3), "per_step": per_step,
            "eta": None if per_step is None else per_step * (total - step),
            "losses": downsample(self.history),
        }
        try:
            self._server.send_sync(EVENT, message, self._server.client_id)
        except Exception:  # the browser is a spectator: never fail a run for it
            logging.debug("ProductScene: could not send training progress", exc_info=True)


def _where():
    """(PromptServer or None, executing node id, prompt id) of the node that builds the progress."""
    server = prompt_server()
    node = prompt = None
    try:
        from comfy_execution.utils import get_executing_context
        context = get_executing_context()
        if context is not None:
            node, prompt = context.node_id, context.prompt_id
    except ImportError:
        pass
    if node is None and server is not None:
        node, prompt = getattr(server, "last_node_id", None), getattr(server, "last_prompt_id", None)
    return server, node, prompt
