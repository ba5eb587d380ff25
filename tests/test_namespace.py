"""Deletes, renames, inode numbers and ownership of new entries."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Mounted, Stack, staged
from tests.features import hook_enabled
from tests.mounting import start_unionfs
from tests.test_merge import write
from tests.twins import twins
from unionfs.fuse.hook import PYTHON_CREATES_ENV
from unionfs.overlay import acl

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


def renameat2(old: os.PathLike[str], new: os.PathLike[str], flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def is_whiteout(path: str | bytes | os.PathLike[str]) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def let_others_in(stack: Stack) -> None:
    """Make the test's directories traversable for other users (pytest makes them 0700)."""
    p = stack.root
    while p != p.parent:
        st = os.stat(p)
        if not st.st_mode & 0o001:
            os.chmod(p, stat.S_IMODE(st.st_mode) | 0o111)
        p = p.parent


def as_user(
    cmd: str, uid: int = 1000, gid: int = 1000, umask: str = "022"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            "sh",
            "-c",
            f"umask {umask}; {cmd}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )


# -- deletes -----------------------------------------------------------------


def test_unlink_of_a_lower_file_leaves_a_whiteout(stack: Stack, mounted: Mounted) -> None:
    write(stack.lowers[1] / "f")
    mounted()
    os.unlink(stack.mnt / "f")
    assert not os.path.lexists(stack.mnt / "f")
    assert is_whiteout(stack.upper / "f")
    assert (stack.lowers[1] / "f").exists()


def test_unlink_of_an_upper_only_file_leaves_nothing(stack: Stack, mounted: Mounted) -> None:
    mounted()
    write(stack.mnt / "f")
    os.unlink(stack.mnt / "f")
    assert os.listdir(stack.upper) == []


def test_unlink_of_a_copied_up_file_leaves_a_whiteout(stack: Stack, mounted: Mounted) -> None:
    write(stack.lowers[0] / "f", b"lower")
    mounted()
    write(stack.mnt / "f", b"changed")
    os.unlink(stack.mnt / "f")
    assert is_whiteout(stack.upper / "f")
    assert staged(stack.work / "work") == []


def test_rmdir_needs_the_merged_directory_empty(stack: Stack, mounted: Mounted) -> None:
    l1, l2 = stack.lowers
    (l1 / "d").mkdir()
    (l2 / "d").mkdir()
    write(l2 / "d" / "only-below")
    mounted()
    with pytest.raises(OSError) as e:
        os.rmdir(stack.mnt / "d")
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(stack.mnt / "d" / "only-below")
    os.rmdir(stack.mnt / "d")
    assert is_whiteout(stack.upper / "d")
    assert not os.path.lexists(stack.mnt / "d")


def test_creating_over_a_whiteout_replaces_it(stack: Stack, mounted: Mounted) -> None:
    write(stack.lowers[0] / "f", b"old")
    mounted()
    os.unlink(stack.mnt / "f")
    write(stack.mnt / "f", b"new")
    assert (stack.upper / "f").read_bytes() == b"new"
    os.unlink(stack.mnt / "f")
    os.symlink("target", stack.mnt / "f")
    assert os.readlink(stack.upper / "f") == "target"


def test_mkdir_over_a_whiteout_makes_an_opaque_directory(stack: Stack, mounted: Mounted) -> None:
    (stack.lowers[0] / "d").mkdir()
    write(stack.lowers[0] / "d" / "old")
    mounted()
    subprocess.run(["rm", "-rf", os.fspath(stack.mnt / "d")], check=True)
    os.mkdir(stack.mnt / "d")
    assert os.listdir(stack.mnt / "d") == []
    assert os.getxattr(stack.upper / "d", "trusted.overlay.opaque") == b"y"


# -- rename ------------------------------------------------------------------


def test_rename_of_a_lower_file_copies_up_and_whiteouts_the_source(
    stack: Stack, mounted: Mounted
) -> None:
    (stack.lowers[0] / "d").mkdir()
    write(stack.lowers[0] / "d" / "f", b"content")
    mounted()
    os.rename(stack.mnt / "d" / "f", stack.mnt / "g")
    assert (stack.mnt / "g").read_bytes() == b"content"
    assert not os.path.lexists(stack.mnt / "d" / "f")
    assert is_whiteout(stack.upper / "d" / "f")
    assert (stack.upper / "g").read_bytes() == b"content"


def test_rename_noreplace_and_exchange(stack: Stack, mounted: Mounted) -> None:
    write(stack.lowers[0] / "a", b"A")
    write(stack.lowers[1] / "b", b"B")
    mounted()
    with pytest.raises(FileExistsError):
        renameat2(stack.mnt / "a", stack.mnt / "b", RENAME_NOREPLACE)
    renameat2(stack.mnt / "a", stack.mnt / "b", RENAME_EXCHANGE)
    assert (stack.mnt / "a").read_bytes() == b"B"
    assert (stack.mnt / "b").read_bytes() == b"A"
    renameat2(stack.mnt / "a", stack.mnt / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(stack.mnt)) == ["b", "c"]
    with pytest.raises(OSError) as e:
        renameat2(stack.mnt / "b", stack.mnt / "z", RENAME_WHITEOUT)
    assert e.value.errno == errno.EINVAL


def test_an_upper_only_directory_can_be_renamed(stack: Stack, mounted: Mounted) -> None:
    mounted()
    os.makedirs(stack.mnt / "new" / "sub")
    write(stack.mnt / "new" / "sub" / "f", b"deep")
    os.rename(stack.mnt / "new", stack.mnt / "moved")
    assert (stack.mnt / "moved" / "sub" / "f").read_bytes() == b"deep"
    write(stack.mnt / "moved" / "sub" / "g")  # paths below the moved dir still work
    assert sorted(os.listdir(stack.upper / "moved" / "sub")) == ["f", "g"]


def test_a_directory_with_lower_parts_cannot_be_renamed(stack: Stack, mounted: Mounted) -> None:
    (stack.lowers[0] / "d").mkdir()
    write(stack.lowers[0] / "d" / "f", b"x")
    mounted()
    with pytest.raises(OSError) as e:
        os.rename(stack.mnt / "d", stack.mnt / "e")
    assert e.value.errno == errno.EXDEV
    subprocess.run(["mv", os.fspath(stack.mnt / "d"), os.fspath(stack.mnt / "e")], check=True)
    assert (stack.mnt / "e" / "f").read_bytes() == b"x"
    assert not os.path.lexists(stack.mnt / "d")


def test_a_directory_moved_into_a_merged_directory_becomes_opaque(
    stack: Stack, mounted: Mounted
) -> None:
    (stack.lowers[0] / "m").mkdir()
    (stack.lowers[0] / "m" / "x").mkdir()
    write(stack.lowers[0] / "m" / "x" / "lower-file")
    mounted()
    subprocess.run(["rm", "-rf", os.fspath(stack.mnt / "m" / "x")], check=True)
    os.mkdir(stack.mnt / "fresh")
    os.rename(stack.mnt / "fresh", stack.mnt / "m" / "x")
    assert os.listdir(stack.mnt / "m" / "x") == []


# -- inodes and hard links -----------------------------------------------------


def test_hard_links_share_st_ino_and_count(stack: Stack, mounted: Mounted) -> None:
    write(stack.lowers[0] / "f")
    mounted()
    os.link(stack.mnt / "f", stack.mnt / "g")
    a, b = os.stat(stack.mnt / "f"), os.stat(stack.mnt / "g")
    assert a.st_ino == b.st_ino
    assert a.st_nlink == b.st_nlink == 2
    os.unlink(stack.mnt / "f")
    assert os.stat(stack.mnt / "g").st_nlink == 1


def test_st_ino_stays_across_copy_up_and_rename(stack: Stack, mounted: Mounted) -> None:
    write(stack.lowers[0] / "f")
    mounted()
    ino = os.stat(stack.mnt / "f").st_ino
    write(stack.mnt / "f", b"changed")
    assert os.stat(stack.mnt / "f").st_ino == ino
    os.rename(stack.mnt / "f", stack.mnt / "g")
    assert os.stat(stack.mnt / "g").st_ino == ino


def test_an_unlinked_open_file_shows_nlink_0_and_stays_readable(
    stack: Stack, mounted: Mounted
) -> None:
    mounted()
    write(stack.mnt / "f", b"still here")
    with open(stack.mnt / "f", "rb") as f:
        os.unlink(stack.mnt / "f")
        assert os.fstat(f.fileno()).st_nlink == 0
        assert f.read() == b"still here"


# -- ownership and permissions -------------------------------------------------


def test_new_files_belong_to_the_caller_and_honour_umask(stack: Stack, mounted: Mounted) -> None:
    let_others_in(stack)
    os.chmod(stack.upper, 0o1777)  # the merged root shows the upper root
    mounted()
    r = as_user(f"touch {stack.mnt}/mine && mkdir {stack.mnt}/mydir", umask="027")
    assert r.returncode == 0, r.stderr
    f, d = os.stat(stack.mnt / "mine"), os.stat(stack.mnt / "mydir")
    assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode)) == (1000, 1000, 0o640)
    assert (d.st_uid, d.st_gid, stat.S_IMODE(d.st_mode)) == (1000, 1000, 0o750)


