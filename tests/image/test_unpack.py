"""Unpacking layer tars: what each kind of entry becomes, OCI whiteouts turned into
the kernel's, the last duplicate winning, and (the oracle) the unpacked layers
mounted by the kernel's overlayfs showing what the OCI rules say."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.image.builders import Tar
from tests.mounting import kernel_overlay
from unionfs.image import unpack as unpack_module
from unionfs.image.unpack import unpack_tar
from unionfs.overlay import acl, markers


def unpack(data: bytes, dest: Path, root: bool | None = None) -> int:
    dest.mkdir(exist_ok=True)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return unpack_tar(io.BytesIO(data), fd, "test", root=root)
    finally:
        os.close(fd)


def is_whiteout(p: Path) -> bool:
    return markers.is_whiteout(os.lstat(p))


def is_opaque(p: Path) -> bool:
    return markers.has_opaque_xattr(os.fsencode(p), markers.TRUSTED)


def test_entries_keep_type_mode_owner_times_and_xattrs(tmp_path: Path) -> None:
    t = (
        Tar()
        .dir("etc", mode=0o750, uid=12, gid=34, mtime=1_000_000_000)
        .file(
            "etc/f",
            b"data",
            mode=0o4751,
            uid=1000,
            gid=1001,
            mtime=1_200_000_000,
            xattrs={"user.bin": b"\x00\xff", "trusted.t": b"root only"},
        )  # fmt: skip
        .symlink("etc/link", "../nowhere", uid=5, gid=6)
        .hardlink("etc/hard", "etc/f")
        .fifo("pipe", mode=0o640)
        .device("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666)
    )
    unpack(t.bytes(), tmp_path / "l")
    etc = os.lstat(tmp_path / "l/etc")
    assert (stat.S_IMODE(etc.st_mode), etc.st_uid, etc.st_gid) == (0o750, 12, 34)
    assert etc.st_mtime == 1_000_000_000  # set after its entries were made
    f = os.lstat(tmp_path / "l/etc/f")
    assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid, f.st_mtime) == (
        0o4751,
        1000,
        1001,
        1_200_000_000,
    )
    assert (tmp_path / "l/etc/f").read_bytes() == b"data"
    assert os.getxattr(tmp_path / "l/etc/f", "user.bin") == b"\x00\xff"
    assert os.getxattr(tmp_path / "l/etc/f", "trusted.t") == b"root only"
    assert os.readlink(tmp_path / "l/etc/link") == "../nowhere"
    assert os.lstat(tmp_path / "l/etc/link").st_uid == 5
    assert os.lstat(tmp_path / "l/etc/hard").st_ino == f.st_ino
    assert stat.S_ISFIFO(os.lstat(tmp_path / "l/pipe").st_mode)
    dev = os.lstat(tmp_path / "l/dev/null")
    assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
    # A directory no entry named (dev) is made 0755, as are the layer's root
    # and every directory the tar implies.
    assert stat.S_IMODE(os.lstat(tmp_path / "l/dev").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(tmp_path / "l").st_mode) == 0o755


def test_a_default_acl_where_the_layer_is_unpacked_changes_nothing(tmp_path: Path) -> None:
    """A layer's entries get their modes and xattrs from the tar alone, also where the
    cache's directory has a default POSIX ACL: inherited, it would take bits off their
    modes (the mask) and give each an access ACL (here, user 4321 could write them all)."""
    any_id = 0xFFFFFFFF
    # user::rwx user:4321:rwx group::r-x mask::rwx other::---
    default = acl.encode(
        [
            (0x01, 7, any_id),
            (0x02, 7, 4321),
            (0x04, 5, any_id),
            (0x10, 7, any_id),
            (0x20, 0, any_id),
        ]
    )
    os.setxattr(tmp_path, acl.DEFAULT, default)
    t = (
        Tar()
        .dir("etc", mode=0o755)
        .file("etc/f", b"data", mode=0o644)
        .file("secret", b"", mode=0o600)
        .fifo("pipe", mode=0o666)
        .symlink("link", "etc/f")
    )
    unpack(t.bytes(), tmp_path / "l")  # made in tmp_path: it inherits the default ACL
    modes = {"": 0o755, "etc": 0o755, "etc/f": 0o644, "secret": 0o600, "pipe": 0o666}
    for name, mode in modes.items():
        p = tmp_path / "l" / name
        assert stat.S_IMODE(os.lstat(p).st_mode) == mode, name
        assert os.listxattr(p, follow_symlinks=False) == [], name
    assert os.listxattr(tmp_path / "l/link", follow_symlinks=False) == []


def test_without_root_no_setuid_devices_or_privileged_xattrs(tmp_path: Path) -> None:
    t = Tar().file("f", b"x", mode=0o6755, xattrs={"trusted.t": b"1", "user.u": b"2"})
    t.dir("o").opaque("o")
    unpack(t.bytes(), tmp_path / "l", root=False)
    st = os.lstat(tmp_path / "l/f")
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert os.listxattr(tmp_path / "l/f") == ["user.u"]
    # Opaque the userxattr way: what an unprivileged kernel mount reads.
    assert os.listxattr(tmp_path / "l/o") == ["user.overlay.opaque"]


def test_oci_whiteouts_become_kernel_whiteouts(tmp_path: Path) -> None:
    t = Tar().dir("d").whiteout("d/gone").whiteout("top").opaque("d").dir("o").opaque("o")
    unpack(t.bytes(), tmp_path / "l")
    assert is_whiteout(tmp_path / "l/d/gone") and is_whiteout(tmp_path / "l/top")
    assert is_opaque(tmp_path / "l/d") and is_opaque(tmp_path / "l/o")
    assert sorted(os.listdir(tmp_path / "l/d")) == ["gone"]  # no .wh. file left


def test_opaque_marker_before_its_directory_entry(tmp_path: Path) -> None:
    t = Tar().opaque("d").dir("d", mode=0o700).file("d/new", b"n")
    unpack(t.bytes(), tmp_path / "l")
    assert is_opaque(tmp_path / "l/d")
    assert stat.S_IMODE(os.lstat(tmp_path / "l/d").st_mode) == 0o700


def test_whiteout_and_entry_of_the_same_name(tmp_path: Path) -> None:
    """A whiteout deletes only what the layers below have: the layer's own entry of
    that name stays, in either order; a directory stays but stops merging."""
    t = (
        Tar()
        .whiteout("f1").file("f1", b"mine")
        .file("f2", b"mine").whiteout("f2")
        .whiteout("d1").dir("d1").file("d1/x", b"x")
        .dir("d2").whiteout("d2")
        .whiteout("d3").file("d3/implied", b"i")
    )  # fmt: skip
    unpack(t.bytes(), tmp_path / "l")
    assert (tmp_path / "l/f1").read_bytes() == b"mine"
    assert (tmp_path / "l/f2").read_bytes() == b"mine"
    for d in ("d1", "d2", "d3"):
        assert (tmp_path / "l" / d).is_dir() and is_opaque(tmp_path / "l" / d), d


def test_duplicate_entries_the_last_one_wins(tmp_path: Path) -> None:
    t = (
        Tar()
        .file("a", b"first").file("a", b"second")
        .file("b", b"file").dir("b").file("b/in", b"in")
        .dir("c").file("c/old", b"old").file("c", b"now a file")
        .dir("d", mode=0o700).file("d/keep", b"k").dir("d", mode=0o755)
        .file("e", b"target").hardlink("h", "e").file("h", b"replaced")
    )  # fmt: skip
    unpack(t.bytes(), tmp_path / "l")
    assert (tmp_path / "l/a").read_bytes() == b"second"
    assert (tmp_path / "l/b/in").read_bytes() == b"in"
    assert (tmp_path / "l/c").read_bytes() == b"now a file"
    assert (tmp_path / "l/d/keep").read_bytes() == b"k"  # a directory again merges
    assert stat.S_IMODE(os.lstat(tmp_path / "l/d").st_mode) == 0o755
    assert (tmp_path / "l/e").read_bytes() == b"target"
    assert (tmp_path / "l/h").read_bytes() == b"replaced"


def test_names_are_normalized_and_aufs_bookkeeping_skipped(tmp_path: Path) -> None:
    t = Tar().dir("./").file("./a//b", b"x").file(".wh..wh.plnk/123.456", b"").dir("c/./d/")
    unpack(t.bytes(), tmp_path / "l")
    assert (tmp_path / "l/a/b").read_bytes() == b"x"
    assert (tmp_path / "l/c/d").is_dir()
    assert sorted(os.listdir(tmp_path / "l")) == ["a", "c"]


def test_gnu_sparse_file_keeps_its_holes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(64 << 20)
        f.write(b"tail")
    tar = tmp_path / "s.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", tar, "-C", src, "sparse"], check=True)
    unpack(tar.read_bytes(), tmp_path / "l")
    out = tmp_path / "l/sparse"
    data = out.read_bytes()
    assert data[:4] == b"head" and data[-4:] == b"tail" and len(data) == (64 << 20) + 4
    assert os.lstat(out).st_blocks * 512 < 1 << 20  # the hole stayed a hole


def test_kernel_overlay_mounts_unpacked_layers(tmp_path: Path) -> None:
    """The oracle: the kernel's overlayfs, given the unpacked layers, shows what the
    OCI layer rules say the image is."""
    base = (
        Tar().dir("etc").file("etc/keep", b"1").file("etc/gone", b"2")
        .dir("opq").file("opq/old", b"3").dir("opq/sub").file("opq/sub/old2", b"4")
        .dir("rm").file("rm/inner", b"5")
    )  # fmt: skip
    top = (
        Tar().whiteout("etc/gone").opaque("opq").file("opq/new", b"6").whiteout("rm")
        .file("etc/added", b"7")
    )  # fmt: skip
    unpack(base.bytes(), tmp_path / "base")
    unpack(top.bytes(), tmp_path / "top")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with kernel_overlay([tmp_path / "top", tmp_path / "base"], mnt):
        tree = sorted(
            os.path.relpath(os.path.join(d, n), mnt)
            for d, dirs, files in os.walk(mnt)
            for n in dirs + files
        )
    assert tree == ["etc", "etc/added", "etc/keep", "opq", "opq/new"]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_other_tar_formats(tmp_path: Path, fmt: int) -> None:
    t = (
        Tar(fmt).dir("d").file("d/" + "x" * 90 + "/" + "y" * 90, b"long")
        if fmt == tarfile.USTAR_FORMAT
        else Tar(fmt).file("z" * 200, b"gnu long name")
    )
    unpack(t.bytes(), tmp_path / "l")
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "l") for f in fs]
    assert len(files) == 1


def test_deep_nesting(tmp_path: Path) -> None:
    """Directories nested deeper than Python's recursion limit (implied by one entry)
    unpack: the walk is not recursive, and the directory-fd cache stays bounded."""
    depth = 1200
    unpack(Tar().file("/".join(["d"] * depth) + "/f", b"deep").bytes(), tmp_path / "l")
    try:
        fd = os.open(tmp_path / "l", os.O_RDONLY)
        try:
            for _ in range(depth):
                nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
                os.close(fd)
                fd = nfd
            with open(os.open("f", os.O_RDONLY, dir_fd=fd), "rb") as f:
                assert f.read() == b"deep"
        finally:
            os.close(fd)
    finally:
        remove_deep(tmp_path / "l")


def remove_deep(top: Path) -> None:
    """Remove top/d/d/.../d one level at a time (shutil.rmtree would recurse too deep)."""
    while (top / "d").exists():
        if (top / "d" / "d").exists():
            os.rename(top / "d" / "d", top / "next")
            shutil.rmtree(top / "d")
            os.rename(top / "next", top / "d")
        else:
            shutil.rmtree(top / "d")


def test_whiteouts_kept_as_oci_files_still_give_way(tmp_path: Path) -> None:
    """On a filesystem that refuses kernel whiteouts (mknod 0/0 fails with EPERM:
    here the kernel's overlayfs itself), a whiteout stays an OCI ``.wh.`` file, and
    an entry of the same name later in the layer still replaces it: a directory
    then hides the layers below by being opaque, as it does over a kernel
    whiteout."""
    for d in ("lower", "upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    t = (
        Tar()
        .whiteout("d").file("d/x", b"1")
        .whiteout("e").dir("e")
        .whiteout("f").file("f", b"new")
        .whiteout("g").whiteout("g")
        .file("target", b"t").whiteout("h").hardlink("h", "target")
    )  # fmt: skip
    with kernel_overlay(
        [tmp_path / "lower"], tmp_path / "mnt", tmp_path / "upper", tmp_path / "work"
    ):
        with pytest.raises(PermissionError):
            os.mknod(tmp_path / "mnt/probe", stat.S_IFCHR | 0o600, 0)
        unpack(t.bytes(), tmp_path / "mnt/l", root=False)
    layer = tmp_path / "upper/l"
    names = sorted(os.listdir(layer))
    assert names == [".wh.g", "d", "e", "f", "h", "target"]
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    try:
        top = markers.read_layer_dir(fd)
    finally:
        os.close(fd)
    assert (top.names, top.deleted) == ([b"d", b"e", b"f", b"h", b"target"], [b"g"])
    for d in ("d", "e"):
        assert os.getxattr(layer / d, "user.overlay.opaque") == b"y", d
    assert (layer / "f").read_bytes() == b"new"
    assert os.lstat(layer / "h").st_ino == os.lstat(layer / "target").st_ino


def test_gnu_tar_naming_a_file_twice(tmp_path: Path) -> None:
    """``tar -cf t.tar a a`` stores a, then a hard link from a to itself: GNU tar
    extracts it, and so does the unpacker."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"once")
    tar = tmp_path / "t.tar"
    subprocess.run(["tar", "--format=posix", "-cf", tar, "-C", src, "a", "a"], check=True)
    with tarfile.open(tar) as tf:
        assert [(m.name, m.type) for m in tf] == [("a", tarfile.REGTYPE), ("a", tarfile.LNKTYPE)]
    unpack(tar.read_bytes(), tmp_path / "l")
    assert os.listdir(tmp_path / "l") == ["a"]
    assert (tmp_path / "l/a").read_bytes() == b"once"


def test_device_nodes_are_skipped_without_root(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As unprivileged engines do: the layer unpacks without its device nodes (and
    the hard links to them), with one warning."""
    t = (
        Tar()
        .device("dev/null", tarfile.CHRTYPE, 1, 3)
        .device("dev/sda", tarfile.BLKTYPE, 8, 0)
        .hardlink("dev/null2", "dev/null")
        .file("dev/README", b"r")
    )
    with caplog.at_level("WARNING", logger="unionfs.image.unpack"):
        unpack(t.bytes(), tmp_path / "l", root=False)
    assert os.listdir(tmp_path / "l/dev") == ["README"]
    assert [r.getMessage() for r in caplog.records] == [
        "layer test: device nodes skipped (not running as root)"
    ]


class _CountingDict(dict[bytes, Any]):
    walks = 0

    def __iter__(self) -> Iterator[bytes]:
        _CountingDict.walks += 1
        return super().__iter__()


def test_replacing_trees_does_not_walk_every_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each tree a later entry replaces is forgotten by walking that tree only, not
    every directory of the layer (quadratic: 20,000 replaced directories took 211 s).
    Counted rather than timed: the table of directories is walked once, by the
    final pass that sets their modes, however many trees go."""
    init = unpack_module._Unpacker.__init__

    def counting(self: Any, *args: Any) -> None:
        init(self, *args)
        self.dirs = _CountingDict(self.dirs)

    monkeypatch.setattr(unpack_module._Unpacker, "__init__", counting)
    t = Tar()
    for i in range(300):
        t.dir(f"d{i}").dir(f"d{i}/sub").file(f"d{i}/sub/f", b"x")
    for i in range(300):
        t.file(f"d{i}", b"now a file")
    _CountingDict.walks = 0
    unpack(t.bytes(), tmp_path / "l")
    assert _CountingDict.walks == 1
    assert len(os.listdir(tmp_path / "l")) == 300
    assert (tmp_path / "l/d7").read_bytes() == b"now a file"
