"""What a directory's default POSIX ACL gives a new entry, as the kernel overlay does it.

A new entry in a directory of the upper layer gets its mode from the caller's umask,
unless the directory has a default ACL: then the ACL decides, and the umask does not
apply (``posix_acl_create`` in the kernel). Where the upper filesystem makes the entry
in that directory itself, it applies the ACL; what unionfs builds in the workdir (over
a whiteout, setuid/setgid, or another user's) is given the result here, as the kernel
overlay gives it (``ovl_create_over_whiteout``).

The value is the xattr's (``system.posix_acl_default``, version 2): a 4-byte header,
then 8-byte entries of tag, permissions and id, little-endian.
"""

from __future__ import annotations

import errno
import os
import struct

from unionfs import lazylog
from unionfs.overlay.syscalls import fd_path

log = lazylog.get(__name__)

DEFAULT = "system.posix_acl_default"
ACCESS = "system.posix_acl_access"

_VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

# Where a filesystem has no ACLs, or the directory none.
_NONE = (errno.ENODATA, errno.EOPNOTSUPP)


def encode(entries: list[tuple[int, int, int]]) -> bytes:
    """The xattr value of (tag, permissions, id) entries."""
    return _HEADER.pack(_VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


# How an id the daemon's user namespace cannot map reads in an ACL (``(uid_t)-1``).
UNMAPPED = 0xFFFFFFFF


def without_unmapped(value: bytes) -> bytes | None:
    """ACL *value* less its entries naming a user or group as UNMAPPED, which a daemon in
    a user namespace cannot write back (EINVAL); None when it names none (or is not an
    ACL). What is left grants nobody more than before: only those users and groups lose
    what it gave them."""
    body = value[_HEADER.size :]
    if len(value) < _HEADER.size or len(body) % _ENTRY.size:
        return None
    entries = [list(e) for e in _ENTRY.iter_unpack(body)]
    kept = [e for e in entries if not (e[0] in (USER, GROUP) and e[2] == UNMAPPED)]
    if len(kept) == len(entries):
        return None
    if not any(e[0] in (USER, GROUP) for e in kept):
        # Nothing named is left: the mask goes, and with it what it kept from the owning
        # group (an ACL with a mask and nothing named stands for a mode whose group bits
        # are the mask's, which would give the group all that the mask allows).
        masks = [e[1] for e in kept if e[0] == MASK]
        kept = [e for e in kept if e[0] != MASK]
        for e in kept:
            if e[0] == GROUP_OBJ and masks:
                e[1] &= masks[0]
    return encode([(t, p, i) for t, p, i in kept])


def set_mapped(path: str | bytes | int, name: str | bytes, value: bytes, what: str) -> None:
    """setxattr of ACL *name*; where the daemon's user namespace cannot write every id
    it names (EINVAL), without those (``without_unmapped``), and that is logged; where
    that cannot be written either, the EINVAL is raised."""
    try:
        os.setxattr(path, name, value)
        return
    except OSError as e:
        fewer = without_unmapped(value) if e.errno == errno.EINVAL else None
        if fewer is None:
            raise
    os.setxattr(path, name, fewer)
    log.warning("%s: %s set without the users and groups this daemon cannot map", what, name)


def default_of(dirfd: int) -> bytes | None:
    """The default ACL of the directory open on *dirfd* (an ``O_PATH`` fd will do), or
    None when it has none (or its filesystem has no ACLs). One that cannot be read (a
    security module's refusal, say) is taken for none, and logged: the kernel's own
    reading of it is not subject to such checks, so nothing fails over it."""
    try:
        value = os.getxattr(fd_path(dirfd), DEFAULT)
    except OSError as e:
        if e.errno not in _NONE:
            log.warning("a directory's default ACL could not be read: %s", e)
        return None
    return value or None


def inherit(default: bytes, mode: int) -> tuple[int, bytes | None, bytes | None]:
    """A new entry's mode (*mode* as asked for, type and special bits kept) and its
    access and default ACLs (None: none) under a directory with *default*
    (``posix_acl_create`` with ``posix_acl_create_masq``). EIO for a value no
    filesystem would have stored, as the kernel says."""
    if len(default) < _HEADER.size or (len(default) - _HEADER.size) % _ENTRY.size:
        raise _bad("not a POSIX ACL")
    (version,) = _HEADER.unpack_from(default)
    if version != _VERSION:
        raise _bad(f"POSIX ACL version {version}")
    entries = [list(e) for e in _ENTRY.iter_unpack(default[_HEADER.size :])]  # changed in place
    perms = mode & 0o777
    equivalent = True
    group_obj = mask = None
    for entry in entries:
        tag = entry[0]
        if tag == USER_OBJ:
            entry[1] &= (perms >> 6) & 7
            perms &= (entry[1] << 6) | 0o077
        elif tag in (USER, GROUP):
            equivalent = False
        elif tag == GROUP_OBJ:
            group_obj = entry
        elif tag == OTHER:
            entry[1] &= perms & 7
            perms &= entry[1] | 0o770
        elif tag == MASK:
            mask = entry
            equivalent = False
        else:
            raise _bad(f"POSIX ACL tag {tag:#x}")
    narrowing = mask if mask is not None else group_obj
    if narrowing is None:
        raise _bad("POSIX ACL without a group entry")
    narrowing[1] &= (perms >> 3) & 7
    perms &= (narrowing[1] << 3) | 0o707
    access = None if equivalent else encode([(t, p, i) for t, p, i in entries])
    is_dir = (mode & 0o170000) == 0o040000
    return (mode & ~0o777) | perms, access, default if is_dir else None


def clear(fd: int, what: str = "the workdir") -> None:
    """Remove both ACLs of the directory open on *fd*, so that nothing made in it
    inherits from it: the workdir at mount, as ``ovl_workdir_create`` does, and the
    directory a layer is unpacked into. A failure is logged."""
    for name in (DEFAULT, ACCESS):
        try:
            os.removexattr(fd_path(fd), name)
        except OSError as e:
            if e.errno not in _NONE:
                log.warning("could not remove %s from %s: %s", name, what, e)


def _bad(why: str) -> OSError:
    return OSError(errno.EIO, f"a directory's default ACL: {why}")
