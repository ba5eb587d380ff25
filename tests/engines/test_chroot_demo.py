"""examples/chroot-demo.sh: a busybox layer stack entered with unshare + chroot."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.engines.conftest import BUSYBOX, REPO, _is_static

DEMO = REPO / "examples" / "chroot-demo.sh"


def _demo_mounts() -> list[str]:
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return [line for line in f if "/chroot-demo." in line]


def test_chroot_demo(mount_program: object) -> None:
    if not (BUSYBOX.is_file() and _is_static(BUSYBOX)):
        pytest.skip("busybox-static is not installed (bash tests/engines/install-deps.sh)")
    before = _demo_mounts()
    env = {**os.environ, "UNIONFS": str(mount_program)}
    res = subprocess.run(
        ["bash", str(DEMO)], capture_output=True, text=True, timeout=120, env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    out = res.stdout
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{out}\nstderr:\n{res.stderr}"
    for expected in (
        "motd: app layer (hides the base motd)",
        "hello from demo-container as root",
        "vi deleted by the whiteout",
        "/var/log: README",  # the opaque dir hides the base layer's log dir
        "after changes: /etc has group motd.renamed passwd",
        "./etc/motd  [whiteout]",
        "./root/new-file  [file]",
        "./var/log  [dir] (opaque)",
        "lower 1-app still has hello.sh: yes",
        "unmounted; demo done",
    ):
        assert expected in out, f"{expected!r} missing from:\n{out}\nstderr:\n{res.stderr}"
    # Fewer than a handful of processes: the PID namespace is the demo's own.
    assert "processes in this PID namespace: " in out
    assert _demo_mounts() == before
