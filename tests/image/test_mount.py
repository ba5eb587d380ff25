"""``unionfs image mount``: the image's cached layers mounted by the plain mount's
code, read-only or with a container layer, and the same stack mounted by the
kernel with the command ``--print-kernel-mount`` prints."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from tests.image.builders import Layer, Tar, write_docker_archive, write_oci_layout
from tests.image.mounts import image_mounted, tree
from tests.image.test_layout import run
from tests.mounting import lazy_unmount, mount_type


def image_layers() -> list[Layer]:
    base = (
        Tar().dir("etc").file("etc/keep", b"keep").file("etc/gone", b"gone")
        .dir("opq", mode=0o750).file("opq/old", b"old")
        .file("bin/tool", b"#!/bin/sh\n", mode=0o4755)
        .file("bin/xattr", b"x", xattrs={"user.note": b"hello"})
        .symlink("bin/sh", "tool").hardlink("bin/tool2", "bin/tool")
    )  # fmt: skip
    mid = Tar().whiteout("etc/gone").opaque("opq").file("opq/new", b"new")
    top = Tar().dir("etc").file("etc/keep", b"changed", mode=0o600, uid=7, gid=8)
    return [Layer(base.bytes()), Layer(mid.bytes(), "none"), Layer(top.bytes(), "zstd")]


EXPECTED = {
    "bin",
    "bin/sh",
    "bin/tool",
    "bin/tool2",
    "bin/xattr",
    "etc",
    "etc/keep",
    "opq",
    "opq/new",
}


def test_read_only_mount_shows_the_image(tmp_path: Path) -> None:
    built = write_oci_layout(tmp_path / "img", image_layers())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with image_mounted(f"{built.path}:latest", mnt, tmp_path / "cache"):
        got = tree(mnt)
        assert set(got) == EXPECTED
        assert (mnt / "etc/keep").read_bytes() == b"changed"
        assert got["etc/keep"][1:4] == (0o600, 7, 8)
        assert got["bin/tool"][1] == 0o4755
        assert got["bin/xattr"][5] == (("user.note", b"hello"),)
        assert os.readlink(mnt / "bin/sh") == "tool"
        # The middle layer's marker implies its own opq/ (mode 0755, as any directory a
        # layer implies), and the topmost directory's attributes are the merged ones.
        assert got["opq"][1] == 0o755
        try:
            (mnt / "new").write_text("x")
            raise AssertionError("a mount without --upper must be read-only")
        except OSError as e:
            assert e.errno == 30  # EROFS


def test_writable_mount_writes_the_upper(tmp_path: Path) -> None:
    built = write_docker_archive(tmp_path / "img.tar", image_layers())
    mnt, upper, work = tmp_path / "mnt", tmp_path / "upper", tmp_path / "work"
    for d in (mnt, upper, work):
        d.mkdir()
    extra = ["--upper", os.fspath(upper), "--work", os.fspath(work)]
    with image_mounted(built.path, mnt, tmp_path / "cache", extra):
        (mnt / "etc/new").write_text("added")
        (mnt / "opq/new").unlink()
    assert (upper / "etc/new").read_text() == "added"
    assert os.lstat(upper / "opq/new").st_rdev == 0  # a kernel whiteout in the upper


def test_cached_image_mounts_without_its_blobs(tmp_path: Path) -> None:
    """A second mount unpacks nothing: it works with every layer blob deleted."""
    built = write_oci_layout(tmp_path / "img", image_layers())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with image_mounted(built.path, mnt, tmp_path / "cache"):
        first = tree(mnt)
    for d in built.layer_digests:
        (built.path / "blobs/sha256" / d.split(":")[1]).unlink()
    with image_mounted(built.path, mnt, tmp_path / "cache"):
        assert tree(mnt) == first


def test_kernel_mount_command_mounts_the_same_tree(tmp_path: Path) -> None:
    built = write_oci_layout(tmp_path / "img", image_layers())
    mnt, kmnt = tmp_path / "mnt", tmp_path / "kmnt"
    mnt.mkdir()
    kmnt.mkdir()
    with image_mounted(built.path, mnt, tmp_path / "cache"):
        ours = tree(mnt)
    res = run(
        "image", "mount", "--print-kernel-mount", "--cache", os.fspath(tmp_path / "cache"),
        os.fspath(built.path), os.fspath(kmnt),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    argv = shlex.split(res.stdout)
    assert argv[:5] == ["mount", "-t", "overlay", "overlay", "-o"]
    subprocess.run(argv, check=True)
    try:
        assert mount_type(kmnt) == "overlay"
        assert tree(kmnt) == ours
    finally:
        subprocess.run(["umount", os.fspath(kmnt)], check=False)
        if mount_type(kmnt):
            lazy_unmount(kmnt)


def test_kernel_mount_of_a_one_layer_image(tmp_path: Path) -> None:
    built = write_oci_layout(tmp_path / "img", [Layer(Tar().file("only", b"1").bytes())])
    kmnt = tmp_path / "kmnt"
    kmnt.mkdir()
    res = run(
        "image", "mount", "--print-kernel-mount", "--cache", os.fspath(tmp_path / "cache"),
        os.fspath(built.path), os.fspath(kmnt),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    subprocess.run(shlex.split(res.stdout), check=True)
    try:
        assert os.listdir(kmnt) == ["only"]
    finally:
        subprocess.run(["umount", os.fspath(kmnt)], check=False)
        if mount_type(kmnt):
            lazy_unmount(kmnt)


def test_bad_digest_mounts_nothing(tmp_path: Path) -> None:
    layers = image_layers()
    tampered = bytearray(layers[1].tar)
    tampered[700] ^= 1  # same size, one bit different
    layers[1].blob_override = bytes(tampered)
    built = write_oci_layout(tmp_path / "img", layers)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run(
        "image",
        "mount",
        "--cache",
        os.fspath(tmp_path / "cache"),
        os.fspath(built.path),
        os.fspath(mnt),
    )
    assert res.returncode == 1
    assert res.stderr.startswith("unionfs: layer 2/3 sha256:")
    assert "blob digest mismatch" in res.stderr and res.stderr.count("\n") == 1
    assert mount_type(mnt) is None


def test_daemon_mode_returns_once_mounted(tmp_path: Path) -> None:
    """Without -f the command returns when the mount is ready, like the plain mount."""
    built = write_oci_layout(tmp_path / "img", image_layers())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run(
        "image",
        "mount",
        "--cache",
        os.fspath(tmp_path / "cache"),
        os.fspath(built.path),
        os.fspath(mnt),
    )
    try:
        assert res.returncode == 0, res.stderr
        assert mount_type(mnt) == "fuse.unionfs"
        assert (mnt / "opq/new").read_bytes() == b"new"
    finally:
        subprocess.run(["fusermount3", "-u", os.fspath(mnt)], check=False)
        if mount_type(mnt):
            lazy_unmount(mnt)


def test_usage_errors(tmp_path: Path) -> None:
    built = write_oci_layout(tmp_path / "img", image_layers())
    res = run(
        "image", "mount", "--upper", os.fspath(tmp_path), os.fspath(built.path), os.fspath(tmp_path)
    )
    assert (res.returncode, res.stderr) == (1, "unionfs: --upper needs --work too\n")
    res = run("image", "mount", os.fspath(tmp_path / "nothing"), os.fspath(tmp_path))
    assert (res.returncode, res.stderr) == (
        1,
        f"unionfs: {tmp_path}/nothing: no such file or directory\n",
    )


def test_progress_on_a_terminal_only(tmp_path: Path) -> None:
    """Unpacking draws a status line on stderr when it is a terminal, and nothing when not."""
    import pty

    from tests.mounting import REPO, unionfs_command

    built = write_oci_layout(tmp_path / "img", image_layers())
    args = [*unionfs_command(), "image", "unpack", os.fspath(built.path)]
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    master, slave = pty.openpty()
    try:
        res = subprocess.run(
            [*args, os.fspath(tmp_path / "a")],
            stderr=slave,
            stdout=subprocess.DEVNULL,
            env=env,
            timeout=60,
        )
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert res.returncode == 0
    assert b"unpacking layer 1/3 sha256:" in seen and seen.endswith(b"\r\x1b[K")
    res2 = run("image", "unpack", os.fspath(built.path), os.fspath(tmp_path / "b"))
    assert res2.returncode == 0 and res2.stderr == ""
