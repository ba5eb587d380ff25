"""Layers: real directories, reached without ever following a layer's symlinks.

A layer turns a path inside it into a file descriptor with ``openat2``
(``RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS``), so a layer's ``etc -> /etc`` never
makes the daemon touch the host's ``/etc``. What a layer's entries *mean*
(whiteouts, opaque markers) is read through ``unionfs.overlay.markers``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import OrderedDict
from pathlib import Path

from unionfs.overlay import markers
from unionfs.overlay.markers import TRUSTED, XattrNamespace
from unionfs.overlay.syscalls import fd_path, open_beneath

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def stat_with(
    st: os.stat_result, *, mode: int | None = None, nlink: int | None = None
) -> os.stat_result:
    """A copy of *st* with its mode or nlink replaced (nanosecond times kept)."""
    fields = list(st)
    if mode is not None:
        fields[0] = mode
    if nlink is not None:
        fields[3] = nlink
    extra = {k: getattr(st, k) for k in _STAT_EXTRA}
    return os.stat_result(fields, extra)


_STAT_EXTRA = ("st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_rdev", "st_blocks", "st_blksize")


class Layer:
    """One directory of the stack: the upper (writable) or a lower (read-only) one.

    A lower layer honours OCI-format markers (``.wh.NAME``, ``.wh..wh..opq``) as
    well as the kernel's, because containers-storage stores a mount program's
    layers that way; the upper is always in the kernel's format.
    """

    __slots__ = (
        "index",
        "path",
        "root_fd",
        "writable",
        "dev",
        "fsid",
        "nosuid",
        "xattrs",
        "_dirfds",
        "_max_dirfds",
    )

    def __init__(
        self,
        index: int,
        path: Path,
        writable: bool,
        max_dirfds: int = 512,
        xattrs: XattrNamespace = TRUSTED,
    ) -> None:
        self.index = index
        self.path = path
        self.writable = writable
        self.xattrs = xattrs
        self.root_fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dev = os.fstat(self.root_fd).st_dev
        # A setuid bit on a nosuid filesystem grants nothing; copy-up must not make it real.
        self.nosuid = bool(os.statvfs(fd_path(self.root_fd)).f_flag & os.ST_NOSUID)
        self.fsid = 0  # set by the stack: which distinct filesystem this layer is on
        # Directory fds by relative path. Bounded, so walking a huge tree never
        # holds one fd per directory seen.
        self._dirfds: OrderedDict[bytes, int] = OrderedDict()
        self._max_dirfds = max_dirfds

    def __repr__(self) -> str:
        kind = "upper" if self.writable else "lower"
        return f"<Layer {self.index} {kind} {self.path}>"

    def close(self) -> None:
        for fd in self._dirfds.values():
            os.close(fd)
        self._dirfds.clear()
        os.close(self.root_fd)

    # -- directory fds -------------------------------------------------------

    def dirfd(self, relpath: bytes) -> int:
        """An ``O_PATH`` fd of directory *relpath*, valid until the next call into this layer.

        Raises ``FileNotFoundError`` when *relpath* is not a directory reachable
        without symlinks.
        """
        if not relpath:
            return self.root_fd
        fds = self._dirfds
        fd = fds.get(relpath)
        if fd is not None:
            fds.move_to_end(relpath)
            return fd
        try:
            fd = open_beneath(self.root_fd, relpath, _DIR_FLAGS)
        except OSError as e:
            if e.errno in NOT_THERE:
                raise FileNotFoundError(
                    errno.ENOENT, "no such directory in layer", relpath
                ) from None
            raise
        fds[relpath] = fd
        if len(fds) > self._max_dirfds:
            _, old = fds.popitem(last=False)
            os.close(old)
        return fd

    def forget_dirs(self, relpath: bytes) -> None:
        """Drop cached fds of *relpath* and everything below it (after a rename or rmdir)."""
        prefix = relpath + b"/"
        stale = [p for p in self._dirfds if p == relpath or p.startswith(prefix)]
        for p in stale:
            os.close(self._dirfds.pop(p))

    def open_dir(self, relpath: bytes) -> int:
        """A readable fd of directory *relpath*, for listing or fsync; the caller closes it."""
        return os.open(
            b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.dirfd(relpath)
        )

    # -- entries -------------------------------------------------------------

    def lstat(self, parent: bytes, name: bytes) -> os.stat_result | None:
        """``lstat`` of *name* in directory *parent*, or None when there is none."""
        try:
            return os.stat(name, dir_fd=self.dirfd(parent), follow_symlinks=False)
        except OSError as e:
            if e.errno in NOT_THERE:
                return None
            raise

    def is_opaque(self, relpath: bytes) -> bool:
        """The kernel's opaque xattr, or in a lower layer the OCI ``.wh..wh..opq`` marker."""
        try:
            fd = self.dirfd(relpath)
        except FileNotFoundError:
            return False
        if markers.has_opaque_xattr(fd_path(fd), self.xattrs, follow=True):
            return True
        return not self.writable and self.lstat(relpath, markers.OCI_OPAQUE) is not None

    def has_oci_whiteout(self, parent: bytes, name: bytes) -> bool:
        """Whether this lower layer deletes *name* the OCI way, with a ``.wh.NAME`` file."""
        if self.writable or len(name) > markers.OCI_NAME_MAX:
            return False
        return self.lstat(parent, markers.oci_whiteout_name(name)) is not None

    def open_file(self, parent: bytes, name: bytes, flags: int) -> int:
        """Open *name* in directory *parent*, never following a symlink; a lower layer
        is read without touching its atime when allowed."""
        dirfd = self.dirfd(parent)
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if self.writable:
            return os.open(name, flags, dir_fd=dirfd)
        return open_noatime(name, flags, dirfd)


def open_noatime(name: bytes, flags: int, dirfd: int) -> int:
    """Open for reading a lower layer without touching its atime when allowed.

    O_NOATIME needs ownership or CAP_FOWNER; a daemon without them just opens.
    """
    try:
        return os.open(name, flags | os.O_NOATIME, dir_fd=dirfd)
    except PermissionError:
        return os.open(name, flags, dir_fd=dirfd)


def remove_tree(dirfd: int, name: bytes) -> None:
    """Remove *name* below *dirfd* recursively without following symlinks."""
    try:
        os.unlink(name, dir_fd=dirfd)
        return
    except IsADirectoryError:
        pass
    except PermissionError:
        # EPERM is what unlink(2) says for a directory on Linux.
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        for entry in os.scandir(fd):
            child = os.fsencode(entry.name)
            if entry.is_dir(follow_symlinks=False):
                remove_tree(fd, child)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dirfd)


def discard(dirfd: int, name: bytes) -> None:
    """``remove_tree`` for clean-up: a name already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        remove_tree(dirfd, name)
