"""What a mount publishes cannot stall or fool the tools that read it.

``unionfs convert`` refuses to touch anything while a live unionfs mount's layers
are unknown (it publishes no state this command can read), and no reader of a
state file (convert, explain, trace, a new daemon's sweep, a daemon withdrawing
its own at exit) waits on a FIFO put in its place, or reads a file of any size.
Every command runs with a timeout, so a hang fails the test instead of stalling it.

Convert refuses while *any* unionfs mount's state is unreadable, and others may
have mounts live on this machine (another run of the suite, say): it runs in a
mount namespace of its own with every unionfs mount but the test's detached.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack
from tests.mounting import REPO, UnionMount, start_unionfs, unionfs_command
from tests.unit.conftest import is_whiteout, write
from unionfs.fuse import state

TIMEOUT = 30.0  # seconds a command gets: it needs a few at most

# Run in a mount namespace of its own (unshare: private propagation): detach every
# unionfs mount but those of the devices in argv[1] (by umount2, which asks no
# daemon), then run argv[2:].
_ONLY = r"""
import ctypes, os, sys
from unionfs.fuse import state
libc = ctypes.CDLL(None, use_errno=True)
keep = set(sys.argv[1].split(","))
for m in reversed(state.mountinfo()):
    if m.fstype == state.FSTYPE and m.device not in keep:
        libc.umount2(m.mountpoint, 2 | 8)  # MNT_DETACH | UMOUNT_NOFOLLOW
os.execvp(sys.argv[2], sys.argv[2:])
"""


def run(
    *args: str | Path,
    env: dict[str, str] | None = None,
    only: tuple[UnionMount, ...] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``unionfs ARGS``, with no ``$UNIONFS_RUNTIME_DIR`` unless *env* gives one; with
    *only*, where those are the only unionfs mounts (``isolated``)."""
    cmd = [*unionfs_command(), *[os.fspath(a) for a in args]]
    return run_command(isolated(only, cmd) if only is not None else cmd, env)


def run_command(cmd: list[str], env: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != state.RUNDIR_ENV}
    full["PYTHONPATH"] = os.fspath(REPO)
    full.update(env or {})
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} hung for {TIMEOUT}s: {e.stderr!r}")


def isolated(mounts: tuple[UnionMount, ...], cmd: list[str]) -> list[str]:
    """*cmd* where *mounts* are the only unionfs mounts."""
    keep = ",".join(um.device.decode() for um in mounts if um.device is not None)
    return ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _ONLY, keep, *cmd]  # fmt: skip


def _published(run_dir: Path, um: UnionMount, wait: float = 10.0) -> Path:
    """The state file *um*'s daemon publishes in *run_dir*, once it is there for good:
    with its trace socket, made once the daemon has published it for the last time
    (a daemon that mounts by itself publishes first before it is ready, then again)."""
    assert um.device is not None
    path = run_dir / f"{um.device.decode()}.json"
    deadline = time.monotonic() + wait
    while True:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISREG(os.lstat(path).st_mode) and path.with_suffix(".sock").exists():
                return path
        if time.monotonic() > deadline:
            pytest.fail(f"the daemon published no state in {run_dir} within {wait}s: {um.log()}")
        time.sleep(0.02)


