"""``unionfs check LAYER... [--upper U]``: a linter for layer directories.

One line per finding: the path on disk, how serious it is, and what the
kernel overlay, an OCI runtime or unionfs would do with it. ``error``: it
would change the merged view unexpectedly (the exit status is then 1);
``warning``: it does nothing, or breaks only a later use of the layer;
``info``: worth knowing (space that higher layers hide, as dive reports it).

Markers are recognised through ``unionfs.overlay.markers`` and the hidden
files through the overlay's own listing and resolution (``Union.names``,
``Union.resolve``): the merged tree is walked as the mount walks it, redirects
followed by the ``--redirect-dir`` setting's rules, so the linter and the mount
agree on what each layer contributes. A directory that cannot be read is a
finding of its own (``unreadable``): the rest is checked all the same, and the
exit status is then 2, as the check is incomplete.

Every name is printed through ``names.printable``: one line per finding,
whatever bytes a name holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from unionfs.errors import UsageError
from unionfs.inspect import markerinfo
from unionfs.inspect.explain import (
    Component,
    Step,
    hidden_reason,
    kind_of,
    layer_name,
    resolve_traced,
    stopped_by,
)
from unionfs.inspect.names import directory_arg, printable
from unionfs.options import human_size
from unionfs.overlay import markers
from unionfs.overlay import union as resolution
from unionfs.overlay.layers import NOT_THERE, Layer
from unionfs.overlay.markers import TRUSTED, USER, XattrNamespace
from unionfs.overlay.nodes import Node, Place
from unionfs.overlay.syscalls import fd_path
from unionfs.overlay.union import Union, UnionConfig, join

ERROR, WARNING, INFO = "error", "warning", "info"
TARGETS = ("unionfs", "kernel", "oci")
TOP_WASTE = 10  # hidden files listed by size without --all
UNREADABLE = "unreadable"

# The whiteout an overlay keeps in WORKDIR/work to link new whiteouts to: unionfs's
# ``#whiteout``, the kernel's a temporary name (``#`` and a hexadecimal number) that
# it leaves there at unmount. Neither is left by an interrupted change.
_SHARED_WHITEOUT = re.compile(rb"#(whiteout|[0-9a-f]+)")

# Why an opaque directory that no layer below has is no cause for a warning.
_HARMLESS_OPAQUE = (
    "harmless: the kernel overlay marks the directories it makes in a merged directory "
    "opaque (with redirect_dir=on), and a layer made from such an upper keeps the marker"
)


@dataclass
class Finding:
    severity: str
    code: str
    layer: int
    root: Path
    rel: bytes
    message: str  # every name in it already through ``printable``

    @property
    def path(self) -> str:
        return printable(
            os.path.join(os.fsencode(self.root), self.rel) if self.rel else os.fsencode(self.root)
        )

    def line(self) -> str:
        return f"{self.path}: {self.severity} [{self.code}] {self.message}"

    def as_json(self) -> dict[str, object]:
        return {
            "severity": self.severity,
            "code": self.code,
            "layer": self.layer,
            "path": self.path,
            "relpath": printable(self.rel),
            "message": self.message,
        }


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    entries: int = 0
    wasted_bytes: int = 0
    wasted_files: int = 0

    @property
    def errors(self) -> int:
        return sum(f.severity == ERROR for f in self.findings)

    @property
    def unreadable(self) -> int:
        return sum(f.code == UNREADABLE for f in self.findings)


class Checker:
    def __init__(self, union: Union, target: str, ns: XattrNamespace) -> None:
        self.union = union
        self.target = target
        self.ns = ns
        self.report = Report()
        self.layers = union.layers
        self.bottom = union.layers[-1]
        self._inodes: dict[tuple[int, int], list[tuple[Layer, bytes]]] = {}
        self._formats: dict[int, set[str]] = {}
        self._progress = sys.stderr.isatty()
        # What the merged view is made of (``_merged_view``): each directory of a layer
        # that merges into a directory the mount shows, with those directories (a
        # redirect can send a lookup to a directory of another name, or two names to
        # one), and every regular file the mount shows, by inode: a hidden name of a
        # file that another name shows (a hard link, in any layer) wastes nothing.
        self._merged_into: dict[Place, list[Node]] = {}
        self._shown: set[tuple[int, int]] = set()
        # Places whose contents could not be worked out (a directory that could not be
        # read, or a name whose lookup failed for want of access): not checked. Those
        # that could not be read are reported, once each, and nothing below them.
        self._unchecked: set[Place] = set()
        self._unreadable: set[Place] = set()

    def add(self, severity: str, code: str, layer: Layer, rel: bytes, message: str) -> None:
        self.report.findings.append(Finding(severity, code, layer.index, layer.path, rel, message))

    def _name(self, layer: Layer) -> str:
        return "the upper" if layer.writable else f"layer {layer.index}"

    def _cannot_read(self, layer: Layer, rel: bytes, err: OSError, what: str = "directory") -> None:
        """Report once that *rel* in *layer* could not be read, and leave it unchecked."""
        self._unchecked.add(Place(layer, rel))
        if self._under(Place(layer, rel), self._unreadable):
            return  # what is below a directory that could not be read is not reported
        self._unreadable.add(Place(layer, rel))
        below = ", nor anything below it" if what == "directory" else ""
        self.add(
            WARNING,
            UNREADABLE,
            layer,
            rel,
            f"could not read this {what} of {self._name(layer)}: {err.strerror or err}; "
            f"not checked{below}",
        )

    @staticmethod
    def _under(place: Place, places: set[Place]) -> bool:
        """Whether *place* or a directory above it in its layer is one of *places*."""
        path = place.path
        while True:
            if Place(place.layer, path) in places:
                return True
            if not path:
                return False
            path = path.rpartition(b"/")[0]

    def _list(self, layer: Layer, rel: bytes) -> list[tuple[bytes, os.stat_result]] | None:
        """The names in directory *rel* of *layer* and their lstat, sorted; None (and a
        finding) when it cannot be read."""
        try:
            fd = layer.open_dir(rel)
        except OSError as e:
            if e.errno not in NOT_THERE:
                self._cannot_read(layer, rel, e)
            return None
        out = []
        try:
            with os.scandir(fd) as it:
                for dent in it:
                    try:
                        st = dent.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while listed
                    out.append((os.fsencode(dent.name), st))
        except OSError as e:
            self._cannot_read(layer, rel, e)
            return None
        finally:
            os.close(fd)
        out.sort()
        return out

    # -- walking each layer ---------------------------------------------------------

    def run(self) -> Report:
        self._merged_view()
        for layer in self.layers:
            self._walk(layer)
            kinds = self._formats.get(layer.index, set())
            if len(kinds) > 1 and self.target == "unionfs" and not layer.writable:
                self.add(
                    WARNING,
                    "mixed-formats",
                    layer,
                    b"",
                    "this layer has whiteouts or opaque markers in both the kernel's and the "
                    "OCI format: unionfs honours both, but the kernel overlay would show the "
                    ".wh. files and an OCI runtime would not understand the kernel's",
                )
        self._cross_layer_links()
        self._wasted()
        if self._progress:
            sys.stderr.write("\r\033[K")
        return self.report

    def _walk(self, layer: Layer) -> None:
        """Every entry of *layer*, in name order, each directory's entries right after it
        (a stack of listings, not recursion: a layer may be deeper than Python's stack)."""
        todo = [(b"", iter(self._list(layer, b"") or ()))]
        while todo:
            rel, listing = todo[-1]
            item = next(listing, None)
            if item is None:
                todo.pop()
                continue
            name, st = item
            child = join(rel, name)
            self.report.entries += 1
            if self._progress and self.report.entries % 2000 == 0:
                sys.stderr.write(f"\rchecked {self.report.entries:,} entries")
                sys.stderr.flush()
            try:
                self._entry(layer, rel, name, st)
            except OSError as e:
                self._cannot_read(layer, child, e, "entry")
            if stat.S_ISDIR(st.st_mode):
                todo.append((child, iter(self._list(layer, child) or ())))

    def _below(self, layer: Layer, parent: bytes) -> list[Place]:
        """The directories that merge below directory *parent* of *layer*, as the mount
        merges them (redirects followed, cut at an opaque one); when that directory is
        not part of the merged view, those at the same path in every layer below."""
        nodes = self._merged_into.get(Place(layer, parent))
        if not nodes:
            return [Place(other, parent) for other in self.layers[layer.index + 1 :]]
        out: list[Place] = []
        for node in nodes:
            stack = node.stack
            mine = next(i for i, p in enumerate(stack) if p == Place(layer, parent))
            out.extend(p for p in stack[mine + 1 :] if p not in out)
        return out

    def _below_has(self, layer: Layer, parent: bytes, name: bytes, want_dir: bool = False) -> bool:
        """Whether a directory that merges below *layer*'s *parent* has *name* (a
        directory, with *want_dir*); True too when one of them could not be read, as
        nothing can be said then."""
        for place in self._below(layer, parent):
            if self._under(place, self._unchecked):
                return True
            try:
                st = place.layer.lstat(place.path, name)
            except OSError as e:
                self._cannot_read(place.layer, place.path, e)
                return True
            if (
                st is not None
                and not markers.is_whiteout(st)
                and (not want_dir or stat.S_ISDIR(st.st_mode))
            ):
                return True
        return False

    def _hides_nothing(self, layer: Layer, parent: bytes, name: bytes) -> str:
        """Why a whiteout of *name* in *layer*'s *parent* hides nothing."""
        rel = printable(join(parent, name))
        if self._merged_into.get(Place(layer, parent)):
            for other in self.layers[layer.index + 1 :]:
                with contextlib.suppress(OSError):
                    st = other.lstat(parent, name)
                    if st is not None and not markers.is_whiteout(st):
                        return (
                            f"hides nothing: {self._name(other)} has {rel}, but its directory "
                            "does not merge below this one (an opaque directory or a redirect "
                            "is in the way)"
                        )
        return f"hides nothing: no layer below has {rel}"

    def _entry(self, layer: Layer, parent: bytes, name: bytes, st: os.stat_result) -> None:
        rel = join(parent, name)
        bottom = layer is self.bottom and not layer.writable
        if markers.is_whiteout(st):
            self._kernel_whiteout(layer, parent, name, bottom)
        elif markers.is_oci_name(name) and stat.S_ISREG(st.st_mode):
            self._oci_marker(layer, parent, name, bottom)
        elif markers.is_oci_name(name):
            self.add(
                WARNING,
                "reserved-name",
                layer,
                rel,
                f"a {'directory' if stat.S_ISDIR(st.st_mode) else 'non-file'} named .wh.*: "
                "the OCI format reserves the name; a runtime may take it for a marker",
            )
        elif len(name) > markers.OCI_NAME_MAX and self.target == "oci":
            pass  # only a whiteout of such a name is a problem (see _kernel_whiteout)
        if stat.S_ISDIR(st.st_mode):
            self._directory(layer, parent, name, bottom)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and not markers.is_whiteout(st):
            self._inodes.setdefault((st.st_dev, st.st_ino), []).append((layer, rel))
        self._xattrs(layer, parent, name, st)

    # -- markers ------------------------------------------------------------------

    def _kernel_whiteout(self, layer: Layer, parent: bytes, name: bytes, bottom: bool) -> None:
        rel = join(parent, name)
        self._formats.setdefault(layer.index, set()).add("kernel")
        if self.target == "oci":
            self.add(
                ERROR,
                "kernel-whiteout-in-oci",
                layer,
                rel,
                "a kernel whiteout (character device 0/0) in a layer meant for an OCI tarball: "
                "tar stores a device node, and a runtime unpacking it makes a device instead of "
                f"deleting {printable(name)} (unionfs convert --to oci rewrites it)",
            )
            if len(name) > markers.OCI_NAME_MAX:
                self._too_long(layer, rel, name)
            return
        if len(name) > markers.OCI_NAME_MAX:
            self._too_long(layer, rel, name, WARNING)
        if bottom:
            self.add(
                WARNING,
                "no-op-whiteout",
                layer,
                rel,
                "a whiteout in the bottom layer hides nothing: there is no layer below",
            )
        elif not self._below_has(layer, parent, name):
            self.add(
                WARNING,
                "orphan-whiteout",
                layer,
                rel,
                self._hides_nothing(layer, parent, name),
            )

    def _too_long(self, layer: Layer, rel: bytes, name: bytes, severity: str = ERROR) -> None:
        self.add(
            severity,
            "name-too-long-for-oci",
            layer,
            rel,
            f"a whiteout of a {len(name)}-byte name cannot be written in the OCI format "
            f"(.wh. + the name exceeds 255 bytes); an OCI layer cannot delete it",
        )

    def _oci_marker(self, layer: Layer, parent: bytes, name: bytes, bottom: bool) -> None:
        rel = join(parent, name)
        opaque = name == markers.OCI_OPAQUE
        deleted = markers.oci_deleted(name)
        what = "opaque marker" if opaque else "whiteout"
        if layer.writable and self.target != "oci":
            self.add(
                ERROR,
                "oci-marker-in-upper",
                layer,
                rel,
                f"an OCI {what} in the upper: the upper is read in the kernel's format, so "
                f"unionfs and the kernel show it as a file named {printable(name)}"
                + ("" if opaque else " and delete nothing"),
            )
            return
        self._formats.setdefault(layer.index, set()).add("oci")
        if self.target == "kernel":
            effect = (
                "does not make the directory opaque"
                if opaque
                else f"does not delete {printable(deleted or b'')} below"
            )
            self.add(
                ERROR,
                "oci-marker-for-kernel",
                layer,
                rel,
                f"an OCI {what} in a layer meant for the kernel overlay: the kernel shows it as "
                f"a file named {printable(name)} and {effect} (unionfs convert --to kernel)",
            )
            return
        if bottom:
            self.add(
                WARNING,
                f"no-op-{'opaque' if opaque else 'whiteout'}",
                layer,
                rel,
                f"an OCI {what} in the bottom layer does nothing: there is no layer below",
            )
            return
        if opaque:
            dparent, _, dname = parent.rpartition(b"/")
            if parent and not self._below_has(layer, dparent, dname, want_dir=True):
                self.add(
                    INFO,
                    "orphan-opaque",
                    layer,
                    rel,
                    f"opaque, but no layer below has this directory: it hides nothing ({_HARMLESS_OPAQUE})",
                )
            return
        assert deleted is not None
        own = layer.lstat(parent, deleted)
        if own is not None and stat.S_ISDIR(own.st_mode):
            self.add(
                ERROR,
                "whiteout-and-directory",
                layer,
                rel,
                f"this layer has both {printable(deleted)}/ and its whiteout: an OCI runtime "
                "deletes the lower directory and adds this one (as if opaque); unionfs and "
                "fuse-overlayfs merge it with the directories below",
            )
        elif own is not None:
            self.add(
                WARNING,
                "redundant-whiteout",
                layer,
                rel,
                f"this layer has {printable(deleted)} itself, which hides the layers below "
                "anyway: the whiteout does nothing",
            )
        elif not self._below_has(layer, parent, deleted):
            self.add(
                WARNING,
                "orphan-whiteout",
                layer,
                rel,
                self._hides_nothing(layer, parent, deleted),
            )

    def _directory(self, layer: Layer, parent: bytes, name: bytes, bottom: bool) -> None:
        rel = join(parent, name)
        try:
            fd = layer.dirfd(rel)
        except OSError:
            return
        if not markers.has_opaque_xattr(fd_path(fd), self.ns, follow=True):
            return
        found = markerinfo.xattrs(fd_path(fd), follow=True)
        xattr = (
            self.ns.opaque if found.get(self.ns.opaque) == b"y" else markers.other(self.ns).opaque
        )
        self._formats.setdefault(layer.index, set()).add("kernel")
        if self.target == "oci":
            self.add(
                ERROR,
                "opaque-xattr-in-oci",
                layer,
                rel,
                f"opaque by the xattr {xattr.decode()}, which an OCI layer cannot "
                "carry: unpacked by a runtime, the directory merges with the layers below "
                "(unionfs convert --to oci writes .wh..wh..opq)",
            )
        elif bottom:
            self.add(
                WARNING,
                "no-op-opaque",
                layer,
                rel,
                "an opaque directory in the bottom layer hides nothing: there is no layer below",
            )
        elif not layer.writable and not self._below_has(layer, parent, name, want_dir=True):
            # In the upper such a marker is the overlay's own doing (the kernel's on every
            # directory it makes in a merged directory with redirect_dir=on, and both
            # overlays' on a directory moved into one): nothing to report.
            self.add(
                INFO,
                "orphan-opaque",
                layer,
                rel,
                f"opaque, but no layer below has this directory: it hides nothing ({_HARMLESS_OPAQUE})",
            )

    # -- xattrs --------------------------------------------------------------------

    def _xattrs(self, layer: Layer, parent: bytes, name: bytes, st: os.stat_result) -> None:
        rel = join(parent, name)
        try:
            path = fd_path(layer.dirfd(parent), name)
        except OSError:
            return
        is_dir = stat.S_ISDIR(st.st_mode)
        other = USER if self.ns is TRUSTED else TRUSTED
        for m in markerinfo.xattr_markers(layer, path, is_dir):
            shown = m.detail.split("=", 1)[0]  # the xattr's name, as markerinfo prints it
            key = os.fsencode(shown)
            if m.kind == "foreign-xattr":
                serious = any(key.endswith(s) for s in (b"override_stat", b"opaque", b"whiteout"))
                self.add(
                    ERROR if serious else WARNING,
                    "foreign-xattr",
                    layer,
                    rel,
                    f"{shown}: {m.effect}",
                )
            elif key.startswith(other.prefix):
                suffix = key[len(other.prefix) :]
                kernel = "without" if other is USER else "with"
                if suffix == b"opaque":
                    # unionfs reads both namespaces; the kernel reads only its own.
                    self.add(
                        ERROR if self.target == "kernel" else WARNING,
                        "other-namespace-xattr",
                        layer,
                        rel,
                        f"{shown} in a stack that keeps its markers in "
                        f"{self.ns.prefix.decode()}*: unionfs honours it, but the kernel overlay "
                        f"{kernel} userxattr ignores it and merges the directories below",
                    )
                    continue
                changes = suffix in (b"redirect", b"metacopy")
                self.add(
                    ERROR if changes else WARNING,
                    "other-namespace-xattr",
                    layer,
                    rel,
                    f"{shown} in a stack that keeps its markers in {self.ns.prefix.decode()}*: "
                    f"the kernel overlay {kernel} userxattr ignores it"
                    + (f" (so the {suffix.decode()} marker has no effect)" if changes else ""),
                )
            elif key == self.ns.prefix + b"redirect":
                try:
                    target = markers.parse_redirect(os.getxattr(path, key, follow_symlinks=False))
                    valid = True
                except OSError:
                    target, valid = None, False
                if not valid:
                    self.add(
                        ERROR,
                        "invalid-redirect",
                        layer,
                        rel,
                        "a redirect xattr that is empty, or relative with a '/', or has an empty "
                        "component: every lookup of this name fails with EINVAL (kernel and "
                        "unionfs alike)",
                    )
                elif self.union.config.redirect == "nofollow":
                    self.add(
                        ERROR,
                        "redirect-not-followed",
                        layer,
                        rel,
                        "a redirect while redirect_dir=nofollow: every lookup of this name fails "
                        "with EPERM (kernel and unionfs alike)",
                    )
                else:
                    where = printable(target or b"")
                    self.add(
                        INFO,
                        "redirect",
                        layer,
                        rel,
                        f"a redirect to {where}: the layers below are asked for that path "
                        "(followed unless redirect_dir=nofollow)",
                    )
            elif key == self.ns.prefix + b"metacopy":
                if self.union.config.metacopy:
                    self.add(
                        INFO,
                        "metacopy",
                        layer,
                        rel,
                        "a metadata-only copy: its data is read from the lower file it came from",
                    )
                else:
                    self.add(
                        ERROR,
                        "metacopy-without-metacopy",
                        layer,
                        rel,
                        "a metadata-only copy-up while metacopy is off: every lookup of it fails "
                        "with EPERM, in unionfs as in the kernel (mount with -o metacopy=on)",
                    )

    # -- the merged view -------------------------------------------------------------

    def _merged_view(self) -> None:
        """Walk the merged tree as the mount does (its listing and its lookups): which
        directory of each layer merges where, and which regular files are shown."""
        union = self.union
        todo = [union.table.root]
        while todo:
            node = todo.pop()
            for place in node.stack:
                self._merged_into.setdefault(place, []).append(node)
            try:
                names = union.names(node)
            except OSError as e:
                self._stack_unreadable(node, e)
                continue
            for name in names:
                try:
                    entry = union.resolve(node, name)
                except OSError as e:
                    self._lookup_failed(node, name, e)
                    continue
                if entry is None:
                    continue
                if stat.S_ISDIR(entry.st.st_mode):
                    todo.append(union.node_for(node, entry))
                    continue
                st = entry.st
                if stat.S_ISREG(st.st_mode) and (not entry.layer.writable or st.st_nlink > 1):
                    self._shown.add((st.st_dev, st.st_ino))
                for place in entry.lowers:  # a metadata-only copy: the file with its data
                    try:
                        lst = place.layer.lstat(*place.split())
                    except OSError as e:
                        self._cannot_read(place.layer, place.split()[0], e)
                        continue
                    if lst is not None and stat.S_ISREG(lst.st_mode):
                        self._shown.add((lst.st_dev, lst.st_ino))

    def _stack_unreadable(self, node: Node, err: OSError) -> None:
        """The merged directory *node* could not be listed: say which of its parts could
        not be read, and leave them all unchecked (what they show is unknown)."""
        found = False
        for place in node.stack:
            if self._list(place.layer, place.path) is None:
                found = True
        if not found:
            self._cannot_read(node.layer, node.place.path, err)
        self._unchecked.update(node.stack)

    def _lookup_failed(self, node: Node, name: bytes, err: OSError) -> None:
        """Looking *name* up in *node* failed. When a part of *node*, or the directory
        of that name in one, could not be read, that is a finding, and the name is left
        unchecked in every part; otherwise the mount fails this lookup too (an invalid
        or refused redirect, a refused metacopy): nothing is shown through the name,
        and the xattr checks say why."""
        denied = False
        for place in node.stack:
            try:
                st = place.layer.lstat(place.path, name)
            except OSError as e:
                self._cannot_read(place.layer, place.path, e)
                denied = True
                continue
            if st is not None and stat.S_ISDIR(st.st_mode):
                # Resolution looks inside a directory too (for the OCI opaque marker).
                denied |= self._list(place.layer, join(place.path, name)) is None
        if denied:
            self._unchecked.update(Place(p.layer, join(p.path, name)) for p in node.stack)

    # -- across layers -------------------------------------------------------------

    def _cross_layer_links(self) -> None:
        for entries in self._inodes.values():
            layers = {la.index for la, _ in entries}
            if len(layers) < 2:
                continue
            upper = any(la.writable for la, _ in entries)
            names = ", ".join(f"{self._name(la)}: {printable(r)}" for la, r in entries)
            for layer, rel in entries:
                self.add(
                    ERROR if upper else WARNING,
                    "cross-layer-hardlink",
                    layer,
                    rel,
                    f"a hard link shared across layers ({names}): "
                    + (
                        "a write through the mount changes the lower layer's file too"
                        if upper
                        else "a change to one layer's file changes the other's, and each "
                        "layer's tarball stores a full copy"
                    ),
                )

    def _wasted(self) -> None:
        """Files that lower layers store and higher layers hide completely."""
        hidden: list[tuple[int, Layer, bytes, str]] = []
        seen: set[tuple[int, int]] = set()
        for layer in self.layers:
            if layer.writable:
                continue
            for rel, st, why in self._hidden_in(layer):
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue  # another name of a file already counted
                seen.add(key)
                hidden.append((st.st_size, layer, rel, why))
        hidden.sort(key=lambda h: -h[0])
        self.report.wasted_files = len(hidden)
        self.report.wasted_bytes = sum(h[0] for h in hidden)
        for size, layer, rel, why in hidden if self.show_all else hidden[:TOP_WASTE]:
            self.add(INFO, "hidden-file", layer, rel, f"{size:,} bytes stored, never shown: {why}")

    show_all = False

    def _hidden_in(self, layer: Layer) -> Iterator[tuple[bytes, os.stat_result, str]]:
        """The regular files of lower *layer* that the merged view does not show, with
        why: each is looked up in the merged directory its directory merges into (found
        by ``_merged_view``, redirects followed), or is below a directory cut off."""
        root = self.union.table.root
        if Place(layer, b"") in self._merged_into:
            todo: list[tuple[bytes, str | None]] = [(b"", None)]
        else:
            cut = root.stack[-1]
            if self._ignored_opaque(cut.layer, cut.path):
                return  # what cuts it off is a marker the target does not read
            todo = [(b"", f"below {layer_name(cut.layer)}'s opaque root directory")]
        while todo:
            rel, why = todo.pop()
            if Place(layer, rel) in self._unchecked:
                continue
            nodes = self._merged_into.get(Place(layer, rel))
            for name, st in self._list(layer, rel) or ():
                if markers.is_oci_name(name) or markers.is_whiteout(st):
                    continue
                child = join(rel, name)
                is_dir = stat.S_ISDIR(st.st_mode)
                if is_dir and Place(layer, child) in self._merged_into:
                    todo.append((child, None))
                    continue
                if not is_dir and (
                    not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in self._shown
                ):
                    continue
                if Place(layer, child) in self._unchecked:
                    continue
                child_why = why or self._why(nodes, layer, name, child, is_dir)
                if child_why is None:
                    continue  # not hidden by the target's rules (see _why)
                if is_dir:
                    todo.append((child, child_why))
                else:
                    yield child, st, child_why

    def _why(
        self, nodes: list[Node] | None, layer: Layer, name: bytes, rel: bytes, is_dir: bool
    ) -> str | None:
        """Why *name* of *layer*'s directory that merges into *nodes* is not shown (at
        *rel* in the layer), by looking it up as the mount does; None when what hides it
        is a marker that the chosen target does not read (for it, the marker hides
        nothing: its own finding says so)."""
        if not nodes:
            return "its directory is not part of the merged view"  # (not reached: see caller)
        node = nodes[0]
        merged = join(node.path, name)
        try:
            comp = resolve_traced(self.union, node, name)
        except OSError as e:
            text = f"its lookup fails: {e.strerror}"
        else:
            entry = comp.entry
            mine = [s for s in comp.steps if s.layer is layer]
            last = comp.steps[-1] if comp.steps else None
            if entry is None or not mine:
                # Resolution stopped above this layer: at a marker, or at what it found.
                if self._ignored(comp, last):
                    return None
                text = self._as_target(last) or (
                    hidden_reason(comp) if entry is None else stopped_by(last)
                )
            elif mine[0].rule == resolution.ABSENT:
                # Looked at for another name: a directory above redirects the lookup.
                above = [s for s in comp.steps if s.rule == resolution.REDIRECT]
                where = layer_name(above[-1].layer) if above else "a layer above"
                text = (
                    f"{where}'s directory has a redirect: the layers below are asked for "
                    "another path, not this one"
                )
            else:
                text = f"hidden by {layer_name(entry.layer)}'s {kind_of(entry.st)}"
        if is_dir:
            return f"cut off at {_show(merged)}: {text}"
        if merged != rel:
            text += f", at {_show(merged)} in the merged view"
        return text

    # -- the target's reading of the markers resolution stopped at -------------------

    def _ignored(self, comp: Component, step: Step | None) -> bool:
        """Whether *step* stopped resolution at a marker that unionfs honours and the
        chosen target does not read: the kernel overlay no OCI marker and no opaque
        xattr of the other namespace, an OCI runtime no opaque xattr."""
        if step is None or self.target == "unionfs":
            return False
        if step.rule in (resolution.OCI_WHITEOUT, resolution.RESERVED):
            return self.target == "kernel"
        if step.rule == resolution.OPAQUE and comp.entry is not None:
            entry = comp.entry
            for place in (entry.place, *entry.lowers):
                if place.layer is step.layer:
                    return self._ignored_opaque(place.layer, place.path)
        return False

    def _ignored_opaque(self, layer: Layer, path: bytes) -> bool:
        """Whether directory *path* of *layer* is opaque only by markers the target does
        not read."""
        if self.target == "unionfs":
            return False
        formats = {m.format for m in markerinfo.opaque_markers(layer, path)}
        if self.target == "kernel":
            return ("kernel" if self.ns is TRUSTED else "kernel (userxattr)") not in formats
        return "oci" not in formats

    def _as_target(self, step: Step | None) -> str:
        """What hides the name in the target's reading, where that is another thing
        than in unionfs's ("" where it is the same)."""
        if self.target == "oci" and step is not None and step.rule == resolution.WHITEOUT:
            return (
                f"hidden by {layer_name(step.layer)}'s character device 0/0 (a kernel "
                "whiteout, which an OCI runtime unpacks as a device: it replaces the name "
                "below all the same)"
            )
        return ""


# -- setup checks and the command --------------------------------------------------------


def _show(path: bytes) -> str:
    """A path in the merged view, as one line of text (the root as ``/``)."""
    return printable(path) if path else "/"


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_workdir(upper: Path, work: Path, layer: Layer, report: Report) -> None:
    def add(severity: str, code: str, message: str, rel: bytes = b"") -> None:
        report.findings.append(Finding(severity, code, layer.index, work, rel, message))

    if _inside(work, upper) or _inside(upper, work):
        add(
            ERROR,
            "workdir-inside-upper",
            f"the workdir and the upper {printable(os.fspath(upper))} are nested: the kernel refuses to mount, and so does unionfs",
        )
    if os.stat(work).st_dev != os.stat(upper).st_dev:
        add(
            ERROR,
            "workdir-other-filesystem",
            f"the workdir is on another filesystem than the upper {printable(os.fspath(upper))}: the kernel refuses to mount (copy-up renames across them), and so does unionfs",
        )
    staging = work / "work"
    try:
        names = os.listdir(os.fsencode(staging))
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        add(
            WARNING,
            UNREADABLE,
            f"could not read this directory of the workdir: {e.strerror or e}; not checked",
            b"work",
        )
        return
    left = [n for n in names if not _shared_whiteout(staging, n)]
    if left:
        add(
            INFO,
            "workdir-leftovers",
            f"{len(left)} entries left in work/ by an interrupted change: removed at the next mount",
        )


def _shared_whiteout(staging: Path, name: bytes) -> bool:
    """Whether *name* in WORKDIR/work is the whiteout the overlay links new ones to."""
    if not _SHARED_WHITEOUT.fullmatch(name):
        return False
    try:
        return markers.is_whiteout(os.lstat(os.path.join(os.fsencode(staging), name)))
    except OSError:
        return False


def _directory(kind: str, raw: str) -> Path:
    return directory_arg(raw, kind)


def run(
    layers: list[str],
    upper: str | None = None,
    work: str | None = None,
    target: str = "unionfs",
    userxattr: bool = False,
    as_json: bool = False,
    show_all: bool = False,
    redirect: str = "follow",
    metacopy: bool = False,
) -> int:
    """Check the layers and print the findings: the exit status is 2 when a part of them
    could not be read (the check is incomplete), else 1 when a finding is an error."""
    lowers = [_directory("layer", p) for p in layers]
    up = _directory("upper", upper) if upper is not None else None
    wk = _directory("workdir", work) if work is not None else None
    if wk is not None and up is None:
        raise UsageError("--work goes with --upper")
    dirs = [*([up] if up else []), *lowers]
    for i, a in enumerate(dirs):
        for b in dirs[i + 1 :]:
            if _inside(a, b) or _inside(b, a):
                raise UsageError(f"layers {a} and {b} overlap")
    ns = USER if userxattr else TRUSTED
    try:
        union = Union(
            UnionConfig(
                lowers=lowers,
                upper=up,
                readonly=True,
                xattrs=ns,
                redirect=redirect,
                metacopy=metacopy,
            ),
            inspect_only=True,
        )
    except OSError as e:
        raise UsageError(f"cannot open the layers: {e}") from None
    try:
        checker = Checker(union, target, ns)
        checker.show_all = show_all
        report = checker.run()
        if up is not None and wk is not None:
            check_workdir(up, wk, union.layers[0], report)
    finally:
        union.close()
    unread = report.unreadable
    summary = (
        f"{report.entries:,} entries in {len(union.layers)} layers: {report.errors} errors, "
        f"{sum(f.severity == WARNING for f in report.findings)} warnings; "
        f"hidden by higher layers: {report.wasted_bytes:,} bytes ({human_size(report.wasted_bytes)}) "
        f"in {report.wasted_files:,} files"
        + (f"; {unread:,} not checked (could not be read)" if unread else "")
    )
    for f in report.findings:
        print(json.dumps(f.as_json()) if as_json else f.line())
    if as_json:
        print(json.dumps({"summary": summary, "errors": report.errors, "unreadable": unread,
                          "wasted_bytes": report.wasted_bytes, "wasted_files": report.wasted_files}))  # fmt: skip
    else:
        print(summary)
    if unread:
        sys.stdout.flush()
        print(
            f"unionfs check: the check is incomplete: {unread:,} could not be read "
            "(see the unreadable findings)",
            file=sys.stderr,
        )
        return 2
    return 1 if report.errors else 0
