"""What an image's tree must preserve, for comparing two builds file by file.

Standard library only: the rootless engine test copies this file where the
test user can read it and runs it inside ``podman unshare`` (so owners are
seen as the container sees them), as ``python3 treeview.py ROOT``, which
prints the snapshot and the hard-link groups as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from pathlib import Path

Snapshot = dict[str, tuple[object, ...]]


def snapshot_tree(root: Path) -> Snapshot:
    """Describe every entry below *root* by what an image must preserve.

    Name, type, permission bits (with setuid/setgid/sticky), owner, content
    hash, symlink target and user-visible xattr names.  Timestamps and inode
    numbers differ between any two builds and are left out; hard links are
    compared separately (see :func:`hardlink_groups`).
    """
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    extra = (st.st_size, hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            try:
                xattrs = tuple(sorted(os.listxattr(path, follow_symlinks=False)))
            except OSError as e:
                xattrs = (f"<listxattr failed: {e.strerror}>",)
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, extra, xattrs)
    return out


def hardlink_groups(root: Path) -> set[frozenset[str]]:
    """Sets of paths below *root* that are the same (non-directory) inode."""
    by_inode: dict[tuple[int, int], set[str]] = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            by_inode.setdefault((st.st_dev, st.st_ino), set()).add(os.path.relpath(path, root))
    return {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}


def diff_snapshots(got: Snapshot, want: Snapshot, want_name: str = "kernel") -> list[str]:
    """Human-readable differences, 'got' being the unionfs side."""
    lines = []
    for path in sorted(set(got) | set(want)):
        if path not in got:
            lines.append(f"missing in unionfs image: {path} {want[path]}")
        elif path not in want:
            lines.append(f"extra in unionfs image:   {path} {got[path]}")
        elif got[path] != want[path]:
            lines.append(f"differs: {path}\n   unionfs: {got[path]}\n   {want_name}: {want[path]}")
    return lines


def as_json(root: Path) -> str:
    links = sorted(sorted(group) for group in hardlink_groups(root))
    return json.dumps({"tree": snapshot_tree(root), "links": links})


def from_json(text: str) -> tuple[Snapshot, set[frozenset[str]]]:
    """The inverse of :func:`as_json` (lists back to tuples, so snapshots compare equal)."""

    def tupled(value: object) -> object:
        return tuple(tupled(v) for v in value) if isinstance(value, list) else value

    data = json.loads(text)
    tree = {path: tuple(tupled(v) for v in entry) for path, entry in data["tree"].items()}
    return tree, {frozenset(group) for group in data["links"]}


if __name__ == "__main__":
    print(as_json(Path(sys.argv[1])))
