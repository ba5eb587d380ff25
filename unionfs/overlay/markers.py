"""The overlay's markers: the one module that reads and writes them.

A layer marks a deleted name with a *whiteout* and cuts off the directories
below it with an *opaque* marker. Two formats exist:

- the kernel's (what ``mount -t overlay`` reads and what the upper is always
  written in): a whiteout is a character device 0/0, an opaque directory has
  the xattr ``trusted.overlay.opaque=y`` (``user.overlay.opaque`` for a stack
  used with ``userxattr``);
- the OCI layer format's (what image layer tarballs and containers-storage's
  layers use): an empty file ``.wh.NAME`` deletes ``NAME``, and a file
  ``.wh..wh..opq`` makes its directory opaque.

Every whiteout and opaque marker the daemon or the image tools write is
written by a function here, so "where is a whiteout made?" has one answer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass

from unionfs.overlay.syscalls import RENAME_EXCHANGE, RENAME_WHITEOUT, fd_path, renameat2

WHITEOUT_MODE = stat.S_IFCHR  # mode 0000 and device 0/0, like the kernel's own whiteouts
SHARED_WHITEOUT = b"#whiteout"  # in WORKDIR/work, like the kernel's

OCI_PREFIX = b".wh."  # reserved by the OCI layer format; never created through the mount
OCI_OPAQUE = b".wh..wh..opq"
OCI_NAME_MAX = 255 - len(OCI_PREFIX)  # longest name an OCI whiteout can delete


@dataclass(frozen=True)
class XattrNamespace:
    """Where the overlay keeps its private xattrs: ``trusted.overlay.`` as root,
    ``user.overlay.`` with the kernel's ``userxattr`` option."""

    prefix: bytes

    @property
    def opaque(self) -> bytes:
        return self.prefix + b"opaque"

    @property
    def userxattr(self) -> bool:
        return self.prefix.startswith(b"user.")


TRUSTED = XattrNamespace(b"trusted.overlay.")
USER = XattrNamespace(b"user.overlay.")
PRIVATE_PREFIXES = (TRUSTED.prefix, USER.prefix)


def other(ns: XattrNamespace) -> XattrNamespace:
    return USER if ns is TRUSTED else TRUSTED


def is_private_xattr(name: bytes) -> bool:
    """The overlay's own xattrs, in either namespace: never shown through the mount
    and never set through it, so no container can forge a marker that a later
    mount (with or without ``userxattr``) would obey."""
    return name.startswith(PRIVATE_PREFIXES)


def trusted_xattrs_writable(dirfd: int) -> bool:
    """Whether ``trusted.*`` xattrs can be written in directory *dirfd* (the workdir).

    Only a process with CAP_SYS_ADMIN in the filesystem's user namespace can:
    not an ordinary user, and not root inside a rootless container's namespace.
    There the overlay's markers go in ``user.overlay.*``, as the kernel's
    ``userxattr`` option does.
    """
    probe = b"trusted.overlay.unionfs-probe"
    try:
        os.setxattr(fd_path(dirfd), probe, b"", follow_symlinks=True)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES, errno.ENOTSUP):
            return False
        raise
    with contextlib.suppress(OSError):
        os.removexattr(fd_path(dirfd), probe, follow_symlinks=True)
    return True


# -- reading -------------------------------------------------------------------


def is_whiteout(st: os.stat_result) -> bool:
    """A kernel-format whiteout: a character device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_oci_name(name: bytes) -> bool:
    """A name the OCI format reserves for its markers."""
    return name.startswith(OCI_PREFIX)


def oci_deleted(name: bytes) -> bytes | None:
    """The name an OCI whiteout file deletes (``.wh.NAME`` -> ``NAME``); None for the
    opaque marker and for names that are not OCI markers."""
    if not name.startswith(OCI_PREFIX) or name == OCI_OPAQUE:
        return None
    return name[len(OCI_PREFIX) :]


def oci_whiteout_name(name: bytes) -> bytes:
    """The OCI whiteout file that deletes *name*."""
    return OCI_PREFIX + name


_ABSENT = (errno.ENODATA, errno.ENOTSUP, errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def overlay_xattr(
    path: bytes, ns: XattrNamespace, suffix: bytes, follow: bool = False
) -> bytes | None:
    """The overlay xattr ``<namespace>.overlay.<suffix>`` of *path*, or None.

    Both namespaces are read: the mount's own (*ns*) wins, as it is the only one
    the kernel would read; the other is honoured when the mount's has no such
    xattr, so an upper written with ``userxattr`` shows the same tree to a
    mount without it. One ``listxattr`` answers the common case (no overlay
    xattr at all) in one call.
    """
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise
    if not names:
        return None
    for space in (ns, other(ns)):
        name = space.prefix + suffix
        if os.fsdecode(name) in names:
            try:
                return os.getxattr(path, name, follow_symlinks=follow)
            except OSError as e:
                if e.errno not in _ABSENT:
                    raise
    return None


def has_opaque_xattr(path: bytes, ns: XattrNamespace, follow: bool = False) -> bool:
    """Whether the directory at *path* carries the kernel's opaque marker (exactly ``y``)."""
    return overlay_xattr(path, ns, b"opaque", follow) == b"y"


# -- writing the kernel format ---------------------------------------------------


