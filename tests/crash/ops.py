"""The workload's operations: one system call each, run the same way on any tree.

An :class:`Op` is plain data. :func:`run` performs it below a root directory (the
unionfs mount, or the kernel overlay that replays the log) and returns ``"ok"`` or
the errno's name. Open files are named by handle numbers in the op, so a replay
opens its own descriptors for the same handles. Each op is one system call on
the tree (``create`` and ``open`` keep the file open; ``close`` is its own op), so
an operation in flight at a kill is one request of the daemon, and a write of at
most one page is one write in the daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from unionfs.overlay.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

AT_FDCWD = -100
PAGE = 4096
OPEN_FLAGS = {
    "WRONLY": os.O_WRONLY,
    "RDWR": os.O_RDWR,
    "WRONLY|TRUNC": os.O_WRONLY | os.O_TRUNC,
    "WRONLY|APPEND": os.O_WRONLY | os.O_APPEND,
}
RENAME_FLAGS = {"": 0, "NOREPLACE": RENAME_NOREPLACE, "EXCHANGE": RENAME_EXCHANGE}
# What a daemon that died answers: the request was aborted, or never reached it.
GONE = ("ENOTCONN", "ECONNABORTED")


@dataclass(frozen=True)
class Op:
    name: str
    args: tuple[Any, ...]
    uid: int = 0  # made by this user (fsuid and fsgid), not root

    def __str__(self) -> str:
        def fmt(i: int, a: Any) -> str:
            if isinstance(a, bytes):
                return f"<{len(a)} bytes crc={zlib.crc32(a):08x}>"
            if i == 1 and self.name in ("chmod", "mkdir", "create", "mkfifo"):
                return oct(a)  # the mode (a create's handle comes after it)
            return repr(a)

        who = f"as {self.uid}: " if self.uid else ""
        return f"{who}{self.name}({', '.join(fmt(i, a) for i, a in enumerate(self.args))})"


def _p(root: str, path: str) -> str:
    return os.path.join(root, path)


def run(op: Op, root: str, handles: dict[int, int]) -> str:
    """Perform *op* below *root*; ``"ok"`` or the errno's name."""
    try:
        with _as_user(op.uid):
            _run(op, root, handles)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def _as_user(uid: int) -> Iterator[None]:
    """This thread's filesystem ids are *uid*'s (and its group's, the same number)
    for the call: a mount sees that user make the entry. Back to root after, which
    gives back the filesystem capabilities the change took."""
    if not uid:
        yield
        return
    _libc.setfsgid(uid)
    _libc.setfsuid(uid)
    try:
        if _libc.setfsuid(-1) != uid or _libc.setfsgid(-1) != uid:
            raise RuntimeError(f"could not take the filesystem ids of user {uid}")
        yield
    finally:
        _libc.setfsuid(0)
        _libc.setfsgid(0)


def _fd(handles: dict[int, int], h: int) -> int:
    if h not in handles:
        raise OSError(errno.EBADF, "handle not open")
    return handles[h]


def _run(op: Op, root: str, handles: dict[int, int]) -> None:
    a = op.args
    n = op.name
    if n == "mkdir":
        os.mkdir(_p(root, a[0]), a[1])
    elif n == "rmdir":
        os.rmdir(_p(root, a[0]))
    elif n == "unlink":
        os.unlink(_p(root, a[0]))
    elif n == "create":
        handles[a[2]] = os.open(_p(root, a[0]), os.O_WRONLY | os.O_CREAT | os.O_EXCL, a[1])
    elif n == "open":
        handles[a[2]] = os.open(_p(root, a[0]), OPEN_FLAGS[a[1]] | os.O_NOFOLLOW)
    elif n == "write":
        fd = _fd(handles, a[0])
        if a[1] is None:
            os.write(fd, a[2])
        else:
            os.pwrite(fd, a[2], a[1])
    elif n == "ftruncate":
        os.ftruncate(_fd(handles, a[0]), a[1])
    elif n == "close":
        os.close(handles.pop(a[0]) if a[0] in handles else _fd(handles, a[0]))
    elif n == "truncate":
        os.truncate(_p(root, a[0]), a[1])
    elif n == "rename":
        renameat2(
            AT_FDCWD,
            os.fsencode(_p(root, a[0])),
            AT_FDCWD,
            os.fsencode(_p(root, a[1])),
            RENAME_FLAGS[a[2]],
        )
    elif n == "symlink":
        os.symlink(a[0], _p(root, a[1]))
    elif n == "link":
        os.link(_p(root, a[0]), _p(root, a[1]), follow_symlinks=False)
    elif n == "mkfifo":
        os.mkfifo(_p(root, a[0]), a[1])
    elif n == "chmod":
        os.chmod(_p(root, a[0]), a[1])
    elif n == "chown":
        os.chown(_p(root, a[0]), a[1], a[2], follow_symlinks=False)
    elif n == "utime":
        os.utime(_p(root, a[0]), ns=(a[1], a[1]), follow_symlinks=False)
    elif n == "setxattr":
        os.setxattr(_p(root, a[0]), a[1], a[2], follow_symlinks=False)
    else:
        raise ValueError(f"unknown op {op}")


def close_all(handles: dict[int, int]) -> None:
    """Close every handle (those of a dead mount fail; that is fine)."""
    for fd in handles.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    handles.clear()


# -- the namespace model the generator works from ------------------------------


def apply(model: dict[str, str], op: Op) -> None:
    """Update *model* (path -> ``d``/``f``/``l``/``p``) for an op that succeeded."""
    a = op.args
    n = op.name
    if n == "mkdir":
        model[a[0]] = "d"
    elif n in ("rmdir", "unlink"):
        model.pop(a[0], None)
    elif n == "create":
        model[a[0]] = "f"
    elif n == "symlink":
        model[a[1]] = "l"
    elif n == "mkfifo":
        model[a[0]] = "p"
    elif n == "link":
        model[a[1]] = model.get(a[0], "f")
    elif n == "rename":
        # Two names of one file: rename does nothing, which the model cannot tell; it
        # is made anew from the merged view after each kill anyway.
        src, dst, flags = a
        moved = _subtree(model, src)
        other = _subtree(model, dst)
        for p in list(moved) + list(other):
            model.pop(p, None)
        model.update({dst + p[len(src) :]: k for p, k in moved.items()})
        if flags == "EXCHANGE":
            model.update({src + p[len(dst) :]: k for p, k in other.items()})


def _subtree(model: dict[str, str], path: str) -> dict[str, str]:
    pre = path + "/"
    return {p: k for p, k in model.items() if p == path or p.startswith(pre)}
