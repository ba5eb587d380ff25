"""Changes to names: create, link, remove and rename in the merged view.

Every change lands in the upper layer. Removing a name that a lower layer also
has leaves a whiteout; creating a name over a whiteout replaces it, and a
directory made over a whiteout is opaque so the old lower contents stay hidden.
Each change is made so that a crash at any point shows the old state or the new
one: new entries over whiteouts are built in the workdir and renamed in, and
a file is swapped for its whiteout in one ``RENAME_EXCHANGE``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from unionfs.overlay import markers
from unionfs.overlay.copyup import copy_up, readonly_error, wait_for_copy_up
from unionfs.overlay.events import OPAQUE, WHITEOUT, Refused
from unionfs.overlay.files import readable_for_writeback
from unionfs.overlay.layers import discard, remove_tree
from unionfs.overlay.markers import is_whiteout
from unionfs.overlay.nodes import Entry, Node
from unionfs.overlay.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, fd_path, renameat2
from unionfs.overlay.union import Union, join

log = logging.getLogger(__name__)

NAME_MAX = 255
MOVED_INTO_MERGED = "a directory moved into a merged directory"
MERGED_DIR_RENAME = "a directory with lower parts cannot move without redirect_dir"


@dataclass(frozen=True)
class Caller:
    """Who asked: new entries are theirs, as on a local filesystem."""

    uid: int
    gid: int
    umask: int = 0o022
    groups: frozenset[int] = frozenset()


def check_new_name(name: bytes, parent: bytes = b"") -> None:
    """A name that may be created in the upper (*parent* only names it in errors)."""
    if markers.is_oci_name(name):
        raise Refused(
            errno.EINVAL, "a name starting with .wh. is reserved for whiteouts", join(parent, name)
        )
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long", name)


def new_owner(parent_st: os.stat_result, caller: Caller, mode: int) -> tuple[int, int, int]:
    """Owner and mode of a new entry: the caller's, with the setgid-directory rules."""
    is_dir = stat.S_ISDIR(mode)
    if not stat.S_ISLNK(mode):
        mode &= ~(caller.umask & 0o777)
    gid = caller.gid
    if parent_st.st_mode & stat.S_ISGID:
        gid = parent_st.st_gid
        if is_dir:
            mode |= stat.S_ISGID
    if (
        not is_dir
        and mode & stat.S_ISGID
        and caller.uid != 0
        and gid != caller.gid
        and gid not in caller.groups
    ):
        mode &= ~stat.S_ISGID
    return caller.uid, gid, mode


def _writable(union: Union) -> None:
    if union.readonly or union.upper is None:
        raise readonly_error()


def check_create(union: Union, parent: Node, name: bytes) -> None:
    """What refuses a new *name* in *parent* before anything changes (create, mkdir,
    mknod, symlink, and the new name of a link)."""
    _writable(union)
    check_new_name(name, parent.path)
    if union.lookup(parent, name) is not None:
        raise FileExistsError(errno.EEXIST, "exists", name)


async def _prepare_new(union: Union, parent: Node, name: bytes) -> tuple[int, bool]:
    """Copy the parent up and say whether *name* is a whiteout there now."""
    check_create(union, parent, name)
    await copy_up(union, parent)
    assert union.upper is not None
    dirfd = union.upper.dirfd(parent.path)
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return dirfd, False
    if not is_whiteout(st):
        raise FileExistsError(errno.EEXIST, "exists", name)
    return dirfd, True


def _set_owner(dirfd: int, name: bytes, uid: int, gid: int, mode: int) -> None:
    os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
    if not stat.S_ISLNK(mode) and mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
        os.chmod(fd_path(dirfd, name), stat.S_IMODE(mode))  # chown cleared the special bits


def _place(
    union: Union,
    dirfd: int,
    name: bytes,
    over_whiteout: bool,
    make: Callable[[int, bytes], None],
    finish: Callable[[int, bytes], None] = lambda fd, n: None,
) -> None:
    """Create an entry with *make* and give it its owner with *finish*: directly,
    or, over a whiteout, in the workdir and renamed in. A failure after *make*
    removes what it made, so no half-made entry stays behind."""
    if over_whiteout:
        work, tmp = union.work_fd, union.tmp_name()
        try:
            make(work, tmp)
            finish(work, tmp)
            renameat2(work, tmp, dirfd, name)  # atomically replaces the whiteout
        except BaseException:
            discard(work, tmp)
            raise
        return
    make(dirfd, name)
    try:
        finish(dirfd, name)
    except BaseException:
        discard(dirfd, name)
        raise


