"""``unionfs explain PATH --op OP``: what the mount will do with a change, and why.

Each prediction runs the mount's own checks (``namespace.check_rename``,
``check_remove``, ``check_create``, ``copyup.pending_copy_ups``,
``files.check_setxattr``) on the layers, then describes the change those
checks let through with the core's own helpers (``lower_has_name``: will a
whiteout be left; ``pending_copy_ups``: what will be copied up). Nothing is
changed. What the kernel's VFS checks before a request reaches the overlay
(permissions, a name over 255 bytes) is not predicted, except the checks of the
arguments themselves (a negative size, contradictory rename flags: EINVAL) and
the walk to the path: ``write``, ``truncate``, ``chmod``, ``chown``, ``utimes``
and ``setxattr`` follow a symlink, as open(2), chmod(2) and the rest do.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from unionfs.errors import UsageError
from unionfs.inspect.names import brief, printable
from unionfs.overlay import copyup, files, namespace
from unionfs.overlay.events import Refused, errno_name
from unionfs.overlay.markers import is_whiteout
from unionfs.overlay.nodes import Node
from unionfs.overlay.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE
from unionfs.overlay.union import Union, join

OPS = (
    "rename",
    "link",
    "unlink",
    "rmdir",
    "create",
    "mkdir",
    "symlink",
    "write",
    "truncate",
    "chmod",
    "chown",
    "utimes",
    "setxattr",
)
NEEDS_TO = ("rename", "link")
# The changes whose system calls follow a symlink at PATH (open(2), truncate(2),
# chmod(2), chown(2), utimensat(2) without AT_SYMLINK_NOFOLLOW, setxattr(2)).
FOLLOWS = ("write", "truncate", "chmod", "chown", "utimes", "setxattr")
MAX_OFF_T = (1 << 63) - 1  # truncate(2)'s length is an off_t
XATTR_NAME_MAX = 255
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
MAX_SYMLINKS = 40  # the kernel's limit on symlinks followed in one walk (ELOOP)


@dataclass
class Prediction:
    op: str
    path: bytes
    to: bytes | None = None
    errno: str | None = None  # None: the change goes through
    why: str = ""
    by_overlay: bool = False  # refused by an overlay rule (not by the VFS's usual checks)
    effects: list[str] = field(default_factory=list)
    copy_up_bytes: int = 0
    follows: list[str] = field(default_factory=list)  # the symlinks followed to the target

    def as_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "path": printable(self.path),
            "to": printable(self.to) if self.to is not None else None,
            "result": self.errno or "ok",
            "why": self.why,
            "overlay_rule": self.by_overlay,
            "effects": self.effects,
            "copy_up_bytes": self.copy_up_bytes,
        }


def _lookup_dir(union: Union, relpath: bytes) -> Node:
    """The node of directory *relpath*, as the VFS walks to it (ENOENT/ENOTDIR)."""
    node = union.table.root
    for name in [p for p in relpath.split(b"/") if p]:
        found = union.lookup(node, name)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "no such directory", join(node.path, name))
        node = found[0]
        if not node.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", node.path)
    return node


def _split(relpath: bytes) -> tuple[bytes, bytes]:
    parent, _, name = relpath.rpartition(b"/")
    return parent, name


def _node(union: Union, relpath: bytes) -> Node:
    parent, name = _split(relpath)
    pnode = _lookup_dir(union, parent)
    if not name:
        return pnode
    found = union.lookup(pnode, name)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, "no such entry", relpath)
    return found[0]


def _layer(union: Union, node: Node) -> str:
    return "the upper" if node.layer.writable else f"layer {node.layer.index}"


def _copy_ups(
    union: Union,
    node: Node,
    pred: Prediction,
    why: str,
    size: int | None = None,
    data: bool = True,
) -> None:
    """Describe what ``copy_up(node, size, data)`` will copy (parents first)."""
    if data and node.metacopy:
        st = union.stat(node)
        nbytes = st.st_size if size is None else min(size, st.st_size)
        pred.copy_up_bytes += nbytes
        pred.effects.append(
            f"copies the data of the metadata-only copy {printable(node.path)} up: "
            f"{nbytes:,} bytes; {why}"
        )
    for n in copyup.pending_copy_ups(union, node):
        st = union.stat(n)
        if n is node and not data and union.config.metacopy and stat.S_ISREG(st.st_mode):
            what = "its metadata only (metacopy=on)"
        elif stat.S_ISREG(st.st_mode):
            nbytes = st.st_size if n is not node or size is None else min(size, st.st_size)
            pred.copy_up_bytes += nbytes
            what = f"{nbytes:,} bytes of data"
        elif stat.S_ISDIR(st.st_mode):
            what = "a directory: its metadata only"
        else:
            what = "metadata"
        if n is node:
            pred.effects.append(
                f"copies up {printable(n.path)} from {_layer(union, n)}: {what}; {why}"
            )
        else:
            pred.effects.append(
                f"copies up {printable(n.path)} from {_layer(union, n)}: {what} "
                f"(a parent of {printable(node.path)}, which the upper needs first)"
            )


def predict(
    union: Union,
    op: str,
    relpath: bytes,
    to: bytes | None = None,
    flags: int = 0,
    xattr: bytes = b"user.x",
    size: int = 0,
    mountpoint: bytes | None = None,
) -> Prediction:
    """What *op* on *relpath* (below the merged root, as written) would do. A symlink's
    absolute target is taken as a path on the live mount at *mountpoint*, or with no
    mount as one below the merged root (a container's root)."""
    relpath, to = relpath.lstrip(b"/"), to.lstrip(b"/") if to is not None else None
    # A change of a name needs one; the others act on what the path reaches ("d/.": d).
    for given in (relpath, to) if op not in FOLLOWS else (to,):
        if given is not None and given.rstrip(b"/").rpartition(b"/")[2] in (b"", b".", b".."):
            raise UsageError(f"--op {op}: {brief(given)} does not end in a name (not . or ..)")
    pred = Prediction(op, relpath, to)
    try:
        # The system call's own checks of its arguments come before any lookup.
        if op == "truncate" and size < 0:
            raise OSError(errno.EINVAL, f"a negative size ({size:,})")
        if op == "truncate" and size > MAX_OFF_T:
            raise UsageError(f"--size {size:,}: over the largest file size, {MAX_OFF_T:,} bytes")
        if op == "setxattr" and not 0 < len(xattr) <= XATTR_NAME_MAX:
            # The VFS copies the name in before it looks up the path.
            raise OSError(errno.ERANGE, f"an xattr name of {len(xattr)} bytes (1 to 255)")
        if flags & RENAME_EXCHANGE and flags & RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "RENAME_EXCHANGE and RENAME_NOREPLACE together")
        _predict(union, pred, op, relpath, to, flags, xattr, size, mountpoint)
    except OSError as e:
        pred.errno = errno_name(e.errno)
        pred.why = e.strerror or ""
        if e.errno in (errno.ENOENT, errno.ENOTDIR) and e.filename:
            pred.why += f": {brief(os.fsencode(e.filename))}"
        pred.by_overlay = isinstance(e, Refused)
        pred.effects = []
        pred.copy_up_bytes = 0
    if pred.follows:
        followed = "; ".join(pred.follows)
        if pred.errno is None:
            pred.effects.insert(0, f"follows {followed}: {op} changes the target")
        else:
            pred.why = f"{pred.why} (it follows {followed})"
    return pred


