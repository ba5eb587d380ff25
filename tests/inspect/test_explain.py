"""``unionfs explain`` on layer directories, without a mount: verdicts, reports, predictions."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import REPO, kernel_overlay, overlay_options, unionfs_command
from tests.unit.conftest import NS, Layers, opaque, whiteout, write
from unionfs.errors import UsageError
from unionfs.inspect.explain import Explanation, explain
from unionfs.inspect.predict import Prediction, predict, rename_flags
from unionfs.inspect.stack import Stack
from unionfs.overlay.union import Union, UnionConfig


@pytest.fixture
def stack(layers: Layers) -> Stack:
    return Stack(UnionConfig(lowers=layers.lowers, upper=layers.upper, xattrs=NS))


@pytest.fixture
def union(stack: Stack) -> Iterator[Union]:
    u = stack.open()
    try:
        yield u
    finally:
        u.close()


def ex(union: Union, stack: Stack, path: str) -> Explanation:
    return explain(union, path.encode(), stack)


def row(exp: Explanation, index: int) -> tuple[str | None, str, str]:
    r = exp.layers[index]
    return r.entry, r.rule, r.note


def op(union: Union, name: str, path: str, to: str | None = None, **kw: object) -> Prediction:
    return predict(union, name, path.encode(), to.encode() if to else None, **kw)  # type: ignore[arg-type]


# -- verdicts ---------------------------------------------------------------------


def test_a_kernel_whiteout_hides_the_file_below(layers: Layers) -> None:
    whiteout(layers.lowers[0] / "f")
    write(layers.lowers[1] / "f", b"old")
    stack = Stack(UnionConfig(lowers=layers.lowers, upper=layers.upper, xattrs=NS))
    u = stack.open()
    try:
        exp = ex(u, stack, "f")
    finally:
        u.close()
    assert not exp.visible and exp.layer is None
    assert "hidden by a whiteout in layer 1 (kernel format" in exp.verdict
    assert row(exp, 1)[:2] == ("whiteout", "whiteout")
    assert [(m.kind, m.format) for m in exp.layers[1].markers] == [("whiteout", "kernel")]
    assert row(exp, 2) == (
        "regular file",
        "not-looked-at",
        "not looked at: hidden by layer 1's whiteout",
    )


def test_an_oci_whiteout_is_named_as_such(layers: Layers, stack: Stack, union: Union) -> None:
    write(layers.lowers[0] / ".wh.f", b"")
    write(layers.lowers[1] / "f", b"old")
    exp = ex(union, stack, "f")
    assert not exp.visible
    assert exp.verdict == "not visible: hidden by an OCI whiteout .wh.f in layer 1"
    markers = exp.layers[1].markers
    assert [(m.kind, m.format, m.detail) for m in markers] == [("whiteout", "oci", ".wh.f")]


def test_directories_merge_until_an_opaque_marker(
    layers: Layers, stack: Stack, union: Union
) -> None:
    write(layers.upper / "d" / "u")
    opaque(layers.lowers[0] / "d")
    write(layers.lowers[0] / "d" / "a")
    write(layers.lowers[1] / "d" / "b")
    exp = ex(union, stack, "d")
    assert exp.visible and exp.kind == "directory" and exp.layer == 0
    assert exp.verdict == (
        "a merged directory: the directories in the upper and layer 1 merge; layer 1's "
        f"opaque marker ({NS.opaque.decode()}=y) stops the merge"
    )
    assert exp.merge == [0, 1]
    assert exp.entries == {0: 1, 1: 1}
    assert row(exp, 2)[2] == "not looked at: below layer 1's opaque directory"
    below = ex(union, stack, "d/b")
    assert not below.visible
    assert (
        "layer 2 has a regular file there (cut off at d: below layer 1's opaque directory)"
        in below.verdict
    )


def test_a_file_ends_the_merge_of_directories_above(
    layers: Layers, stack: Stack, union: Union
) -> None:
    write(layers.lowers[0] / "d" / "a")
    write(layers.lowers[1] / "d", b"a file")
    exp = ex(union, stack, "d")
    assert exp.verdict == (
        "a directory from layer 1 only; layer 2 has a regular file there, which ends the merge"
    )


def test_a_symlink_on_the_way_is_not_followed(layers: Layers, stack: Stack, union: Union) -> None:
    os.symlink("/etc", layers.lowers[0] / "etc")
    exp = ex(union, stack, "etc/passwd")
    assert not exp.visible
    assert "etc is a symlink to /etc" in exp.verdict


def test_the_stat_shown_is_the_topmost_layers(layers: Layers, stack: Stack, union: Union) -> None:
    write(layers.lowers[1] / "f", b"12345")
    os.chmod(layers.lowers[1] / "f", 0o640)
    os.setxattr(layers.lowers[1] / "f", b"user.k", b"v")
    exp = ex(union, stack, "f")
    assert exp.shown is not None
    assert (exp.shown["mode"], exp.shown["size"]) == ("-rw-r-----", 5)
    assert exp.shown["xattrs"] == {"user.k": b"v"}


def test_an_upper_copy_with_the_lowers_size_and_mtime_is_called_a_likely_copy_up(
    layers: Layers, stack: Stack, union: Union
) -> None:
    write(layers.lowers[1] / "f", b"same")
    write(layers.upper / "f", b"same")
    st = os.stat(layers.lowers[1] / "f")
    os.utime(layers.upper / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
    exp = ex(union, stack, "f")
    assert exp.copy_up is not None
    assert exp.copy_up["from"] == 2 and exp.copy_up.get("known") == "guess"
    write(layers.upper / "new")
    fresh = ex(union, stack, "new")
    assert fresh.copy_up == {"note": "new in the upper: no lower layer shows this path"}


def test_other_namespaces_and_other_tools_xattrs_are_reported(
    layers: Layers, stack: Stack, union: Union
) -> None:
    write(layers.lowers[0] / "f")
    os.setxattr(layers.lowers[0] / "f", b"user.fuseoverlayfs.override_stat", b"0:0:0755")
    exp = ex(union, stack, "f")
    found = [(m.kind, m.format) for m in exp.layers[1].markers]
    assert found == [("foreign-xattr", "fuse-overlayfs")]
    assert "unionfs and the kernel ignore it" in exp.layers[1].markers[0].effect


# -- predictions --------------------------------------------------------------------


def test_renaming_a_merged_directory_is_exdev(layers: Layers, union: Union) -> None:
    write(layers.lowers[0] / "d" / "a")
    write(layers.lowers[1] / "d" / "b", b"xyz")
    p = op(union, "rename", "d", "e")
    assert (p.errno, p.by_overlay) == ("EXDEV", True)
    assert "without redirect_dir" in p.why
    assert "(its parts are in layer 1, layer 2)" in p.why
    assert "(2 entries, 4 bytes)" in p.why


def test_renaming_an_upper_directory_into_a_merged_one_makes_it_opaque(
    layers: Layers, union: Union
) -> None:
    write(layers.upper / "new" / "f")
    write(layers.lowers[0] / "m" / "g")
    write(layers.upper / "m" / "h")
    p = op(union, "rename", "new", "m/new")
    assert p.errno is None
    assert any("marks m/new opaque" in e for e in p.effects)


def test_a_lower_file_rename_copies_up_and_leaves_a_whiteout(layers: Layers, union: Union) -> None:
    write(layers.lowers[1] / "d" / "f", b"0123456789")
    p = op(union, "rename", "d/f", "g")
    assert p.errno is None and p.copy_up_bytes == 10
    assert any(e.startswith("copies up d from layer 2") for e in p.effects)
    assert any("leaves a whiteout at d/f" in e for e in p.effects)


def test_xattr_names_and_sizes_the_system_call_refuses(layers: Layers, stack: Stack) -> None:
    """An empty or over-long xattr name: ERANGE before any lookup (even of a missing
    path); a name in no namespace: EOPNOTSUPP from the upper filesystem, after the
    copy-up, as on the kernel overlay (tests/inspect/test_explain_oracle.py sends no
    such names; checked against the kernel below). A truncate size no off_t holds is
    a bad argument."""
    write(layers.lowers[0] / "f", b"data")
    u = stack.open()
    try:
        for name in (b"", b"user." + b"x" * 251):
            assert op(u, "setxattr", "missing", xattr=name).errno == "ERANGE"
        assert op(u, "setxattr", "f", xattr=b"user." + b"x" * 250).errno is None
        bogus = op(u, "setxattr", "f", xattr=b"bogus")
        assert bogus.errno == "EOPNOTSUPP" and "copy-up made first stays" in bogus.why
        with pytest.raises(UsageError, match="over the largest file size"):
            op(u, "truncate", "f", size=1 << 63)
    finally:
        u.close()
    mnt, kup, kwork = (
        layers.upper.parent / "kmnt",
        layers.upper.parent / "ku",
        layers.upper.parent / "kw",
    )
    for d in (mnt, kup, kwork):
        d.mkdir()
    with kernel_overlay(layers.lowers, mnt, kup, kwork):
        for name, wanted in ((b"", errno.ERANGE), (b"bogus", errno.EOPNOTSUPP)):
            with pytest.raises(OSError) as caught:
                os.setxattr(mnt / "f", name, b"1")
            assert caught.value.errno == wanted
        assert (kup / "f").exists()  # the copy-up stays


def test_reserved_names_exdev_erofs_and_private_xattrs(layers: Layers, stack: Stack) -> None:
    write(layers.lowers[0] / "f", b"data")
    u = stack.open()
    try:
        assert (op(u, "create", ".wh.x").errno, op(u, "create", ".wh.x").by_overlay) == (
            "EINVAL",
            True,
        )
        assert op(u, "rename", "f", ".wh.f").errno == "EINVAL"
        assert op(u, "setxattr", "f", xattr=NS.opaque).errno == "EOPNOTSUPP"
        chmod = op(u, "chmod", "f")
        assert chmod.errno is None and chmod.copy_up_bytes == 4
        assert op(u, "truncate", "f", size=2).copy_up_bytes == 2
    finally:
        u.close()
    ro = Stack(UnionConfig(lowers=layers.lowers, xattrs=NS, readonly=True)).open()
    try:
        p = op(ro, "chmod", "f")
        assert (p.errno, p.by_overlay) == ("EROFS", True)
        assert op(ro, "unlink", "f").errno == "EROFS"
    finally:
        ro.close()


def test_the_vfs_errors_come_through_too(layers: Layers, union: Union) -> None:
    write(layers.lowers[0] / "d" / "a")
    write(layers.lowers[0] / "f")
    assert op(union, "rmdir", "d").errno == "ENOTEMPTY"
    assert op(union, "unlink", "d").errno == "EISDIR"
    assert op(union, "rename", "f", "d").errno == "EISDIR"
    assert op(union, "create", "f").errno == "EEXIST"
    assert op(union, "unlink", "nope").errno == "ENOENT"
    assert op(union, "rename", "f", "d", flags=rename_flags(True, False)).errno == "EEXIST"
    p = op(union, "unlink", "f")
    assert p.errno is None and p.effects == [
        "leaves a whiteout at f in the upper: a lower layer has the name"
    ]


def test_mkdir_over_a_whiteout_replaces_it_with_an_opaque_directory(
    layers: Layers, union: Union
) -> None:
    write(layers.lowers[0] / "d" / "a")
    whiteout(layers.upper / "d")
    p = op(union, "mkdir", "d")
    assert p.errno is None
    assert p.effects == [
        "replaces the whiteout at d in the upper",
        "marks d opaque: the deleted directory below must stay hidden",
    ]


# -- the command line -------------------------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    return subprocess.run(
        [*unionfs_command(), *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_the_command_line_with_layers_given_as_options(layers: Layers) -> None:
    write(layers.lowers[1] / "d" / "f", b"abc")
    opts = overlay_options(layers.lowers, layers.upper)
    res = run("explain", "-o", opts, "/d/f", "--json", "--op", "rename", "--to", "d/g")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["visible"], out["type"], out["layer"]) == (True, "regular file", 2)
    assert out["prediction"]["result"] == "ok"
    human = run("explain", "d", "-o", opts)
    assert human.returncode == 0
    assert human.stdout.splitlines()[1] == "  a directory from layer 2 only"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["explain", "-o", "lowerdir=/nonexistent", "x"],
            "lowerdir /nonexistent: No such file or directory",
        ),
        (["explain", "/"], "/: not inside a unionfs mount"),
        (["explain", "-o", "lowerdir=/tmp", "x", "--op", "rename"], "--op rename needs --to DEST"),
        (["explain", "-o", "lowerdir=/tmp", "../x"], "../x: climbs above the merged root"),
        (["explain", "-o", "lowerdir=/tmp", "x", "--op", "fly"], "argument --op: invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    res = run(*args)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr


def test_explain_on_the_same_layers_twice_changes_nothing(layers: Layers) -> None:
    """explain reads; it must not write into the layers or a workdir."""
    write(layers.lowers[0] / "f")
    whiteout(layers.upper / "g")
    before = sorted((p, p.stat().st_mtime_ns) for p in layers.upper.parent.rglob("*"))
    opts = overlay_options(layers.lowers, layers.upper, layers.work)
    assert run("explain", "-o", opts, "f", "--op", "unlink").returncode == 0
    assert run("explain", "-o", opts, "g", "--op", "create").returncode == 0
    after = sorted((p, p.stat().st_mtime_ns) for p in layers.upper.parent.rglob("*"))
    assert before == after
    assert errno.EEXIST  # (a reminder that errnos are compared by name above)


def test_explain_takes_the_mode_options_and_predicts_redirects(tmp_path: Path) -> None:
    """``-o ...,metacopy=on`` resolves metadata-only copies as that mount does, and a
    rename there is predicted as the mount makes it: with a redirect, no copy."""
    from tests.mounting import unionfs_mounted

    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower / "d", lower / "m", upper, work, mnt):
        d.mkdir(parents=True)
    write(lower / "f", b"B" * 5000)
    write(lower / "d" / "x", b"x")
    write(lower / "m" / "y", b"y")
    with unionfs_mounted([lower], mnt, upper, work, extra_options="metacopy=on") as um:
        os.chmod(um.mountpoint / "f", 0o640)  # a metadata-only copy-up
    o = f"lowerdir={lower},upperdir={upper},workdir={work},metacopy=on"
    res = run("explain", "-o", o, "/f", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["visible"] is True
    res = run("explain", "-o", o, "/d", "--op", "rename", "--to", "/m/d2")
    assert res.returncode == 0, res.stderr
    assert "rename to m/d2: succeeds" in res.stdout
    assert "records in a redirect xattr on m/d2" in res.stdout and "opaque" not in res.stdout
    res = run("explain", "-o", o, "/f", "--op", "link", "--to", "/m/f2", "--json")
    assert json.loads(res.stdout)["prediction"]["copy_up_bytes"] == 0  # metadata only
    # without the option the lookup fails as the mount's does, and explain says why
    res = run("explain", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", "/f", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["visible"], out["errno"]) == (False, "EPERM")
    assert "metacopy-without-metacopy" in out["verdict"]
