"""Open files: they follow a copy-up, survive an unlink, and never reach a lower layer."""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from tests.conftest import KernelMount, Mounted, Stack, staged
from tests.test_merge import write


def test_fchmod_of_an_unlinked_file_opened_before_copy_up_spares_the_lower(
    stack: Stack, mounted: Mounted
) -> None:
    lower_file = stack.lowers[0] / "f"
    write(lower_file, b"lower")
    os.chmod(lower_file, 0o644)
    mounted()
    f = stack.mnt / "f"
    fd = os.open(f, os.O_RDONLY)  # opened on the lower file
    try:
        with open(f, "r+b") as w:  # copy-up
            w.write(b"UPPER")
        assert os.pread(fd, 5, 0) == b"UPPER"  # the old fd follows the copy
        os.unlink(f)
        os.fchmod(fd, 0o4777)
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(lower_file).st_mode) == 0o644
    assert lower_file.read_bytes() == b"lower"


def test_unlink_during_a_large_copy_up_does_not_fail_the_opener(
    stack: Stack, mounted: Mounted
) -> None:
    big = stack.lowers[0] / "big"
    with open(big, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(256):
            f.write(block)
    mounted()
    result: list[object] = []

    def opener() -> None:
        try:
            fd = os.open(stack.mnt / "big", os.O_WRONLY)
            os.close(fd)
            result.append("ok")
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=opener)
    t.start()
    work = stack.work / "work"
    while not staged(work) and t.is_alive():
        pass
    os.unlink(stack.mnt / "big")
    t.join()
    assert result == ["ok"]
    assert not os.path.lexists(stack.mnt / "big")
    assert staged(work) == []


def test_changing_an_open_lower_file_after_its_unlink_fails_as_in_the_kernel(
    stack: Stack, mounted: Mounted, kernel: KernelMount, tmp_path: Path
) -> None:
    """Conformance seed 42420157: the copy-up has nowhere to go, the name holds a whiteout."""
    k_lower, k_upper = tmp_path / "k-lower", tmp_path / "k-upper"
    k_lower.mkdir()
    k_upper.mkdir()
    for lower in (stack.lowers[0], k_lower):
        write(lower / "c", b"lower")
        os.chmod(lower / "c", 0o644)
    mounted()
    errnos = []
    with kernel([k_lower], k_upper) as kmnt:
        for root in (Path(kmnt), stack.mnt):
            fd = os.open(root / "c", os.O_RDONLY)
            try:
                os.unlink(root / "c")
                got = []
                changes: list[Callable[[int], None]] = [
                    lambda fd: os.fchmod(fd, 0o4755),
                    lambda fd: os.fchown(fd, 1000, 1000),
                    lambda fd: os.utime(fd, (1, 1)),
                    lambda fd: os.setxattr(fd, "user.k", b"v"),
                ]
                for change in changes:
                    try:
                        change(fd)
                        got.append("ok")
                    except OSError as e:
                        got.append(errno.errorcode[e.errno or 0])
                assert os.pread(fd, 5, 0) == b"lower"
                errnos.append(got)
            finally:
                os.close(fd)
    assert errnos[1] == errnos[0]
    assert stat.S_IMODE(os.stat(stack.lowers[0] / "c").st_mode) == 0o644


def test_o_direct_create_then_write(stack: Stack, mounted: Mounted) -> None:
    mounted()
    fd = os.open(stack.mnt / "direct", os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
    # A page-aligned buffer, as O_DIRECT asks of the caller: with passthrough the
    # write reaches the upper file as O_DIRECT, as on the kernel overlay.
    buf = mmap.mmap(-1, 4096)
    buf.write(b"x" * 4096)
    try:
        assert os.write(fd, buf) == 4096
    finally:
        os.close(fd)
        buf.close()
    assert os.stat(stack.upper / "direct").st_size == 4096