@contextlib.contextmanager
def fifo_at(path: Path) -> Iterator[None]:
    """A FIFO in place of *path* (as the owner of its directory may put there). At
    the end, a reader stuck opening it (a regression) is let go, and it is removed."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.mkfifo(path, 0o600)
    try:
        yield
    finally:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: nobody waits on it
            os.close(fd)
        except OSError as e:
            assert e.errno in (errno.ENXIO, errno.ENOENT), e
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISFIFO(os.lstat(path).st_mode):
                os.unlink(path)


def unknown(um: UnionMount, why: str) -> str:
    return (
        f"unionfs convert: the live unionfs mount at {um.mountpoint} publishes no state this "
        f"command can read ({why}): its layers are unknown, so nothing is converted while it "
        f"is mounted; unmount it first, or --ignore-mount {um.mountpoint} if it uses nothing "
        "in or around this directory\n"
    )


def reasons(why: str) -> list[str]:
    """Why each runtime directory looked in had no state to use (``state.find_state``)."""
    return why.split("; ")


# -- convert fails closed ------------------------------------------------------------------


def test_convert_refuses_while_a_live_mount_publishes_no_state_it_can_read(
    stack: Stack,
    mounted: Callable[..., UnionMount],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The daemon published its state in another runtime directory than convert
    looks in: the mount's layers are unknown, so no directory is converted (its
    layers, or one that has nothing to do with it), until convert is told where the
    state is or the mount is gone. A dry run may still look."""
    top = stack.lowers[0]
    write(top / "d" / ".wh.x", b"")
    other = tmp_path / "other"
    write(other / ".wh.y", b"")
    elsewhere = {state.RUNDIR_ENV: os.fspath(tmp_path / "elsewhere")}
    um = mounted(env=elsewhere)
    _published(tmp_path / "elsewhere", um)
    monkeypatch.delenv(state.RUNDIR_ENV, raising=False)
    assert um.device is not None
    found, why = state.find_state(um.device.decode())
    assert found is None and why
    for directory in (top / "d", top, stack.upper, stack.work, other):
        res = run("convert", "--to", "kernel", directory, only=(um,))
        assert (res.returncode, res.stdout) == (2, ""), res.stdout + res.stderr
        assert res.stderr == unknown(um, why)
    assert (top / "d" / ".wh.x").exists() and (other / ".wh.y").exists()
    res = run("convert", "--to", "kernel", "--dry-run", top / "d", only=(um,))
    assert res.returncode == 0, res.stderr
    assert res.stdout.endswith("would change 1 markers to the kernel format; 0 left as they are\n")
    assert (top / "d" / ".wh.x").exists() and not is_whiteout(top / "d" / "x")
    # Told where the state is: the mount's own layers are refused, as ever; not others.
    res = run("convert", "--to", "kernel", top / "d", env=elsewhere, only=(um,))
    assert res.returncode == 2
    assert res.stderr == (
        f"unionfs convert: {top / 'd'} is inside {top}, a layer of the live mount at "
        f"{um.mountpoint}: unmount it first\n"
    )
    res = run("convert", "--to", "kernel", other, env=elsewhere, only=(um,))
    assert res.returncode == 0, res.stderr
    assert is_whiteout(other / "y")
    assert um.unmount() == 0, um.log()
    res = run("convert", "--to", "kernel", top / "d", only=())
    assert res.returncode == 0, res.stderr
    assert is_whiteout(top / "d" / "x") and not (top / "d" / ".wh.x").exists()


_CONVERT_IGNORING = """
import sys
from unionfs.inspect.cli import main
ignoring = [arg for mnt in sys.argv[2:] for arg in ("--ignore-mount", mnt)]
sys.exit(main(["convert", "--to", "kernel", sys.argv[1], *ignoring]))
"""


def test_a_mount_the_caller_vouches_for_does_not_stop_convert(
    stack: Stack, mounted: Callable[..., UnionMount], tmp_path: Path
) -> None:
    """``convert --ignore-mount MNT``: the mount at MNT, whose state cannot
    be read, is set aside by name (by another path to it too); any other still stops
    the conversion, and a mount whose layers are known cannot be set aside."""
    other = tmp_path / "other"
    write(other / ".wh.y", b"")
    elsewhere = {state.RUNDIR_ENV: os.fspath(tmp_path / "elsewhere")}
    um = mounted(env=elsewhere)
    _published(tmp_path / "elsewhere", um)
    os.symlink(stack.root, tmp_path / "link")
    via_link = tmp_path / "link" / "mnt"

    def convert(directory: Path, *ignore: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable,
            "-c",
            _CONVERT_IGNORING,
            os.fspath(directory),
            *map(os.fspath, ignore),
        ]
        return run_command(isolated((um,), cmd), **kw)

    res = convert(other, tmp_path / "nowhere", env=None)
    assert res.returncode == 2 and "publishes no state this command can read" in res.stderr
    assert f"--ignore-mount {um.mountpoint}" in res.stderr
    assert (other / ".wh.y").exists()
    res = convert(stack.lowers[0], via_link, env=elsewhere)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{stack.lowers[0]} is a layer of the live mount at {um.mountpoint}" in res.stderr
    res = convert(other, via_link, env=None)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "changed 1 markers to the kernel format" in res.stdout
    assert is_whiteout(other / "y")


