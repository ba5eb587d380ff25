"""The operation vocabulary: generation from a seed and execution against a mount.

An :class:`Op` is plain data (a name and arguments) so that an op list can be
generated once, replayed on both sides, printed, and cut down by the shrinker.
Ops never depend on the outcome of earlier ops: an op that refers to a file
descriptor slot that is not open simply reports ``EBADF``-like ``noslot`` on
both sides, so any sub-list of ops is again a valid test.

Execution happens in a worker process (see :mod:`tests.conformance.worker`);
:func:`execute` is the per-op code that runs there.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import stat
from dataclasses import dataclass
from typing import Any

RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
SYS_RENAMEAT2 = 316  # x86_64
AT_FDCWD = -100
XATTR_CREATE, XATTR_REPLACE = os.XATTR_CREATE, os.XATTR_REPLACE
ST_RDONLY = 1

_libc = ctypes.CDLL(None, use_errno=True)

OPEN_FLAGS: dict[str, int] = {
    "RDONLY": os.O_RDONLY,
    "WRONLY": os.O_WRONLY,
    "RDWR": os.O_RDWR,
    "WRONLY|CREAT": os.O_WRONLY | os.O_CREAT,
    "RDWR|CREAT|EXCL": os.O_RDWR | os.O_CREAT | os.O_EXCL,
    "WRONLY|TRUNC": os.O_WRONLY | os.O_TRUNC,
    "RDWR|CREAT|TRUNC": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "WRONLY|APPEND": os.O_WRONLY | os.O_APPEND,
    "RDONLY|DIRECTORY": os.O_RDONLY | os.O_DIRECTORY,
    "RDONLY|NOFOLLOW": os.O_RDONLY | os.O_NOFOLLOW,
    "RDWR|NOFOLLOW": os.O_RDWR | os.O_NOFOLLOW,
    "RDONLY|TRUNC": os.O_RDONLY | os.O_TRUNC,
    "PATH": os.O_PATH,
    "PATH|NOFOLLOW": os.O_PATH | os.O_NOFOLLOW,
    "RDWR|TMPFILE": os.O_RDWR | os.O_TMPFILE,
}
FALLOCATE_MODES = {
    "0": 0,
    "KEEP_SIZE": 0x01,
    "PUNCH_HOLE|KEEP_SIZE": 0x03,
    "ZERO_RANGE": 0x10,
    "ZERO_RANGE|KEEP_SIZE": 0x11,
    "COLLAPSE_RANGE": 0x08,
    "INSERT_RANGE": 0x20,
}
SEEK_WHENCE = {"DATA": os.SEEK_DATA, "HOLE": os.SEEK_HOLE}
RENAME_FLAGS = {
    "0": 0,
    "NOREPLACE": RENAME_NOREPLACE,
    "EXCHANGE": RENAME_EXCHANGE,
    "WHITEOUT": RENAME_WHITEOUT,
}


@dataclass(frozen=True)
class Op:
    """One operation; ``args`` hold only bytes, ints and strs (printable, picklable)."""

    name: str
    args: tuple[Any, ...] = ()

    def __str__(self) -> str:
        def fmt(a: Any) -> str:
            if isinstance(a, bytes) and len(a) > 48:
                return repr(a[:24]) + f"+..({len(a)}B)"
            if (
                isinstance(a, int)
                and a > 7
                and self.name in ("chmod", "mkdir", "open", "fchmod", "mknod")
            ):
                return oct(a)
            return repr(a)

        return f"{self.name}({', '.join(fmt(a) for a in self.args)})"


# --- constructors, used by the hand-written cases ------------------------------------------


def op(name: str, *args: Any) -> Op:
    return Op(name, tuple(args))


# --- generation ----------------------------------------------------------------------------

XATTR_NAMES = (b"user.k1", b"user.k2", b"user.new", b"trusted.overlay.opaque")
MODES = (0o644, 0o755, 0o600, 0o4755, 0o2755, 0o1777, 0o6755, 0o000, 0o2644)


class OpGenerator:
    """Draws ops over a pool of paths that grows with the names the ops create."""

    def __init__(self, rng: random.Random, paths: list[bytes], existing: dict[bytes, str]):
        self.rng = rng
        self.pool = [b""] + list(paths)  # b"" is the mount root itself
        self.existing = [b""] + sorted(existing)
        self.dirs = [b""] + sorted(p for p, k in existing.items() if k == "dir")
        self.files = sorted(p for p, k in existing.items() if k in ("file", "hardlink")) or [b"a"]
        self.open_slots: set[int] = set()
        self.counter = 0

    def path(self) -> bytes:
        """Mostly a path that exists initially; sometimes any name ever seen."""
        return self.rng.choice(self.existing if self.rng.random() < 0.7 else self.pool)

    def slot(self, opening: bool = False) -> int:
        r = self.rng
        if opening or not self.open_slots or r.random() < 0.1:
            return r.randint(0, 2)
        return r.choice(sorted(self.open_slots))

    def new_path(self, is_dir: bool = False) -> bytes:
        """A fresh name, mostly below a directory."""
        self.counter += 1
        parent = self.rng.choice(self.dirs if self.rng.random() < 0.85 else self.pool)
        name = self.rng.choice(
            [b"new%d" % self.counter, b"n e w%d" % self.counter, b"\xfenew%d" % self.counter]
        )
        p = parent + b"/" + name if parent else name
        self.pool.append(p)
        self.existing.append(p)
        if is_dir:
            self.dirs.append(p)
        return p

    def target(self) -> bytes:
        return self.rng.choice(
            [self.path(), self.new_path()] if self.rng.random() < 0.5 else [self.path()]
        )

    def data(self) -> bytes:
        return self.rng.randbytes(self.rng.choice([1, 10, 100, 5000]))

    def one(self) -> Op:
        r = self.rng
        slot = self.slot()
        kinds = {
            "open": 14,
            "close": 4,
            "read": 3,
            "pread": 3,
            "write": 5,
            "pwrite": 5,
            "ftruncate": 2,
            "fstat": 3,
            "fchmod": 1,
            "fdreaddir": 1,
            "fallocate": 3,
            "lseek": 3,
            "copy_file_range": 2,
            "truncate": 3,
            "unlink": 6,
            "mkdir": 5,
            "rmdir": 4,
            "rename": 10,
            "link": 3,
            "symlink": 3,
            "mknod": 2,
            "chmod": 4,
            "chown": 3,
            "utimes": 3,
            "setxattr": 4,
            "getxattr": 2,
            "listxattr": 2,
            "removexattr": 2,
            "readdir": 3,
            "readlink": 2,
            "stat": 2,
            "lstat": 2,
            "access": 2,
            "statvfs": 1,
        }
        k = r.choices(list(kinds), list(kinds.values()))[0]
        if k == "open":
            flags = r.choice(list(OPEN_FLAGS))
            if "CREAT" in flags and r.random() < 0.5:
                p = self.new_path()
                self.files.append(p)
            elif "DIRECTORY" in flags or "TMPFILE" in flags:
                p = r.choice(self.dirs)
            else:
                p = r.choice(self.files) if r.random() < 0.75 else self.path()
            slot = self.slot(opening=True)
            self.open_slots.add(slot)
            return op("open", slot, p, flags, r.choice((0o644, 0o600, 0o4755)))
        if k == "close":
            self.open_slots.discard(slot)
            return op(k, slot)
        if k in ("fstat", "fdreaddir"):
            return op(k, slot)
        if k == "read":
            return op(k, slot, r.choice((1, 100, 10000)))
        if k == "pread":
            return op(k, slot, r.choice((0, 5, 4096, 600_000)), r.choice((10, 10000)))
        if k == "write":
            return op(k, slot, self.data())
        if k == "pwrite":
            return op(k, slot, r.choice((0, 3, 4095, 70000, 2_000_000)), self.data())
        if k == "ftruncate":
            return op(k, slot, r.choice((0, 1, 5000, 3_000_000)))
        if k == "fallocate":
            # Block-aligned mostly: COLLAPSE_RANGE and INSERT_RANGE refuse anything else.
            return op(
                k,
                slot,
                r.choice(list(FALLOCATE_MODES)),
                r.choice((0, 4096, 8192, 1 << 20, 100)),
                r.choice((4096, 8192, 1 << 20, 3000)),
            )
        if k == "lseek":
            return op(
                k, slot, r.choice((0, 100, 8192, 600_000, 1 << 20)), r.choice(("DATA", "HOLE"))
            )
        if k == "copy_file_range":
            return op(
                k,
                slot,
                self.slot(),
                r.choice((0, 50, 8192)),
                r.choice((0, 10, 4096, 70000)),
                r.choice((1, 100, 10000, 1 << 20)),
            )
        if k == "fchmod":
            return op(k, slot, r.choice(MODES))
        if k == "truncate":
            return op(k, self.path(), r.choice((0, 7, 100_000)))
        if k in ("unlink", "rmdir", "readdir", "readlink", "stat", "lstat", "listxattr", "statvfs"):
            return op(k, self.path())
        if k == "mkdir":
            return op(
                k,
                self.new_path(is_dir=True) if r.random() < 0.6 else self.path(),
                r.choice((0o755, 0o700, 0o1777)),
            )
        if k == "rename":
            flags = r.choices(list(RENAME_FLAGS), [6, 2, 2, 1])[0]
            dst = self.new_path() if r.random() < 0.4 else self.path()
            return op(k, self.path(), dst, flags)
        if k == "link":
            return op(k, self.path(), self.new_path() if r.random() < 0.8 else self.path())
        if k == "symlink":
            return op(k, r.choice((b"a", b"../x", b"/etc", b"dir", b"dangling")), self.new_path())
        if k == "mknod":
            kind = r.choice(("fifo", "fifo", "chr", "blk"))
            return op(
                k,
                self.new_path() if r.random() < 0.8 else self.path(),
                kind,
                0o640,
                r.choice((1, 7)),
                r.choice((3, 5)),
            )
        if k == "chmod":
            return op(k, self.path(), r.choice(MODES))
        if k == "chown":
            return op(
                k,
                self.path(),
                r.choice((0, 1000, 1001, -1)),
                r.choice((0, 100, 1000, -1)),
                r.random() < 0.7,
            )
        if k == "utimes":
            t = 1_200_000_000 * 10**9 + r.randint(0, 10**6) * 10**9 + r.randint(0, 999_999_999)
            return op(k, self.path(), t - 5 * 10**9, t, r.random() < 0.7)
        if k == "setxattr":
            flags = r.choice(("0", "CREATE", "REPLACE"))
            return op(
                k, self.path(), r.choice(XATTR_NAMES[:3]), r.randbytes(r.randint(0, 12)), flags
            )
        if k in ("getxattr", "removexattr"):
            return op(k, self.path(), r.choice(XATTR_NAMES))
        if k == "access":
            return op(
                k, self.path(), r.choice((os.F_OK, os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK))
            )
        raise AssertionError(k)


def generate_ops(
    rng: random.Random, paths: list[bytes], existing: dict[bytes, str], count: int
) -> list[Op]:
    gen = OpGenerator(rng, paths, existing)
    return [gen.one() for _ in range(count)]


# --- execution (runs in the worker process) -------------------------------------------------


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    res = _libc.syscall(SYS_RENAMEAT2, AT_FDCWD, old, AT_FDCWD, new, flags)
    if res != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Escape(Exception):
    """The op would leave the mount (e.g. through ``etc -> /etc``), or ask what only
    the kernel's FUSE module answers: not executed."""


