"""What a trainer node sends through ComfyUI's progress hook, seen from the UI: ``cancel_when``
presses cancel (``interrupt_current_processing``) when ``condition(value, total)`` first holds;
``progress_previews`` collects the preview images the node shows."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def cancel_when(condition):
    import comfy.model_management as mm
    import comfy.utils

    def hook(value, total, preview, node_id=None):
        if condition(value, total):
            mm.interrupt_current_processing(True)

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        mm.interrupt_current_processing(False)


@contextlib.contextmanager
def progress_previews():
    """``[(value, PIL image)]`` of every progress report that carried a preview image."""
    import comfy.utils

    shown = []

    def hook(value, total, preview, node_id=None):
        if preview is not None:
            shown.append((value, preview[1]))

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield shown
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
