"""Reads: page-cached data is served at once, the rest from a worker thread; both exact."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Mounted, Stack
from tests.features import hook_enabled
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


def _served_in_c(log: str) -> int | None:
    found = re.search(r"reads answered in C: (\d+)", log)
    return int(found.group(1)) if found else None


def watched(how: str, tmp_path: Path) -> dict[str, Any]:
    """The mount arguments for a daemon whose requests are not watched ("plain"), logged
    ("debug", -d) or traced ("traced", -o trace=FILE)."""
    if how == "debug":
        return {"args": ["-d"]}
    if how == "traced":
        return {"extra_options": f"trace={tmp_path / 'trace.jsonl'}"}
    assert how == "plain", how
    return {}


@pytest.mark.parametrize("how", ["plain", "debug", "traced"])
def test_page_cached_reads_are_answered_in_c_unless_requests_are_watched(
    stack: Stack, mounted: Mounted, tmp_path: Path, how: str
) -> None:
    """With the C hook, a READ of page-cached data never reaches Python (csrc/ops.c);
    with -d or a trace every READ goes through Python, which logs or traces it."""
    data = os.urandom(1 << 20)
    write(stack.lowers[1] / "f", data)
    um = mounted(**watched(how, tmp_path))
    for _ in range(2):
        with open(stack.mnt / "f", "rb", buffering=0) as f:
            assert f.read() == data
        _evict(stack.mnt / "f")  # the next open reads through the daemon again
    assert um.unmount() == 0
    served = _served_in_c(um.log())
    if not hook_enabled():
        assert served is None
    elif how == "plain":
        assert served is not None and served >= 2
    else:
        assert served == 0
