"""A child process that performs ops and snapshots on one mount, with timeouts.

Anything that touches a mount may hang when a FUSE daemon misbehaves, and a
thread stuck in an uninterruptible syscall cannot be abandoned cleanly. So each
side gets its own forked worker that owns that side's open file descriptors;
the runner waits for each answer with a timeout and, on expiry, reports a hang,
lazily unmounts, kills the daemon it started and then this worker.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
from collections.abc import Callable
from typing import Any

from tests.conformance import ops, snapshot


class Hang(Exception):
    """The worker did not answer in time (or died)."""


class WorkerSetupError(Exception):
    """The worker's set-up (its mount, in the unprivileged mode) failed."""


def _serve(
    conn: multiprocessing.connection.Connection,
    root: bytes,
    setup: Callable[[], None] | None,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner handles ^C and cleans up
    try:
        if setup is not None:
            setup()
    except Exception as e:  # noqa: BLE001 - reported to the runner
        conn.send(("setup-failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    fds: dict[int, int] = {}
    while True:
        try:
            cmd, arg = conn.recv()
        except EOFError:
            break
        if cmd == "exit":
            break
        result: Any
        try:
            if cmd == "op":
                result = ops.execute(root, arg, fds)
            elif cmd == "snap":
                result = snapshot.take(arg or root, "mount" if arg is None else "upper")
            elif cmd == "closeall":
                for fd in fds.values():
                    with contextlib.suppress(OSError):
                        os.close(fd)
                fds.clear()
                result = None
            else:
                result = ("crash", f"unknown command {cmd}")
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            result = ("crash", f"{type(e).__name__}: {e}")
        conn.send(result)
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)


class Worker:
    """Handle on one forked worker serving the mount at *root*.

    *setup* runs in the worker first (the unprivileged mode mounts the kernel
    overlay there, in the worker's own namespaces); ``WorkerSetupError`` says
    why it failed.
    """

    def __init__(self, root: bytes, timeout: float, setup: Callable[[], None] | None = None):
        self.root = root
        self.timeout = timeout
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, root, setup), daemon=True)
        self.proc.start()
        child.close()
        self.dead = False
        if not self.conn.poll(timeout):
            self.stop()
            raise WorkerSetupError("the worker did not start")
        state, detail = self.conn.recv()
        if state != "ready":
            self.dead = True
            self.stop()
            raise WorkerSetupError(detail)

    def call(self, cmd: str, arg: Any = None, timeout: float | None = None) -> Any:
        if self.dead:
            raise Hang("worker already gone")
        self.conn.send((cmd, arg))
        if not self.conn.poll(self.timeout if timeout is None else timeout):
            self.dead = True
            raise Hang(f"{cmd} {arg} timed out")
        try:
            return self.conn.recv()
        except EOFError as e:
            self.dead = True
            raise Hang(f"worker died during {cmd} {arg}") from e

    def stop(self) -> None:
        """Close fds and exit; kill if it does not exit (e.g. stuck on a dead mount)."""
        if not self.dead:
            with contextlib.suppress(Hang):
                self.call("closeall", timeout=5)
        if not self.dead:
            with contextlib.suppress(OSError):
                self.conn.send(("exit", None))
        self.conn.close()
        self.proc.join(2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
