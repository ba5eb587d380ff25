"""An ordinary user's mount: the overlay's markers go in user.overlay.*, the upper
mounts with the kernel overlay's userxattr in a user namespace, and a bad set-up
gets the same one-line errors as root's."""

from __future__ import annotations

import ast
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Mounted, Stack
from tests.mounting import REPO, overlay_options, unionfs_command
from tests.test_merge import write as _write
from tests.treesnap import diff, snapshot

USER_OPAQUE = "user.overlay.opaque"


def write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, data)


def _fill(lower: Path) -> None:
    write(lower / "d" / "old", b"below")
    write(lower / "e" / "x", b"below")
    write(lower / "f", b"file")
    os.symlink("f", lower / "ln")


def _change(m: Path) -> None:
    os.unlink(m / "d" / "old")
    os.rmdir(m / "d")
    os.mkdir(m / "d")  # needs an opaque marker: the EPERM of a trusted.* marker before
    write(m / "d" / "new", b"new")
    os.mkdir(m / "up")
    os.rename(m / "up", m / "e" / "moved")  # needs one too
    with open(m / "f", "ab") as f:  # copy-up
        f.write(b"+")
    os.unlink(m / "ln")  # a whiteout, a char 0/0 device made by an ordinary user


def test_copy_up_whiteouts_and_opaque_directories_work(stack: Stack, mounted: Mounted) -> None:
    _fill(stack.lowers[0])
    mounted()
    _change(stack.mnt)
    assert sorted(os.listdir(stack.mnt / "d")) == ["new"]
    assert sorted(os.listdir(stack.mnt / "e")) == ["moved", "x"]
    assert (stack.mnt / "f").read_bytes() == b"file+"
    assert not os.path.lexists(stack.mnt / "ln")
    assert os.getxattr(stack.upper / "d", USER_OPAQUE) == b"y"
    assert os.getxattr(stack.upper / "e" / "moved", USER_OPAQUE) == b"y"
    assert USER_OPAQUE not in os.listxattr(stack.mnt / "d")
    with pytest.raises(OSError) as e:
        os.setxattr(stack.mnt / "f", USER_OPAQUE, b"y")
    assert e.value.errno == errno.EOPNOTSUPP
    st = os.lstat(stack.upper / "ln")
    assert (st.st_mode & 0o170000) == 0o020000 and st.st_rdev == 0


def _kernel_snapshot(
    lowers: list[Path], upper: Path, work: Path, mnt: Path
) -> dict[bytes, tuple[object, ...]]:
    """The kernel overlay with userxattr, mounted in a user namespace (as the user is
    root there), and its tree seen from inside; owners mapped back to the user."""
    opts = overlay_options(lowers, upper, work) + ",userxattr"
    script = (
        f"mount -t overlay overlay -o '{opts}' '{mnt}' && "
        f"{sys.executable} -m tests.user.snap '{mnt}'; rc=$?; umount '{mnt}'; exit $rc"
    )
    out = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.fspath(REPO)},
    ).stdout
    snap: dict[bytes, tuple[object, ...]] = ast.literal_eval(out)
    me = os.getuid()
    fixed = {}
    for path, entry in snap.items():
        fields = list(entry)
        fields[2] = me if fields[2] == 0 else fields[2]  # uid 0 inside is the user outside
        fields[3] = os.getgid() if fields[3] == 0 else fields[3]
        fixed[path] = tuple(fields)
    return fixed


def test_the_upper_mounts_with_the_kernel_overlay_userxattr(
    stack: Stack, mounted: Mounted, tmp_path: Path
) -> None:
    _fill(stack.lowers[0])
    um = mounted()
    _change(stack.mnt)
    ours = snapshot(stack.mnt)
    um.unmount()
    kwork, kmnt = tmp_path / "kwork", tmp_path / "kmnt"
    kwork.mkdir()
    kmnt.mkdir()
    theirs = _kernel_snapshot(stack.lowers, stack.upper, kwork, kmnt)
    assert diff(ours, theirs) == []


def test_the_snapshot_comparison_sees_a_difference(
    stack: Stack, mounted: Mounted, tmp_path: Path
) -> None:
    """Negative control for the previous test: a marker lost from the upper shows."""
    _fill(stack.lowers[0])
    um = mounted()
    _change(stack.mnt)
    ours = snapshot(stack.mnt)
    um.unmount()
    os.removexattr(stack.upper / "d", USER_OPAQUE)
    kwork, kmnt = tmp_path / "kwork", tmp_path / "kmnt"
    kwork.mkdir()
    kmnt.mkdir()
    assert diff(ours, _kernel_snapshot(stack.lowers, stack.upper, kwork, kmnt)) != []


# -- the same clear errors as root gets --------------------------------------------------


def _unionfs(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.fspath(REPO)}
    return subprocess.run(
        [*prefix, *unionfs_command(), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )


def _one_line_error(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("unionfs: ")
    for w in words:
        assert w in lines[0], lines[0]


def _opts(stack: Stack, upper: Path | None = None) -> str:
    return overlay_options(stack.lowers, upper or stack.upper, stack.work)


def test_allow_other_without_user_allow_other(stack: Stack) -> None:
    with open("/etc/fuse.conf") as f:
        assert not any(line.strip() == "user_allow_other" for line in f)
    _one_line_error(
        _unionfs("-o", _opts(stack) + ",allow_other", os.fspath(stack.mnt)), "user_allow_other"
    )


def test_a_workdir_the_user_cannot_write(stack: Stack) -> None:
    os.chmod(stack.work, 0o555)
    _one_line_error(_unionfs("-o", _opts(stack), os.fspath(stack.mnt)), "workdir", "not writable")


def test_an_upper_the_user_does_not_own(stack: Stack) -> None:
    not_owned = Path(os.environ["UNIONFS_NOT_OWNED"])
    assert os.stat(not_owned).st_uid != os.getuid() and os.access(not_owned, os.W_OK)
    _one_line_error(
        _unionfs("-o", _opts(stack, upper=not_owned), os.fspath(stack.mnt)), "upperdir", "owned by"
    )


def test_dev_fuse_missing(stack: Stack) -> None:
    """In a private mount namespace with an empty /dev (a user namespace lets the user make one)."""
    res = _unionfs(
        "-o",
        _opts(stack),
        os.fspath(stack.mnt),
        prefix=("unshare", "-Urm", "sh", "-c", 'mount -t tmpfs tmpfs /dev && exec "$@"', "sh"),
    )
    _one_line_error(res, "/dev/fuse", "No such file")


def test_dev_fuse_not_readable(stack: Stack) -> None:
    """/dev/fuse replaced by a file of root's that the user cannot open."""
    res = _unionfs(
        "-o",
        _opts(stack),
        os.fspath(stack.mnt),
        prefix=(
            "unshare",
            "-Urm",
            "sh",
            "-c",
            'mount --bind /etc/shadow /dev/fuse && exec "$@"',
            "sh",
        ),
    )
    _one_line_error(res, "/dev/fuse", "Permission denied")
