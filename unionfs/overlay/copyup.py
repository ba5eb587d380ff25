"""Copy-up: give a lower file or directory its own copy in the upper layer.

The copy is built in the workdir and renamed into place, so a crash leaves
either no upper entry (the lower one still shows) or the complete copy, never a
partial file. Missing parents are copied up first. As in the kernel, the upper
parent's timestamps are put back after the rename: copy-up is not a change the
user made.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time

import trio

from unionfs.overlay.events import COPY_UP, PRIVILEGE_DROPPED, Refused
from unionfs.overlay.layers import discard, open_noatime, stat_with
from unionfs.overlay.markers import is_private_xattr
from unionfs.overlay.nodes import Node
from unionfs.overlay.syscalls import RENAME_NOREPLACE, clone_or_copy, fd_path, renameat2
from unionfs.overlay.union import Union, join

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


async def copy_up(union: Union, node: Node, size: int | None = None) -> None:
    """Make sure *node* lives in the upper layer.

    *size* limits how much data is copied, for a copy-up that a truncate
    triggered: bytes about to be cut off are not worth copying.
    """
    if node.layer.writable:
        return
    check_copy_up(union)
    if node.lock is None:
        node.lock = trio.Lock()
    async with node.lock:  # concurrent writers of one file: one copy-up
        if node.layer.writable:
            return
        parent = node.parent
        if parent is None:
            # Open, but its name is gone: the kernel's copy-up would put the copy at
            # the old name, which a whiteout (or a new entry) now holds.
            raise FileExistsError(errno.EEXIST, "removed; its name is taken", node.name)
        await copy_up(union, parent)
        await _copy_up_one(union, node, parent, size)


async def _copy_up_one(union: Union, node: Node, parent: Node, size: int | None) -> None:
    upper = union.upper
    assert upper is not None
    src_layer = node.layer
    ppath = parent.path
    src_dir = src_layer.dirfd(ppath)
    started = time.monotonic()
    st = os.stat(node.name, dir_fd=src_dir, follow_symlinks=False)
    if src_layer.nosuid and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        st = stat_with(st, mode=st.st_mode & ~(stat.S_ISUID | stat.S_ISGID))
        union.tell(
            PRIVILEGE_DROPPED,
            join(ppath, node.name),
            bits="setuid/setgid",
            why=f"layer {src_layer.index} is on a nosuid filesystem",
        )
    work = union.work_fd
    tmp = union.tmp_name()
    kind = stat.S_IFMT(st.st_mode)
    copied, method = 0, "metadata"
    try:
        if kind == stat.S_IFREG:
            copied = st.st_size if size is None else min(size, st.st_size)
            method = await _copy_file(src_dir, node.name, work, tmp, st, size)
        else:
            if kind == stat.S_IFDIR:
                os.mkdir(tmp, 0o700, dir_fd=work)
            elif kind == stat.S_IFLNK:
                os.symlink(os.readlink(node.name, dir_fd=src_dir), tmp, dir_fd=work)
            else:
                os.mknod(tmp, st.st_mode, st.st_rdev, dir_fd=work)
            src_dir = src_layer.dirfd(ppath)
            copy_metadata(fd_path(src_dir, node.name), fd_path(work, tmp), st)
        # No await from here on: the rename, the parent's times and the node
        # update happen as one step as far as other requests can tell.
        up_dir = upper.dirfd(ppath)
        pstat = os.stat(up_dir)
        renameat2(work, tmp, up_dir, node.name, RENAME_NOREPLACE)
    except BaseException:
        _discard(work, tmp)
        raise
    # The copy is in place: record that first, so nothing below can leave the
    # node pointing at the lower layer with an upper copy next to it.
    node.lowers = (src_layer, *node.lowers) if kind == stat.S_IFDIR else ()
    node.layer = upper
    new = os.stat(node.name, dir_fd=up_dir, follow_symlinks=False)
    union.inos.copied_up(new.st_ino, node.ino)
    try:
        os.utime(fd_path(up_dir), ns=(pstat.st_atime_ns, pstat.st_mtime_ns))
    except OSError as e:
        log.warning("could not restore the times of %r's parent: %s", node, e.strerror)
    if kind != stat.S_IFDIR:
        union.follow_copy_up(node)
        union.attr_changed(node)  # nlink of a split hard link, blocks of a sparse copy
    log.debug("copied up %r", node)
    if union.events is not None:
        union.events.emit(
            COPY_UP,
            join(ppath, node.name),
            layer=src_layer.index,
            bytes=copied,
            method=method,
            duration_s=round(time.monotonic() - started, 6),
        )


async def _copy_file(
    src_dir: int, name: bytes, work: int, tmp: bytes, st: os.stat_result, size: int | None
) -> str:
    """Copy the data and metadata; returns how the data was copied (``clone_or_copy``)."""
    length = st.st_size if size is None else min(size, st.st_size)
    src = open_noatime(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, src_dir)
    try:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=work)
        try:
            if length > THREAD_THRESHOLD:
                method = await trio.to_thread.run_sync(clone_or_copy, src, dst, length)
            else:
                method = clone_or_copy(src, dst, length)
            copy_metadata(fd_path(src_dir, name), dst, st, src_fd=src)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return method


def copy_metadata(
    src_path: bytes, dst: bytes | int, st: os.stat_result, src_fd: int | None = None
) -> None:
    """Owner, xattrs, mode and times, in the order that keeps each one.

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
