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
import os
import stat
import weakref
from collections.abc import Callable
from pathlib import Path

from unionfs import lazylog
from unionfs.overlay import acl, markers
from unionfs.overlay.idmap import IDENTITY, IdMapper
from unionfs.overlay.layers import Layer, discard, stat_with
from unionfs.overlay.markers import TRUSTED, XattrNamespace, is_private_xattr, is_whiteout
from unionfs.overlay.nodes import ROOT_INO, Entry, InodeNumbers, Node, NodeTable, OpenFile, Place
from unionfs.overlay.syscalls import fd_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from unionfs.overlay.events import Sink

log = lazylog.get(__name__)

CAPS_XATTR = b"security.capability"
WORK_SUBDIR = b"work"  # the kernel overlay uses the same staging directory name
_NO_STAT = os.stat_result((0,) * 10)  # placeholder in name-only entries

# What ``resolve`` found in each layer it looked at, told to its *why* recorder
# (``unionfs explain``): one call per layer, top first, with the rule applied and
# the path in that layer it was asked for (a redirect above changes it).
ABSENT = "absent"  # nothing here: the search goes on below
PROVIDES = "provides"  # the topmost entry, not a directory: nothing below shows
DIRECTORY = "directory"  # a directory: the topmost, or one merging into it
OPAQUE = "opaque"  # a directory marked opaque: nothing below merges into it
WHITEOUT = "whiteout"  # a kernel whiteout: hides the name in every layer below
OCI_WHITEOUT = "oci-whiteout"  # a .wh.NAME file beside it: hides the name below
ENDS_MERGE = "ends-merge"  # not a directory, under a directory above: the merge stops
RESERVED = "reserved"  # an OCI marker's name, never shown from a lower layer
REDIRECT = "redirect"  # a directory whose redirect renames what the layers below are asked
METACOPY = "metacopy"  # a metadata-only copy: the data comes from a file below
DATA = "data"  # the file that holds the data of the metadata-only copy above
FAILS = "fails"  # what it has there fails the lookup (its markers): the error follows
Why = Callable[[Layer, os.stat_result | None, str, bytes], None]


def is_name_only(entry: Entry) -> bool:
    """Whether *entry* is a name from a listing, not resolved yet (``Union.listing``)."""
    return entry.st is _NO_STAT


# Flags an open again through /proc/self/fd cannot take: the magic link is followed, and
# the file is there already.
_NOT_REOPENED = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_DIRECTORY


class UnionConfig:
    """What a mount is made of, already validated (see ``unionfs.fuse.mount``)."""

    def __init__(
        self,
        lowers: list[Path],  # top first
        upper: Path | None = None,
        work: Path | None = None,
        readonly: bool = False,  # -o ro: show the upper too, but refuse every change (EROFS)
        fsync: bool = True,  # False: fsync requests are acknowledged without syncing (volatile)
        # A copy-up is synced before it is put in place: 0 never, 1 its data (the kernel's
        # fsync=auto), 2 also a copy of metadata only, of a file or directory (fsync=strict).
        sync_copy_up: int = 0,
        static_nlink: bool = False,  # report nlink 1 for every directory
        # A directory's default ACL gives a new entry its mode (noacl: the umask always,
        # and the ACL only where the upper filesystem applies it, as the kernel's noacl).
        acl: bool = True,
        writeback: bool = False,  # the kernel's write-back cache holds writes until it flushes
        ids: IdMapper = IDENTITY,  # owner mapping between the layers and the mount
        xattrs: XattrNamespace = TRUSTED,  # markers' namespace: user.overlay.* with userxattr
        # redirect_dir: "on" (renaming a directory with lower parts records a redirect),
        # "follow" (redirects are followed, never made: EXDEV) or "nofollow" (EPERM).
        redirect: str = "follow",
        metacopy: bool = False,  # chmod/chown/... copy up metadata only; needs redirect "on"
    ) -> None:
        self.lowers = lowers
        self.upper = upper
        self.work = work
        self.readonly = readonly
        self.fsync = fsync
        self.sync_copy_up = sync_copy_up
        self.static_nlink = static_nlink
        self.acl = acl
        self.writeback = writeback
        self.ids = ids
        self.xattrs = xattrs
        self.redirect = redirect
        self.metacopy = metacopy

    def replace(self, **changes: Any) -> UnionConfig:
        """A copy with *changes* made (the fields by name)."""
        return UnionConfig(**{**vars(self), **changes})

    def __repr__(self) -> str:
        return f"UnionConfig({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def _asked_in(base: Place, name: bytes) -> bytes:
    """The path in *base*'s layer that a lookup of *name* (``_Lookup.name``: a name, or
    an absolute path walked from *base*) below directory *base* asks for."""
    return join(base.path, name[1:] if name.startswith(b"/") else name)


