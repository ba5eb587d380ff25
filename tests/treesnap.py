"""A comparable picture of a directory tree, for checking a mount against the kernel's."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def snapshot(root: Path | str, mtimes: bool = True) -> dict[bytes, tuple[object, ...]]:
    """Every entry below *root*: type, mode, owner, size, content or target, user xattrs.

    nlink is kept for non-directories only (a merged directory's nlink is 1 by
    design); atime and ctime are left out because no two mounts agree on them.
    """
    out: dict[bytes, tuple[object, ...]] = {}
    base = os.fsencode(root)

    def walk(rel: bytes) -> None:
        path = os.path.join(base, rel) if rel else base
        for name in sorted(os.listdir(path)):
            child = os.path.join(rel, name) if rel else name
            full = os.path.join(base, child)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            if kind == stat.S_IFREG:
                with open(full, "rb") as f:
                    detail: object = hashlib.sha256(f.read()).hexdigest()
            elif kind == stat.S_IFLNK:
                detail = os.readlink(full)
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                detail = st.st_rdev
            else:
                detail = None
            try:
                xattrs = tuple(
                    sorted(
                        (n, os.getxattr(full, n, follow_symlinks=False))
                        for n in os.listxattr(full, follow_symlinks=False)
                        if n.startswith("user.")
                    )
                )
            except OSError:
                xattrs = ()
            out[child] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_size if kind != stat.S_IFDIR else None,
                detail,
                st.st_nlink if kind != stat.S_IFDIR else None,
                st.st_mtime_ns if mtimes and kind != stat.S_IFDIR else None,
                xattrs,
            )
            if kind == stat.S_IFDIR:
                walk(child)

    walk(b"")
    return out


def diff(a: dict[bytes, tuple[object, ...]], b: dict[bytes, tuple[object, ...]]) -> list[str]:
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            lines.append(f"{key!r}: {a.get(key)} != {b.get(key)}")
    return lines
