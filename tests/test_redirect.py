"""redirect_dir, as the kernel overlay does it: renaming a directory with lower parts
records where they are (``redirect_dir=on``), redirects found in any layer are
followed (the default) or refused (``nofollow``), and each kind mounts the
upper the other wrote.

Every test runs the same steps on unionfs and on the kernel overlay over a copy
of the same layers and compares the trees and the upper's overlay xattrs.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import REPO, unionfs_command
from tests.treesnap import diff, snapshot
from tests.twins import HOOK, kernel_over, overlay_xattrs, twins, unionfs_over, write


def _tree(lowers: list[Path]) -> None:
    write(lowers[0] / "a" / "b" / "d" / "file", b"f")
    (lowers[0] / "x").mkdir()
    write(lowers[1] / "p" / "q" / "r" / "f", b"rr")
    write(lowers[1] / "w1" / "in", b"w")
    (lowers[1] / "w2").mkdir()
    for i in range(300):  # a big directory: the rename must not copy it
        write(lowers[1] / "big" / f"f{i}", b"data" * 100)


def _renames(m: Path) -> None:
    os.rename(m / "a" / "b" / "d", m / "a" / "b" / "d2")  # relative redirect
    os.rename(m / "a" / "b" / "d2", m / "x" / "moved")  # absolute
    os.rename(m / "x" / "moved", m / "x" / "moved2")  # kept
    os.rename(m / "p", m / "P2")
    os.rename(m / "P2" / "q" / "r", m / "x" / "r2")  # through a renamed parent
    os.rmdir(m / "w2")
    os.rename(m / "w1", m / "w2")  # onto a whiteout
    os.mkdir(m / "a" / "made")  # opaque: mkdir in a merged directory
    os.mkdir(m / "new")
    os.rename(m / "new", m / "a" / "new")  # an upper directory into a merged one
    os.rename(m / "big", m / "big2")


def test_renames_record_the_kernels_redirects(tmp_path: Path) -> None:
    u, k = twins(tmp_path, _tree, n_lowers=2)
    trees = {}
    for t in (u, k):
        with t.mount("redirect_dir=on"):
            _renames(t.mnt)
            trees[t.kind] = snapshot(t.mnt, mtimes=False)  # the copies were made apart
    assert diff(trees["unionfs"], trees["kernel"]) == []
    assert overlay_xattrs(u) == overlay_xattrs(k)
    assert overlay_xattrs(k)["x/r2"][b"trusted.overlay.redirect"] == b"/p/q/r"
    assert os.listdir(u.upper / "big2") == []  # one rename, no copy of its 300 files


@pytest.mark.parametrize("writer", ["unionfs", "kernel"])
def test_each_kind_shows_the_tree_the_other_wrote_with_redirects(
    tmp_path: Path, writer: str
) -> None:
    u, k = twins(tmp_path, _tree, n_lowers=2)
    first = u if writer == "unionfs" else k
    with first.mount("redirect_dir=on"):
        _renames(first.mnt)
        written = snapshot(first.mnt)
    first.remount_work()
    reader = kernel_over(first) if writer == "unionfs" else unionfs_over(first)
    with reader.mount():  # the default follows redirects, on either side
        assert diff(snapshot(reader.mnt), written) == []


def test_a_big_directory_moves_in_one_rename(tmp_path: Path) -> None:
    """``mv`` of a lower directory costs one rename with redirect_dir=on, and a copy
    of everything without (EXDEV, as the kernel)."""
    u, _ = twins(tmp_path, _tree, n_lowers=2)
    with u.mount("redirect_dir=on"):
        start = time.monotonic()
        os.rename(u.mnt / "big", u.mnt / "moved")
        assert time.monotonic() - start < 5
        assert len(os.listdir(u.mnt / "moved")) == 300
    u.remount_work()
    with u.mount():
        with pytest.raises(OSError) as e:
            os.rename(u.mnt / "w1", u.mnt / "w3")
        assert e.value.errno == errno.EXDEV


def _crafted(lowers: list[Path]) -> None:
    write(lowers[0] / "src" / "f")
    (lowers[0] / "dirA").mkdir()


def _redirect(path: Path, value: bytes) -> None:
    path.mkdir(exist_ok=True)
    os.setxattr(path, b"trusted.overlay.redirect", value)


@pytest.mark.parametrize("mode", ["redirect_dir=nofollow", "redirect_dir=follow"])
def test_nofollow_refuses_redirects_as_the_kernel(tmp_path: Path, mode: str) -> None:
    u, k = twins(tmp_path, _crafted)
    seen: dict[str, list[Any]] = {}
    for t in (u, k):
        _redirect(t.upper / "dirA", b"/src")
        _redirect(t.upper / "bad", b"a/b")  # invalid: EINVAL in any mode
        # As after a real rename: the target is not visible under its own name too
        # (the kernel answers ESTALE for two names of one lower directory).
        os.mknod(t.upper / "src", 0o600 | 0o020000, 0)
        with t.mount(mode):
            seen[t.kind] = [_outcome(t.mnt / n) for n in ("dirA", "bad")]
            seen[t.kind].append(sorted(os.listdir(t.mnt)))
    if not HOOK:  # a name whose lookup fails is left out of listings without the hook
        for name in ("bad", "dirA"):
            if name in seen["kernel"][-1] and name not in seen["unionfs"][-1]:
                seen["kernel"][-1].remove(name)
    assert seen["unionfs"] == seen["kernel"]


def _dot_layers(lowers: list[Path]) -> None:
    for d in ("d1", "d2", "d3"):
        (lowers[0] / d).mkdir()
    write(lowers[0] / "a" / "f")
    write(lowers[0] / "b" / "secret")


def test_redirects_through_dot_or_dotdot_are_refused_as_the_kernel(tmp_path: Path) -> None:
    """The kernel looks a redirect up one component at a time and refuses "." and ".."
    (EACCES): a redirect cannot merge a layer's root, climb, or reach outside it."""
    u, k = twins(tmp_path, _dot_layers)
    seen: dict[str, list[Any]] = {}
    for t in (u, k):
        _redirect(t.upper / "d1", b".")
        _redirect(t.upper / "d2", b"/a/../b")
        _redirect(t.upper / "d3", b"..")
        with t.mount():
            seen[t.kind] = [_outcome(t.mnt / n) for n in ("d1", "d2", "d3")]
    assert seen["unionfs"] == seen["kernel"] == ["EACCES"] * 3


