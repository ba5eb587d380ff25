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
from unionfs.overlay.syscalls import fd_path, fs_uuid, name_to_handle, open_beneath, open_by_handle

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)
_PATH_PIECE = 4000  # below PATH_MAX (4096): the longest path opened in one call


def stat_with(
    st: os.stat_result,
    *,
    mode: int | None = None,
    nlink: int | None = None,
    blocks: int | None = None,
) -> os.stat_result:
    """A copy of *st* with its mode, nlink or block count replaced (nanosecond times kept)."""
    fields = list(st)
    if mode is not None:
        fields[0] = mode
    if nlink is not None:
        fields[3] = nlink
    extra = {k: getattr(st, k) for k in _STAT_EXTRA}
    if blocks is not None:
        extra["st_blocks"] = blocks
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
        "_handle_fd",
        "_uuid",
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
        self._handle_fd = -1  # opened when a file handle is first decoded here
        self._uuid: bytes | None | bool = False  # False: not asked yet

    def __repr__(self) -> str:
        kind = "upper" if self.writable else "lower"
        return f"<Layer {self.index} {kind} {self.path}>"

    def close(self) -> None:
        for fd in self._dirfds.values():
            os.close(fd)
        self._dirfds.clear()
        if self._handle_fd >= 0:
            os.close(self._handle_fd)
        os.close(self.root_fd)

    # -- file handles --------------------------------------------------------

    @property
    def uuid(self) -> bytes | None:
        """The uuid of the filesystem the layer is on (None: the kernel cannot say)."""
        if self._uuid is False:
            fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd)
            try:
                self._uuid = fs_uuid(fd)
            finally:
                os.close(fd)
        return self._uuid if isinstance(self._uuid, bytes) else None

    def handle(self, place: bytes) -> markers.FileHandle:
        """The file handle of the entry at *place* (a path in this layer), as an origin
        records it. Raises OSError (EOPNOTSUPP) when the filesystem makes none."""
        if place:
            parent, _, name = place.rpartition(b"/")
            fh_type, fid = name_to_handle(self.dirfd(parent), name)
        else:
            fh_type, fid = name_to_handle(self.root_fd, b"")
        return markers.FileHandle(fh_type, fid, self.uuid or markers.NULL_UUID)

    def open_handle(self, fh: markers.FileHandle) -> int:
        """An ``O_PATH`` fd of the inode *fh* names on this layer's filesystem."""
        if self._handle_fd < 0:
            # open_by_handle_at refuses an O_PATH fd as its mount fd.
            self._handle_fd = os.open(
                b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd
            )
        return open_by_handle(self._handle_fd, fh.type, fh.fid)

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
            try:
                fd = self._open_dir(relpath)
            except OSError as e:
                if e.errno != errno.EMFILE or len(fds) < 2:
                    raise
                # Out of fds (files held open elsewhere): this cache gives back its older
                # half, and the open is tried again, instead of failing until unmount.
                for _ in range(len(fds) // 2):
                    os.close(fds.popitem(last=False)[1])
                fd = self._open_dir(relpath)
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

    def _open_dir(self, relpath: bytes) -> int:
        """Open directory *relpath*; a path too long for one system call (PATH_MAX) is
        opened piece by piece from a cached ancestor, as deep as the tree goes."""
        if len(relpath) < _PATH_PIECE:
            return open_beneath(self.root_fd, relpath, _DIR_FLAGS)
        cut = relpath.rfind(b"/", 0, _PATH_PIECE)
        base = self.dirfd(relpath[:cut])  # a name is at most 255 bytes: cut > 0
        rest = relpath[cut + 1 :]
        cur = -1
        try:
            while len(rest) >= _PATH_PIECE:
                cut = rest.rfind(b"/", 0, _PATH_PIECE)
                nxt = open_beneath(base if cur < 0 else cur, rest[:cut], _DIR_FLAGS)
                if cur >= 0:
                    os.close(cur)
                cur, rest = nxt, rest[cut + 1 :]
            return open_beneath(base if cur < 0 else cur, rest, _DIR_FLAGS)
        finally:
            if cur >= 0:
                os.close(cur)

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