def _inside(root: bytes, path: bytes, follow: bool) -> bytes:
    """Return *path* under *root*, refusing paths that resolve outside *root*.

    The layers contain absolute symlinks (``etc -> /etc``); an op must never
    write to the host through them, on either side. The check depends only on
    the merged tree, so both sides make the same decision as long as their
    trees agree (and if they do not, that was reported already).
    """
    full = os.path.join(root, path) if path else root
    check = full if follow else os.path.dirname(full.rstrip(b"/")) or b"/"
    real = os.path.realpath(check)
    if real != root and not real.startswith(root + b"/"):
        raise Escape
    return full


def stat_result(st: os.stat_result) -> dict[str, Any]:
    """Raw fields of a stat; the parent decides what is compared (see compare.py)."""
    return {
        "fmt": stat.S_IFMT(st.st_mode),
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "size": st.st_size,
        "nlink": st.st_nlink,
        "mtime": st.st_mtime_ns,
        "rdev": st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
    }


def execute(root: bytes, o: Op, fds: dict[int, int]) -> tuple[str, Any]:
    """Run one op and return ``("ok", value)`` or ``("err", errno-name)``."""
    try:
        return "ok", _execute(root, o, fds)
    except Escape:
        return "skip", "escape"
    except OSError as e:
        return "err", errno.errorcode.get(e.errno or 0, str(e.errno))