def _follow(
    union: Union, pred: Prediction, node: Node, relpath: bytes, mountpoint: bytes | None
) -> tuple[Node, bytes]:
    """The node a system call that follows symlinks reaches from *node* (at *relpath*)."""
    for _ in range(MAX_SYMLINKS):
        if node.kind != stat.S_IFLNK:
            return node, relpath
        target = union.readlink(node)
        pred.follows.append(f"the symlink {printable(relpath)} to {printable(target)}")
        if target.startswith(b"/"):
            if mountpoint is None:
                relpath = target.lstrip(b"/")  # the merged view as a root (a container's)
            else:
                mnt = mountpoint.rstrip(b"/")
                if target != mnt and not target.startswith(mnt + b"/"):
                    raise UsageError(
                        f"{brief(pred.path)}: --op {pred.op} follows the symlink to "
                        f"{brief(target)}, outside the mount: not the mount's to predict"
                    )
                relpath = target[len(mnt) :].lstrip(b"/")
        else:
            relpath = join(relpath.rpartition(b"/")[0], target)
        node = _node(union, relpath) if relpath.strip(b"/") else union.table.root
    raise OSError(errno.ELOOP, f"more than {MAX_SYMLINKS} symlinks", relpath)


def _predict(
    union: Union,
    pred: Prediction,
    op: str,
    relpath: bytes,
    to: bytes | None,
    flags: int,
    xattr: bytes,
    size: int,
    mountpoint: bytes | None,
) -> None:
    # A trailing "/" asks for a directory: one that exists must be one (mkdir makes it).
    want_dir = relpath.endswith(b"/") or (op == "rename" and to is not None and to.endswith(b"/"))
    relpath = relpath.rstrip(b"/")
    if to is not None:
        to = to.rstrip(b"/")
    if want_dir and op != "mkdir":
        found = _node(union, relpath)
        if op in FOLLOWS:
            found, _ = _follow(union, Prediction(op, relpath), found, relpath, mountpoint)
        if not found.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", relpath)
    parent_path, name = _split(relpath)
    if op == "rename":
        assert to is not None
        _rename(union, pred, relpath, to, flags)
    elif op in ("unlink", "rmdir"):
        parent = _lookup_dir(union, parent_path)
        node, _ = namespace.check_remove(union, parent, name, want_dir=op == "rmdir")
        _copy_ups(union, parent, pred, "the upper needs the parent to change it")
        if not node.layer.writable or union.lower_has_name(parent, name):
            pred.effects.append(
                f"leaves a whiteout at {printable(relpath)} in the upper: a lower layer has the name"
            )
        else:
            pred.effects.append(f"removes {printable(relpath)} from the upper; nothing below shows")
    elif op in ("create", "mkdir", "symlink"):
        parent = _lookup_dir(union, parent_path)
        namespace.check_create(union, parent, name)
        _new_name(union, pred, parent, name, op == "mkdir")
    elif op == "link":
        assert to is not None
        node = _node(union, relpath)
        dparent_path, dname = _split(to)
        dparent = _lookup_dir(union, dparent_path)
        namespace.check_create(union, dparent, dname)
        if node.is_dir:
            raise PermissionError(errno.EPERM, "hard links to directories are not allowed", relpath)
        _copy_ups(union, node, pred, "both names must share the upper inode", data=False)
        _new_name(union, pred, dparent, dname, False)
    elif op == "setxattr":
        node, _ = _follow(union, pred, _node(union, relpath), relpath, mountpoint)
        files.check_setxattr(union, xattr)
        _copy_ups(union, node, pred, f"the xattr {printable(xattr)} is set on the upper copy")
        if not xattr.startswith(XATTR_NAMESPACES):
            # Passed on as it is (by FUSE, as by the kernel overlay) to the upper
            # filesystem, which knows no such namespace: the copy-up stays.
            raise OSError(
                errno.EOPNOTSUPP,
                f"the upper filesystem has no xattr namespace for {printable(xattr)} (the "
                "copy-up made first stays, as on the kernel overlay)",
            )
    else:  # write, truncate, chmod, chown, utimes
        node, relpath = _follow(union, pred, _node(union, relpath), relpath, mountpoint)
        copyup.check_copy_up(union)
        if op == "write" and node.is_dir:
            raise IsADirectoryError(errno.EISDIR, "is a directory", relpath)
        data = (
            "metadata only (metacopy=on): the data stays below until written"
            if union.config.metacopy and node.kind == stat.S_IFREG
            else "data included (no metacopy=on)"
        )
        reason = {
            "write": "an open for writing copies the whole file first",
            "truncate": f"truncate copies only the first {size:,} bytes",
            "chmod": f"a mode change needs an upper copy, {data}",
            "chown": f"an owner change needs an upper copy, {data}",
            "utimes": f"a time change needs an upper copy, {data}",
        }[op]
        _copy_ups(
            union,
            node,
            pred,
            reason,
            size if op == "truncate" else None,
            data=op in ("write", "truncate"),
        )
        if not pred.effects:
            pred.effects.append(f"changes {printable(relpath)} in the upper: no copy-up")


