"""Tree snapshots: everything observable about a directory tree, as plain data.

A snapshot maps each path (bytes, relative to the root; ``b""`` is the root)
to a dict of raw fields. Snapshots are taken inside the worker process (so a
hanging mount cannot hang the runner) and compared by :mod:`compare`.

Three flavours:

* ``mount``: a merged view; every xattr the mount lists is recorded, so a
  leaked ``trusted.overlay.*`` name would show up as a divergence.
* ``upper``: an upper directory after unmount; whiteouts appear as char 0/0.
  The overlay's private xattrs (``trusted.overlay.*``, or ``user.overlay.*`` in
  the unprivileged mode) are kept, with values that differ between any two
  copies made comparable: an origin file handle as its header (version, flags,
  type, filesystem uuid) and the layer path of the inode it names
  (``identify``), the upper root's random uuid as its length only.
  Hole maps of regular files are recorded (sparse copy-up).
* ``raw``: a lower layer, for the byte-for-byte "unchanged" check; includes
  ctime and inode numbers, which any modification would move.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import stat
from typing import Any

Snapshot = dict[bytes, dict[str, Any]]
SEEK_DATA, SEEK_HOLE = 3, 4
OPAQUE = b"trusted.overlay.opaque"
OVERLAY = (b"trusted.overlay.", b"user.overlay.")

_libc = ctypes.CDLL(None, use_errno=True)


class _Handle(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_uint), ("type", ctypes.c_int), ("f", ctypes.c_ubyte * 128)]


def _handle_ino(value: bytes, mount_fd: int) -> int | None:
    """The inode number an origin xattr's file handle names (on *mount_fd*'s filesystem)."""
    if len(value) < 21 or len(value) < value[2]:
        return None
    fid = value[21 : value[2]]
    h = _Handle(len(fid), value[4])
    ctypes.memmove(h.f, fid, len(fid))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(h), os.O_PATH)
    if fd < 0:
        return None
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def inode_index(roots: list[tuple[str, bytes]]) -> dict[int, str]:
    """Every inode below the labelled *roots* (e.g. ``l0``, ``u``) -> where it is:
    ``label:path`` for each of its names, so inode numbers of two copies of the same
    layers can be compared by what they stand for."""
    names: dict[int, list[str]] = {}

    def walk(label: str, root: bytes, rel: bytes) -> None:
        full = os.path.join(root, rel) if rel else root
        try:
            st = os.lstat(full)
        except OSError:
            return
        names.setdefault(st.st_ino, []).append(f"{label}:{rel.decode(errors='backslashreplace')}")
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(full)):
                walk(label, root, os.path.join(rel, name) if rel else name)

    for label, root in roots:
        walk(label, root, b"")
    return {ino: " ".join(sorted(v)) for ino, v in names.items()}


def identify(snap: Snapshot, index: dict[int, str]) -> None:
    """Add to each entry of a mount snapshot which layer inode its st_ino is (``src``)."""
    for e in snap.values():
        if "ino" in e:
            e["src"] = index.get(e["ino"], "not a layer inode")


def _overlay_value(name: bytes, value: bytes, mount_fd: int, index: dict[int, str]) -> bytes:
    """A private xattr's value, comparable between two copies (see the module doc)."""
    if name.endswith(b".overlay.uuid"):
        return b"<%d bytes>" % len(value)
    if name.endswith(b".overlay.origin") and value:
        ino = _handle_ino(value, mount_fd)
        where = "stale" if ino is None else index.get(ino, "not a layer inode")
        return value[:21].hex().encode() + b" -> " + where.encode()
    return value


def _xattrs(
    path: bytes, flavour: str, mount_fd: int = -1, index: dict[int, str] | None = None
) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        return {b"<error>": errno.errorcode.get(e.errno or 0, "?").encode()}
    out: dict[bytes, bytes] = {}
    for name in names:
        bname = name.encode("utf-8", "surrogateescape")
        if flavour == "upper" and not bname.startswith((b"user.", *OVERLAY)):
            continue
        if bname == b"security.selinux":
            continue
        try:
            out[bname] = os.getxattr(path, name, follow_symlinks=False)
            if bname.startswith(OVERLAY) and index is not None:
                out[bname] = _overlay_value(bname, out[bname], mount_fd, index)
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


def entry(
    path: bytes, flavour: str, mount_fd: int = -1, index: dict[int, str] | None = None
) -> dict[str, Any]:
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
            e["extents"] = extents
        except OSError as err:
            e["data"] = b"<error %s>" % errno.errorcode.get(err.errno or 0, "?").encode()
    e["xattrs"] = _xattrs(path, flavour, mount_fd, index)
    if flavour == "raw":
        e["ctime"] = st.st_ctime_ns
    return e


def take(root: bytes, flavour: str, index: dict[int, str] | None = None) -> Snapshot:
    """Walk *root* without following symlinks and record every entry; *index* (an
    ``inode_index`` of the layers) makes an upper's origin xattrs comparable."""
    snap: Snapshot = {}
    mount_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY) if index is not None else -1

    def walk(rel: bytes) -> None:
        full = os.path.join(root, rel) if rel else root
        try:
            snap[rel] = entry(full, flavour, mount_fd, index)
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

    try:
        walk(b"")
    finally:
        if mount_fd >= 0:
            os.close(mount_fd)
    return snap
