"""Copy-ups and a power loss: ``-o fsync=auto`` and ``fsync=strict``, the kernel's option.

By default, as fuse-overlayfs, a copy-up is renamed into place without an fsync, so a
power loss can leave the upper with the new name and not the data: the file then shows
empty (or, for a metadata-only copy given its data, as holes) where the lower file had
content. With ``fsync=auto`` (the kernel overlay's default) the copied data is on disk
before the copy is put in place; ``fsync=strict`` also syncs a copy of metadata only, of
a file or a directory.

A power loss is played here without pulling a plug: the upper and workdir are on an
ext4 of their own on a loop device, whose writes reach its backing file as the block
layer completes them. A copy of that file taken while the filesystem is mounted holds
exactly what the disk holds at that moment, and mounting the copy replays the journal
as after a crash. Before the copy, the test commits the journal by fsyncing a file of
its own: that makes the copy-up's renames durable (they are journalled metadata)
without writing anyone else's data, which is what a power loss some seconds after
the copy-up would find.

Needs a loop device, as test_grpid.py, so the container stage (examples/ci-container.sh)
does not run it.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import mounted_by, start_unionfs
from tests.test_opens import _strace

SMALL = os.urandom(8 << 10)  # copied on the event loop
BIG = os.urandom(3 << 20)  # copied in a worker thread (copyup.THREAD_THRESHOLD)


@contextlib.contextmanager
def _ext4(at: Path) -> Iterator[Path]:
    """A fresh journalled ext4 (default options: ordered data, delayed allocation)
    mounted at *at* from a loop device; its image is ``at.img``."""
    image = at.parent / (at.name + ".img")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", os.fspath(image)], check=True, capture_output=True)
    at.mkdir()
    try:
        with mounted_by(["mount", "-o", "loop", os.fspath(image)], at):
            yield at
    finally:
        image.unlink()


def _commit_journal(fs: Path) -> None:
    """Commit the running journal transaction (every metadata change made so far) by
    fsyncing a file of our own; data still waiting in the page cache stays there."""
    fd = os.open(fs / "commit", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b".")
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _after_power_loss(fs: Path) -> Iterator[Path]:
    """What *fs* holds after a power loss now: its disk copied and mounted (the journal
    replayed) beside it."""
    image = fs.parent / (fs.name + ".img")
    lost = fs.parent / "lost.img"
    with open(image, "rb") as src, open(lost, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    at = fs.parent / "after"
    at.mkdir()
    try:
        with mounted_by(["mount", "-o", "loop", os.fspath(lost)], at):  # replays the journal
            yield at
    finally:
        lost.unlink()


def _lower(tmp_path: Path) -> Path:
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "d/small").write_bytes(SMALL)
    (lower / "d/big").write_bytes(BIG)
    return lower


def _survived(after: Path) -> dict[str, bool]:
    """Whether each copy-up shows its data after the power loss (it is there: the
    renames were committed)."""
    out = {}
    for name, data in (("small", SMALL), ("big", BIG)):
        path = after / "upper/d" / name
        assert path.exists(), f"{name}: the copy-up's rename was not committed"
        out[name] = path.read_bytes() == data
    return out


@pytest.mark.parametrize("fsync", ["auto", "strict", None], ids=["auto", "strict", "default"])
def test_a_copy_up_survives_a_power_loss(tmp_path: Path, fsync: str | None) -> None:
    """Open a lower file for writing (a copy-up, nothing written), commit the journal,
    lose power: with ``fsync=auto`` or ``strict`` the upper copy holds the lower
    file's data. Negative control: without either, the copy is there without its data."""
    lower = _lower(tmp_path)
    with _ext4(tmp_path / "fs") as fs:
        (fs / "upper").mkdir()
        (fs / "work").mkdir()
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        um = start_unionfs(
            [lower], mnt, fs / "upper", fs / "work", extra_options=f"fsync={fsync}" if fsync else ""
        )
        try:
            for name in ("small", "big"):
                os.close(os.open(mnt / "d" / name, os.O_WRONLY | os.O_APPEND))
            assert (fs / "upper/d/big").stat().st_size == len(BIG)
            _commit_journal(fs)
            with _after_power_loss(fs) as after:
                survived = _survived(after)
        finally:
            assert um.unmount() == 0, um.log()
    if fsync:
        assert survived == {"small": True, "big": True}
    else:
        assert not all(survived.values()), survived


