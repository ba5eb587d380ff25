"""Work done in a second thread, one call after the other, in the order given.

Unpacking a layer is two kinds of work: reading the archive (hashing, parsing the
headers, reading the data) and making the entries (checks, then syscalls that
mostly wait in the kernel with the GIL free). With the entries made in a second
thread, in archive order, the reading of the next entries goes on meanwhile,
as ``tar -x`` overlaps with ``gzip`` in a pipe. The making stays sequential
code: one thread at a time touches the unpacker (``wait`` before the other one
does).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable


class InOrder:
    """A thread running the calls given to ``submit`` in order, a bounded backlog
    behind it. The first call that raises stops it: its exception is raised by
    the next ``submit`` or ``wait`` (the calls after it are dropped)."""

    def __init__(self, name: str, max_calls: int = 256, max_bytes: int = 16 << 20) -> None:
        self.max_calls = max_calls
        self.max_bytes = max_bytes  # of the data the calls hold, as given to submit
        self._calls: collections.deque[tuple[Callable[[], object], int]] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._busy = False
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], object], size: int = 0) -> None:
        with self._cond:
            while (
                len(self._calls) >= self.max_calls or self._bytes > self.max_bytes
            ) and self._error is None:
                self._cond.wait()
            self._raise()
            self._calls.append((call, size))
            self._bytes += size
            self._cond.notify_all()

    def wait(self) -> None:
        """Return when every call given has run; raise the first one's error."""
        with self._cond:
            while (self._calls or self._busy) and self._error is None:
                self._cond.wait()
            self._raise()

    def close(self) -> None:
        """Stop the thread (after the call running, if any); the rest are dropped."""
        with self._cond:
            self._closed = True
            self._calls.clear()
            self._cond.notify_all()
        self._thread.join()

    def _raise(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            self._calls.clear()
            self._bytes = 0
            raise error

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._calls or self._error is not None):
                    self._cond.wait()
                if self._closed:
                    return
                call, size = self._calls.popleft()
                self._bytes -= size
                self._busy = True
                self._cond.notify_all()
            error: BaseException | None = None
            try:
                call()
            except BaseException as e:  # raised in the submitting thread
                error = e
            del call  # its data, now
            with self._cond:
                self._error = error
                self._busy = False
                self._cond.notify_all()
