"""The unionfs daemon that SIGKILLs itself at the N-th change it makes to its layers.

``python -m tests.crash.daemon N[+] [--arm-file PATH] -- UNIONFS-ARGS...`` runs the
ordinary command line after wrapping, in this process only, every system call that
can change a directory or file (creating, removing, renaming, writing, setting
attributes). Once the mount is set up (the workdir cleared), or with ``--arm-file``
once PATH exists (the crash runner creates it when its workload starts, so that its
own look at the tree, whose lookups may record origins, is no kill point), the
calls are counted, and the
process sends itself SIGKILL right before the N-th one, or right after it with
``N+``. A SIGKILL cannot be caught: this is the same death as a ``kill -9`` from
outside, placed exactly between two system calls, so every window between the
steps of an operation can be hit. Kills in the middle of a system call (a big
copy-up) are the job of the external ``kill -9`` with a random delay.

``--plant unsafe-remove`` additionally replaces the atomic swap of a file for its
whiteout with an unlink followed by a kill before the whiteout is made: a bug the
crash checker must report (its self-test).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

# os functions that change the layers; os.open only with these flags.
MUTATING = (
    "mkdir",
    "mknod",
    "mkfifo",
    "symlink",
    "link",
    "unlink",
    "rmdir",
    "rename",
    "replace",
    "chown",
    "fchown",
    "lchown",
    "chmod",
    "fchmod",
    "utime",
    "setxattr",
    "removexattr",
    "truncate",
    "ftruncate",
    "pwrite",
    "pwritev",
    "write",
    "copy_file_range",
    "sendfile",
)
OPEN_CHANGES = os.O_CREAT | os.O_TRUNC


class Trigger:
    """Counts changes to the layers and dies at the chosen one."""

    def __init__(self, at: int, after: bool, arm_file: str | None = None) -> None:
        self.at = at
        self.after = after
        self.count = 0
        self.armed = False
        self.arm_file = arm_file
        self.lock = threading.Lock()  # copy-up threads change the workdir too

    def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        if not self.armed:
            return fn(*args, **kw)
        if self.arm_file is not None:
            if not os.path.exists(self.arm_file):
                return fn(*args, **kw)
            self.arm_file = None
        with self.lock:
            self.count += 1
            hit = self.count == self.at
        if hit and not self.after:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            return fn(*args, **kw)
        finally:
            if hit:
                os.kill(os.getpid(), signal.SIGKILL)


def _wrap(trigger: Trigger) -> None:
    from unionfs.overlay import syscalls, union

    for name in MUTATING:
        real = getattr(os, name, None)
        if real is None:
            continue

        def wrapped(*a: Any, _real: Callable[..., Any] = real, **kw: Any) -> Any:
            return trigger.call(_real, *a, **kw)

        setattr(os, name, wrapped)
    real_open = os.open

    def open_(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        if flags & OPEN_CHANGES:
            return int(trigger.call(real_open, path, flags, *a, **kw))
        return real_open(path, flags, *a, **kw)

    os.open = open_
    real_renameat2 = syscalls._renameat2

    def renameat2(*a: Any) -> Any:
        return trigger.call(real_renameat2, *a)

    syscalls._renameat2 = renameat2  # type: ignore[assignment]
    # Start counting once the union is set up: the workdir clean-up at mount is not
    # what a kill point should land in (the mount would never come up).
    real_init = union.Union.__init__

    def init(self: Any, *a: Any, **kw: Any) -> None:
        real_init(self, *a, **kw)
        trigger.armed = True

    union.Union.__init__ = init  # type: ignore[method-assign]


def plant_unsafe_remove() -> None:
    """A remove that is not atomic: the entry goes, the daemon dies, no whiteout."""
    from unionfs.overlay import markers

    def replace_with_whiteout(dirfd: int, name: bytes, workfd: int, tmp: bytes) -> None:
        os.unlink(name, dir_fd=dirfd)
        os.kill(os.getpid(), signal.SIGKILL)

    markers.replace_with_whiteout = replace_with_whiteout


def main(argv: list[str]) -> int:
    sep = argv.index("--")
    spec, plants = argv[0], argv[1:sep]
    arm_file = None
    if plants[:1] == ["--arm-file"]:
        arm_file, plants = plants[1], plants[2:]
    if spec != "-":
        at = int(spec.rstrip("+"))
        _wrap(Trigger(at, after=spec.endswith("+"), arm_file=arm_file))
    if plants == ["--plant", "unsafe-remove"]:
        plant_unsafe_remove()
    elif plants:
        raise SystemExit(f"unknown arguments: {plants}")
    from unionfs.cli import main as unionfs_main

    return unionfs_main(argv[sep + 1 :])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
