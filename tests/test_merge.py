"""Lookup and merge: what the mount shows for a given stack of layers."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess

import pytest

from tests.conftest import KernelMount, Mounted, Stack
from tests.treesnap import diff, snapshot


def write(path: os.PathLike[str] | str, data: bytes = b"x") -> None:
    with open(path, "wb") as f:
        f.write(data)


def test_upper_name_hides_lower_and_directories_merge(stack: Stack, mounted: Mounted) -> None:
    l1, l2 = stack.lowers
    write(l2 / "f", b"bottom")
    write(l1 / "f", b"top")
    (l1 / "d").mkdir()
    (l2 / "d").mkdir()
    write(l1 / "d" / "a")
    write(l2 / "d" / "b")
    write(l2 / "d" / "a", b"hidden")
    (l2 / "x").mkdir()  # a file above a directory hides it
    write(l1 / "x", b"file")
    mounted()
    m = stack.mnt
    assert (m / "f").read_bytes() == b"top"
    assert sorted(os.listdir(m / "d")) == ["a", "b"]
    assert (m / "d" / "a").read_bytes() == b"x"
    assert (m / "x").read_bytes() == b"file"


def test_merged_directory_metadata_and_xattrs_come_from_the_top(
    stack: Stack, mounted: Mounted
) -> None:
    l1, l2 = stack.lowers
    (l1 / "d").mkdir(mode=0o750)
    (l2 / "d").mkdir(mode=0o700)
    os.chown(l1 / "d", 123, 456)
    os.setxattr(l1 / "d", "user.layer", b"top")
    os.setxattr(l2 / "d", "user.layer", b"bottom")
    os.setxattr(l2 / "d", "user.only-below", b"b")
    os.utime(l1 / "d", ns=(1, 1_000_000_000))
    mounted()
    st = os.stat(stack.mnt / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 123, 456)
    assert st.st_mtime_ns == 1_000_000_000
    assert os.getxattr(stack.mnt / "d", "user.layer") == b"top"
    assert "user.only-below" not in os.listxattr(stack.mnt / "d")
    assert st.st_nlink == 1  # a merged directory, as the kernel overlay reports it


def test_readdir_lists_each_name_once_with_its_type(stack: Stack, mounted: Mounted) -> None:
    l1, l2 = stack.lowers
    for layer in (l1, l2):
        (layer / "dir").mkdir()
        write(layer / "file")
    os.symlink("file", l1 / "link")
    os.mkfifo(l2 / "fifo")
    os.mknod(l1 / "gone", stat.S_IFCHR, 0)  # whiteout
    write(l2 / "gone")
    mounted()
    with os.scandir(stack.mnt) as it:
        entries = {e.name: e for e in it}
    assert sorted(entries) == ["dir", "fifo", "file", "link"]
    assert entries["dir"].is_dir(follow_symlinks=False)
    assert entries["file"].is_file(follow_symlinks=False)
    assert entries["link"].is_symlink()
    assert stat.S_ISFIFO(entries["fifo"].stat(follow_symlinks=False).st_mode)


def test_whiteout_hides_everything_below_and_is_invisible(stack: Stack, mounted: Mounted) -> None:
    l1, l2 = stack.lowers
    (l2 / "d").mkdir()
    write(l2 / "d" / "inner")
    os.mknod(l1 / "d", stat.S_IFCHR, 0)
    mounted()
    assert not os.path.lexists(stack.mnt / "d")
    assert os.listdir(stack.mnt) == []
    with pytest.raises(FileNotFoundError):
        os.stat(stack.mnt / "d" / "inner")


def test_opaque_directory_hides_directories_below(stack: Stack, mounted: Mounted) -> None:
    l1, l2 = stack.lowers
    (l1 / "d").mkdir()
    (l2 / "d").mkdir()
    write(l1 / "d" / "mine")
    write(l2 / "d" / "below")
    os.setxattr(l1 / "d", "trusted.overlay.opaque", b"y")
    mounted()
    assert os.listdir(stack.mnt / "d") == ["mine"]
    assert "trusted.overlay.opaque" not in os.listxattr(stack.mnt / "d")


def test_every_file_type_works_through_the_mount(stack: Stack, mounted: Mounted) -> None:
    mounted()
    m = stack.mnt
    write(m / "reg", b"data")
    os.mkdir(m / "dir")
    os.symlink("reg", m / "sym")
    os.link(m / "reg", m / "hard")
    os.mkfifo(m / "fifo")
    os.mknod(m / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(m / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    os.mknod(m / "sock-node", stat.S_IFSOCK | 0o600)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(os.fspath(m / "sock"))
    finally:
        s.close()
    kinds = {n: stat.S_IFMT(os.lstat(m / n).st_mode) for n in os.listdir(m)}
    assert kinds == {
        "reg": stat.S_IFREG,
        "dir": stat.S_IFDIR,
        "sym": stat.S_IFLNK,
        "hard": stat.S_IFREG,
        "fifo": stat.S_IFIFO,
        "chr": stat.S_IFCHR,
        "blk": stat.S_IFBLK,
        "sock-node": stat.S_IFSOCK,
        "sock": stat.S_IFSOCK,
    }
    assert os.readlink(m / "sym") == "reg"
    assert (m / "hard").read_bytes() == b"data"
    assert os.stat(m / "chr").st_rdev == os.makedev(1, 3)
    with open(m / "chr", "rb") as f:  # /dev/null through the mount
        assert f.read() == b""
    # Everything landed in the upper as real files of the same types.
    assert kinds == {n: stat.S_IFMT(os.lstat(stack.upper / n).st_mode) for n in kinds}


def test_a_0_0_char_device_cannot_be_created(stack: Stack, mounted: Mounted) -> None:
    mounted()
    with pytest.raises(PermissionError):
        os.mknod(stack.mnt / "wh", stat.S_IFCHR | 0o600, 0)


def test_the_tree_matches_the_kernel_overlay(
    stack: Stack, mounted: Mounted, kernel: KernelMount
) -> None:
    """A mixed stack read through both: the same names, types, modes, contents."""
    l1, l2 = stack.lowers
    for layer, tag in ((l1, b"1"), (l2, b"2")):
        (layer / "etc").mkdir()
        write(layer / "etc" / f"conf{tag.decode()}", tag)
        write(layer / "etc" / "common", tag)
    os.symlink("/etc", l1 / "hostetc")
    os.mknod(l1 / "etc" / "conf2", stat.S_IFCHR, 0)
    (l2 / "opq").mkdir()
    write(l2 / "opq" / "old")
    (l1 / "opq").mkdir()
    os.setxattr(l1 / "opq", "trusted.overlay.opaque", b"y")
    mounted()
    with kernel(stack.lowers) as kmnt:
        expected = snapshot(kmnt)
    assert diff(snapshot(stack.mnt), expected) == []


def test_lookup_of_a_missing_name_is_enoent(stack: Stack, mounted: Mounted) -> None:
    mounted()
    with pytest.raises(OSError) as e:
        os.stat(stack.mnt / "nope")
    assert e.value.errno == errno.ENOENT


def test_listings_have_dot_and_dotdot(stack: Stack, mounted: Mounted) -> None:
    (stack.lowers[0] / "d").mkdir()
    mounted()
    out = subprocess.run(
        ["ls", "-a", os.fspath(stack.mnt / "d")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [".", ".."]


def test_oci_whiteout_files_in_lower_layers_are_honoured(stack: Stack, mounted: Mounted) -> None:
    """containers-storage keeps a mount program's layers in the OCI format:
    ``.wh.NAME`` deletes NAME below, ``.wh..wh..opq`` makes its directory opaque."""
    l1, l2 = stack.lowers
    for name in ("gone", "kept"):
        write(l2 / name)
    (l2 / "d").mkdir()
    write(l2 / "d" / "old")
    (l2 / "gonedir").mkdir()
    write(l2 / "gonedir" / "inner")
    write(l1 / ".wh.gone")
    write(l1 / ".wh.gonedir")
    (l1 / "d").mkdir()
    write(l1 / "d" / ".wh..wh..opq")
    write(l1 / "d" / "new")
    mounted()
    m = stack.mnt
    assert sorted(os.listdir(m)) == ["d", "kept"]
    assert os.listdir(m / "d") == ["new"]
    for hidden in ("gone", ".wh.gone", "gonedir", "d/old", "d/.wh..wh..opq"):
        assert not os.path.lexists(m / hidden), hidden
    write(m / "gone", b"back")  # creating over an OCI whiteout works like over a kernel one
    assert (m / "gone").read_bytes() == b"back"
    os.unlink(m / "kept")  # and deletes still write the kernel format
    st = os.lstat(stack.upper / "kept")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_mkdir_over_an_oci_deleted_directory_is_empty(stack: Stack, mounted: Mounted) -> None:
    (stack.lowers[1] / "d").mkdir()
    write(stack.lowers[1] / "d" / "secret")
    write(stack.lowers[0] / ".wh.d")
    mounted()
    os.mkdir(stack.mnt / "d")
    assert os.listdir(stack.mnt / "d") == []
