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


@pytest.mark.timeout(600)
def test_a_kill_at_any_step_of_another_users_create_leaves_none_of_roots(tmp_path: Path) -> None:
    """User 1000's new file and directory in the lower layer's sticky tmp, the daemon
    killed right before and right after each change it makes for them (a copy-up of
    tmp, the entry built in the workdir, its owner, the rename into place): each kill
    leaves the state before or after, never an entry of root's under the new name."""
    out = io.StringIO()
    report = Run(tmp_path, SEED, big=False, out=out).every_step(["user-create", "user-mkdir"])
    assert len(report.kills) >= 20, out.getvalue()
    assert not report.inconsistencies, out.getvalue() + report.summary()
