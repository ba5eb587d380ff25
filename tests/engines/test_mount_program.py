"""The contract between containers-storage (podman 4.3) and its mount_program.

containers-storage runs ``<program> -o <options> <mountpoint>`` with cwd set
to ``<graphroot>/overlay``, stdout on /dev/null and stderr on a pipe that it
reads to the end (Go's ``exec.Cmd.Run`` with a ``bytes.Buffer``): the program
must return only once the mount is visible, and the daemon it leaves behind
must not keep that pipe open, or podman waits for it.  Unmounting is
``fusermount3 -u <mountpoint>`` (falling back to a lazy umount); the daemon
is expected to exit on its own then.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
from pathlib import Path

from tests.engines.conftest import (
    BASE_IMAGE,
    DAEMON_EXIT_SECONDS,
    Store,
    alive,
    fresh_dir,
    mount_options,
    processes_mentioning,
    write_wrapper,
)
from tests.mounting import lazy_unmount, mount_type

HOLD_SECONDS = 3


def test_podman_waits_for_stderr_eof(fuse_store: Store) -> None:
    """Documents podman's side: it blocks until the program's stderr pipe closes.

    A wrapper leaves a child holding the inherited stderr for HOLD_SECONDS;
    `podman run` then takes at least that long, so a daemon that kept stderr
    open for its lifetime would hang podman forever.
    """
    hold_log = fuse_store.root / "hold-argv.jsonl"
    prelude = (
        "import subprocess\n"
        f"subprocess.Popen(['sleep', '{HOLD_SECONDS}'], stdin=subprocess.DEVNULL,"
        " stdout=subprocess.DEVNULL)  # inherits fd 2, podman's stderr pipe"
    )
    wrapper = write_wrapper(
        fuse_store.root / "hold-program", hold_log, _real_program(fuse_store), prelude
    )
    conf = fuse_store.root / "storage-hold.conf"
    conf.write_text(
        fuse_store.storage_conf.read_text().replace(str(fuse_store.mount_program), str(wrapper))
    )
    holding = dataclasses.replace(
        fuse_store, env={**fuse_store.env, "CONTAINERS_STORAGE_CONF": str(conf)}
    )

    start = time.monotonic()
    fuse_store.podman("run", "--rm", BASE_IMAGE, "true")
    plain = time.monotonic() - start
    start = time.monotonic()
    holding.podman("run", "--rm", BASE_IMAGE, "true", timeout=60)
    held = time.monotonic() - start
    print(f"podman run --rm: {plain:.2f}s normally, {held:.2f}s with stderr held")
    assert held >= HOLD_SECONDS, (plain, held)


def _real_program(store: Store) -> Path:
    """The program the store's logging wrapper execs."""
    text = store.mount_program.read_text() if store.mount_program else ""
    m = re.search(r"os\.execv\('([^']+)'", text)
    assert m, "wrapper without exec"
    return Path(m.group(1))


def test_program_returns_once_mounted_and_closes_stderr(
    mount_program: Path, engines_dir: Path
) -> None:
    """Invoked exactly like containers-storage does, the program returns promptly
    (stderr reaches EOF), the mount is there when it returns, and the daemon
    exits after `fusermount3 -u`."""
    base = fresh_dir(engines_dir, "direct")
    dirs = {n: base / n for n in ("l/LOWER1", "l/LOWER2", "id/diff", "id/work", "id/merged")}
    for d in dirs.values():
        d.mkdir(parents=True)
    (dirs["l/LOWER2"] / "bottom").write_text("bottom\n")
    (dirs["l/LOWER1"] / "top").write_text("top\n")
    lowers = f"{dirs['l/LOWER1']}:{dirs['l/LOWER2']}"
    # The shape podman 4.3 uses for a `--rm` container: mountopt prefix,
    # absolute lowers, an empty field before `volatile`.
    opts = (
        f"nodev,allow_other,lowerdir={lowers},upperdir={dirs['id/diff']},"
        f"workdir={dirs['id/work']},,volatile"
    )
    merged = dirs["id/merged"]
    proc = subprocess.Popen(
        [str(mount_program), "-o", opts, str(merged)],
        cwd=base,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            # The program itself may have exited; then a daemon holds stderr.
            raise AssertionError(
                f"stderr still open 60s after start (program exit status {proc.poll()}); "
                f"podman would hang; mounted: {mount_type(merged)}"
            ) from None
        assert proc.returncode == 0, err.decode(errors="replace")
        assert (mount_type(merged) or "").startswith("fuse"), mount_type(merged)
        print(f"mount options: {mount_options(merged)}; stderr: {err!r}")
        assert sorted(os.listdir(merged)) == ["bottom", "top"]
        (merged / "new").write_text("new\n")
        assert (dirs["id/diff"] / "new").read_text() == "new\n"
        daemons = [
            pid
            for pid, argv in processes_mentioning(str(merged)).items()
            if any("lowerdir=" in a for a in argv)
        ]
        res = subprocess.run(["fusermount3", "-u", str(merged)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        deadline = time.monotonic() + DAEMON_EXIT_SECONDS
        while time.monotonic() < deadline and any(alive(p) for p in daemons):
            time.sleep(0.1)
        running = [p for p in daemons if alive(p)]
        assert not running, (
            f"daemon(s) {running} still running {DAEMON_EXIT_SECONDS}s after fusermount3 -u"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mount_type(merged) is not None:
            lazy_unmount(merged)
