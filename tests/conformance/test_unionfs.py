"""unionfs against the kernel overlay: hand-written corner cases and a random sample.

A failure prints the layers, the op transcript, the first divergence and the
command that replays (and shrinks) the case:
``python -m tests.conformance --case-seed S``. The random sample uses a fixed
seed so that CI is reproducible; ``make conformance`` explores further.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conformance.cases import CASES, F, Named, spec
from tests.conformance.cli import case_seed, format_report
from tests.conformance.mounts import Side, unionfs_usable
from tests.conformance.ops import op
from tests.conformance.runner import Case, make_case, run_case
from tests.mounting import mount_type

KU = ("kernel", "unionfs")
SAMPLE_SEED = 1
SAMPLE_CASES = 70  # about 1 s each; the whole pytest part stays under ~2.5 min
# The modes with their own format features, each both sides mounted with it.
MODES = ("redirect_dir=on", "metacopy=on")
MODE_SEED = 5
MODE_CASES = 20


@pytest.fixture(scope="module", autouse=True)
def _unionfs_available() -> None:
    if not unionfs_usable():
        pytest.fail("`python -m unionfs --version` fails: the daemon is not usable")


def _report(case: Case, out) -> str:  # type: ignore[no-untyped-def]
    return (
        format_report(case, None, out, KU, len(case.ops))
        + "\ntranscript:\n"
        + "\n".join(out.transcript)
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("named", CASES, ids=[c.name for c in CASES])
def test_handwritten(named: Named) -> None:
    out = run_case(named.case(), KU, options=named.mode)
    assert not out.diverged, f"{named.name}: {named.why}\n" + _report(named.case(), out)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("i", range(SAMPLE_CASES))
def test_random_sample(i: int) -> None:
    seed = case_seed(SAMPLE_SEED, i)
    case = make_case(seed)
    out = run_case(case, KU)
    assert not out.diverged, _report(case, out)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("i", range(MODE_CASES))
@pytest.mark.parametrize("mode", MODES)
def test_random_sample_in_mode(mode: str, i: int) -> None:
    seed = case_seed(MODE_SEED, i)
    case = make_case(seed)
    out = run_case(case, KU, options=mode)
    assert not out.diverged, f"mode {mode}\n" + _report(case, out)


@pytest.mark.timeout(60)
def test_hang_is_reported_and_cleaned_up() -> None:
    """A daemon that stops answering: the op times out, nothing survives.

    The hook SIGSTOPs the unionfs daemon this case started (by PID) before op 1,
    so op 1 blocks in the FUSE request. The runner must report a ``hang`` at
    op 1, lazily unmount, SIGKILL that daemon and clean up its worker.
    """
    seen: dict[str, object] = {}

    def stop_daemon(k: int, side: Side, o: object) -> None:
        if k == 1 and side.pid is not None:
            seen["pid"], seen["mnt"] = side.pid, side.mnt
            os.kill(side.pid, signal.SIGSTOP)

    case = Case(
        spec([F(b"a"), F(b"b")]),
        [op("stat", b"a"), op("open", 0, b"b", "RDWR", 0), op("stat", b"b")],
        seed=None,
    )
    out = run_case(case, KU, timeout=3, before_op=stop_daemon)
    assert out.stage is not None and out.stage.startswith("op#1"), out
    assert out.kinds() == {"hang"}, out
    pid = seen["pid"]
    assert isinstance(pid, int)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"daemon {pid} survived the hang")
    assert mount_type(os.fsdecode(seen["mnt"])) is None  # type: ignore[arg-type]