def _new_name(union: Union, pred: Prediction, parent: Node, name: bytes, is_dir: bool) -> None:
    _copy_ups(union, parent, pred, "the new name is made in the upper copy of its parent")
    path = printable(join(parent.path, name))
    upper = union.upper
    # As in namespace._prepare_new: only the upper's own whiteout is replaced.
    st = upper.lstat(parent.path, name) if upper is not None and parent.layer.writable else None
    if st is not None and is_whiteout(st):
        pred.effects.append(f"replaces the whiteout at {path} in the upper")
        if is_dir:
            pred.effects.append(
                f"marks {path} opaque: the deleted directory below must stay hidden"
            )
    else:
        pred.effects.append(f"creates {path} in the upper")


def _rename(union: Union, pred: Prediction, relpath: bytes, to: bytes, flags: int) -> None:
    sparent_path, sname = _split(relpath)
    dparent_path, dname = _split(to)
    sparent = _lookup_dir(union, sparent_path)
    dparent = _lookup_dir(union, dparent_path)
    try:
        src, dst = namespace.check_rename(union, sparent, sname, dparent, dname, flags)
    except Refused as e:
        if e.errno == errno.EXDEV:
            found = union.lookup(sparent, sname)
            node = found[0] if found is not None else None
            if node is not None:
                e.strerror = (e.strerror or "") + _exdev_detail(union, node)
        raise
    if dst is src:
        pred.effects.append("nothing to do: both names are the same file")
        return
    swap = bool(flags & RENAME_EXCHANGE)
    if dst is not None and not swap and dst.is_dir and not union.is_empty(dst):
        # A target of the upper only: the upper's own rename refuses it (after the
        # copy-ups, which stay; check_rename leaves it to the rename, as the kernel does).
        raise OSError(errno.ENOTEMPTY, "directory not empty", dname)
    _copy_ups(union, src, pred, "a rename happens in the upper", data=False)
    if swap and dst is not None:
        _copy_ups(union, dst, pred, "an exchange happens in the upper", data=False)
    _copy_ups(union, sparent, pred, "the old name's parent changes")
    _copy_ups(union, dparent, pred, "the new name's parent changes")
    if not swap and union.lower_has_name(sparent, sname):
        pred.effects.append(
            f"leaves a whiteout at {printable(relpath)}: a lower layer has the old name"
        )
    moves = [(src, dparent, to)]
    if swap and dst is not None:
        moves.append((dst, sparent, relpath))
    for node, new_parent, new_path in moves:
        if _keeps_lower_parts(union, node):
            pred.effects.append(
                f"records in a redirect xattr on {printable(new_path)} where its lower parts "
                "are, so they still show under the new name"
            )
        elif node.is_dir and new_parent.lowers:
            pred.effects.append(
                f"marks {printable(new_path)} opaque: it moves into a merged directory, "
                "where a lower namesake must not leak into it"
            )
    if dst is not None and not swap:
        pred.effects.append(f"replaces {printable(to)}")


