"""Real mounts for tests: unionfs daemons and kernel overlays that never outlive a test.

Every helper here unmounts in ``finally``; when a clean unmount fails it falls
back to a lazy one and kills the daemon *it started* (by PID), so a broken test
can never leave a stale FUSE mount that would hang later runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UNMOUNT_GRACE = 5.0  # how often an exiting daemon is checked on after its unmount


def _mountinfo(mountpoint: str | os.PathLike[str]) -> list[bytes] | None:
    """The /proc/self/mountinfo fields of the last mount exactly at *mountpoint*."""
    # Only the parent is resolved: a stat of the mountpoint itself would hang on a
    # FUSE daemon that stopped answering.
    path = os.path.abspath(mountpoint)
    parent, name = os.path.split(path)
    target = os.fsencode(os.path.join(os.path.realpath(parent), name))
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            if point == target:
                found = fields  # the last mount wins
    return found


def mount_type(mountpoint: str | os.PathLike[str]) -> str | None:
    """The filesystem type mounted exactly at *mountpoint*, or None (bytes-exact)."""
    fields = _mountinfo(mountpoint)
    return None if fields is None else fields[fields.index(b"-") + 1].decode()


def mount_device(mountpoint: str | os.PathLike[str]) -> bytes | None:
    """The ``major:minor`` of the filesystem mounted exactly at *mountpoint*, or None."""
    fields = _mountinfo(mountpoint)
    return None if fields is None else fields[2]


def mounted_elsewhere(device: bytes) -> bool:
    """Whether another mount namespace still has the filesystem *device* mounted."""
    mine = os.readlink("/proc/self/ns/mnt")
    seen = {mine}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
            if ns in seen:
                continue
            seen.add(ns)
            with open(f"/proc/{pid}/mountinfo", "rb") as f:
                if any(line.split()[2] == device for line in f):
                    return True
        except OSError:
            continue
    return False


def lazy_unmount(mountpoint: str | os.PathLike[str]) -> None:
    """Detach a mount that may hang; an ordinary user does it through fusermount3."""
    cmd = ["umount", "-l"] if os.geteuid() == 0 else ["fusermount3", "-u", "-z"]
    subprocess.run([*cmd, os.fspath(mountpoint)], capture_output=True, check=False)


def escape_path(path: str | os.PathLike[str]) -> str:
    """Escape a path for a fuse-overlayfs style ``-o`` option value."""
    return os.fspath(path).replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def overlay_options(
    lowers: Sequence[str | os.PathLike[str]],
    upper: str | os.PathLike[str] | None = None,
    work: str | os.PathLike[str] | None = None,
) -> str:
    opts = "lowerdir=" + ":".join(escape_path(p) for p in lowers)
    if upper is not None:
        opts += f",upperdir={escape_path(upper)}"
    if work is not None:
        opts += f",workdir={escape_path(work)}"
    return opts


@dataclass
class UnionMount:
    """A running unionfs daemon in the foreground (``-f``), owned by the test."""

    mountpoint: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)
    device: bytes | None = None  # major:minor of the mount, once it is up

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def unmount(self, timeout: float = 60.0) -> int:
        """Unmount and wait for the daemon; returns its exit status.

        An unmount refused as busy is tried again: a process that just closed
        its last file there may not have been reaped yet. Falls back to a lazy
        unmount and SIGKILL of our own daemon if the clean path does not finish
        in *timeout* seconds (a hang, not a slow machine).
        """
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and mount_type(self.mountpoint):
            res = subprocess.run(
                ["fusermount3", "-u", os.fspath(self.mountpoint)], capture_output=True, check=False
            )
            if res.returncode == 0 or b"busy" not in res.stderr or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        try:
            return self.proc.wait(timeout=min(max(deadline - time.monotonic(), 1.0), UNMOUNT_GRACE))
        except subprocess.TimeoutExpired:
            pass
        while self.proc.poll() is None and time.monotonic() < deadline:
            if (
                mount_type(self.mountpoint) is None
                and self.device is not None
                and mounted_elsewhere(self.device)
            ):
                # Unmounted here, yet the daemon goes on: a mount namespace made meanwhile
                # (another program's container, unshare -m) holds a copy of the mount,
                # and the kernel keeps the connection for it. Stop the daemon the way a
                # user would (SIGTERM unmounts cleanly); its status still tells.
                self.proc.terminate()
                break
            try:
                return self.proc.wait(timeout=UNMOUNT_GRACE)
            except subprocess.TimeoutExpired:
                pass
        try:
            return self.proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            self.kill()
            return -signal.SIGKILL

    def kill(self) -> None:
        """Hard stop: SIGKILL of the daemon we started (first, so nothing below can
        block on it), then a lazy unmount."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if mount_type(self.mountpoint) is not None:
            lazy_unmount(self.mountpoint)


