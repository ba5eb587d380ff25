"""Reads: page-cached data is served at once, the rest from a worker thread; both exact."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.conftest import Mounted, Stack
from tests.test_merge import write


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _sha(path: Path, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def test_cold_partly_cached_and_short_reads_return_exact_data(
    stack: Stack, mounted: Mounted
) -> None:
    data = os.urandom(8 << 20) + b"tail-not-page-aligned"
    big = stack.lowers[1] / "big"
    write(big, data)
    write(stack.lowers[1] / "small", b"tiny")
    write(stack.lowers[1] / "empty", b"")
    expect = hashlib.sha256(data).hexdigest()
    _evict(big)
    with open(big, "rb") as f:  # cache the second MiB only: reads cross cached/uncached parts
        f.seek(1 << 20)
        f.read(1 << 20)
    mounted()
    assert _sha(stack.mnt / "big", 1 << 20) == expect
    assert (stack.mnt / "small").read_bytes() == b"tiny"
    assert (stack.mnt / "empty").read_bytes() == b""
    with open(stack.mnt / "big", "rb", buffering=0) as f:  # reads at and past the end
        assert f.read() == data
        assert os.pread(f.fileno(), 100, len(data) - 5) == data[-5:]
        assert os.pread(f.fileno(), 100, len(data) + 10) == b""


def test_a_read_racing_a_copy_up_of_its_file_stays_exact(stack: Stack, mounted: Mounted) -> None:
    data = os.urandom(16 << 20)
    write(stack.lowers[1] / "f", data)
    _evict(stack.lowers[1] / "f")
    mounted()
    reader = open(stack.mnt / "f", "rb", buffering=0)  # noqa: SIM115
    try:
        head = reader.read(1 << 20)
        with open(stack.mnt / "f", "r+b") as w:  # copy-up moves the reader to the upper copy
            w.seek(len(data))
            w.write(b"!")
        rest = reader.read()
    finally:
        reader.close()
    assert head + rest in (data, data + b"!")
    assert (stack.upper / "f").read_bytes() == data + b"!"
