"""st_ino and nlink as the kernel overlay shows them: lower hard links, copy-up,
merged directories, the root, and across a remount (origin xattrs).

Each test runs the same steps on unionfs and on the kernel overlay over a copy of
the same layers and compares every st_ino by the layer inode it stands for. The
C hook reports an st_ino other than the FUSE node id; without it
(``UNIONFS_NO_HOOK=1``) the node id is the st_ino, and the tests check the
documented fallback instead.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.twins import HOOK, Twin, kernel_over, twins, unionfs_over, write

NAMES = ["d/a", "d/b", "c", "d"]


def _lower_hard_links(lowers: list[Path]) -> None:
    write(lowers[0] / "d" / "a", b"shared")
    os.link(lowers[0] / "d" / "a", lowers[0] / "d" / "b")
    os.link(lowers[0] / "d" / "a", lowers[0] / "c")


def _seen(t: Twin) -> list[tuple[str, str, int]]:
    return [(p, t.identity(p), os.lstat(t.mnt / p).st_nlink) for p in NAMES]


def test_lower_hard_links_show_the_lower_inode_until_copy_up_splits_one(tmp_path: Path) -> None:
    u, k = twins(tmp_path, _lower_hard_links)
    seen = {}
    for t in (u, k):
        with t.mount():
            before = _seen(t)
            os.chmod(t.mnt / "d" / "a", 0o600)  # copy-up splits this name off
            after = _seen(t)
            with open(t.mnt / "c", "ab") as f:  # and this one, by a write
                f.write(b"+")
            written = _seen(t)
            d_ino = {e.name: e.inode() for e in os.scandir(t.mnt / "d")}
            shown = {n: os.lstat(t.mnt / "d" / n).st_ino for n in d_ino}
            seen[t.kind] = (before, after, written, d_ino == shown)
    if HOOK:
        assert seen["unionfs"] == seen["kernel"]
        assert seen["kernel"][0][0][1] == "l0:c l0:d/a l0:d/b"  # one inode, three names
        return
    # Without the hook the names keep apart numbers; the nlink is still the kernel's.
    (before, after, _, _) = seen["unionfs"]
    assert len({ident for _, ident, _ in before[:3]}) == 3
    assert [n for *_, n in before] == [n for *_, n in seen["kernel"][0]]
    assert [n for *_, n in after] == [n for *_, n in seen["kernel"][1]]


def test_numbers_of_lower_hard_links_fit_in_32_bits(tmp_path: Path) -> None:
    """What the kernel shows (the lower inode's number), so non-LFS stat works."""
    u, _ = twins(tmp_path, _lower_hard_links)
    with u.mount():
        inos = {os.lstat(u.mnt / p).st_ino for p in NAMES[:3]}
    if HOOK:
        assert inos == {os.lstat(u.lowers[0] / "c").st_ino}
    else:
        assert len(inos) == 3


def _copy_ups(lowers: list[Path]) -> None:
    write(lowers[0] / "file", b"f")
    (lowers[0] / "dir" / "sub").mkdir(parents=True)
    write(lowers[0] / "dir" / "in")
    os.symlink("file", lowers[0] / "sym")
    os.mkfifo(lowers[0] / "fifo")
    write(lowers[0] / "hard", b"h")
    os.link(lowers[0] / "hard", lowers[0] / "hard2")
    (lowers[0] / "merged").mkdir()


COPIED = ["file", "dir", "dir/sub", "sym", "fifo", "hard", "hard2", "merged", "new"]


def _change(mnt: Path) -> None:
    os.chmod(mnt / "file", 0o600)
    os.chmod(mnt / "dir", 0o700)
    os.chown(mnt / "sym", 1, 1, follow_symlinks=False)
    os.chmod(mnt / "fifo", 0o600)
    os.chmod(mnt / "hard", 0o600)  # a lower hard link: no origin, the upper's number
    write(mnt / "merged" / "x")
    write(mnt / "new")


def _identities(t: Twin) -> list[str]:
    return [t.identity(p) for p in COPIED]


def test_st_ino_survives_a_remount_and_either_kind_reads_the_others_origins(
    tmp_path: Path,
) -> None:
    u, k = twins(tmp_path, _copy_ups)
    views = {}
    for t in (u, k):
        with t.mount():
            _change(t.mnt)
            views[t.kind, "live"] = _identities(t)
        t.remount_work()
        with t.mount():
            views[t.kind, "again"] = _identities(t)
    # Each kind over the upper the other one wrote.
    for t, other in ((kernel_over(u), "unionfs"), (unionfs_over(k), "kernel")):
        t.remount_work()
        with t.mount():
            views[other, "other kind"] = _identities(t)
    assert views["kernel", "live"][0] == "l0:file" and views["kernel", "live"][5] == "u:hard"
    if not HOOK:  # names of lower hard links: numbers of their own (the node ids)
        for view in views.values():
            del view[5:7]
    for when in ("live", "again", "other kind"):
        assert views["unionfs", when] == views["kernel", when], when


def test_the_root_shows_the_upper_roots_number(tmp_path: Path) -> None:
    u, k = twins(tmp_path, _copy_ups)
    shown = {}
    for t in (u, k):
        with t.mount():
            shown[t.kind] = t.identity("")
            assert stat.S_ISDIR(os.stat(t.mnt).st_mode)
    assert shown["kernel"] == "u:"
    assert shown["unionfs"] == ("u:" if HOOK else "not a layer inode (1)")
