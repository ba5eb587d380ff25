"""Copy-up and changes to names, on plain directories, including their error paths."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from tests.unit.conftest import ME, NS, Layers, is_whiteout, node, opaque, visible, whiteout, write
from unionfs.overlay import copyup, markers, namespace
from unionfs.overlay.copyup import copy_up
from unionfs.overlay.files import Files
from unionfs.overlay.nodes import Node
from unionfs.overlay.union import Union


def staged(layers: Layers) -> list[str]:
    return sorted(n for n in os.listdir(layers.work / "work") if n != "#whiteout")


async def test_copy_up_keeps_data_mode_times_and_number(layers: Layers) -> None:
    f = layers.lowers[0] / "d" / "f"
    write(f, b"data" * 1000)
    os.chmod(f, 0o640)
    os.utime(f, ns=(10**9, 2 * 10**9))
    os.setxattr(f, "user.k", b"v")
    with layers.open() as u:
        n = node(u, "d/f")
        ino = n.ino
        await copy_up(u, n)
        up = layers.upper / "d" / "f"
        assert up.read_bytes() == b"data" * 1000
        st = os.lstat(up)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert st.st_mtime_ns == 2 * 10**9
        assert os.getxattr(up, "user.k") == b"v"
        assert n.layer.writable and n.ino == ino
        assert node(u, "d/f") is n  # found again in the upper, same node
        assert os.path.isdir(layers.upper / "d")  # the parent came first
        assert staged(layers) == []


@pytest.mark.parametrize("size", [3, 9000])
async def test_a_copy_up_for_a_truncate_is_the_truncated_file(layers: Layers, size: int) -> None:
    """What a kill between the copy-up and the truncate leaves must already be the
    truncated file with new times, never the cut data under the old mtime."""
    f = layers.lowers[0] / "f"
    write(f, b"data" * 1000)
    os.utime(f, ns=(10**9, 2 * 10**9))
    with layers.open() as u:
        await copy_up(u, node(u, "f"), size=size)
    up = layers.upper / "f"
    assert up.read_bytes() == (b"data" * 1000)[:size].ljust(size, b"\0")
    assert os.lstat(up).st_mtime_ns > 2 * 10**9


async def test_an_open_file_follows_its_copy_up(layers: Layers) -> None:
    write(layers.lowers[0] / "f", b"lower")
    with layers.open() as u:
        files = Files(u)
        f = node(u, "f")
        reader = await files.open(f, os.O_RDONLY)
        writer = await files.open(f, os.O_WRONLY)
        assert files.write(writer, 0, b"UPPER") == 5
        assert bytes(await files.read(reader, 0, 5)) == b"UPPER"
        files.release(reader)
        files.release(writer)
    assert (layers.lowers[0] / "f").read_bytes() == b"lower"


async def test_a_copy_up_that_fails_leaves_nothing_behind(
    layers: Layers, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(layers.lowers[0] / "f", b"lower")

    def full(src: int, dst: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "injected: no space")

    monkeypatch.setattr(copyup, "clone_or_copy", full)
    with layers.open() as u:
        f = node(u, "f")
        with pytest.raises(OSError) as e:
            await copy_up(u, f)
        assert e.value.errno == errno.ENOSPC
        assert not f.layer.writable
        assert not os.path.lexists(layers.upper / "f")
        assert staged(layers) == []


async def test_removing_a_lower_name_leaves_a_whiteout(layers: Layers) -> None:
    write(layers.lowers[0] / "d" / "f")
    with layers.open() as u:
        d = node(u, "d")
        await namespace.remove(u, d, b"f", want_dir=False)
        assert is_whiteout(layers.upper / "d" / "f")
        assert not visible(u, "d/f")
        assert u.names(d) == []


async def test_removing_an_upper_only_name_leaves_nothing(layers: Layers) -> None:
    write(layers.upper / "f")
    with layers.open() as u:
        await namespace.remove(u, u.table.root, b"f", want_dir=False)
        assert not os.path.lexists(layers.upper / "f")


async def test_a_copied_up_file_is_swapped_for_its_whiteout(layers: Layers) -> None:
    write(layers.lowers[0] / "f", b"lower")
    with layers.open() as u:
        f = node(u, "f")
        await copy_up(u, f)
        await namespace.remove(u, u.table.root, b"f", want_dir=False)
        assert is_whiteout(layers.upper / "f")
        assert staged(layers) == []


async def test_rmdir_needs_the_merged_directory_empty(layers: Layers) -> None:
    write(layers.lowers[1] / "d" / "f")
    with layers.open() as u:
        with pytest.raises(OSError) as e:
            await namespace.remove(u, u.table.root, b"d", want_dir=True)
        assert e.value.errno == errno.ENOTEMPTY
        await namespace.remove(u, node(u, "d"), b"f", want_dir=False)
        await namespace.remove(u, u.table.root, b"d", want_dir=True)
        assert is_whiteout(layers.upper / "d")
        assert staged(layers) == []


async def test_mkdir_over_a_whiteout_is_opaque(layers: Layers) -> None:
    write(layers.lowers[0] / "d" / "old")
    with layers.open() as u:
        await namespace.remove(u, node(u, "d"), b"old", want_dir=False)
        await namespace.remove(u, u.table.root, b"d", want_dir=True)
        new = await namespace.create_node(u, u.table.root, b"d", stat.S_IFDIR | 0o755, ME)
        assert new.is_dir
        assert os.getxattr(layers.upper / "d", NS.opaque) == b"y"
        assert u.names(node(u, "d")) == []


async def _refuses_reserved_existing_and_long_names(
    u: Union, parent: Node, existing: bytes
) -> None:
    for name, err in (
        (b".wh.x", errno.EINVAL),
        (existing, errno.EEXIST),
        (b"n" * 256, errno.ENAMETOOLONG),
    ):
        with pytest.raises(OSError) as e:
            await namespace.create_node(u, parent, name, stat.S_IFREG | 0o644, ME)
        assert e.value.errno == err, name


async def test_reserved_and_existing_names_are_refused(layers: Layers) -> None:
    write(layers.lowers[0] / "f")
    with layers.open() as u:
        root = u.table.root
        await _refuses_reserved_existing_and_long_names(u, root, b"f")
        with pytest.raises(OSError) as e:
            await namespace.create_node(u, root, b"c", stat.S_IFCHR | 0o644, ME, rdev=0)
        assert e.value.errno == errno.EPERM  # a 0/0 device is a whiteout


async def test_new_names_in_a_directory_with_nothing_below(layers: Layers) -> None:
    """A directory only in the upper decides a new name with one stat of its own
    (namespace._prepare_new): the same refusals, and a whiteout there is replaced."""
    opaque(layers.upper / "d")
    whiteout(layers.upper / "d" / "w")
    write(layers.upper / "d" / "f")
    write(layers.lowers[0] / "d" / "low")  # hidden: d is opaque
    with layers.open() as u:
        d = node(u, "d")
        assert d.layer.writable and not d.lowers
        await _refuses_reserved_existing_and_long_names(u, d, b"f")
        await namespace.create_node(u, d, b"w", stat.S_IFREG | 0o644, ME)
        assert stat.S_ISREG(os.lstat(layers.upper / "d" / "w").st_mode)
        new, fd, st = await namespace.create_file(u, d, b"low", 0o644, os.O_WRONLY, ME)
        os.close(fd)
        assert st.st_ino == os.lstat(layers.upper / "d" / "low").st_ino
        assert new.layer.writable
        assert sorted(u.names(d)) == [b"f", b"low", b"w"]
        assert staged(layers) == []


async def test_a_read_only_union_refuses_every_change(layers: Layers) -> None:
    write(layers.lowers[0] / "f")
    with layers.open(readonly=True) as u:
        root = u.table.root
        for change in (
            namespace.remove(u, root, b"f", want_dir=False),
            namespace.create_node(u, root, b"n", stat.S_IFDIR | 0o755, ME),
            namespace.rename(u, root, b"f", root, b"g", 0),
            copy_up(u, node(u, "f")),
        ):
            with pytest.raises(OSError) as e:
                await change
            assert e.value.errno == errno.EROFS


async def test_renaming_a_file_down_the_stack_leaves_a_whiteout(layers: Layers) -> None:
    write(layers.lowers[1] / "a", b"content")
    with layers.open() as u:
        root = u.table.root
        a = node(u, "a")
        ino = a.ino
        await namespace.rename(u, root, b"a", root, b"b", 0)
        assert is_whiteout(layers.upper / "a")
        assert (layers.upper / "b").read_bytes() == b"content"
        assert node(u, "b") is a and a.ino == ino
        assert not visible(u, "a")


async def test_a_directory_with_lower_parts_cannot_move(layers: Layers) -> None:
    write(layers.lowers[0] / "d" / "f")
    with layers.open() as u:
        root = u.table.root
        with pytest.raises(OSError) as e:
            await namespace.rename(u, root, b"d", root, b"e", 0)
        assert e.value.errno == errno.EXDEV


async def test_an_upper_directory_moved_into_a_merged_one_becomes_opaque(layers: Layers) -> None:
    write(layers.lowers[0] / "m" / "x")
    write(layers.lowers[0] / "m" / "new" / "leak")
    (layers.upper / "fresh").mkdir()
    with layers.open() as u:
        root = u.table.root
        await namespace.remove(u, node(u, "m/new"), b"leak", want_dir=False)
        await namespace.remove(u, node(u, "m"), b"new", want_dir=True)
        await namespace.rename(u, root, b"fresh", node(u, "m"), b"new", 0)
        assert os.getxattr(layers.upper / "m" / "new", NS.opaque) == b"y"
        assert u.names(node(u, "m/new")) == []


# -- faults: the change happened, or it did not ------------------------------------


async def test_a_clean_up_failure_after_a_remove_does_not_fail_it(
    layers: Layers, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write(layers.lowers[0] / "f", b"lower")

    def broken(dirfd: int, name: bytes) -> None:
        raise OSError(errno.EIO, "injected: clean-up fails")

    with layers.open() as u:
        f = node(u, "f")
        await copy_up(u, f)
        monkeypatch.setattr(namespace, "discard", broken)
        await namespace.remove(u, u.table.root, b"f", want_dir=False)  # does not raise
        assert is_whiteout(layers.upper / "f")
        assert f.unlinked  # the table followed the change
        assert not visible(u, "f")
        assert "could not remove" in caplog.text
        u.table.release(f)
        assert u.table.find(f.ino) is None


async def test_a_whiteout_that_cannot_be_made_changes_nothing(
    layers: Layers, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(layers.lowers[0] / "f", b"lower")

    def refuse(dirfd: int, name: bytes, workfd: int = -1) -> None:
        raise OSError(errno.ENOSPC, "injected: no inodes")

    monkeypatch.setattr(markers, "make_whiteout", refuse)
    with layers.open() as u:
        f = node(u, "f")
        with pytest.raises(OSError) as e:
            await namespace.remove(u, u.table.root, b"f", want_dir=False)
        assert e.value.errno == errno.ENOSPC
        assert node(u, "f") is f and not f.unlinked
        assert os.listdir(layers.upper) == []


async def test_a_rename_that_fails_at_the_last_step_changes_nothing(
    layers: Layers, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(layers.lowers[0] / "a", b"a")
    write(layers.lowers[0] / "b", b"b")

    def refuse(*args: object) -> None:
        raise OSError(errno.EIO, "injected: rename fails")

    with layers.open() as u:
        root = u.table.root
        a, b = node(u, "a"), node(u, "b")
        monkeypatch.setattr(markers, "rename_leaving_whiteout", refuse)
        with pytest.raises(OSError):
            await namespace.rename(u, root, b"a", root, b"b", 0)
        assert node(u, "a") is a and node(u, "b") is b
        assert (layers.upper / "a").read_bytes() == b"a"  # copied up, still there
        assert not os.path.lexists(layers.upper / "b")
