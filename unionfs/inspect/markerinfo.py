"""What the markers in one layer are, in which format, and what they do there.

Reading only, and only through ``unionfs.overlay.markers`` (which names every
marker and reads whiteouts and opaque xattrs) and ``Layer``. The private
xattrs other than the opaque one (redirect, metacopy, origin, ...) are listed
by their namespace's prefix, so a marker the core learns to write later shows
up here with no change.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from unionfs.inspect.names import printable as printable_name
from unionfs.overlay import markers
from unionfs.overlay.layers import NOT_THERE, Layer
from unionfs.overlay.markers import TRUSTED, USER, XattrNamespace
from unionfs.overlay.nodes import Node
from unionfs.overlay.syscalls import fd_path, name_to_handle
from unionfs.overlay.union import Union, join

# What each private xattr of the kernel overlay means (the part after the prefix).
PRIVATE_MEANINGS = {
    b"opaque": "opaque directory",
    b"redirect": "redirect_dir: the path of the directory's lower part",
    b"metacopy": "metacopy: only the metadata was copied up; the data is in a lower layer",
    b"origin": "copy-up origin: the file handle of the lower inode",
    b"impure": "the directory holds copied-up or moved entries",
    b"nlink": "hard-link count bookkeeping (index=on)",
    b"upper": "index entry: the file handle of the upper inode",
    b"uuid": "the filesystem's uuid (uuid=on)",
    b"protattr": "immutable/append-only flags kept for the overlay",
    b"whiteout": "an xattr whiteout (xwhiteouts)",
    b"xwhiteouts": "the directory holds xattr whiteouts",
}

# Private xattrs of other tools, which unionfs and the kernel ignore.
FOREIGN_PREFIXES = {
    b"user.fuseoverlayfs.": "fuse-overlayfs",
    b"user.containers.": "containers-storage (rootless)",
}
FOREIGN_EFFECTS = {
    b"override_stat": "shows this owner and mode instead of the file's own",
    b"opaque": "treats the directory as opaque",
    b"origin": "records the copy-up origin",
    b"whiteout": "treats the entry as a whiteout",
}


@dataclass
class Marker:
    kind: str  # whiteout, opaque, private-xattr, foreign-xattr, reserved-name
    format: str  # kernel, kernel (userxattr), oci, or the tool that wrote it
    detail: str  # the marker as stored
    effect: str  # what it does here


def xattrs(path: bytes, follow: bool = False) -> dict[bytes, bytes]:
    """Every xattr of *path*, each read exactly by its name."""
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError:
        return {}
    out: dict[bytes, bytes] = {}
    for name in names:
        bname = os.fsencode(name)
        try:
            out[bname] = os.getxattr(path, bname, follow_symlinks=follow)
        except OSError:
            continue
    return out


def printable(value: bytes) -> str:
    if value and all(32 <= b < 127 for b in value):
        return value.decode()
    return "0x" + value.hex()


def namespace_of(layer: Layer) -> XattrNamespace:
    return layer.xattrs


def xattr_markers(
    layer: Layer, path: bytes, is_dir: bool, union: Union | None = None
) -> list[Marker]:
    """The overlay's private xattrs (either namespace) and other tools' on an entry;
    with *union*, a redirect or metacopy marker says what that stack does with it."""
    ours = namespace_of(layer)
    other = markers.other(ours)
    found = xattrs(path)
    out: list[Marker] = []
    for name, value in sorted(found.items()):
        shown = f"{printable_name(name)}={printable(value)}"
        for ns, fmt in ((ours, "kernel"), (other, "kernel")):
            if name.startswith(ns.prefix):
                key = name[len(ns.prefix) :]
                if ns is USER:
                    fmt = "kernel (userxattr)"
                meaning = PRIVATE_MEANINGS.get(key, "an overlay private xattr")
                if key == b"opaque" and ns is not ours:
                    honoured = is_dir and value == b"y" and ours.opaque not in found
                    kernel = "without" if ns is USER else "with"
                    effect = (
                        "honoured by unionfs, which reads both namespaces"
                        if honoured
                        else "no effect"
                    ) + f"; the kernel overlay {kernel} userxattr ignores it"
                elif ns is not ours:
                    effect = f"ignored: this stack keeps its markers in {ours.prefix.decode()}*"
                elif key == b"opaque":
                    effect = "honoured" if is_dir and value == b"y" else "not y: no effect"
                elif key == b"redirect":
                    effect = _redirect_effect(value, union)
                elif key == b"metacopy":
                    effect = (
                        "read from the lower file it came from (a lookup fails with EPERM "
                        "unless mounted with metacopy=on, in unionfs as in the kernel)"
                    )
                    if union is not None and not union.config.metacopy:
                        effect = (
                            "this stack is not mounted with metacopy=on: every lookup of it "
                            "fails with EPERM, in unionfs as in the kernel"
                        )
                else:
                    effect = "bookkeeping; no effect on what the mount shows"
                kind = "opaque" if key == b"opaque" else "private-xattr"
                out.append(Marker(kind, fmt, shown, f"{meaning}; {effect}"))
                break
        else:
            for prefix, tool in FOREIGN_PREFIXES.items():
                if name.startswith(prefix):
                    what = FOREIGN_EFFECTS.get(name[len(prefix) :], "its private bookkeeping")
                    out.append(
                        Marker(
                            "foreign-xattr",
                            tool,
                            shown,
                            f"{tool} {what}; unionfs and the kernel ignore it",
                        )
                    )
    return out


def _redirect_effect(value: bytes, union: Union | None) -> str:
    """What a redirect xattr does in this stack (its value read by the core's parser)."""
    try:
        markers.parse_redirect(value)
    except OSError:
        return (
            "invalid (empty, relative with a '/', or with an empty component): every "
            "lookup of this name fails with EINVAL, in unionfs as in the kernel"
        )
    if union is not None and union.config.redirect == "nofollow":
        return (
            "not followed: this stack is mounted with redirect_dir=nofollow, so every "
            "lookup of this name fails with EPERM, in unionfs as in the kernel"
        )
    return (
        "followed by unionfs as by the kernel: the layers below are asked for "
        "this path instead (a lookup fails with EPERM under redirect_dir=nofollow)"
    )


def opaque_markers(layer: Layer, path: bytes) -> list[Marker]:
    """The opaque markers of directory *path* in *layer*, in either format."""
    out: list[Marker] = []
    try:
        fd = layer.dirfd(path)
    except (FileNotFoundError, OSError):
        return out
    found = xattrs(fd_path(fd), follow=True)
    for ns in (TRUSTED, USER):
        if found.get(ns.opaque) == b"y":
            fmt = "kernel" if ns is TRUSTED else "kernel (userxattr)"
            out.append(Marker("opaque", fmt, f"{ns.opaque.decode()}=y", ""))
    if layer.lstat(path, markers.OCI_OPAQUE) is not None:
        out.append(Marker("opaque", "oci", f"{markers.OCI_OPAQUE.decode()} inside", ""))
    return out


def markers_at(
    layer: Layer,
    parent: bytes,
    name: bytes,
    st: os.stat_result | None,
    union: Union,
    bottom: bool,
) -> list[Marker]:
    """Every marker *layer* has for the entry *parent*/*name*, with what it does."""
    out: list[Marker] = []
    path = join(parent, name)
    noop = "no effect: the bottom layer has nothing below to hide" if bottom else ""
    if st is not None and markers.is_whiteout(st):
        out.append(
            Marker(
                "whiteout",
                "kernel",
                "character device 0/0",
                noop or "hides the name in every layer below",
            )
        )
    if len(name) <= markers.OCI_NAME_MAX and not markers.is_oci_name(name):
        oci = layer.lstat(parent, markers.oci_whiteout_name(name))
        if oci is not None:
            if layer.writable:
                effect = "none: the upper is read in the kernel's format, where it is a plain file"
            elif st is not None:
                effect = "none here: this layer has the name itself (the .wh. file hides only the layers below, which this entry hides anyway)"
            else:
                effect = noop or "hides the name in every layer below"
            out.append(
                Marker("whiteout", "oci", printable_name(markers.oci_whiteout_name(name)), effect)
            )
    if markers.is_oci_name(name) and st is not None:
        if layer.writable:
            effect = "shown as a plain entry: the upper is in the kernel's format"
        elif name == markers.OCI_OPAQUE:
            effect = "makes its directory opaque; never shown"
        else:
            effect = "an OCI whiteout: never shown; hides its name below"
        out.append(Marker("reserved-name", "oci", printable_name(name), effect))
    if st is None:
        return out
    is_dir = stat.S_ISDIR(st.st_mode)
    if is_dir:
        for m in opaque_markers(layer, path):
            if m.format == "oci":
                m.effect = (
                    "ignored: the upper is read in the kernel's format"
                    if layer.writable
                    else noop or "nothing below merges into this directory"
                )
                out.append(m)
    try:
        real = fd_path(layer.dirfd(parent), name)
    except OSError:
        return out
    for m in xattr_markers(layer, real, is_dir, union):
        if m.kind == "opaque" and bottom and "honoured" in m.effect:
            m.effect = noop
        out.append(m)
    return out


# -- the kernel's copy-up origin -----------------------------------------------------

_OVL_FB_HEADER = 21  # version, magic, len, flags, type, 16-byte uuid
_OVL_FB_MAGIC = 0xFB


def origin_matches(
    union: Union, node: Node, lower: Layer, parent: bytes, name: bytes
) -> bool | None:
    """Whether the upper entry's origin xattr (written by the kernel's copy-up) is the
    handle of *lower*'s *parent*/*name*; None when it has no origin xattr."""
    upper = node.layer
    ns = namespace_of(upper)
    try:
        real = fd_path(upper.dirfd(node.parent.path if node.parent else b""), node.name)
        value = os.getxattr(real, ns.prefix + b"origin", follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, *NOT_THERE):
            return None
        raise
    if len(value) < _OVL_FB_HEADER or value[1] != _OVL_FB_MAGIC:
        return False
    try:
        htype, hbytes = name_to_handle(lower.dirfd(parent), name)
    except OSError:
        return None
    return value[4] == htype and value[_OVL_FB_HEADER : value[2]] == hbytes
