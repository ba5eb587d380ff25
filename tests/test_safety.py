"""Safety: no escapes through layer symlinks, privilege bits, other users, crashes, a full upper."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Mounted, Stack, staged
from tests.features import libfuse317_expected
from tests.mounting import (
    REPO,
    kernel_overlay,
    lazy_unmount,
    mount_type,
    start_unionfs,
    unionfs_command,
)
from tests.test_merge import write
from tests.test_namespace import as_user, let_others_in

# -- containment ------------------------------------------------------------------


def test_a_host_symlink_in_a_lower_never_exposes_the_host(stack: Stack, mounted: Mounted) -> None:
    """Lower ``etc -> /etc`` under a real upper ``etc/``: the host's passwd must not show."""
    os.symlink("/etc", stack.lowers[0] / "etc")
    (stack.lowers[1] / "etc").mkdir()
    (stack.upper / "etc").mkdir()
    mounted()
    assert os.listdir(stack.mnt / "etc") == []
    with pytest.raises(FileNotFoundError):
        open(stack.mnt / "etc" / "passwd", "rb")
    marker = f"unionfs-test-{os.getpid()}"
    write(stack.mnt / "etc" / marker)  # a create lands in the upper, never in the host's /etc
    assert os.listdir(stack.upper / "etc") == [marker]
    assert not os.path.lexists(f"/etc/{marker}")


def test_an_escaping_relative_symlink_is_never_followed_by_the_daemon(
    stack: Stack, mounted: Mounted
) -> None:
    os.symlink("../../../../../../..", stack.lowers[1] / "x")
    (stack.lowers[0] / "x").mkdir()  # a directory above the symlink: the two do not merge
    write(stack.lowers[0] / "x" / "mine")
    os.symlink("../../../../../../..", stack.lowers[0] / "up")
    mounted()
    assert os.listdir(stack.mnt / "x") == ["mine"]
    with pytest.raises(FileNotFoundError):
        os.stat(stack.mnt / "x" / "etc")
    assert os.readlink(stack.mnt / "up") == "../../../../../../.."
    write(stack.mnt / "x" / "new")  # copy-up of x goes to the upper, never through the link
    assert (stack.upper / "x" / "new").exists()


def test_metadata_calls_on_a_symlink_change_only_the_link(stack: Stack, mounted: Mounted) -> None:
    target = stack.lowers[0] / "target"
    write(target, b"t")
    os.chmod(target, 0o640)
    os.symlink("target", stack.lowers[0] / "link")
    before = os.stat(target)
    mounted()
    link = stack.mnt / "link"
    os.chown(link, 77, 88, follow_symlinks=False)
    os.utime(link, ns=(10**18, 10**18), follow_symlinks=False)
    os.setxattr(link, "trusted.on-link", b"1", follow_symlinks=False)
    assert _lchmod(link, 0o777) != 0  # fchmodat(AT_SYMLINK_NOFOLLOW): refused
    up = os.lstat(stack.upper / "link")
    assert stat.S_ISLNK(up.st_mode) and (up.st_uid, up.st_gid) == (77, 88)
    assert up.st_mtime_ns == 10**18
    assert os.getxattr(stack.upper / "link", "trusted.on-link", follow_symlinks=False) == b"1"
    m = os.stat(stack.mnt / "target")
    assert (m.st_uid, m.st_gid, stat.S_IMODE(m.st_mode), m.st_mtime_ns) == (
        before.st_uid,
        before.st_gid,
        0o640,
        before.st_mtime_ns,
    )
    assert not (stack.upper / "target").exists()