class _Lookup:
    """The state of one lookup through the layers (the kernel's ``ovl_lookup_data``)."""

    __slots__ = ("name", "is_dir", "opaque", "stop", "last", "redirect", "metacopy", "rule", "st")

    def __init__(self, name: bytes) -> None:
        self.name = name  # what the next layer is asked for: a name, or an absolute path
        self.is_dir = False
        self.opaque = False
        self.stop = False
        self.last = False  # the bottom layer: its markers are not read
        self.redirect: bytes | None = None  # the name a redirect made, once one was followed
        self.metacopy = False  # the last file found is a metadata-only copy
        self.rule = ABSENT  # what the last layer looked at did (see ``resolve``'s *why*)
        self.st: os.stat_result | None = None  # and what it had there


def dirfds_per_layer(layers: int) -> int:
    """How many directory fds each layer may keep open: a quarter of the open-file
    limit (the rest for files, the kernel's passthrough, the hook), shared among the
    layers, 16 to 512 each. A stack of a hundred layers must not reach the limit,
    where every open would fail."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(MIN_DIRFDS, min(MAX_DIRFDS, soft // 4 // max(1, layers)))


MIN_DIRFDS, MAX_DIRFDS = 16, 512


class Union:
    """The layer stack and its inode table."""

    def __init__(self, config: UnionConfig, *, inspect_only: bool = False) -> None:
        self.config = config
        self.readonly = config.readonly or config.upper is None
        # Only looked at (the inspection tools): nothing is ever written to a layer (no
        # workdir, uuid, origin or impure marker), whatever ``readonly`` says; the
        # predictions still go by ``readonly`` (EROFS).
        self.inspect_only = inspect_only
        layers: list[Layer] = []
        cap = dirfds_per_layer(len(config.lowers) + (config.upper is not None))
        try:
            if config.upper is not None:
                layers.append(
                    Layer(0, config.upper, writable=True, max_dirfds=cap, xattrs=config.xattrs)
                )
            for path in config.lowers:
                layers.append(
                    Layer(len(layers), path, writable=False, max_dirfds=cap, xattrs=config.xattrs)
                )
        except BaseException:
            for layer in layers:
                layer.close()
            raise
        fsids: dict[int, int] = {}
        for layer in layers:
            layer.fsid = fsids.setdefault(layer.dev, len(fsids))
        self._all_one_fs = len(fsids) == 1
        self.layers = layers
        self.upper: Layer | None = layers[0] if layers[0].writable else None
        self.work_fd = -1
        if config.work is not None and not self.readonly and not inspect_only:
            assert self.upper is not None
            self.work_fd = _prepare_workdir(config.work, self.upper.root_fd)
        # Whether the upper filesystem gives every new entry its directory's group
        # (mounted grpid/bsdgroups), as it does to the kernel overlay's new entries.
        self.grpid = self.work_fd >= 0 and gives_directory_group(self.work_fd)
        self.ns = layers[0].xattrs
        self._decodable: dict[int, bool] = {}  # st_dev -> file handles can be opened
        self.inos = InodeNumbers()
        root = Node(ROOT_INO, None, b"", stat.S_IFDIR, layers[0])
        root.lowers = tuple(Place(layer, b"") for layer in self._cut_at_opaque(b"", layers)[1:])
        # The root shows its top directory's own number, as in the kernel.
        root.st_ino = self.inos.real(layers[0], os.fstat(layers[0].root_fd).st_ino)
        # Where an absolute redirect sends a lookup: the roots of the lower layers.
        self._roots = root.lowers if layers[0].writable else root.stack
        self.table = NodeTable(root)
        if self.upper is not None and not self.readonly and not inspect_only:
            markers.ensure_uuid(self.upper.root_fd, self.ns)
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
        self.table.on_drop.append(lambda node: self._forget_caps(node.ino))
        # Set by the FUSE adapter while someone traces the mount (see ``events``).
        self.events: Sink | None = None
        # Set by the FUSE adapter: an open file's real fd was replaced (copy-up).
        self.on_fd_change: Callable[[OpenFile], None] | None = None

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
        """Find *name* in *parent*, by the kernel overlay's lookup (``ovl_lookup``).

        The upper is asked for the name as it is; each lower directory below the
        parent then for the name the layers above sent it to. A whiteout ends the
        search; a non-directory hides everything below it, unless it is a
        metadata-only copy, whose data the search goes on to find; directories
        merge until one is opaque. A directory's (or metadata-only copy's)
        redirect xattr renames what the layers below are asked for: a name in
        the same parent, or an absolute path from the roots of the lower layers.

        Errors, as the kernel's: EINVAL for an invalid redirect, EPERM for a
        redirect with ``redirect_dir=nofollow`` or a metadata-only copy without
        ``metacopy=on``, EIO for a metadata-only copy whose data is missing.

        *why*, when given, is told the rule applied in each layer looked at and
        the path it asked that layer for (``unionfs explain``); a layer whose
        lookup raises is told as ``FAILS``, then the error is raised.
        """
        follow = self.config.redirect != "nofollow"
        stack = parent.stack
        upper = stack[0] if stack[0].layer.writable else None
        roots = self._roots
        poe: tuple[Place, ...] = stack[1:] if upper is not None else stack
        d = _Lookup(name)
        top: tuple[Place, os.stat_result] | None = None
        upper_redirect: bytes | None = None
        upper_metacopy = False
        if upper is not None:
            d.last = False if follow else not poe
            try:
                top = self._lookup_layer(upper, d)
            except OSError:
                if why is not None:
                    why(upper.layer, None, FAILS, join(upper.path, name))
                raise
            if why is not None:
                why(upper.layer, d.st, d.rule, join(upper.path, name))
            upper_redirect = d.redirect
            if d.redirect is not None and d.name.startswith(b"/"):
                poe = roots
            upper_metacopy = top is not None and d.metacopy
        found: list[tuple[Place, os.stat_result]] = []
        bottom = self.layers[-1]
        i = 0
        while not d.stop and i < len(poe):
            base = poe[i]
            if d.metacopy and not self.config.metacopy:
                raise PermissionError(errno.EPERM, "refusing to follow metacopy origin", name)
            if d.redirect is not None and not follow:
                raise PermissionError(errno.EPERM, "refusing to follow redirect", name)
            d.last = base.layer is bottom if follow else i == len(poe) - 1
            asked = d.name  # (the lookup may change it: what the layers below are asked)
            try:
                this = self._lookup_layer(base, d)
            except OSError:
                if why is not None:
                    why(base.layer, None, FAILS, _asked_in(base, asked))
                raise
            if why is not None:
                why(base.layer, d.st, d.rule, _asked_in(base, asked))
            if this is None:
                i += 1
                continue
            if (upper_metacopy or d.metacopy) and not self.config.metacopy:
                # Also for a metadata-only copy found in the bottom layer (the kernel's
                # answer there too, though nothing could be below it).
                raise PermissionError(errno.EPERM, "refusing to follow metacopy origin", name)
            if not (d.metacopy and found):  # only the top-most metacopy and the data count
                found.append(this)
            if d.stop:
                break
            if d.redirect is not None and d.name.startswith(b"/") and poe is not roots:
                poe = roots  # an absolute redirect below: go on from the layers below this one
                i = next(k for k, r in enumerate(roots) if r.layer is base.layer) + 1
                continue
            i += 1
        if d.metacopy or (upper_metacopy and not found):
            raise OSError(errno.EIO, "metacopy with no lower data found", name)
        if top is None:
            if not found:
                return None
            top = found.pop(0)
        place, st = top
        if stat.S_ISDIR(st.st_mode):
            lowers = tuple(p for p, _ in found)
            ino = (
                self.inos.real(found[0][0].layer, found[0][1].st_ino)
                if place.layer.writable and found
                else 0
            )
        elif found:  # a metadata-only copy: the data is in the last file found
            lowers = (found[0][0], found[-1][0]) if len(found) > 1 else (found[0][0],)
            st = stat_with(st, blocks=found[-1][1].st_blocks)  # stat counts the data's
            ino = (
                self.inos.real(found[0][0].layer, found[0][1].st_ino) if place.layer.writable else 0
            )
            if place.layer.writable and found[0][1].st_nlink > 1:
                ino = 0  # a lower hard link: copy-up broke it, so the upper's number
        else:
            lowers = ()
            ino = self._origin_ino(place, st) if place.layer.writable else 0
        return Entry(
            name,
            place.layer,
            st,
            lowers,
            place.path,
            ino or self.inos.real(place.layer, st.st_ino),
            upper_redirect,
            upper_metacopy
            or (not place.layer.writable and bool(found) and not stat.S_ISDIR(st.st_mode)),
        )

    def _lookup_layer(self, base: Place, d: _Lookup) -> tuple[Place, os.stat_result] | None:
        """``ovl_lookup_layer``: *d.name* below directory *base* of one layer; an
        absolute name is walked one component at a time (from *base*, as the kernel
        does), each intermediate directory's markers applying on the way."""
        if not d.name.startswith(b"/"):
            return self._lookup_single(base, d.name, 0, b"", d)
        rem = len(d.name) - 1
        cur: tuple[Place, os.stat_result] | None = None
        dirplace = base
        while True:
            start = len(d.name) - rem
            comp, sep, rest = d.name[start:].partition(b"/")
            post = sep + rest
            cur = self._lookup_single(dirplace, comp, start, post, d)
            if cur is None or not post:
                return cur
            if not stat.S_ISDIR(cur[1].st_mode):
                return None
            dirplace = cur[0]
            rem -= len(comp) + 1

    def _lookup_single(
        self, base: Place, comp: bytes, prelen: int, post: bytes, d: _Lookup
    ) -> tuple[Place, os.stat_result] | None:
        """``ovl_lookup_single``: one component in one layer, and what its markers say."""
        layer = base.layer
        last_element = not post
        lower = not layer.writable
        if comp in (b".", b".."):  # only a redirect can name them; lookup_one_len refuses
            raise PermissionError(errno.EACCES, "invalid redirect component", comp)
        if lower and markers.is_oci_name(comp):
            d.stop = True  # OCI markers are never names in a lower layer
            d.rule, d.st = RESERVED, None
            return None
        st = d.st = layer.lstat(base.path, comp)
        if st is None:
            d.rule = ABSENT
            if lower and layer.has_oci_whiteout(base.path, comp):
                d.stop = d.opaque = True
                d.rule = OCI_WHITEOUT
            return None
        if is_whiteout(st):
            d.stop = d.opaque = True
            d.rule = WHITEOUT
            return None
        d.rule = ENDS_MERGE
        if last_element and d.metacopy and not stat.S_ISREG(st.st_mode):
            d.stop = True
            return None
        path = join(base.path, comp)
        here = (Place(layer, path), st)
        is_dir = stat.S_ISDIR(st.st_mode)
        # Only a regular file's xattrs matter for a non-directory (its metacopy marker).
        if (
            (not is_dir and (d.is_dir or not last_element or not stat.S_ISREG(st.st_mode)))
            or d.last
            and is_dir
        ):
            xattrs: dict[bytes, bytes] = {}  # what follows reads none
        else:
            xattrs = markers.overlay_xattrs(fd_path(layer.dirfd(base.path), comp), self.ns)
        if not is_dir:
            if d.is_dir or not last_element:
                d.stop = True
                return None
            below_metacopy = d.metacopy
            d.metacopy = stat.S_ISREG(st.st_mode) and markers.parse_metacopy(
                xattrs.get(b"metacopy")
            )
            d.stop = not d.metacopy
            d.rule = METACOPY if d.metacopy else DATA if below_metacopy else PROVIDES
            if not d.metacopy or d.last:
                return here
        else:
            if last_element:
                d.is_dir = True
            d.rule = DIRECTORY
            if d.last:
                return here
            opaque = markers.parse_opaque(xattrs.get(b"opaque"))
            if opaque is None and lower and layer.lstat(path, markers.OCI_OPAQUE) is not None:
                opaque = b"y"
            if opaque == b"y":
                d.stop = True
                if last_element:
                    d.opaque = True
                d.rule = OPAQUE
                return here
        redirect = markers.parse_redirect(xattrs.get(b"redirect"))
        if redirect is not None:
            if is_dir:
                d.rule = REDIRECT
            if markers.is_absolute_redirect(redirect):
                # An absolute redirect reaches the lower layers even below an opaque parent.
                d.stop = False
                d.name = redirect + post
            else:
                d.name = d.name[:prelen] + redirect + post
            d.redirect = d.name
        return here

    def _origin_ino(self, place: Place, st: os.stat_result) -> int:
        """The st_ino of an upper non-directory: its copy-up origin's, when it records
        one that still exists and was no hard link (0: the upper's own)."""
        known = self.inos.shown.get(st.st_ino)
        if known is not None:
            return known
        parent, name = place.split()
        present, fh = markers.read_origin(fd_path(place.layer.dirfd(parent), name), self.ns)
        if not present:
            return 0
        ino = 0
        if fh is not None:
            for layer in self.layers[1:] if self.upper is not None else ():
                if not self._may_decode(layer, fh):
                    continue
                try:
                    fd = layer.open_handle(fh)
                except OSError:
                    continue  # stale (ESTALE), or no right to decode handles (EPERM)
                try:
                    origin = os.fstat(fd)
                finally:
                    os.close(fd)
                if stat.S_IFMT(origin.st_mode) == stat.S_IFMT(st.st_mode) and origin.st_nlink == 1:
                    ino = self.inos.real(layer, origin.st_ino)
                break
        self.inos.shown[st.st_ino] = ino or self.inos.real(place.layer, st.st_ino)
        return ino

    def _can_decode(self, layer: Layer) -> bool:
        """Whether file handles of *layer*'s filesystem can be opened here (tried once)."""
        ok = self._decodable.get(layer.dev)
        if ok is None:
            try:
                os.close(layer.open_handle(layer.handle(b"")))
                ok = True
            except OSError:
                ok = False
            self._decodable[layer.dev] = ok
        return ok

    def _may_decode(self, layer: Layer, fh: markers.FileHandle) -> bool:
        """Whether an origin may be looked for on *layer*'s filesystem: the uuids
        match (unknown ones are not checked), and a lower on another filesystem
        than the upper has a uuid at all (the kernel's "bad uuid" rule)."""
        uuid = layer.uuid
        if uuid is not None and uuid != fh.uuid:
            return False
        features = self.config.redirect == "on" or self.config.metacopy
        return not (uuid == markers.NULL_UUID and layer.fsid != 0 and not features)

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
        name, top, st = entry.name, entry.layer, entry.st
        ino = self.inos.of(entry, lambda n: self.table.find(n) is not None)
        node = self.table.find(ino)
        if node is not None and not top.writable and node.place != entry.place:
            # The number is another node's: one lower directory reached by two names
            # (redirects made elsewhere), which must stay two inodes here.
            ino = self.inos.apart(entry)
            node = self.table.find(ino)
        if node is None:
            node = Node(ino, parent, name, stat.S_IFMT(st.st_mode), top)
            self._update(node, entry)
            self.table.add(node)
            if top.writable and entry.lowers and node.is_dir:
                self._fix_origin(parent, node)
            return node
        if node.layer.writable and not top.writable and not node.unlinked:
            # A stale entry (a listing from before a copy-up): a node that has an
            # upper part never goes back to a lower one.
            return node
        self._update(node, entry)
        if node.parent is not parent or node.name != name:
            if node.unlinked:
                # The real inode number was freed and reused by a new file: a new
                # generation tells the kernel its old inode of that number is dead.
                node.generation += 1
                node.gone_st = node.gone_from = None
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

    def unnamed_node(self, layer: Layer, st: os.stat_result) -> Node:
        """The node of a file with no name yet (O_TMPFILE) in *layer*."""
        ino = self.inos.real(layer, st.st_ino)
        if self.table.find(ino) is not None:  # a gone file's node still has the number
            ino = self.inos.spare()
            self.inos.origins[st.st_ino] = ino  # found again once linked
        node = Node(ino, None, b"", stat.S_IFMT(st.st_mode), layer)
        node.st_ino = self.inos.real(layer, st.st_ino)
        self.table.add(node)
        return node

    @staticmethod
    def _update(node: Node, entry: Entry) -> None:
        node.layer = entry.layer
        node.src = entry.path
        node.lowers = entry.lowers
        node.kind = stat.S_IFMT(entry.st.st_mode)
        node.redirect = entry.redirect
        node.metacopy = entry.metacopy
        node.st_ino = entry.ino or InodeNumbers.real(entry.layer, entry.st.st_ino)

    def _fix_origin(self, parent: Node, node: Node) -> None:
        """A merged directory whose upper part records no origin gets its first lower
        part's, and the upper parent is marked impure, as the kernel's lookup does
        (``ovl_fix_origin``): an upper made elsewhere then reads as one it made."""
        if self.readonly or self.inspect_only or not node.lowers:
            return
        upper = node.layer
        path = fd_path(upper.dirfd(parent.path), node.name)
        try:
            if markers.read_origin(path, self.ns)[0]:
                return
            markers.set_origin(path, self.origin_of(node.lowers[0]), self.ns)
            markers.set_impure(upper.dirfd(parent.path), self.ns)
        except OSError as e:
            log.warning("could not record the origin of %r: %s", node, e.strerror)

    def origin_of(self, place: Place) -> markers.FileHandle | None:
        """The origin to record for a copy of *place*: its file handle, or None ("origin
        unknown", the kernel's empty value) when its filesystem makes none, or when
        this daemon could not decode it again (no CAP_DAC_READ_SEARCH: an ordinary
        user, a user namespace), as the kernel's ``ovl_can_decode_fh`` says."""
        if not self._can_decode(place.layer):
            return None
        try:
            return place.layer.handle(place.path)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EOVERFLOW, errno.EPERM):
                return None
            raise

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
        node.gone_from = weakref.ref(parent)
        self.table.set_parent(node, None, name)
        self.table.maybe_drop(node)

    # -- attributes ----------------------------------------------------------

    def stat(self, node: Node) -> os.stat_result:
        """The real inode's stat, from the topmost layer that holds the node; a
        metadata-only copy counts the blocks of the file that holds its data."""
        if node.ino == ROOT_INO:
            return os.stat(node.layer.root_fd)
        if node.unlinked:
            files = self.open_files.get(node.ino)
            if files:
                f = files[0]
                return os.fstat(f.fd if f.meta_fd < 0 else f.meta_fd)
            if node.gone_st is not None:
                return node.gone_st
            raise FileNotFoundError(errno.ENOENT, "removed", node.name)
        place = node.place
        st = place.layer.lstat(*place.split())
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "vanished from its layer", node.name)
        if node.metacopy:
            data = node.lowers[-1]
            dst = data.layer.lstat(*data.split())
            if dst is not None:
                st = stat_with(st, blocks=dst.st_blocks)
        return st

    def shown_nlink(self, node: Node, st: os.stat_result) -> int:
        """A merged directory shows nlink 1, as the kernel overlay does (counting
        subdirectories across layers is not worth it; ``find`` accepts 1)."""
        return 1 if self.nlink_is_one(node) else st.st_nlink

    def nlink_is_one(self, node: Node) -> bool:
        """Whether *node* shows nlink 1 whatever its real inode has (``shown_nlink``)."""
        return node.kind == stat.S_IFDIR and bool(node.lowers or self.config.static_nlink)

    def real_path(self, node: Node) -> tuple[bytes, bool]:
        """A ``/proc/self/fd`` path to the node's real file, for calls with no ``*at``
        form, and whether to follow it: only the root's path is the fd's magic link
        itself (the directory); any other names an entry that must not be followed."""
        if node.ino == ROOT_INO:
            return fd_path(node.layer.root_fd), True
        if node.parent is None:
            raise FileNotFoundError(errno.ENOENT, "removed", node.name)
        place = node.place
        parent, name = place.split()
        return fd_path(place.layer.dirfd(parent), name), False

    def open_real(self, node: Node, flags: int) -> int:
        """Open the node's real file in its topmost layer, never following a symlink."""
        if node.parent is None:
            raise FileNotFoundError(errno.ENOENT, "removed", node.name)
        place = node.place
        return place.layer.open_file(*place.split(), flags)

    def data_layer(self, node: Node) -> Layer:
        """The layer that holds the node's data (named or not)."""
        return node.lowers[-1].layer if node.metacopy else node.layer

    def data_place(self, node: Node) -> Place:
        """Where the node's data is: its topmost part, or for a metadata-only copy the
        lower file that holds the data."""
        return node.lowers[-1] if node.metacopy else node.place

    def open_data(self, node: Node, flags: int) -> int:
        """Open the file that holds the node's data (for reading).

        A node whose name is gone (an open through ``/proc/PID/fd``) can still be
        opened while its data is in a lower layer, which never changes; an upper
        file's path may by now name another file, so it is opened again through a
        file of it open here, as the kernel opens it again (ENOENT when none is:
        only an ``O_PATH`` fd or a mapping holds it)."""
        layer = self.data_layer(node)
        if node.parent is None and layer.writable:
            for f in self.open_files.get(node.ino, ()):
                if f.layer is layer and f.fd >= 0:
                    reopen = (flags & ~_NOT_REOPENED) | os.O_CLOEXEC
                    return os.open(f"/proc/self/fd/{f.fd}", reopen)
            raise FileNotFoundError(errno.ENOENT, "removed", node.name)
        place = self.data_place(node)
        return place.layer.open_file(*place.split(), flags)

    def follow_copy_up(self, node: Node) -> None:
        """Move every open file of *node* to where its data is now.

        Readers then see what writers write, and an fchmod or fchown on a file
        unlinked later reaches the upper copy, never the shared lower layer. A
        metadata-only copy leaves them where they are: the data has not moved.
        """
        data = self.data_place(node)
        for f in self.open_files.get(node.ino, ()):
            if f.layer is data.layer:
                continue
            fd = data.layer.open_file(*data.split(), f.flags)
            os.close(f.fd)
            f.fd, f.layer = fd, data.layer
            if f.meta_fd >= 0 and not node.metacopy:
                os.close(f.meta_fd)
                f.meta_fd = -1
            if self.on_fd_change is not None:
                self.on_fd_change(f)

    def readlink(self, node: Node) -> bytes:
        if node.parent is None:
            raise FileNotFoundError(errno.ENOENT, "removed", node.name)
        place = node.place
        parent, name = place.split()
        return os.readlink(name, dir_fd=place.layer.dirfd(parent))

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(fd_path(self.layers[0].root_fd))

    # -- listing -------------------------------------------------------------

    def names(self, node: Node) -> list[bytes]:
        """The merged directory's names: each once, whiteouts and what they hide left out."""
        seen: set[bytes] = set()
        hidden: set[bytes] = set()
        names: list[bytes] = []
        for layer, path in node.stack:
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
                    if markers.is_whiteout_entry(dent):
                        hidden.add(name)
                        continue
                    seen.add(name)
                    names.append(name)
            hidden.update(deleted_below)
        return names

    def listing(self, node: Node) -> list[Entry]:
        """The merged directory's entries, resolved, for readdir (an entry with
        ``is_name_only`` true carries just its name).

        A directory with no upper part cannot change while mounted (any change
        inside it copies it up first), so its entries are resolved once and kept.
        Entries of a directory with an upper part carry names only: the caller
        resolves each when it is needed, so no stale stat is handed out.
        """
        if node.layer.writable:
            names = self.names(node)
            if not node.lowers and not self.readonly and not self.inspect_only:
                self._drop_stale_impure(node, names)
            return [Entry(name, node.layer, _NO_STAT) for name in names]
        if node.listing is None:
            out: list[Entry] = []
            for name in self.names(node):
                try:
                    entry = self.resolve(node, name)
                except OSError:
                    # Listed, though looking it up fails (an invalid redirect, say),
                    # as in the kernel: a name-only entry, resolved (and failing) again.
                    entry = Entry(name, node.layer, _NO_STAT)
                if entry is not None:
                    out.append(entry)
            node.listing = out
        return node.listing

    def raw_entry(self, node: Node, name: bytes) -> tuple[Layer, os.stat_result] | None:
        """*name*'s stat in the topmost layer of directory *node* that has it, whatever
        it means there: what a listing shows for a name that cannot be looked up.

        None when the kernel would not list it: in a directory marked impure it looks
        each upper entry up (for its d_ino), and drops one that fails."""
        for i, (layer, path) in enumerate(node.stack):
            if i == 0 and layer.writable and layer.fsid == 0 and self._all_one_fs:
                dirfd = layer.root_fd if node.ino == ROOT_INO else layer.dirfd(path)
                if layer.lstat(path, name) is not None and markers.is_impure(dirfd, self.ns):
                    return None
            st = layer.lstat(path, name)
            if st is not None:
                return layer, st
        return None

    def _drop_stale_impure(self, node: Node, names: list[bytes]) -> None:
        """A directory of the upper only that no longer holds anything whose st_ino is
        not its own (nothing copied up or moved in with an origin) loses its impure
        marker when listed, as in the kernel (``ovl_cache_get_impure``)."""
        upper = node.layer
        dirfd = upper.root_fd if node.ino == ROOT_INO else upper.dirfd(node.path)
        if not markers.is_impure(dirfd, self.ns):
            return
        for name in names:
            try:
                entry = self.resolve(node, name)
            except OSError:
                return
            if entry is not None and entry.ino != self.inos.real(entry.layer, entry.st.st_ino):
                return
        try:
            markers.clear_impure(dirfd, self.ns)
        except OSError as e:
            log.warning("could not drop the impure marker of %r: %s", node, e.strerror)

    def is_empty(self, node: Node) -> bool:
        return not self.names(node)

    def lower_has_name(self, parent: Node, name: bytes) -> bool:
        """Whether removing *name* from the upper would let a lower entry show through
        (the kernel's ``ovl_lower_positive``: the plain name, in the parent's lower parts)."""
        for layer, path in parent.stack:
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
                self.caps_absent(node)
            raise

    def caps_absent(self, node: Node) -> None:
        """*node* has no file capability (known, as for a file just created), so the
        kernel's questions about it are answered without reading (with the C hook,
        without a trip through Python)."""
        node.no_caps = True
        if self.on_caps_known is not None:
            self.on_caps_known(node.ino, True)

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
    # Nothing built there may inherit the workdir's ACLs or setgid bit (the kernel's
    # ovl_workdir_create clears them at every mount too).
    acl.clear(fd)
    os.fchmod(fd, 0o700)
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


