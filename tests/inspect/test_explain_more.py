"""``unionfs explain``, held to the kernel where the QA pass found it wrong.

Names whose lookup fails (an invalid redirect, a redirect not followed, a
metadata-only copy without ``metacopy=on``); per-layer rows inside a directory
moved with a redirect, each about the path the core asked that layer for (a
redirect met partway along a path renames it); predictions of changes that follow a symlink or whose
arguments the kernel refuses; paths as written (``..``, a trailing ``/``, the
kernel's length limits, names with control characters); and the state a mount
publishes, which is trusted only when it belongs to the mount's owner or root.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KernelMount, Stack
from tests.mounting import REPO, UnionMount, overlay_options, unionfs_command
from tests.unit.conftest import NS, Layers, whiteout, write
from unionfs.errors import UsageError
from unionfs.fuse import state
from unionfs.inspect import stack as stacks
from unionfs.inspect.names import printable

OTHER_USER = 1000  # who plants a state directory for someone else (no account needed)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONPATH=os.fspath(REPO), **(env or {}))
    return subprocess.run(
        [*unionfs_command(), *args], capture_output=True, text=True, env=full, timeout=60
    )


def explain_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    res = run("explain", *args, "--json", env=env)
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def outcome(action: Callable[..., object], *args: object) -> str:
    """The name of the errno ``action(*args)`` fails with, or "ok"."""
    try:
        action(*args)
    except OSError as e:
        return errno.errorcode[e.errno or 0]
    return "ok"


def eventually(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Whether *condition* holds within *timeout* seconds (polled: generous, for a
    loaded machine; a condition that holds at once costs nothing)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def kernel_with(
    lowers: list[Path],
    mnt: Path,
    options: str,
    upper: Path | None = None,
    work: Path | None = None,
) -> Iterator[Path]:
    """A kernel overlay of *lowers* (and *upper*, with *work*: read-only without) with
    extra mount *options*; unmounted after."""
    mnt.mkdir(exist_ok=True)
    opts = overlay_options(lowers, upper, work) + "," + options
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, os.fspath(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", os.fspath(mnt)], check=False)


# -- A: a name whose lookup fails -------------------------------------------------------


def test_names_whose_lookup_fails_are_explained_as_the_kernel_fails_them(
    layers: Layers, kernel: KernelMount
) -> None:
    """The kernel lists an invalid redirect and a metadata-only copy of a stack without
    metacopy=on, and fails only their lookups: explain shows the directory (the root
    here), and for each name the errno, the layer and what ``check`` calls it."""
    top, base = layers.lowers
    (top / "rd").mkdir()
    os.setxattr(top / "rd", NS.prefix + b"redirect", b"a/b")
    write(top / "mc", b"")
    os.setxattr(top / "mc", NS.prefix + b"metacopy", b"")
    o = "lowerdir=" + ":".join(os.fspath(p) for p in (top, base))
    root = explain_json("-o", o, "/")
    failing = {f["name"]: (f["errno"], f["layer"]) for f in root["failing"]}
    assert failing == {"rd": ("EINVAL", 0), "mc": ("EPERM", 0)}
    rd, mc, below = (explain_json("-o", o, p) for p in ("rd", "mc", "rd/x"))
    assert (rd["visible"], rd["errno"], mc["errno"], below["errno"]) == (
        False,
        "EINVAL",
        "EPERM",
        "EINVAL",
    )
    assert "layer 0's rd has an invalid redirect xattr" in rd["verdict"]
    assert "invalid-redirect" in rd["verdict"]
    assert "layer 0's mc is a metadata-only copy" in mc["verdict"]
    assert "metacopy-without-metacopy" in mc["verdict"]
    assert rd["layers"][0]["rule"] == "lookup-fails"
    text = run("explain", "-o", o, "/").stdout
    assert "listed, but their lookup fails (explain each for why): rd (EINVAL, layer 0)" in text
    with kernel([top, base]) as mnt:
        assert sorted(os.listdir(mnt)) == ["mc", "rd"]
        got = {n: outcome(os.lstat, mnt / n) for n in ("rd", "mc", "rd/x")}
    assert got == {"rd": "EINVAL", "mc": "EPERM", "rd/x": "EINVAL"}


def test_a_redirect_not_followed_is_explained(layers: Layers, tmp_path: Path) -> None:
    top, base = layers.lowers
    write(base / "old" / "f")
    (top / "new").mkdir()
    os.setxattr(top / "new", NS.prefix + b"redirect", b"/old")
    o = f"lowerdir={top}:{base}"
    out = explain_json("-o", o + ",redirect_dir=nofollow", "new")
    assert (out["visible"], out["errno"]) == (False, "EPERM")
    assert "layer 0's new has a redirect" in out["verdict"]
    assert "redirect-not-followed" in out["verdict"]
    assert explain_json("-o", o, "new/f")["visible"] is True  # followed by default
    with kernel_with([top, base], tmp_path / "k", "redirect_dir=nofollow") as mnt:
        assert "new" in os.listdir(mnt)
        assert outcome(os.lstat, mnt / "new") == "EPERM"


def test_a_kernel_metacopy_on_a_mount_without_metacopy_is_explained(
    stack: Stack, mounted: Callable[..., UnionMount]
) -> None:
    """A kernel's metadata-only copy-up, then the same upper mounted by unionfs without
    metacopy=on: the live mount fails the lookup with EPERM, and explain says so."""
    write(stack.lowers[0] / "m", b"x" * 3000)
    opts = overlay_options(stack.lowers, stack.upper, stack.work) + ",metacopy=on,redirect_dir=on"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, stack.mnt], check=True)
    try:
        os.chmod(stack.mnt / "m", 0o600)
    finally:
        subprocess.run(["umount", stack.mnt], check=True)
    shutil.rmtree(stack.work / "work", ignore_errors=True)
    um = mounted()
    out = explain_json(os.fspath(um.mountpoint / "m"))
    assert (out["visible"], out["errno"], out["mount_shows"]) == (
        False,
        "EPERM",
        {"error": "EPERM"},
    )
    assert out["mount_disagrees"] == []
    assert "the upper's m is a metadata-only copy" in out["verdict"]
    root = explain_json(os.fspath(um.mountpoint))
    assert [(f["name"], f["errno"]) for f in root["failing"]] == [("m", "EPERM")]


# -- B: the rows inside a directory moved with a redirect --------------------------------


def test_the_rows_follow_a_redirect(
    stack: Stack, mounted: Callable[..., UnionMount], kernel: KernelMount
) -> None:
    app, base = stack.lowers
    write(base / "olddir" / "sub" / "f", b"hi\n")
    write(app / "olddir" / "af", b"a")
    write(base / "olddir" / "wh", b"w")
    whiteout(app / "olddir" / "wh")
    write(base / "olddir" / "osub" / "z")
    (app / "olddir" / "osub").mkdir()
    os.setxattr(app / "olddir" / "osub", NS.opaque, b"y")
    um = mounted(extra_options="redirect_dir=on,metacopy=on")
    mnt = um.mountpoint
    os.rename(mnt / "olddir", mnt / "newdir")
    paths = ["newdir", "newdir/sub", "newdir/sub/f", "newdir/wh", "newdir/osub", "newdir/osub/z"]
    out = {p: explain_json(os.fspath(mnt / p)) for p in paths}
    assert um.unmount() == 0

    f = out["newdir/sub/f"]
    rows = [(r["entry"], r["size"], r["note"]) for r in f["layers"]]
    assert rows == [
        (None, None, "has no directory newdir/sub"),
        (None, None, "has no directory olddir/sub"),
        ("regular file", 3, "provides the name: the topmost layer that has it (at olddir/sub/f)"),
    ]
    assert [r["place"] for r in f["layers"]] == ["newdir/sub/f", "olddir/sub/f", "olddir/sub/f"]
    wh = out["newdir/wh"]
    assert "hidden by a whiteout in layer 1 at olddir/wh" in wh["verdict"]
    assert [(m["kind"], m["format"]) for m in wh["layers"][1]["markers"]] == [
        ("whiteout", "kernel")
    ]
    assert f"({NS.opaque.decode()}=y) stops the merge" in out["newdir/osub"]["verdict"]
    moved = out["newdir"]
    assert "the upper, layer 1 and layer 2 merge" in moved["verdict"]
    assert moved["copy_up"]["from"] == 1
    assert "new in the upper" not in moved["copy_up"]["note"]
    assert "layer 1 at olddir" in moved["copy_up"]["note"]
    # The verdicts are the kernel's, over the same layers.
    with kernel([app, base], stack.upper) as k:
        for p in paths:
            shown = outcome(os.lstat, k / p) == "ok"
            assert out[p]["visible"] is shown, (p, out[p]["verdict"])


def _redirect(path: Path, to: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, NS.prefix + b"redirect", to.encode())


def _asked_paths_hold(
    tmp_path: Path, upper: Path, lowers: list[Path], notes: dict[int, str]
) -> dict[str, Any]:
    """``explain m/f`` over these layers (``m`` an upper directory with a redirect):
    what it shows is what the kernel (redirect_dir=on) shows; each row's path is the
    one the core asked that layer for, and the kernel asks it for the same: a file put
    in each layer beside where its row says (``probe-N``, in layer N) shows in the
    kernel's ``m``. *notes*: rows that must say this (a layer with nothing there)."""
    o = overlay_options(lowers, upper) + ",redirect_dir=on"
    out = explain_json("-o", o, "m/f")
    rows = out["layers"]
    for index, note in notes.items():
        assert rows[index]["note"] == note, rows[index]
    work = tmp_path / "k-work"
    work.mkdir()
    with kernel_with(lowers, tmp_path / "k", "redirect_dir=on", upper, work) as k:
        st = os.lstat(k / "m" / "f")
        data = (k / "m" / "f").read_bytes()
    assert out["visible"] is True and out["type"] == "regular file"
    assert (out["shown"]["size"], out["shown"]["mode"]) == (len(data), stat.filemode(st.st_mode))
    provider = rows[out["layer"]]
    assert Path(provider["root"], provider["place"]).read_bytes() == data
    # Where each row says its layer was asked, the kernel looks: a name put there shows.
    probes = []
    for row in rows:
        probe = Path(row["root"], row["place"]).parent / f"probe-{row['index']}"
        write(probe, b"p")
        probes.append(probe.name)
    with kernel_with(lowers, tmp_path / "k", "redirect_dir=on", upper, work) as k:
        shown = os.listdir(k / "m")
    assert sorted(shown) == sorted(["f", *probes]), [(r["index"], r["place"]) for r in rows]
    for row in rows:
        probed = explain_json("-o", o, f"m/probe-{row['index']}")
        assert probed["layer"] == row["index"], probed["verdict"]
    return out


