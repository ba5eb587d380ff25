"""Where the time from exec to a ready mount goes (for ``make bench``).

With ``UNIONFS_STARTUP_TIMES=FILE`` in the environment, the command notes the
wall-clock time at which it finishes each phase (``mark``), with its own CPU
time then, and the daemon writes them to FILE as JSON once the mount is ready:
the benchmark subtracts the time it ran the command at. The CPU time restarts
at zero in the daemon after the fork. Without the variable, ``mark`` does
nothing but one test.
"""

from __future__ import annotations

import os
import time

_FILE = os.environ.get("UNIONFS_STARTUP_TIMES", "")
_marks: list[tuple[str, float, float]] = []


def mark(phase: str) -> None:
    """Note that *phase* ended now."""
    if _FILE:
        _marks.append((phase, time.time(), time.process_time()))


def write() -> None:
    """Write the marks so far to the file (the daemon, once ready)."""
    if _FILE:
        import json

        with open(_FILE, "w") as f:
            json.dump(_marks, f)
