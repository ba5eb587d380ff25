"""Layers and the kernel overlayfs on-disk format.

A layer is a real directory. Inside it the overlay format marks deletions with
*whiteouts* (character devices 0/0) and cuts off lower directories with an
*opaque* marker (``trusted.overlay.opaque=y``). This module is the one place
that reads and writes those markers, and the one place that turns a path inside
a layer into a file descriptor without following the layer's symlinks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import OrderedDict
from pathlib import Path

from unionfs.syscalls import RENAME_EXCHANGE, open_beneath, renameat2

OPAQUE_XATTR = b"trusted.overlay.opaque"
PRIVATE_XATTR_PREFIX = b"trusted.overlay."
WHITEOUT_PREFIX = b".wh."  # reserved by the OCI layer format; never created through the mount
OCI_OPAQUE = b".wh..wh..opq"  # the OCI layer format's opaque-directory marker
_OCI_NAME_MAX = 255 - len(WHITEOUT_PREFIX)
WHITEOUT_MODE = stat.S_IFCHR  # mode 0000, like the kernel's own whiteouts

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
_NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


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


def is_private_xattr(name: bytes) -> bool:
    """The overlay's own xattrs, which the mount neither shows nor lets anyone set."""
    return name.startswith(PRIVATE_XATTR_PREFIX)


def fd_path(dirfd: int, name: bytes = b"") -> bytes:
    """A path naming *name* in the directory *dirfd* (or the directory itself).

    The xattr calls have no ``*at`` form; ``/proc/self/fd/N/name`` reaches the
    exact directory the fd holds, and with ``follow_symlinks=False`` a trailing
    symlink is not followed either.
    """
    if name:
        return b"/proc/self/fd/%d/%s" % (dirfd, name)
    return b"/proc/self/fd/%d" % dirfd


class Layer:
    """One directory of the stack: the upper (writable) or a lower (read-only) one."""

    __slots__ = (
        "index",
        "path",
        "root_fd",
        "writable",
        "dev",
        "fsid",
        "nosuid",
        "_dirfds",
        "_max_dirfds",
    )

    def __init__(self, index: int, path: Path, writable: bool, max_dirfds: int = 512) -> None:
        self.index = index
        self.path = path
        self.writable = writable
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
            if e.errno in _NOT_THERE:
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
            if e.errno in _NOT_THERE:
                return None
            raise

    def is_opaque(self, relpath: bytes) -> bool:
        """The kernel's opaque xattr, or in a lower layer the OCI ``.wh..wh..opq`` marker."""
        try:
            if os.getxattr(fd_path(self.dirfd(relpath)), OPAQUE_XATTR) == b"y":
                return True
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, *_NOT_THERE):
                raise
        return not self.writable and self.lstat(relpath, OCI_OPAQUE) is not None

    def has_oci_whiteout(self, parent: bytes, name: bytes) -> bool:
        """Whether this lower layer deletes *name* the OCI way, with a ``.wh.NAME`` file.

        containers-storage stores layers like that when a mount program serves
        them; the upper layer is always written in the kernel's format.
        """
        if self.writable or len(name) > _OCI_NAME_MAX:
            return False
        return self.lstat(parent, WHITEOUT_PREFIX + name) is not None


def open_noatime(name: bytes, flags: int, dirfd: int) -> int:
    """Open for reading a lower layer without touching its atime when allowed.

    O_NOATIME needs ownership or CAP_FOWNER; a daemon without them just opens.
    """
    try:
        return os.open(name, flags | os.O_NOATIME, dir_fd=dirfd)
    except PermissionError:
        return os.open(name, flags, dir_fd=dirfd)


# -- writing the format (upper layer only) ------------------------------------


SHARED_WHITEOUT = b"#whiteout"  # in WORKDIR/work, like the kernel's


def make_whiteout(dirfd: int, name: bytes, workfd: int = -1) -> None:
    """Put a whiteout at *name*: a hard link to the workdir's shared whiteout.

    Linking costs a fraction of creating a device inode (mknod on ext4 is
    hundreds of microseconds), which is what makes ``rm -rf`` of a big lower
    tree fast; the kernel overlay does the same. Without a workdir, or when the
    shared one is used up (EMLINK), a whiteout of its own is made.
    """
    if workfd >= 0:
        for _ in range(2):
            try:
                os.link(
                    SHARED_WHITEOUT,
                    name,
                    src_dir_fd=workfd,
                    dst_dir_fd=dirfd,
                    follow_symlinks=False,
                )
                return
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EMLINK) or _exists(dirfd, name):
                    raise
                new_shared_whiteout(workfd)
    os.mknod(name, WHITEOUT_MODE, 0, dir_fd=dirfd)
    own_whiteout(dirfd, name)


def new_shared_whiteout(workfd: int) -> None:
    """(Re)create the shared whiteout, replacing one that has too many links."""
    tmp = SHARED_WHITEOUT + b".new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=workfd)
    os.mknod(tmp, WHITEOUT_MODE, 0, dir_fd=workfd)
    os.rename(tmp, SHARED_WHITEOUT, src_dir_fd=workfd, dst_dir_fd=workfd)


def _exists(dirfd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def own_whiteout(dirfd: int, name: bytes) -> None:
    """A whiteout belongs to the mounter, as the kernel's do (it makes them in the
    workdir): in a setgid directory it must not take the directory's group."""
    if os.fstat(dirfd).st_mode & stat.S_ISGID:
        os.chown(name, os.geteuid(), os.getegid(), dir_fd=dirfd, follow_symlinks=False)


def set_opaque(path: bytes) -> None:
    os.setxattr(path, OPAQUE_XATTR, b"y", follow_symlinks=False)


def whiteout_by_rename(dirfd: int, name: bytes, workfd: int, tmp: bytes) -> None:
    """Move *name* into the workdir as *tmp* and leave a whiteout in its place, atomically.

    A linked whiteout is swapped in (``RENAME_EXCHANGE``), as the kernel does;
    ``RENAME_WHITEOUT`` would make a new whiteout inode, which costs far more.
    """
    make_whiteout(workfd, tmp, workfd)
    try:
        exchange(workfd, tmp, dirfd, name)
    except BaseException:
        os.unlink(tmp, dir_fd=workfd)
        raise


def exchange(dirfd1: int, name1: bytes, dirfd2: int, name2: bytes) -> None:
    renameat2(dirfd1, name1, dirfd2, name2, RENAME_EXCHANGE)


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
