"""Named exclusions: intentional, documented differences between unionfs and the kernel.

A divergence is only ever excluded *by name*, here, with the reason written
down and the matching condition as narrow as the difference itself. The
comparators stay strict; this registry only labels what they found. Excluded
divergences are still printed (tagged) so they remain visible.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tests.conformance.compare import Divergence
from tests.conformance.layers import LayerSpec

if TYPE_CHECKING:
    from tests.conformance.ops import Op
    from tests.conformance.runner import Case

History = list[tuple["Op", Any, Any]]  # the ops run so far, with side a's and side b's result


@dataclass(frozen=True)
class Exclusion:
    name: str
    reason: str
    applies: Callable[[Divergence, LayerSpec, History], bool]
    # The two sides cannot be compared past this point (one refused what the other did):
    # the case ends there, as not diverged, with a note.
    ends_case: bool = False


def _path_of(d: Divergence) -> bytes | None:
    """The path a tree divergence is about: its one ``paths`` entry, else its ``where``
    (the repr of the bytes path, exact unless shortened for display)."""
    if len(d.paths) == 1 and d.kind != "result":
        return next(iter(d.paths))
    if d.where.startswith(("b'", 'b"')):
        try:
            value = ast.literal_eval(d.where)
        except (ValueError, SyntaxError):
            return None
        return value if isinstance(value, bytes) else None
    return None


def _spec_whiteouts(spec: LayerSpec) -> set[bytes]:
    return {e.path for layer in (spec.upper, *spec.lowers) for e in layer if e.kind == "whiteout"}


def _moved(path: bytes, src: bytes, dst: bytes) -> bytes | None:
    """*path* after *src* was renamed to *dst*, or None if the rename did not touch it."""
    if path == src:
        return dst
    if path.startswith(src + b"/"):
        return dst + path[len(src) :]
    return None


def _whiteouts_now(spec: LayerSpec, history: History) -> set[bytes]:
    """The layers' whiteouts at the paths they have after the renames that succeeded on
    both sides (a renamed directory takes its whiteouts along)."""
    paths = _spec_whiteouts(spec)
    for op, ra, rb in history:
        if op.name != "rename" or not (isinstance(ra, tuple) and ra[0] == "ok" and ra == rb):
            continue
        src, dst, flags = op.args
        out: set[bytes] = set()
        for p in paths:
            new = _moved(p, src, dst)
            if flags == "EXCHANGE" and new is None:
                new = _moved(p, dst, src)
            elif new is None and _moved(p, dst, dst) is not None:
                continue  # replaced by the rename
            out.add(p if new is None else new)
        paths = out
    return paths


def _whiteout_listed_in_unmerged_dir(d: Divergence, spec: LayerSpec, history: History) -> bool:
    """The symptom exactly: a kernel listing shows a name that its own lookup calls
    ENOENT, at a path where a layer holds a whiteout (followed through renames)."""
    whiteouts = _whiteouts_now(spec, history)
    if d.kind.endswith((":only-a", ":only-b")) and "'error': 'ENOENT'" in d.detail:
        return _path_of(d) in whiteouts
    if d.kind == "result" and d.paths and ("readdir(" in d.where):
        listed = {
            n if isinstance(n, bytes) else os.fsencode(n) for n in d.paths
        }  # fd listings are str
        return listed <= {w.rpartition(b"/")[2] for w in whiteouts}
    return False


def _failed_xattr_flag_without_copy_up(d: Divergence, spec: LayerSpec, history: History) -> bool:
    targets: set[bytes] = set()
    for op, ra, rb in history:
        if (
            op.name == "setxattr"
            and op.args[-1] in ("CREATE", "REPLACE")
            and ra == rb
            and isinstance(ra, tuple)
            and ra[0] == "err"
        ):
            for path in (op.args[0], _link_target(op.args[0], spec, history)):
                while path:
                    targets.add(path)
                    path = path.rpartition(b"/")[0]
    if not targets:
        return False
    if d.kind == "upper:only-a" or d.kind.endswith(":nlink"):
        return _path_of(d) in targets
    if d.kind == "result" and d.where.startswith("op#"):
        # A later stat of the target: the kernel's copy-up split a lower hard link.
        k = int(d.where[3:].partition(" ")[0])
        if k < len(history):
            op, ra, rb = history[k]
            if op.name in ("stat", "lstat") and op.args[0] in targets:
                return _same_but_nlink(ra, rb)
    return False


def _passthrough_on() -> bool:
    options = os.environ.get("UNIONFS_TEST_OPTIONS", "").split(",")
    return "passthrough=on" in (o.strip() for o in options)


def _write_refused_while_read_through_passthrough(
    d: Divergence, spec: LayerSpec, history: History
) -> bool:
    if not _passthrough_on() or d.kind != "result" or not history:
        return False
    op, ra, rb = history[-1]
    if rb != ("err", "ETXTBSY") or not (isinstance(ra, tuple) and ra[0] == "ok"):
        return False
    if op.name == "open":
        flags = str(op.args[2])
        return any(f in flags for f in ("WRONLY", "RDWR", "TRUNC"))
    return op.name == "truncate"


def _link_target(path: bytes, spec: LayerSpec, history: History) -> bytes:
    """Where a relative symlink at *path* (made by an op or in a layer) points, or b""."""
    target = b""
    for layer in (spec.upper, *spec.lowers):
        for e in layer:
            if e.path == path and e.kind == "symlink":
                target = target or e.target
    for op, ra, _ in history:
        if op.name == "symlink" and op.args[1] == path and isinstance(ra, tuple) and ra[0] == "ok":
            target = op.args[0]
    if not target or target.startswith(b"/"):
        return b""
    return os.path.normpath(os.path.join(path.rpartition(b"/")[0], target)).lstrip(b"./")


def _parent_touched_by_failed_rename(d: Divergence, spec: LayerSpec, history: History) -> bool:
    """The kernel touched a rename's parent directory before failing as unionfs did."""
    if not d.kind.endswith(":mtime"):
        return False
    path = _path_of(d)
    if path is None:
        return False
    return any(
        op.name == "rename"
        and path in (op.args[0].rpartition(b"/")[0], op.args[1].rpartition(b"/")[0])
        and ra == rb
        and isinstance(ra, tuple)
        and ra[0] == "err"
        for op, ra, rb in history
    )


