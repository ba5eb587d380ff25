"""The core real-mount tests, run inside a podman container whose root is an overlay.

``examples/ci-container.sh`` assembles the container (the host's /usr and
Python, this checkout, all read-only; upper and work dirs on a tmpfs) and runs
the core tests plus ``overlay_root_checks.py`` in it. Here it runs with this
session's private podman configuration: the whole subset with the minimal flags
it shows, and a short part of it with ``--privileged`` (which grants more);
every collected test must pass.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.engines.conftest import REPO, Store

SCRIPT = REPO / "examples" / "ci-container.sh"


def _subset() -> list[str]:
    """The test files the script runs, as written in it."""
    text = SCRIPT.read_text()
    block = text[text.index("tests=(") : text.index(")", text.index("tests=("))]
    return re.findall(r"tests/\S+\.py", block)


def _collected(files: list[str]) -> int:
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", *files],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    m = re.search(r"^(\d+) tests? collected", res.stdout, re.M)
    assert m, res.stdout + res.stderr
    return int(m.group(1))


QUICK = ["tests/engines/overlay_root_checks.py", "tests/test_merge.py"]


@pytest.mark.parametrize("flags", ["minimal", "--privileged"])
def test_core_tests_pass_in_a_container(native_store: Store, flags: str) -> None:
    files = _subset()
    assert "tests/engines/overlay_root_checks.py" in files and len(files) >= 5, files
    if flags != "minimal":
        files = QUICK
    expected = _collected(files)
    env = dict(native_store.env)
    if flags != "minimal":
        env["CI_CONTAINER_FLAGS"] = flags
    else:
        env.pop("CI_CONTAINER_FLAGS", None)
    res = subprocess.run(
        ["bash", str(SCRIPT), *(files if flags != "minimal" else [])],
        env=env,
        cwd=native_store.root,
        capture_output=True,
        text=True,
        timeout=1200,
        stdin=subprocess.DEVNULL,
    )
    out = f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "root filesystem: overlayfs, /scratch: tmpfs" in res.stdout, out
    if flags == "minimal":
        assert "--device /dev/fuse --cap-add SYS_ADMIN" in res.stderr, out  # the set -x line
        assert "--privileged" not in res.stderr, out
    # The summary line names every outcome; only "passed" may appear.
    summary = res.stdout.strip().splitlines()[-1]
    assert res.returncode == 0, out
    assert re.fullmatch(rf"{expected} passed in [\d.]+s( \([\d:]+\))?", summary), out
    print(f"{flags}: {summary}")
    # The script's skeleton root went to TMPDIR (the store's) and is gone.
    assert not list((native_store.root / "tmp").glob("ci-container.*"))
