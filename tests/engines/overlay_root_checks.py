"""Checks that run *inside* a container whose root filesystem is a kernel overlay.

``examples/ci-container.sh`` runs this file (by path: its name keeps it out of
the host's collection) next to the core real-mount tests, with ``--basetemp``
on a tmpfs. What it shows, on the running kernel:

* an overlay root cannot hold an overlay's upper layer: the kernel overlay
  refuses it, and a whiteout (char device 0/0) cannot be created there, which
  unionfs needs too;
* lower layers may live on the overlay root: unionfs honours markers written
  through it (the root overlay stores a ``trusted.overlay.*`` xattr escaped and
  shows it back unescaped) and OCI ``.wh.`` whiteouts, with its upper on a tmpfs;
* the kernel overlay stacks at most two deep (the root, then one more), while
  unionfs mounts over a second-level overlay as well.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import overlay_options, unionfs_mounted

# On the container's root overlay (not under --basetemp, which is on a tmpfs).
ROOT_AREA = Path("/var/tmp/unionfs-overlay-root-checks")

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_WHITEOUT = 4


def fs_type(path: Path) -> str:
    """The filesystem type of *path* as statfs(2) names it (``overlayfs``, ``tmpfs``...)."""
    res = subprocess.run(
        ["stat", "-f", "-c", "%T", os.fspath(path)], capture_output=True, text=True, check=True
    )
    return res.stdout.strip()


def kernel_mount(options: str, target: Path) -> int:
    """mount(2) of a kernel overlay; 0 or the errno (mount(8) would hide it)."""
    res = _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, options.encode())
    return 0 if res == 0 else ctypes.get_errno()


def kernel_umount(target: Path) -> None:
    if _libc.umount2(os.fsencode(target), 0) != 0:
        _libc.umount2(os.fsencode(target), 2)  # MNT_DETACH


@pytest.fixture(scope="module", autouse=True)
def _inside_a_container_on_an_overlay_root() -> None:
    if fs_type(Path("/")) != "overlayfs":
        pytest.fail("run this in a container whose root is an overlay (examples/ci-container.sh)")


@pytest.fixture
def on_root() -> Iterator[Path]:
    """A fresh directory on the container's root overlay."""
    d = ROOT_AREA / uuid.uuid4().hex
    d.mkdir(parents=True)
    assert fs_type(d) == "overlayfs"
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def on_tmpfs(tmp_path: Path) -> Path:
    assert fs_type(tmp_path) == "tmpfs", "run with --basetemp on a tmpfs"
    return tmp_path


def dirs(base: Path, *names: str) -> list[Path]:
    out = [base / n for n in names]
    for d in out:
        d.mkdir()
    return out


def test_the_kernel_overlay_refuses_an_upper_on_the_overlay_root(
    on_root: Path, on_tmpfs: Path
) -> None:
    lower, upper, work, mnt = dirs(on_root, "lower", "upper", "work", "mnt")
    assert kernel_mount(overlay_options([lower], upper, work), mnt) == errno.EINVAL
    # The same lower with the upper on a tmpfs mounts (two levels of overlay).
    t_upper, t_work = dirs(on_tmpfs, "upper", "work")
    assert kernel_mount(overlay_options([lower], t_upper, t_work), mnt) == 0
    kernel_umount(mnt)


def test_no_whiteout_can_be_made_on_the_overlay_root(on_root: Path, on_tmpfs: Path) -> None:
    """An overlay refuses to create what it would itself read as a whiteout."""
    with pytest.raises(PermissionError):
        os.mknod(on_root / "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (on_root / "f").write_bytes(b"")
    res = _libc.renameat2(-100, os.fsencode(on_root / "f"), -100, os.fsencode(on_root / "g"),
                          RENAME_WHITEOUT)  # fmt: skip
    assert (res, ctypes.get_errno()) == (-1, errno.EINVAL)
    os.mknod(on_tmpfs / "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))  # a tmpfs allows it


def test_unionfs_refuses_an_upper_on_the_overlay_root(on_root: Path) -> None:
    """unionfs makes its whiteouts as the kernel does (char 0/0 devices), so it
    cannot use the overlay root for its upper either: it says so and mounts nothing."""
    lower, upper, work, mnt = dirs(on_root, "lower", "upper", "work", "mnt")
    res = subprocess.run(
        [sys.executable, "-m", "unionfs", "-o", overlay_options([lower], upper, work), str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    assert res.stderr.count("\n") == 1, res.stderr
    assert "is on an overlay filesystem, which refuses whiteouts" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert fs_type(mnt) == "overlayfs"  # nothing mounted there


def test_lowers_on_the_overlay_root_upper_on_a_tmpfs(on_root: Path, on_tmpfs: Path) -> None:
    low, base = dirs(on_root, "low", "base")
    (base / "etc").mkdir()
    (base / "etc" / "keep").write_bytes(b"keep\n")
    (base / "etc" / "gone").write_bytes(b"gone\n")
    (base / "var").mkdir()
    (base / "var" / "old").write_bytes(b"old\n")
    (base / "bin").mkdir()
    (base / "bin" / "tool").write_bytes(b"tool\n")
    (low / "etc").mkdir()
    (low / "etc" / ".wh.gone").write_bytes(b"")  # OCI whiteout: deletes etc/gone
    (low / "var").mkdir()
    (low / "var" / "new").write_bytes(b"new\n")
    # Written through the root overlay: stored there as trusted.overlay.overlay.opaque,
    # read back as trusted.overlay.opaque, which is what unionfs sees.
    os.setxattr(low / "var", "trusted.overlay.opaque", b"y")
    assert os.getxattr(low / "var", "trusted.overlay.opaque") == b"y"
    upper, work, mnt = dirs(on_tmpfs, "upper", "work", "mnt")
    with unionfs_mounted([low, base], mnt, upper, work):
        assert sorted(os.listdir(mnt / "etc")) == ["keep"]
        assert sorted(os.listdir(mnt / "var")) == ["new"]
        (mnt / "bin" / "tool").unlink()
        with open(mnt / "etc" / "keep", "ab") as f:
            f.write(b"more\n")
        (mnt / "etc" / "added").write_bytes(b"added\n")
        assert sorted(os.listdir(mnt / "bin")) == []
    st = os.lstat(upper / "bin" / "tool")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, "whiteout in the tmpfs upper"
    assert (upper / "etc" / "keep").read_bytes() == b"keep\nmore\n"
    assert (base / "etc" / "keep").read_bytes() == b"keep\n"
    assert (base / "bin" / "tool").exists()


def test_unionfs_stacks_where_the_kernel_overlay_stops(on_root: Path, on_tmpfs: Path) -> None:
    """The root is overlay level 1; an overlay over a lower on it is level 2, the
    kernel's limit. A third kernel overlay over that is refused; unionfs mounts."""
    (lower,) = dirs(on_root, "lower")
    (lower / "f").write_bytes(b"f\n")
    u2, w2, m2, u3, w3, m3 = dirs(on_tmpfs, "u2", "w2", "m2", "u3", "w3", "m3")
    assert kernel_mount(overlay_options([lower], u2, w2), m2) == 0
    try:
        assert kernel_mount(overlay_options([m2], u3, w3), m3) == errno.EINVAL
        with unionfs_mounted([m2], m3, u3, w3):
            assert (m3 / "f").read_bytes() == b"f\n"
            (m3 / "f").unlink()
            assert os.listdir(m3) == []
        assert (m2 / "f").exists() and stat.S_ISCHR(os.lstat(u3 / "f").st_mode)
    finally:
        kernel_umount(m2)
