"""The ComfyUI server this pack runs in, if any (the pack is also imported without one: tests,
the command line)."""
from __future__ import annotations


def prompt_server():
    """``PromptServer.instance`` of the running ComfyUI, or None."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)
