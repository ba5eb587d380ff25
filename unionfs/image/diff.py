"""``docker diff`` of an upper directory: what a container changed, as A, C and D.

The upper is read through ``markers.read_layer_dir`` (kernel or OCI format);
what the lower layers have is asked of the overlay itself (``LowerView``, a
read-only ``Union`` of the lowers), so a lower's whiteouts, opaque directories
and OCI markers count exactly as they do in a mount.

The result is the difference between the merged tree without the upper and the
merged tree with it, in the docker/podman format:

- ``A``: a path no lower has (everything inside an added directory is ``A`` too);
- ``C``: a path a lower has, replaced or modified; a directory is ``C`` when its
  owner or mode changed or anything inside it changed;
- ``D``: a whiteout, and each lower entry an opaque directory hides (only the
  top of a deleted tree is listed, as docker does).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from unionfs.image.digest import ImageError
from unionfs.overlay import markers
from unionfs.overlay.nodes import Entry, Node
from unionfs.overlay.union import Union, UnionConfig, join

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, order=True)
class Change:
    path: bytes  # relative to the root, no leading slash
    kind: str  # "A", "C" or "D"

    def line(self) -> bytes:
        return self.kind.encode() + b" /" + self.path

    def as_json(self) -> dict[str, str]:
        return {"kind": self.kind, "path": "/" + os.fsdecode(self.path)}


class LowerView:
    """The merged lower layers, read through the overlay's own resolution rules."""

    def __init__(self, lowers: list[Path]) -> None:
        self.union = Union(UnionConfig(lowers=lowers)) if lowers else None

    def close(self) -> None:
        if self.union is not None:
            self.union.close()

    def __enter__(self) -> LowerView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def root(self) -> Node | None:
        return self.union.table.root if self.union is not None else None

    def entry(self, parent: Node | None, name: bytes) -> Entry | None:
        """What the lowers show at *name* in the directory *parent* (None: nothing)."""
        if parent is None or self.union is None:
            return None
        return self.union.resolve(parent, name)

    def directory(self, parent: Node, entry: Entry) -> Node | None:
        """The merged directory *entry* is, or None when it is not a directory."""
        if self.union is None or not stat.S_ISDIR(entry.st.st_mode):
            return None
        return self.union.node_for(parent, entry)

    def names(self, node: Node) -> list[bytes]:
        assert self.union is not None
        return self.union.names(node)


def open_upper(upper: Path) -> int:
    try:
        return os.open(upper, _DIR)
    except OSError as e:
        raise ImageError(f"{upper}: {e.strerror}") from None


def changes(upper: Path, lowers: list[Path]) -> list[Change]:
    """Every change the upper directory makes to the lowers (top first), sorted."""
    fd = open_upper(upper)
    out: list[Change] = []
    try:
        with LowerView(lowers) as view:
            _Walk(view, out).dir(fd, b"", view.root, False)
    finally:
        os.close(fd)
    out.sort()
    return out


class _Walk:
    def __init__(self, view: LowerView, out: list[Change]) -> None:
        self.view = view
        self.out = out

    def dir(self, fd: int, path: bytes, old: Node | None, replaced: bool) -> bool:
        """Record the changes inside the upper directory *fd* (at *path*) over the
        lowers' directory *old*; *replaced*: the lowers no longer merge into it.
        Returns whether anything changed inside."""
        d = markers.read_layer_dir(fd)
        replaced = replaced or d.opaque
        present = set(d.names)
        before = len(self.out)
        for name in d.deleted:
            self.out.append(Change(join(path, name), "D"))
        for name in d.names:
            self.entry(fd, path, name, old, replaced)
        if replaced and old is not None:
            gone = set(d.deleted)
            for name in self.view.names(old):
                if name not in present and name not in gone:
                    self.out.append(Change(join(path, name), "D"))
        return len(self.out) > before

    def entry(self, fd: int, path: bytes, name: bytes, old: Node | None, replaced: bool) -> None:
        p = join(path, name)
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        was = self.view.entry(old, name)
        if was is None:
            self.out.append(Change(p, "A"))
            if stat.S_ISDIR(st.st_mode):
                with _opened(fd, name) as child:
                    self.added(child, p)
            return
        if not stat.S_ISDIR(st.st_mode):
            self.out.append(Change(p, "C"))
            return
        assert old is not None
        old_dir = self.view.directory(old, was)
        at = len(self.out)
        with _opened(fd, name) as child:
            inner = self.dir(child, p, old_dir, replaced)
        if inner or _meta_changed(st, was.st):
            self.out.insert(at, Change(p, "C"))

    def added(self, fd: int, path: bytes) -> None:
        """Everything in a directory no lower has is added (whiteouts there hide nothing)."""
        for name in markers.read_layer_dir(fd).names:
            p = join(path, name)
            self.out.append(Change(p, "A"))
            if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                with _opened(fd, name) as child:
                    self.added(child, p)


def _meta_changed(new: os.stat_result, old: os.stat_result) -> bool:
    """What docker counts as a change of a directory itself: type, mode, owner."""
    return (new.st_mode, new.st_uid, new.st_gid) != (old.st_mode, old.st_uid, old.st_gid)


class _opened:
    """A directory of the upper opened below its parent's fd, never through a symlink."""

    def __init__(self, dirfd: int, name: bytes) -> None:
        self.fd = os.open(name, _DIR, dir_fd=dirfd)

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
