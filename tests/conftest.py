"""Shared fixtures: every mount a test makes is unmounted in ``finally``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import UnionMount, kernel_overlay, lazy_unmount, start_unionfs


def _fuse_usable() -> bool:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


FUSE_USABLE = _fuse_usable()


def staged(work: Path) -> list[str]:
    """What copy-ups and whiteouts left in WORKDIR/work, besides the shared whiteout
    that every whiteout is a hard link of (the kernel keeps one there too)."""
    return sorted(n for n in os.listdir(work) if n != "#whiteout")


@pytest.fixture(autouse=True)
def _no_mount_left_behind(tmp_path: Path) -> Iterator[None]:
    """Fail any test that leaves a mount under its temp dir (and clean it up)."""
    yield
    prefix = os.fspath(tmp_path)
    with open("/proc/self/mounts") as f:
        left = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    for mnt in reversed(left):
        lazy_unmount(mnt)
    assert not left, f"test left mounts behind: {left}"


@dataclass
class Stack:
    """Layer directories of one test: lowers (top first), upper, work, mountpoint."""

    root: Path
    lowers: list[Path]
    upper: Path
    work: Path
    mnt: Path

    def mount(self, readonly: bool = False, extra_options: str = "", **kw: Any) -> UnionMount:
        if not FUSE_USABLE:
            pytest.fail("/dev/fuse is not usable: the suite needs real FUSE mounts")
        if readonly:
            return start_unionfs(self.lowers, self.mnt, extra_options=extra_options, **kw)
        return start_unionfs(
            self.lowers, self.mnt, self.upper, self.work, extra_options=extra_options, **kw
        )


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    d = {n: tmp_path / n for n in ("l1", "l2", "upper", "work", "mnt")}
    for p in d.values():
        p.mkdir()
    return Stack(tmp_path, [d["l1"], d["l2"]], d["upper"], d["work"], d["mnt"])


Mounted = Callable[..., UnionMount]  # the ``mounted`` fixture
KernelMount = Callable[..., AbstractContextManager[Path]]  # the ``kernel`` fixture


@pytest.fixture
def mounted(stack: Stack) -> Iterator[Mounted]:
    """``mounted()`` mounts the stack (after the test filled its lowers); unmounts at the end."""
    mounts: list[UnionMount] = []

    def mount(**kw: Any) -> UnionMount:
        um = stack.mount(**kw)
        mounts.append(um)
        return um

    try:
        yield mount
    finally:
        for um in reversed(mounts):
            um.unmount()


@pytest.fixture
def kernel(tmp_path: Path) -> KernelMount:
    """``kernel(lowers, upper)``: a kernel overlay over the given dirs, as a context manager."""

    def make(
        lowers: list[Path], upper: Path | None = None, name: str = "k"
    ) -> AbstractContextManager[Path]:
        mnt = tmp_path / f"{name}-mnt"
        mnt.mkdir(exist_ok=True)
        work = None
        if upper is not None:
            work = tmp_path / f"{name}-work"
            work.mkdir(exist_ok=True)
        return kernel_overlay(lowers, mnt, upper, work)

    return make