# -- no reader waits on what a state directory holds ------------------------------------------


def test_a_fifo_for_a_state_file_hangs_none_of_the_tools(
    stack: Stack, mounted: Callable[..., UnionMount], tmp_path: Path
) -> None:
    """The owner of a mount's state directory puts a FIFO there under the state file's
    name: convert (which reads every mount's state) refuses at once, naming that mount
    and why, on a directory that has nothing to do with it; explain and trace refuse
    that mount, at once too."""
    write(stack.lowers[0] / "f", b"x")
    run_dir = tmp_path / "run"
    env = {state.RUNDIR_ENV: os.fspath(run_dir)}
    um = mounted(env=env)
    path = _published(run_dir, um)
    other = tmp_path / "other"
    write(other / ".wh.y", b"")
    with fifo_at(path):
        why = f"{path}: refused: not a regular file (a FIFO)"
        res = run("convert", "--to", "kernel", other, env=env, only=(um,))
        assert (res.returncode, res.stdout) == (2, ""), res.stdout + res.stderr
        # (The directory $UNIONFS_RUNTIME_DIR names, then root's usual one.)
        usual = f"no {state.ROOT_RUNDIR / path.name}"
        if not state.ROOT_RUNDIR.is_dir():
            usual = f"no directory {state.ROOT_RUNDIR}"
        assert res.stderr == unknown(um, f"{why}; {usual}")
        assert (other / ".wh.y").exists()
        res = run("explain", um.mountpoint / "f", env=env)
        assert res.returncode == 2 and why in res.stderr, res.stdout + res.stderr
        res = run("trace", um.mountpoint, env=env)
        assert res.returncode == 2 and "published no state" in res.stderr, res.stderr


def test_a_state_file_too_large_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Valid, the reader's own, and over 1 MiB: refused, saying its size."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.chmod(run_dir, 0o755)
    monkeypatch.setenv(state.RUNDIR_ENV, os.fspath(run_dir))
    device = "0:4246"  # no such mount: the reader trusts its own uid (root) only
    data = state.MountState(
        pid=os.getpid(), mountpoint="/nowhere", device=device, config={"lowers": ["/l"]}, ids={}
    )._asdict()
    path = run_dir / f"{device}.json"
    path.write_text(json.dumps(data) + " " * (1 << 20))
    os.chmod(path, 0o644)
    size = path.stat().st_size
    found, why = state.find_state(device)
    assert found is None
    assert reasons(why)[0] == (
        f"{path}: refused: {size} bytes, more than the 1048576 bytes a state file may have"
    )
    path.write_text(json.dumps(data))
    found, why = state.find_state(device)
    assert found is not None and found.config["lowers"] == ["/l"], why


def test_a_daemon_exits_though_a_fifo_took_its_state_files_place(
    stack: Stack, mounted: Callable[..., UnionMount], tmp_path: Path
) -> None:
    """At exit the daemon removes its state file only if it is still its own: a FIFO
    there is neither waited on nor removed."""
    run_dir = tmp_path / "run"
    um = mounted(env={state.RUNDIR_ENV: os.fspath(run_dir)})
    path = _published(run_dir, um)
    with fifo_at(path):
        assert um.unmount(timeout=20) == 0, um.log()
        assert stat.S_ISFIFO(os.lstat(path).st_mode)


def test_a_daemon_exits_leaving_a_state_file_not_its_own(
    stack: Stack, mounted: Callable[..., UnionMount], tmp_path: Path
) -> None:
    """Its own is removed; one of another pid in its place stays."""
    run_dir = tmp_path / "run"
    env = {state.RUNDIR_ENV: os.fspath(run_dir)}
    um = mounted(env=env)
    path = _published(run_dir, um)
    assert um.unmount(timeout=20) == 0, um.log()
    assert not path.exists()
    um = mounted(env=env)
    path = _published(run_dir, um)
    data = json.loads(path.read_text())
    data["pid"] = 1
    target = tmp_path / "target.json"
    target.write_text(json.dumps(data))
    os.replace(target, path)
    assert um.unmount(timeout=20) == 0, um.log()
    assert json.loads(path.read_text())["pid"] == 1