_MAKE = {
    "file": "echo data > {p}",
    "directory": "mkdir {p}",
    "fifo": "mkfifo {p}",
    "symlink": "ln -s target {p}",
}


@pytest.mark.parametrize("kind", list(_MAKE))
def test_a_daemon_killed_making_a_users_entry_leaves_none_of_its_own(
    stack: Stack, kind: str
) -> None:
    """An entry another user makes is built in the workdir, given its owner there and
    renamed into place (the kernel overlay makes it as the caller; the hook's creates
    do too): a daemon killed right after making it, as root, before the chown, leaves
    nothing under the new name, and the next mount clears what it left in the workdir.
    The directory is merged (in the lower and the upper), so its creates are the
    daemon's Python side's, not the hook's."""
    for layer in (stack.lowers[1], stack.upper):
        (layer / "d").mkdir()
        os.chmod(layer / "d", 0o777)
    let_others_in(stack)
    arm = stack.root / "arm"  # the daemon dies right after its first change from then on
    um = start_unionfs(
        stack.lowers, stack.mnt, stack.upper, stack.work,
        command=[sys.executable, "-m", "tests.crash.daemon", "1+", "--arm-file", str(arm), "--"],
    )  # fmt: skip
    try:
        os.stat(stack.mnt / "d")
        arm.touch()
        made = as_user(_MAKE[kind].format(p=stack.mnt / "d/new"))
        um.proc.wait(timeout=60)
    finally:
        um.kill()
    assert um.proc.returncode == -9, um.log()
    assert made.returncode != 0, made  # the daemon died before it answered
    assert not os.path.lexists(stack.upper / "d/new"), os.lstat(stack.upper / "d/new")
    left = staged(stack.work / "work")
    assert len(left) == 1 and os.lstat(stack.work / "work" / left[0]).st_uid == 0, left
    um = start_unionfs(stack.lowers, stack.mnt, stack.upper, stack.work)
    try:
        assert not os.path.lexists(stack.mnt / "d/new")
        assert staged(stack.work / "work") == []
        made = as_user(_MAKE[kind].format(p=stack.mnt / "d/new"))
        assert made.returncode == 0, made.stderr
    finally:
        assert um.unmount() == 0
    st = os.lstat(stack.upper / "d/new")
    assert (st.st_uid, st.st_gid) == (1000, 1000)


