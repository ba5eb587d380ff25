"""The node table, inode numbers and id mapping, without a mount."""

from __future__ import annotations

import errno
import os

import pytest

from tests.unit.conftest import ME, Layers, node, write
from unionfs.overlay.idmap import OVERFLOW_ID, IdMap, IdTable
from unionfs.overlay.namespace import create_file, link


async def test_forgotten_hard_links_release_their_parent_directories(layers: Layers) -> None:
    (layers.upper / "d").mkdir()
    with layers.open() as u:
        d = node(u, "d")  # held, as the adapter does for each reference it gives out
        f, fd, _ = await create_file(u, d, b"a", 0o644, os.O_WRONLY, ME)
        os.close(fd)
        u.table.hold(f)
        await link(u, f, d, b"b")
        u.table.hold(f)
        assert len(u.table) == 3
        u.table.release(f, 2)
        u.table.release(d)
        assert len(u.table) == 1  # only the root is left


def test_a_node_lives_while_held_or_while_a_child_needs_it(layers: Layers) -> None:
    write(layers.lowers[0] / "a" / "b" / "c")
    with layers.open() as u:
        root = u.table.root
        a = u.lookup(root, b"a")[0]  # type: ignore[index]
        b = u.lookup(a, b"b")[0]  # type: ignore[index]
        c = u.lookup(b, b"c")[0]  # type: ignore[index]
        u.table.hold(c)
        u.table.release_ino(a.ino, 0)  # nothing holds the parents: they stay for c
        assert len(u.table) == 4
        u.table.release_ino(c.ino, 1)
        assert len(u.table) == 1
        u.table.release_ino(12345678, 1)  # an unknown number is ignored


def test_unknown_inode_numbers_are_stale(layers: Layers) -> None:
    with layers.open() as u, pytest.raises(OSError) as e:
        u.node(987654321)
    assert e.value.errno == errno.ESTALE


def test_inode_numbers_are_the_real_ones_on_one_filesystem(layers: Layers) -> None:
    write(layers.lowers[1] / "f")
    write(layers.upper / "g")
    with layers.open() as u:
        assert node(u, "f").ino == os.lstat(layers.lowers[1] / "f").st_ino
        assert node(u, "g").ino == os.lstat(layers.upper / "g").st_ino
        assert u.table.root.ino == 1


def test_id_tables_map_both_ways_and_overflow() -> None:
    t = IdTable([IdMap(0, 100000, 1000)])
    assert t.shown(0) == 100000
    assert t.shown(999) == 100999
    assert t.shown(1000) == OVERFLOW_ID
    assert t.stored(100005) == 5
    with pytest.raises(OSError) as e:
        t.stored(5)
    assert e.value.errno == errno.EINVAL
    assert t.stored_or_overflow(5) == OVERFLOW_ID
    squash = IdTable([], squash=0)
    assert squash.shown(1234) == 0 and squash.stored(1234) == 1234
    assert IdTable([]).identity and not t.identity