def _redirected_partway(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """An upper and three lowers: the upper's ``m`` redirected to ``/a/b``, layer 1's
    ``a`` (which holds a directory ``b``) redirected to ``x``."""
    up, l1, l2, l3 = (tmp_path / n for n in ("up", "l1", "l2", "l3"))
    for d in (up, l1, l2, l3):
        d.mkdir()
    _redirect(up / "m", "/a/b")
    _redirect(l1 / "a", "x")
    (l1 / "a" / "b").mkdir()
    return up, l1, l2, l3


def test_a_redirect_met_partway_renames_what_the_layers_below_are_asked(
    tmp_path: Path,
) -> None:
    """The upper's ``m`` is redirected to ``/a/b``; layer 1's ``a`` is redirected to
    ``x``: on the way to ``a/b`` the core (as the kernel) renames what the layers below
    are asked to ``x/b``, so layer 2 (empty) is asked for ``x/b``, never ``a/b``."""
    up, l1, l2, l3 = _redirected_partway(tmp_path)
    write(l3 / "x" / "b" / "f", b"hello\n")
    out = _asked_paths_hold(tmp_path, up, [l1, l2, l3], {2: "has no directory x/b"})
    assert [r["place"] for r in out["layers"]] == ["m/f", "a/b/f", "x/b/f", "x/b/f"]
    assert out["layer"] == 3


def test_a_chain_of_redirects_is_followed_layer_by_layer(tmp_path: Path) -> None:
    """Each layer renames what the next is asked, partway (an intermediate directory's
    redirect, relative or absolute) or at the end: the upper's ``m`` to ``/a/b``, layer
    1's ``a`` to ``x`` (``x/b``), layer 2's ``x`` to ``/y`` (``y/b``, though layer 2 has
    no ``x/b``), layer 3 has nothing, layer 4's ``y`` to ``z`` and its ``y/b`` to ``c``
    (``z/c``)."""
    layer_names = ("up", "l1", "l2", "l3", "l4", "l5")
    up, l1, l2, l3, l4, l5 = (tmp_path / n for n in layer_names)
    for d in (up, l1, l2, l3, l4, l5):
        d.mkdir()
    _redirect(up / "m", "/a/b")
    _redirect(l1 / "a", "x")
    (l1 / "a" / "b").mkdir()
    _redirect(l2 / "x", "/y")
    _redirect(l4 / "y", "z")
    _redirect(l4 / "y" / "b", "c")
    write(l5 / "z" / "c" / "f", b"deep\n")
    notes = {2: "has no directory x/b", 3: "has no directory y/b"}
    out = _asked_paths_hold(tmp_path, up, [l1, l2, l3, l4, l5], notes)
    assert [r["place"] for r in out["layers"]] == [
        "m/f",
        "a/b/f",
        "x/b/f",
        "y/b/f",
        "y/b/f",
        "z/c/f",
    ]
    assert out["layer"] == 5
    assert "(at z/c/f)" in out["layers"][5]["note"]


def test_an_invalid_redirect_met_partway_is_blamed_on_its_layer(tmp_path: Path) -> None:
    """Layer 2's ``x``, met on the way to ``x/b``, has an invalid redirect: the core
    tells which layer it was asking when the lookup failed (the upper's valid redirect
    was blamed before), and the kernel fails the lookup with EINVAL too."""
    up, l1, l2, l3 = _redirected_partway(tmp_path)
    _redirect(l2 / "x", "q/bad")  # relative, with a '/'
    write(l3 / "q" / "b" / "f")
    out = explain_json("-o", overlay_options([l1, l2, l3], up) + ",redirect_dir=on", "m")
    rows = out["layers"]
    assert (out["visible"], out["errno"]) == (False, "EINVAL")
    assert [r["rule"] for r in rows][:3] == ["redirect", "directory", "lookup-fails"]
    assert rows[2]["place"] == "x/b"
    assert "at layer 2's x/b" in out["verdict"] and "the upper" not in out["verdict"]
    work = tmp_path / "k-work"
    work.mkdir()
    with kernel_with([l1, l2, l3], tmp_path / "k", "redirect_dir=on", up, work) as k:
        assert outcome(os.lstat, k / "m") == "EINVAL"


# -- C: predictions ----------------------------------------------------------------------


def _renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_predictions_follow_symlinks_and_check_arguments_as_the_kernel(
    stack: Stack, mounted: Callable[..., UnionMount], kernel: KernelMount, tmp_path: Path
) -> None:
    """Each predicted outcome, then the same change on a kernel overlay and on a unionfs
    mount of the same layers: the same errno (or success) everywhere."""
    top, base = stack.lowers
    write(base / "target", b"t")
    whiteout(top / "target")
    os.symlink("target", top / "lnk")  # to a deleted file
    write(base / "file", b"ff")
    os.symlink("file", top / "lnk2")
    fresh = tmp_path / "predict-upper"
    fresh.mkdir()
    o = overlay_options(stack.lowers, fresh)

    def predicted(*args: str) -> dict[str, Any]:
        p: dict[str, Any] = explain_json("-o", o, *args)["prediction"]
        return p

    cases: list[tuple[list[str], Callable[[Path], object]]] = [
        (["lnk", "--op", "write"], lambda m: os.close(os.open(m / "lnk", os.O_WRONLY))),
        (["lnk", "--op", "chmod"], lambda m: os.chmod(m / "lnk", 0o600)),
        (["lnk", "--op", "truncate", "--size", "1"], lambda m: os.truncate(m / "lnk", 1)),
        (["file", "--op", "truncate", "--size", "-5"], lambda m: os.truncate(m / "file", -5)),
        (
            ["file", "--op", "rename", "--to", "g", "--exchange", "--noreplace"],
            lambda m: _renameat2(m / "file", m / "g", 3),
        ),
        (["lnk2", "--op", "chmod"], lambda m: os.chmod(m / "lnk2", 0o600)),
    ]
    predictions = [predicted(*args) for args, _ in cases]
    assert [p["result"] for p in predictions] == [
        "ENOENT",
        "ENOENT",
        "ENOENT",
        "EINVAL",
        "EINVAL",
        "ok",
    ]
    assert "it follows the symlink lnk to target" in predictions[0]["why"]
    chmod = predictions[-1]
    assert chmod["effects"][0] == "follows the symlink lnk2 to file: chmod changes the target"
    assert any(e.startswith("copies up file from layer 2") for e in chmod["effects"])
    assert not any("copies up lnk2" in e for e in chmod["effects"])
    (tmp_path / "kernel-upper").mkdir()
    with kernel(stack.lowers, tmp_path / "kernel-upper") as k:
        in_kernel = [outcome(a, k) for _, a in cases]
    um = mounted()
    in_unionfs = [outcome(a, um.mountpoint) for _, a in cases]
    assert in_kernel == in_unionfs == [p["result"] for p in predictions]
    assert (stack.upper / "file").exists() and not (stack.upper / "lnk2").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["f", "--op", "setxattr"], "--op setxattr needs --xattr NAME"),
        (["f", "--to", "g"], "--to goes with --op rename or --op link"),
        (["f", "--op", "chmod", "--to", "g"], "--to goes with --op rename or --op link"),
        (["f", "--size", "3"], "--size goes with --op truncate"),
        (["f", "--op", "chmod", "--xattr", "user.a"], "--xattr goes with --op setxattr"),
        (["f", "--noreplace"], "--noreplace and --exchange go with --op rename"),
        (["d/x/..", "--op", "unlink"], "does not end in a name (not . or ..)"),
    ],
)
def test_options_without_their_op_are_usage_errors(
    layers: Layers, args: list[str], message: str
) -> None:
    write(layers.lowers[0] / "f")
    write(layers.lowers[0] / "d" / "x")
    res = run("explain", "-o", overlay_options(layers.lowers, layers.upper), *args)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr


# -- D: paths as written -----------------------------------------------------------------


WRITTEN = [
    "file/",
    "file/.",
    "nonexist/..",
    "dd/../file",
    "dd/./",
    "dd/nonexist/../file",
    "dd/../dd/..",
]


def test_paths_are_walked_as_the_kernel_walks_them(layers: Layers, kernel: KernelMount) -> None:
    """``..`` and ``.`` are looked up, only from a directory that was found, and a
    trailing ``/`` asks for a directory: what explain says of each path as written is
    what the kernel answers for it."""
    write(layers.lowers[1] / "file")
    (layers.lowers[1] / "dd").mkdir()
    o = overlay_options(layers.lowers, layers.upper)
    said = {w: explain_json("-o", o, w) for w in WRITTEN}
    with kernel(layers.lowers, layers.upper) as mnt:
        answered = {w: outcome(os.lstat, os.fspath(mnt) + "/" + w) for w in WRITTEN}
    for w in WRITTEN:
        mine = "ok" if said[w]["visible"] else said[w]["errno"]
        assert mine == answered[w], (w, said[w]["verdict"])
    assert said["dd/../file"]["path"] == "file"
    assert said["dd/../file"]["written"] == "dd/../file"
    assert said["file/"]["verdict"].startswith(
        "not visible: file is a regular file, not a directory"
    )


