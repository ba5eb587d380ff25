"""Copy-up: when it happens, what it keeps, and that it is atomic and off the event loop."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable

import pytest

from tests.conftest import Mounted, Stack, staged
from tests.test_merge import write

MTIME = 1_600_000_000_000_000_000


def make_lower_file(stack: Stack) -> None:
    l1 = stack.lowers[0]
    (l1 / "dir").mkdir()
    write(l1 / "dir" / "f", b"lower data")
    os.chown(l1 / "dir" / "f", 1234, 5678)
    os.chmod(l1 / "dir" / "f", 0o6755)  # after chown, which clears setuid/setgid
    os.setxattr(l1 / "dir" / "f", "user.tag", b"kept")
    os.setxattr(l1 / "dir" / "f", "trusted.t", b"kept too")
    os.utime(l1 / "dir" / "f", ns=(MTIME, MTIME))
    os.utime(l1 / "dir", ns=(MTIME, MTIME))


def _open_trunc(p: str) -> None:
    os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))


def _open_write(p: str) -> None:
    os.close(os.open(p, os.O_WRONLY))


TRIGGERS: dict[str, Callable[[str], None]] = {
    "open-for-write": _open_write,
    "open-O_TRUNC": _open_trunc,
    "truncate": lambda p: os.truncate(p, 3),
    "chmod": lambda p: os.chmod(p, 0o600),
    "chown": lambda p: os.chown(p, 1, 1),
    "utimes": lambda p: os.utime(p, ns=(5, 5)),
    "setxattr": lambda p: os.setxattr(p, "user.new", b"v"),
    "removexattr": lambda p: os.removexattr(p, "user.tag"),
    "link": lambda p: os.link(p, p + ".link"),
    "rename": lambda p: os.rename(p, p + ".moved"),
}


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_operations_that_copy_up(stack: Stack, mounted: Mounted, trigger: str) -> None:
    make_lower_file(stack)
    mounted()
    TRIGGERS[trigger](os.fspath(stack.mnt / "dir" / "f"))
    names = os.listdir(stack.upper / "dir")
    assert names, "nothing was copied up"
    assert (stack.lowers[0] / "dir" / "f").read_bytes() == b"lower data"


def test_read_only_access_does_not_copy_up(stack: Stack, mounted: Mounted) -> None:
    make_lower_file(stack)
    mounted()
    f = stack.mnt / "dir" / "f"
    assert f.read_bytes() == b"lower data"
    os.stat(f)
    os.listxattr(f)
    assert os.listdir(stack.upper) == []


def test_copy_up_keeps_mode_owner_times_xattrs(stack: Stack, mounted: Mounted) -> None:
    make_lower_file(stack)
    mounted()
    f = stack.mnt / "dir" / "f"
    before = os.stat(f)
    _open_write(os.fspath(f))  # nothing written
    up = os.stat(stack.upper / "dir" / "f")
    assert stat.S_IMODE(up.st_mode) == 0o6755  # setuid and setgid survive
    assert (up.st_uid, up.st_gid) == (1234, 5678)
    assert up.st_mtime_ns == MTIME
    assert (stack.upper / "dir" / "f").read_bytes() == b"lower data"
    assert os.getxattr(stack.upper / "dir" / "f", "user.tag") == b"kept"
    assert os.getxattr(stack.upper / "dir" / "f", "trusted.t") == b"kept too"
    after = os.stat(f)
    assert after.st_ino == before.st_ino  # st_ino survives copy-up
    assert after.st_mtime_ns == MTIME


def test_copy_up_of_parents_keeps_their_metadata_and_mtimes(stack: Stack, mounted: Mounted) -> None:
    l1 = stack.lowers[0]
    (l1 / "a" / "b").mkdir(parents=True)
    write(l1 / "a" / "b" / "f")
    os.chmod(l1 / "a", 0o711)
    os.chown(l1 / "a" / "b", 42, 43)
    os.setxattr(l1 / "a" / "b", "user.dir", b"x")
    for d in (l1 / "a" / "b", l1 / "a"):
        os.utime(d, ns=(MTIME, MTIME))
    mounted()
    root_mtime = os.stat(stack.upper).st_mtime_ns
    with open(stack.mnt / "a" / "b" / "f", "ab") as fh:
        fh.write(b"more")
    a, b = os.stat(stack.upper / "a"), os.stat(stack.upper / "a" / "b")
    assert stat.S_IMODE(a.st_mode) == 0o711
    assert (b.st_uid, b.st_gid) == (42, 43)
    assert os.getxattr(stack.upper / "a" / "b", "user.dir") == b"x"
    assert a.st_mtime_ns == MTIME and b.st_mtime_ns == MTIME  # copy-up is not a change
    assert os.stat(stack.upper).st_mtime_ns == root_mtime


def test_copy_up_keeps_holes_and_symlink_targets(stack: Stack, mounted: Mounted) -> None:
    l1 = stack.lowers[0]
    with open(l1 / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
    os.symlink("../somewhere/else", l1 / "link")
    os.lchown(l1 / "link", 7, 8)
    mounted()
    os.chmod(stack.mnt / "sparse", 0o600)
    os.lchown(stack.mnt / "link", 9, 9)
    up = os.stat(stack.upper / "sparse")
    assert up.st_size == 64 << 20
    assert up.st_blocks * 512 <= 1 << 20  # still sparse: the 1 MiB chunk the kernel copies
    with open(stack.mnt / "sparse", "rb") as f:
        f.seek(32 << 20)
        assert f.read(6) == b"middle"
    assert os.readlink(stack.upper / "link") == "../somewhere/else"
    assert os.lstat(stack.upper / "link").st_uid == 9


@pytest.mark.parametrize("kind", ["fifo", "chr", "socket"])
def test_copy_up_of_special_files(stack: Stack, mounted: Mounted, kind: str) -> None:
    p = stack.lowers[0] / "node"
    if kind == "fifo":
        os.mkfifo(p, 0o640)
    elif kind == "chr":
        os.mknod(p, stat.S_IFCHR | 0o640, os.makedev(1, 5))
    else:
        os.mknod(p, stat.S_IFSOCK | 0o640)
    mounted()
    os.chown(stack.mnt / "node", 3, 4)
    st = os.lstat(stack.upper / "node")
    assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(os.lstat(p).st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_rdev == os.lstat(p).st_rdev
    assert (st.st_uid, st.st_gid) == (3, 4)


def test_workdir_leftovers_are_cleared_at_mount(stack: Stack, mounted: Mounted) -> None:
    (stack.work / "work" / "#half").mkdir(parents=True)
    write(stack.work / "work" / "#half" / "partial", b"trunc")
    write(stack.work / "work" / "#file", b"partial copy")
    mounted()
    assert staged(stack.work / "work") == []


def test_a_large_copy_up_does_not_stall_other_requests(stack: Stack, mounted: Mounted) -> None:
    """While a 512 MiB file is copied up, other requests are answered.

    The check is about order, not speed: stats of another file must complete
    while the copy-up is still running.
    """
    big = stack.lowers[0] / "big"
    chunk = os.urandom(1 << 20)
    with open(big, "wb") as out:
        for _ in range(512):
            out.write(chunk)
    write(stack.lowers[0] / "small")
    mounted()
    done = threading.Event()
    answered_during: list[float] = []

    def copy_up() -> None:
        with open(stack.mnt / "big", "r+b") as f:
            f.write(b"!")
        done.set()

    t = threading.Thread(target=copy_up)
    t.start()
    try:
        while not done.is_set():
            os.stat(stack.mnt / "small")
            os.listdir(stack.mnt)
            if not done.is_set():
                answered_during.append(time.monotonic())
            time.sleep(0.002)
    finally:
        t.join()
    assert len(answered_during) > 3
    with open(stack.mnt / "big", "rb") as f:
        assert f.read(1) == b"!"
        f.seek(1 << 20)
        assert f.read(16) == chunk[:16]
