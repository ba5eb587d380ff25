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

Without lower layers nothing below is known: every entry is ``A`` and every
whiteout ``D``, wherever it is (as ``commit`` then keeps every marker).

A directory the kernel moved with ``redirect_dir=on`` (it carries a redirect
xattr) shows lower contents the upper does not hold; below it the merged tree
is asked of the overlay too (a read-only ``Union`` of the upper over the lowers,
which follows redirects as a mount does) and compared with the lowers' tree,
entry by entry. Without lower layers such an upper is refused: what the
directory holds is not known.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from unionfs.image.digest import ImageError
from unionfs.image.unpack import os_reason
from unionfs.overlay import markers
from unionfs.overlay.nodes import Entry, Node
from unionfs.overlay.syscalls import fd_path
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


class MergedView:
    """The upper over the lowers, as a mount shows it (redirects followed, metadata-only
    copies joined to their data), read through the overlay's own lookup; opened on
    first use, and never writing anything (no origin fixed, no marker dropped)."""

    def __init__(self, upper: Path, lowers: list[Path]) -> None:
        self.upper = upper
        self.lowers = lowers
        self._union: Union | None = None
        self._dirs: dict[bytes, Node] = {}  # directories found by path, not walked again

    @property
    def union(self) -> Union:
        if self._union is None:
            self._union = Union(
                UnionConfig(
                    lowers=self.lowers,
                    upper=self.upper,
                    readonly=True,
                    redirect="follow",
                    metacopy=True,
                ),
                inspect_only=True,
            )
        return self._union

    def close(self) -> None:
        if self._union is not None:
            self._union.close()

    def node(self, path: bytes) -> Node:
        """The merged directory at *path* (relative to the root)."""
        node = self._dirs.get(path)
        if node is not None:
            return node
        union = self.union
        if not path:
            return union.table.root
        parent, _, name = path.rpartition(b"/")
        found = union.lookup(self.node(parent), name)
        if found is None or not found[0].is_dir:
            raise FileNotFoundError(errno.ENOENT, "not a directory in the merged tree", path)
        self._dirs[path] = found[0]
        return found[0]


def open_upper(upper: Path) -> int:
    try:
        return os.open(upper, _DIR)
    except OSError as e:
        raise ImageError(f"{upper}: {os_reason(e)}") from None


def changes(upper: Path, lowers: list[Path]) -> list[Change]:
    """Every change the upper directory makes to the lowers (top first), sorted."""
    fd = open_upper(upper)
    out: list[Change] = []
    try:
        with LowerView(lowers) as view:
            walk = _Walk(view, out, upper, lowers)
            try:
                walk.dir(fd, b"", view.root, False)
            finally:
                walk.close()
    finally:
        os.close(fd)
    out.sort()
    return out


def _redirect(dirfd: int, name: bytes) -> bytes | None:
    """The redirect xattr (either namespace) of the directory *name* in *dirfd*."""
    return markers.overlay_xattr(fd_path(dirfd, name), markers.TRUSTED, b"redirect")


class _Walk:
    def __init__(self, view: LowerView, out: list[Change], upper: Path, lowers: list[Path]) -> None:
        self.view = view
        self.out = out
        self.merged = MergedView(upper, lowers)  # opened when a redirect needs it

    def close(self) -> None:
        self.merged.close()

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
        if stat.S_ISDIR(st.st_mode) and _redirect(fd, name) is not None:
            self.redirected(path, name, old)
            return
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
        """Everything in a directory no lower has is added; whiteouts there hide nothing
        (but with no lowers given nothing is known, and they are listed)."""
        d = markers.read_layer_dir(fd)
        if self.view.root is None:
            for name in d.deleted:
                self.out.append(Change(join(path, name), "D"))
        for name in d.names:
            p = join(path, name)
            if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                if _redirect(fd, name) is not None:
                    self.redirected(path, name, None)
                    continue
                self.out.append(Change(p, "A"))
                with _opened(fd, name) as child:
                    self.added(child, p)
            else:
                self.out.append(Change(p, "A"))

    # -- below a redirect: the merged tree, entry by entry ------------------------

    def redirected(self, path: bytes, name: bytes, old: Node | None) -> None:
        """The directory *name* in *path* has a redirect: its lower contents are
        elsewhere in the lowers, so the merged tree is compared from here on."""
        p = join(path, name)
        if self.view.root is None:
            raise ImageError(
                f"{os.fsdecode(p)}: has a redirect (an upper written with the kernel's "
                "redirect_dir on): what it holds is in the lower layers; give them with "
                "--lower or --image"
            )
        try:
            parent = self.merged.node(path)
            self._entry(parent, path, name, old)
        except OSError as e:
            raise ImageError(f"{os.fsdecode(p)}: following its redirect: {os_reason(e)}") from None

    def _entry(self, new_parent: Node, path: bytes, name: bytes, old: Node | None) -> None:
        """*name* in the merged directory *new_parent* against what the lowers alone
        show in *old* (None: nothing)."""
        merged = self.merged.union
        new = merged.resolve(new_parent, name)
        if new is None:
            return
        p = join(path, name)
        was = self.view.entry(old, name)
        is_dir = stat.S_ISDIR(new.st.st_mode)
        if was is None:
            self.out.append(Change(p, "A"))
            if is_dir:
                self._added(merged.node_for(new_parent, new), p)
            return
        if not is_dir:
            same = not new.layer.writable and _same_file(new.st, was.st)
            if not same or _meta_changed(new.st, was.st):
                self.out.append(Change(p, "C"))
            return
        assert old is not None
        old_dir = self.view.directory(old, was)
        node = merged.node_for(new_parent, new)
        if old_dir is None:  # a directory where the lowers have something else
            self.out.append(Change(p, "C"))
            self._added(node, p)
            return
        if not new.layer.writable and _places(new, 1) == _places(was, 0):
            return  # the very same lower directories: nothing changed inside
        if self._dir(node, p, old_dir) or _meta_changed(new.st, was.st):
            self.out.append(Change(p, "C"))

    def _dir(self, node: Node, path: bytes, old: Node) -> bool:
        before = len(self.out)
        names = self.merged.union.names(node)
        for name in names:
            self._entry(node, path, name, old)
        for name in sorted(set(self.view.names(old)).difference(names)):
            self.out.append(Change(join(path, name), "D"))
        return len(self.out) > before

    def _added(self, node: Node, path: bytes) -> None:
        """Everything in the merged directory *node*, which the lowers do not have."""
        merged = self.merged.union
        for name in merged.names(node):
            entry = merged.resolve(node, name)
            if entry is None:
                continue
            p = join(path, name)
            self.out.append(Change(p, "A"))
            if stat.S_ISDIR(entry.st.st_mode):
                self._added(merged.node_for(node, entry), p)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _places(entry: Entry, skip: int) -> tuple[tuple[int, Path, bytes], ...]:
    """Where a lower-only merged directory comes from, by layer directory and path
    (*skip*: how many layers above the lowers its stack has, to compare two stacks)."""
    return tuple((p.layer.index - skip, p.layer.path, p.path) for p in (entry.place, *entry.lowers))


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
