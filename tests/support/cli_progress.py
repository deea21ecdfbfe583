"""Reading a training command's progress bar (``PRODUCTSCENE_PROGRESS=1``) from its stderr pipe."""
from __future__ import annotations

import os
import re
import time

STEP = re.compile(rb"training:\s+\d+%\|[^|]*\|\s*(\d+)/")


def read_until_step(proc, min_step: int, timeout: float = 300.0) -> tuple[bool, bytes]:
    """Read ``proc``'s stderr until its bar shows ``min_step`` (True) or it ends or times out (False);
    returns that and what was read."""
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
        steps = [int(m) for m in STEP.findall(seen)]
        if steps and steps[-1] >= min_step:
            return True, seen
    return False, seen
