"""System calls the ``os`` module lacks: ``openat2``, ``renameat2``, and data copying.

Everything here raises ``OSError`` with the kernel's errno, like ``os`` does.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

_libc = ctypes.CDLL(None, use_errno=True)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

_SYS_OPENAT2 = (
    437  # the same number on every architecture (added after the syscall table unification)
)
FICLONE = 0x40049409

_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def fd_path(dirfd: int, name: bytes = b"") -> bytes:
    """A path naming *name* in the directory *dirfd* (or the directory itself).

    The xattr calls have no ``*at`` form; ``/proc/self/fd/N/name`` reaches the
    exact directory the fd holds, and with ``follow_symlinks=False`` a trailing
    symlink is not followed either.
    """
    if name:
        return b"/proc/self/fd/%d/%s" % (dirfd, name)
    return b"/proc/self/fd/%d" % dirfd


def _raise_errno(what: bytes | str = "") -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), what)


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int = 0) -> None:
    """``renameat2(2)``: the flags let one call replace a file by a whiteout or swap two names."""
    if _renameat2(olddirfd, old, newdirfd, new, flags) != 0:
        _raise_errno(old)


_openat2_works = True


def open_beneath(dirfd: int, path: bytes, flags: int) -> int:
    """Open *path* relative to *dirfd* without following any symlink and without leaving *dirfd*.

    A layer's ``etc -> /etc`` must never make the daemon touch the host's /etc, so
    every component is resolved inside the layer. ``openat2`` does that in one
    call; kernels without it fall back to a component-by-component walk with
    ``O_NOFOLLOW``. A symlink met on the way gives ``ELOOP``; a trailing
    symlink is returned as an ``O_PATH`` fd when *flags* has ``O_PATH|O_NOFOLLOW``.
    """
    global _openat2_works
    if _openat2_works:
        how = _OpenHow(flags | os.O_CLOEXEC, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
        fd = _syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_long(dirfd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        if ctypes.get_errno() != errno.ENOSYS:
            _raise_errno(path)
        _openat2_works = False
    return _walk_beneath(dirfd, path, flags)


def _walk_beneath(dirfd: int, path: bytes, flags: int) -> int:
    parts = [p for p in path.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise OSError(errno.EXDEV, "path escapes its layer", path)
    cur = dirfd
    try:
        for part in parts[:-1]:
            nxt = os.open(
                part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur
            )
            if cur != dirfd:
                os.close(cur)
            cur = nxt
        last = parts[-1] if parts else b"."
        return os.open(last, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
    finally:
        if cur != dirfd:
            os.close(cur)


def clone_or_copy(src: int, dst: int, size: int) -> str:
    """Copy *size* bytes from *src* to *dst* keeping holes as holes; returns how:
    ``reflink``, ``copy_file_range``, ``read/write`` (or ``none``: only holes).

    A reflink (``FICLONE``) shares the blocks when the filesystem allows it;
    otherwise each data extent found with ``SEEK_DATA``/``SEEK_HOLE`` is copied
    in the kernel with ``copy_file_range``. No byte passes through Python unless
    both of those are refused.
    """
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return "reflink"
    except OSError:
        pass
    method = "none"  # until some data is copied: an empty or all-hole file
    off = 0
    while off < size:
        try:
            data = os.lseek(src, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        hole = min(os.lseek(src, data, os.SEEK_HOLE), size)
        if not _copy_range(src, dst, data, hole - data):
            method = "read/write"
        elif method == "none":
            method = "copy_file_range"
        off = hole
    os.ftruncate(dst, size)
    return method


def _copy_range(src: int, dst: int, off: int, count: int) -> bool:
    """Copy with ``copy_file_range``; False when it fell back to read/write."""
    end = off + count
    while off < end:
        try:
            n = os.copy_file_range(src, dst, end - off, off, off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            _copy_range_slow(src, dst, off, end - off)
            return False
        if n == 0:  # the source shrank under us
            return True
        off += n
    return True


def _copy_range_slow(src: int, dst: int, off: int, count: int) -> None:
    end = off + count
    while off < end:
        buf = os.pread(src, min(1 << 20, end - off), off)
        if not buf:
            return
        off += os.pwrite(dst, buf, off)