def _clean_up(union: Union, tmp: bytes) -> None:
    """Remove what a finished change moved into the workdir. The change has
    happened: a failure here is logged, not returned (the next mount clears
    the workdir anyway)."""
    try:
        discard(union.work_fd, tmp)
    except OSError as e:
        log.warning("could not remove %r from the workdir: %s", tmp, e)


async def create_node(
    union: Union,
    parent: Node,
    name: bytes,
    mode: int,
    caller: Caller,
    rdev: int = 0,
    target: bytes | None = None,
) -> Node:
    """mkdir, mknod and symlink: a new entry owned by *caller*."""
    if stat.S_ISCHR(mode) and rdev == 0:
        raise Refused(errno.EPERM, "a 0/0 character device is a whiteout", join(parent.path, name))
    dirfd, over_whiteout = await _prepare_new(union, parent, name)
    uid, gid, mode = new_owner(os.stat(dirfd), caller, mode)

    if stat.S_ISDIR(mode):
        _mkdir(union, dirfd, name, over_whiteout, uid, gid, mode)
        if over_whiteout:
            path = join(parent.path, name)
            union.tell(WHITEOUT, path, outcome="removed", why="replaced by a new directory")
            union.tell(OPAQUE, path, outcome="created", why="a directory made over a whiteout")
    else:

        def make(fd: int, n: bytes) -> None:
            if target is not None:
                os.symlink(target, n, dir_fd=fd)
            else:
                os.mknod(n, mode, rdev, dir_fd=fd)
            _set_owner(fd, n, uid, gid, mode)

        _place(union, dirfd, name, over_whiteout, make)
        _replaced_whiteout(union, parent, name, over_whiteout)
    return _created(
        union, parent, name, None if stat.S_ISDIR(mode) else _lstat(union, parent, name)
    )


def _replaced_whiteout(union: Union, parent: Node, name: bytes, over_whiteout: bool) -> None:
    if over_whiteout:
        union.tell(
            WHITEOUT, join(parent.path, name), outcome="removed", why="replaced by a new entry"
        )


def _mkdir(
    union: Union, dirfd: int, name: bytes, over_whiteout: bool, uid: int, gid: int, mode: int
) -> None:
    if not over_whiteout:
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=dirfd)
        try:
            _set_owner(dirfd, name, uid, gid, mode)
        except BaseException:
            discard(dirfd, name)
            raise
        return
    # Over a whiteout the new directory must hide the lower one: build it opaque
    # in the workdir, swap it with the whiteout, then drop the whiteout.
    work, tmp = union.work_fd, union.tmp_name()
    os.mkdir(tmp, stat.S_IMODE(mode), dir_fd=work)
    try:
        _set_owner(work, tmp, uid, gid, mode)
        markers.set_opaque(work, tmp, union.config.xattrs)
        renameat2(work, tmp, dirfd, name, RENAME_EXCHANGE)
    except BaseException:
        remove_tree(work, tmp)
        raise
    os.unlink(tmp, dir_fd=work)  # the whiteout it replaced


async def create_file(
    union: Union, parent: Node, name: bytes, mode: int, flags: int, caller: Caller
) -> tuple[Node, int]:
    """create(2): a new regular file, returned open with *flags*."""
    dirfd, over_whiteout = await _prepare_new(union, parent, name)
    uid, gid, mode = new_owner(os.stat(dirfd), caller, stat.S_IFREG | (mode & 0o7777))
    # Like open(): the kernel computes append offsets, and O_DIRECT would refuse
    # the daemon's unaligned buffers.
    flags = readable_for_writeback(
        (flags & ~(os.O_TRUNC | os.O_APPEND | os.O_DIRECT)) | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
        union.config.writeback,
    )
    fds: list[int] = []

    def make(fd: int, n: bytes) -> None:
        fds.append(os.open(n, flags, stat.S_IMODE(mode), dir_fd=fd))

    def finish(fd: int, n: bytes) -> None:
        os.fchown(fds[0], uid, gid)
        if mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
            os.fchmod(fds[0], stat.S_IMODE(mode))

    try:
        _place(union, dirfd, name, over_whiteout, make, finish)
    except BaseException:
        for f in fds:
            os.close(f)
        raise
    _replaced_whiteout(union, parent, name, over_whiteout)
    return _created(union, parent, name, os.fstat(fds[0])), fds[0]


