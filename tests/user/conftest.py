"""Tests run by ``make test-user`` (tests/user/run.sh) as an ordinary user.

They check what only an unprivileged mount shows, so running them as root
proves nothing: they fail then instead of passing vacuously.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _as_an_ordinary_user() -> None:
    if os.geteuid() == 0:
        pytest.fail("tests/user run as an ordinary user: make test-user")