def test_setgid_directories_pass_on_their_group(stack: Stack, mounted: Mounted) -> None:
    let_others_in(stack)
    (stack.lowers[0] / "shared").mkdir()
    os.chown(stack.lowers[0] / "shared", 0, 777)
    os.chmod(stack.lowers[0] / "shared", 0o2777)
    mounted()
    r = as_user(f"touch {stack.mnt}/shared/f && mkdir {stack.mnt}/shared/sub")
    assert r.returncode == 0, r.stderr
    f, d = os.stat(stack.mnt / "shared" / "f"), os.stat(stack.mnt / "shared" / "sub")
    assert f.st_gid == 777 and d.st_gid == 777
    assert d.st_mode & stat.S_ISGID


def test_the_kernel_enforces_modes_for_other_users(stack: Stack, mounted: Mounted) -> None:
    let_others_in(stack)
    write(stack.lowers[0] / "secret", b"root only")
    os.chmod(stack.lowers[0] / "secret", 0o600)
    mounted()
    assert as_user(f"cat {stack.mnt}/secret").returncode != 0
    assert as_user(f"touch {stack.mnt}/nope").returncode != 0  # root-owned 0755 dir
    assert not os.path.lexists(stack.upper / "nope")


def test_a_write_by_a_non_owner_clears_setuid_and_setgid(stack: Stack, mounted: Mounted) -> None:
    let_others_in(stack)
    write(stack.lowers[0] / "prog", b"#!/bin/sh\n")
    os.chmod(stack.lowers[0] / "prog", 0o6777)
    mounted()
    r = as_user(f"echo x >> {stack.mnt}/prog")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(stack.mnt / "prog").st_mode) & 0o6000 == 0


