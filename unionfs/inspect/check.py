"""``unionfs check LAYER... [--upper U]``: a linter for layer directories.

One line per finding: the path on disk, how serious it is, and what the
kernel overlay, an OCI runtime or unionfs would do with it. ``error``: it
would change the merged view unexpectedly (the exit status is then 1);
``warning``: it does nothing, or breaks only a later use of the layer;
``info``: worth knowing (space that higher layers hide, as dive reports it).

Markers are recognised through ``unionfs.overlay.markers`` and the hidden
files through the overlay's own resolution (``Union.resolve``), so the
linter and the mount agree on what each layer contributes.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from unionfs.errors import UsageError
from unionfs.inspect import markerinfo
from unionfs.inspect.explain import hidden_reason, resolve_traced, stopped_by
from unionfs.options import human_size
from unionfs.overlay import markers
from unionfs.overlay.layers import Layer
from unionfs.overlay.markers import TRUSTED, USER, XattrNamespace
from unionfs.overlay.nodes import Node, Place
from unionfs.overlay.syscalls import fd_path
from unionfs.overlay.union import Union, UnionConfig, join

ERROR, WARNING, INFO = "error", "warning", "info"
TARGETS = ("unionfs", "kernel", "oci")
TOP_WASTE = 10  # hidden files listed by size without --all


@dataclass
class Finding:
    severity: str
    code: str
    layer: int
    root: Path
    rel: bytes
    message: str

    @property
    def path(self) -> str:
        return os.fsdecode(
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
            "relpath": os.fsdecode(self.rel),
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
        self._shown_links: set[tuple[int, int]] = set()

    def add(self, severity: str, code: str, layer: Layer, rel: bytes, message: str) -> None:
        self.report.findings.append(Finding(severity, code, layer.index, layer.path, rel, message))

    def _name(self, layer: Layer) -> str:
        return "the upper" if layer.writable else f"layer {layer.index}"

    # -- walking each layer ---------------------------------------------------------

    def run(self) -> Report:
        for layer in self.layers:
            self._walk(layer, b"")
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

    def _walk(self, layer: Layer, rel: bytes) -> None:
        for name, st in sorted(_entries(layer, rel)):
            child = join(rel, name)
            self.report.entries += 1
            if self._progress and self.report.entries % 2000 == 0:
                sys.stderr.write(f"\rchecked {self.report.entries:,} entries")
                sys.stderr.flush()
            self._entry(layer, rel, name, st)
            if stat.S_ISDIR(st.st_mode):
                self._walk(layer, child)

    def _below_has(self, layer: Layer, parent: bytes, name: bytes, want_dir: bool = False) -> bool:
        """Whether a layer below *layer* has *parent*/*name* (a directory, with *want_dir*)."""
        for other in self.layers[layer.index + 1 :]:
            st = other.lstat(parent, name)
            if (
                st is not None
                and not markers.is_whiteout(st)
                and (not want_dir or stat.S_ISDIR(st.st_mode))
            ):
                return True
        return False

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
                f"deleting {os.fsdecode(name)} (unionfs convert --to oci rewrites it)",
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
                f"hides nothing: no layer below has {os.fsdecode(rel)}",
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
                f"unionfs and the kernel show it as a file named {os.fsdecode(name)}"
                + ("" if opaque else " and delete nothing"),
            )
            return
        self._formats.setdefault(layer.index, set()).add("oci")
        if self.target == "kernel":
            effect = (
                "does not make the directory opaque"
                if opaque
                else f"does not delete {os.fsdecode(deleted or b'')} below"
            )
            self.add(
                ERROR,
                "oci-marker-for-kernel",
                layer,
                rel,
                f"an OCI {what} in a layer meant for the kernel overlay: the kernel shows it as "
                f"a file named {os.fsdecode(name)} and {effect} (unionfs convert --to kernel)",
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
                    WARNING,
                    "orphan-opaque",
                    layer,
                    rel,
                    "opaque, but no layer below has this directory: it hides nothing",
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
                f"this layer has both {os.fsdecode(deleted)}/ and its whiteout: an OCI runtime "
                "deletes the lower directory and adds this one (as if opaque); unionfs and "
                "fuse-overlayfs merge it with the directories below",
            )
        elif own is not None:
            self.add(
                WARNING,
                "redundant-whiteout",
                layer,
                rel,
                f"this layer has {os.fsdecode(deleted)} itself, which hides the layers below "
                "anyway: the whiteout does nothing",
            )
        elif not self._below_has(layer, parent, deleted):
            self.add(
                WARNING,
                "orphan-whiteout",
                layer,
                rel,
                f"hides nothing: no layer below has {os.fsdecode(join(parent, deleted))}",
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
        elif not self._below_has(layer, parent, name, want_dir=True):
            self.add(
                WARNING,
                "orphan-opaque",
                layer,
                rel,
                "opaque, but no layer below has this directory: it hides nothing",
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
            key = m.detail.split("=", 1)[0].encode()
            if m.kind == "foreign-xattr":
                serious = any(key.endswith(s) for s in (b"override_stat", b"opaque", b"whiteout"))
                self.add(
                    ERROR if serious else WARNING,
                    "foreign-xattr",
                    layer,
                    rel,
                    f"{m.detail.split('=', 1)[0]}: {m.effect}",
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
                        f"{key.decode()} in a stack that keeps its markers in "
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
                    f"{key.decode()} in a stack that keeps its markers in {self.ns.prefix.decode()}*: "
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
                    shown = os.fsdecode(target or b"")
                    self.add(
                        INFO,
                        "redirect",
                        layer,
                        rel,
                        f"a redirect to {shown}: the layers below are asked for that path "
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

    # -- across layers -------------------------------------------------------------

    def _cross_layer_links(self) -> None:
        for entries in self._inodes.values():
            layers = {la.index for la, _ in entries}
            if len(layers) < 2:
                continue
            upper = any(la.writable for la, _ in entries)
            names = ", ".join(f"{self._name(la)}: {os.fsdecode(r)}" for la, r in entries)
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
        hidden: list[tuple[int, Layer, bytes, str, os.stat_result]] = []
        seen: set[tuple[int, int]] = set()
        for layer in self.layers:
            if layer.writable:
                continue
            for rel, st, why in self._hidden_in(layer):
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue  # another name of a file already counted
                seen.add(key)
                hidden.append((st.st_size, layer, rel, why, st))
        # A hidden name of a file that another name shows wastes nothing.
        hidden = [h for h in hidden if (h[4].st_dev, h[4].st_ino) not in self._shown_links]
        hidden.sort(key=lambda h: -h[0])
        self.report.wasted_files = len(hidden)
        self.report.wasted_bytes = sum(h[0] for h in hidden)
        for size, layer, rel, why, _ in hidden if self.show_all else hidden[:TOP_WASTE]:
            self.add(INFO, "hidden-file", layer, rel, f"{size:,} bytes stored, never shown: {why}")

    show_all = False

    def _hidden_in(self, layer: Layer) -> Iterator[tuple[bytes, os.stat_result, str]]:
        union = self.union
        root = union.table.root
        if any(p.layer is layer for p in root.stack):
            todo: list[tuple[bytes, Node | None, str]] = [(b"", root, "")]
        else:
            todo = [(b"", None, "a higher layer's root directory is opaque")]
        while todo:
            rel, node, why = todo.pop()
            for name, st in _entries(layer, rel):
                if markers.is_oci_name(name):
                    continue
                if markers.is_whiteout(st):
                    continue
                child = join(rel, name)
                if node is None:
                    child_node, child_why = None, why
                else:
                    try:
                        comp = resolve_traced(union, node, name)  # the mount's own resolution
                    except OSError as e:
                        # The mount fails this lookup too (a redirect or metacopy refused):
                        # nothing below is shown through this name; the xattr checks say why.
                        if stat.S_ISDIR(st.st_mode):
                            todo.append((child, None, f"its lookup fails: {e.strerror}"))
                        continue
                    entry = comp.entry
                    if entry is not None and Place(layer, child) in (entry.place, *entry.lowers):
                        child_node = (
                            union.node_for(node, entry) if stat.S_ISDIR(st.st_mode) else node
                        )
                        child_why = ""
                        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                            self._shown_links.add((st.st_dev, st.st_ino))
                    else:
                        child_node = None
                        child_why = (
                            hidden_reason(comp)
                            if entry is None
                            else stopped_by(comp.steps[-1] if comp.steps else None)
                        )
                        if stat.S_ISDIR(st.st_mode):
                            child_why = f"cut off at {os.fsdecode(child)}: {child_why}"
                if stat.S_ISDIR(st.st_mode):
                    todo.append((child, child_node, child_why))
                elif stat.S_ISREG(st.st_mode) and child_node is None:
                    yield child, st, child_why


def _entries(layer: Layer, rel: bytes) -> list[tuple[bytes, os.stat_result]]:
    """The names in directory *rel* of *layer* and their lstat (nothing if unreadable)."""
    try:
        fd = layer.open_dir(rel)
    except OSError:
        return []
    out = []
    try:
        with os.scandir(fd) as it:
            for dent in it:
                try:
                    out.append((os.fsencode(dent.name), dent.stat(follow_symlinks=False)))
                except OSError:
                    continue
    finally:
        os.close(fd)
    return out


# -- setup checks and the command --------------------------------------------------------


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_workdir(upper: Path, work: Path, layer: Layer, report: Report) -> None:
    def add(severity: str, code: str, message: str) -> None:
        report.findings.append(Finding(severity, code, layer.index, work, b"", message))

    if _inside(work, upper) or _inside(upper, work):
        add(
            ERROR,
            "workdir-inside-upper",
            f"the workdir and the upper {upper} are nested: the kernel refuses to mount, and so does unionfs",
        )
    if os.stat(work).st_dev != os.stat(upper).st_dev:
        add(
            ERROR,
            "workdir-other-filesystem",
            f"the workdir is on another filesystem than the upper {upper}: the kernel refuses to mount (copy-up renames across them), and so does unionfs",
        )
    staging = work / "work"
    if staging.is_dir():
        left = [n for n in os.listdir(staging) if n != "#whiteout"]
        if left:
            add(
                INFO,
                "workdir-leftovers",
                f"{len(left)} entries left in work/ by an interrupted change: removed at the next mount",
            )


def _directory(kind: str, raw: str) -> Path:
    path = Path(os.path.realpath(raw))
    if not path.is_dir():
        raise UsageError(f"{kind} {raw}: not a directory")
    return path


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
            )
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
    summary = (
        f"{report.entries:,} entries in {len(union.layers)} layers: {report.errors} errors, "
        f"{sum(f.severity == WARNING for f in report.findings)} warnings; "
        f"hidden by higher layers: {report.wasted_bytes:,} bytes ({human_size(report.wasted_bytes)}) "
        f"in {report.wasted_files:,} files"
    )
    for f in report.findings:
        print(json.dumps(f.as_json()) if as_json else f.line())
    if as_json:
        print(json.dumps({"summary": summary, "errors": report.errors,
                          "wasted_bytes": report.wasted_bytes, "wasted_files": report.wasted_files}))  # fmt: skip
    else:
        print(summary)
    return 1 if report.errors else 0
