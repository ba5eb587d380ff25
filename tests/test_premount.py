"""The mount made before the libraries load (``unionfs.fuse.premount``): the same
mount as libfuse's, served as soon as the daemon is, and gone after it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.mounting import REPO, _mountinfo, mount_type, start_unionfs, unionfs_command
from tests.test_merge import write
from unionfs.fuse import premount, state
from unionfs.records import to_json

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) needs root; see tests/user")


def _options_seen(stack: Stack, options: str, premounting: bool) -> tuple[bytes, ...]:
    """Mount options, type, source and super options of a mount made one way or the other."""
    env = {premount.DISABLE_ENV: "0" if premounting else "1"}
    um = stack.mount(extra_options=options, env=env) if options else stack.mount(env=env)
    try:
        assert (stack.mnt / "f").read_text() == "lower"  # and it is served
        fields = _mountinfo(stack.mnt)
        assert fields is not None
        dash = fields.index(b"-")
        return (fields[5], *fields[dash + 1 :])
    finally:
        assert um.unmount() == 0
        assert mount_type(stack.mnt) is None


def _stop(pid: int, mnt: Path) -> None:
    """SIGTERM the daemon, then wait (30 s at most) for its mount to go."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while mount_type(mnt) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mount_type(mnt) is None


def _mount_as_daemon(stack: Stack, python_flags: tuple[str, ...] = ()) -> int:
    """Run the mount command in its daemon mode (it returns once the mount is ready);
    the daemon's pid."""
    return _run_as_daemon(stack, python_flags)[0]


