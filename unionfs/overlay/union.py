"""The merged view: how a name is resolved through the layer stack, and what it looks like.

The words used for resolution, everywhere:

- ``resolve(parent, name)``: which layers provide a name (an ``Entry``), by the
  overlay's rules, without touching the inode table;
- ``node_for(parent, entry)``: the inode that an entry is, created or found;
- ``lookup(parent, name)``: both, the node and the stat that resolving it gave.

and for listings: ``names(dir)`` (the merged names) and ``listing(dir)`` (each
name resolved). Errors are ``OSError`` with the errno the caller should see.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unionfs.overlay import markers
from unionfs.overlay.events import Sink
from unionfs.overlay.idmap import IDENTITY, IdMapper
from unionfs.overlay.layers import Layer, discard, stat_with
from unionfs.overlay.markers import TRUSTED, XattrNamespace, is_private_xattr, is_whiteout
from unionfs.overlay.nodes import ROOT_INO, Entry, InodeNumbers, Node, NodeTable, OpenFile
from unionfs.overlay.syscalls import fd_path

log = logging.getLogger(__name__)

CAPS_XATTR = b"security.capability"
WORK_SUBDIR = b"work"  # the kernel overlay uses the same staging directory name
_NO_STAT = os.stat_result((0,) * 10)  # placeholder in name-only entries

# What ``resolve`` found in each layer it looked at, told to its *why* recorder
# (``unionfs explain``): one call per layer, top first, with the rule applied.
ABSENT = "absent"  # nothing here: the search goes on below
PROVIDES = "provides"  # the topmost entry, not a directory: nothing below shows
DIRECTORY = "directory"  # a directory: the topmost, or one merging into it
OPAQUE = "opaque"  # a directory marked opaque: nothing below merges into it
WHITEOUT = "whiteout"  # a kernel whiteout: hides the name in every layer below
OCI_WHITEOUT = "oci-whiteout"  # a .wh.NAME file beside it: hides the name below
ENDS_MERGE = "ends-merge"  # not a directory, under a directory above: the merge stops
RESERVED = "reserved"  # an OCI marker's name, never shown from a lower layer
Why = Callable[[Layer, os.stat_result | None, str], None]


@dataclass
class UnionConfig:
    """What a mount is made of, already validated (see ``unionfs.fuse.mount``)."""

    lowers: list[Path]  # top first
    upper: Path | None = None
    work: Path | None = None
    readonly: bool = False  # -o ro: show the upper too, but refuse every change (EROFS)
    fsync: bool = True  # False: fsync requests are acknowledged without syncing (volatile)
    static_nlink: bool = False  # report nlink 1 for every directory
    writeback: bool = False  # the kernel's write-back cache holds writes until it flushes
    ids: IdMapper = IDENTITY  # owner mapping between the layers and the mount
    xattrs: XattrNamespace = TRUSTED  # where markers are written: user.overlay.* with userxattr


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class Union:
    """The layer stack and its inode table."""

    def __init__(self, config: UnionConfig) -> None:
        self.config = config
        self.readonly = config.readonly or config.upper is None
        layers: list[Layer] = []
        try:
            if config.upper is not None:
                layers.append(Layer(0, config.upper, writable=True, xattrs=config.xattrs))
            for path in config.lowers:
                layers.append(Layer(len(layers), path, writable=False, xattrs=config.xattrs))
        except BaseException:
            for layer in layers:
                layer.close()
            raise
        fsids: dict[int, int] = {}
        for layer in layers:
            layer.fsid = fsids.setdefault(layer.dev, len(fsids))
        self.layers = layers
        self.upper: Layer | None = layers[0] if layers[0].writable else None
        self.work_fd = -1
        if config.work is not None and not self.readonly:
            assert self.upper is not None
            self.work_fd = _prepare_workdir(config.work, self.upper.root_fd)
        self.inos = InodeNumbers()
        root = Node(ROOT_INO, None, b"", stat.S_IFDIR, layers[0])
        root.lowers = tuple(self._cut_at_opaque(b"", layers)[1:])
        self.table = NodeTable(root)
        self._tmp_names = itertools.count()
        # Open files per inode: fstat of an unlinked open file needs one of them, and
        # a copy-up moves them all to the upper copy.
        self.open_files: dict[int, list[OpenFile]] = {}
        # Set by the FUSE adapter: drops the kernel's cached attributes of an inode.
        self.on_attr_change: Callable[[int], None] | None = None
        # Set by the FUSE adapter: told when a node is known to have no file capability
        # (True) and when that may no longer hold (False), so the answer can be given
        # without the daemon (csrc/caps.c).
        self.on_caps_known: Callable[[int, bool], None] | None = None
        self.table.on_drop = self._forget_caps
        # Set by the FUSE adapter while someone traces the mount (see ``events``).
        self.events: Sink | None = None

    def close(self) -> None:
        for layer in self.layers:
            layer.close()
        if self.work_fd >= 0:
            os.close(self.work_fd)

    # -- resolution ----------------------------------------------------------

    def node(self, ino: int) -> Node:
        return self.table.get(ino)

    def tmp_name(self, suffix: bytes = b"") -> bytes:
        return b"#%x.%d%s" % (next(self._tmp_names), os.getpid(), suffix)

    def _cut_at_opaque(self, path: bytes, layers: list[Layer] | tuple[Layer, ...]) -> list[Layer]:
        """The layers that merge into directory *path*: stop below the first opaque one."""
        out: list[Layer] = []
        for i, layer in enumerate(layers):
            out.append(layer)
            if i < len(layers) - 1 and layer.is_opaque(path):
                break
        return out

    def resolve(self, parent: Node, name: bytes, why: Why | None = None) -> Entry | None:
        """Find *name* in *parent*: the topmost layer that has it, its stat, and the
        lower layers that merge into it when it is a directory.

        Whiteouts end the search; a non-directory hides everything below it;
        directories merge until one of them is opaque. *why*, when given, is told
        the rule applied in each layer looked at (``unionfs explain``).
        """
        path = parent.path
        stack = parent.stack
        last = len(stack) - 1
        top: Layer | None = None
        top_st: os.stat_result | None = None
        dirs: list[Layer] = []
        oci_marker = markers.is_oci_name(name)  # invisible in lower layers
        for i, layer in enumerate(stack):
            if oci_marker and not layer.writable:
                if why is not None:
                    why(layer, None, RESERVED)
                break
            st = layer.lstat(path, name)
            if st is None:
                if i < last and layer.has_oci_whiteout(path, name):
                    if why is not None:
                        why(layer, None, OCI_WHITEOUT)
                    break  # deleted below this layer, the OCI way: ends a merge too
                if why is not None:
                    why(layer, None, ABSENT)
                continue
            if is_whiteout(st):
                if why is not None:
                    why(layer, st, WHITEOUT)
                break
            if not stat.S_ISDIR(st.st_mode):
                if top is None:
                    top, top_st = layer, st
                if why is not None:
                    why(layer, st, PROVIDES if top is layer else ENDS_MERGE)
                break
            if top is None:
                top, top_st = layer, st
            dirs.append(layer)
            if i < last and layer.is_opaque(join(path, name)):
                if why is not None:
                    why(layer, st, OPAQUE)
                break
            if why is not None:
                why(layer, st, DIRECTORY)
        if top is None or top_st is None:
            return None
        return Entry(name, top, top_st, tuple(dirs[1:]))

    def lookup(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result | None] | None:
        """The node for *name* in *parent* and the stat resolving it gave (None for
        ``.`` and ``..``), so a lookup or readdir does not stat the same entry twice;
        None when the merged view has no such name."""
        if name == b".":
            return parent, None
        if name == b"..":
            return parent.parent or parent, None
        entry = self.resolve(parent, name)
        if entry is None:
            return None
        return self.node_for(parent, entry), entry.st

    def node_for(self, parent: Node, entry: Entry) -> Node:
        """The inode that *entry* (a name in *parent*) is: found in the table, or new."""
        name, top, st, lowers = entry
        ino = self.inos.of(top, st, parent, name)
        node = self.table.find(ino)
        if node is None:
            node = Node(ino, parent, name, stat.S_IFMT(st.st_mode), top)
            node.lowers = lowers
            self.table.add(node)
            return node
        node.layer = top
        node.lowers = lowers
        node.kind = stat.S_IFMT(st.st_mode)
        if node.parent is not parent or node.name != name:
            if node.unlinked:
                # The real inode number was freed and reused by a new file: a new
                # generation tells the kernel its old inode of that number is dead.
                node.generation += 1
                node.gone_st = None
                node.listing = None
                self.caps_unknown(node)
                self.table.set_parent(node, parent, name)
            elif node.is_dir or not top.writable:
                self.table.set_parent(node, parent, name)
            else:
                self.add_alias(node, parent, name)  # another hard link in the upper
        return node

    def tell(self, kind: str, path: bytes, **fields: Any) -> None:
        """Report a decision to whoever traces the mount; nothing when nobody does."""
        if self.events is not None:
            self.events.emit(kind, path, **fields)

    def attr_changed(self, node: Node) -> None:
        """Tell the kernel that *node*'s attributes changed behind its back."""
        if self.on_attr_change is not None:
            self.on_attr_change(node.ino)

    # -- names of one node ---------------------------------------------------

    def add_alias(self, node: Node, parent: Node, name: bytes) -> None:
        if node.aliases is None:
            node.aliases = set()
        if (parent, name) not in node.aliases:
            node.aliases.add((parent, name))
            parent.children += 1

    def stat_before_removal(
        self, node: Node, st: os.stat_result | None = None
    ) -> os.stat_result | None:
        """What the node will look like once its name is gone (for ``drop_name``),
        from its current stat *st* when the caller has it."""
        if st is None:
            try:
                st = self.stat(node)
            except OSError:
                return None
        if not node.layer.writable or st.st_nlink > 1:
            return st  # a lower file stays as it is; another hard link keeps the inode
        return stat_with(st, nlink=0)  # the upper inode is unlinked

    def drop_name(
        self, node: Node, parent: Node, name: bytes, gone_st: os.stat_result | None = None
    ) -> None:
        """*parent*/*name* no longer names *node*; promote another hard link if it has one.

        *gone_st* is kept for a node left without any name (see ``Node.gone_st``).
        """
        if node.aliases and (parent, name) in node.aliases:
            node.aliases.discard((parent, name))
            parent.children -= 1
            self.table.maybe_drop(parent)
            return
        if node.parent is not parent or node.name != name:
            return
        while node.aliases:
            alias_parent, alias_name = node.aliases.pop()
            alias_parent.children -= 1
            if not alias_parent.unlinked:
                self.table.set_parent(node, alias_parent, alias_name)
                return
            self.table.maybe_drop(alias_parent)
        node.gone_st = gone_st
        self.table.set_parent(node, None, name)
        self.table.maybe_drop(node)

    # -- attributes ----------------------------------------------------------

    def stat(self, node: Node) -> os.stat_result:
        """The real inode's stat, from the topmost layer that holds the node."""
        if node.ino == ROOT_INO:
            return os.stat(node.layer.root_fd)
        if node.unlinked:
            files = self.open_files.get(node.ino)
            if files:
                return os.fstat(files[0].fd)
            if node.gone_st is not None:
                return node.gone_st
            raise FileNotFoundError(errno.ENOENT, "removed", node.name)
        parent = node.parent
        assert parent is not None
        st = node.layer.lstat(parent.path, node.name)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "vanished from its layer", node.name)
        return st

    def shown_nlink(self, node: Node, st: os.stat_result) -> int:
        """A merged directory shows nlink 1, as the kernel overlay does (counting
        subdirectories across layers is not worth it; ``find`` accepts 1)."""
        if node.kind == stat.S_IFDIR and (node.lowers or self.config.static_nlink):
            return 1
        return st.st_nlink

    def real_path(self, node: Node) -> tuple[bytes, bool]:
        """A ``/proc/self/fd`` path to the node's real file, for calls with no ``*at``
        form, and whether to follow it: only the root's path is the fd's magic link
        itself (the directory); any other names an entry that must not be followed."""
        if node.ino == ROOT_INO:
            return fd_path(node.layer.root_fd), True
        parent = node.parent
        if parent is None:
            raise FileNotFoundError(errno.ENOENT, "removed", node.name)
        return fd_path(node.layer.dirfd(parent.path), node.name), False

    def open_real(self, node: Node, flags: int) -> int:
        """Open the node's real file in its topmost layer, never following a symlink."""
        parent = node.parent
        if parent is None:
            raise FileNotFoundError(errno.ENOENT, "removed", node.name)
        return node.layer.open_file(parent.path, node.name, flags)

    def follow_copy_up(self, node: Node) -> None:
        """Move every open file of *node* to its new upper copy.

        Readers then see what writers write, and an fchmod or fchown on a file
        unlinked later reaches the upper copy, never the shared lower layer.
        """
        for f in self.open_files.get(node.ino, ()):
            if f.layer is node.layer:
                continue
            fd = self.open_real(node, f.flags)
            os.close(f.fd)
            f.fd, f.layer = fd, node.layer

    def readlink(self, node: Node) -> bytes:
        parent = node.parent
        if parent is None:
            raise FileNotFoundError(errno.ENOENT, "removed", node.name)
        return os.readlink(node.name, dir_fd=node.layer.dirfd(parent.path))

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(fd_path(self.layers[0].root_fd))

    # -- listing -------------------------------------------------------------

    def names(self, node: Node) -> list[bytes]:
        """The merged directory's names: each once, whiteouts and what they hide left out."""
        path = node.path
        seen: set[bytes] = set()
        hidden: set[bytes] = set()
        names: list[bytes] = []
        for layer in node.stack:
            try:
                fd = layer.dirfd(path)
            except FileNotFoundError:
                continue
            lower = not layer.writable
            deleted_below: list[bytes] = []  # a .wh.X hides X in the layers below only
            with os.scandir(fd_path(fd)) as it:
                for dent in it:
                    name = dent.name
                    if name in seen or name in hidden:
                        continue
                    if lower and markers.is_oci_name(name):
                        deleted = markers.oci_deleted(name)
                        if deleted is not None:  # the opaque marker already cut the stack
                            deleted_below.append(deleted)
                        continue
                    if (
                        not dent.is_file(follow_symlinks=False)
                        and not dent.is_dir(follow_symlinks=False)
                        and not dent.is_symlink()
                        and is_whiteout(dent.stat(follow_symlinks=False))
                    ):
                        hidden.add(name)
                        continue
                    seen.add(name)
                    names.append(name)
            hidden.update(deleted_below)
        return names

    def listing(self, node: Node) -> list[Entry]:
        """The merged directory's entries, resolved, for readdir.

        A directory with no upper part cannot change while mounted (any change
        inside it copies it up first), so its entries are resolved once and kept.
        Entries of a directory with an upper part carry names only: the caller
        resolves each when it is needed, so no stale stat is handed out.
        """
        if node.layer.writable:
            return [Entry(name, node.layer, _NO_STAT, ()) for name in self.names(node)]
        if node.listing is None:
            out: list[Entry] = []
            for name in self.names(node):
                entry = self.resolve(node, name)
                if entry is not None:
                    out.append(entry)
            node.listing = out
        return node.listing

    def is_empty(self, node: Node) -> bool:
        return not self.names(node)

    def lower_has_name(self, parent: Node, name: bytes) -> bool:
        """Whether removing *name* from the upper would let a lower entry show through."""
        path = parent.path
        for layer in parent.stack:
            if layer.writable:
                continue
            st = layer.lstat(path, name)
            if st is not None:
                return not is_whiteout(st)
            if layer.has_oci_whiteout(path, name):
                return False
        return False

    # -- extended attributes (reading) ---------------------------------------

    def getxattr(self, node: Node, name: bytes) -> bytes:
        caps = name == CAPS_XATTR
        if caps and node.no_caps:
            raise OSError(errno.ENODATA, "no such attribute")
        if is_private_xattr(name):
            # Hidden: as far as the mount shows, the overlay's own xattrs are not there
            # (the kernel answers ENODATA too, unless an escaped copy exists).
            raise OSError(errno.ENODATA, "no such attribute", name)
        path, follow = self.real_path(node)
        try:
            return os.getxattr(path, name, follow_symlinks=follow)
        except OSError as e:
            if caps and e.errno == errno.ENODATA:
                node.no_caps = True
                if self.on_caps_known is not None:
                    self.on_caps_known(node.ino, True)
            raise

    def caps_unknown(self, node: Node) -> None:
        """*node* may have gained a file capability (or become another file)."""
        node.no_caps = False
        self._forget_caps(node.ino)

    def _forget_caps(self, ino: int) -> None:
        if self.on_caps_known is not None:
            self.on_caps_known(ino, False)

    def listxattr(self, node: Node) -> list[bytes]:
        path, follow = self.real_path(node)
        names = os.listxattr(path, follow_symlinks=follow)
        return [n for b in names if not is_private_xattr(n := os.fsencode(b))]


def _prepare_workdir(work: Path, upper_fd: int) -> int:
    """Open ``WORK/work`` (created if needed) and clear what an earlier crash left in it,
    finishing the changes that left a note there first."""
    wfd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(WORK_SUBDIR, 0o700, dir_fd=wfd)
        fd = os.open(
            WORK_SUBDIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=wfd
        )
    finally:
        os.close(wfd)
    leftovers = os.listdir(fd_path(fd))
    for name in leftovers:
        if name.endswith(markers.DROP_NOTE):
            try:
                markers.drop_noted_whiteout(fd, name, upper_fd)
            except OSError as e:
                log.warning("could not drop the whiteout noted by %r: %s", name, e)
        log.info("removing leftover %r from the workdir", name)
        discard(fd, name)
    markers.new_shared_whiteout(fd)
    return fd