def _keeps_lower_parts(union: Union, node: Node) -> bool:
    """Whether *node*, once copied up for a move, still has lower parts the move must
    record (``namespace._keep_lower_parts``): a directory with lower parts, or a file
    that is (or becomes, with metacopy=on) a metadata-only copy."""
    if node.is_dir:
        return node.has_lower
    if node.metacopy:
        return True
    return not node.layer.writable and union.config.metacopy and node.kind == stat.S_IFREG


def _exdev_detail(union: Union, node: Node) -> str:
    """Where the directory's parts are, and what ``mv``'s fallback will copy."""
    parts = ", ".join(
        "the upper" if p.layer.writable else f"layer {p.layer.index}" for p in node.stack
    )
    files_n, nbytes = _tree_size(union, node)
    return (
        f" (its parts are in {parts}); mv falls back to copying the tree "
        f"({files_n:,} entries, {nbytes:,} bytes) and deleting the original"
    )


def _tree_size(union: Union, node: Node, limit: int = 100_000) -> tuple[int, int]:
    """Entries and bytes of the merged tree below *node* (as the mount lists them)."""
    count, total = 0, 0
    todo = [node]
    while todo and count < limit:
        d = todo.pop()
        for name in union.names(d):
            try:
                entry = union.resolve(d, name)
            except OSError:
                continue  # a name whose lookup fails: mv cannot copy it either
            if entry is None:
                continue
            count += 1
            if stat.S_ISDIR(entry.st.st_mode):
                todo.append(union.node_for(d, entry))
            elif stat.S_ISREG(entry.st.st_mode):
                total += entry.st.st_size
    return count, total


def rename_flags(noreplace: bool, exchange: bool) -> int:
    return (RENAME_NOREPLACE if noreplace else 0) | (RENAME_EXCHANGE if exchange else 0)
