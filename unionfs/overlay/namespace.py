"""Changes to names: create, link, remove and rename in the merged view.

Every change lands in the upper layer. Removing a name that a lower layer also
has leaves a whiteout; creating a name over a whiteout replaces it, and a
directory made over a whiteout is opaque so the old lower contents stay hidden.
Each change is made so that a crash at any point shows the old state or the new
one: new entries over whiteouts are built in the workdir and renamed in, and
a file is swapped for its whiteout in one ``RENAME_EXCHANGE``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from unionfs.overlay import acl, markers
from unionfs.overlay.copyup import copy_metadata, copy_up, readonly_error, wait_for_copy_up
from unionfs.overlay.events import OPAQUE, WHITEOUT, Refused
from unionfs.overlay.files import readable_for_writeback
from unionfs.overlay.layers import discard, remove_tree
from unionfs.overlay.markers import is_whiteout
from unionfs.overlay.nodes import ROOT_INO, Entry, Node
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


# A new entry's ACLs (access, default) from its directory's default ACL, to set where
# the entry is built away from that directory (the workdir); None: the directory has none.
Acls = tuple[bytes | None, bytes | None] | None


def new_owner(
    parent_st: os.stat_result,
    caller: Caller,
    mode: int,
    default_acl: bytes | None = None,
    umask_first: bool = False,
    grpid: bool = False,
) -> tuple[int, int, int, Acls]:
    """Owner, mode and ACLs of a new entry: the caller's, with the setgid-directory
    rules; its mode less the caller's umask, or, under a directory with *default_acl*
    (its upper directory's), as that ACL gives it (``unionfs.overlay.acl``): from the
    mode as asked for, as the kernel overlay, or *umask_first* from the mode less the
    umask (``noacl``: what an upper filesystem does with an entry made in place when
    FUSE has applied the umask). *grpid*: the upper filesystem gives every new entry
    its directory's group, and a new directory no setgid bit of its own (ext4 and
    xfs mounted ``grpid``), as it does to the kernel overlay's entries."""
    is_dir = stat.S_ISDIR(mode)
    setgid_dir = bool(parent_st.st_mode & stat.S_ISGID)
    # The VFS's rule (mode_strip_sgid), before the umask: a file in a setgid directory
    # keeps a setgid bit asked for only if its maker is in the directory's group or
    # privileged, or if the bit comes without group-exec (then it marks no privilege).
    if (
        not is_dir
        and setgid_dir
        and mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP
        and caller.uid != 0
        and parent_st.st_gid != caller.gid
        and parent_st.st_gid not in caller.groups
    ):
        mode &= ~stat.S_ISGID
    acls: Acls = None
    if (default_acl is None or umask_first) and not stat.S_ISLNK(mode):
        mode &= ~(caller.umask & 0o777)
    if default_acl is not None:
        mode, access, default = acl.inherit(default_acl, mode)
        acls = (access, default)
    gid = parent_st.st_gid if setgid_dir or grpid else caller.gid
    if is_dir and setgid_dir and not grpid:
        mode |= stat.S_ISGID
    return caller.uid, gid, mode, acls


def _owner(union: Union, dirfd: int, caller: Caller, mode: int) -> tuple[int, int, int, Acls]:
    """``new_owner`` of an entry of *caller* in upper directory *dirfd*, with its default
    ACL; with ``noacl`` the umask comes off first (the entry then gets what its upper
    directory gives one made in place, also when it is built in the workdir)."""
    default_acl = None if stat.S_ISLNK(mode) else acl.default_of(dirfd)
    return new_owner(
        os.stat(dirfd),
        caller,
        mode,
        default_acl,
        umask_first=not union.config.acl,
        grpid=union.grpid,
    )


