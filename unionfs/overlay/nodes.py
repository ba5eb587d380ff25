"""The inode table: what the kernel knows as an inode number, and what it stands for.

A node is one overlay inode. Its number (``ino``, the FUSE node id) names it for
the life of the mount; ``st_ino`` is what ``stat`` shows, by the kernel overlay's
rules (``Union.resolve`` computes it). The two are the same number wherever that
is possible, so a FUSE layer that cannot report them apart (pyfuse3 alone) still
shows the right ``st_ino`` for most files; they differ where the kernel shows one
number for inodes that must stay apart (hard links inside a lower layer, which
copy-up splits) or a number another node already has.

A node stays in the table while something outside the core holds it (``hold``:
the FUSE adapter for each reference the kernel keeps, an open file), or a
child node points at it. Which requests give the kernel a reference is the
adapter's business; the table only counts.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import weakref
from collections.abc import Callable, Iterator

from unionfs.records import Record

TYPE_CHECKING = False

if TYPE_CHECKING:
    import trio

    from unionfs.overlay.layers import Layer

ROOT_INO = 1


class Place(Record):
    """Where something is in one layer: the layer and the path below its root."""

    layer: Layer
    path: bytes  # b"" for the layer's root

    def split(self) -> tuple[bytes, bytes]:
        """The parent directory's path and the name."""
        parent, _, name = self.path.rpartition(b"/")
        return parent, name


class Entry(Record):
    """One name resolved through the stack."""

    name: bytes
    layer: Layer  # the topmost layer that has it
    st: os.stat_result  # its stat there
    # A directory: the directories below that merge into it (each at its own path:
    # a redirect may have sent the lookup elsewhere). A metadata-only copy: the
    # file that holds its data.
    lowers: tuple[Place, ...] = ()
    path: bytes = b""  # where it is in ``layer`` (in the upper: its path in the mount)
    ino: int = 0  # the st_ino the kernel overlay shows for it (0: the top's own)
    redirect: bytes | None = None  # the upper's redirect xattr, kept for later renames
    metacopy: bool = False  # ``layer`` holds only its metadata; the data is lowers[-1]

    @property
    def place(self) -> Place:
        return Place(self.layer, self.path)


_PER_PATH_BASE = 1 << 62  # numbers for lower-layer hard links (see ``InodeNumbers``)


class Node:
    """One overlay inode.

    ``layer`` is the topmost layer holding it, at ``src`` when that is a lower
    layer (an upper entry is always at the node's own path). For a directory
    ``lowers`` are the directories below that merge into it (already cut at an
    opaque directory); for a metadata-only copy, the file that holds its data.
    ``parent``/``name`` is the path it was found at; a file with hard links in
    the upper layer may have more names in ``aliases``.
    """

    __slots__ = (
        "ino",
        "parent",
        "name",
        "kind",
        "layer",
        "src",
        "lowers",
        "redirect",
        "metacopy",
        "st_ino",
        "refs",
        "children",
        "aliases",
        "lock",
        "listing",
        "no_caps",
        "generation",
        "gone_st",
        "gone_from",
        "__weakref__",
    )

    def __init__(self, ino: int, parent: Node | None, name: bytes, kind: int, layer: Layer) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.kind = kind  # stat.S_IFMT of the entry
        self.layer = layer
        self.src = b""  # the path in ``layer`` when that is a lower layer
        self.lowers: tuple[Place, ...] = ()
        self.redirect: bytes | None = None  # the upper's redirect xattr
        self.metacopy = False
        self.st_ino = ino  # what stat shows (see the module's docstring)
        self.refs = 0  # holders outside the table: kernel references, open files
        self.children = 0  # live child nodes whose ``parent`` is this node
        self.aliases: set[tuple[Node, bytes]] | None = None
        self.lock: trio.Lock | None = None
        # A lower-only directory's resolved entries, kept because lower layers never
        # change; dropped (ignored) once the directory has an upper part.
        self.listing: list[Entry] | None = None
        # The kernel asks for security.capability before every write; once known
        # to be absent it stays so until a setxattr through this mount.
        self.no_caps = False
        self.generation = 0  # bumped when the inode number is reused for another file
        # Its stat when its last name went: fstat of an O_PATH fd still answers.
        self.gone_st: os.stat_result | None = None
        # The directory its last name was in (not kept alive by this): what the kernel's
        # dentry of it still has for a parent (see copyup.copy_up).
        self.gone_from: weakref.ref[Node] | None = None

    def __repr__(self) -> str:
        where = self.path if not self.unlinked else b"(removed) " + self.name
        return f"<Node {self.ino} {where!r} in {self.layer.index}>"

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def unlinked(self) -> bool:
        return self.parent is None and self.ino != ROOT_INO

    @property
    def path(self) -> bytes:
        """The path relative to every layer's root (``b""`` for the root)."""
        parts: list[bytes] = []
        node: Node | None = self
        while node is not None and node.ino != ROOT_INO:
            if node.parent is None:
                raise FileNotFoundError(errno.ENOENT, "node was removed", self.name)
            parts.append(node.name)
            node = node.parent
        parts.reverse()
        return b"/".join(parts)

    @property
    def place(self) -> Place:
        """Where the node's topmost part is."""
        return Place(self.layer, self.path if self.layer.writable else self.src)

    @property
    def stack(self) -> tuple[Place, ...]:
        """Every directory that contributes to this directory, top first."""
        return (self.place, *self.lowers)

    @property
    def has_lower(self) -> bool:
        """A directory with lower parts, a lower entry, or a metadata-only copy: what
        the kernel calls "merge or lower" (a rename needs a redirect to keep it)."""
        return bool(self.lowers) or not self.layer.writable

    def is_under(self, other: Node) -> bool:
        node: Node | None = self
        while node is not None:
            if node is other:
                return True
            node = node.parent
        return False