def test_the_mount_root_can_be_chowned_chmodded_and_touched(stack: Stack, mounted: Mounted) -> None:
    """Container engines chown the root of every container's mount."""
    mounted()
    os.chown(stack.mnt, 123, 456)
    os.chmod(stack.mnt, 0o711)
    os.utime(stack.mnt, ns=(10**18, 10**18))
    st = os.stat(stack.mnt)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (
        123,
        456,
        0o711,
        10**18,
    )
    up = os.stat(stack.upper)
    assert (up.st_uid, up.st_gid, stat.S_IMODE(up.st_mode)) == (123, 456, 0o711)


_ANY = 0xFFFFFFFF
# user::rwx group::rwx other::r-x
_MINIMAL_DEFAULT_ACL = acl.encode([(0x01, 7, _ANY), (0x04, 7, _ANY), (0x20, 5, _ANY)])
# user::rwx user:1234:rwx group::r-x mask::rwx other::r-x
_NAMED_DEFAULT_ACL = acl.encode(
    [(0x01, 7, _ANY), (0x02, 7, 1234), (0x04, 5, _ANY), (0x10, 7, _ANY), (0x20, 5, _ANY)]
)
# user::rwx user:4321:rwx group::rwx mask::rwx other::rwx
_WORKDIR_DEFAULT_ACL = acl.encode(
    [(0x01, 7, _ANY), (0x02, 7, 4321), (0x04, 7, _ANY), (0x10, 7, _ANY), (0x20, 7, _ANY)]
)
# Directories with a default ACL ("up...": with no lower part).
_ACL_DIRS = {
    "min": _MINIMAL_DEFAULT_ACL,
    "named": _NAMED_DEFAULT_ACL,
    "sgidnamed": _NAMED_DEFAULT_ACL,
    "upmin": _MINIMAL_DEFAULT_ACL,
}
_MERGED = ("min", "named", "sgidnamed", "plain", "sgid")  # and the directories with none
_ALL = (*_MERGED, "upmin", "upplain")


def _fill_for_acls(lowers: list[Path]) -> None:
    for d in _MERGED:
        (lowers[0] / d / "olddir").mkdir(parents=True)
        write(lowers[0] / d / "old")


def _acl_entries(mnt: Path) -> None:
    """New entries of every kind under directories with and without a default ACL,
    merged and upper-only, directly and over whiteouts, with three umasks."""
    for d in _MERGED:
        os.unlink(mnt / d / "old")
        os.rmdir(mnt / d / "olddir")
    os.chmod(mnt / "sgid", 0o2775)
    os.chmod(mnt / "sgidnamed", 0o2775)
    for i, umask in enumerate((0o077, 0o022, 0)):
        old = os.umask(umask)
        try:
            for d in _ALL:
                base = mnt / d
                for n in range(3):  # the second and third, an upper-only one's, in C
                    os.close(os.open(base / f"f{i}{n}", os.O_CREAT | os.O_WRONLY, 0o666))
                os.mkdir(base / f"dir{i}", 0o777)
                os.mkdir(base / f"sticky{i}", 0o1777)
                os.mkfifo(base / f"fifo{i}", 0o666)
                os.close(os.open(base / f"suid{i}", os.O_CREAT | os.O_WRONLY, 0o6755))
                os.symlink("f", base / f"link{i}")
                if i == 0 and d in _MERGED:  # over the whiteouts of old and olddir
                    os.close(os.open(base / "old", os.O_CREAT | os.O_WRONLY, 0o666))
                    os.mkdir(base / "olddir", 0o777)
        finally:
            os.umask(old)