def test_the_kernels_length_limits_and_short_messages(layers: Layers) -> None:
    o = overlay_options(layers.lowers)
    for path, what in [
        ("a/" * 3000, "the path has 6,000 bytes"),
        ("n" * 300, "a name of 300 bytes"),
        ("n" * 100_000, "the path has 100,000 bytes"),
    ]:
        res = run("explain", "-o", o, path)
        assert res.returncode == 2, res.stdout[:200]
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and len(lines[0]) < 300, res.stderr[:300]
        assert "ENAMETOOLONG" in lines[0] and what in lines[0]


def test_a_live_path_is_walked_as_written(stack: Stack, mounted: Callable[..., UnionMount]) -> None:
    write(stack.lowers[1] / "file")
    um = mounted()
    mnt = os.fspath(um.mountpoint)
    slash = explain_json(mnt + "/file/")
    assert (slash["visible"], slash["mount_shows"]) == (False, {"error": "ENOTDIR"})
    assert slash["mount_disagrees"] == [] and slash["errno"] == "ENOTDIR"
    up = explain_json(mnt + "/nonexist/..")
    assert (up["visible"], up["mount_shows"]) == (False, {"error": "ENOENT"})
    assert up["mount_disagrees"] == [] and up["errno"] == "ENOENT"
    res = run("explain", mnt + "/..")
    assert res.returncode == 2 and "climbs above the root of the mount at" in res.stderr


