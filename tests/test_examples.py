"""The examples run as the README says."""

from __future__ import annotations

import subprocess
import sys

from tests.mounting import REPO


def test_make_demo_script_shows_copy_up_and_whiteout() -> None:
    r = subprocess.run(
        [sys.executable, "examples/demo.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    upper_part = r.stdout.split("== upper layer")[1]
    assert "bin/hello  <- whiteout (char 0/0)" in upper_part
    assert "etc/os-release  (35 bytes)" in upper_part
    assert "demo-run/merged" not in open("/proc/self/mounts").read()