def test_a_new_daemon_is_not_held_up_by_a_fifo_of_another_mount(
    stack: Stack, mounted: Callable[..., UnionMount], tmp_path: Path
) -> None:
    """A new daemon sweeps what dead daemons left in its state directory: a FIFO in
    place of a live mount's state file is left as it is, not waited on."""
    run_dir = tmp_path / "run"
    env = {state.RUNDIR_ENV: os.fspath(run_dir)}
    um = mounted(env=env)
    path = _published(run_dir, um)
    second = tmp_path / "second"
    (second / "l").mkdir(parents=True)
    (second / "mnt").mkdir()
    write(second / "l" / "g", b"second")
    with fifo_at(path):
        um2 = start_unionfs([second / "l"], second / "mnt", env=env)
        try:
            _published(run_dir, um2)
            assert (second / "mnt" / "g").read_bytes() == b"second"
            assert stat.S_ISFIFO(os.lstat(path).st_mode)
            assert um2.unmount(timeout=20) == 0, um2.log()
        finally:
            um2.unmount(timeout=20)  # (a daemon stuck on the FIFO: killed)


def test_a_planted_non_socket_fails_trace_follow_fast(
    stack: Stack, mounted: Callable[..., UnionMount], tmp_path: Path
) -> None:
    """A FIFO or a file in place of the trace socket: connecting fails at once, and
    ``trace --follow`` says the mount has no trace socket (within its 3 s wait for a
    daemon that has just started), instead of waiting."""
    run_dir = tmp_path / "run"
    env = {state.RUNDIR_ENV: os.fspath(run_dir)}
    um = mounted(env=env)
    path = _published(run_dir, um)
    sock = path.with_suffix(".sock")
    assert json.loads(path.read_text())["socket"] == os.fspath(sock)
    for plant in ("fifo", "file"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        if plant == "fifo":
            os.mkfifo(sock, 0o600)
        else:
            sock.write_text("")
        try:
            started = time.monotonic()
            res = run("trace", "--follow", um.mountpoint, env=env)
            assert res.returncode == 2, res.stdout + res.stderr
            assert "has no trace socket" in res.stderr
            assert time.monotonic() - started < 15
        finally:
            os.unlink(sock)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda s: s["config"].update(lowers=5),
        lambda s: s["ids"]["uids"].update(ranges="x"),
        lambda s: s.update(ids=[]),
        lambda s: s.update(config="x"),
    ],
    ids=["lowers-a-number", "ranges-a-string", "ids-a-list", "config-a-string"],
)
def test_a_state_file_of_the_wrong_shape_is_unreadable_not_a_traceback(
    stack: Stack,
    mounted: Callable[..., UnionMount],
    tmp_path: Path,
    spoil: Callable[[dict[str, object]], None],
) -> None:
    """Valid JSON, every field there, one of the wrong kind: the tools say the state is
    unreadable (explain, and convert refuses as for any mount without a usable state);
    they stopped with a TypeError traceback."""
    import json

    write(stack.lowers[0] / "f", b"1")
    elsewhere = {state.RUNDIR_ENV: os.fspath(tmp_path / "elsewhere")}
    um = mounted(env=elsewhere)
    path = _published(tmp_path / "elsewhere", um)
    data = json.loads(path.read_text())
    spoil(data)
    tmp = path.with_name(".spoilt")
    tmp.write_text(json.dumps(data))
    tmp.chmod(0o644)
    os.replace(tmp, path)
    other = tmp_path / "other"
    write(other / ".wh.y", b"")
    res = run("explain", stack.mnt / "f", env=elsewhere, only=(um,))
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert "unreadable (not a mount state this unionfs writes)" in res.stderr, res.stderr
    res = run("convert", "--to", "kernel", other, env=elsewhere, only=(um,))
    assert "Traceback" not in res.stderr and res.returncode == 2, res.stderr
    assert "unreadable (not a mount state this unionfs writes)" in res.stderr, res.stderr
    assert (other / ".wh.y").exists()
