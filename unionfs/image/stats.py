"""``image layers``: what each layer of an image adds, changes and deletes, and how
many of its bytes the layers above it hide (the "wasted space" dive shows).

Both questions are asked of the overlay: a layer's changes are ``diff`` of its
directory over the layers below it, and a file is hidden when resolving its
path through the whole stack (``Union``) ends in another layer, or nowhere.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from unionfs.image.diff import changes
from unionfs.overlay import markers
from unionfs.overlay.layers import Layer
from unionfs.overlay.nodes import Node
from unionfs.overlay.union import Union, UnionConfig

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class LayerStats:
    added: int
    changed: int
    deleted: int
    hidden_bytes: int  # bytes of this layer's files that higher layers overwrite or delete


def layer_stats(dirs: list[Path]) -> list[LayerStats]:
    """One ``LayerStats`` per layer directory in *dirs* (bottom first)."""
    out = []
    union = Union(UnionConfig(lowers=list(reversed(dirs))))
    try:
        for i, d in enumerate(dirs):
            below = list(reversed(dirs[:i]))
            counts = {"A": 0, "C": 0, "D": 0}
            for change in changes(d, below):
                counts[change.kind] += 1
            layer = union.layers[len(dirs) - 1 - i]
            hidden = _Hidden(union, layer)
            fd = os.open(d, _DIR)
            try:
                hidden.dir(fd, union.table.root)
            finally:
                os.close(fd)
            out.append(LayerStats(counts["A"], counts["C"], counts["D"], hidden.bytes))
    finally:
        union.close()
    return out


class _Hidden:
    """Sums the sizes of one layer's regular files that the whole stack does not show."""

    def __init__(self, union: Union, layer: Layer) -> None:
        self.union = union
        self.layer = layer
        self.hidden: dict[int, int] = {}  # inode -> size, for names the stack does not show
        self.shown: set[int] = set()  # inodes with a name it does show

    @property
    def bytes(self) -> int:
        """Hard links count once, and not at all while one of their names shows."""
        return sum(size for ino, size in self.hidden.items() if ino not in self.shown)

    def dir(self, fd: int, node: Node | None) -> None:
        """*node*: the merged directory at this path when this layer is part of it."""
        for name in markers.read_layer_dir(fd).names:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            entry = self.union.resolve(node, name) if node is not None else None
            if stat.S_ISDIR(st.st_mode):
                child = None
                if entry is not None and self.layer in (entry.layer, *entry.lowers):
                    child = self.union.node_for(node, entry)  # type: ignore[arg-type]
                sub = os.open(name, _DIR, dir_fd=fd)
                try:
                    self.dir(sub, child)
                finally:
                    os.close(sub)
            elif stat.S_ISREG(st.st_mode):
                if entry is None or entry.layer is not self.layer:
                    self.hidden[st.st_ino] = st.st_size
                else:
                    self.shown.add(st.st_ino)
