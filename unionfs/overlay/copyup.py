"""Copy-up: give a lower file or directory its own copy in the upper layer.

The copy is built in the workdir and renamed into place, so a crash leaves
either no upper entry (the lower one still shows) or the complete copy, never a
partial file. Missing parents are copied up first. As in the kernel, the upper
parent's timestamps are put back after the rename: copy-up is not a change the
user made.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable

import trio

from unionfs.overlay import acl, markers
from unionfs.overlay.events import COPY_UP, PRIVILEGE_DROPPED, Refused
from unionfs.overlay.layers import discard, stat_with
from unionfs.overlay.markers import is_private_xattr
from unionfs.overlay.nodes import Node, Place
from unionfs.overlay.syscalls import (
    RENAME_NOREPLACE,
    clone_or_copy,
    copy_range_in_place,
    fd_path,
    renameat2,
)
from unionfs.overlay.union import CAPS_XATTR, Union, join

log = logging.getLogger(__name__)

# Files above this size are copied in a worker thread so other requests go on.
THREAD_THRESHOLD = 1 << 20


def readonly_error(path: bytes = b"") -> OSError:
    return Refused(errno.EROFS, "the mount is read-only (no upperdir, or -o ro)", path)


def check_copy_up(union: Union) -> None:
    """What refuses every copy-up: a mount without a writable upper."""
    if union.readonly or union.upper is None:
        raise readonly_error()


def pending_copy_ups(union: Union, node: Node) -> list[Node]:
    """What ``copy_up(node)`` would copy, the outermost parent first (``unionfs
    explain``); raises what it would refuse with."""
    chain: list[Node] = []
    cur: Node | None = node
    while cur is not None and not cur.layer.writable:
        check_copy_up(union)
        if cur.parent is None:
            raise FileExistsError(errno.EEXIST, "removed; its name is taken", cur.name)
        chain.append(cur)
        cur = cur.parent
    chain.reverse()
    return chain


async def wait_for_copy_up(node: Node) -> None:
    """Let a copy-up of *node* that is under way finish before its name changes.

    Otherwise an unlink or a rename over it would race the copy's final rename
    into place and the opener would get EEXIST.
    """
    if node.lock is not None and node.lock.locked():
        async with node.lock:
            pass


async def copy_up(union: Union, node: Node, size: int | None = None, data: bool = True) -> None:
    """Make sure *node* lives in the upper layer.

    *size* is given by a truncate (or ``O_TRUNC``) that triggered the copy-up:
    the copy is made at that size (bytes about to be cut off are not worth
    copying) and with new times, since the truncate changes them. The copy put in
    place is then already the truncated file, so a crash before the truncate
    itself shows the file as it was or as it is after, never a mix. Without *data*
    (a change of metadata only: chmod, chown, utimes, xattrs, rename, link) a
    regular file is copied up without its data when the mount has
    ``metacopy=on``; its data is copied when a later open for writing needs it.
    """
    if node.layer.writable and not (data and node.metacopy):
        return
    check_copy_up(union)
    if node.lock is None:
        node.lock = trio.Lock()
    async with node.lock:  # concurrent writers of one file: one copy-up
        if node.layer.writable and not (data and node.metacopy):
            return
        parent = node.parent
        if parent is None:
            # Open, but its name is gone: the kernel's copy-up would put the copy at
            # the old name, which a whiteout (or a new entry) now holds. It marks the
            # directory the name was in impure first, as for any copy-up, and only
            # then finds the name taken: so does this.
            former = node.gone_from() if node.gone_from is not None else None
            upper = union.upper
            if former is not None and former.layer is upper and upper and not former.unlinked:
                with contextlib.suppress(OSError):
                    markers.set_impure(upper.dirfd(former.path), union.ns)
            raise FileExistsError(errno.EEXIST, "removed; its name is taken", node.name)
        await copy_up(union, parent)
        if node.layer.writable:
            # All of the data, whatever a truncate will cut: the marker goes only once the
            # upper holds the whole file, so a crash shows it before the truncate (the
            # kernel's ovl_copy_up_meta_inode_data ignores the new size too).
            await _copy_up_data(union, node)
        else:
            meta = not data and union.config.metacopy and node.kind == stat.S_IFREG
            await _copy_up_one(union, node, parent, size, meta)


async def _copy_up_one(
    union: Union, node: Node, parent: Node, size: int | None, meta: bool
) -> None:
    upper = union.upper
    assert upper is not None
    ns = union.ns
    src = node.place
    src_parent, src_name = src.split()
    src_dir = src.layer.dirfd(src_parent)
    started = time.monotonic()
    st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
    ppath = parent.path
    if src.layer.nosuid and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        st = stat_with(st, mode=st.st_mode & ~(stat.S_ISUID | stat.S_ISGID))
        union.tell(
            PRIVILEGE_DROPPED,
            join(ppath, node.name),
            bits="setuid/setgid",
            why=f"layer {src.layer.index} is on a nosuid filesystem",
        )
    kind = stat.S_IFMT(st.st_mode)
    # The kernel records where a copy came from, except for a lower hard link,
    # whose names copy-up splits into separate files (index=off).
    keeps_origin = kind == stat.S_IFDIR or st.st_nlink == 1
    origin = union.origin_of(src) if keeps_origin else None
    pstat = os.stat(upper.dirfd(ppath))
    markers.set_impure(upper.dirfd(ppath), ns)  # it now holds a copied-up entry
    work = union.work_fd
    tmp = union.tmp_name()
    copied, method = 0, "metadata"
    try:
        if kind == stat.S_IFREG and not meta:
            copied = st.st_size if size is None else min(size, st.st_size)
        # fsync=auto syncs the copied data, fsync=strict the whole copy once it is built.
        sync = union.config.sync_copy_up
        if kind == stat.S_IFREG:
            data = union.data_place(node)
            method = await _copy_file(data, work, tmp, st, size, meta, sync == 1)
        elif kind == stat.S_IFDIR:
            os.mkdir(tmp, 0o700, dir_fd=work)
        elif kind == stat.S_IFLNK:
            os.symlink(os.readlink(src_name, dir_fd=src_dir), tmp, dir_fd=work)
        else:
            os.mknod(tmp, st.st_mode, st.st_rdev, dir_fd=work)
        tmp_path = fd_path(work, tmp)
        if keeps_origin:
            _set_marker(markers.set_origin, tmp_path, origin, ns)
        if meta:
            markers.set_metacopy(tmp_path, ns)
        src_dir = src.layer.dirfd(src_parent)
        # A truncate's copy gets new times: the truncate changes them.
        times = not (kind == stat.S_IFREG and size is not None)
        if sync == 2 and kind in (stat.S_IFREG, stat.S_IFDIR):
            # Opened while the copy is still the daemon's own (0o600, 0o700): its
            # mode and owner may keep the daemon out once copied.
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=work)
            try:
                copy_metadata(fd_path(src_dir, src_name), tmp_path, st, times=times)
                await trio.to_thread.run_sync(os.fsync, fd)
            finally:
                os.close(fd)
        else:
            copy_metadata(fd_path(src_dir, src_name), tmp_path, st, times=times)
        # No await from here on: the rename, the parent's times and the node
        # update happen as one step as far as other requests can tell.
        up_dir = upper.dirfd(ppath)
        renameat2(work, tmp, up_dir, node.name, RENAME_NOREPLACE)
    except BaseException:
        _discard(work, tmp)
        raise
    # The copy is in place: record that first, so nothing below can leave the
    # node pointing at the lower layer with an upper copy next to it.
    if kind == stat.S_IFDIR:
        node.lowers = (src, *node.lowers)
    elif meta:
        data = union.data_place(node)  # the lower file, or a lower metacopy's data
        node.lowers = (src,) if data == src else (src, data)
        node.metacopy = True
    else:
        node.lowers = ()
        node.metacopy = False
    node.layer = upper
    new = os.stat(node.name, dir_fd=up_dir, follow_symlinks=False)
    shown = node.st_ino if keeps_origin else union.inos.real(upper, new.st_ino)
    union.inos.copied_up(new.st_ino, node.ino, shown)
    node.st_ino = shown
    try:
        os.utime(fd_path(up_dir), ns=(pstat.st_atime_ns, pstat.st_mtime_ns))
    except OSError as e:
        log.warning("could not restore the times of %r's parent: %s", node, e.strerror)
    if kind != stat.S_IFDIR:
        union.follow_copy_up(node)
    # nlink and st_ino of a split hard link, blocks of a copy, a merged directory's nlink
    union.attr_changed(node)
    log.debug("copied up %r%s", node, " (metadata only)" if meta else "")
    if union.events is not None:
        union.events.emit(
            COPY_UP,
            join(ppath, node.name),
            layer=src.layer.index,
            bytes=copied,
            method=method,
            duration_s=round(time.monotonic() - started, 6),
        )


async def _copy_up_data(union: Union, node: Node) -> None:
    """Give a metadata-only copy its data, in place (the kernel's
    ``ovl_copy_up_meta_inode_data``): the upper inode keeps its number, its
    ``security.capability`` survives the writes, and only then is the marker
    dropped, so a crash half-way leaves a metadata-only copy that still reads
    the lower data. A redirect stays. As with the kernel, writing the data
    makes the file's mtime that of the copy."""
    data = node.lowers[-1]
    place = node.place
    parent, name = place.split()
    up_dir = place.layer.dirfd(parent)
    length = data.layer.lstat(*data.split())
    if length is None:
        raise OSError(errno.EIO, "the data of a metadata-only copy is gone", node.name)
    st = os.stat(name, dir_fd=up_dir, follow_symlinks=False)
    path = fd_path(up_dir, name)
    try:
        caps: bytes | None = os.getxattr(path, CAPS_XATTR, follow_symlinks=False)
    except OSError:
        caps = None
    count = st.st_size
    started = time.monotonic()
    src = data.layer.open_file(*data.split(), os.O_RDONLY)
    try:
        dst = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=up_dir)
        try:
            if count > THREAD_THRESHOLD:
                method = await trio.to_thread.run_sync(copy_range_in_place, src, dst, count)
            else:
                method = copy_range_in_place(src, dst, count)
            if caps is not None:
                os.setxattr(dst, CAPS_XATTR, caps)
            if union.config.sync_copy_up:  # the data on disk before the marker goes
                await trio.to_thread.run_sync(os.fsync, dst)
            # The times are not put back: the kernel's copy leaves the mtime of its
            # writes, so the file shows the time it was opened for writing.
        finally:
            os.close(dst)
    finally:
        os.close(src)
    path = fd_path(place.layer.dirfd(parent), name)
    markers.clear_metacopy(path, union.ns)
    node.metacopy = False
    node.lowers = ()
    union.follow_copy_up(node)
    union.attr_changed(node)
    log.debug("copied up the data of %r", node)
    if union.events is not None:
        union.events.emit(
            COPY_UP,
            place.path,
            layer=data.layer.index,
            bytes=count,
            method=method,
            duration_s=round(time.monotonic() - started, 6),
            data_only=True,
        )


