"""The overlay's markers: the one module that reads and writes them.

A layer marks a deleted name with a *whiteout* and cuts off the directories
below it with an *opaque* marker; the kernel's format adds a few more private
xattrs (see ``XattrNamespace``): a *redirect* (where a renamed directory's, or
a metadata-only copy's, lower part is), *metacopy* (the data of this upper
file is still in the layer below), *origin* (a file handle of the lower inode
a copy-up came from, which keeps ``st_ino`` across mounts), *impure* (a
directory holding such entries) and the upper root's *uuid*. Two formats exist:

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
import sys

from unionfs.overlay.syscalls import (
    RENAME_EXCHANGE,
    RENAME_WHITEOUT,
    fd_path,
    open_beneath,
    renameat2,
)
from unionfs.records import Record

WHITEOUT_MODE = stat.S_IFCHR  # mode 0000 and device 0/0, like the kernel's own whiteouts
SHARED_WHITEOUT = b"#whiteout"  # in WORKDIR/work, like the kernel's

OCI_PREFIX = b".wh."  # reserved by the OCI layer format; never created through the mount
OCI_OPAQUE = b".wh..wh..opq"
OCI_NAME_MAX = 255 - len(OCI_PREFIX)  # longest name an OCI whiteout can delete


class XattrNamespace(Record):
    """Where the overlay keeps its private xattrs: ``trusted.overlay.`` as root,
    ``user.overlay.`` with the kernel's ``userxattr`` option."""

    prefix: bytes

    @property
    def opaque(self) -> bytes:
        return self.prefix + b"opaque"

    @property
    def redirect(self) -> bytes:
        return self.prefix + b"redirect"

    @property
    def metacopy(self) -> bytes:
        return self.prefix + b"metacopy"

    @property
    def origin(self) -> bytes:
        return self.prefix + b"origin"

    @property
    def impure(self) -> bytes:
        return self.prefix + b"impure"

    @property
    def uuid(self) -> bytes:
        return self.prefix + b"uuid"

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


def is_whiteout_entry(dent: os.DirEntry[bytes]) -> bool:
    """A kernel-format whiteout, from a listing: the common types (known from the
    listing itself) are ruled out before anything is stat'ed."""
    return (
        not dent.is_file(follow_symlinks=False)
        and not dent.is_dir(follow_symlinks=False)
        and not dent.is_symlink()
        and is_whiteout(dent.stat(follow_symlinks=False))
    )


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


_PREFIXES = {space.prefix: os.fsdecode(space.prefix) for space in (TRUSTED, USER)}


def overlay_xattrs(path: bytes, ns: XattrNamespace, follow: bool = False) -> dict[bytes, bytes]:
    """All overlay xattrs of *path*, by suffix (``opaque``, ``redirect``, ...), read in
    one ``listxattr`` and a ``getxattr`` per overlay xattr found; as ``overlay_xattr``,
    the mount's namespace wins and the other is honoured where it has none."""
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as e:
        if e.errno in _ABSENT:
            return {}
        raise
    out: dict[bytes, bytes] = {}
    if not names:
        return out
    for space in (other(ns), ns):  # the mount's own last: it wins
        prefix = _PREFIXES[space.prefix]
        for name in names:
            if not name.startswith(prefix):
                continue
            try:
                out[os.fsencode(name[len(prefix) :])] = os.getxattr(
                    path, name, follow_symlinks=follow
                )
            except OSError as e:
                if e.errno not in _ABSENT:
                    raise
    return out


def _get(path: bytes, name: bytes, follow: bool = False) -> bytes | None:
    """An xattr of the entry at *path* (following a symlink only with *follow*: for a
    ``/proc/self/fd`` path of a directory itself), None when absent."""
    try:
        return os.getxattr(path, name, follow_symlinks=follow)
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise


def parse_redirect(value: bytes | None) -> bytes | None:
    """A redirect xattr's value: an absolute path from the overlay's root (``/a/b``)
    or one name in the same parent; None when there is none.

    As in the kernel, a value that is empty, a relative one holding a ``/``, or an
    absolute one with an empty component is an error (EINVAL) that fails the lookup.
    """
    if value is None:
        return None
    value = value.split(b"\0", 1)[0]  # the kernel reads it as a C string
    if value.startswith(b"/"):
        valid = all(value.split(b"/")[1:])
    else:
        valid = bool(value) and b"/" not in value
    if not valid:
        raise OSError(errno.EINVAL, "invalid redirect", value)
    return value


