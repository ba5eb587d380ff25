"""Tree snapshots: everything observable about a directory tree, as plain data.

A snapshot maps each path (bytes, relative to the root; ``b""`` is the root)
to a dict of raw fields. Snapshots are taken inside the worker process (so a
hanging mount cannot hang the runner) and compared by :mod:`compare`.

Three flavours:

* ``mount``: a merged view; every xattr the mount lists is recorded, so a
  leaked ``trusted.overlay.*`` name would show up as a divergence.
* ``upper``: an upper directory after unmount; whiteouts appear as char 0/0,
  and the only overlay xattr kept (``trusted.overlay.*``, or ``user.overlay.*``
  in the unprivileged mode) is the opaque marker - origin/impure are kernel
  bookkeeping (file handles that differ between any two copies).
  Hole maps of regular files are recorded (sparse copy-up).
* ``raw``: a lower layer, for the byte-for-byte "unchanged" check; includes
  ctime and inode numbers, which any modification would move.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import Any

Snapshot = dict[bytes, dict[str, Any]]
SEEK_DATA, SEEK_HOLE = 3, 4
OPAQUE = b"trusted.overlay.opaque"
USER_OPAQUE = b"user.overlay.opaque"


def _xattrs(path: bytes, flavour: str) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        return {b"<error>": errno.errorcode.get(e.errno or 0, "?").encode()}
    out: dict[bytes, bytes] = {}
    for name in names:
        bname = name.encode("utf-8", "surrogateescape")
        if flavour == "upper" and not (
            (bname.startswith(b"user.") and not bname.startswith(b"user.overlay."))
            or bname in (OPAQUE, USER_OPAQUE)
        ):
            continue
        if bname == b"security.selinux":
            continue
        try:
            out[bname] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            out[bname] = b"<error %s>" % errno.errorcode.get(e.errno or 0, "?").encode()
    return out


def _content(path: bytes, size: int) -> tuple[bytes, list[tuple[int, int]] | None]:
    """File content (or its hash when large) and, for raw dirs, its data extents."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        h = hashlib.sha256()
        small = b""
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            h.update(chunk)
            if size <= 64:
                small += chunk
        data = small if size <= 64 else b"sha256:" + h.hexdigest().encode()
        extents: list[tuple[int, int]] = []
        off = 0
        while True:
            try:
                start = os.lseek(fd, off, SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, SEEK_HOLE)
            extents.append((start, end))
            off = end
        return data, extents
    finally:
        os.close(fd)


def entry(path: bytes, flavour: str) -> dict[str, Any]:
    st = os.lstat(path)
    fmt = stat.S_IFMT(st.st_mode)
    e: dict[str, Any] = {
        "fmt": fmt,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime": st.st_mtime_ns,
        "ino": st.st_ino,
        "nlink": st.st_nlink,
    }
    if fmt != stat.S_IFDIR:
        e["size"] = st.st_size
    if fmt in (stat.S_IFCHR, stat.S_IFBLK):
        e["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if fmt == stat.S_IFLNK:
        e["target"] = os.readlink(path)
    if fmt == stat.S_IFREG:
        try:
            data, extents = _content(path, st.st_size)
            e["data"] = data
            if flavour != "mount":
                e["extents"] = extents
        except OSError as err:
            e["data"] = b"<error %s>" % errno.errorcode.get(err.errno or 0, "?").encode()
    e["xattrs"] = _xattrs(path, flavour)
    if flavour == "raw":
        e["ctime"] = st.st_ctime_ns
    return e


def take(root: bytes, flavour: str) -> Snapshot:
    """Walk *root* without following symlinks and record every entry."""
    snap: Snapshot = {}

    def walk(rel: bytes) -> None:
        full = os.path.join(root, rel) if rel else root
        try:
            snap[rel] = entry(full, flavour)
        except OSError as err:
            snap[rel] = {"error": errno.errorcode.get(err.errno or 0, "?")}
            return
        if snap[rel]["fmt"] != stat.S_IFDIR:
            return
        try:
            names = os.listdir(full)
        except OSError as err:
            snap[rel]["listdir"] = errno.errorcode.get(err.errno or 0, "?")
            return
        for name in sorted(names):
            walk(os.path.join(rel, name) if rel else name)

    walk(b"")
    return snap
