"""Open files and attribute changes.

Each open gets its own real file descriptor with its own flags. Opening a lower
file for writing copies it up first. Handles opened before a copy-up are moved
to the upper copy when it is made (``Union.follow_copy_up``), so every reader
sees what writers wrote, as with the kernel overlay.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

import trio

from unionfs.overlay.copyup import copy_up, readonly_error
from unionfs.overlay.events import PRIVILEGE_DROPPED, Refused
from unionfs.overlay.markers import is_private_xattr
from unionfs.overlay.nodes import Node, OpenFile
from unionfs.overlay.syscalls import fd_path
from unionfs.overlay.union import CAPS_XATTR, Union

# Flags that make no sense on the real fd: the kernel already did their part
# (creation, truncation) or computes the offsets itself (append).
_DROP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT


def wants_write(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


def readable_for_writeback(flags: int, writeback: bool) -> int:
    """Under the kernel's write-back cache, a write-only open becomes read-write.

    The kernel fills a partly written page by reading the rest of it through
    the same handle, so a write-only real fd would fail that read.
    """
    if writeback and flags & os.O_ACCMODE == os.O_WRONLY:
        return (flags & ~os.O_ACCMODE) | os.O_RDWR
    return flags


def check_setxattr(union: Union, name: bytes, node: Node | None = None) -> None:
    """What refuses a setxattr of *name* (on *node*) before anything changes."""
    if is_private_xattr(name):
        path = b""  # for the trace; an unlinked file has none (the request's is used)
        if node is not None:
            with contextlib.suppress(OSError):
                path = node.path
        raise Refused(
            errno.EOPNOTSUPP, "the overlay's private xattrs cannot be set", path, xattr=name
        )
    if union.readonly:
        raise readonly_error()


def _in_every_group(gid: int) -> bool:
    return True


@dataclass(frozen=True)
class Kill:
    """A write or truncate by a caller without CAP_FSETID, which drops privilege bits
    as the VFS does: setuid always; setgid when group-exec is set, or when the caller
    is not in the file's group (*in_group*, given the file's stored gid)."""

    in_group: Callable[[int], bool] = _in_every_group

    def mode_after(self, mode: int, gid: int) -> int:
        new = mode & ~stat.S_ISUID
        if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not self.in_group(gid)):
            new &= ~stat.S_ISGID
        return new


def kill_setid(fd: int, kill: Kill) -> bool:
    """Drop what *kill* drops from the open file's mode; returns whether it changed."""
    st = os.fstat(fd)
    new = kill.mode_after(st.st_mode, st.st_gid)
    if new == st.st_mode:
        return False
    os.fchmod(fd, stat.S_IMODE(new))
    return True


@dataclass
class Change:
    """The attribute changes of one setattr request (None: leave as is)."""

    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    # Drop privilege bits after the changes: the kernel asks for that under
    # KILLPRIV_V2 with a truncate by a caller without CAP_FSETID, and with an
    # otherwise empty setattr before such a caller's write through passthrough (a
    # chown drops them by itself).
    kill: Kill | None = None

    @property
    def touches_ctime_only(self) -> bool:
        """Nothing but the ctime changes (``chown(path, -1, -1)``), whatever is killed."""
        return self == Change(kill=self.kill)


