"""Named exclusions: intentional, documented differences between unionfs and the kernel.

A divergence is only ever excluded *by name*, here, with the reason written
down and the matching condition as narrow as the difference itself: which side
shows what (side a is the kernel, side b unionfs), in which op window, for what
kind of directory and what the entry really is, read from the layers and the
two trees the divergence was found in. The comparators stay strict; this
registry only labels what they found. Excluded divergences are still printed
(tagged) so they remain visible. Each exclusion has negative controls in
``test_selfcheck.py``: divergences of a nearby shape that it must not cover.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tests.conformance.compare import Divergence
from tests.conformance.layers import OPAQUE_XATTR, Entry, LayerSpec
from tests.features import libfuse_version, passthrough_mode

if TYPE_CHECKING:
    from tests.conformance.ops import Op
    from tests.conformance.runner import Case
    from tests.conformance.snapshot import Snapshot

History = list[tuple["Op", Any, Any]]  # the ops run so far, with side a's and side b's result
KERNELS = ("kernel", "userns-kernel")
OPAQUE_NAMES = (OPAQUE_XATTR, b"user.overlay.opaque")


@dataclass(frozen=True)
class Context:
    """What an exclusion may look at: the layers, the ops so far with both results,
    which kind each side is, and the two trees (or upper dirs) being compared."""

    spec: LayerSpec
    history: History
    kinds: tuple[str, str] = ("kernel", "unionfs")
    snaps: tuple[Snapshot, Snapshot] | None = None

    @property
    def kernel_vs_unionfs(self) -> bool:
        return self.kinds[0] in KERNELS and self.kinds[1] == "unionfs"

    def entry(self, side: int, path: bytes) -> dict[str, Any] | None:
        if self.snaps is None:
            return None
        return self.snaps[side].get(path)


@dataclass(frozen=True)
class Exclusion:
    name: str
    reason: str
    applies: Callable[[Divergence, Context], bool]
    # The two sides cannot be compared past this point (one refused what the other did):
    # the case ends there, as not diverged, with a note.
    ends_case: bool = False


def _ok(r: Any) -> bool:
    return isinstance(r, tuple) and r[0] == "ok"


def _failed_alike(ra: Any, rb: Any) -> bool:
    return isinstance(ra, tuple) and ra[0] == "err" and ra == rb


def _op_index(d: Divergence) -> int | None:
    """The op a divergence was found after (``op#K ...`` in its stage), for results."""
    if not d.where.startswith("op#"):
        return None
    k = d.where[3:].partition(" ")[0]
    return int(k) if k.isdigit() else None


def _parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def _moved(path: bytes, src: bytes, dst: bytes) -> bytes | None:
    """*path* after *src* was renamed to *dst*, or None if the rename did not touch it."""
    if path == src:
        return dst
    if path.startswith(src + b"/"):
        return dst + path[len(src) :]
    return None


def _did_rename(op: Op, ra: object, rb: object) -> bool:
    """A rename that succeeded on both sides and moved something: one of a name onto
    itself does nothing (vfs_rename returns 0 when source and target are one inode)."""
    return op.name == "rename" and _ok(ra) and ra == rb and op.args[0] != op.args[1]


def _follow(path: bytes, history: History, until: int | None = None) -> bytes | None:
    """Where *path* is after the renames that succeeded on both sides (up to op *until*),
    or None once a rename replaced it."""
    for op, ra, rb in history[:until]:
        if not _did_rename(op, ra, rb):
            continue
        src, dst, flags = op.args
        new = _moved(path, src, dst)
        if flags == "EXCHANGE" and new is None:
            new = _moved(path, dst, src)
        elif new is None and _moved(path, dst, dst) is not None:
            return None
        path = path if new is None else new
    return path


# -- whiteout-listed-in-unmerged-dir ---------------------------------------------------


def _merge_stack(layers: list[dict[bytes, Entry]], path: bytes) -> list[int]:
    """The layers (by index, the upper first) whose directory at *path* the kernel
    merges: each directory's stack cut at an opaque one, a whiteout or a non-directory."""
    if not path:
        return list(range(len(layers)))
    out: list[int] = []
    for i in _merge_stack(layers, _parent(path)):
        e = layers[i].get(path)
        if e is None:
            continue
        if e.kind != "dir":
            break
        out.append(i)
        if any(n in e.xattrs for n in OPAQUE_NAMES):
            break
    return out


def _passed_through_whiteouts(spec: LayerSpec) -> dict[bytes, bool]:
    """The layers' whiteouts that sit in a directory the kernel passes straight to one
    layer's readdir (no other layer merges into it), each with whether that directory
    is the upper's (which a rename carries along, still unmerged) or a lower's (which a
    rename first copies up: merged from then on)."""
    layers = [{e.path: e for e in layer} for layer in (spec.upper, *spec.lowers)]
    out: dict[bytes, bool] = {}
    for i, layer in enumerate(layers):
        for path, e in layer.items():
            parent = _parent(path)
            if e.kind == "whiteout" and parent and _merge_stack(layers, parent) == [i]:
                out[path] = i == 0
    return out


def _listed_whiteouts_now(ctx: Context, until: int | None = None) -> set[bytes]:
    """The passed-through whiteouts where they are after the renames so far: a rename of
    a lower directory copies it up (redirect_dir=on), which merges it, so the whiteouts
    right in it are filtered from then on; those deeper down only move along."""
    out = set()
    for path, in_upper in _passed_through_whiteouts(ctx.spec).items():
        now: bytes | None = path
        for op, ra, rb in ctx.history[:until]:
            if now is None:
                break
            if not _did_rename(op, ra, rb):
                continue
            src, dst, flags = op.args
            moved_dirs = (src, dst) if flags == "EXCHANGE" else (src,)
            if not in_upper and _parent(now) in moved_dirs:
                now = None
            else:
                now = _follow(now, [(op, ra, rb)])
        if now is not None:
            out.add(now)
    return out


def _fd_dir(ctx: Context, slot: int, k: int) -> bytes | None:
    """The path of the directory fd *slot* was opened on before op *k*, on both sides."""
    for j in range(k - 1, -1, -1):
        op, ra, rb = ctx.history[j]
        if op.name == "close" and op.args[0] == slot:
            return None
        if op.name == "open" and op.args[0] == slot:
            if ra == rb == ("ok", "dir"):
                return _follow(op.args[1], ctx.history[j + 1 : k])
            return None
    return None


def _real_dir(ctx: Context, path: bytes) -> bytes | None:
    """*path* with the symlinks in it resolved in the kernel's tree (as a readdir follows
    them), or None when it leaves the mount."""
    parts = [p for p in path.split(b"/") if p and p != b"."]
    done: list[bytes] = []
    for _ in range(40):
        if not parts:
            return b"/".join(done)
        part = parts.pop(0)
        if part == b"..":
            if done:
                done.pop()
            continue
        entry = ctx.entry(0, b"/".join([*done, part]))
        target = entry.get("target") if entry is not None else None
        if not isinstance(target, bytes):
            done.append(part)
            continue
        if target.startswith(b"/"):
            return None
        parts = [p for p in target.split(b"/") if p and p != b"."] + parts
    return None


def _whiteout_listed_in_unmerged_dir(d: Divergence, ctx: Context) -> bool:
    """The kernel lists, in a directory it passes through to one layer, a name that is
    a whiteout there and that its own lookup calls ENOENT; unionfs does not list it."""
    if not ctx.kernel_vs_unionfs:
        return False
    # The kernel's tree: side a's during the ops; after them, the cross-mounts compare
    # the kernel over unionfs's upper (second) with unionfs's final tree, and the
    # kernel's final tree (first) with unionfs over the kernel's upper.
    kernels_entry = {
        "tree:only-a": d.a,
        "cross-unionfs:only-a": d.a,
        **{f"cross-{kernel}:only-b": d.b for kernel in KERNELS},
    }
    if d.kind in kernels_entry:
        path = next(iter(d.paths), None)
        return (
            kernels_entry[d.kind] == {"error": "ENOENT"}
            and path is not None
            and path in _listed_whiteouts_now(ctx)
        )
    k = _op_index(d)
    if d.kind != "result" or k is None or k >= len(ctx.history):
        return False
    op, ra, rb = ctx.history[k]
    if op.name == "readdir":
        where: bytes | None = _real_dir(ctx, op.args[0])
    elif op.name == "fdreaddir":
        where = _fd_dir(ctx, op.args[0], k)
    else:
        return False
    if where is None or not (_ok(ra) and _ok(rb)):
        return False
    only_a = {os.fsencode(n) for n in ra[1]} - {os.fsencode(n) for n in rb[1]}
    if not only_a or {os.fsencode(n) for n in rb[1]} - {os.fsencode(n) for n in ra[1]}:
        return False  # unionfs listing a name the kernel does not is never this
    listed = _listed_whiteouts_now(ctx, k + 1)
    for name in only_a:
        path = where + b"/" + name if where else name
        if path not in listed or ctx.entry(0, path) not in (None, {"error": "ENOENT"}):
            return False
    return True


# -- opaque-left-by-failed-rename ------------------------------------------------------


def _lower_dir(spec: LayerSpec, path: bytes) -> bool:
    """Whether a lower layer has a directory at *path* (the root always)."""
    return not path or any(
        e.path == path and e.kind == "dir" for layer in spec.lowers for e in layer
    )


def _opaque_left_by_failed_rename(d: Divergence, ctx: Context) -> bool:
    """Only the kernel's upper has the opaque marker on a directory of the upper only
    that a rename into a merged directory tried to move and that failed alike."""
    if not ctx.kernel_vs_unionfs or d.kind != "upper:xattrs" or len(d.paths) != 1:
        return False
    path = next(iter(d.paths))
    a, b = d.a or {}, d.b or {}
    added = {k: v for k, v in a.items() if k not in b}
    if not (
        len(added) == 1
        and next(iter(added)) in OPAQUE_NAMES
        and next(iter(added.values())) == b"y"
        and {k: v for k, v in a.items() if k not in added} == b
    ):
        return False
    entry = ctx.entry(0, path)
    if entry is None or entry.get("fmt") != 0o040000 or _lower_dir(ctx.spec, path):
        return False
    for k, (op, ra, rb) in enumerate(ctx.history):
        if op.name != "rename" or not _failed_alike(ra, rb):
            continue
        src, dst = op.args[0], op.args[1]
        if _follow(src, ctx.history[k:]) == path and _lower_dir(ctx.spec, _parent(dst)):
            return True
    return False


# -- parent-touched-by-failed-rename ---------------------------------------------------


def _parent_touched_by_failed_rename(d: Divergence, ctx: Context) -> bool:
    """The kernel stamped the mtime of a rename's parent directory during the op, then
    failed as unionfs did: the kernel's mtime is exactly that op's, unionfs's is not."""
    if not ctx.kernel_vs_unionfs or not d.kind.endswith(":mtime") or len(d.paths) != 1:
        return False
    path = next(iter(d.paths))
    entry = ctx.entry(0, path)
    if entry is None or entry.get("fmt") != 0o040000:
        return False
    for k, (op, ra, rb) in enumerate(ctx.history):
        if (
            op.name == "rename"
            and _failed_alike(ra, rb)
            and d.a == f"op#{k}"
            and d.b != d.a
            and path in (_parent(op.args[0]), _parent(op.args[1]))
        ):
            return True
    return False


def _lower_file_at(path: bytes, spec: LayerSpec) -> bool:
    """Whether a lower layer provides a non-directory at *path* (the topmost one wins)."""
    for layer in spec.lowers:
        for e in layer:
            if e.path == path:
                return e.kind not in ("dir", "whiteout")
    return False


def _linked_lower_files(spec: LayerSpec, history: History) -> list[set[bytes]]:
    """Names of each lower file that ``link`` gave more names (which copies it up),
    followed through later links and renames of any of its names."""
    families: list[set[bytes]] = []
    upper = {e.path for e in spec.upper}
    for op, ra, rb in history:
        if not (isinstance(ra, tuple) and ra[0] == "ok" and ra == rb):
            continue
        if op.name == "link":
            src, dst = op.args[0], op.args[1]
            family = next((f for f in families if src in f), None)
            if family is None and _lower_file_at(src, spec) and src not in upper:
                family = {src}
                families.append(family)
            if family is not None:
                family.add(dst)
        elif op.name == "rename":
            src, dst = op.args[0], op.args[1]
            for family in families:
                if src in family:
                    family.add(dst)
    return families


def _userns_names_of_a_linked_lower_file(d: Divergence, ctx: Context) -> bool:
    """In the unprivileged mode only: a hard-link group whose names all belong to one
    lower file that links copied up, or the st_ino of one such name where the kernel
    shows the upper inode's number and unionfs the lower one's."""
    if os.geteuid() == 0 or not d.paths:
        return False
    if d.kind == "tree:src":
        if not (isinstance(d.a, str) and d.a.startswith("u:")):
            return False
        if not (isinstance(d.b, str) and d.b.startswith("l")):
            return False
    elif d.kind != "ino:hardlink":
        return False
    return any(d.paths <= family for family in _linked_lower_files(ctx.spec, ctx.history))


def _write_refused_while_read_through_passthrough(d: Divergence, ctx: Context) -> bool:
    if passthrough_mode() != "on" or not ctx.kernel_vs_unionfs or d.kind != "result":
        return False
    if not ctx.history or _op_index(d) != len(ctx.history) - 1:
        return False
    op, ra, rb = ctx.history[-1]
    if rb != ("err", "ETXTBSY") or not _ok(ra):
        return False
    if op.name == "open":
        flags = str(op.args[2])
        return any(f in flags for f in ("WRONLY", "RDWR", "TRUNC"))
    return op.name == "truncate"


EXCLUSIONS: tuple[Exclusion, ...] = (
    Exclusion(
        name="whiteout-listed-in-unmerged-dir",
        reason=(
            "The kernel passes a directory that exists in one layer only straight through to "
            "that layer's readdir, so a whiteout in it is listed although lookup says ENOENT. "
            "unionfs never lists a whiteout (issue 2 asks for that). Limited to the kernel's "
            "side, to whiteouts a layer holds in a directory no other layer merges into (an "
            "upper one followed through renames; a lower one until a rename copies it up), "
            "to tree entries that the kernel's lookup calls ENOENT, and to listings of that "
            "very directory that differ only by such names, on the kernel's side."
        ),
        applies=_whiteout_listed_in_unmerged_dir,
    ),
    Exclusion(
        name="opaque-left-by-failed-rename",
        reason=(
            "Moving an upper-only directory into a merged one, the kernel marks it opaque "
            "before the rename and keeps the marker when the rename then fails (e.g. "
            "ENAMETOOLONG). unionfs marks it only when it renames; a failure the FUSE layer "
            "reports at the target's lookup never reaches it. The directory has no lower "
            "part, so the marker hides nothing and both merged views agree. Limited to the "
            "opaque xattr in the upper on the source of a rename that failed on both sides."
        ),
        applies=_opaque_left_by_failed_rename,
    ),
    Exclusion(
        name="parent-touched-by-failed-rename",
        reason=(
            "A rename of an upper directory onto a non-empty directory fails with the same "
            "errno on both sides, but the kernel has already changed the parent's upper "
            "directory (its mtime moves) on the way; unionfs checks first and changes nothing. "
            "Limited to the kernel's side showing the failed op's own time on a directory "
            "that is a parent of that rename, while unionfs shows another."
        ),
        applies=_parent_touched_by_failed_rename,
    ),
    Exclusion(
        name="userns-link-of-copied-up-file-st_ino",
        reason=(
            "Unprivileged mode only (kernel mounted with userxattr in a user namespace): the "
            "kernel cannot record a copied-up file's origin there (it writes an empty "
            "user.overlay.origin), so a new hard link made to a lower file shows the upper "
            "inode's number while the name it was copied up through keeps the lower one as "
            "long as it is cached (both show the upper's after a remount), so the names of one "
            "file fall into groups by how each was reached. unionfs shows one st_ino for every "
            "name of the file. Limited to hard-link groups whose names all belong to one file "
            "that a lower layer provided and link ops gave more names, and to the st_ino of one "
            "such name where the kernel shows the upper inode's and unionfs the lower one's, in "
            "the unprivileged mode."
        ),
        applies=_userns_names_of_a_linked_lower_file,
    ),
    Exclusion(
        name="passthrough-on-write-while-read-open",
        reason=(
            "With -o passthrough=on only (not the default): a lower file opened read-only is "
            "read by the kernel straight from the lower file, and every open of that inode "
            "must then use the same backing file, so opening it for writing or truncating it "
            "fails with ETXTBSY until those opens are closed; the kernel overlay copies it up "
            "and lets the reader see the copy. The sides differ from there on, so the case "
            "ends at that op. Limited to the result of the last op run, an open for writing "
            "or a truncate, that succeeded on the kernel and failed with ETXTBSY on unionfs."
        ),
        applies=_write_refused_while_read_through_passthrough,
        ends_case=True,
    ),
)

ENDS_CASE = {ex.name for ex in EXCLUSIONS if ex.ends_case}


# Operations unionfs cannot serve at all, dropped by name from cases run on unionfs
# (the kernel-against-kernel self-check still runs them).
UNSUPPORTED_OPS: dict[str, tuple[str, Callable[[Op], bool]]] = {
    "o_tmpfile-unsupported": (
        "O_TMPFILE needs the FUSE_TMPFILE request, which libfuse 3.14 (Debian bookworm) "
        "does not implement, so the kernel answers EOPNOTSUPP for any FUSE filesystem "
        "there. Dropped only when the hook runs with a libfuse older than 3.17.",
        lambda op: op.name == "open" and "TMPFILE" in str(op.args[2]) and libfuse_version() < 317,
    ),
    "fallocate-collapse-insert-fuse": (
        "fallocate with FALLOC_FL_COLLAPSE_RANGE or FALLOC_FL_INSERT_RANGE: the kernel's "
        "FUSE module answers EOPNOTSUPP itself for any mode but KEEP_SIZE, PUNCH_HOLE and "
        "ZERO_RANGE (fs/fuse/file.c, fuse_file_fallocate), before asking the filesystem.",
        lambda op: op.name == "fallocate" and ("COLLAPSE" in op.args[1] or "INSERT" in op.args[1]),
    ),
}


def drop_unsupported(case: Case) -> tuple[Case, list[str]]:
    """The case without operations listed in UNSUPPORTED_OPS, and a note per name."""
    ops = list(case.ops)
    notes = []
    for name, (_, matches) in UNSUPPORTED_OPS.items():
        dropped = [o for o in ops if matches(o)]
        if dropped:
            ops = [o for o in ops if not matches(o)]
            notes.append(f"excluded by name {name}: dropped {len(dropped)} op(s)")
    return dataclasses.replace(case, ops=ops), notes


def label_in(divergences: list[Divergence], ctx: Context) -> list[Divergence]:
    """Tag each divergence that a named exclusion covers; returns the untagged ones."""
    remaining = []
    for d in divergences:
        for ex in EXCLUSIONS:
            if ex.applies(d, ctx):
                d.excluded_by = ex.name
                break
        else:
            remaining.append(d)
    return remaining


def label(
    divergences: list[Divergence],
    spec: LayerSpec,
    history: History | None = None,
    kinds: tuple[str, str] = ("kernel", "unionfs"),
    snaps: tuple[Snapshot, Snapshot] | None = None,
) -> list[Divergence]:
    """``label_in`` with the context given piece by piece."""
    return label_in(divergences, Context(spec, history or [], kinds, snaps))