class OpenFile:
    """One open of a file: its own real fd, on the layer the file was on when opened."""

    __slots__ = ("fd", "node", "layer", "flags", "meta_fd", "fh")

    def __init__(self, fd: int, node: Node, layer: Layer, flags: int) -> None:
        self.fd = fd
        self.node = node
        self.layer = layer
        self.flags = flags
        self.meta_fd = -1  # a metadata-only copy's upper inode (O_PATH), see Files.add
        self.fh = 0  # its file handle (Files.add)


class InodeNumbers:
    """Node numbers, stable for the life of the mount.

    With every layer on one filesystem the real inode number is unique across
    layers and is used as is, which is what the kernel overlay shows too. Other
    filesystems get their index in the high bits. An upper entry whose kernel
    st_ino is another one (its copy-up origin, a merged directory's lower part)
    takes that number when no other node has it, and keeps it (``origins``): a
    file copied up keeps the number of its lower original. Two hard links inside
    a lower layer share a real inode but are separate overlay files that copy-up
    will split, so each name gets its own number (``per_path``).
    """

    def __init__(self) -> None:
        self.origins: dict[int, int] = {}  # upper st_ino -> node number
        # upper st_ino -> the st_ino shown for it, for upper files that record an
        # origin (decoded once) or were copied up in this mount
        self.shown: dict[int, int] = {}
        self.per_path: dict[tuple[int, bytes], int] = {}
        self._per_path_next = itertools.count(_PER_PATH_BASE)

    def of(self, entry: Entry, taken: Callable[[int], bool]) -> int:
        """The node number of *entry*; *taken* says whether a number is another node's."""
        layer, st = entry.layer, entry.st
        if layer.writable:
            ino = self.origins.get(st.st_ino)
            if ino is not None:
                return ino
            if entry.ino and entry.ino != self.real(layer, st.st_ino) and not taken(entry.ino):
                self.origins[st.st_ino] = entry.ino
                return entry.ino
        elif st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            key = (layer.index, entry.path)
            ino = self.per_path.get(key)
            if ino is None:
                ino = self.per_path[key] = next(self._per_path_next)
            return ino
        return self.real(layer, st.st_ino)

    def spare(self) -> int:
        """A number no real inode has, for a node whose own is another node's."""
        return next(self._per_path_next)

    def apart(self, entry: Entry) -> int:
        """A number of its own for a lower entry whose real inode another node has."""
        key = (entry.layer.index, entry.path)
        ino = self.per_path.get(key)
        if ino is None:
            ino = self.per_path[key] = next(self._per_path_next)
        return ino

    @staticmethod
    def real(layer: Layer, st_ino: int) -> int:
        ino = st_ino if layer.fsid == 0 else (layer.fsid << 48) ^ st_ino
        return ino if ino != ROOT_INO else (1 << 63) | layer.fsid

    def copied_up(self, upper_st_ino: int, ino: int, shown: int) -> None:
        self.origins[upper_st_ino] = ino
        self.shown[upper_st_ino] = shown

    def upper_gone(self, upper_st_ino: int) -> None:
        """The upper inode was freed: its number may be reused by a new file."""
        self.origins.pop(upper_st_ino, None)
        self.shown.pop(upper_st_ino, None)


class NodeTable:
    """All nodes the kernel may refer to, by inode number."""

    def __init__(self, root: Node) -> None:
        self._nodes: dict[int, Node] = {ROOT_INO: root}
        root.refs = 1  # the root is never dropped
        self.root = root
        # Told of each node that leaves the table (its number may come to mean another
        # file): the union's caches, and the FUSE adapter's reported st_ino.
        self.on_drop: list[Callable[[Node], None]] = []

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes.values()))

    def get(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise OSError(errno.ESTALE, "unknown inode") from None

    def find(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def add(self, node: Node) -> None:
        self._nodes[node.ino] = node
        if node.parent is not None:
            node.parent.children += 1

    def set_parent(self, node: Node, parent: Node | None, name: bytes) -> None:
        """Move *node* to a new place (or to none, when its last name is removed)."""
        old = node.parent
        if old is parent:
            node.name = name
            return
        if parent is not None:
            parent.children += 1
        node.parent = parent
        node.name = name
        if old is not None:
            old.children -= 1
            self.maybe_drop(old)

    @staticmethod
    def hold(node: Node, count: int = 1) -> None:
        """Keep *node* in the table until as many ``release`` calls."""
        node.refs += count

    def release(self, node: Node, count: int = 1) -> None:
        node.refs -= count
        self.maybe_drop(node)

    def release_ino(self, ino: int, count: int) -> None:
        """``release`` by number; an unknown number is ignored."""
        node = self._nodes.get(ino)
        if node is not None:
            self.release(node, count)

    def maybe_drop(self, node: Node) -> None:
        """Drop nodes nobody refers to any more, walking up to parents freed in turn."""
        cur: Node | None = node
        while cur is not None and cur.refs <= 0 and cur.children <= 0 and cur.ino != ROOT_INO:
            if self._nodes.get(cur.ino) is cur:
                del self._nodes[cur.ino]
                for told in self.on_drop:
                    told(cur)
            if cur.aliases:  # other hard-link names hold their parents too
                aliases, cur.aliases = cur.aliases, None
                for alias_parent, _ in aliases:
                    alias_parent.children -= 1
                    self.maybe_drop(alias_parent)
            parent = cur.parent
            cur.parent = None
            if parent is None:
                return
            parent.children -= 1
            cur = parent
