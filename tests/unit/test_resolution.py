"""Resolution through the stack, on plain directories: which layer provides a name."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.unit.conftest import Layers, node, opaque, visible, whiteout, write


def test_a_higher_layer_hides_the_same_name_below(layers: Layers) -> None:
    write(layers.lowers[0] / "f", b"top")
    write(layers.lowers[1] / "f", b"bottom")
    with layers.open() as u:
        entry = u.resolve(u.table.root, b"f")
        assert entry is not None
        assert entry.layer.path == layers.lowers[0]
        assert entry.lowers == ()


def test_directories_merge_until_an_opaque_one(layers: Layers) -> None:
    write(layers.upper / "d" / "u")
    write(layers.lowers[0] / "d" / "a")
    write(layers.lowers[1] / "d" / "b")
    with layers.open() as u:
        assert sorted(u.names(node(u, "d"))) == [b"a", b"b", b"u"]
    opaque(layers.lowers[0] / "d")
    with layers.open() as u:
        d = node(u, "d")
        assert sorted(u.names(d)) == [b"a", b"u"]
        assert [place.layer.path for place in d.stack] == [layers.upper, layers.lowers[0]]


def test_a_whiteout_hides_everything_below_and_is_itself_invisible(layers: Layers) -> None:
    write(layers.lowers[1] / "d" / "gone")
    whiteout(layers.lowers[0] / "d" / "gone")
    write(layers.lowers[1] / "f")
    whiteout(layers.upper / "f")
    with layers.open() as u:
        assert not visible(u, "d/gone")
        assert not visible(u, "f")
        assert u.names(node(u, "d")) == []
        assert u.names(u.table.root) == [b"d"]


def test_a_file_hides_a_directory_below_and_the_reverse(layers: Layers) -> None:
    write(layers.lowers[0] / "x", b"file")
    write(layers.lowers[1] / "x" / "inner")
    write(layers.lowers[0] / "y" / "inner")
    write(layers.lowers[1] / "y", b"file")
    with layers.open() as u:
        assert node(u, "x").kind == stat.S_IFREG
        assert not visible(u, "x/inner")
        assert node(u, "y").kind == stat.S_IFDIR
        assert node(u, "y").lowers == ()


def test_oci_whiteouts_in_a_lower_layer(layers: Layers) -> None:
    write(layers.lowers[1] / "a", b"deleted above")
    write(layers.lowers[1] / "d" / "old")
    write(layers.lowers[0] / ".wh.a", b"")
    write(layers.lowers[0] / "d" / ".wh..wh..opq", b"")
    write(layers.lowers[0] / "d" / "new")
    with layers.open() as u:
        assert not visible(u, "a")
        assert not visible(u, ".wh.a")
        assert u.names(node(u, "d")) == [b"new"]
        assert u.names(u.table.root) == [b"d"]


def test_an_oci_name_in_the_upper_is_an_ordinary_file(layers: Layers) -> None:
    """Only lowers speak the OCI format; the upper is always in the kernel's."""
    write(layers.lowers[0] / "a")
    write(layers.upper / ".wh.a", b"")
    with layers.open() as u:
        assert visible(u, "a")
        assert visible(u, ".wh.a")


def test_a_node_keeps_its_number_and_identity(layers: Layers) -> None:
    write(layers.lowers[0] / "d" / "f")
    with layers.open() as u:
        f = node(u, "d/f")
        assert node(u, "d/f") is f
        assert f.ino == os.lstat(layers.lowers[0] / "d" / "f").st_ino
        root = u.table.root
        assert u.lookup(root, b".") == (root, None)
        assert u.lookup(root, b"..") == (root, None)
        d = node(u, "d")
        assert u.lookup(d, b"..") == (root, None)


def test_symlinks_inside_a_layer_are_never_followed(layers: Layers, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "secret")
    layers.lowers[0].joinpath("esc").symlink_to(outside)
    with layers.open() as u:
        esc = node(u, "esc")
        assert esc.kind == stat.S_IFLNK
        assert not visible(u, "esc/secret")
