"""explain and trace on real mounts: a live mount's layers, its predictions, its events."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack
from tests.mounting import REPO, UnionMount, faulty_command, kernel_overlay, unionfs_command
from tests.unit.conftest import is_whiteout, write
from unionfs.fuse import premount, state


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    return subprocess.run(
        [*unionfs_command(), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def explain_json(*args: str) -> dict[str, Any]:
    res = run("explain", *args, "--json")
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def events(path: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in records(path) if r["event"] == kind]


# -- explain on a live mount ----------------------------------------------------------


def test_explain_finds_a_live_mounts_layers(
    stack: Stack, mounted: Callable[..., UnionMount]
) -> None:
    write(stack.lowers[1] / "d" / "f", b"below")
    write(stack.lowers[0] / "d" / "g", b"above")
    um = mounted()
    out = explain_json(os.fspath(um.mountpoint / "d" / "f"))
    assert (out["visible"], out["type"], out["layer"]) == (True, "regular file", 2)
    assert out["mount"] == os.fspath(stack.mnt)
    assert [r["root"] for r in out["layers"]] == [
        os.fspath(p) for p in (stack.upper, *stack.lowers)
    ]
    assert out["mount_disagrees"] == []
    d = explain_json(os.fspath(um.mountpoint / "d"))
    assert d["merge"] == [1, 2] and d["entries"] == {"1": 1, "2": 1}
    # A relative path from inside the mount works the same.
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    res = subprocess.run(
        [*unionfs_command(), "explain", "f", "--json"],
        cwd=um.mountpoint / "d",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert json.loads(res.stdout)["path"] == "d/f"


def test_the_state_file_goes_with_the_mount(
    stack: Stack, mounted: Callable[..., UnionMount]
) -> None:
    um = mounted()
    device = state.device_of(um.mountpoint)
    assert device is not None
    path = state.state_path(device)
    deadline = time.monotonic() + 10  # published once the daemon serves requests
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    published = json.loads(path.read_text())
    assert published["pid"] == um.pid
    assert published["config"]["upper"] == os.fspath(stack.upper)
    assert um.unmount() == 0
    # Gone, or already another mount's: the device number is free for the next FUSE
    # mount on this machine the moment this one ends (another test run, say).
    with contextlib.suppress(FileNotFoundError):
        assert json.loads(path.read_text())["mountpoint"] != os.fspath(um.mountpoint)
    if state.socket_path(device).exists():
        assert state.read_state(device) is not None  # a live mount's socket


@pytest.mark.parametrize(
    ("where", "premounting"),
    [("mnt", True), ("mnt", False), ("upper", True), ("l2", False)],
    ids=["mountpoint-premount", "mountpoint-libfuse", "upper", "lower"],
)
def test_a_runtime_directory_in_the_mount_or_a_layer_is_not_written_to(
    stack: Stack, mounted: Callable[..., UnionMount], where: str, premounting: bool
) -> None:
    """The state would be written through the mount before the daemon serves it (the
    daemon waiting on itself: a hung mount), or into a layer (changing what it shows).
    It is not published; the mount serves, says why, and no layer changes."""
    write(stack.lowers[0] / "f", b"lower")
    place = stack.root / where
    kind = {"mnt": "mountpoint", "upper": "upperdir", "l2": "lowerdir"}[where]
    env = {
        state.RUNDIR_ENV: os.fspath(place / "run"),
        premount.DISABLE_ENV: "0" if premounting else "1",
    }
    um = mounted(env=env)
    # In a child with a timeout: were the daemon stuck, this is what would hang.
    got = subprocess.run(["cat", os.fspath(stack.mnt / "f")], capture_output=True, timeout=30)
    assert got.stdout == b"lower", got.stderr
    assert not (stack.mnt / "run").exists()
    assert f"the runtime directory {place / 'run'} is inside the {kind} {place}" in um.log()
    assert um.unmount() == 0
    for layer in [stack.upper, *stack.lowers, stack.mnt]:
        assert not (layer / "run").exists()


def test_a_runtime_directory_on_another_filesystem_inside_a_layer_is_used(
    stack: Stack, mounted: Callable[..., UnionMount]
) -> None:
    """A filesystem mounted inside a layer is not part of it: a runtime directory there
    is written to as anywhere else (the check above goes by filesystem, not by path)."""
    elsewhere = stack.lowers[1] / "rt"
    elsewhere.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", os.fspath(elsewhere)], check=True)
    try:
        um = mounted(env={state.RUNDIR_ENV: os.fspath(elsewhere / "run")})
        device = state.device_of(um.mountpoint)
        assert device is not None
        path = elsewhere / "run" / f"{device}.json"
        deadline = time.monotonic() + 10  # published once the daemon serves requests
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert json.loads(path.read_text())["pid"] == um.pid
        assert "runtime directory" not in um.log()
        assert um.unmount() == 0
    finally:
        subprocess.run(["umount", "-l", os.fspath(elsewhere)], check=False)


def _errno_of(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as e:
        return "EOPNOTSUPP" if e.errno == errno.EOPNOTSUPP else errno.errorcode[e.errno or 0]
    return "ok"


def test_predictions_are_what_the_mount_then_does(
    stack: Stack, mounted: Callable[..., UnionMount]
) -> None:
    """Each change is predicted on the live mount, then made through it: same outcome."""
    write(stack.lowers[0] / "m" / "a")
    write(stack.lowers[1] / "m" / "b")
    write(stack.lowers[1] / "f", b"0123456789")
    write(stack.lowers[1] / "ld" / "x")
    um = mounted()
    mnt = um.mountpoint

    def create(p: Path) -> None:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))

    cases: list[tuple[list[str], Callable[[], object]]] = [
        (["m", "--op", "rename", "--to", f"{mnt}/m2"], lambda: os.rename(mnt / "m", mnt / "m2")),
        (["f", "--op", "rename", "--to", f"{mnt}/g"], lambda: os.rename(mnt / "f", mnt / "g")),
        (["up", "--op", "mkdir"], lambda: os.mkdir(mnt / "up")),
        (["up", "--op", "rename", "--to", f"{mnt}/m/up"], lambda: os.rename(mnt / "up", mnt / "m/up")),
        ([".wh.x", "--op", "create"], lambda: create(mnt / ".wh.x")),
        (["m", "--op", "mkdir"], lambda: os.mkdir(mnt / "m")),
        (["m", "--op", "rmdir"], lambda: os.rmdir(mnt / "m")),
        (["ld/x", "--op", "unlink"], lambda: os.unlink(mnt / "ld/x")),
        (["ld", "--op", "rmdir"], lambda: os.rmdir(mnt / "ld")),
        (["ld", "--op", "mkdir"], lambda: os.mkdir(mnt / "ld")),
        (["g", "--op", "setxattr", "--xattr", "trusted.overlay.opaque"],
         lambda: os.setxattr(mnt / "g", b"trusted.overlay.opaque", b"y")),
        (["m/a", "--op", "link", "--to", f"{mnt}/m/a2"], lambda: os.link(mnt / "m/a", mnt / "m/a2")),
    ]  # fmt: skip
    for args, action in cases:
        predicted = explain_json(os.fspath(mnt / args[0]), *args[1:])["prediction"]
        actual = _errno_of(action)
        assert predicted["result"] == actual, (args, predicted)
    # What the predictions said would be left behind, is.
    assert is_whiteout(stack.upper / "f")
    assert os.getxattr(stack.upper / "m" / "up", b"trusted.overlay.opaque") == b"y"
    assert os.getxattr(stack.upper / "ld", b"trusted.overlay.opaque") == b"y"


def test_a_kernel_copy_up_is_known_by_its_origin(tmp_path: Path) -> None:
    lower, upper, work, mnt = (tmp_path / n for n in ("l", "u", "w", "m"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    write(lower / "d" / "f", b"data")
    with kernel_overlay([lower], mnt, upper, work):
        os.chmod(mnt / "d" / "f", 0o600)
    out = explain_json("-o", f"lowerdir={lower},upperdir={upper}", "d/f")
    assert out["copy_up"]["known"] == "origin"
    assert out["copy_up"]["from"] == 1
    assert "a copy-up of layer 1's regular file" in out["copy_up"]["note"]
    markers = {m["detail"].split("=")[0] for m in out["layers"][0]["markers"]}
    assert "trusted.overlay.origin" in markers


# -- tracing ------------------------------------------------------------------------------


def test_the_trace_records_each_decision_with_its_caller(
    stack: Stack, mounted: Callable[..., UnionMount], tmp_path: Path
) -> None:
    write(stack.lowers[1] / "f", b"0123456789")
    write(stack.lowers[1] / "gone")
    write(stack.lowers[0] / "m" / "a")
    write(stack.lowers[1] / "m" / "b")
    trace = tmp_path / "trace.jsonl"
    um = mounted(extra_options=f"trace={trace}")
    mnt = um.mountpoint
    chmod = subprocess.Popen(["chmod", "600", mnt / "f"])
    assert chmod.wait() == 0
    os.unlink(mnt / "gone")
    os.mkdir(mnt / "gone")
    with pytest.raises(OSError) as exdev:
        os.rename(mnt / "m", mnt / "m2")
    assert exdev.value.errno == errno.EXDEV
    with pytest.raises(OSError):
        os.mkdir(mnt / ".wh.x")
    assert um.unmount() == 0

    first, last = records(trace)[0], records(trace)[-1]
    assert first["event"] == "trace-start" and first["daemon"] == um.pid
    assert [la["path"] for la in first["layers"]] == [
        os.fspath(p) for p in (stack.upper, *stack.lowers)
    ]
    assert last["event"] == "trace-end" and last["dropped"] == 0
    (copy,) = events(trace, "copy-up")
    assert (copy["path"], copy["layer"], copy["bytes"], copy["request"]) == ("f", 2, 10, "chmod")
    assert (copy["pid"], copy["uid"]) == (chmod.pid, os.getuid())
    assert copy["method"] in ("reflink", "copy_file_range", "read/write")
    assert copy["duration_s"] >= 0
    whiteouts = [(r["path"], r["outcome"], r["request"]) for r in events(trace, "whiteout")]
    assert whiteouts == [("gone", "created", "unlink"), ("gone", "removed", "mkdir")]
    (opq,) = events(trace, "opaque")
    assert (opq["path"], opq["why"]) == ("gone", "a directory made over a whiteout")
    refused = [(r["path"], r["errno"], r["request"]) for r in events(trace, "refused")]
    assert refused == [("m", "EXDEV", "rename"), (".wh.x", "EINVAL", "mkdir")]
    assert "without redirect_dir" in events(trace, "refused")[0]["why"]


def test_privilege_bits_dropped_are_recorded(
    stack: Stack, mounted: Callable[..., UnionMount], tmp_path: Path
) -> None:
    write(stack.lowers[1] / "suid")
    os.chmod(stack.lowers[1] / "suid", 0o4755)
    trace = tmp_path / "trace.jsonl"
    um = mounted(extra_options=f"trace={trace}")
    os.chown(um.mountpoint / "suid", 1000, 1000)
    assert um.unmount() == 0
    (dropped,) = events(trace, "privilege-dropped")
    assert (dropped["path"], dropped["bits"], dropped["why"]) == ("suid", "setuid", "chown")


def test_privilege_bits_a_chown_in_the_upper_layer_drops_are_recorded(
    stack: Stack, mounted: Callable[..., UnionMount], tmp_path: Path
) -> None:
    """A chown of a file already in the upper layer needs no copy-up, and untraced the
    C hook answers it (csrc/opens.c); traced, the daemon does, and records the drop."""
    trace = tmp_path / "trace.jsonl"
    um = mounted(extra_options=f"trace={trace}")
    write(um.mountpoint / "suid")
    os.chmod(um.mountpoint / "suid", 0o4755)
    os.stat(um.mountpoint / "suid")  # its attributes given: armed, were it untraced
    os.chown(um.mountpoint / "suid", 1000, 1000)
    assert um.unmount() == 0
    (dropped,) = events(trace, "privilege-dropped")
    assert (dropped["path"], dropped["bits"], dropped["why"]) == ("suid", "setuid", "chown")


def test_layer_errors_are_recorded(stack: Stack, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    um = stack.mount(extra_options=f"trace={trace}", command=faulty_command("eio=bad"))
    try:
        with pytest.raises(OSError) as e:
            os.stat(um.mountpoint / "bad")
        assert e.value.errno == errno.EIO
    finally:
        assert um.unmount() == 0
    (err,) = events(trace, "layer-error")
    assert (err["path"], err["errno"], err["request"]) == ("bad", "EIO", "lookup")


def test_a_full_trace_drops_and_counts(stack: Stack, tmp_path: Path) -> None:
    """With no room in the buffer every event is dropped, and each one is counted."""
    for i in range(40):
        write(stack.lowers[1] / f"f{i}")
    trace = tmp_path / "trace.jsonl"
    um = stack.mount(extra_options=f"trace={trace}", command=faulty_command("trace_capacity=0"))
    try:
        for i in range(40):
            os.unlink(um.mountpoint / f"f{i}")
    finally:
        assert um.unmount() == 0
    recs = records(trace)
    assert not [r for r in recs if r["event"] == "whiteout"]
    assert sum(r["count"] for r in recs if r["event"] == "dropped") == 40
    assert recs[-1] == {**recs[-1], "event": "trace-end", "dropped": 40}


def test_a_stalled_trace_file_never_blocks_the_mount(stack: Stack, tmp_path: Path) -> None:
    """The trace goes to a pipe nobody reads while the mount works: every request
    completes; what the pipe could not take yet arrives once it is read."""
    n = 1500
    for i in range(n):
        write(stack.lowers[1] / f"f{i}")
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    um = stack.mount(extra_options=f"trace={fifo}")
    got = bytearray()
    drain = threading.Thread(target=_drain, args=(reader, got))
    try:
        for i in range(n):
            os.unlink(um.mountpoint / f"f{i}")
        # More than a pipe holds was traced: the writer is stuck, the mount is not.
        assert os.listdir(um.mountpoint) == []
    finally:
        drain.start()
        assert um.unmount() == 0
        drain.join(timeout=30)
        os.close(reader)
    lines = [json.loads(line) for line in got.decode().splitlines()]
    assert len([r for r in lines if r["event"] == "whiteout"]) == n
    assert lines[-1]["event"] == "trace-end"


def _drain(fd: int, out: bytearray) -> None:
    os.set_blocking(fd, True)
    while chunk := os.read(fd, 1 << 16):
        out += chunk


def test_trace_shows_a_mounts_file_readably_and_sums_it_up(
    stack: Stack, mounted: Callable[..., UnionMount], tmp_path: Path
) -> None:
    write(stack.lowers[1] / "big", b"x" * 5000)
    trace = tmp_path / "trace.jsonl"
    um = mounted(extra_options=f"trace={trace}")
    os.chmod(um.mountpoint / "big", 0o600)
    deadline = time.monotonic() + 10  # the daemon flushes its events every 0.1 s
    while '"copy-up"' not in trace.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    res = run("trace", os.fspath(um.mountpoint))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "trace of " + os.fspath(um.mountpoint) in lines[0]
    assert lines[1].endswith(
        "copy-up big from layer 2: 5,000 bytes by " + lines[1].split(" by ")[1]
    )
    assert "[chmod pid " in lines[1]
    summary = run("trace", os.fspath(trace), "--summary").stdout
    assert "copy-up: 4.9 KiB in 1 copy-ups, by request:" in summary
    assert run("trace", os.fspath(trace), "--json").stdout.splitlines()[1].startswith("{")


def test_trace_follow_tails_a_mount_without_a_trace_file(
    stack: Stack, mounted: Callable[..., UnionMount]
) -> None:
    write(stack.lowers[1] / "f")
    um = mounted()
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    follow = subprocess.Popen(
        [*unionfs_command(), "trace", os.fspath(um.mountpoint), "--follow", "--json"],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert follow.stdout is not None
        header = json.loads(follow.stdout.readline())  # connected: the header comes first
        assert header["event"] == "trace-start"
        os.unlink(um.mountpoint / "f")
        event = json.loads(follow.stdout.readline())
        assert (event["event"], event["path"], event["outcome"]) == ("whiteout", "f", "created")
        # Without a trace file, trace without --follow says how to watch.
        res = run("trace", os.fspath(um.mountpoint))
        assert res.returncode == 2 and "use --follow" in res.stderr
    finally:
        um.unmount()
        with contextlib.suppress(subprocess.TimeoutExpired):
            follow.wait(timeout=10)
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0  # the mount went away: the stream ended


@pytest.mark.parametrize(
    "where, message",
    [
        ("mnt/t", "is inside mountpoint"),
        ("l1/t", "is inside lowerdir"),
        ("nodir/t", "no such directory"),
    ],
)
def test_a_trace_file_where_it_cannot_be_is_refused(stack: Stack, where: str, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        stack.mount(extra_options=f"trace={stack.root / where}")
