"""What a kill -9 between two steps of a change leaves: the old state or the new one.

A change that takes several system calls is stopped at a chosen step here (by a
planted exception that no clean-up handler catches, or by looking at the upper
at that step) and the upper is checked as the crash would leave it. The crash
test (tests/crash) finds these windows on a real mount; these tests keep them
closed.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import pytest

from tests.unit.conftest import ME, NS, Layers, is_whiteout, node, visible, write
from unionfs.overlay import markers, namespace, syscalls
from unionfs.overlay.files import Change, Files


class Killed(BaseException):
    """Stands for SIGKILL: no ``except OSError`` clean-up runs."""


def staged(layers: Layers) -> list[str]:
    return sorted(n for n in os.listdir(layers.work / "work") if n != "#whiteout")


async def test_a_setuid_file_is_made_in_the_workdir(
    layers: Layers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chown clears setuid, so it is set again after: a kill in between must not leave
    the file in place without its bit."""
    seen: list[bool] = []
    real = os.fchown

    def fchown(fd: int, uid: int, gid: int) -> None:
        seen.append(os.path.lexists(layers.upper / "prog"))
        real(fd, uid, gid)

    monkeypatch.setattr(os, "fchown", fchown)
    with layers.open() as u:
        _, fd, _ = await namespace.create_file(u, u.table.root, b"prog", 0o4755, os.O_WRONLY, ME)
        os.close(fd)
    assert seen == [False]
    assert stat.S_IMODE(os.lstat(layers.upper / "prog").st_mode) == 0o4755
    assert staged(layers) == []


async def test_a_directory_renamed_over_an_emptied_merged_one_never_shows_another_mode(
    layers: Layers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target's whiteouts are moved out by swapping in an empty directory first;
    until the rename that follows, that directory stands for the target."""
    write(layers.lowers[0] / "d" / "x")
    os.chmod(layers.lowers[0] / "d", 0o751)
    os.setxattr(layers.lowers[0] / "d", "user.k", b"v")
    (layers.upper / "fresh").mkdir()
    modes: list[tuple[int, bytes]] = []
    real = syscalls.renameat2

    def renameat2(*a: Any) -> None:
        up = layers.upper / "d"
        modes.append((stat.S_IMODE(os.lstat(up).st_mode), os.getxattr(up, "user.k")))
        real(*a)

    with layers.open() as u:
        root = u.table.root
        await namespace.remove(u, node(u, "d"), b"x", want_dir=False)
        monkeypatch.setattr(namespace, "renameat2", renameat2)
        await namespace.rename(u, root, b"fresh", root, b"d", 0)
    assert len(modes) == 2 and set(modes) == {(0o751, b"v")}


@pytest.mark.parametrize("kill_before_swap", [False, True])
async def test_a_whiteout_left_by_moving_a_directory_onto_one_goes_at_the_next_mount(
    layers: Layers, monkeypatch: pytest.MonkeyPatch, kill_before_swap: bool
) -> None:
    """A directory takes a whiteout's name by swapping with it; the whiteout then at the
    old name hides nothing and is dropped. Killed in between, the next mount drops it."""
    write(layers.lowers[0] / "w")
    (layers.upper / "p" / "src").mkdir(parents=True)
    write(layers.upper / "p" / "src" / "inside", b"kept")

    def kill(*a: Any, **kw: Any) -> None:
        raise Killed

    with layers.open() as u:
        await namespace.remove(u, u.table.root, b"w", want_dir=False)
        if kill_before_swap:
            monkeypatch.setattr(markers, "renameat2", kill)
        else:
            monkeypatch.setattr(markers, "drop_swapped_whiteout", kill)
        with pytest.raises(Killed):
            await namespace.rename(u, node(u, "p"), b"src", u.table.root, b"w", 0)
    monkeypatch.undo()
    moved = not kill_before_swap
    assert is_whiteout(layers.upper / "p" / "src") == moved
    with layers.open() as u:  # the next mount
        assert os.path.lexists(layers.upper / "p" / "src") != moved
        assert not is_whiteout(layers.upper / "p" / "src")
        assert visible(u, "w") == moved and visible(u, "p/src") != moved
        assert staged(layers) == []
    inside = (layers.upper / ("w" if moved else "p/src") / "inside").read_bytes()
    assert inside == b"kept"


@pytest.mark.skipif(
    NS is markers.USER, reason="metacopy needs trusted.* xattrs (refused with userxattr)"
)
async def test_a_metadata_only_copy_holds_all_its_data_before_its_marker_goes(
    layers: Layers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A truncate of a metadata-only copy brings its data up first: all of it, so a
    kill before the truncate shows the file as it was, never cut data with zeros."""
    data = b"A" * 8192
    write(layers.lowers[0] / "f", data)
    seen: list[bytes] = []
    real = markers.clear_metacopy

    def clear_metacopy(path: bytes, ns: markers.XattrNamespace) -> None:
        seen.append((layers.upper / "f").read_bytes())
        real(path, ns)

    with layers.open(metacopy=True) as u:
        files = Files(u)
        f = node(u, "f")
        await files.setattr(f, Change(mode=0o600), None)  # metadata only
        assert f.metacopy
        monkeypatch.setattr(markers, "clear_metacopy", clear_metacopy)
        await files.setattr(f, Change(size=100), None)
    assert seen == [data]
    assert (layers.upper / "f").read_bytes() == data[:100]
