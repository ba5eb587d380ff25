"""``unionfs explain``, held to the kernel where the QA pass found it wrong.

Names whose lookup fails (an invalid redirect, a redirect not followed, a
metadata-only copy without ``metacopy=on``); per-layer rows inside a directory
moved with a redirect; predictions of changes that follow a symlink or whose
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
import stat
import subprocess
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


@contextlib.contextmanager
def kernel_with(lowers: list[Path], mnt: Path, options: str) -> Iterator[Path]:
    """A read-only kernel overlay of *lowers* with extra mount *options*; unmounted after."""
    mnt.mkdir(exist_ok=True)
    opts = overlay_options(lowers) + "," + options
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
    deadline = time.monotonic() + 3
    while "cannot publish" not in um.log() and time.monotonic() < deadline:
        time.sleep(0.05)
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


def test_temporary_state_files_are_never_world_writable_and_are_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    monkeypatch.setenv(state.RUNDIR_ENV, os.fspath(run_dir))
    old = os.umask(0)
    try:
        # A daemon stopped while it writes (here: at its chmod, or its rename) leaves
        # nothing behind, and never a file anybody could rewrite.
        def interrupted(*a: object, **kw: object) -> None:
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(os, "chmod", interrupted)
            m.setattr(os, "replace", interrupted)
            with pytest.raises(KeyboardInterrupt):
                state.publish(state.MountState(**_state("0:4244", ["/l"])))
    finally:
        os.umask(old)
    assert [n for n in os.listdir(run_dir) if n.endswith(".tmp")] == []
    assert all(not os.stat(p).st_mode & 0o022 for p in run_dir.iterdir())
    # Those a daemon that is gone left (an older version made them 0666) are swept.
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, alive = f".0:4244.{gone.pid}.tmp", f".0:4244.{os.getpid()}.tmp"
    for name in (dead, alive):
        (run_dir / name).write_text("{}")
        os.chmod(run_dir / name, 0o666)
    state.sweep()
    left = os.listdir(run_dir)
    assert dead not in left and alive in left
