"""Kernel caches: listings cached by the kernel stay exact, offsets stay valid.

The daemon answers opendir with ENOSYS (through unionfs/fuse/csrc/listing.c),
so the kernel caches every directory listing and names each READDIR by inode
only. These tests check that the cache is really used, and that it never shows
a stale name after a change through the mount, comparing with the kernel overlay.

``make test`` runs the real-mount tests a second time with the C hook disabled
(``UNIONFS_NO_HOOK=1``): then the same tests check the fallback instead, every
listing and symlink read going to the daemon through ordinary handles.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import KernelMount, Mounted, Stack
from tests.mounting import UnionMount
from tests.test_merge import write as _write


def write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, data)


HOOKED = os.environ.get("UNIONFS_NO_HOOK", "") in ("", "0")


def _served_by_kernel(um: UnionMount, before: int, after: int) -> None:
    """With the hook the kernel answered from its cache (the daemon saw nothing
    more); without it, the daemon answered, and said once why."""
    if HOOKED:
        assert after == before
    else:
        assert after > before
        assert um.log().count("C hook disabled") == 1


def _readdirs(um: UnionMount) -> int:
    return len(re.findall(r"DEBUG: readdir\(", um.log()))


def _opendirs(um: UnionMount) -> int:
    return len(re.findall(r"DEBUG: opendir\(", um.log()))


def test_a_listing_read_twice_is_served_by_the_kernel_the_second_time(
    stack: Stack, mounted: Mounted
) -> None:
    for i in range(50):
        write(stack.lowers[1] / "d" / f"f{i}", b"x")
    um = mounted(args=["-d"])
    first = sorted(os.listdir(stack.mnt / "d"))
    after_first = _readdirs(um)
    assert after_first >= 1
    for _ in range(3):
        assert sorted(os.listdir(stack.mnt / "d")) == first
    _served_by_kernel(um, after_first, _readdirs(um))  # no READDIR reached the daemon
    if HOOKED:
        assert _opendirs(um) <= 1  # answered ENOSYS once; the kernel never asks again
    else:
        assert _opendirs(um) == 4


def _tree(root: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel] = sorted(dirnames + filenames)
    return out


def _fill(stack: Stack) -> None:
    write(stack.lowers[1] / "a" / "low", b"1")
    write(stack.lowers[1] / "a" / "gone", b"1")
    write(stack.lowers[0] / "a" / "mid", b"2")
    write(stack.lowers[1] / "b" / "x", b"3")
    write(stack.lowers[0] / "c" / "sub" / "deep", b"4")
    write(stack.lowers[1] / "top", b"5")


def _steps(m: Path) -> list[Callable[[], None]]:
    def fifo() -> None:
        os.mkfifo(m / "a" / "fifo")

    def sock() -> None:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(os.fspath(m / "b" / "sock"))
        finally:
            s.close()

    return [
        lambda: write(m / "a" / "new", b"n"),
        lambda: os.mkdir(m / "a" / "newdir"),
        lambda: os.symlink("low", m / "a" / "ln"),
        fifo,
        sock,
        lambda: os.link(m / "a" / "low", m / "b" / "hard"),
        lambda: os.unlink(m / "a" / "gone"),
        lambda: os.rmdir(m / "a" / "newdir"),
        lambda: os.rename(m / "a" / "mid", m / "a" / "mid2"),
        lambda: os.rename(m / "a" / "low", m / "b" / "low"),
        lambda: os.rename(m / "top", m / "b" / "x"),  # replaces a lower file
        lambda: os.rename(m / "c" / "sub" / "deep", m / "deep"),
        lambda: os.rmdir(m / "c" / "sub"),
        lambda: os.mkdir(m / "c" / "sub"),  # opaque over the removed one
        lambda: write(m / "c" / "sub" / "again", b"a"),
    ]


def test_listings_after_each_change_match_the_kernel_overlay(
    stack: Stack, mounted: Mounted, kernel: KernelMount, tmp_path: Path
) -> None:
    """Every listing is read (and so cached) before each change, then compared."""
    _fill(stack)
    k_upper = tmp_path / "k-upper"
    k_upper.mkdir()
    k_lowers = [tmp_path / "k-l1", tmp_path / "k-l2"]
    _fill(Stack(tmp_path, k_lowers, k_upper, tmp_path / "unused", tmp_path / "unused"))
    mounted()
    with kernel(k_lowers, k_upper) as kmnt:
        ours_steps, kernel_steps = _steps(stack.mnt), _steps(Path(kmnt))
        assert _tree(stack.mnt) == _tree(Path(kmnt))
        for i, (ours, theirs) in enumerate(zip(ours_steps, kernel_steps, strict=True)):
            ours()
            theirs()
            assert _tree(stack.mnt) == _tree(Path(kmnt)), f"after step {i}"


def test_offsets_stay_valid_when_names_change_during_a_read(stack: Stack, mounted: Mounted) -> None:
    """Names that exist for the whole read are returned exactly once, however the
    directory changes in between (POSIX leaves only added and removed names open)."""
    names = [f"entry-{i:04d}" for i in range(400)]
    for n in names:
        write(stack.lowers[1] / "big" / n, b"")
    mounted()
    d = stack.mnt / "big"
    for rounds in range(2):  # the second read starts from the kernel's cache
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        seen: list[str] = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    seen.append(entry.name)
                    if len(seen) == 60:
                        # Remove names already read and names not yet read, add new ones.
                        for victim in seen[:20] + sorted(set(names) - set(seen))[:20]:
                            os.unlink(d / victim)
                        for j in range(30):
                            write(d / f"added-{rounds}-{j}", b"")
        finally:
            os.close(fd)
        assert len(seen) == len(set(seen)), "a name was returned twice"
        now = set(os.listdir(d))
        constant = set(names) & now
        missing = constant - set(seen)
        assert not missing, f"names that never changed were skipped: {sorted(missing)[:5]}"
        names = sorted(now)


def test_symlink_targets_are_cached_and_never_stale(stack: Stack, mounted: Mounted) -> None:
    os.symlink("lower-target", stack.lowers[1] / "ln")
    um = mounted(args=["-d"])
    link = stack.mnt / "ln"
    assert os.readlink(link) == "lower-target"
    asked = len(re.findall(r"DEBUG: readlink\(", um.log()))
    for _ in range(3):
        assert os.readlink(link) == "lower-target"
    _served_by_kernel(um, asked, len(re.findall(r"DEBUG: readlink\(", um.log())))
    os.unlink(link)
    os.symlink("second", link)
    assert os.readlink(link) == "second"
    os.symlink("third", stack.mnt / "tmp-ln")
    os.rename(stack.mnt / "tmp-ln", link)
    assert os.readlink(link) == "third"
    for i in range(20):  # new links may reuse a freed inode number
        os.unlink(link)
        os.symlink(f"t{i}", link)
        assert os.readlink(link) == f"t{i}"
    os.chown(link, 1000, 1000, follow_symlinks=False)  # copy-up keeps the target
    assert os.readlink(link) == "t19"


def test_a_read_spanning_a_change_leaves_the_cache_usable(stack: Stack, mounted: Mounted) -> None:
    for i in range(600):
        write(stack.lowers[1] / "d" / f"n{i:04d}", b"")
    um = mounted(args=["-d"])
    d = stack.mnt / "d"
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(fd) as it:
            for k, _ in enumerate(it):
                if k == 100:
                    os.unlink(d / "n0000")
                    write(d / "new", b"")
    finally:
        os.close(fd)
    expected = sorted({f"n{i:04d}" for i in range(1, 600)} | {"new"})
    assert sorted(os.listdir(d)) == expected  # refills the cache
    before = _readdirs(um)
    assert sorted(os.listdir(d)) == expected
    _served_by_kernel(um, before, _readdirs(um))  # and the next listing is served from it


def test_a_filesystem_root_inside_a_layer_lists(stack: Stack, mounted: Mounted) -> None:
    """A mount inside a layer has inode 1 at its root, which unionfs renumbers high."""
    t = stack.lowers[1] / "t"
    t.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", os.fspath(t)], check=True)
    try:
        write(t / "inside", b"x")
        mounted()
        assert os.listdir(stack.mnt / "t") == ["inside"]
        assert (stack.mnt / "t" / "inside").read_bytes() == b"x"
        write(stack.mnt / "t" / "more", b"y")
        assert sorted(os.listdir(stack.mnt / "t")) == ["inside", "more"]
    finally:
        subprocess.run(["umount", "-l", os.fspath(t)], check=False)
