"""The two kinds of side: the kernel overlay (reference) and a unionfs daemon.

Both are wrapped in :class:`Side` with a clean ``close`` and a brutal ``abort``
(lazy unmount, SIGKILL of the daemon *this suite started*, by PID), so that a
hung or broken mount never survives a case.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.mounting import UnionMount, lazy_unmount, mount_type, overlay_options, start_unionfs

# userns-kernel: the kernel overlay with userxattr, mounted by an ordinary user in
# a user namespace of the side's worker (tests/conformance/userns.py).
KINDS = ("kernel", "unionfs", "userns-kernel")


class MountError(Exception):
    pass


class Side:
    """One mounted overlay of either kind."""

    def __init__(
        self, kind: str, lowers: list[bytes], upper: bytes | None, work: bytes | None, mnt: bytes
    ):
        self.kind = kind
        self.mnt = mnt
        self.daemon: UnionMount | None = None
        self.mounted = False
        # Run by the side's worker before anything else (the worker mounts it).
        self.worker_setup: Callable[[], None] | None = None
        low = [os.fsdecode(p) for p in lowers]
        up = os.fsdecode(upper) if upper else None
        wk = os.fsdecode(work) if work else None
        if kind == "userns-kernel":
            from tests.conformance.userns import kernel_mount_in_userns

            self.worker_setup = kernel_mount_in_userns(lowers, upper, work, mnt)
            return  # mounted by the worker; unmounted when the worker's namespace dies
        if kind == "kernel":
            res = subprocess.run(
                [
                    "mount",
                    "-t",
                    "overlay",
                    "overlay",
                    "-o",
                    overlay_options(low, up, wk),
                    os.fsdecode(mnt),
                ],
                capture_output=True,
                check=False,
            )
            if res.returncode != 0:
                raise MountError(f"kernel mount failed: {res.stderr.decode(errors='replace')}")
        else:
            if os.geteuid() != 0:  # the unprivileged mode: callers as on the kernel side
                from tests.conformance.userns import caller_in_userns

                self.worker_setup = caller_in_userns
            try:
                self.daemon = start_unionfs(
                    low, os.fsdecode(mnt), up, wk, log_path=os.fsdecode(mnt) + ".log"
                )
            except RuntimeError as e:
                raise MountError(str(e)) from e
        self.mounted = True

    @property
    def pid(self) -> int | None:
        return self.daemon.pid if self.daemon else None

    def log(self) -> str:
        return self.daemon.log() if self.daemon else ""

    def close(self) -> str | None:
        """Unmount cleanly; returns an error description, or None on success."""
        if not self.mounted:
            return None
        self.mounted = False
        if self.daemon is not None:
            status = self.daemon.unmount()
            if mount_type(os.fsdecode(self.mnt)) is not None:
                self.daemon.kill()
                return "unionfs still mounted after unmount"
            return None if status == 0 else f"unionfs exited with status {status}"
        res = subprocess.run(["umount", os.fsdecode(self.mnt)], capture_output=True, check=False)
        if res.returncode != 0:
            lazy_unmount(os.fsdecode(self.mnt))
            return f"umount failed: {res.stderr.decode(errors='replace').strip()}"
        return None

    def abort(self) -> None:
        """Lazy unmount and kill our daemon; used after a hang or on any exception."""
        self.mounted = False
        # Kill first: anything that stats the mountpoint (even realpath) would
        # block on a stopped/hung daemon; a dead daemon aborts the connection.
        if self.daemon is not None and self.daemon.proc.poll() is None:
            self.daemon.proc.kill()
            self.daemon.proc.wait(timeout=10)
        lazy_unmount(os.fsdecode(self.mnt))  # harmless when nothing is mounted there


def unionfs_usable() -> bool:
    """True when ``python -m unionfs --version`` works (the daemon is importable)."""
    from tests.mounting import REPO, unionfs_command

    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(
        [*unionfs_command(), "--version"],
        capture_output=True,
        check=False,
        cwd=Path(REPO),
        env=env,
        timeout=60,
    )
    return res.returncode == 0
