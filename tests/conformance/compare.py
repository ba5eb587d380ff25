"""Comparison of op results and tree snapshots between the two sides.

What is compared, and what deliberately is not (each exclusion is global only
because the quantity is not comparable at all, never to hide a bug):

* atime: reading updates it depending on relatime and on caching; it tells
  nothing about overlay semantics.
* ctime: cannot be set by anyone, and copy-up touches it in implementation
  specific sub-steps (temp file in workdir, chown, rename into place). The
  lower layers' ctime *is* compared (it proves the lowers were not modified).
* st_dev, and st_ino *across* the two mounts: different filesystems/copies.
  Instead inode identity is compared *within* each mount: hard-link groups
  (which paths share an inode) and stability (a path that survives an op keeps
  its inode number exactly on one side iff it does on the other).
* nlink and mtime of whiteouts in the upper dir: the kernel shares one
  whiteout inode (hard links to ``work/#whiteout``), so these are artifacts
  of that sharing.
* exact extent maps of upper files: side b must not allocate more bytes
  than side a (the kernel's copy-up skips holes only at 1 MiB chunk starts,
  so a sparser copy is fine, a denser one is a divergence).
* readdir order: not specified by POSIX; names are compared as sorted lists.
* directory st_size and st_nlink: filesystem private (ext4 counts blocks,
  overlay merges several directories); the upper-dir comparison covers the
  entries that determine them.
* "fresh" timestamps: a time set by the filesystem itself is "now", which
  differs between the two sides by design. Each op runs inside a clock window
  (:class:`Clock`), so a fresh mtime is compared as the *index of the op*
  that set it - exact for every deterministic time, and still catching a time
  updated by the wrong op (or not updated at all).
"""

from __future__ import annotations

import bisect
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from tests.conformance.snapshot import Snapshot

CLOCK_REALTIME_COARSE = 5


@dataclass
class Divergence:
    """One difference. ``kind`` is the summary bucket, e.g. ``tree:mode`` or ``result``."""

    kind: str
    where: str
    detail: str
    paths: frozenset[bytes] = field(default_factory=frozenset)
    excluded_by: str | None = None
    # The two values compared (a field of an entry, a whole entry for only-a/only-b,
    # or an op's results), for exclusions that must match them exactly.
    a: Any = None
    b: Any = None

    def __str__(self) -> str:
        tag = f" [excluded: {self.excluded_by}]" if self.excluded_by else ""
        return f"{self.kind:18} {self.where}: {self.detail}{tag}"


class Clock:
    """Op windows: every timestamp the filesystem sets during op *k* lies in window *k*.

    Before op *k* starts (on either side) we spin until the kernel's coarse
    clock - the lowest clock any filesystem stamps with - has passed the fine
    clock reading taken after op *k-1* finished. Windows therefore never overlap.
    """

    def __init__(self) -> None:
        self.bounds: list[int] = []
        self.last_fine = 0

    def boundary(self) -> None:
        while time.clock_gettime_ns(CLOCK_REALTIME_COARSE) <= self.last_fine:
            time.sleep(0.0005)
        self.bounds.append(time.clock_gettime_ns(CLOCK_REALTIME_COARSE))

    def end(self) -> None:
        self.last_fine = time.time_ns()

    def norm(self, t: int) -> Any:
        """A deterministic time as is; a fresh one as ``op#k`` (``mount`` before op 0)."""
        if not self.bounds or t < self.bounds[0] or t > self.last_fine:
            return t  # explicit (past or future) times are compared exactly
        k = bisect.bisect_right(self.bounds, t) - 1
        return "mount" if k == 0 else f"op#{k - 1}"


def _stat_view(st: dict[str, Any], clock: Clock) -> dict[str, Any]:
    v = dict(st)
    if v.get("fmt") == stat.S_IFDIR:
        v.pop("size", None)
        v.pop("nlink", None)
    if "mtime" in v:
        v["mtime"] = clock.norm(v["mtime"])
    return v


def norm_result(res: Any, clock: Clock) -> Any:
    if isinstance(res, tuple) and len(res) == 2 and res[0] == "ok" and isinstance(res[1], dict):
        return ("ok", _stat_view(res[1], clock))
    return res


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) < 160 else s[:150] + "..."


