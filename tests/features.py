"""What this install is expected to offer, so that a missing feature fails a test.

FUSE passthrough and KILLPRIV_V2 need libfuse >= 3.17, which ``make install``
builds (``tools/venv.sh``); with the system's libfuse 3.14 (``LIBFUSE=system``,
or the fallback when the build failed) the daemon works without them. A test
must not quietly accept the fallback where the build was asked for: CI would
then pass without ever exercising passthrough. So the expectation is what was
*asked* for (``.venv/libfuse.json``), or ``UNIONFS_EXPECT_PASSTHROUGH=1|0``
when set (``make test`` sets it); with the C hook disabled there is neither.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path


def hook_enabled() -> bool:
    return os.environ.get("UNIONFS_NO_HOOK", "") in ("", "0")


@functools.cache
def libfuse_version() -> int:
    """The libfuse the C hook runs with (317 for 3.17), 0 without the hook."""
    if not hook_enabled():
        return 0
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "from unionfs.fuse import _fusehook as h; print(h.libfuse_version())",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return int(res.stdout.strip() or 0) if res.returncode == 0 else 0


def libfuse_wanted() -> str:
    """What the venv's libfuse was asked to be ("3.17" or "system")."""
    try:
        info = json.loads((Path(sys.prefix) / "libfuse.json").read_text())
    except (OSError, ValueError):
        return "3.17"  # a venv not made by tools/venv.sh: the default is asked for
    return str(info.get("wanted", "3.17"))


def libfuse317_installed() -> bool:
    """Whether pyfuse3 and the C hook must be built against libfuse >= 3.17."""
    env = os.environ.get("UNIONFS_EXPECT_PASSTHROUGH", "")
    if env in ("0", "1"):
        return env == "1"
    return libfuse_wanted() == "3.17"


def libfuse317_expected() -> bool:
    """Whether the daemon must run with libfuse >= 3.17 and its C hook: KILLPRIV_V2,
    and passthrough unless ``passthrough=off``."""
    return hook_enabled() and libfuse317_installed()


def test_options() -> str:
    """The extra -o options every test mount gets (``UNIONFS_TEST_OPTIONS``)."""
    return os.environ.get("UNIONFS_TEST_OPTIONS", "")


def passthrough_mode() -> str:
    """The ``passthrough=`` mode test mounts get (auto unless the options say)."""
    mode = "auto"
    for item in test_options().split(","):
        if item.startswith("passthrough="):
            mode = item.partition("=")[2]
    return mode


def passthrough_expected() -> bool:
    """Whether test mounts pass upper files through (and lower ones with ``on``)."""
    return libfuse317_expected() and passthrough_mode() != "off"