async def link(union: Union, node: Node, parent: Node, name: bytes) -> Node:
    """A hard link: the file is copied up first, then linked inside the upper."""
    check_create(union, parent, name)
    await copy_up(union, node)
    dirfd, over_whiteout = await _prepare_new(union, parent, name)
    src_parent = node.parent
    if src_parent is None:
        raise FileNotFoundError(errno.ENOENT, "removed", node.name)
    assert union.upper is not None
    src_dir = union.upper.dirfd(src_parent.path)
    dirfd = union.upper.dirfd(parent.path)

    def make(fd: int, n: bytes) -> None:
        os.link(node.name, n, src_dir_fd=src_dir, dst_dir_fd=fd, follow_symlinks=False)

    _place(union, dirfd, name, over_whiteout, make)
    _replaced_whiteout(union, parent, name, over_whiteout)
    union.add_alias(node, parent, name)
    return node


def _lstat(union: Union, parent: Node, name: bytes) -> os.stat_result:
    assert union.upper is not None
    return os.stat(name, dir_fd=union.upper.dirfd(parent.path), follow_symlinks=False)


def _created(union: Union, parent: Node, name: bytes, st: os.stat_result | None = None) -> Node:
    """The node of a name just made in the upper.

    A new non-directory is known without looking through the layers: it is in
    the upper and hides whatever is below. A new directory is resolved, since
    it may merge with (or, when opaque, hide) directories below.
    """
    if st is not None:
        assert union.upper is not None
        return union.node_for(parent, Entry(name, union.upper, st, ()))
    found = union.lookup(parent, name)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, "vanished after creation", name)
    return found[0]


# -- removing ---------------------------------------------------------------


def check_remove(
    union: Union, parent: Node, name: bytes, want_dir: bool
) -> tuple[Node, os.stat_result]:
    """What refuses unlink (rmdir with *want_dir*) before anything changes; the node
    to remove and its stat otherwise."""
    _writable(union)
    found = union.lookup(parent, name)
    if found is None or found[1] is None:  # no stat: "." or "..", which the VFS never removes
        raise FileNotFoundError(errno.ENOENT, "no such entry", name)
    node, st = found[0], found[1]
    if want_dir and not node.is_dir:
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", name)
    if not want_dir and node.is_dir:
        raise IsADirectoryError(errno.EISDIR, "is a directory", name)
    if want_dir and not union.is_empty(node):
        raise OSError(errno.ENOTEMPTY, "directory not empty", name)
    return node, st


async def remove(union: Union, parent: Node, name: bytes, want_dir: bool) -> None:
    """unlink and rmdir: delete in the upper, and whiteout what a lower still has."""
    node, st = check_remove(union, parent, name, want_dir)
    layer = node.layer
    await copy_up(union, parent)
    await wait_for_copy_up(node)  # the last await: what follows is one step
    if node.layer is not layer:  # copied up meanwhile: the stat from lookup is stale
        st = union.stat(node)
    gone_st = union.stat_before_removal(node, st)
    assert union.upper is not None
    dirfd = union.upper.dirfd(parent.path)
    path = join(parent.path, name)
    needs_whiteout = union.lower_has_name(parent, name)
    moved_out: bytes | None = None  # what the change moved into the workdir, to remove last
    if node.layer.writable:
        if needs_whiteout:
            moved_out = union.tmp_name()
            markers.replace_with_whiteout(dirfd, name, union.work_fd, moved_out)
        elif want_dir and node.lowers:
            moved_out = _rmdir_upper(union, dirfd, name)
        elif want_dir:
            # No lower part: a plain rmdir, as the kernel does, so a stray whiteout
            # left inside (it hides nothing) still makes it ENOTEMPTY.
            os.rmdir(name, dir_fd=dirfd)
        else:
            os.unlink(name, dir_fd=dirfd)
        if st.st_nlink <= 1 or want_dir:
            union.inos.upper_gone(st.st_ino)
    else:
        markers.make_whiteout(dirfd, name, union.work_fd)
    if needs_whiteout or not node.layer.writable:
        union.tell(WHITEOUT, path, outcome="created", why="a lower layer has the name")
    # Committed: the table follows, and only then the clean-up, which cannot fail
    # the request any more.
    if want_dir:
        union.upper.forget_dirs(path)
    union.drop_name(node, parent, name, gone_st)
    if moved_out is not None:
        _clean_up(union, moved_out)