def _run_as_daemon(
    stack: Stack, python_flags: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> tuple[int, str]:
    """``_mount_as_daemon``, and what the command wrote to stderr; *env* adds to the
    environment."""
    lowers = ":".join(os.fspath(p) for p in stack.lowers)
    opts = f"lowerdir={lowers},upperdir={stack.upper},workdir={stack.work}"
    python, *rest = unionfs_command()
    res = subprocess.run(
        [python, *python_flags, *rest, "-o", opts, os.fspath(stack.mnt)],
        env=dict(os.environ, PYTHONPATH=os.fspath(REPO), **(env or {})),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    out = subprocess.run(["pgrep", "-f", f"upperdir={stack.upper},"], capture_output=True)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1, out
    return pids[0], res.stderr


@pytest.mark.parametrize(
    "options",
    ["", "ro", "noexec,nosuid,nodev", "sync,dirsync,noatime", "allow_root"],
)
def test_the_premount_is_the_mount_libfuse_makes(stack: Stack, options: str) -> None:
    write(stack.lowers[0] / "f", b"lower")
    premounted = _options_seen(stack, options, premounting=True)
    by_libfuse = _options_seen(stack, options, premounting=False)
    assert premounted == by_libfuse
    # Not the same by accident: the options asked for are there.
    for flag in ("ro", "noexec", "nosuid", "nodev", "sync", "dirsync", "noatime"):
        if flag in options.split(","):
            shown = premounted[0].split(b",") + premounted[-1].split(b",")  # mount, super
            assert flag.encode() in shown, (flag, premounted)


def test_mount_options_follow_libfuse_defaults() -> None:
    source, fstype, flags, kernel = premount.arguments(
        {"fsname=unionfs", "subtype=unionfs", "default_permissions", "allow_other", "suid"}
    )
    assert (source, fstype, kernel) == (
        b"unionfs",
        b"fuse.unionfs",
        "allow_other,default_permissions",
    )
    assert flags == 4  # nodev only: libfuse starts from nosuid,nodev, and suid was asked for


def test_the_daemon_returns_before_it_serves_and_a_first_access_waits(
    stack: Stack, tmp_path: Path
) -> None:
    """The command returns once the mount exists; whatever touches it first waits for
    the daemon (no error, no empty directory); SIGTERM then removes the mount."""
    (stack.lowers[0] / "d").mkdir()
    write(stack.lowers[0] / "d/f", b"lower")
    pid: int | None = _mount_as_daemon(stack)
    try:
        assert mount_type(stack.mnt) == "fuse.unionfs"
        assert (stack.mnt / "d/f").read_text() == "lower"
        assert pid is not None
        _stop(pid, stack.mnt)
        pid = None
    finally:
        if mount_type(stack.mnt) is not None:
            subprocess.run(["umount", "-l", os.fspath(stack.mnt)], check=False)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("premounting", [True, False])
def test_access_time_options_libfuse_refuses_are_mount_flags_only(
    stack: Stack, premounting: bool
) -> None:
    """relatime, strictatime, diratime, nodiratime and atime are accepted (fuse-overlayfs
    users pass them) but never handed to libfuse, whose parser refuses some of them in
    each version: the premount sets them as mount flags; libfuse's own mount drops them."""
    write(stack.lowers[0] / "f", b"lower")
    seen = _options_seen(stack, "strictatime,nodiratime", premounting)
    per_mount = seen[0].split(b",")
    assert (b"nodiratime" in per_mount) is premounting
    assert (b"relatime" not in per_mount) is premounting  # strictatime: no relatime


def test_a_stop_signal_while_the_daemon_loads_unmounts_cleanly(stack: Stack) -> None:
    """The command returns before the daemon has loaded its libraries; a SIGTERM sent
    right then is held until the mount serves, and then unmounts it (no dead mount)."""
    write(stack.lowers[0] / "f", b"lower")
    pid = _mount_as_daemon(stack)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while mount_type(stack.mnt) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert mount_type(stack.mnt) is None
        assert not (stack.mnt / "f").exists()  # the bare mountpoint: no dead mount
    finally:
        if mount_type(stack.mnt) is not None:
            subprocess.run(["umount", "-l", os.fspath(stack.mnt)], check=False)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# Costly to import, and not needed until the daemon serves (trio needs some of them
# then): the command loads none of them before it says the mount is ready.
LATER = (
    "argparse",
    "logging",
    "dataclasses",
    "inspect",
    "ast",
    "tokenize",
    "gettext",
    "typing",
    "json",
)


@pytest.mark.parametrize("others", ["alone", "another mount live"])
def test_the_mount_is_ready_before_the_costly_modules_load(
    stack: Stack, tmp_path: Path, others: str
) -> None:
    """What the daemon-mode command imports before it returns, as ``-X importtime``
    reports it (the daemon's stderr is the caller's until the mount is ready): none
    of ``LATER``; then the mount serves, and the daemon has loaded them after all.
    Also with another unionfs mount live, whose state file the new one reads."""
    write(stack.lowers[0] / "f", b"lower")
    with contextlib.ExitStack() as cleanup:
        if others != "alone":
            cleanup.enter_context(_another_mount(tmp_path / "other"))
        try:
            _check_imports(stack)
        finally:
            if mount_type(stack.mnt) is not None:
                subprocess.run(["umount", "-l", os.fspath(stack.mnt)], check=False)


@contextlib.contextmanager
def _another_mount(root: Path) -> Iterator[None]:
    """A unionfs mount, live (its state file written) until the end of the block."""
    dirs = [root / n for n in ("l", "u", "w", "mnt")]
    for d in dirs:
        d.mkdir(parents=True)
    um = start_unionfs([dirs[0]], dirs[3], dirs[1], dirs[2])
    try:
        device = state.device_of(dirs[3])
        deadline = time.monotonic() + 30
        while device is None or not state.state_path(device).exists():
            assert time.monotonic() < deadline, "the other mount published no state"
            time.sleep(0.02)
        yield
    finally:
        um.unmount()


def _check_imports(stack: Stack) -> None:
    pid: int | None = None
    try:
        # The premount's path (make test also runs the suite with it off: then libfuse
        # mounts, after the libraries have loaded).
        pid, stderr = _run_as_daemon(stack, ("-X", "importtime"), {premount.DISABLE_ENV: "0"})
        before = {line.rpartition("|")[2].strip() for line in stderr.splitlines()}
        assert "unionfs.fuse.premount" in before  # it did report the command's imports
        assert not before & set(LATER), sorted(before & set(LATER))
        assert (stack.mnt / "f").read_text() == "lower"
        loaded = Path(f"/proc/{pid}/maps").read_text()
        assert "pyfuse3" in loaded  # serving: the libraries are loaded now
        _stop(pid, stack.mnt)
        pid = None
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


def test_the_pid_read_from_a_state_file_without_json_is_the_pid_written() -> None:
    """The sweep before ready reads a live mount's pid without json (``_pid_of``): from
    what ``publish`` writes, whatever the strings after it hold; nothing from a file
    that does not start with the pid."""
    written = state.MountState(
        pid=4321,
        mountpoint='/m,"pid":1',
        device="0:99",
        config={"upper": "/u"},
        ids={},
    )
    data = to_json(written._asdict()).encode()
    assert state._pid_of(data) == 4321
    assert json.loads(data)["pid"] == 4321
    for other in (b"", b"{}", b'{"mountpoint":"/m","pid":1}', b'{"pid":"1"}', b'{"pid":-1,'):
        assert state._pid_of(other) is None, other
