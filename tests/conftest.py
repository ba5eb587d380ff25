"""Shared fixtures: every mount a test makes is unmounted in ``finally``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import UnionMount, start_unionfs


def _fuse_usable() -> bool:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


FUSE_USABLE = _fuse_usable()


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    """Empty lower (l1 top, l2 bottom), upper, work and mountpoint directories."""
    d = {name: tmp_path / name for name in ("l1", "l2", "upper", "work", "mnt")}
    for p in d.values():
        p.mkdir()
    return d


@pytest.fixture
def union(layers: dict[str, Path]) -> Iterator[UnionMount]:
    """unionfs over l1:l2 with an upper; populate the lowers before first use via ``remount``."""
    if not FUSE_USABLE:
        pytest.fail("/dev/fuse is not usable: the suite needs real FUSE mounts")
    um = start_unionfs([layers["l1"], layers["l2"]], layers["mnt"], layers["upper"], layers["work"])
    try:
        yield um
    finally:
        um.unmount()