def _set_marker(setter: Callable[..., None], *args: object) -> None:
    """Set an overlay xattr on a copy; a filesystem that refuses xattrs on this kind
    of file (EPERM: ``user.*`` on a symlink) gets none, as with the kernel."""
    try:
        setter(*args)
    except OSError as e:
        if e.errno != errno.EPERM:
            raise


async def _copy_file(
    data: Place,
    work: int,
    tmp: bytes,
    st: os.stat_result,
    size: int | None,
    meta: bool,
    sync: bool,
) -> str:
    """The copy of a regular file in the workdir: its data (up to *size*, and at that
    size), or with *meta* none of it, only its length (a sparse file, as the kernel
    makes); with *sync* the data is on disk before this returns. Returns how the data
    was copied (``clone_or_copy``)."""
    if meta:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=work)
        try:
            os.ftruncate(dst, st.st_size)
        finally:
            os.close(dst)
        return "metadata"
    length = st.st_size if size is None else min(size, st.st_size)
    src = data.layer.open_file(*data.split(), os.O_RDONLY)
    try:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=work)
        try:
            if length > THREAD_THRESHOLD:
                method = await trio.to_thread.run_sync(clone_or_copy, src, dst, length)
            else:
                method = clone_or_copy(src, dst, length)
            if size is not None and size > length:
                os.ftruncate(dst, size)
            if sync:
                await trio.to_thread.run_sync(os.fsync, dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return method


def copy_metadata(
    src_path: bytes,
    dst: bytes | int,
    st: os.stat_result,
    src_fd: int | None = None,
    times: bool = True,
) -> None:
    """Owner, xattrs, mode and times (unless not *times*), in the order that keeps each one.

    chown clears setuid/setgid and ``security.capability``, so it goes first;
    the mode (with its special bits) and the xattrs follow; the times go last
    because setting the others must not leave a new ctime-driven mtime.
    """
    is_fd = isinstance(dst, int)
    is_link = stat.S_ISLNK(st.st_mode)
    if is_fd:
        os.chown(dst, st.st_uid, st.st_gid)
    else:
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    copy_xattrs(src_path if src_fd is None else src_fd, dst)
    if not is_link:
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    if not times:
        return
    if is_fd:
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def copy_xattrs(src: bytes | int, dst: bytes | int) -> None:
    follow = {} if isinstance(src, int) else {"follow_symlinks": False}
    dfollow = {} if isinstance(dst, int) else {"follow_symlinks": False}
    try:
        names = os.listxattr(src, **follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        bname = os.fsencode(name)
        if is_private_xattr(bname):
            continue
        try:
            value = os.getxattr(src, bname, **follow)
            if name in (acl.ACCESS, acl.DEFAULT):  # not on symlinks: dst is no symlink
                acl.set_mapped(dst, bname, value, "a copy-up")
            else:
                os.setxattr(dst, bname, value, **dfollow)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.ENODATA):
                raise
            log.warning("xattr %r not copied up: %s", name, e.strerror)


def _discard(work: int, tmp: bytes) -> None:
    try:
        discard(work, tmp)
    except OSError as e:
        log.warning("could not remove %r from the workdir: %s", tmp, e)