def _acls_of(upper: Path) -> list[tuple[str, int, str, str]]:
    """Each entry below *upper*: its path, mode, and access and default ACLs."""

    def xattr(p: Path, name: str) -> str:
        try:
            return os.getxattr(p, name, follow_symlinks=False).hex()
        except OSError:
            return "-"

    return [
        (
            str(p.relative_to(upper)),
            os.lstat(p).st_mode,
            xattr(p, "system.posix_acl_access"),
            xattr(p, "system.posix_acl_default"),
        )
        for p in sorted(upper.rglob("*"))
    ]


@pytest.mark.parametrize("how", ["plain", "python", "noacl"])
def test_new_entries_under_a_default_acl_are_the_kernel_overlays(tmp_path: Path, how: str) -> None:
    """Under a directory of the upper layer with a default ACL, the kernel overlay
    ignores the caller's umask and lets the ACL give the mode (and an access ACL where
    the default one has named entries); without one, the umask. So must unionfs:
    directly, over a whiteout (built in the workdir, where the ACL must be computed
    and set), for files, setuid/setgid files (built there too), directories, sticky
    directories, fifos and symlinks, in setgid directories, with three umasks; answered
    in C and with every CREATE in Python. The workdir's own default ACL and setgid bit
    must not leak into what is built there (both take them off at mount). Without the
    hook the kernel's FUSE module takes the umask off first (a known difference), and
    the ACL directories are left out. With ``-o noacl`` (as fuse-overlayfs's) the umask
    always applies, and the ACL only where the upper filesystem applies it."""
    u, k = twins(tmp_path, _fill_for_acls)
    for twin in (u, k):
        for d in ("upmin", "upplain", *_ACL_DIRS):
            (twin.upper / d).mkdir(exist_ok=True)
        for d, value in _ACL_DIRS.items():
            os.setxattr(twin.upper / d, "system.posix_acl_default", value)
        # What the workdir would give what is built in it must not reach the upper.
        (twin.work / "work").mkdir()
        os.chmod(twin.work / "work", 0o2777)
        os.setxattr(twin.work / "work", "system.posix_acl_default", _WORKDIR_DEFAULT_ACL)
    with k.mount() as mnt:
        _acl_entries(mnt)
    env = {PYTHON_CREATES_ENV: "1"} if how == "python" else {}
    options = "noacl" if how == "noacl" else ""
    um = start_unionfs(u.lowers, u.mnt, u.upper, u.work, extra_options=options, env=env)
    try:
        _acl_entries(u.mnt)
    finally:
        assert um.unmount() == 0
    got, expected = _acls_of(u.upper), _acls_of(k.upper)
    if how == "noacl":
        modes = {e[0]: stat.S_IMODE(e[1]) for e in got}
        assert (modes["min/f00"], modes["upmin/f00"], modes["min/dir0"]) == (0o600, 0o600, 0o700)
        assert (modes["min/f20"], modes["min/dir2"]) == (0o664, 0o775)  # umask 0: the ACL's
    if how == "noacl" or not hook_enabled():
        got = [e for e in got if e[0].split("/")[0] not in _ACL_DIRS]
        expected = [e for e in expected if e[0].split("/")[0] not in _ACL_DIRS]
    assert got == expected


_NOACL_AS_USER = """
import os, sys
d, umask, file_mode, dir_mode = sys.argv[1], *(int(a, 8) for a in sys.argv[2:])
os.umask(umask)
for name in ("userf", "gone"):
    os.close(os.open(os.path.join(d, name), os.O_CREAT | os.O_WRONLY, file_mode))
os.mkdir(os.path.join(d, "userd"), dir_mode)
os.mkfifo(os.path.join(d, "userp"), file_mode)
"""


def _noacl_entries(d: Path, whiteout: bool, premasked: bool) -> None:
    """Root's (umask 022) and user 1000's (umask 027) new entries in *d*; *premasked*:
    with the umask already taken off, as FUSE's kernel side takes it off with noacl."""
    umask, user_umask = (0, 0) if premasked else (0o022, 0o027)
    old = os.umask(umask)
    try:
        os.close(os.open(d / "rootf", os.O_CREAT | os.O_WRONLY, 0o644 if premasked else 0o666))
        os.mkdir(d / "rootd", 0o755 if premasked else 0o777)
    finally:
        os.umask(old)
    if whiteout:
        os.unlink(d / "gone")
    modes = ("640", "750") if premasked else ("666", "777")
    made = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", sys.executable, "-c",
         _NOACL_AS_USER, str(d), oct(user_umask)[2:], *modes],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr


