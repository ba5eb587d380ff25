"""Markers in ``user.overlay.*`` (``-o userxattr``, and automatic where ``trusted.*``
cannot be written), checked against the kernel overlay mounted with ``userxattr``."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Mounted, Stack
from tests.mounting import kernel_overlay, overlay_options, unionfs_mounted
from tests.test_merge import write as _write
from tests.treesnap import diff, snapshot

TRUSTED_OPAQUE = "trusted.overlay.opaque"
USER_OPAQUE = "user.overlay.opaque"


def write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, data)


def xattrs(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n) for n in os.listxattr(path)}


def _lower_tree(lower: Path) -> None:
    write(lower / "d" / "old", b"below")
    write(lower / "d" / "keep", b"below")
    write(lower / "e" / "x", b"below")
    write(lower / "f", b"file")


def _changes(m: Path) -> None:
    """Changes that need opaque markers and whiteouts."""
    for name in os.listdir(m / "d"):
        os.unlink(m / "d" / name)
    os.rmdir(m / "d")
    os.mkdir(m / "d")  # over a whiteout: opaque
    write(m / "d" / "new", b"new")
    os.mkdir(m / "fresh")
    os.rename(m / "fresh", m / "e" / "moved")  # an upper-only dir moved into a merged one
    os.unlink(m / "f")


def test_userxattr_writes_user_overlay_markers_only(stack: Stack, mounted: Mounted) -> None:
    _lower_tree(stack.lowers[0])
    mounted(extra_options="userxattr")
    _changes(stack.mnt)
    assert sorted(os.listdir(stack.mnt / "d")) == ["new"]
    assert xattrs(stack.upper / "d") == {USER_OPAQUE: b"y"}
    assert xattrs(stack.upper / "e" / "moved") == {USER_OPAQUE: b"y"}
    assert not os.path.lexists(stack.mnt / "f")


def test_user_overlay_xattrs_are_hidden_and_cannot_be_set(stack: Stack, mounted: Mounted) -> None:
    _lower_tree(stack.lowers[0])
    mounted(extra_options="userxattr")
    _changes(stack.mnt)
    assert USER_OPAQUE not in os.listxattr(stack.mnt / "d")
    with pytest.raises(OSError) as e:
        os.getxattr(stack.mnt / "d", USER_OPAQUE)
    assert e.value.errno == errno.ENODATA
    for name in (USER_OPAQUE, "user.overlay.redirect", TRUSTED_OPAQUE):
        with pytest.raises(OSError) as e:
            os.setxattr(stack.mnt / "e" / "x", name, b"y")
        assert e.value.errno == errno.EOPNOTSUPP
    os.setxattr(stack.mnt / "e" / "x", "user.other", b"fine")  # ordinary user xattrs work
    assert os.getxattr(stack.mnt / "e" / "x", "user.other") == b"fine"


def test_an_upper_written_with_userxattr_mounts_with_the_kernel_userxattr(
    stack: Stack, mounted: Mounted, tmp_path: Path
) -> None:
    _lower_tree(stack.lowers[0])
    um = mounted(extra_options="userxattr")
    _changes(stack.mnt)
    ours = snapshot(stack.mnt)
    um.unmount()
    kmnt, kwork = tmp_path / "kmnt", tmp_path / "kwork"
    kmnt.mkdir()
    kwork.mkdir()
    opts = overlay_options(stack.lowers, stack.upper, kwork) + ",userxattr"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, kmnt], check=True)
    try:
        theirs = snapshot(kmnt)
    finally:
        subprocess.run(["umount", kmnt], check=False)
    assert diff(ours, theirs) == []


def test_an_upper_the_kernel_wrote_with_userxattr_shows_the_same_tree(tmp_path: Path) -> None:
    """Also in a mount that writes trusted.* itself: the other namespace is honoured."""
    lower, upper, work, kmnt, mnt = (tmp_path / n for n in ("l", "u", "w", "k", "m"))
    for d in (lower, upper, work, kmnt, mnt):
        d.mkdir()
    _lower_tree(lower)
    opts = overlay_options([lower], upper, work) + ",userxattr"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, kmnt], check=True)
    try:
        _changes(kmnt)
        theirs = snapshot(kmnt)
    finally:
        subprocess.run(["umount", kmnt], check=False)
    assert xattrs(upper / "d") == {USER_OPAQUE: b"y"}
    work2 = tmp_path / "w2"
    work2.mkdir()
    for extra in ("", "userxattr"):
        with unionfs_mounted([lower], mnt, upper, work2, extra_options=extra):
            assert diff(snapshot(mnt), theirs) == [], extra


def test_the_mount_s_own_namespace_wins(stack: Stack, mounted: Mounted) -> None:
    """trusted says not opaque, user says opaque: a trusted mount merges, a userxattr
    mount does not (each reads its own namespace first, as the kernel does)."""
    write(stack.lowers[0] / "d" / "below", b"x")
    (stack.upper / "d").mkdir()
    os.setxattr(stack.upper / "d", TRUSTED_OPAQUE, b"n")
    os.setxattr(stack.upper / "d", USER_OPAQUE, b"y")
    um = mounted()
    assert os.listdir(stack.mnt / "d") == ["below"]
    um.unmount()
    mounted(extra_options="userxattr")
    assert os.listdir(stack.mnt / "d") == []


def test_kernel_with_userxattr_agrees_on_the_same_upper(
    stack: Stack, mounted: Mounted, tmp_path: Path
) -> None:
    """The oracle for the previous rule's userxattr half."""
    write(stack.lowers[0] / "d" / "below", b"x")
    (stack.upper / "d").mkdir()
    os.setxattr(stack.upper / "d", TRUSTED_OPAQUE, b"n")
    os.setxattr(stack.upper / "d", USER_OPAQUE, b"y")
    kwork = tmp_path / "kwork"
    kwork.mkdir()
    kmnt = tmp_path / "kmnt"
    kmnt.mkdir()
    opts = overlay_options(stack.lowers, stack.upper, kwork) + ",userxattr"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, kmnt], check=True)
    try:
        assert os.listdir(kmnt / "d") == []
    finally:
        subprocess.run(["umount", kmnt], check=False)
    with kernel_overlay(stack.lowers, kmnt, stack.upper, kwork):
        assert os.listdir(kmnt / "d") == ["below"]
