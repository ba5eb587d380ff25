"""The image tools as an ordinary user: what root-only features become without root,
the default cache under $XDG_CACHE_HOME, and an unprivileged image mount."""

from __future__ import annotations

import os
import stat
import subprocess
import tarfile
from pathlib import Path

from tests.image.builders import Layer, Tar, write_oci_layout
from tests.mounting import REPO, mount_type, unionfs_command


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONPATH=os.fspath(REPO), **(env or {}))
    return subprocess.run(
        [*unionfs_command(), *args], capture_output=True, text=True, env=full, timeout=120
    )


def layer() -> bytes:
    return (
        Tar().file("bin/su", b"x", mode=0o4755, uid=0, gid=0)
        .file("etc/f", b"f", xattrs={"user.ok": b"1", "trusted.no": b"2", "security.no": b"3"})
        .dir("opq").opaque("opq").whiteout("gone")
        .bytes()
    )  # fmt: skip


def test_unpack_without_root(tmp_path: Path) -> None:
    src = tmp_path / "l.tar"
    src.write_bytes(layer())
    res = run("layer", "import", os.fspath(src), os.fspath(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert stat.S_IMODE(os.lstat(out / "bin/su").st_mode) == 0o755  # setuid dropped
    assert os.lstat(out / "bin/su").st_uid == os.geteuid()
    assert os.listxattr(out / "etc/f") == ["user.ok"]
    assert os.getxattr(out / "opq", "user.overlay.opaque") == b"y"
    gone = os.lstat(out / "gone")  # a kernel whiteout: unprivileged mknod 0/0 (Linux 5.8+)
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0


def test_device_nodes_are_skipped_with_a_warning(tmp_path: Path) -> None:
    src = tmp_path / "dev.tar"
    src.write_bytes(
        Tar().device("dev/null", tarfile.CHRTYPE, 1, 3).file("dev/README", b"r").bytes()
    )
    res = run("layer", "import", os.fspath(src), os.fspath(tmp_path / "out"))
    assert (res.returncode, res.stderr) == (
        0,
        "unionfs: layer dev.tar: device nodes skipped (not running as root)\n",
    )
    assert os.listdir(tmp_path / "out/dev") == ["README"]


def test_image_mount_with_the_default_cache(tmp_path: Path) -> None:
    built = write_oci_layout(
        tmp_path / "img", [Layer(layer()), Layer(Tar().file("top", b"t").bytes())]
    )
    cache_home = tmp_path / "xdg"
    env = {"XDG_CACHE_HOME": os.fspath(cache_home)}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run("image", "mount", os.fspath(built.path), os.fspath(mnt), env=env)
    assert res.returncode == 0, res.stderr
    try:
        assert mount_type(mnt) == "fuse.unionfs"
        assert sorted(os.listdir(mnt)) == ["bin", "etc", "opq", "top"]
    finally:
        subprocess.run(["fusermount3", "-u", os.fspath(mnt)], check=False)
    cached = sorted(os.listdir(cache_home / "unionfs/layers/sha256"))
    assert cached == sorted(d.split(":")[1] for d in built.diff_ids)
    res = run(
        "image", "mount", "--print-kernel-mount", os.fspath(built.path), os.fspath(mnt), env=env
    )
    assert res.returncode == 0 and ",userxattr " in res.stdout