PROBE = b"#grpid-probe"


def gives_directory_group(work_fd: int) -> bool:
    """Whether the filesystem of *work_fd* (the workdir, cleared and no longer setgid)
    gives a new entry its directory's group, not its maker's: as ext4 and xfs do when
    mounted ``grpid`` (or ``bsdgroups``), which the mount options do not always show
    (ext4 leaves out the options its superblock makes the default). Found by making
    one: a directory given another group and a directory in it. False where the
    daemon may give none (an unprivileged one with no other group): it makes every
    entry with its own group then, whatever it asks for."""
    own = os.getegid()
    candidates = [g for g in (*os.getgroups(), own ^ 1) if g != own]
    inner = PROBE + b"/d"
    os.mkdir(PROBE, 0o700, dir_fd=work_fd)  # the workdir was just cleared
    try:
        for gid in candidates:
            try:
                os.chown(PROBE, -1, gid, dir_fd=work_fd, follow_symlinks=False)
            except OSError:
                continue
            os.mkdir(inner, 0o700, dir_fd=work_fd)
            try:
                return os.stat(inner, dir_fd=work_fd).st_gid == gid
            finally:
                os.rmdir(inner, dir_fd=work_fd)
        return False
    finally:
        os.rmdir(PROBE, dir_fd=work_fd)