def test_with_noacl_a_new_entry_gets_what_its_upper_directory_gives_one(tmp_path: Path) -> None:
    """With ``-o noacl`` (fuse-overlayfs's rule) the umask comes off a new entry's mode
    first, and a default ACL of its upper directory then applies as the upper filesystem
    applies it to an entry made there: so also to one built in the workdir (another
    user's; one over a whiteout). The oracle is the upper filesystem itself, the same
    entries made straight in a directory with the same default ACL, their modes less the
    umask (where a default ACL is, the filesystem itself ignores the umask)."""
    stack = Stack(
        tmp_path, [tmp_path / "l1"], tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    )
    for p in (*stack.lowers, stack.upper, stack.work, stack.mnt, tmp_path / "ref"):
        p.mkdir()
    (stack.lowers[0] / "d").mkdir()
    write(stack.lowers[0] / "d/gone")
    for d in (stack.upper / "d", tmp_path / "ref"):
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o777)
        os.setxattr(d, "system.posix_acl_default", _NAMED_DEFAULT_ACL)
    let_others_in(stack)
    _noacl_entries(tmp_path / "ref", whiteout=False, premasked=True)
    um = start_unionfs(stack.lowers, stack.mnt, stack.upper, stack.work, extra_options="noacl")
    try:
        _noacl_entries(stack.mnt / "d", whiteout=True, premasked=False)
    finally:
        assert um.unmount() == 0
    got, expected = _acls_of(stack.upper / "d"), _acls_of(tmp_path / "ref")
    assert [e for e in got if e[0] != "gone"] == [e for e in expected if e[0] != "gone"]
    gone = {e[0]: e[1:] for e in expected}["gone"]  # the whiteout's replacement, made aside
    assert {e[0]: e[1:] for e in got}["gone"] == gone
    assert len(got) == 6 and all(e[2] != "-" for e in got if e[0] != "userp"), got


_SET_ACLS = """
import logging, os, sys
from unionfs.overlay import copyup, namespace
logging.basicConfig()
path = sys.argv[1]
value = os.getxattr(os.path.join(path, "src"), "system.posix_acl_access")  # read in here
fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
namespace._set_acls(fd, b"f", (value, None))  # an entry built in the workdir
copyup.copy_xattrs(os.path.join(path, "src").encode(), os.path.join(path, "dst").encode())
"""


@pytest.mark.parametrize("named", [4321, 0])
def test_an_acl_naming_ids_a_user_namespace_cannot_map_is_set_without_them(
    tmp_path: Path, named: int
) -> None:
    """A daemon in a user namespace (root there, as in a rootless container) reads
    the ids it cannot map as -1 and cannot write them back (EINVAL): an entry built in
    the workdir, and a copy-up, then get the ACL without the entries naming them, which
    grants nobody more than the ACL did, and a warning says so. The kernel overlay sets
    ACLs from inside the kernel and keeps them (a known difference). An id it maps is set
    as ever."""
    (tmp_path / "f").touch()
    (tmp_path / "src").touch()
    (tmp_path / "dst").touch()
    # user::rwx user:NAMED:rwx group::r-- mask::rwx other::---
    entries = [(0x01, 7, _ANY), (0x02, 7, named), (0x04, 4, _ANY), (0x10, 7, _ANY), (0x20, 0, _ANY)]
    value = acl.encode(entries)
    os.setxattr(tmp_path / "src", "system.posix_acl_access", value)
    res = subprocess.run(
        ["unshare", "-U", "-r", sys.executable, "-c", _SET_ACLS, str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": os.fspath(Path(__file__).parent.parent)},
    )
    assert res.returncode == 0, res.stderr
    for name in ("f", "dst"):
        if named:  # nothing named is left: a mode, the group's bits what it had (not the mask's)
            assert os.listxattr(tmp_path / name) == [], name
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o740, name
        else:
            assert os.getxattr(tmp_path / name, "system.posix_acl_access") == value, name
    if named:
        assert res.stderr.count("without the users and groups this daemon cannot map") == 2
    else:
        assert res.stderr == ""
