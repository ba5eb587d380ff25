"""A cheaper request loop for pyfuse3, still on trio.

pyfuse3's loop runs in worker tasks; each, before reading a request, takes a
lock (one task waits on the device at a time: trio allows no two) and parks in
``trio.lowlevel.wait_readable`` until the kernel has one. So every request costs
a trip through trio's scheduler and epoll, and a lock hand-off between the
task that just replied and the one that waited meanwhile, even when the next
request is already there (the kernel sends RELEASE in the background, so after
a close the next open is usually queued behind it). That trip was most of the
daemon's time per request.

pyfuse3 reaches trio only through its module attribute ``pyfuse3.trio`` (its
own asyncio mode swaps it the same way), so ``install`` puts a stand-in there
that is trio in everything but two points:

- ``Lock`` (pyfuse3 uses one only for that turn to read) takes no turn at all;
- ``lowlevel.wait_readable`` returns at once when the device already has a
  request (a ``poll`` with no timeout), up to ``BATCH`` times in a row, and only
  otherwise parks in trio's own ``wait_readable``, one task at a time.

When nothing is queued yet after a request answered in Python, and no other
handler is in progress, it first waits a moment for the next request outside trio
(``linger``: the C hook's wait after its own answers, csrc/requests.c, with the GIL
released; after a run of C answers, which has waited already, it does not). The
program that sent the request usually sends its next one a few dozen microseconds
after the reply, and that wait costs the daemon no CPU, where parking in trio and
being woken through epoll costs more than many requests do. An untar's CREATE, the
one request per file answered in Python, is followed by requests answered in C
this way. The waits count toward ``run_waited``: after many, trio gets its turn.

The worker that just replied thus reads on while requests are queued, and the
others still take over whenever a request waits for a worker thread (a large
copy-up, a cold read), as before. Two tasks may now both find the device
readable and both read it; the device is made non-blocking, so the one that
finds nothing gets EAGAIN, which the C hook's request tap turns into the EINTR
that makes pyfuse3 simply wait again (``csrc/requests.c``). Without the hook
nothing is installed. After ``BATCH`` requests in a row the worker parks
properly once, so trio's other tasks (signals, the replies of worker threads)
keep their turn.
"""

from __future__ import annotations

import os
import select
import types
from collections.abc import Callable
from typing import Any

import trio

BATCH = 32  # requests read back to back before the worker yields to trio's scheduler


class _NoTurn:
    """pyfuse3's read lock, reduced to nothing: the wait below serializes itself."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Lowlevel:
    """``trio.lowlevel`` with a ``wait_readable`` that does not wait for what is there."""

    def __init__(self) -> None:
        # Whether runs of C answers waited for many requests (csrc/requests.c): then
        # trio gets its turn before the next request, whatever is queued.
        self.run_waited: Callable[[], bool] = _never
        self.linger: Callable[[int], bool] = _never_fd
        self._fd = -1
        self._poll = select.poll()
        self._budget = BATCH
        self.found_queued = 0  # requests read on at once, already queued (the unmount log)
        self._parked = trio.Lock()  # trio lets one task at a time wait on an fd
        self._closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: int) -> None:
        if fd != self._fd:
            os.set_blocking(fd, False)  # a lost race reads EAGAIN, never blocks
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)
            self._fd = fd
        if self._budget > 0 and not self.run_waited():
            if self._poll.poll(0):
                self.found_queued += 1
                self._budget -= 1
                return
            if self.linger(fd):
                self._budget -= 1
                return
        self._budget = BATCH
        async with self._parked:
            if self._closing:  # terminate() woke the one waiting; the others stop here
                raise trio.ClosedResourceError("the FUSE session is ending")
            await trio.lowlevel.wait_readable(fd)

    def notify_closing(self, fd: int) -> None:
        self._closing = True
        trio.lowlevel.notify_closing(fd)


class _Trio(types.ModuleType):
    """The stand-in for the trio module as pyfuse3 sees it."""

    def __init__(self) -> None:
        super().__init__("trio")
        self.lowlevel = _Lowlevel()
        self.Lock = _NoTurn

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


# =1: pyfuse3's own loop, every RELEASE through Python too (to compare, or to rule these out).
PLAIN_ENV = "UNIONFS_PLAIN_LOOP"
# How long (µs) a run of requests answered in C waits for the next one (csrc/requests.c);
# UNIONFS_LINGER_US overrides it (0: never waits; to compare, or to rule it out).
LINGER_US = 10_000
LINGER_ENV = "UNIONFS_LINGER_US"


def plain() -> bool:
    return os.environ.get(PLAIN_ENV, "") not in ("", "0")


def linger_us() -> int:
    """The wait for a next request after one answered in C, in microseconds."""
    value = os.environ.get(LINGER_ENV, "")
    try:
        us = int(value) if value else LINGER_US
    except ValueError:
        us = LINGER_US
    return min(max(us, 0), 100_000)


def _never() -> bool:
    return False


def _never_fd(fd: int) -> bool:
    return False


def found_queued(pyfuse3: types.ModuleType | None) -> int | None:
    """How many requests the stand-in found already queued when pyfuse3's loop came
    to wait for one (None: not installed)."""
    stand_in = getattr(pyfuse3, "trio", None)
    return stand_in.lowlevel.found_queued if isinstance(stand_in, _Trio) else None


def install(
    pyfuse3: types.ModuleType,
    run_waited: Callable[[], bool] = _never,
    linger: Callable[[int], bool] = _never_fd,
) -> None:
    """Give pyfuse3 the stand-in; call before ``pyfuse3.main`` and only with the C hook
    loaded (its request tap turns a lost race's EAGAIN into EINTR)."""
    if plain():
        return
    stand_in = _Trio()
    stand_in.lowlevel.run_waited = run_waited
    stand_in.lowlevel.linger = linger
    pyfuse3.trio = stand_in  # type: ignore[attr-defined]