def unionfs_command() -> list[str]:
    return [sys.executable, "-m", "unionfs"]


def faulty_command(faults: str) -> list[str]:
    """The daemon with faults planted in its core (``tests/faults.py``)."""
    return [sys.executable, "-m", "tests.faults", faults, "--"]


def start_unionfs(
    lowers: Sequence[str | os.PathLike[str]],
    mountpoint: str | os.PathLike[str],
    upper: str | os.PathLike[str] | None = None,
    work: str | os.PathLike[str] | None = None,
    extra_options: str = "",
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = 15.0,
    command: Sequence[str] | None = None,
) -> UnionMount:
    """Start ``unionfs -f`` and return once the mount is visible in mountinfo."""
    mnt = Path(mountpoint)
    opts = overlay_options(lowers, upper, work)
    # ``make test`` runs parts of the suite again with other options (passthrough=on);
    # a test's own options come after them, and so win.
    if os.environ.get("UNIONFS_TEST_OPTIONS"):
        opts += "," + os.environ["UNIONFS_TEST_OPTIONS"]
    if extra_options:
        opts += "," + extra_options
    log = Path(log_path) if log_path else mnt.parent / f".{mnt.name}.unionfs.log"
    cmd = [*(command or unionfs_command()), "-f", *args, "-o", opts, os.fspath(mnt)]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.fspath(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=full_env)
    um = UnionMount(mnt, proc, log, cmd)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if mount_type(mnt) == "fuse.unionfs":
                um.device = mount_device(mnt)
                return um
            if proc.poll() is not None:
                raise RuntimeError(f"unionfs exited with {proc.returncode}: {um.log()}")
            time.sleep(0.02)
    except BaseException:  # ^C or SIGTERM while waiting: the caller never gets it to stop
        um.kill()
        raise
    um.kill()
    raise RuntimeError(f"unionfs did not mount within {timeout}s: {um.log()}")


@contextlib.contextmanager
def unionfs_mounted(*a: object, **kw: object) -> Iterator[UnionMount]:
    """Context manager around :func:`start_unionfs` that always unmounts."""
    um = start_unionfs(*a, **kw)  # type: ignore[arg-type]
    try:
        yield um
    finally:
        um.unmount()


@contextlib.contextmanager
def mounted_by(command: Sequence[str], mountpoint: str | os.PathLike[str]) -> Iterator[Path]:
    """Mount with *command* (a ``mount ...`` whose last word is *mountpoint*) and always
    unmount (lazily when the mount is busy)."""
    mnt = Path(mountpoint)
    subprocess.run([*command, os.fspath(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        res = subprocess.run(["umount", os.fspath(mnt)], capture_output=True, check=False)
        if res.returncode != 0:
            lazy_unmount(mnt)


def overlay_mounted(
    options: str, mountpoint: str | os.PathLike[str]
) -> contextlib.AbstractContextManager[Path]:
    """The kernel's overlayfs mounted with exactly *options*; always unmounted."""
    return mounted_by(["mount", "-t", "overlay", "overlay", "-o", options], mountpoint)


def kernel_overlay(
    lowers: Sequence[str | os.PathLike[str]],
    mountpoint: str | os.PathLike[str],
    upper: str | os.PathLike[str] | None = None,
    work: str | os.PathLike[str] | None = None,
    options: str = "",
) -> contextlib.AbstractContextManager[Path]:
    """Mount the kernel's overlayfs (the reference), with *options* besides the layers,
    and always unmount it."""
    if len(lowers) == 1 and upper is None:
        # The kernel needs two lowers for a read-only overlay; an empty one is neutral.
        raise ValueError("kernel overlay needs an upper or at least two lowers")
    opts = overlay_options(lowers, upper, work) + ("," + options if options else "")
    return overlay_mounted(opts, mountpoint)