class Files:
    """The table of open file handles."""

    def __init__(self, union: Union) -> None:
        self.union = union
        self.handles: dict[int, OpenFile] = {}
        self._next_fh = itertools.count(1)
        # Set by the FUSE adapter, which hands each handle's real fd to the C hook.
        self.on_open: Callable[[int, OpenFile], None] | None = None
        self.on_close: Callable[[int], None] | None = None
        # Set by the FUSE adapter: adopt the handle *fh* if its C hook has it (``adopt``).
        self.claim: Callable[[int], None] | None = None

    # -- open and close ------------------------------------------------------

    async def open(self, node: Node, flags: int, kill: Kill | None = None) -> int:
        """Open *node* as the kernel asks; returns the file handle (see ``open_fd``)."""
        return self.add(node, await self.open_fd(node, flags, kill), flags)

    async def open_fd(self, node: Node, flags: int, kill: Kill | None = None) -> int:
        """Open *node*'s real file as the kernel asks, copying it up first when *flags*
        write; returns the real fd, for ``add``. The fd is in ``node.layer`` as it is
        on return (nothing awaits after the open).

        *kill*: the caller lacks CAP_FSETID, so an O_TRUNC open drops privilege bits
        as truncate(2) would (the kernel leaves that to us).
        """
        if wants_write(flags):
            if self.union.readonly:
                raise readonly_error()
            await copy_up(self.union, node, size=0 if flags & os.O_TRUNC else None)
        fd = self._open_for_kernel(node, flags)
        if flags & os.O_TRUNC and kill is not None and kill_setid(fd, kill):
            self.union.attr_changed(node)
            self.union.tell(
                PRIVILEGE_DROPPED,
                node.path,
                bits="setuid/setgid",
                why="O_TRUNC by a caller without CAP_FSETID",
            )
        return fd

    def _open_real(self, node: Node, flags: int) -> int:
        return self.union.open_data(node, flags & ~_DROP_FLAGS)

    def _open_for_kernel(self, node: Node, flags: int) -> int:
        rw = readable_for_writeback(flags, self.union.config.writeback)
        if rw != flags:
            try:
                return self._open_real(node, rw)
            except PermissionError:
                pass  # no CAP_DAC_OVERRIDE over this file: a partial-page write may fail
        return self._open_real(node, flags)

    def add(self, node: Node, fd: int, flags: int, tag: int = 0) -> int:
        """Register an open of *node* on its real *fd*; returns the file handle.

        The handle's low 31 bits number it (the FUSE adapter's C hook numbers the
        opens it answers itself with the 32nd set); *tag* goes into its high 32 bits
        (the adapter carries a passthrough backing id there)."""
        fh = 0
        while not fh & 0x7FFFFFFF or fh in self.handles:  # 0, or 2**31 opens later
            fh = (tag << 32) | (next(self._next_fh) & 0x7FFFFFFF)
        self.adopt(node, fd, flags, fh)
        return fh

    def adopt(self, node: Node, fd: int, flags: int, fh: int) -> None:
        """Register an open of *node* on its real *fd* under the handle *fh* (``add``;
        the FUSE adapter's C hook answers some opens itself and passes them on here)."""
        f = OpenFile(fd, node, self.union.data_layer(node), flags & ~(_DROP_FLAGS | os.O_TRUNC))
        f.fh = fh
        if node.metacopy:
            # The fd reads the lower data; the upper inode holds the metadata, which
            # an fstat or fchmod must still reach once the name is gone.
            f.meta_fd = self.union.open_real(node, os.O_PATH)
        if self.on_open is not None:
            # First: should it fail, nothing is registered, and the caller's close of
            # fd is the only one (a later release must not close that number again).
            self.on_open(fh, f)
        self.handles[fh] = f
        self.union.table.hold(node)
        self.union.open_files.setdefault(node.ino, []).append(f)

    def release(self, fh: int) -> None:
        f = self._file(fh)
        del self.handles[fh]
        node = f.node
        files = self.union.open_files.get(node.ino)
        if files is not None:
            files.remove(f)
            if not files:
                del self.union.open_files[node.ino]
        os.close(f.fd)
        if f.meta_fd >= 0:
            os.close(f.meta_fd)
        if self.on_close is not None:
            self.on_close(fh)
        self.union.table.release(node)

    def _file(self, fh: int) -> OpenFile:
        f = self.handles.get(fh)
        if f is None and self.claim is not None:
            self.claim(fh)
            f = self.handles.get(fh)
        if f is None:
            raise KeyError(fh)
        return f

    def _fd(self, fh: int) -> int:
        return self._file(fh).fd

    # -- data ----------------------------------------------------------------

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        """What is in the page cache is read right here; only what needs the disk is
        read in a worker thread, so a cold read never holds up other requests."""
        fd = self._fd(fh)
        buf = bytearray(size)
        try:
            n = os.preadv(fd, (buf,), off, os.RWF_NOWAIT)
        except BlockingIOError:
            n = 0
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            return os.pread(fd, size, off)  # a layer filesystem without RWF_NOWAIT
        if n < size and off + n < os.fstat(fd).st_size:
            # A dup: a copy-up may switch this handle to a new fd (and close the old one)
            # while the thread reads.
            fd = os.dup(fd)
            try:
                n += await trio.to_thread.run_sync(os.preadv, fd, (memoryview(buf)[n:],), off + n)
            finally:
                os.close(fd)
        return memoryview(buf)[:n]

    def write(self, fh: int, off: int, data: bytes, kill: Kill | None = None) -> int:
        """pwrite; *kill*: the writer lacks CAP_FSETID, so privilege bits go first, as
        on a local filesystem (security.capability goes by itself: the upper's
        filesystem drops it on any write)."""
        f = self._file(fh)
        if kill is not None and kill_setid(f.fd, kill):
            self.union.attr_changed(f.node)
            if self.union.events is not None and not f.node.unlinked:
                why = "a write by a caller without CAP_FSETID"
                self.union.tell(PRIVILEGE_DROPPED, f.node.path, bits="setuid/setgid", why=why)
        return os.pwrite(f.fd, data, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        """In a worker thread: a slow disk must not hold up every other request. On a
        dup, since a copy-up or a release may close the handle's fd meanwhile."""
        if not self.union.config.fsync:
            return
        fd = os.dup(self._fd(fh))
        try:
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)
        finally:
            os.close(fd)

    async def fsync_dir(self, node: Node) -> None:
        if not self.union.config.fsync or not node.layer.writable:
            return
        fd = node.layer.open_dir(node.path)
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)

    # -- attributes ----------------------------------------------------------

    async def setattr(self, node: Node, change: Change, fh: int | None) -> None:
        """chmod, chown, truncate and utimes: copy up, then change the upper copy."""
        union = self.union
        if union.readonly:
            raise readonly_error()
        await copy_up(union, node, size=change.size, data=change.size is not None)
        before = self._privileges(node) if union.events is not None else None
        if change.size is not None:
            if fh is not None and fh in self.handles:
                os.ftruncate(self._fd(fh), change.size)
            else:
                fd = self._open_real(node, os.O_WRONLY)
                try:
                    os.ftruncate(fd, change.size)
                finally:
                    os.close(fd)
        if node.unlinked:
            self._setattr_open(node, change)
            return
        if change.kill is not None and node.kind == stat.S_IFREG:
            self._kill_setid(node, fh, change.kill)
        # The root has no parent: reach it through its own fd (following that
        # magic link is safe, it is the directory itself). Anything else is
        # named in its parent and never followed.
        target, follow = self.union.real_path(node)
        if change.uid is not None or change.gid is not None:
            uid = -1 if change.uid is None else change.uid
            gid = -1 if change.gid is None else change.gid
            os.chown(target, uid, gid, follow_symlinks=follow)
        if change.mode is not None:
            if node.kind == stat.S_IFLNK:
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode", node.name)
            os.chmod(target, stat.S_IMODE(change.mode))
        if change.atime_ns is not None or change.mtime_ns is not None:
            atime, mtime = change.atime_ns, change.mtime_ns
            if atime is None or mtime is None:
                st = os.stat(target, follow_symlinks=follow)
                atime = st.st_atime_ns if atime is None else atime
                mtime = st.st_mtime_ns if mtime is None else mtime
            os.utime(target, ns=(atime, mtime), follow_symlinks=follow)
        if change.touches_ctime_only:
            # chown(path, -1, -1) and the like change nothing but the ctime, as on
            # any filesystem (and the kernel overlay's copy-up is done above).
            os.chown(target, -1, -1, follow_symlinks=follow)
        if before is not None:
            self._tell_dropped(node, change, before)

    def _privileges(self, node: Node) -> tuple[int, bool]:
        """The setuid/setgid bits and whether file capabilities are set (tracing only)."""
        path, follow = self.union.real_path(node)
        try:
            mode = os.stat(path, follow_symlinks=follow).st_mode
            caps = CAPS_XATTR in (
                os.fsencode(n) for n in os.listxattr(path, follow_symlinks=follow)
            )
        except OSError:
            return 0, False
        return mode & (stat.S_ISUID | stat.S_ISGID), caps

    def _tell_dropped(self, node: Node, change: Change, before: tuple[int, bool]) -> None:
        """Report setuid/setgid bits or capabilities that a change cleared: a chown
        clears them, and the kernel asks for a mode without them after a write by
        someone other than the owner."""
        bits, caps = self._privileges(node)
        lost = [
            name
            for flag, name in ((stat.S_ISUID, "setuid"), (stat.S_ISGID, "setgid"))
            if before[0] & flag and not bits & flag
        ]
        if before[1] and not caps:
            lost.append("capabilities")
        if lost:
            if change.uid is not None or change.gid is not None:
                why = "chown"
            elif change.mode is not None:
                why = "mode change"
            else:
                why = "a write or truncate by a caller without CAP_FSETID"
            self.union.tell(PRIVILEGE_DROPPED, node.path, bits="/".join(lost), why=why)

    def _kill_setid(self, node: Node, fh: int | None, kill: Kill) -> None:
        if fh is not None and fh in self.handles:
            kill_setid(self._fd(fh), kill)
            return
        path, follow = self.union.real_path(node)
        st = os.stat(path, follow_symlinks=follow)
        new = kill.mode_after(st.st_mode, st.st_gid)
        if new != st.st_mode:
            os.chmod(path, stat.S_IMODE(new), follow_symlinks=follow)

    def _setattr_open(self, node: Node, change: Change) -> None:
        """fchmod/fchown/futimens on a file that is open but has no name left."""
        files = self.union.open_files.get(node.ino)
        if not files:
            raise FileNotFoundError(errno.ENOENT, "removed", node.name)
        f = files[0]
        # The upper inode: the fd itself, or for a metadata-only copy its O_PATH fd
        # (reached through its /proc link: fchmod refuses an O_PATH fd).
        fd: int | bytes = f.fd if f.meta_fd < 0 else fd_path(f.meta_fd)
        if change.kill is not None and node.kind == stat.S_IFREG:
            if isinstance(fd, int):
                kill_setid(fd, change.kill)
            else:
                st = os.stat(fd)
                new = change.kill.mode_after(st.st_mode, st.st_gid)
                if new != st.st_mode:
                    os.chmod(fd, stat.S_IMODE(new))
        if change.uid is not None or change.gid is not None or change.touches_ctime_only:
            os.chown(
                fd,
                -1 if change.uid is None else change.uid,
                -1 if change.gid is None else change.gid,
            )
        if change.mode is not None:
            os.chmod(fd, stat.S_IMODE(change.mode))
        if change.atime_ns is not None or change.mtime_ns is not None:
            st = os.stat(fd)
            os.utime(
                fd,
                ns=(
                    st.st_atime_ns if change.atime_ns is None else change.atime_ns,
                    st.st_mtime_ns if change.mtime_ns is None else change.mtime_ns,
                ),
            )

    # -- extended attributes (writing) ---------------------------------------

    async def setxattr(self, node: Node, name: bytes, value: bytes, flags: int = 0) -> None:
        """setxattr(2); with XATTR_CREATE/XATTR_REPLACE the kernel overlay copies up
        first and lets the upper filesystem fail, so a failing call leaves a copy."""
        check_setxattr(self.union, name, node)
        await copy_up(self.union, node, data=False)
        self.union.caps_unknown(node)
        path, follow = self.union.real_path(node)
        os.setxattr(path, name, value, flags, follow_symlinks=follow)

    async def removexattr(self, node: Node, name: bytes) -> None:
        if is_private_xattr(name):
            raise OSError(errno.ENODATA, "no such attribute", name)  # hidden, see getxattr
        if self.union.readonly:
            raise readonly_error()
        if not node.layer.writable:
            # Removing what is not there fails without a copy-up, as in the kernel.
            path, follow = self.union.real_path(node)
            os.getxattr(path, name, follow_symlinks=follow)
        await copy_up(self.union, node, data=False)
        path, follow = self.union.real_path(node)
        os.removexattr(path, name, follow_symlinks=follow)
