"""One status line on stderr for long work, only when stderr is a terminal."""

from __future__ import annotations

import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO


class Progress:
    """``update(...)`` redraws one line at most ten times a second; ``done()`` clears it."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            try:
                enabled = self.stream.isatty()
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = enabled
        self.last = 0.0
        self.shown = False

    def update(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.1:
            return
        self.last = now
        if total > 0:
            text = f"{label} {_mib(done)}/{_mib(total)} MiB ({100 * done // total}%)"
        else:
            text = f"{label} {_mib(done)} MiB"
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
        self.last = 0.0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"