def _rmdir_upper(union: Union, dirfd: int, name: bytes) -> bytes | None:
    """rmdir of a merged directory's upper part; returns the workdir name it was
    moved to when whiteouts were left in it, for the caller to remove."""
    try:
        os.rmdir(name, dir_fd=dirfd)
        return None
    except OSError as e:
        if e.errno != errno.ENOTEMPTY:
            raise
    # Only whiteouts are left in it (the merged view is empty): move it out whole.
    tmp = union.tmp_name()
    renameat2(dirfd, name, union.work_fd, tmp, RENAME_NOREPLACE)
    return tmp


# -- rename -----------------------------------------------------------------


def _node(found: tuple[Node, os.stat_result | None] | None) -> Node | None:
    return None if found is None else found[0]


def _has_lower_parts(node: Node) -> bool:
    return bool(node.lowers) or not node.layer.writable


def check_rename(
    union: Union, sparent: Node, sname: bytes, dparent: Node, dname: bytes, flags: int
) -> tuple[Node, Node | None]:
    """What refuses a rename before anything changes; the source and the target
    (None: no target) otherwise. The same node twice means there is nothing to do."""
    _writable(union)
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
        raise Refused(
            errno.EINVAL, "an overlay supports no rename flag but NOREPLACE and EXCHANGE", sname
        )
    swap = bool(flags & RENAME_EXCHANGE)
    check_new_name(dname, dparent.path)
    if swap:
        check_new_name(sname, sparent.path)
    src = _node(union.lookup(sparent, sname))
    if src is None:
        raise FileNotFoundError(errno.ENOENT, "no such entry", sname)
    dst = _node(union.lookup(dparent, dname))
    if swap and dst is None:
        raise FileNotFoundError(errno.ENOENT, "no such entry", dname)
    if dst is not None and flags & RENAME_NOREPLACE:
        raise FileExistsError(errno.EEXIST, "exists", dname)
    if dst is src:
        return src, dst
    if src.is_dir and dparent.is_under(src):
        raise OSError(errno.EINVAL, "cannot move a directory into itself", sname)
    if swap and dst is not None and dst.is_dir and sparent.is_under(dst):
        raise OSError(errno.EINVAL, "cannot move a directory into itself", dname)
    # The order of the checks is the kernel's: types (in the VFS), then EXDEV,
    # then emptiness of the directory being replaced.
    if dst is not None and not swap:
        if src.is_dir and not dst.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", dname)
        if not src.is_dir and dst.is_dir:
            raise IsADirectoryError(errno.EISDIR, "is a directory", dname)
    if src.is_dir and _has_lower_parts(src):
        raise Refused(errno.EXDEV, MERGED_DIR_RENAME, join(sparent.path, sname))
    if swap and dst is not None and dst.is_dir and _has_lower_parts(dst):
        raise Refused(errno.EXDEV, MERGED_DIR_RENAME, join(dparent.path, dname))
    if dst is not None and not swap and dst.is_dir and not union.is_empty(dst):
        raise OSError(errno.ENOTEMPTY, "directory not empty", dname)
    return src, dst


async def rename(
    union: Union, sparent: Node, sname: bytes, dparent: Node, dname: bytes, flags: int
) -> None:
    """rename(2) with RENAME_NOREPLACE and RENAME_EXCHANGE, by the kernel overlay's rules.

    A directory that has lower parts cannot move (EXDEV, like the kernel
    without redirect_dir), so ``mv`` falls back to copying. Anything else is
    copied up and renamed inside the upper; the old name gets a whiteout when
    a lower layer still has it, and a directory moved into a merged directory
    becomes opaque so a lower namesake cannot leak into it.
    """
    src, dst = check_rename(union, sparent, sname, dparent, dname, flags)
    if dst is src:
        return
    swap = bool(flags & RENAME_EXCHANGE)
    await copy_up(union, src)
    if swap and dst is not None:
        await copy_up(union, dst)
    await copy_up(union, sparent)
    await copy_up(union, dparent)
    if dst is not None:
        await wait_for_copy_up(dst)
    # From here on no await: the checks above hold for the whole change.
    dst_gone = union.stat_before_removal(dst) if dst is not None and not swap else None
    upper = union.upper
    assert upper is not None
    spath, dpath = join(sparent.path, sname), join(dparent.path, dname)
    sfd = upper.dirfd(sparent.path)
    dfd = upper.dirfd(dparent.path)
    if src.is_dir and dparent.lowers:
        markers.set_opaque(sfd, sname, union.config.xattrs)
        union.tell(OPAQUE, dpath, outcome="created", why=MOVED_INTO_MERGED)
    if swap:
        assert dst is not None
        if dst.is_dir and sparent.lowers:
            markers.set_opaque(dfd, dname, union.config.xattrs)
            union.tell(OPAQUE, spath, outcome="created", why=MOVED_INTO_MERGED)
    moved_out: bytes | None = None
    if swap:
        renameat2(sfd, sname, dfd, dname, RENAME_EXCHANGE)
    else:
        moved_out = _rename_over(union, src, sparent, sname, sfd, dst, dpath, dfd)
    # Committed: the table follows, then the clean-up.
    upper.forget_dirs(spath)
    upper.forget_dirs(dpath)
    _move_names(union, src, sparent, sname, dst, dparent, dname, swap, dst_gone)
    if moved_out is not None:
        _clean_up(union, moved_out)