def is_absolute_redirect(redirect: bytes) -> bool:
    return redirect.startswith(b"/")


METACOPY_MIN_SIZE = 4  # struct ovl_metacopy: version, len, flags, digest_algo


def parse_metacopy(value: bytes | None) -> bool:
    """Whether a regular file with this metacopy xattr value is a metadata-only copy
    (its data is below). The kernel's marker is empty, or a ``struct ovl_metacopy``
    with an fs-verity digest; anything shorter than that struct is an error (EIO)."""
    if value is None:
        return False
    if 0 < len(value) < METACOPY_MIN_SIZE:
        raise OSError(errno.EIO, "metacopy xattr too small")
    return True


def parse_opaque(value: bytes | None) -> bytes | None:
    """An opaque xattr's value (``y``: opaque; ``x``: holds xattr whiteouts), None if
    absent. Only an exactly one-byte value counts, as the kernel reads it into one byte."""
    return value if value is not None and len(value) == 1 else None


# -- origin file handles (struct ovl_fb) -------------------------------------------

FH_VERSION = 0
FH_MAGIC = 0xFB
FH_FLAG_BIG_ENDIAN = 1
FH_FLAG_ANY_ENDIAN = 2
FH_FLAG_PATH_UPPER = 4
_FH_FLAG_ALL = 7
_FH_HEADER = 21  # version, magic, len, flags, type, 16 bytes of uuid
_CPU_ENDIAN = FH_FLAG_BIG_ENDIAN if sys.byteorder == "big" else 0
NULL_UUID = bytes(16)


class FileHandle(Record):
    """An origin: the kernel's ``struct ovl_fb``, a file handle of the lower inode a
    copy-up came from (``name_to_handle_at`` type and bytes) and the uuid of its
    filesystem. It is what keeps ``st_ino`` across mounts, for the kernel and unionfs."""

    type: int
    fid: bytes
    uuid: bytes = NULL_UUID

    def encode(self) -> bytes:
        length = _FH_HEADER + len(self.fid)
        return bytes([FH_VERSION, FH_MAGIC, length, _CPU_ENDIAN, self.type]) + self.uuid + self.fid

    @classmethod
    def decode(cls, value: bytes) -> FileHandle | None:
        """The handle in an origin xattr's *value*, or None for "origin unknown": an
        empty value, a newer version, unknown flags, the other byte order. A value
        the kernel calls invalid (too short, wrong magic) raises ValueError."""
        if not value:
            return None
        if len(value) < _FH_HEADER or len(value) < value[2] or value[1] != FH_MAGIC:
            raise ValueError("invalid origin")
        version, _, length, flags, fh_type = value[:5]
        if version > FH_VERSION or flags & ~_FH_FLAG_ALL:
            return None
        if not flags & FH_FLAG_ANY_ENDIAN and flags & FH_FLAG_BIG_ENDIAN != _CPU_ENDIAN:
            return None
        return cls(fh_type, bytes(value[_FH_HEADER:length]), bytes(value[5:_FH_HEADER]))


