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


COPY_CHUNK = 1 << 20  # the kernel overlay's copy-up chunk (OVL_COPY_UP_CHUNK_SIZE)


def clone_or_copy(src: int, dst: int, size: int) -> str:
    """Copy *size* bytes from *src* to *dst* as the kernel overlay's copy-up does;
    returns how: ``reflink``, ``copy_file_range``, ``read/write`` (or ``none``: only
    holes).

    A reflink (``FICLONE``) shares the blocks when the filesystem allows it.
    Otherwise the data is copied in the kernel (``copy_file_range``) in 1 MiB
    chunks, skipping each hole that ``SEEK_DATA`` finds at a chunk's start: a
    sparse file stays as sparse as the kernel's copy of it, so ``SEEK_DATA`` and
    ``SEEK_HOLE`` find the same holes on either. No byte passes through Python
    unless the filesystem refuses both.
    """
    method = copy_range_in_place(src, dst, size)
    os.ftruncate(dst, size)
    return method


def copy_range_in_place(src: int, dst: int, size: int) -> str:
    """``clone_or_copy`` into a file that already has its length: only what the
    copy writes below *size* is written, the rest of *dst* is left as it is."""
    if size >= os.fstat(src).st_size:
        try:
            fcntl.ioctl(dst, FICLONE, src)
            return "reflink"
        except OSError:
            pass
    method = "none"  # until some data is copied: an empty or all-hole file
    off = 0
    data = -1
    skip_holes = True
    while off < size:
        if skip_holes and data < off:
            try:
                data = os.lseek(src, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole remains
                    break
                skip_holes = False
            else:
                if data > off:
                    off = data  # past the hole
                    continue
        count = min(COPY_CHUNK, size - off)
        copied, fast = _copy_range(src, dst, off, count)
        if not fast:
            method = "read/write"
        elif method == "none":
            method = "copy_file_range"
        if copied == 0:
            break  # the source shrank under us
        off += count
    return method


def _copy_range(src: int, dst: int, off: int, count: int) -> tuple[int, bool]:
    """Copy *count* bytes at *off*: how many there were (less at the end), and
    whether ``copy_file_range`` did it (False: it fell back to read/write)."""
    end = off + count
    start = off
    while off < end:
        try:
            n = os.copy_file_range(src, dst, end - off, off, off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            return off - start + _copy_range_slow(src, dst, off, end - off), False
        if n == 0:  # the source shrank under us
            break
        off += n
    return off - start, True


def _copy_range_slow(src: int, dst: int, off: int, count: int) -> int:
    end = off + count
    start = off
    while off < end:
        buf = os.pread(src, min(1 << 20, end - off), off)
        if not buf:
            break
        off += os.pwrite(dst, buf, off)
    return off - start


OVERLAYFS_SUPER_MAGIC = 0x794C7630


def fs_magic(path: str | bytes | os.PathLike[str]) -> int:
    """The filesystem type of *path* (``statfs``'s ``f_type``), or 0 when unknown."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type comes first
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return 0
    return int(ctypes.c_long.from_buffer(buf).value)


# -- file handles (the overlay's origin records) -----------------------------------

MAX_HANDLE_SZ = 128
AT_EMPTY_PATH = 0x1000
_FS_IOC_GETFSUUID = 0x80111500  # _IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16]})


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(_FileHandle),
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_int,
]
_name_to_handle_at.restype = ctypes.c_int
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(_FileHandle), ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int


def name_to_handle(dirfd: int, name: bytes) -> tuple[int, bytes]:
    """``name_to_handle_at(2)`` of *name* in *dirfd* (not following a trailing symlink;
    an empty name: *dirfd* itself): the handle's type and bytes. Raises ``OSError``
    (EOPNOTSUPP: the filesystem makes no handles)."""
    fh = _FileHandle(MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int(0)
    flags = 0 if name else AT_EMPTY_PATH
    if _name_to_handle_at(dirfd, name, ctypes.byref(fh), ctypes.byref(mount_id), flags) != 0:
        _raise_errno(name)
    return fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes])


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int = os.O_PATH) -> int:
    """``open_by_handle_at(2)`` on the filesystem of *mount_fd* (not an ``O_PATH`` fd);
    needs CAP_DAC_READ_SEARCH."""
    if len(handle) > MAX_HANDLE_SZ:
        raise OSError(errno.EINVAL, "file handle too long")
    fh = _FileHandle(len(handle), handle_type)
    ctypes.memmove(fh.f_handle, handle, len(handle))
    fd = _open_by_handle_at(mount_fd, ctypes.byref(fh), flags | os.O_CLOEXEC)
    if fd < 0:
        _raise_errno()
    return int(fd)


def fs_uuid(fd: int) -> bytes | None:
    """The 16-byte uuid of the filesystem *fd* is on (``FS_IOC_GETFSUUID``), or None when
    the kernel or the filesystem cannot say."""
    buf = bytearray(17)
    buf[0] = 16
    try:
        fcntl.ioctl(fd, _FS_IOC_GETFSUUID, buf)
    except OSError:
        return None
    return bytes(buf[1 : 1 + buf[0]]).ljust(16, b"\0")[:16]