def _same_but_nlink(ra: Any, rb: Any) -> bool:
    if not (isinstance(ra, tuple) and isinstance(rb, tuple) and ra[0] == rb[0] == "ok"):
        return False
    if not (isinstance(ra[1], dict) and isinstance(rb[1], dict)):
        return False
    strip = ({k: v for k, v in r[1].items() if k != "nlink"} for r in (ra, rb))
    return next(strip) == next(strip)


def _opaque_left_by_failed_rename(d: Divergence, spec: LayerSpec, history: History) -> bool:
    """Only the kernel's upper has the opaque marker, on the source of a rename that
    failed the same way on both sides."""
    if d.kind != "upper:xattrs" or "trusted.overlay.opaque" not in d.detail:
        return False
    path = _path_of(d)
    return any(
        op.name == "rename"
        and op.args[0] == path
        and ra == rb
        and isinstance(ra, tuple)
        and ra[0] == "err"
        for op, ra, rb in history
    )


def _lower_hardlink_group(d: Divergence, spec: LayerSpec, history: History) -> bool:
    if d.kind != "ino:hardlink" or not d.paths:
        return False
    return any(d.paths <= group for group in spec.lower_hardlink_groups())


def _lower_hardlink_copy_up(d: Divergence, spec: LayerSpec, history: History) -> bool:
    if d.kind != "ino:stability" or len(d.paths) != 1:
        return False
    return any(d.paths <= group for group in spec.lower_hardlink_groups())


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


def _userns_names_of_a_linked_lower_file(d: Divergence, spec: LayerSpec, history: History) -> bool:
    """In the unprivileged mode only: a hard-link group whose names all belong to one
    lower file that links copied up."""
    if os.geteuid() == 0 or d.kind != "ino:hardlink" or not d.paths:
        return False
    return any(d.paths <= family for family in _linked_lower_files(spec, history))