def _open(root: bytes, o: Op, fds: dict[int, int]) -> str | None:
    slot, path, flags, mode = o.args
    if slot in fds:
        os.close(fds.pop(slot))
    full = _inside(root, path, follow=not OPEN_FLAGS[flags] & os.O_NOFOLLOW)
    try:
        st = os.stat(full)
    except OSError:
        st = None
    if st is not None and (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise Escape  # never open host devices
    # O_NONBLOCK: a fifo opened for reading must not block the worker.
    fd = fds[slot] = os.open(full, OPEN_FLAGS[flags] | os.O_NONBLOCK, mode)
    # What the fd is, when an exclusion must know (lseek of a directory).
    return "dir" if "PATH" not in flags and stat.S_ISDIR(os.fstat(fd).st_mode) else None


def _execute(root: bytes, o: Op, fds: dict[int, int]) -> Any:
    a = o.args
    n = o.name
    if n == "open":
        return _open(root, o, fds)
    if n == "copy_file_range":
        if a[0] not in fds or a[1] not in fds:
            return "noslot"
        return os.copy_file_range(fds[a[0]], fds[a[1]], a[4], a[2], a[3])
    if n in (
        "close",
        "read",
        "pread",
        "write",
        "pwrite",
        "ftruncate",
        "fstat",
        "fchmod",
        "fdreaddir",
        "fallocate",
        "lseek",
    ):
        if a[0] not in fds:
            return "noslot"
        fd = fds[a[0]]
        if n == "close":
            os.close(fds.pop(a[0]))
            return None
        if n == "read":
            return os.read(fd, a[1])
        if n == "pread":
            return os.pread(fd, a[2], a[1])
        if n == "write":
            return os.write(fd, a[1])
        if n == "pwrite":
            return os.pwrite(fd, a[2], a[1])
        if n == "ftruncate":
            return os.ftruncate(fd, a[1])
        if n == "fstat":
            return stat_result(os.fstat(fd))
        if n == "fchmod":
            return os.fchmod(fd, a[1])
        if n == "fallocate":
            if _libc.fallocate64(
                fd, FALLOCATE_MODES[a[1]], ctypes.c_int64(a[2]), ctypes.c_int64(a[3])
            ):
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
            return None
        if n == "lseek":
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                # On a FUSE directory the kernel's FUSE module answers SEEK_DATA and
                # SEEK_HOLE itself (README: Known differences); the offset it leaves
                # would then tell the sides apart in every later read of the fd.
                raise Escape
            return os.lseek(fd, a[1], SEEK_WHENCE[a[2]])
        return sorted(os.listdir(fd))
    follow_ops = {
        "truncate",
        "readdir",
        "stat",
        "listxattr",
        "statvfs",
        "chmod",
        "setxattr",
        "getxattr",
        "removexattr",
        "access",
    }
    if n in follow_ops:
        p = _inside(root, a[0], follow=True)
        if n == "truncate":
            return os.truncate(p, a[1])
        if n == "readdir":
            return sorted(os.listdir(p))
        if n == "stat":
            return stat_result(os.stat(p))
        if n == "listxattr":
            return sorted(os.listxattr(p))
        if n == "statvfs":
            return bool(os.statvfs(p).f_flag & ST_RDONLY)
        if n == "chmod":
            return os.chmod(p, a[1])
        if n == "setxattr":
            flags = {"0": 0, "CREATE": XATTR_CREATE, "REPLACE": XATTR_REPLACE}[a[3]]
            return os.setxattr(p, a[1], a[2], flags)
        if n == "getxattr":
            return os.getxattr(p, a[1])
        if n == "removexattr":
            return os.removexattr(p, a[1])
        if _libc.access(p, a[1]) != 0:  # os.access() would hide the errno
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return None
    if n in ("chown", "utimes"):
        follow = a[-1]
        p = _inside(root, a[0], follow=follow)
        if n == "chown":
            return os.chown(p, a[1], a[2], follow_symlinks=follow)
        return os.utime(p, ns=(a[1], a[2]), follow_symlinks=follow)
    if n == "unlink":
        return os.unlink(_inside(root, a[0], follow=False))
    if n == "rmdir":
        return os.rmdir(_inside(root, a[0], follow=False))
    if n == "mkdir":
        return os.mkdir(_inside(root, a[0], follow=False), a[1])
    if n == "readlink":
        return os.readlink(_inside(root, a[0], follow=False))
    if n == "lstat":
        return stat_result(os.lstat(_inside(root, a[0], follow=False)))
    if n == "rename":
        src, dst = _inside(root, a[0], follow=False), _inside(root, a[1], follow=False)
        return renameat2(src, dst, RENAME_FLAGS[a[2]])
    if n == "link":
        src, dst = _inside(root, a[0], follow=False), _inside(root, a[1], follow=False)
        return os.link(src, dst, follow_symlinks=False)
    if n == "symlink":
        return os.symlink(a[0], _inside(root, a[1], follow=False))
    if n == "mknod":
        path, kind, mode, major, minor = a
        fmt = {"fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK}[kind]
        return os.mknod(_inside(root, path, follow=False), fmt | mode, os.makedev(major, minor))
    raise ValueError(f"unknown op {n}")