def read_origin(path: bytes, ns: XattrNamespace) -> tuple[bool, FileHandle | None]:
    """Whether the upper entry at *path* records a copy-up origin, and its handle
    (None: origin unknown, as an empty value says)."""
    value = overlay_xattr(path, ns, b"origin")
    if value is None:
        return False, None
    try:
        return True, FileHandle.decode(value)
    except ValueError:
        return True, None


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
    for a source name that needs one anyway. A directory whose name needs none
    moves with :func:`swap_dir_onto_whiteout`.
    """
    if keep:
        renameat2(sfd, sname, dfd, dname, RENAME_EXCHANGE)
    else:
        renameat2(sfd, sname, dfd, dname)


# A symlink in WORKDIR/work whose name ends so, and whose target is a path in the
# upper: a whiteout there hides nothing and is removed by the next mount.
DROP_NOTE = b".drop"


def swap_dir_onto_whiteout(
    sfd: int, sname: bytes, dfd: int, dname: bytes, workfd: int, note: bytes, path: bytes
) -> None:
    """Move the directory *sname* (at *path* in the upper) onto the whiteout at *dname*,
    when *sname* needs no whiteout; *note* ends with :data:`DROP_NOTE`.

    A directory cannot replace a device, so the two swap places, as in the kernel,
    and the whiteout left at *sname* is for the caller to drop at once
    (:func:`drop_swapped_whiteout`). A kill in between would leave it hiding
    nothing, which is not harmless: the kernel overlay lists such a whiteout in a
    directory without lower part and cannot remove that directory. So *note* in
    the workdir names it first, and the next mount drops it
    (:func:`drop_noted_whiteout`).
    """
    os.symlink(path, note, dir_fd=workfd)
    try:
        renameat2(sfd, sname, dfd, dname, RENAME_EXCHANGE)
    except BaseException:
        os.unlink(note, dir_fd=workfd)
        raise


def drop_swapped_whiteout(sfd: int, sname: bytes, workfd: int, note: bytes) -> None:
    os.unlink(sname, dir_fd=sfd)
    os.unlink(note, dir_fd=workfd)


def drop_noted_whiteout(workfd: int, note: bytes, upper_fd: int) -> None:
    """At mount: remove the whiteout a note in the workdir names, if it is still there
    (a kill may have come before the swap, or after the whiteout was dropped)."""
    path = os.readlink(note, dir_fd=workfd)
    parent, _, name = path.rpartition(b"/")
    try:
        fd = open_beneath(upper_fd, parent, os.O_PATH | os.O_DIRECTORY) if parent else -1
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        dirfd = fd if parent else upper_fd
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if is_whiteout(st):
            os.unlink(name, dir_fd=dirfd)
    finally:
        if fd >= 0:
            os.close(fd)


def set_opaque(dirfd: int, name: bytes, ns: XattrNamespace = TRUSTED) -> None:
    """Mark directory *name* in *dirfd* opaque: the layers below stop merging into it."""
    os.setxattr(fd_path(dirfd, name), ns.opaque, b"y", follow_symlinks=False)


def clear_opaque(dirfd: int, name: bytes, ns: XattrNamespace = TRUSTED) -> None:
    with contextlib.suppress(OSError):
        os.removexattr(fd_path(dirfd, name), ns.opaque, follow_symlinks=False)


def set_redirect(path: bytes, redirect: bytes, ns: XattrNamespace) -> None:
    os.setxattr(path, ns.redirect, redirect, follow_symlinks=False)


def set_metacopy(path: bytes, ns: XattrNamespace) -> None:
    """Mark the upper file at *path* a metadata-only copy (the kernel's empty value)."""
    os.setxattr(path, ns.metacopy, b"", follow_symlinks=False)


def clear_metacopy(path: bytes, ns: XattrNamespace) -> None:
    """The data is in the upper now: drop the marker, in both namespaces (a redirect
    stays, as in the kernel)."""
    for space in (ns, other(ns)):
        try:
            os.removexattr(path, space.metacopy, follow_symlinks=False)
        except OSError as e:
            if e.errno not in _ABSENT:
                raise


def set_origin(path: bytes, origin: FileHandle | None, ns: XattrNamespace) -> None:
    """Record a copy-up's origin; None writes the empty value, "origin unknown"."""
    os.setxattr(path, ns.origin, b"" if origin is None else origin.encode(), follow_symlinks=False)


def set_impure(dirfd: int, ns: XattrNamespace) -> None:
    """Mark the upper directory *dirfd* as holding copied-up or moved entries."""
    path = fd_path(dirfd)
    if _get(path, ns.impure, follow=True) != b"y":
        os.setxattr(path, ns.impure, b"y")


def is_impure(dirfd: int, ns: XattrNamespace) -> bool:
    return overlay_xattr(fd_path(dirfd), ns, b"impure", follow=True) is not None


def clear_impure(dirfd: int, ns: XattrNamespace) -> None:
    try:
        os.removexattr(fd_path(dirfd), ns.impure)
    except OSError as e:
        if e.errno != errno.ENODATA:
            raise


def ensure_uuid(rootfd: int, ns: XattrNamespace) -> None:
    """The kernel's ``uuid=auto``: a fresh upper root (not yet impure, no uuid) gets a
    random persistent overlay uuid; an older one is left alone."""
    path = fd_path(rootfd)
    if _get(path, ns.uuid, follow=True) is not None:
        return
    if _get(path, ns.impure, follow=True) is not None:
        return
    os.setxattr(path, ns.uuid, os.urandom(16))


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


class LayerDir(Record):
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
            if is_whiteout_entry(dent):
                deleted.add(name)
                continue
            names.append(name)
    if not opaque:
        opaque = has_opaque_xattr(fd_path(fd), TRUSTED, follow=True)
    names.sort()
    return LayerDir(names, sorted(deleted.difference(names)), opaque)