EXCLUSIONS: tuple[Exclusion, ...] = (
    Exclusion(
        name="lower-hardlink-st_ino",
        reason=(
            "pyfuse3 makes the FUSE node id the reported st_ino, so two hard links that exist "
            "inside one lower layer get distinct st_ino in unionfs, while the kernel reports "
            "the lower inode number for both. After copy-up both break the link anyway; links "
            "made through the mount share st_ino on both sides. Limited to groups whose paths "
            "are all hard links of one inode inside one lower layer."
        ),
        applies=_lower_hardlink_group,
    ),
    Exclusion(
        name="lower-hardlink-copy-up-st_ino",
        reason=(
            "Same root cause as lower-hardlink-st_ino: on copy-up of a file that has hard "
            "links inside its lower layer (nlink > 1, index=off) the kernel stops reporting the "
            "lower inode number and reports the new upper inode's, because the links may be "
            "broken into different upper files. unionfs cannot change st_ino of a live FUSE "
            "node (pyfuse3: node id == st_ino), so its st_ino stays stable. Limited to paths "
            "that are hard links inside one lower layer."
        ),
        applies=_lower_hardlink_copy_up,
    ),
    Exclusion(
        name="whiteout-listed-in-unmerged-dir",
        reason=(
            "The kernel passes a directory that exists in one layer only straight through to "
            "that layer's readdir, so a whiteout in it is listed although lookup says ENOENT. "
            "unionfs never lists a whiteout (issue 2 asks for that). Limited to tree entries "
            "that are such whiteouts and to listings that differ only by their names."
        ),
        applies=_whiteout_listed_in_unmerged_dir,
    ),
    Exclusion(
        name="failed-xattr-flag-no-copy-up",
        reason=(
            "A setxattr with XATTR_CREATE/XATTR_REPLACE that fails: the kernel copies the file "
            "(and its parents) up before the xattr call fails; pyfuse3 checks the flag with a "
            "getxattr of its own and never calls the filesystem, which cannot see the flags. "
            "Both return the same errno; only the extra copy-up differs. Limited to the upper "
            "entries and nlink of that op's target and its parents."
        ),
        applies=_failed_xattr_flag_without_copy_up,
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
            "Limited to the mtime of a parent of such a failed rename."
        ),
        applies=_parent_touched_by_failed_rename,
    ),
    Exclusion(
        name="passthrough-on-write-while-read-open",
        reason=(
            "With -o passthrough=on only (not the default): a lower file opened read-only is "
            "read by the kernel straight from the lower file, and every open of that inode "
            "must then use the same backing file, so opening it for writing or truncating it "
            "fails with ETXTBSY until those opens are closed; the kernel overlay copies it up "
            "and lets the reader see the copy. The sides differ from there on, so the case "
            "ends at that op. Limited to an open for writing or a truncate that succeeded on "
            "the kernel and failed with ETXTBSY on unionfs."
        ),
        applies=_write_refused_while_read_through_passthrough,
        ends_case=True,
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
            "that a lower layer provided and link ops gave more names, in the unprivileged mode."
        ),
        applies=_userns_names_of_a_linked_lower_file,
    ),
)

ENDS_CASE = {ex.name for ex in EXCLUSIONS if ex.ends_case}

# Operations unionfs cannot serve at all, dropped by name from cases run on unionfs
# (the kernel-against-kernel self-check still runs them).
UNSUPPORTED_OPS: dict[str, tuple[str, Callable[[Op], bool]]] = {
    "o_tmpfile-unsupported": (
        "O_TMPFILE needs the FUSE_TMPFILE request, which libfuse 3.14 (Debian bookworm) "
        "does not implement, so the kernel answers EOPNOTSUPP for any FUSE filesystem.",
        lambda op: op.name == "open" and "TMPFILE" in str(op.args[2]),
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


def label(
    divergences: list[Divergence], spec: LayerSpec, history: History | None = None
) -> list[Divergence]:
    """Tag each divergence that a named exclusion covers; returns the untagged ones."""
    remaining = []
    for d in divergences:
        for ex in EXCLUSIONS:
            if ex.applies(d, spec, history or []):
                d.excluded_by = ex.name
                break
        else:
            remaining.append(d)
    return remaining