def _entry_view(e: dict[str, Any], clock: Clock | None, flavour: str) -> dict[str, Any]:
    v = dict(e)
    if flavour != "raw":
        v.pop("ino", None)
        if v.get("fmt") == stat.S_IFDIR:
            v.pop("nlink", None)
    if flavour == "upper" and "extents" in v:
        # The kernel copies up in 1 MiB chunks and skips only holes it meets at a
        # chunk start, so the exact extent map is a copy-loop artifact. What is
        # compared is the number of allocated bytes, one-sided (see diff_trees).
        v["allocated"] = sum(b - a for a, b in v.pop("extents"))
    if flavour == "upper" and v.get("fmt") == stat.S_IFCHR and v.get("rdev") == (0, 0):
        # Whiteouts: the kernel hard-links one shared whiteout inode per upper fs
        # (workdir/work/#whiteout), so nlink and mtime of a whiteout are artifacts
        # of that sharing, not of the entry. Its type, rdev, mode, owner still count.
        v.pop("nlink", None)
        v.pop("mtime", None)
    if clock is not None and "mtime" in v:
        v["mtime"] = clock.norm(v["mtime"])
    return v


def diff_trees(
    a: Snapshot,
    b: Snapshot,
    ca: Clock | None,
    cb: Clock | None,
    prefix: str,
    flavour: str = "mount",
) -> list[Divergence]:
    """Per-path, per-field differences; a None clock compares raw times."""
    out: list[Divergence] = []
    for p in sorted(set(a) | set(b)):
        where = _show(p)
        if p not in b:
            full = _entry_view(a[p], ca, flavour)
            out.append(Divergence(f"{prefix}:only-a", where, _show(full), frozenset({p}), a=full))
            continue
        if p not in a:
            full = _entry_view(b[p], cb, flavour)
            out.append(Divergence(f"{prefix}:only-b", where, _show(full), frozenset({p}), b=full))
            continue
        va, vb = _entry_view(a[p], ca, flavour), _entry_view(b[p], cb, flavour)
        for k in sorted(set(va) | set(vb)):
            if (
                k == "allocated"
                and isinstance(va.get(k), int)
                and isinstance(vb.get(k), int)
                and vb[k] <= va[k]
            ):
                continue  # side b may keep more holes than the kernel's copy-up, never fewer
            if va.get(k) != vb.get(k):
                out.append(
                    Divergence(
                        f"{prefix}:{k}",
                        where,
                        f"{_show(va.get(k))} != {_show(vb.get(k))}",
                        frozenset([p]),
                        a=va.get(k),
                        b=vb.get(k),
                    )
                )
    return out


def hardlink_groups(snap: Snapshot) -> set[frozenset[bytes]]:
    by_ino: dict[int, set[bytes]] = {}
    for p, e in snap.items():
        if "ino" in e and e.get("fmt") != stat.S_IFDIR:
            by_ino.setdefault(e["ino"], set()).add(p)
    return {frozenset(g) for g in by_ino.values() if len(g) > 1}


def diff_inodes(
    prev_a: Snapshot | None, a: Snapshot, prev_b: Snapshot | None, b: Snapshot
) -> list[Divergence]:
    """Hard-link groups and st_ino stability, each judged within its own mount."""
    out: list[Divergence] = []
    ga, gb = hardlink_groups(a), hardlink_groups(b)
    for g in sorted(ga - gb, key=sorted):
        out.append(Divergence("ino:hardlink", _show(sorted(g)), "share st_ino only on side a", g))
    for g in sorted(gb - ga, key=sorted):
        out.append(Divergence("ino:hardlink", _show(sorted(g)), "share st_ino only on side b", g))
    if prev_a is None or prev_b is None:
        return out
    for p in sorted(set(a) & set(b) & set(prev_a) & set(prev_b)):
        try:
            ch_a = prev_a[p]["ino"] != a[p]["ino"]
            ch_b = prev_b[p]["ino"] != b[p]["ino"]
        except KeyError:
            continue
        if ch_a != ch_b:
            side = "a" if ch_a else "b"
            out.append(
                Divergence(
                    "ino:stability", _show(p), f"st_ino changed only on side {side}", frozenset([p])
                )
            )
    return out