def make_whiteout(dirfd: int, name: bytes, workfd: int = -1) -> None:
    """Put a whiteout at *name* (which must not exist): a hard link of the workdir's
    shared whiteout.

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
    make_device_whiteout(dirfd, name)


def make_device_whiteout(dirfd: int, name: bytes) -> None:
    """A whiteout inode of its own (mknod 0/0), owned like the kernel's."""
    os.mknod(name, WHITEOUT_MODE, 0, dir_fd=dirfd)
    _own_whiteout(dirfd, name)


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


def _own_whiteout(dirfd: int, name: bytes) -> None:
    """A whiteout belongs to the mounter, as the kernel's do (it makes them in the
    workdir): in a setgid directory it must not take the directory's group."""
    if os.fstat(dirfd).st_mode & stat.S_ISGID:
        os.chown(name, os.geteuid(), os.getegid(), dir_fd=dirfd, follow_symlinks=False)


def replace_with_whiteout(dirfd: int, name: bytes, workfd: int, tmp: bytes) -> None:
    """Move *name* into the workdir as *tmp* and leave a whiteout in its place, atomically.

    A linked whiteout is swapped in (``RENAME_EXCHANGE``), as the kernel does;
    ``RENAME_WHITEOUT`` would make a new whiteout inode, which costs far more.
    The caller removes *tmp* afterwards.
    """
    make_whiteout(workfd, tmp, workfd)
    try:
        renameat2(workfd, tmp, dirfd, name, RENAME_EXCHANGE)
    except BaseException:
        os.unlink(tmp, dir_fd=workfd)
        raise


def rename_leaving_whiteout(sfd: int, sname: bytes, dfd: int, dname: bytes) -> None:
    """Rename *sname* to *dname* and put a whiteout at *sname*, in one step.

    The kernel too leaves this whiteout with ``RENAME_WHITEOUT``, so it is owned
    like a new entry of that directory (a setgid directory's group included).
    """
    renameat2(sfd, sname, dfd, dname, RENAME_WHITEOUT)


def rename_onto_whiteout(sfd: int, sname: bytes, dfd: int, dname: bytes, keep: bool) -> None:
    """Rename *sname* onto the whiteout at *dname*.

    With *keep* the whiteout is not dropped but moves to *sname* (one exchange),
    for a source name that needs one anyway.
    """
    if keep:
        renameat2(sfd, sname, dfd, dname, RENAME_EXCHANGE)
    else:
        renameat2(sfd, sname, dfd, dname)


def set_opaque(dirfd: int, name: bytes, ns: XattrNamespace = TRUSTED) -> None:
    """Mark directory *name* in *dirfd* opaque: the layers below stop merging into it."""
    os.setxattr(fd_path(dirfd, name), ns.opaque, b"y", follow_symlinks=False)


def clear_opaque(dirfd: int, name: bytes, ns: XattrNamespace = TRUSTED) -> None:
    with contextlib.suppress(OSError):
        os.removexattr(fd_path(dirfd, name), ns.opaque, follow_symlinks=False)


# -- writing the OCI format --------------------------------------------------------


def make_oci_whiteout(dirfd: int, name: bytes) -> None:
    """An OCI whiteout file ``.wh.NAME`` that deletes *name* in the layers below."""
    if len(name) > OCI_NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long for an OCI whiteout", name)
    fd = os.open(
        oci_whiteout_name(name),
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dirfd,
    )
    os.close(fd)


def make_oci_opaque(dirfd: int) -> None:
    """The OCI opaque marker ``.wh..wh..opq`` in the directory *dirfd*."""
    fd = os.open(
        OCI_OPAQUE,
        os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dirfd,
    )
    os.close(fd)


# -- reading one directory of a layer, in either format ------------------------------

OCI_META_PREFIX = b".wh..wh."  # aufs bookkeeping (``.wh..wh.plnk``...): not an entry


def is_oci_meta(name: bytes) -> bool:
    """An aufs bookkeeping name other than the opaque marker: ignored, never an entry."""
    return name.startswith(OCI_META_PREFIX) and name != OCI_OPAQUE


@dataclass
class LayerDir:
    """What one directory of a layer says, whatever the format it is written in."""

    names: list[bytes]  # its entries, sorted, marker files and kernel whiteouts left out
    deleted: list[bytes]  # the names its whiteouts delete in the layers below, sorted
    opaque: bool  # the layers below stop merging into it


def read_layer_dir(fd: int) -> LayerDir:
    """Read the directory *fd* (any fd of it, ``O_PATH`` too) of a layer in the kernel
    format, the OCI format, or a mix: char 0/0 devices and ``.wh.NAME`` files are
    whiteouts; the opaque xattr (either namespace) or ``.wh..wh..opq`` makes it opaque.

    A name that is both present and whited out keeps its entry: in the OCI format
    a whiteout deletes only what the layers below have.
    """
    names: list[bytes] = []
    deleted: set[bytes] = set()
    opaque = False
    with os.scandir(fd_path(fd)) as it:
        for dent in it:
            name = dent.name
            if name.startswith(OCI_PREFIX):
                if name == OCI_OPAQUE:
                    opaque = True
                elif not is_oci_meta(name):
                    deleted.add(name[len(OCI_PREFIX) :])
                continue
            if (
                not dent.is_dir(follow_symlinks=False)
                and not dent.is_file(follow_symlinks=False)
                and not dent.is_symlink()
                and is_whiteout(dent.stat(follow_symlinks=False))
            ):
                deleted.add(name)
                continue
            names.append(name)
    if not opaque:
        opaque = has_opaque_xattr(fd_path(fd), TRUSTED, follow=True)
    names.sort()
    return LayerDir(names, sorted(deleted.difference(names)), opaque)
