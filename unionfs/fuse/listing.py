"""Directory reads as FUSE sees them: handles, offsets and cookies.

The core gives a directory's merged listing (``Union.listing``). FUSE reads a
directory in pieces, each continuing at an offset the previous reply gave, so
offsets must stay valid while names come and go. Two ways:

- with an open handle (``DirHandle``), the listing is taken once at offset 0
  and the offset is an index into it;
- without one (the kernel caches listings, see ``_fusehook.c``), the offset is
  all that links one READDIR to the next: every name keeps a *cookie* for as
  long as the directory's node lives, and an offset carries the cookie to
  continue after and the directory's name generation when the read began.
"""

from __future__ import annotations

import weakref

from unionfs.overlay.nodes import Entry, Node
from unionfs.overlay.union import Union

COOKIE_BITS = 32
COOKIE_MASK = (1 << COOKIE_BITS) - 1
GEN_MASK = (1 << 31) - 1  # keeps offsets positive
COOKIE_LIMIT = COOKIE_MASK - 1  # a cookie + 1 must fit

Cookied = tuple[int, Entry]  # (cookie, entry)


def cookie_of(pair: Cookied) -> int:
    return pair[0]


class DirHandle:
    """An open directory: the merged listing, taken once so offsets stay valid."""

    __slots__ = ("node", "entries")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.entries: list[Cookied] | None = None


class _Cookies:
    """One directory's cookies and its listing in cookie order."""

    __slots__ = ("generation", "by_name", "snapshot", "names_gen")

    def __init__(self, generation: int) -> None:
        self.generation = generation  # of the node: a reused inode number starts afresh
        self.by_name: dict[bytes, int] = {}
        self.snapshot: list[Cookied] | None = None  # until a name changes
        self.names_gen = 0  # bumped by every change of a name in the directory


class Cookies:
    """Cookies of every directory the kernel reads without a handle, kept as long
    as the directory's node is."""

    def __init__(self, union: Union) -> None:
        self.union = union
        self._dirs: weakref.WeakKeyDictionary[Node, _Cookies] = weakref.WeakKeyDictionary()

    def _of(self, node: Node) -> _Cookies:
        c = self._dirs.get(node)
        if c is None or c.generation != node.generation:
            c = self._dirs[node] = _Cookies(node.generation)
        return c

    def generation(self, node: Node) -> int:
        """The directory's name generation, as carried in offsets."""
        return self._of(node).names_gen & GEN_MASK

    def listing(self, node: Node) -> list[Cookied]:
        """The listing as (cookie, entry) pairs in cookie order. A name keeps its
        cookie, so a name created or removed between two reads never makes the
        reader skip or repeat another one; new names get new, higher cookies.
        Cookies start at 2: offsets 0 and 1 are ``.`` and ``..``."""
        c = self._of(node)
        if c.snapshot is not None:
            return c.snapshot
        entries = self.union.listing(node)
        by_name = c.by_name
        nxt = max(by_name.values(), default=1) + 1
        if nxt + len(entries) > COOKIE_LIMIT:
            # Out of cookies (after billions of names): number afresh, and make every
            # read in progress an old generation's, whose end drops the kernel's cache.
            by_name.clear()
            nxt = 2
            c.names_gen += 1
        snapshot: list[Cookied] = []
        for entry in entries:
            cookie = by_name.get(entry.name)
            if cookie is None:
                cookie = by_name[entry.name] = nxt
                nxt += 1
            snapshot.append((cookie, entry))
        snapshot.sort(key=cookie_of)
        if len(by_name) > len(snapshot):  # forget names that are gone
            c.by_name = {entry.name: cookie for cookie, entry in snapshot}
        c.snapshot = snapshot
        return snapshot

    def names_changed(self, node: Node) -> None:
        """A name in directory *node* was (or may have been) added or removed."""
        c = self._dirs.get(node)
        if c is not None:
            c.snapshot = None
            c.names_gen += 1