def _rename_over(
    union: Union,
    src: Node,
    sparent: Node,
    sname: bytes,
    sfd: int,
    dst: Node | None,
    dpath: bytes,
    dfd: int,
) -> bytes | None:
    """Rename without exchange; returns what it moved into the workdir, if anything,
    for the caller to remove once the change is complete."""
    dname = dpath.rpartition(b"/")[2]
    spath = join(sparent.path, sname)
    src_whiteout = union.lower_has_name(sparent, sname)
    try:
        d_up: os.stat_result | None = os.stat(dname, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        d_up = None
    if (
        dst is not None
        and dst.is_dir
        and dst.lowers
        and d_up is not None
        and os.listdir(fd_path(dfd, dname))
    ):
        # The target's upper part still holds whiteouts: swap in an empty
        # opaque directory first so the rename below can replace it. The view does
        # not change (the target was empty and stays so).
        work, moved_out = union.work_fd, union.tmp_name()
        os.mkdir(moved_out, 0o700, dir_fd=work)
        try:
            markers.set_opaque(work, moved_out, union.config.xattrs)
            renameat2(work, moved_out, dfd, dname, RENAME_EXCHANGE)
        except BaseException:
            discard(work, moved_out)
            raise
    else:
        moved_out = None
    if d_up is not None and is_whiteout(d_up):
        # A directory cannot replace a device: it swaps with the whiteout, which
        # then is dropped unless the old name needs one anyway.
        keep = src_whiteout or src.is_dir
        markers.rename_onto_whiteout(sfd, sname, dfd, dname, keep=keep)
        union.tell(WHITEOUT, dpath, outcome="removed", why="replaced by a renamed entry")
        if src_whiteout:
            union.tell(WHITEOUT, spath, outcome="created", why="a lower layer has the old name")
        if keep and not src_whiteout:
            try:
                os.unlink(sname, dir_fd=sfd)
            except OSError as e:  # it hides nothing: the view is right either way
                log.warning("could not remove the whiteout left at %r: %s", sname, e)
        return moved_out
    # The replaced upper inode is freed (a directory, or a file's last link): its
    # number may come back for a new file, which must not inherit its identity.
    if (
        dst is not None
        and dst.layer.writable
        and d_up is not None
        and (dst.is_dir or d_up.st_nlink <= 1)
    ):
        union.inos.upper_gone(d_up.st_ino)
    if src_whiteout:
        markers.rename_leaving_whiteout(sfd, sname, dfd, dname)
        union.tell(WHITEOUT, spath, outcome="created", why="a lower layer has the old name")
    else:
        renameat2(sfd, sname, dfd, dname)
    return moved_out


def _move_names(
    union: Union,
    src: Node,
    sparent: Node,
    sname: bytes,
    dst: Node | None,
    dparent: Node,
    dname: bytes,
    swap: bool,
    dst_gone: os.stat_result | None = None,
) -> None:
    if dst is not None and not swap:
        union.drop_name(dst, dparent, dname, dst_gone)
    _rename_one(union, src, sparent, sname, dparent, dname)
    if src.is_dir:
        src.lowers = ()
    if swap and dst is not None:
        _rename_one(union, dst, dparent, dname, sparent, sname)
        if dst.is_dir:
            dst.lowers = ()


def _rename_one(
    union: Union, node: Node, old_parent: Node, old_name: bytes, parent: Node, name: bytes
) -> None:
    """Move one of *node*'s names; other hard links keep theirs."""
    if node.aliases and (old_parent, old_name) in node.aliases:
        union.drop_name(node, old_parent, old_name)
        union.add_alias(node, parent, name)
    else:
        union.table.set_parent(node, parent, name)