def _set_acls(dirfd: int, name: bytes, acls: Acls) -> None:
    """Give an entry built in the workdir the ACLs its directory would have given it.

    A daemon in a user namespace reads the ids it cannot map as -1 and cannot write
    them back (EINVAL): the entry then gets the ACL without them (``acl.set_mapped``),
    as a copy-up does."""
    if acls is None:
        return
    path = fd_path(dirfd, name)
    for xattr, value in zip((acl.ACCESS, acl.DEFAULT), acls, strict=True):
        if value is not None:
            acl.set_mapped(path, xattr, value, "a new entry")


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
    if parent.layer.writable and not parent.lowers:
        # Nothing below the parent: when its upper directory lacks the name, so does
        # the merged view, and the one stat answers both questions. Anything there
        # goes the whole way, for check_create's own error.
        _writable(union)
        check_new_name(name, parent.path)
        assert union.upper is not None
        dirfd = union.upper.dirfd(parent.path)
        if _upper_entry(dirfd, name) is None:
            return dirfd, False
    check_create(union, parent, name)
    await copy_up(union, parent)
    assert union.upper is not None
    dirfd = union.upper.dirfd(parent.path)
    st = _upper_entry(dirfd, name)
    if st is None:
        return dirfd, False
    if not is_whiteout(st):
        raise FileExistsError(errno.EEXIST, "exists", name)
    return dirfd, True


def _upper_entry(dirfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


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
    aside: bool = False,
    acls: Acls = None,
) -> None:
    """Create an entry with *make* and give it its owner with *finish*: directly,
    or in the workdir and renamed in: over a whiteout, and *aside* (see ``_aside``),
    with the *acls* its directory gives. A failure after *make* removes what it
    made, so no half-made entry stays behind."""
    if over_whiteout or aside:
        work, tmp = union.work_fd, union.tmp_name()
        try:
            make(work, tmp)
            finish(work, tmp)
            _set_acls(work, tmp, acls)
            # Over a whiteout this replaces it in one step.
            renameat2(work, tmp, dirfd, name, 0 if over_whiteout else RENAME_NOREPLACE)
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


def _aside(mode: int, uid: int, gid: int) -> bool:
    """Whether a new entry is built in the workdir and renamed into place, because the
    daemon changes it after making it and a daemon killed in between must not leave it
    half made under its name: owned by someone else than the daemon (made as the
    daemon, then chowned: the kernel overlay makes it as the caller), or setuid or
    setgid (which the chown clears and which are then set again)."""
    return bool(mode & (stat.S_ISUID | stat.S_ISGID)) or (uid, gid) != (os.geteuid(), os.getegid())


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
    uid, gid, mode, acls = _owner(union, dirfd, caller, mode)

    if stat.S_ISDIR(mode):
        _mkdir(union, dirfd, name, over_whiteout, uid, gid, mode, acls)
        if not over_whiteout and parent.lowers and union.config.redirect == "on":
            # As the kernel does once redirects (or metacopy) may exist: nothing below
            # can merge into a new directory, so lookups need not look (and a
            # directory moved here later by a redirect cannot show through).
            with contextlib.suppress(OSError):
                markers.set_opaque(dirfd, name, union.ns)
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

        _place(union, dirfd, name, over_whiteout, make, aside=_aside(mode, uid, gid), acls=acls)
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
    union: Union,
    dirfd: int,
    name: bytes,
    over_whiteout: bool,
    uid: int,
    gid: int,
    mode: int,
    acls: Acls = None,
) -> None:
    aside = _aside(mode, uid, gid)
    if not over_whiteout and not aside:
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=dirfd)
        try:
            _set_owner(dirfd, name, uid, gid, mode)
        except BaseException:
            discard(dirfd, name)
            raise
        return
    # Built in the workdir: someone else's (``_aside``), renamed into place; over a
    # whiteout, opaque to hide the lower one, swapped with the whiteout, which is
    # then dropped.
    work, tmp = union.work_fd, union.tmp_name()
    os.mkdir(tmp, stat.S_IMODE(mode), dir_fd=work)
    try:
        _set_owner(work, tmp, uid, gid, mode)
        _set_acls(work, tmp, acls)
        if over_whiteout:
            markers.set_opaque(work, tmp, union.ns)
        renameat2(work, tmp, dirfd, name, RENAME_EXCHANGE if over_whiteout else RENAME_NOREPLACE)
    except BaseException:
        remove_tree(work, tmp)
        raise
    if not over_whiteout:
        return
    os.unlink(tmp, dir_fd=work)  # the whiteout it replaced


async def create_file(
    union: Union, parent: Node, name: bytes, mode: int, flags: int, caller: Caller
) -> tuple[Node, int, os.stat_result]:
    """create(2): a new regular file, returned open with *flags*, and its stat."""
    dirfd, over_whiteout = await _prepare_new(union, parent, name)
    mode = stat.S_IFREG | (mode & 0o7777)
    uid, gid, mode, acls = _owner(union, dirfd, caller, mode)
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
        _place(
            union, dirfd, name, over_whiteout, make, finish, aside=_aside(mode, uid, gid), acls=acls
        )
    except BaseException:
        for f in fds:
            os.close(f)
        raise
    _replaced_whiteout(union, parent, name, over_whiteout)
    st = os.fstat(fds[0])
    node = _created(union, parent, name, st)
    union.caps_absent(node)  # a file just made has no capability
    return node, fds[0], st


