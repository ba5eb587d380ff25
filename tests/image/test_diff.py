"""``unionfs diff``: the A/C/D of an upper over its lowers.

The oracle is docker's full-tree comparison, written out independently here
(``naive_diff``) and run on the kernel overlay's merged trees with and without
the upper; the uppers are made by real mounts (the kernel's and unionfs's)
doing the same changes, and by hand in both marker formats.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from tests.conftest import FUSE_USABLE
from tests.image.builders import Tar
from tests.image.test_layout import run
from tests.image.test_unpack import unpack
from tests.mounting import kernel_overlay, unionfs_mounted
from unionfs.image.diff import changes
from unionfs.overlay import markers


def lower_layers(root: Path) -> list[Path]:
    """Two lowers (top first) with a whiteout and an opaque directory of their own."""
    base = (
        Tar().dir("etc").file("etc/passwd", b"root").file("etc/group", b"g").dir("etc/deep/er")
        .file("etc/deep/er/f", b"f").dir("data").file("data/old", b"o").dir("data/sub")
        .file("data/sub/x", b"x").dir("rmme").file("rmme/a", b"a").file("file-to-dir", b"f")
        .dir("dir-to-file").file("dir-to-file/in", b"i").file("lowergone", b"l")
        .dir("same").file("same/f", b"s")
    )  # fmt: skip
    top = (
        Tar()
        .whiteout("lowergone")
        .dir("etc")
        .file("etc/motd", b"hi")
        .opaque("same")
        .file("same/g", b"t")
    )
    unpack(base.bytes(), root / "base")
    unpack(top.bytes(), root / "top")
    return [root / "top", root / "base"]


def make_changes(mnt: Path) -> None:
    """add, modify, delete, replace a directory, chmod, type changes, a deep add."""
    (mnt / "etc/passwd").write_bytes(b"root\nuser")  # modify
    (mnt / "etc/new").write_text("new")  # add
    (mnt / "etc/group").unlink()  # delete
    (mnt / "etc/deep/er/added").write_text("deep")  # changes deep inside
    shutil.rmtree(mnt / "data")  # replace a directory: opaque, old entries hidden
    (mnt / "data").mkdir()
    (mnt / "data/sub").mkdir()
    (mnt / "data/sub/y").write_text("y")
    (mnt / "data/fresh").write_text("f")
    shutil.rmtree(mnt / "rmme")  # delete a directory
    (mnt / "file-to-dir").unlink()
    (mnt / "file-to-dir").mkdir()
    (mnt / "file-to-dir/inner").write_text("i")
    shutil.rmtree(mnt / "dir-to-file")
    (mnt / "dir-to-file").write_text("now a file")
    (mnt / "newdir/a/b").mkdir(parents=True)  # added tree
    (mnt / "newdir/a/b/c").write_text("c")
    os.chmod(mnt / "same", 0o700)  # metadata only
    os.symlink("etc/passwd", mnt / "link")


def naive_diff(old: Path, new: Path) -> list[str]:
    """docker's comparison of two whole trees (its ChangesDirs), independently written:
    changed = type/mode/owner/rdev differ, or for non-directories size or mtime;
    a directory with changes inside is changed; only the top of a deleted tree is
    listed, everything in an added tree is."""
    out: list[str] = []

    def walk(o: Path | None, n: Path, rel: str) -> bool:
        before = len(out)
        old_names = (
            set(os.listdir(o)) if o is not None and o.is_dir() and not o.is_symlink() else set()
        )
        new_names = set(os.listdir(n))
        for name in sorted(new_names):
            p = f"{rel}/{name}"
            ns = os.lstat(n / name)
            if name not in old_names:
                out.append(f"A {p}")
                if stat.S_ISDIR(ns.st_mode):
                    walk(None, n / name, p)
                continue
            assert o is not None
            os_ = os.lstat(o / name)
            differ = (ns.st_mode, ns.st_uid, ns.st_gid, ns.st_rdev) != (
                os_.st_mode,
                os_.st_uid,
                os_.st_gid,
                os_.st_rdev,
            )
            if not stat.S_ISDIR(ns.st_mode):
                differ = differ or ns.st_size != os_.st_size or ns.st_mtime_ns != os_.st_mtime_ns
            at = len(out)
            assert o is not None  # a name old_names has
            inner = (
                walk(o / name, n / name, p)
                if stat.S_ISDIR(ns.st_mode) and stat.S_ISDIR(os_.st_mode)
                else False
            )
            if stat.S_ISDIR(ns.st_mode) and not stat.S_ISDIR(os_.st_mode):
                walk(None, n / name, p)
                inner = True
            if differ or inner:
                out.insert(at, f"C {p}")
        for name in sorted(old_names - new_names):
            out.append(f"D {rel}/{name}")
        return len(out) > before

    walk(old, new, "")
    return sorted(out, key=lambda line: os.fsencode(line[2:]))


def kernel_trees(
    lowers: list[Path], upper: Path, tmp: Path, fn: Callable[[Path, Path], None]
) -> None:
    """Call fn(old_merged, new_merged) with both trees mounted by the kernel."""
    (tmp / "km-old").mkdir(exist_ok=True)
    (tmp / "km-new").mkdir(exist_ok=True)
    (tmp / "km-work").mkdir(exist_ok=True)
    with kernel_overlay(lowers, tmp / "km-old") as old:
        with kernel_overlay(lowers, tmp / "km-new", upper, tmp / "km-work") as new:
            fn(old, new)


def lines(upper: Path, lowers: list[Path]) -> list[str]:
    return [c.line().decode() for c in changes(upper, lowers)]


def test_changes_made_by_the_kernel_overlay(tmp_path: Path) -> None:
    lowers = lower_layers(tmp_path)
    upper = tmp_path / "upper"
    upper.mkdir()
    kernel_trees(lowers, upper, tmp_path, lambda old, new: make_changes(new))
    got = lines(upper, lowers)
    expected: list[str] = []
    kernel_trees(lowers, upper, tmp_path, lambda old, new: expected.extend(naive_diff(old, new)))
    assert got == expected
    # A few by name, so the oracle itself is checked too.
    for line in ("C /etc", "C /etc/passwd", "A /etc/new", "D /etc/group", "C /data", "D /data/old",
                 "A /data/fresh", "C /data/sub", "D /data/sub/x", "A /data/sub/y", "D /rmme",
                 "C /file-to-dir", "A /file-to-dir/inner", "C /dir-to-file", "A /newdir/a/b/c",
                 "C /same", "A /link", "C /etc/deep", "C /etc/deep/er", "A /etc/deep/er/added"):  # fmt: skip
        assert line in got, line
    assert "D /dir-to-file/in" not in got  # below a replaced directory: not listed, as docker


def test_changes_made_by_unionfs_give_the_same_diff(tmp_path: Path) -> None:
    assert FUSE_USABLE
    lowers = lower_layers(tmp_path)
    kupper, uupper, work, mnt = (tmp_path / n for n in ("kupper", "uupper", "uwork", "mnt"))
    for d in (kupper, uupper, work, mnt):
        d.mkdir()
    kernel_trees(lowers, kupper, tmp_path, lambda old, new: make_changes(new))
    with unionfs_mounted(lowers, mnt, uupper, work):
        make_changes(mnt)
    assert lines(uupper, lowers) == lines(kupper, lowers)


def to_oci_format(upper: Path) -> None:
    """Rewrite a kernel-format upper in place in the OCI format."""
    for dirpath, dirnames, filenames in os.walk(upper):
        d = Path(dirpath)
        if markers.has_opaque_xattr(os.fsencode(d), markers.TRUSTED):
            os.removexattr(d, "trusted.overlay.opaque")
            (d / ".wh..wh..opq").write_bytes(b"")
        for name in filenames:
            if markers.is_whiteout(os.lstat(d / name)):
                (d / name).unlink()
                (d / f".wh.{name}").write_bytes(b"")


def test_oci_format_upper_gives_the_same_diff(tmp_path: Path) -> None:
    lowers = lower_layers(tmp_path)
    upper = tmp_path / "upper"
    upper.mkdir()
    kernel_trees(lowers, upper, tmp_path, lambda old, new: make_changes(new))
    kernel_format = lines(upper, lowers)
    to_oci_format(upper)
    assert any(n.startswith(".wh.") for n in os.listdir(upper))
    assert lines(upper, lowers) == kernel_format


def test_without_lowers_everything_is_added(tmp_path: Path) -> None:
    upper = tmp_path / "u"
    unpack(Tar().dir("d").file("d/f", b"x").whiteout("gone").bytes(), upper)
    assert lines(upper, []) == ["A /d", "A /d/f", "D /gone"]


def test_cli_text_and_json(tmp_path: Path) -> None:
    lowers = lower_layers(tmp_path)
    upper = tmp_path / "upper"
    unpack(Tar().dir("etc").file("etc/passwd", b"x").whiteout("etc/group").bytes(), upper)
    lower_arg = ":".join(os.fspath(p) for p in lowers)
    res = run("diff", os.fspath(upper), "--lower", lower_arg)
    assert (res.returncode, res.stdout) == (0, "C /etc\nD /etc/group\nC /etc/passwd\n")
    res = run("diff", "--json", os.fspath(upper), "--lower", lower_arg)
    assert json.loads(res.stdout) == [
        {"kind": "C", "path": "/etc"},
        {"kind": "D", "path": "/etc/group"},
        {"kind": "C", "path": "/etc/passwd"},
    ]
    res = run("diff", os.fspath(tmp_path / "missing"))
    missing = f"unionfs: {tmp_path}/missing: no such file or directory\n"
    assert (res.returncode, res.stderr) == (1, missing)


def test_cli_lowers_from_an_image(tmp_path: Path) -> None:
    from tests.image.builders import Layer, write_oci_layout

    built = write_oci_layout(
        tmp_path / "img", [Layer(Tar().dir("etc").file("etc/passwd", b"r").bytes())]
    )
    upper = tmp_path / "upper"
    unpack(Tar().dir("etc").file("etc/passwd", b"x").file("etc/new", b"n").bytes(), upper)
    cache = os.fspath(tmp_path / "cache")
    res = run("diff", os.fspath(upper), "--image", os.fspath(built.path), "--cache", cache)
    assert (res.returncode, res.stdout) == (0, "C /etc\nA /etc/new\nC /etc/passwd\n")
    res = run("diff", os.fspath(upper), "--image", os.fspath(built.path), "--lower", cache)
    assert (res.returncode, res.stderr) == (1, "unionfs: --image and --lower: give one of them\n")
