"""examples/puzzles.sh runs, and says what README.md's "Debugging overlay semantics" shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.mounting import REPO


def test_the_three_puzzles(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PUZZLES_DIR=os.fspath(tmp_path / "puzzles"),
        PUZZLES_BIG_MIB="4",
        PYTHONPATH=os.fspath(REPO),
    )
    res = subprocess.run(
        ["bash", "examples/puzzles.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    one, two, three = res.stdout.split("=== ")[1:]
    assert "not visible: hidden by a whiteout in the upper (kernel format" in one
    assert (
        "2 lower  p1/base   regular file, 16 B      not looked at: hidden by the upper's whiteout"
        in one
    )
    assert "a regular file from layer 1: the topmost layer that has the name" in one
    assert "rename to usr/share/doc.old: fails with EXDEV (an overlay rule)" in two
    assert "mv falls back to copying the tree (203 entries, 1,500 bytes)" in two
    assert "refused EXDEV on usr/share/doc (a directory with lower parts" in two
    assert "204  whiteout created" in two
    assert "copy-up total: 4,194,304 bytes" in three
    assert "16.0 MiB        8 x  chmod" in three
    assert "(chmod), 4,194,304 bytes by " in three
    assert "hidden by higher layers: 16,777,226 bytes (16.0 MiB) in 5 files" in three
    assert not (tmp_path / "puzzles" / "p3" / "merged").is_mount()