def adopt_created(union: Union, parent: Node, name: bytes, st: os.stat_result) -> Node:
    """The node of a regular file someone else made by ``create_file``'s rules where they
    are shortest (the FUSE adapter's C hook): *name*, with stat *st*, new in the upper
    directory of *parent*, which has nothing below it (no lower part, or opaque), nor
    the setgid bit; the name is not reserved and was not there (not even a whiteout);
    the file is owned by the caller (with its directory's group on a ``grpid`` upper),
    has no setuid/setgid/sticky bit, and is open."""
    return _created(union, parent, name, st)


async def create_tmpfile(
    union: Union, parent: Node, mode: int, flags: int, caller: Caller
) -> tuple[Node, int]:
    """open(O_TMPFILE): a new unnamed regular file, returned open with *flags*.

    As the kernel overlay does, the directory is copied up first and the file is
    an unnamed inode of its upper directory; a later ``linkat`` of it gives it a
    name there, as a file of the upper only.
    """
    _writable(union)
    await copy_up(union, parent)
    assert union.upper is not None
    dirfd = union.upper.dirfd(parent.path)
    mode = stat.S_IFREG | (mode & 0o7777)
    # Made in its directory: the upper filesystem gives it the ACLs itself.
    uid, gid, mode, _ = _owner(union, dirfd, caller, mode)
    flags = readable_for_writeback(
        (flags & os.O_ACCMODE) | os.O_TMPFILE | os.O_CLOEXEC, union.config.writeback
    )
    fd = os.open(fd_path(dirfd), flags, stat.S_IMODE(mode))
    try:
        os.fchown(fd, uid, gid)
        if mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
            os.fchmod(fd, stat.S_IMODE(mode))
        st = os.fstat(fd)
        node = union.unnamed_node(union.upper, st)
    except BaseException:
        os.close(fd)
        raise
    union.caps_absent(node)
    return node, fd


async def link(union: Union, node: Node, parent: Node, name: bytes) -> Node:
    """A hard link: the file is copied up first, then linked inside the upper."""
    check_create(union, parent, name)
    if node.parent is None:
        return await _link_unnamed(union, node, parent, name)
    await copy_up(union, node, data=False)
    dirfd, over_whiteout = await _prepare_new(union, parent, name)
    src_parent = node.parent
    if src_parent is None:
        raise FileNotFoundError(errno.ENOENT, "removed", node.name)
    assert union.upper is not None
    src_dir = union.upper.dirfd(src_parent.path)
    dirfd = union.upper.dirfd(parent.path)
    if node.metacopy:
        # Its names may be in different directories: an absolute redirect finds its data.
        try:
            set_redirect(union, node, src_dir, node.name, samedir=False)
        except OSError as e:
            raise OSError(errno.EXDEV, "cannot record the link in the upper", name) from e
    if _has_origin(union, src_dir, node.name, node):
        markers.set_impure(dirfd, union.ns)

    def make(fd: int, n: bytes) -> None:
        os.link(node.name, n, src_dir_fd=src_dir, dst_dir_fd=fd, follow_symlinks=False)

    _place(union, dirfd, name, over_whiteout, make)
    _replaced_whiteout(union, parent, name, over_whiteout)
    union.add_alias(node, parent, name)
    return node


async def _link_unnamed(union: Union, node: Node, parent: Node, name: bytes) -> Node:
    """``linkat`` of an O_TMPFILE file (the VFS refuses any other unnamed file): it gets
    its first name, through the fd it is open on."""
    files = [f for f in union.open_files.get(node.ino, ()) if f.layer.writable]
    if not files or node.ino == ROOT_INO:
        raise FileNotFoundError(errno.ENOENT, "removed", node.name)
    dirfd, over_whiteout = await _prepare_new(union, parent, name)
    source = fd_path(files[0].fd)

    def make(fd: int, n: bytes) -> None:
        os.link(source, n, dst_dir_fd=fd, follow_symlinks=True)

    _place(union, dirfd, name, over_whiteout, make)
    union.table.set_parent(node, parent, name)
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


