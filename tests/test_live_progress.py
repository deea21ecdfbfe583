"""The trainer's live display, server side (nodes/live_progress.py): ComfyUI's own progress bar hook
gets the steps and the loss curve as a preview image; the canvas gets throttled progress messages.
(tests/test_canvas_browser.py watches the same through a real server and browser.)"""
from __future__ import annotations

import types

import numpy as np
import pytest

import comfy.utils


@pytest.fixture
def captured(pack, monkeypatch):
    module = pack.nodes.live_progress
    hook_calls, messages = [], []

    class Server:
        client_id = "client-1"

        def send_sync(self, event, data, sid):
            messages.append((event, data, sid))

    now = [100.0]
    monkeypatch.setattr(module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(module, "_where", lambda: (Server(), "7", "prompt-1"))
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None, **_: hook_calls.append((value, total, preview)))
    try:
        yield module, now, hook_calls, messages
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)


def test_progress_preview_and_messages(captured):
    module, now, hook_calls, messages = captured
    extra = []
    progress = module.LiveProgress(20, extra=lambda *a: extra.append(a), preview_every=2.0, message_every=0.25)
    losses = [1.0 / (1 + i) for i in range(20)]
    for step in range(1, 21):
        now[0] += 0.1  # 0.1 s per step
        progress(step, 20, losses[step - 1])

    # the steps reach ComfyUI's progress bar (newer hosts thin out updates that carry no picture);
    # the loss curve rides along on the first and the last
    seen = [c[0] for c in hook_calls]
    assert seen[0] == 1 and seen[-1] == 20 and seen == sorted(set(seen))
    with_preview = [c for c in hook_calls if c[2] is not None]
    assert [c[0] for c in with_preview] == [1, 20]
    kind, image, size = with_preview[-1][2]
    assert kind == "PNG" and image.size == module.PREVIEW_SIZE and size == module.PREVIEW_SIZE[0]
    pixels = np.asarray(image)
    assert ((pixels[..., 2] > 150) & (pixels[..., 0] < 80)).sum() > 50  # the dark blue average line

    # messages: at most every 0.25 s, and the last step always
    steps = [m[1]["step"] for m in messages]
    assert steps[0] == 1 and steps[-1] == 20 and len(steps) < 12
    assert all(m[0] == module.EVENT and m[2] == "client-1" and m[1]["node"] == "7" for m in messages)
    last = messages[-1][1]
    assert last["total"] == 20 and last["loss"] == pytest.approx(losses[-1])
    assert last["losses"] == pytest.approx(losses, abs=1e-6)
    assert last["per_step"] == pytest.approx(0.1) and last["eta"] == pytest.approx(0.0)
    middle = next(m[1] for m in messages if m[1]["step"] == 4)
    assert middle["eta"] == pytest.approx(16 * 0.1)
    assert len(extra) == 20 and extra[-1] == (20, 20, losses[-1])


def test_latent_progress_without_loss_and_long_histories(captured):
    module, now, hook_calls, messages = captured
    progress = module.LiveProgress(3)
    progress(1, 3)  # a progress with no loss (e.g. latent caching): no curve, no failure
    assert hook_calls[-1] == (1, 3, None) and messages[-1][1]["loss"] is None
    values = list(np.linspace(2.0, 1.0, 1000))
    points = module.downsample(values)
    assert len(points) == module.MAX_POINTS
    assert points[0] == pytest.approx(np.mean(values[:5])) and points[-1] == pytest.approx(np.mean(values[-5:]))
    assert np.mean(points) == pytest.approx(np.mean(values))
