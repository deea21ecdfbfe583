"""What the UI's cancel button does, at a chosen moment of a run: ComfyUI's progress hook calls
``interrupt_current_processing`` when ``condition(value, total)`` first holds."""
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