def test_names_print_as_one_line(layers: Layers) -> None:
    name = b"a\nb\x1b[31m\xff"
    write(Path(os.fsdecode(os.path.join(os.fsencode(layers.lowers[0]), name))), b"x")
    os.symlink(b"t\nu", os.path.join(os.fsencode(layers.lowers[0]), b"l"))
    o = overlay_options(layers.lowers)
    res = subprocess.run(
        [*unionfs_command(), "explain", "-o", o, os.fsdecode(name)],
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=os.fspath(REPO)),
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    first = res.stdout.split(b"\n", 1)[0]
    assert first == printable(name).encode() == b"a\\nb\\x1b[31m\\xff"
    out = explain_json("-o", o, "l")
    assert out["shown"]["target"] == "t\\nu"
    assert "-> t\\nu" in run("explain", "-o", o, "l").stdout


def test_explain_writes_nothing_into_the_layers(layers: Layers) -> None:
    """Not even the xattrs a mount records at its first lookup: the upper's uuid, a
    merged directory's origin, its parent's impure marker."""
    write(layers.lowers[0] / "d" / "f")
    (layers.upper / "d").mkdir()
    o = overlay_options(layers.lowers, layers.upper)
    assert run("explain", "-o", o, "d", "--op", "chmod").returncode == 0
    for path in (layers.upper, layers.upper / "d"):
        assert [x for x in os.listxattr(path) if ".overlay." in x] == [], path