def _lchmod(path: Path, mode: int) -> int:
    """fchmodat(AT_FDCWD, path, mode, AT_SYMLINK_NOFOLLOW); Python's os.chmod lacks it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.fchmodat(-100, os.fsencode(path), mode, 0x100))


# -- privilege bits -----------------------------------------------------------------

# A version-2 file capability granting CAP_NET_BIND_SERVICE (bit 10), effective.
CAPABILITY = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)


def _setid_file(stack: Stack, name: str, caps: bool = False) -> Path:
    p = stack.lowers[0] / name
    write(p, b"#!/bin/sh\n")
    os.chmod(p, 0o6777)
    if caps:
        os.setxattr(p, "security.capability", CAPABILITY)
    return p


def test_truncate_by_a_non_owner_clears_setuid_and_setgid(stack: Stack, mounted: Mounted) -> None:
    let_others_in(stack)
    _setid_file(stack, "prog")
    mounted()
    r = as_user(f": > {stack.mnt}/prog")
    assert r.returncode == 0, r.stderr
    assert os.stat(stack.mnt / "prog").st_mode & 0o6000 == 0


def test_a_write_removes_file_capabilities(stack: Stack, mounted: Mounted) -> None:
    let_others_in(stack)
    _setid_file(stack, "capped", caps=True)
    mounted()
    assert os.getxattr(stack.mnt / "capped", "security.capability") == CAPABILITY
    r = as_user(f"echo x >> {stack.mnt}/capped")
    assert r.returncode == 0, r.stderr
    assert "security.capability" not in os.listxattr(stack.mnt / "capped")


def test_chown_clears_setid_bits_and_capabilities(stack: Stack, mounted: Mounted) -> None:
    _setid_file(stack, "prog", caps=True)
    mounted()
    os.chown(stack.mnt / "prog", 1000, 1000)
    assert os.stat(stack.mnt / "prog").st_mode & 0o6000 == 0
    assert "security.capability" not in os.listxattr(stack.mnt / "prog")


def test_copy_up_keeps_the_owner_of_a_setuid_file(stack: Stack, mounted: Mounted) -> None:
    p = stack.lowers[0] / "userprog"
    write(p)
    os.chown(p, 1000, 1000)
    os.chmod(p, 0o4755)
    mounted()
    os.close(os.open(stack.mnt / "userprog", os.O_WRONLY))  # copy-up as root
    st = os.stat(stack.upper / "userprog")
    assert (st.st_uid, st.st_mode & 0o7777) == (1000, 0o4755)  # never a setuid-root binary


WRITES_SCRIPT = r"""
import json, os, sys
m = sys.argv[1]
def as_user(fn):
    pid = os.fork()
    if pid == 0:
        os.setgroups([]); os.setgid(1000); os.setuid(1000)
        try:
            fn()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
def append(name):
    with open(m + "/" + name, "ab") as f:
        f.write(b"x")
def handed_over(name):
    fd = os.open(m + "/" + name, os.O_WRONLY | os.O_APPEND)  # opened by root
    as_user(lambda: os.write(fd, b"x"))
    os.close(fd)
os.chmod(m + "/upper-user", 0o6777)  # a copy-up first: the file is in the upper
as_user(lambda: append("user"))
as_user(lambda: append("upper-user"))
as_user(lambda: append("sgid-no-gx"))
append("root")
handed_over("handed")
print(json.dumps({n: oct(os.stat(m + "/" + n).st_mode & 0o7777) for n in sorted(os.listdir(m))}))
"""


def test_writes_drop_privilege_bits_as_on_the_kernel_overlay(stack: Stack, tmp_path: Path) -> None:
    """Another user's write drops setuid, and setgid with group-exec; root's keeps them.
    Whoever opened the file: the writer's own privileges count, as on the kernel
    overlay, also when the kernel writes the file itself (FUSE passthrough)."""
    let_others_in(stack)
    for name, mode in (
        ("user", 0o6777),
        ("upper-user", 0o6777),
        ("sgid-no-gx", 0o2766),
        ("root", 0o6777),
        ("handed", 0o4777),
    ):
        write(stack.lowers[1] / name, b"#!/bin/sh\n")
        os.chmod(stack.lowers[1] / name, mode)
    twin = tmp_path / "twin"
    twin.mkdir(mode=0o755)
    subprocess.run(["cp", "-a", os.fspath(stack.lowers[1]), os.fspath(twin / "l2")], check=True)
    for n in ("l1", "upper", "work", "mnt"):
        (twin / n).mkdir()

    def run(mnt: Path) -> dict[str, str]:
        r = subprocess.run(
            [sys.executable, "-c", WRITES_SCRIPT, os.fspath(mnt)],
            capture_output=True,
            text=True,
            check=True,
        )
        modes: dict[str, str] = json.loads(r.stdout)
        return modes

    with kernel_overlay([twin / "l1", twin / "l2"], twin / "mnt", twin / "upper", twin / "work"):
        expected = run(twin / "mnt")
    um = start_unionfs(stack.lowers, stack.mnt, stack.upper, stack.work)
    try:
        got = run(stack.mnt)
    finally:
        um.unmount()
    if not libfuse317_expected():
        # Without KILLPRIV_V2 the kernel's FUSE layer drops setgid only with group-exec.
        assert got.pop("sgid-no-gx") == oct(0o2766)
        expected.pop("sgid-no-gx")
    assert got == expected
    assert expected["user"] == expected["handed"] == oct(0o777)
    assert expected["root"] == oct(0o6777)
    for name, shown in got.items():  # what unionfs showed is what it stored
        assert oct(os.stat(stack.upper / name).st_mode & 0o7777) == shown


def test_a_nosuid_lower_cannot_gain_setuid_through_the_mount(stack: Stack, tmp_path: Path) -> None:
    """The CVE-2023-0386 class: setuid bits from a nosuid source must not become effective."""
    lower = tmp_path / "nosuid-lower"
    lower.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "nosuid,size=4m", "tmpfs", os.fspath(lower)], check=True
    )
    try:
        write(lower / "su", b"#!/bin/sh\n")
        os.chmod(lower / "su", 0o4755)
        um = start_unionfs([lower], stack.mnt, stack.upper, stack.work)
        try:
            assert os.statvfs(stack.mnt).f_flag & os.ST_NOSUID
            os.close(os.open(stack.mnt / "su", os.O_WRONLY))  # copy-up
            assert os.stat(stack.upper / "su").st_mode & 0o6000 == 0
        finally:
            um.unmount()
    finally:
        lazy_unmount(lower)


# -- other users, against the kernel overlay ---------------------------------------------

USER_SCRIPT = r"""
import errno, json, os, sys
m = sys.argv[1]
def t(name, fn):
    try:
        fn(); r = "ok"
    except OSError as e:
        r = errno.errorcode.get(e.errno, str(e.errno))
    out[name] = r
