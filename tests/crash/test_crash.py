"""The crash test, short: ``make crash`` runs the long one (``python -m tests.crash``)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from tests.crash.ops import Op
from tests.crash.runner import Plan, Run

SHORT_KILLS = 20  # a minute or two; make crash tries 100
SEED = 1


@pytest.mark.timeout(900)
def test_every_kill_leaves_a_consistent_upper(tmp_path: Path) -> None:
    out = io.StringIO()
    report = Run(tmp_path, SEED, out=out).run(SHORT_KILLS)
    assert len(report.kills) == SHORT_KILLS
    assert not report.inconsistencies, out.getvalue() + report.summary()


@pytest.mark.timeout(300)
def test_the_checker_reports_a_remove_that_is_not_atomic(tmp_path: Path) -> None:
    """A daemon whose remove of an upper file with a lower namesake unlinks first and
    dies before making the whiteout: the lower file shows again, which is neither
    the state before the unlink nor after it."""
    out = io.StringIO()
    run = Run(tmp_path, SEED, big=False, out=out, daemon_args=("--plant", "unsafe-remove"))
    kill = run.scripted(
        [
            Op("open", ("etc/hosts", "RDWR", 1)),
            Op("write", (1, 0, b"changed")),
            Op("close", (1,)),
            Op("unlink", ("etc/hosts",)),
        ],
        Plan("self"),
    )
    assert kill.in_flight == 3 and kill.outcome == "neither state", out.getvalue()
    [text] = run.report.inconsistencies
    assert "neither the state before op #3 nor after it" in text
    assert "~ etc/hosts" in text
    assert re.search(r"\[3\] unlink\('etc/hosts'\) -> E\w+ <== in flight at the kill", text)