@pytest.mark.parametrize("fsync", ["auto", None], ids=["auto", "default"])
def test_a_metadata_only_copy_given_its_data_survives_a_power_loss(
    tmp_path: Path, fsync: str | None
) -> None:
    """``metacopy=on``: chmod copies up metadata only (committed), then an open for
    writing gives the copy its data in place and drops its marker. After a power loss
    with ``fsync=auto`` the file, marker gone, holds the data (the kernel syncs it before
    removing the marker too). Negative control: without it, the marker is gone and the
    data with it (holes)."""
    lower = _lower(tmp_path)
    with _ext4(tmp_path / "fs") as fs:
        (fs / "upper").mkdir()
        (fs / "work").mkdir()
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        options = "metacopy=on" + (f",fsync={fsync}" if fsync else "")
        um = start_unionfs([lower], mnt, fs / "upper", fs / "work", extra_options=options)
        try:
            for name in ("small", "big"):
                os.chmod(mnt / "d" / name, 0o600)
            assert "trusted.overlay.metacopy" in os.listxattr(fs / "upper/d/big")
            _commit_journal(fs)
            for name in ("small", "big"):
                os.close(os.open(mnt / "d" / name, os.O_WRONLY | os.O_APPEND))
            assert "trusted.overlay.metacopy" not in os.listxattr(fs / "upper/d/big")
            _commit_journal(fs)
            with _after_power_loss(fs) as after:
                for name in ("small", "big"):
                    assert "trusted.overlay.metacopy" not in os.listxattr(after / "upper/d" / name)
                survived = _survived(after)
        finally:
            assert um.unmount() == 0, um.log()
    if fsync:
        assert survived == {"small": True, "big": True}
    else:
        assert not all(survived.values()), survived


def _synced_before_rename(trace: str) -> dict[str, bool]:
    """From ``strace -y``: each workdir entry renamed into the upper, and whether it was
    fsynced (through an fd of it) before its rename."""
    synced: set[str] = set()
    out: dict[str, bool] = {}
    for line in trace.splitlines():
        if m := re.search(r"\bfsync\(\d+<[^>]*/work/([^/>]+)>", line):
            synced.add(m.group(1))
        elif m := re.search(
            r'\brenameat2\(\d+<[^>]*/work>, "([^"]+)", \d+<[^>]*/upper[^>]*>, "([^"]+)"', line
        ):
            out[m.group(2)] = m.group(1) in synced
    return out


@pytest.mark.parametrize("fsync", ["strict", "auto"])
def test_strict_syncs_copies_of_metadata_only(tmp_path: Path, fsync: str) -> None:
    """``fsync=strict`` (for filesystems that do not keep metadata in order, as the
    kernel's): a directory copied up as a parent and a file copied up for a chmod with
    ``metacopy=on`` are each fsynced before their rename into place, and a full copy-up
    too. ``fsync=auto`` syncs only the data copy (the negative control: the check sees
    a copy put in place unsynced). No power loss can show this on ext4, which journals
    the metadata in order; strace shows it."""
    lower = _lower(tmp_path)
    (lower / "d/sub").mkdir()
    (lower / "d/sub/f").write_bytes(b"f")
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    um = start_unionfs([lower], mnt, upper, work, extra_options=f"metacopy=on,fsync={fsync}")
    try:
        os.stat(mnt / "d/sub/f")
        os.stat(mnt / "d/small")
        out = tmp_path / "strace.out"
        with _strace(um.pid, out, "-y", "-e", "trace=fsync,renameat2"):
            os.chmod(mnt / "d/sub/f", 0o600)  # d and d/sub as parents, then f's metadata
            os.close(os.open(mnt / "d/small", os.O_WRONLY | os.O_APPEND))  # with its data
        renames = _synced_before_rename(out.read_text())
    finally:
        assert um.unmount() == 0, um.log()
    assert set(renames) == {"d", "sub", "f", "small"}, renames
    if fsync == "strict":
        assert all(renames.values()), renames
    else:
        assert renames == {"d": False, "sub": False, "f": False, "small": True}, renames
