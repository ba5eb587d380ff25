"""The unit tier: the overlay core driven on plain directories.

No mount, no /dev/fuse, no root: ``make test-user`` runs this tier as an
ordinary user too. Markers go in ``user.overlay.*`` when the tests are not
run as root (as the mount itself does then), in ``trusted.overlay.*`` as root.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from unionfs.overlay.markers import TRUSTED, USER, XattrNamespace
from unionfs.overlay.namespace import Caller
from unionfs.overlay.nodes import Node
from unionfs.overlay.union import Union, UnionConfig

NS: XattrNamespace = TRUSTED if os.geteuid() == 0 else USER
ME = Caller(os.geteuid(), os.getegid())


def write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def whiteout(path: Path) -> None:
    """A kernel-format whiteout, made directly in a layer (allowed unprivileged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, 0o600 | 0o020000, 0)


def opaque(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, NS.opaque, b"y")


def is_whiteout(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (st.st_mode & 0o170000) == 0o020000 and st.st_rdev == 0


@dataclass
class Layers:
    """Directories of one core test: lowers top first, upper, work."""

    lowers: list[Path]
    upper: Path
    work: Path

    @contextlib.contextmanager
    def open(self, readonly: bool = False, metacopy: bool = False) -> Iterator[Union]:
        """The union over these directories (fill them first), closed afterwards."""
        union = Union(
            UnionConfig(
                lowers=self.lowers,
                upper=None if readonly else self.upper,
                work=None if readonly else self.work,
                xattrs=NS,
                redirect="on" if metacopy else "follow",
                metacopy=metacopy,
            )
        )
        try:
            yield union
        finally:
            union.close()


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    d = {n: tmp_path / n for n in ("l1", "l2", "upper", "work")}
    for p in d.values():
        p.mkdir()
    return Layers([d["l1"], d["l2"]], d["upper"], d["work"])


def node(union: Union, path: str) -> Node:
    """The node at *path* (``a/b``), looked up name by name from the root and held,
    as the FUSE adapter holds each node it tells the kernel about."""
    cur = union.table.root
    for part in path.split("/"):
        found = union.lookup(cur, part.encode())
        if found is None:
            raise FileNotFoundError(path)
        cur = found[0]
        union.table.hold(cur)
    return cur


def visible(union: Union, path: str) -> bool:
    try:
        node(union, path)
    except FileNotFoundError:
        return False
    return True