def _moved_lower(lowers: list[Path]) -> None:
    write(lowers[0] / "x" / "dir" / "f")


@pytest.mark.parametrize("mode", ["redirect_dir=on", "redirect_dir=follow"])
def test_a_move_onto_a_full_upper_directory_fails_where_the_kernel_fails(
    tmp_path: Path, mode: str
) -> None:
    """A target directory of the upper only is left to the upper's rename: with
    redirect_dir=on the source is copied up (and keeps its redirect) before ENOTEMPTY,
    as in the kernel; without it EXDEV comes first."""
    u, k = twins(tmp_path, _moved_lower)
    seen: dict[str, object] = {}
    for t in (u, k):
        write(t.upper / "c" / "dir" / "full")
        with t.mount(mode):
            try:
                os.rename(t.mnt / "x" / "dir", t.mnt / "c" / "dir")
                seen[t.kind] = "ok"
            except OSError as e:
                seen[t.kind] = errno.errorcode[e.errno or 0]
    expected = "ENOTEMPTY" if mode == "redirect_dir=on" else "EXDEV"
    assert seen["unionfs"] == seen["kernel"] == expected
    assert sorted(os.listdir(u.upper)) == sorted(os.listdir(k.upper))
    assert overlay_xattrs(u) == overlay_xattrs(k)


def _outcome(path: Path) -> object:
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        return errno.errorcode[e.errno or 0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["metacopy=on", "redirect_dir=follow"],
            "conflicting options: metacopy=on,redirect_dir=follow",
        ),
        (
            ["metacopy=on", "redirect_dir=off"],
            "conflicting options: metacopy=on,redirect_dir=follow",
        ),
        (["redirect_dir=sometimes"], "redirect_dir: expected on, follow, nofollow or off"),
        (["metacopy=yes"], "metacopy: expected on or off"),
        (["userxattr", "redirect_dir=on"], "conflicting options: userxattr,redirect_dir=on"),
        (["userxattr", "metacopy=on"], "conflicting options: userxattr,metacopy=on"),
    ],
)
def test_option_conflicts_are_one_line_errors(
    tmp_path: Path, options: list[str], message: str
) -> None:
    for d in ("l", "u", "w", "m"):
        (tmp_path / d).mkdir()
    layers = [
        f"lowerdir={tmp_path / 'l'}",
        f"upperdir={tmp_path / 'u'}",
        f"workdir={tmp_path / 'w'}",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(
        [*unionfs_command(), "-o", ",".join(layers + options), os.fspath(tmp_path / "m")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert res.returncode != 0
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr


def test_metacopy_turns_redirect_dir_on(tmp_path: Path) -> None:
    u, _ = twins(tmp_path, _tree, n_lowers=2)
    with u.mount("metacopy=on"):
        os.rename(u.mnt / "big", u.mnt / "big2")  # no EXDEV: redirect_dir=on
    assert os.getxattr(u.upper / "big2", b"trusted.overlay.redirect") == b"big"
