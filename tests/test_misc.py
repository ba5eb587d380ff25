"""Xattrs, statfs, read-only mounts, big files, odd names, the workdir, interop, the error boundary."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Mounted, Stack
from tests.mounting import faulty_command, kernel_overlay, start_unionfs
from tests.test_merge import write
from tests.test_namespace import is_whiteout
from tests.treesnap import diff, snapshot


def test_user_trusted_and_security_xattrs_work(stack: Stack, mounted: Mounted) -> None:
    write(stack.lowers[0] / "f")
    mounted()
    f = stack.mnt / "f"
    for name in ("user.a", "trusted.b", "security.c"):
        os.setxattr(f, name, b"v-" + name.encode())
        assert os.getxattr(f, name) == b"v-" + name.encode()
    assert {"user.a", "trusted.b", "security.c"} <= set(os.listxattr(f))
    os.removexattr(f, "user.a")
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.a")
    assert e.value.errno == errno.ENODATA
    assert os.getxattr(stack.upper / "f", "trusted.b") == b"v-trusted.b"


def test_private_overlay_xattrs_are_hidden_and_refused(stack: Stack, mounted: Mounted) -> None:
    (stack.lowers[0] / "d").mkdir()
    os.setxattr(stack.lowers[0] / "d", "trusted.overlay.opaque", b"y")
    os.setxattr(stack.lowers[0] / "d", "trusted.overlay.other", b"z")
    mounted()
    d = stack.mnt / "d"
    assert not [n for n in os.listxattr(d) if n.startswith("trusted.overlay.")]
    for call in (
        lambda: os.getxattr(d, "trusted.overlay.opaque"),
        lambda: os.setxattr(d, "trusted.overlay.opaque", b"n"),
        lambda: os.removexattr(d, "trusted.overlay.other"),
    ):
        with pytest.raises(OSError):
            call()
    assert os.getxattr(stack.lowers[0] / "d", "trusted.overlay.other") == b"z"


def test_removing_a_missing_xattr_does_not_copy_up(stack: Stack, mounted: Mounted) -> None:
    write(stack.lowers[0] / "f")
    mounted()
    with pytest.raises(OSError) as e:
        os.removexattr(stack.mnt / "f", "user.none")
    assert e.value.errno == errno.ENODATA
    assert os.listdir(stack.upper) == []


def test_statfs_reports_the_upper_filesystem(stack: Stack, mounted: Mounted) -> None:
    mounted()
    a, b = os.statvfs(stack.mnt), os.statvfs(stack.upper)
    assert (a.f_bsize, a.f_blocks, a.f_files) == (b.f_bsize, b.f_blocks, b.f_files)
    assert not a.f_flag & os.ST_RDONLY


@pytest.mark.parametrize("how", ["no upper", "ro", "no upper, remounted rw", "ro, remounted rw"])
def test_a_mount_without_upper_is_read_only(stack: Stack, mounted: Mounted, how: str) -> None:
    """Without an upper, or with ``ro``, every change fails with EROFS, and still does
    once root has remounted the FUSE mount read-write (the kernel then sends the
    requests): the daemon, and the hook's answers, refuse them, and no layer changes."""
    write(stack.lowers[0] / "f", b"data")
    (stack.lowers[0] / "d").mkdir()
    (stack.upper / "u").mkdir()
    if how.startswith("ro"):
        mounted(extra_options="ro")
    else:
        mounted(readonly=True)
    m = stack.mnt
    assert os.statvfs(m).f_flag & os.ST_RDONLY
    assert (m / "f").read_bytes() == b"data"
    layers = [*stack.lowers, stack.upper]
    before = [snapshot(p) for p in layers]
    if how.endswith("remounted rw"):
        # mount(2) itself (-i): the helper would run a new daemon.
        subprocess.run(["mount", "-i", "-o", "remount,rw", os.fspath(m)], check=True)
        assert not os.statvfs(m).f_flag & os.ST_RDONLY
    sub = m / ("u" if how.startswith("ro") else "d")
    for _ in range(2):  # the second time, whatever the hook armed meanwhile answers
        assert not (sub / "missing").exists()
        os.stat(sub)
    attempts: list[Callable[[], object]] = [
        lambda: open(m / "f", "ab"),
        lambda: open(m / "new", "wb"),
        lambda: open(sub / "new", "wb"),
        lambda: os.mkdir(sub / "x"),
        lambda: os.mkdir(m / "x"),
        lambda: os.unlink(m / "f"),
        lambda: os.rmdir(m / "d"),
        lambda: os.rename(m / "f", m / "g"),
        lambda: os.chmod(m / "f", 0o600),
        lambda: os.symlink("f", m / "s"),
        lambda: os.setxattr(m / "f", "user.x", b"1"),
        lambda: os.truncate(m / "f", 0),
        lambda: os.chmod(sub, 0o700),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    for p, was in zip(layers, before, strict=True):
        assert diff(was, snapshot(p)) == [], p


def test_fsync_and_fsyncdir_reach_the_upper(stack: Stack, mounted: Mounted) -> None:
    mounted()
    fd = os.open(stack.mnt / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(stack.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert (stack.upper / "f").read_bytes() == b"durable"


def test_files_over_4_gib_work(stack: Stack, mounted: Mounted) -> None:
    with open(stack.lowers[0] / "huge", "wb") as f:
        f.truncate(5 << 30)
        f.seek((4 << 30) + 123)
        f.write(b"far away")
    mounted()
    with open(stack.mnt / "huge", "r+b") as f:
        f.seek((4 << 30) + 123)
        assert f.read(8) == b"far away"
        f.seek((4 << 30) + 1000)
        f.write(b"written past 4 GiB")
    with open(stack.mnt / "huge", "rb") as f:
        f.seek((4 << 30) + 1000)
        assert f.read(18) == b"written past 4 GiB"
    assert os.stat(stack.mnt / "huge").st_size == 5 << 30
    assert os.stat(stack.upper / "huge").st_blocks * 512 < 64 << 20  # holes stayed holes


NAMES = [b"caf\xe9-latin1", b"x" * 255, b"-leading dash", b"with space", "snow\u2603".encode()]


@pytest.mark.parametrize("name", NAMES, ids=["latin1", "255", "dash", "space", "utf8"])
def test_names_are_bytes_everywhere(stack: Stack, mounted: Mounted, name: bytes) -> None:
    lower = os.fsencode(stack.lowers[0])
    with open(os.path.join(lower, name), "wb") as f:
        f.write(b"lower")
    os.mkdir(os.path.join(lower, name[:200] + b".d"))
    mounted()
    mnt = os.fsencode(stack.mnt)
    assert name in os.listdir(mnt)
    with open(os.path.join(mnt, name), "ab") as f:  # copy-up
        f.write(b"+")
    assert open(os.path.join(os.fsencode(stack.upper), name), "rb").read() == b"lower+"
    os.rename(os.path.join(mnt, name), os.path.join(mnt, name[:-1] + b"Z"))
    assert is_whiteout(os.path.join(os.fsencode(stack.upper), name))
    os.mkdir(os.path.join(mnt, name[:200] + b".d", name))
    assert os.listdir(os.path.join(mnt, name[:200] + b".d")) == [name]


def test_names_reserved_for_whiteouts_are_refused(stack: Stack, mounted: Mounted) -> None:
    write(stack.lowers[0] / "f")
    mounted()
    m = stack.mnt
    for attempt in (
        lambda: open(m / ".wh.x", "wb"),
        lambda: os.mkdir(m / ".wh.d"),
        lambda: os.symlink("f", m / ".wh.s"),
        lambda: os.link(m / "f", m / ".wh.l"),
        lambda: os.mknod(m / ".wh.n", stat.S_IFIFO | 0o600),
        lambda: os.rename(m / "f", m / ".wh.f"),
    ):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EINVAL
    assert os.listdir(stack.upper) == []


# -- the workdir --------------------------------------------------------------


def test_workdir_on_another_filesystem_is_refused(stack: Stack, tmp_path: Path) -> None:
    other = tmp_path / "tmpfs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", os.fspath(other)], check=True)
    try:
        r = subprocess.run(
            [
                *_cmd(),
                "-o",
                f"lowerdir={stack.lowers[0]},upperdir={stack.upper},workdir={other}",
                os.fspath(stack.mnt),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        subprocess.run(["umount", "-l", os.fspath(other)], check=False)
    assert r.returncode != 0
    assert "same filesystem" in r.stderr and r.stderr.count("\n") == 1


def test_a_second_mount_over_the_same_upper_is_refused(
    stack: Stack, mounted: Mounted, tmp_path: Path
) -> None:
    mounted()
    other = tmp_path / "mnt2"
    other.mkdir()
    r = subprocess.run(
        [
            *_cmd(),
            "-o",
            f"lowerdir={stack.lowers[0]},upperdir={stack.upper},workdir={stack.work}",
            os.fspath(other),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0
    assert "in use" in r.stderr


def _cmd() -> list[str]:
    from tests.mounting import unionfs_command

    return unionfs_command()


# -- interop with the kernel overlay --------------------------------------------


def _populate(stack: Stack) -> None:
    l1, l2 = stack.lowers
    for layer in (l1, l2):
        (layer / "d").mkdir()
        write(layer / "d" / f"in-{layer.name}")
    write(l2 / "gone")
    write(l1 / "edit", b"old")
    (l2 / "tree" / "sub").mkdir(parents=True)
    write(l2 / "tree" / "sub" / "f")


def _mutate(m: Path) -> None:
    os.unlink(m / "gone")
    with open(m / "edit", "ab") as f:
        f.write(b"+new")
    os.unlink(m / "d" / "in-l2")
    write(m / "d" / "added", b"added")
    subprocess.run(["rm", "-rf", os.fspath(m / "tree")], check=True)
    os.makedirs(m / "tree" / "again")
    os.symlink("edit", m / "link")
    os.chmod(m / "d", 0o700)
    os.link(m / "edit", m / "edit2")
    os.rename(m / "d" / "in-l1", m / "moved")


def test_an_upper_written_by_unionfs_mounts_with_the_kernel(stack: Stack, tmp_path: Path) -> None:
    _populate(stack)
    um = start_unionfs(stack.lowers, stack.mnt, stack.upper, stack.work)
    try:
        _mutate(stack.mnt)
        ours = snapshot(stack.mnt)
    finally:
        assert um.unmount() == 0
    kmnt, kwork = tmp_path / "kmnt", tmp_path / "kwork"
    kmnt.mkdir()
    kwork.mkdir()
    with kernel_overlay(stack.lowers, kmnt, stack.upper, kwork):
        theirs = snapshot(kmnt)
    assert diff(ours, theirs) == []


def test_unionfs_shows_what_the_kernel_wrote(stack: Stack, tmp_path: Path) -> None:
    _populate(stack)
    kmnt, kwork = tmp_path / "kmnt", tmp_path / "kwork"
    kmnt.mkdir()
    kwork.mkdir()
    with kernel_overlay(stack.lowers, kmnt, stack.upper, kwork):
        _mutate(kmnt)
        theirs = snapshot(kmnt)
    um = start_unionfs(stack.lowers, stack.mnt, stack.upper, stack.work)
    try:
        ours = snapshot(stack.mnt)
    finally:
        um.unmount()
    assert diff(ours, theirs) == []


# -- the error boundary ---------------------------------------------------------


def test_a_handler_exception_becomes_eio_and_the_mount_goes_on(
    stack: Stack, mounted: Mounted
) -> None:
    write(stack.lowers[0] / "fine", b"ok")
    um = mounted(command=faulty_command("lookup=boom"))
    with pytest.raises(OSError) as e:
        os.stat(stack.mnt / "boom")
    assert e.value.errno == errno.EIO
    assert (stack.mnt / "fine").read_bytes() == b"ok"
    assert "Traceback" in um.log() and "injected fault" in um.log()


def test_an_exception_in_forget_is_logged_and_the_mount_goes_on(
    stack: Stack, mounted: Mounted
) -> None:
    for i in range(50):
        write(stack.lowers[0] / f"f{i}", b"ok")
    um = mounted(command=faulty_command("forget"))
    for i in range(50):
        os.stat(stack.mnt / f"f{i}")
    for _ in range(20):  # the kernel sends FORGET when it drops its inodes
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
        if "injected fault on forget" in um.log():
            break
        time.sleep(0.1)
    assert "injected fault on forget" in um.log()
    assert um.proc.poll() is None
    assert (stack.mnt / "f0").read_bytes() == b"ok"


def test_ro_with_an_upper_shows_the_upper_and_refuses_writes(
    stack: Stack, mounted: Mounted
) -> None:
    write(stack.lowers[0] / "below", b"lower")
    write(stack.upper / "changed", b"upper")
    os.mknod(stack.upper / "below", stat.S_IFCHR, 0)
    mounted(extra_options="ro")
    assert sorted(os.listdir(stack.mnt)) == ["changed"]
    with pytest.raises(OSError) as e:
        write(stack.mnt / "new")
    assert e.value.errno == errno.EROFS
    assert os.statvfs(stack.mnt).f_flag & os.ST_RDONLY