def test_another_user_is_told_why_roots_mount_cannot_be_explained(
    stack: Stack, mounted: Callable[..., UnionMount], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not "an older daemon": root's markers are in trusted.overlay.*, which only root
    can read, so explain's verdicts would be wrong."""
    write(stack.lowers[0] / "f")
    um = mounted()
    path = os.fspath(um.mountpoint / "f")
    assert stacks.from_live_path(path)[0].live is not None  # as root: found
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", os.fspath(stack.root))
    monkeypatch.setattr(os, "geteuid", lambda: 1001)
    with pytest.raises(UsageError) as e:
        stacks.from_live_path(path)
    assert "keeps its markers in trusted.overlay.*, which only root can read" in str(e.value)
    assert "older daemon" not in str(e.value)


# -- E: the published state --------------------------------------------------------------


def _state(device: str, lowers: list[str]) -> dict[str, Any]:
    return state.MountState(
        pid=os.getpid(),
        mountpoint="/nowhere",
        device=device,
        config={"lowers": lowers},
        ids={},
    )._asdict()


def _plant(directory: Path, device: str, lowers: list[str], uid: int, mode: int) -> Path:
    path = directory / f"{device}.json"
    path.write_text(json.dumps(_state(device, lowers)))
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


def test_a_state_file_is_read_only_from_its_owner_or_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setenv(state.RUNDIR_ENV, os.fspath(run_dir))
    device = "0:4242"  # no such mount: the reader trusts its own uid (root) only
    _plant(run_dir, device, ["/fake"], 0, 0o644)
    os.chmod(run_dir, 0o755)
    found = state.read_state(device)
    assert found is not None and found.config["lowers"] == ["/fake"]  # root's own: read
    for dir_owner, dir_mode, file_owner, file_mode in [
        (OTHER_USER, 0o755, 0, 0o644),  # a directory someone else made
        (0, 0o777, 0, 0o644),  # one anybody may write
        (0, 0o755, OTHER_USER, 0o644),  # a file someone else wrote
        (0, 0o755, 0, 0o666),  # a file anybody may rewrite
    ]:
        os.chown(run_dir, dir_owner, dir_owner)
        os.chmod(run_dir, dir_mode)
        _plant(run_dir, device, ["/fake"], file_owner, file_mode)
        assert state.read_state(device) is None, (dir_owner, dir_mode, file_owner, file_mode)


def _as_user(monkeypatch: pytest.MonkeyPatch, tmp: Path, uid: int) -> None:
    """This process's state functions act as an ordinary user without XDG_RUNTIME_DIR
    (root does the writing underneath, so only the checks can refuse)."""
    monkeypatch.delenv(state.RUNDIR_ENV, raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", os.fspath(tmp))
    monkeypatch.setattr(os, "geteuid", lambda: uid)


def test_a_daemon_makes_its_own_state_directory_and_refuses_a_planted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _as_user(monkeypatch, tmp_path, 1001)
    assert state.runtime_dir() == tmp_path / "unionfs-1001"
    published = state.publish(state.MountState(**_state("0:4243", ["/l"])))
    assert stat.S_IMODE(os.stat(published.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(published).st_mode) == 0o600
    shutil.rmtree(published.parent)
    planted = tmp_path / "unionfs-1001"
    planted.mkdir(mode=0o777)
    os.chmod(planted, 0o777)
    os.chown(planted, OTHER_USER, OTHER_USER)
    with pytest.raises(OSError) as e:
        state.publish(state.MountState(**_state("0:4243", ["/l"])))
    assert "owned by uid 1000" in str(e.value)
    assert os.listdir(planted) == []


def test_a_planted_state_directory_fools_neither_the_daemon_nor_explain(
    stack: Stack, mounted: Callable[..., UnionMount], tmp_path: Path
) -> None:
    """Another user made the runtime directory first (mode 0777): the daemon publishes
    nothing there, and what that user writes there is not believed."""
    write(stack.lowers[0] / "etc" / "evil", b"real")
    fake = tmp_path / "fake"
    write(fake / "etc" / "evil", b"fake")
    planted = tmp_path / "planted-run"
    planted.mkdir()
    os.chmod(planted, 0o777)
    os.chown(planted, OTHER_USER, OTHER_USER)
    env = {state.RUNDIR_ENV: os.fspath(planted)}
    um = mounted(env=env)
    device = state.device_of(um.mountpoint)
    assert device is not None
    assert eventually(lambda: "cannot publish" in um.log()), um.log()
    assert "refused: owned by uid 1000" in um.log()
    data = _state(device, [os.fspath(fake)])
    data["pid"], data["mountpoint"] = um.pid, os.fspath(um.mountpoint)
    data["config"]["upper"] = os.fspath(stack.upper)
    (planted / f"{device}.json").write_text(json.dumps(data))
    os.chown(planted / f"{device}.json", OTHER_USER, OTHER_USER)
    res = run("explain", os.fspath(um.mountpoint / "etc" / "evil"), env=env)
    assert res.returncode == 2, res.stdout
    assert f"{planted}: refused: owned by uid 1000" in res.stderr
    assert os.fspath(fake) not in res.stdout + res.stderr


# What publishing may call once its temporary file exists: an interruption at any of
# them finds the file as it is at that moment.
AFTER_CREATE = ("fchmod", "chmod", "write", "fsync", "fdatasync", "replace", "rename")
STATE_MODE = 0o644 if os.geteuid() == 0 else 0o600  # root's state is readable by all


def _temp_files(run_dir: Path) -> list[str]:
    if not run_dir.exists():
        return []
    return [n for n in os.listdir(run_dir) if n.startswith(".") and n.endswith(".tmp")]


def test_an_interrupted_publish_leaves_nothing_behind_and_never_a_writable_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishing interrupted at its first call once the temporary file exists (under
    umask 0, which takes no bit off): the file has the state file's mode (0644 for
    root's) from its creation on, and it is gone once the interruption has gone through."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv(state.RUNDIR_ENV, os.fspath(run_dir))
    modes: dict[str, int] = {}  # when -> the temporary file's mode then

    def seen(when: str) -> bool:
        names = _temp_files(run_dir)
        for name in names:
            modes[when] = stat.S_IMODE(os.stat(run_dir / name).st_mode)
        return bool(names)

    real_open = os.open

    def observing_open(*a: Any, **kw: Any) -> int:
        fd = real_open(*a, **kw)
        seen("created")
        return fd

    def interrupting(name: str) -> Callable[..., Any]:
        real = getattr(os, name)

        def call(*a: Any, **kw: Any) -> Any:
            if "interrupted" not in modes and seen("interrupted"):
                raise KeyboardInterrupt
            return real(*a, **kw)

        return call

    old = os.umask(0)
    try:
        with monkeypatch.context() as m:
            m.setattr(os, "open", observing_open)
            for name in AFTER_CREATE:
                m.setattr(os, name, interrupting(name))
            with pytest.raises(KeyboardInterrupt):
                state.publish(state.MountState(**_state("0:4244", ["/l"])))
    finally:
        os.umask(old)
    assert "interrupted" in modes, "publishing made no temporary file, or was not interrupted"
    assert set(modes.values()) == {STATE_MODE}, {k: f"{v:04o}" for k, v in modes.items()}
    assert _temp_files(run_dir) == [] and os.listdir(run_dir) == []


# A daemon killed while it publishes: at its first call once the temporary file exists.
KILLED_WHILE_PUBLISHING = f"""
import os, signal, sys
from unionfs.fuse import state
run_dir = sys.argv[1]
def killing(real):
    def call(*a, **kw):
        if os.path.isdir(run_dir) and any(n.endswith(".tmp") for n in os.listdir(run_dir)):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **kw)
    return call
for name in {AFTER_CREATE!r}:
    if hasattr(os, name):
        setattr(os, name, killing(getattr(os, name)))
os.umask(0)
state.publish(state.MountState(pid=os.getpid(), mountpoint="/nowhere", device="0:4245",
                               config={{"lowers": ["/l"]}}, ids={{}}))
"""


def test_temporary_state_files_are_never_world_writable_and_are_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon killed while it writes its state leaves its temporary file, never one
    anybody could rewrite; it is swept once that daemon's pid is gone, and a live
    daemon's is not."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv(state.RUNDIR_ENV, os.fspath(run_dir))
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WHILE_PUBLISHING, os.fspath(run_dir)], env=env
    )
    assert child.wait(timeout=60) == -signal.SIGKILL
    dead = f".0:4245.{child.pid}.tmp"
    assert _temp_files(run_dir) == [dead]
    assert stat.S_IMODE(os.stat(run_dir / dead).st_mode) == STATE_MODE
    alive = f".0:4245.{os.getpid()}.tmp"  # this process's: being written
    (run_dir / alive).write_text("{}")
    state.sweep()
    assert _temp_files(run_dir) == [alive]


def test_a_refused_state_is_not_waited_for_but_a_missing_one_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stack.from_mount`` waits a moment for a mount that has not published yet, never
    for one whose state directory it refuses (that will not change by waiting)."""
    import time

    from unionfs.errors import UsageError
    from unionfs.fuse import state
    from unionfs.inspect import stack as stacks

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anybody may write here: refused
    monkeypatch.setenv(state.RUNDIR_ENV, os.fspath(shared))
    mount = state.MountEntry(b"/nowhere", "0:4242", "fuse.unionfs", os.geteuid())
    start = time.monotonic()
    with pytest.raises(UsageError, match="refused"):
        stacks.from_mount(mount, wait=30.0)
    assert time.monotonic() - start < 10, "waited for a refused state"
    os.chmod(shared, 0o700)  # now merely missing: waited for, up to the wait given
    start = time.monotonic()
    with pytest.raises(UsageError, match="no "):
        stacks.from_mount(mount, wait=0.5)
    assert time.monotonic() - start >= 0.5
