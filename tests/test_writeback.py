"""``-o writeback=1``: the kernel's write-back cache keeps data, size and mtime right.

Under the write-back cache the kernel holds written pages and sends them
later, reads pages back through write-only handles, computes append offsets
and keeps mtime and size itself. Each test compares with the kernel overlay
or with the upper after unmount.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import KernelMount, Mounted, Stack
from tests.test_merge import write
from tests.test_namespace import as_user, let_others_in

WB = "writeback=1"


def _same_ops(root: Path) -> None:
    """Partial-page writes through a write-only handle, an append, truncates."""
    fd = os.open(root / "big", os.O_WRONLY)
    try:
        os.pwrite(fd, b"HELLO", 5000)  # middle of a page: the rest must be read back
        os.pwrite(fd, b"END", 20000)  # beyond the end: a hole, then data
    finally:
        os.close(fd)
    fd = os.open(root / "log", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"second line\n")
        os.write(fd, b"third line\n")
    finally:
        os.close(fd)
    fd = os.open(root / "shrink", os.O_RDWR)
    try:
        os.ftruncate(fd, 3)
        os.pwrite(fd, b"+", 10)
    finally:
        os.close(fd)
    os.truncate(root / "grow", 9000)


def _fill(lower: Path) -> None:
    write(lower / "big", bytes(range(256)) * 40)  # 10240 bytes
    write(lower / "log", b"first line\n")
    write(lower / "shrink", b"0123456789abcdef")
    write(lower / "grow", b"g")


def test_data_and_sizes_match_the_kernel_overlay(
    stack: Stack, mounted: Mounted, kernel: KernelMount, tmp_path: Path
) -> None:
    _fill(stack.lowers[0])
    k_lower, k_upper = tmp_path / "k-lower", tmp_path / "k-upper"
    k_upper.mkdir()
    k_lower.mkdir()
    _fill(k_lower)
    um = mounted(extra_options=WB)
    with kernel([k_lower], k_upper) as kmnt:
        _same_ops(stack.mnt)
        _same_ops(Path(kmnt))
        for name in ("big", "log", "shrink", "grow"):
            ours, theirs = stack.mnt / name, Path(kmnt) / name
            assert ours.read_bytes() == theirs.read_bytes(), name
            assert os.stat(ours).st_size == os.stat(theirs).st_size, name
    shown = {n: (stack.mnt / n).read_bytes() for n in ("big", "log", "shrink", "grow")}
    assert um.unmount() == 0
    for name, data in shown.items():  # everything written reached the upper by unmount
        assert (stack.upper / name).read_bytes() == data, name


def test_mtime_shown_is_the_mtime_stored(stack: Stack, mounted: Mounted) -> None:
    write(stack.lowers[0] / "f", b"old")
    os.utime(stack.lowers[0] / "f", (1_000_000_000, 1_000_000_000))
    um = mounted(extra_options=WB)
    p = stack.mnt / "f"
    with open(p, "r+b") as f:
        f.write(b"new data")
        f.flush()
        during = os.fstat(f.fileno())
        assert during.st_size == 8
        assert during.st_mtime > 1_000_000_000  # the write moved mtime at once
    after_close = os.stat(p)
    assert um.unmount() == 0
    stored = os.stat(stack.upper / "f")
    assert stored.st_mtime_ns == after_close.st_mtime_ns
    assert stored.st_size == 8
    um = mounted(extra_options=WB)  # and a fresh mount shows the same
    assert os.stat(p).st_mtime_ns == after_close.st_mtime_ns
    assert p.read_bytes() == b"new data"


def test_explicit_utime_after_writes_wins(stack: Stack, mounted: Mounted) -> None:
    write(stack.lowers[0] / "f", b"x")
    um = mounted(extra_options=WB)
    p = stack.mnt / "f"
    with open(p, "ab") as f:
        f.write(b"more")
    os.utime(p, ns=(5_000_000_000, 6_000_000_000))
    assert os.stat(p).st_mtime_ns == 6_000_000_000
    assert um.unmount() == 0
    assert os.stat(stack.upper / "f").st_mtime_ns == 6_000_000_000
    assert (stack.upper / "f").read_bytes() == b"xmore"


def test_an_unprivileged_write_still_clears_setuid(stack: Stack, mounted: Mounted) -> None:
    let_others_in(stack)
    p = stack.lowers[0] / "prog"
    write(p, b"#!/bin/sh\n")
    os.chmod(p, 0o6777)
    mounted(extra_options=WB)
    r = as_user(f"echo x >> {stack.mnt}/prog")
    assert r.returncode == 0, r.stderr
    assert os.stat(stack.mnt / "prog").st_mode & 0o6000 == 0
    assert (stack.mnt / "prog").read_bytes() == b"#!/bin/sh\nx\n"


def test_writes_through_mmap_reach_the_upper(stack: Stack, mounted: Mounted) -> None:
    import mmap

    write(stack.lowers[0] / "m", b"a" * 8192)
    um = mounted(extra_options=WB)
    with open(stack.mnt / "m", "r+b") as f, mmap.mmap(f.fileno(), 8192) as mm:
        mm[4096:4100] = b"ZZZZ"
        mm.flush()
    assert um.unmount() == 0
    data = (stack.upper / "m").read_bytes()
    assert data[4096:4100] == b"ZZZZ" and data.count(b"a") == 8188