REDIRECT_MAX = 256  # the kernel's default redirect_max: longest redirect it writes


def check_rename(
    union: Union, sparent: Node, sname: bytes, dparent: Node, dname: bytes, flags: int
) -> tuple[Node, Node | None]:
    """What refuses a rename before anything changes; the source and the target
    (None: no target) otherwise. The same node twice means there is nothing to do."""
    _writable(union)
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
        raise Refused(
            errno.EINVAL,
            "an overlay supports no rename flag but NOREPLACE and EXCHANGE",
            join(sparent.path, sname),
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
    redirects = union.config.redirect == "on"
    if src.is_dir and src.has_lower and not redirects:
        raise Refused(errno.EXDEV, MERGED_DIR_RENAME, join(sparent.path, sname))
    if swap and dst is not None and dst.is_dir and dst.has_lower and not redirects:
        raise Refused(errno.EXDEV, MERGED_DIR_RENAME, join(dparent.path, dname))
    if dst is not None and not swap and dst.is_dir and dst.has_lower and not union.is_empty(dst):
        # The kernel checks a merged or lower target itself; a directory of the upper only
        # is left to the upper's rename, which refuses it after the copy-ups (ENOTEMPTY).
        raise OSError(errno.ENOTEMPTY, "directory not empty", dname)
    return src, dst


async def rename(
    union: Union, sparent: Node, sname: bytes, dparent: Node, dname: bytes, flags: int
) -> None:
    """rename(2) with RENAME_NOREPLACE and RENAME_EXCHANGE, by the kernel overlay's rules.

    A directory that has lower parts can move only with ``redirect_dir=on``:
    it is copied up (the directory alone, not its contents) and records in a
    redirect xattr where its lower parts are. Without it the rename is EXDEV,
    so ``mv`` falls back to copying. Anything else is copied up (metadata only
    with ``metacopy=on``; such a copy records a redirect too) and renamed inside
    the upper; the old name gets a whiteout when a lower layer still has it, and
    a directory of the upper only moved into a merged directory becomes opaque
    so a lower namesake cannot leak into it.
    """
    src, dst = check_rename(union, sparent, sname, dparent, dname, flags)
    if dst is src:
        return
    swap = bool(flags & RENAME_EXCHANGE)
    await copy_up(union, src, data=False)
    await copy_up(union, dparent)
    if swap and dst is not None:
        await copy_up(union, dst, data=False)
    await copy_up(union, sparent)
    if dst is not None:
        await wait_for_copy_up(dst)
    # From here on no await: the checks above hold for the whole change.
    dst_gone = union.stat_before_removal(dst) if dst is not None and not swap else None
    upper = union.upper
    assert upper is not None
    spath, dpath = join(sparent.path, sname), join(dparent.path, dname)
    sfd = upper.dirfd(sparent.path)
    dfd = upper.dirfd(dparent.path)
    samedir = sparent is dparent
    if not samedir:
        # Whoever lists the new parent must look up origins there (the kernel's impure).
        if _has_origin(union, sfd, sname, src):
            markers.set_impure(dfd, union.ns)
        if swap and dst is not None and _has_origin(union, dfd, dname, dst):
            markers.set_impure(sfd, union.ns)
    _keep_lower_parts(union, src, sfd, sname, samedir, dparent, dpath)
    if swap:
        assert dst is not None
        _keep_lower_parts(union, dst, dfd, dname, samedir, sparent, spath)
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


def _keep_lower_parts(
    union: Union,
    node: Node,
    dirfd: int,
    name: bytes,
    samedir: bool,
    new_parent: Node,
    new_path: bytes,
) -> None:
    """Before *node* moves from *name* in *dirfd* to *new_parent*: a node with lower
    parts records where they are (a redirect); a directory of the upper only that
    lands in a merged directory becomes opaque. On a failure to write either, the
    rename is EXDEV, as in the kernel."""
    try:
        if node.has_lower:
            set_redirect(union, node, dirfd, name, samedir)
        elif node.is_dir and new_parent.lowers and not _is_opaque(union, dirfd, name):
            markers.set_opaque(dirfd, name, union.ns)
            union.tell(OPAQUE, new_path, outcome="created", why=MOVED_INTO_MERGED)
    except OSError as e:
        if e.errno == errno.EXDEV:
            raise
        raise OSError(errno.EXDEV, "cannot record the move in the upper", name) from e


def _is_opaque(union: Union, dirfd: int, name: bytes) -> bool:
    return markers.has_opaque_xattr(fd_path(dirfd, name), union.ns)


def set_redirect(union: Union, node: Node, dirfd: int, name: bytes, samedir: bool) -> None:
    """The kernel's ``ovl_set_redirect``: a relative redirect (the old name) for a
    directory renamed in its parent, an absolute one (the path of its lower parts
    from the root) otherwise, and for a metadata-only copy of a lower hard link
    always. A redirect already there is kept when it still says where the lower
    parts are."""
    absolute = not samedir or (not node.is_dir and _lower_nlink(node) > 1)
    if node.redirect is not None and (not absolute or markers.is_absolute_redirect(node.redirect)):
        return
    redirect = absolute_redirect(node) if absolute else node.name
    markers.set_redirect(fd_path(dirfd, name), redirect, union.ns)
    node.redirect = redirect


def absolute_redirect(node: Node) -> bytes:
    """Where *node*'s lower parts are, from the root: each ancestor's own redirect
    or name, up to the first absolute redirect (``ovl_get_redirect``). EXDEV when
    longer than the kernel writes."""
    parts: list[bytes] = []
    length = 0
    cur: Node | None = node
    while cur is not None and cur.parent is not None:
        part = cur.redirect if cur.redirect is not None else cur.name
        length += len(part) + (0 if part.startswith(b"/") else 1)
        if length > REDIRECT_MAX:
            raise OSError(errno.EXDEV, "redirect too long", node.name)
        parts.append(part)
        if part.startswith(b"/"):
            break
        cur = cur.parent
    else:
        parts.append(b"")
    return b"/".join(reversed(parts))


def _lower_nlink(node: Node) -> int:
    """The nlink of the lower file a metadata-only copy (or lower file) is of."""
    place = node.lowers[0] if node.lowers else node.place
    st = place.layer.lstat(*place.split())
    return st.st_nlink if st is not None else 1


def _has_origin(union: Union, dirfd: int, name: bytes, node: Node) -> bool:
    """Whether the kernel counts *node* as having a copy-up origin: its st_ino is
    not its upper inode's own."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return node.st_ino != union.inos.real(node.layer, st.st_ino)


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
        # not change, also if a crash comes before that rename: the target was
        # empty and stays so, and the new directory has its mode, owner, xattrs
        # and times (as the kernel's).
        work, moved_out = union.work_fd, union.tmp_name()
        os.mkdir(moved_out, 0o700, dir_fd=work)
        try:
            copy_metadata(fd_path(dfd, dname), fd_path(work, moved_out), d_up)
            markers.set_opaque(work, moved_out, union.ns)
            renameat2(work, moved_out, dfd, dname, RENAME_EXCHANGE)
        except BaseException:
            discard(work, moved_out)
            raise
    else:
        moved_out = None
    if d_up is not None and is_whiteout(d_up):
        if src.is_dir and not src_whiteout:
            # A directory cannot replace a device: it swaps with the whiteout, which
            # then is dropped (or, after a crash, by the next mount).
            note = union.tmp_name(markers.DROP_NOTE)
            markers.swap_dir_onto_whiteout(sfd, sname, dfd, dname, union.work_fd, note, spath)
            try:
                markers.drop_swapped_whiteout(sfd, sname, union.work_fd, note)
            except OSError as e:  # it hides nothing; the next mount drops it
                log.warning("could not remove the whiteout left at %r: %s", sname, e)
        else:
            markers.rename_onto_whiteout(sfd, sname, dfd, dname, keep=src_whiteout)
        union.tell(WHITEOUT, dpath, outcome="removed", why="replaced by a renamed entry")
        if src_whiteout:
            union.tell(WHITEOUT, spath, outcome="created", why="a lower layer has the old name")
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
    if swap and dst is not None:
        _rename_one(union, dst, dparent, dname, sparent, sname)


def _rename_one(
    union: Union, node: Node, old_parent: Node, old_name: bytes, parent: Node, name: bytes
) -> None:
    """Move one of *node*'s names; other hard links keep theirs."""
    if node.aliases and (old_parent, old_name) in node.aliases:
        union.drop_name(node, old_parent, old_name)
        union.add_alias(node, parent, name)
    else:
        union.table.set_parent(node, parent, name)