out = {}
t("read-0600-root", lambda: open(m + "/secret", "rb").read())
t("read-0644-root", lambda: open(m + "/public", "rb").read())
t("write-0644-root", lambda: open(m + "/public", "ab").write(b"x"))
t("create-in-root-dir", lambda: open(m + "/rootdir/new", "wb").close())
t("mkdir-in-root-dir", lambda: os.mkdir(m + "/rootdir/d"))
t("unlink-in-root-dir", lambda: os.unlink(m + "/rootdir/file"))
t("chmod-root-file", lambda: os.chmod(m + "/public", 0o777))
t("chown-root-file", lambda: os.chown(m + "/public", 1000, 1000))
t("utime-root-file", lambda: os.utime(m + "/public", (1, 1)))
t("create-in-tmp", lambda: open(m + "/tmp/mine", "wb").write(b"mine"))
t("chmod-own-file", lambda: os.chmod(m + "/tmp/mine", 0o600))
t("chown-own-file-to-root", lambda: os.chown(m + "/tmp/mine", 0, 0))
t("unlink-others-in-sticky", lambda: os.unlink(m + "/tmp/roots"))
t("rename-others-in-sticky", lambda: os.rename(m + "/tmp/roots", m + "/tmp/x"))
t("write-group-writable", lambda: open(m + "/groupfile", "ab").write(b"g"))
t("setxattr-user-root-file", lambda: os.setxattr(m + "/public", "user.x", b"1"))
t("setxattr-trusted", lambda: os.setxattr(m + "/tmp/mine", "trusted.x", b"1"))
t("list-0700-dir", lambda: os.listdir(m + "/private"))
t("unlink-own", lambda: os.unlink(m + "/tmp/mine"))
print(json.dumps(out))
"""


def _user_tree(layer: Path) -> None:
    write(layer / "secret", b"s")
    os.chmod(layer / "secret", 0o600)
    write(layer / "public", b"p")
    (layer / "rootdir").mkdir()
    write(layer / "rootdir" / "file")
    (layer / "tmp").mkdir()
    os.chmod(layer / "tmp", 0o1777)
    write(layer / "tmp" / "roots")
    write(layer / "groupfile")
    os.chown(layer / "groupfile", 0, 1000)
    os.chmod(layer / "groupfile", 0o664)
    (layer / "private").mkdir(mode=0o700)


def test_other_users_see_the_kernel_overlays_errnos(stack: Stack, tmp_path: Path) -> None:
    let_others_in(stack)
    _user_tree(stack.lowers[1])
    twin = tmp_path / "twin"
    twin.mkdir(mode=0o755)
    subprocess.run(["cp", "-a", os.fspath(stack.lowers[1]), os.fspath(twin / "l2")], check=True)
    for n in ("l1", "upper", "work", "mnt"):
        (twin / n).mkdir()

    def run_as_user(mnt: Path) -> dict[str, str]:
        r = subprocess.run(
            [
                "setpriv",
                "--reuid=1000",
                "--regid=1000",
                "--clear-groups",
                sys.executable,
                "-c",
                USER_SCRIPT,
                os.fspath(mnt),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        result: dict[str, str] = json.loads(r.stdout)
        return result

    with kernel_overlay([twin / "l1", twin / "l2"], twin / "mnt", twin / "upper", twin / "work"):
        expected = run_as_user(twin / "mnt")
    um = start_unionfs(stack.lowers, stack.mnt, stack.upper, stack.work)
    try:
        got = run_as_user(stack.mnt)
    finally:
        um.unmount()
    assert got == expected
    assert expected["read-0600-root"] == "EACCES" and expected["create-in-tmp"] == "ok"


# -- no partial files ---------------------------------------------------------------------


def test_kill_9_during_copy_up_leaves_old_or_complete_content(stack: Stack, tmp_path: Path) -> None:
    big = stack.lowers[0] / "big"
    block = os.urandom(1 << 20)
    with open(big, "wb") as f:
        for _ in range(512):
            f.write(block)
    um = start_unionfs(stack.lowers, stack.mnt, stack.upper, stack.work)
    try:
        fd = os.open(stack.mnt / "synced", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"fsynced before the crash")
        os.fsync(fd)
        os.close(fd)
        writer = subprocess.Popen(
            [sys.executable, "-c", f"open({os.fspath(stack.mnt / 'big')!r}, 'ab').write(b'!')"],
            stderr=subprocess.DEVNULL,
        )
        work = stack.work / "work"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not staged(work):
            time.sleep(0.0005)
        saw_partial = bool(staged(work))
        os.kill(um.pid, signal.SIGKILL)
        um.proc.wait(timeout=10)
    finally:
        um.kill()
    writer.wait(timeout=30)
    assert saw_partial, "the copy-up finished before the kill; the test did not test a crash"
    assert mount_type(stack.mnt) is None
    um2 = start_unionfs(stack.lowers, stack.mnt, stack.upper, stack.work)
    try:
        assert staged(stack.work / "work") == []  # leftovers cleared at mount
        size = os.stat(stack.mnt / "big").st_size
        assert size in (512 << 20, (512 << 20) + 1)  # old content, or complete + the byte
        with open(stack.mnt / "big", "rb") as f:
            f.seek(300 << 20)
            assert f.read(1 << 20) == block
        assert (stack.mnt / "synced").read_bytes() == b"fsynced before the crash"
    finally:
        um2.unmount()


def test_a_full_upper_gives_enospc_and_keeps_serving(stack: Stack, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", os.fspath(small)], check=True)
    try:
        (small / "upper").mkdir()
        (small / "work").mkdir()
        write(stack.lowers[0] / "big", os.urandom(6 << 20))
        lower_before = (stack.lowers[0] / "big").read_bytes()
        um = start_unionfs(stack.lowers, stack.mnt, small / "upper", small / "work")
        try:
            with pytest.raises(OSError) as e:
                open(stack.mnt / "big", "ab").close()  # copy-up cannot fit
            assert e.value.errno == errno.ENOSPC
            assert os.listdir(small / "upper") == [] and staged(small / "work" / "work") == []
            with pytest.raises(OSError) as e:
                with open(stack.mnt / "filler", "wb") as f:
                    for _ in range(8):
                        f.write(os.urandom(1 << 20))
            assert e.value.errno == errno.ENOSPC
            assert os.stat(stack.mnt / "big").st_size == 6 << 20  # still serving
            os.unlink(stack.mnt / "filler")
            write(stack.mnt / "after", b"space again")
            assert (stack.mnt / "after").read_bytes() == b"space again"
        finally:
            um.unmount()
        assert (stack.lowers[0] / "big").read_bytes() == lower_before
    finally:
        lazy_unmount(small)


# -- unmounting and overlap ---------------------------------------------------------------


def test_unmount_with_open_files_is_busy_then_lazy_unmount_waits(stack: Stack) -> None:
    um = start_unionfs(stack.lowers, stack.mnt, stack.upper, stack.work)
    try:
        f = open(stack.mnt / "open", "wb")
        r = subprocess.run(
            ["fusermount3", "-u", os.fspath(stack.mnt)], capture_output=True, text=True, check=False
        )
        assert r.returncode != 0 and "busy" in r.stderr.lower()
        write(stack.mnt / "still-usable", b"yes")
        subprocess.run(["umount", "-l", os.fspath(stack.mnt)], check=True)
        assert mount_type(stack.mnt) is None
        time.sleep(0.3)
        assert um.proc.poll() is None  # the open file keeps the daemon serving
        f.write(b"written after the lazy unmount")
        f.close()
        assert um.proc.wait(timeout=15) == 0
    finally:
        um.unmount()
    assert (stack.upper / "open").read_bytes() == b"written after the lazy unmount"


def test_mounts_sharing_a_workdir_or_stacked_on_unionfs_are_refused(
    stack: Stack, tmp_path: Path
) -> None:
    um = start_unionfs(stack.lowers, stack.mnt, stack.upper, stack.work)
    try:
        other_upper = tmp_path / "u2"
        other_upper.mkdir()
        env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
        for opts, mnt in (
            (f"lowerdir={stack.lowers[0]},upperdir={other_upper},workdir={stack.work}", tmp_path),
            (f"lowerdir={stack.lowers[0]}:{stack.lowers[1]}", stack.mnt),
        ):
            r = subprocess.run(
                [*unionfs_command(), "-o", opts, os.fspath(mnt)],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    finally:
        um.unmount()
