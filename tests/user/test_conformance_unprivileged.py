"""The differential suite in the unprivileged mode: an ordinary user's unionfs against
the kernel overlay the same user mounts with userxattr in a user namespace
(``tests/conformance/userns.py``). ``tests/user/run.sh python -m tests.conformance
--sides userns-kernel,unionfs --cases N`` runs more."""

from __future__ import annotations

import os

import pytest

from tests.conformance.cases import F, spec
from tests.conformance.cli import case_seed, format_report
from tests.conformance.compare import Divergence
from tests.conformance.exclusions import label
from tests.conformance.ops import op
from tests.conformance.runner import Case, make_case, run_case

UK = ("userns-kernel", "unionfs")
KK = ("userns-kernel", "userns-kernel")
SAMPLE_SEED = 11
SAMPLE_CASES = 30


@pytest.mark.timeout(300)
def test_kernel_against_kernel_has_zero_divergences() -> None:
    reports = []
    for i in range(12):
        case = make_case(case_seed(SAMPLE_SEED, i))
        out = run_case(case, KK)
        if out.diverged or out.excluded:
            reports.append(format_report(case, None, out, KK, len(case.ops)))
    assert not reports, "\n\n".join(reports)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("i", range(SAMPLE_CASES))
def test_random_sample(i: int) -> None:
    case = make_case(case_seed(SAMPLE_SEED, i))
    out = run_case(case, UK)
    assert not out.diverged, (
        format_report(case, None, out, UK, len(case.ops)) + "\n" + "\n".join(out.transcript)
    )


def test_a_planted_difference_is_seen() -> None:
    """Negative control: the unprivileged mode compares what the root mode compares."""
    case = Case(spec([F(b"a"), F(b"b")]), [op("stat", b"a")], seed=None)
    out = run_case(case, UK, tamper=lambda base: os.chmod(os.path.join(base, b"l0", b"b"), 0o711))
    assert out.stage == "initial" and out.kinds() == {"tree:mode"}, out


def _history_with_link(src: bytes, dst: bytes) -> list:  # type: ignore[type-arg]
    return [(op("link", src, dst), ("ok", None), ("ok", None))]


def test_the_userns_link_exclusion_stays_narrow() -> None:
    """It excuses only what the kernel does in a user namespace, nothing nearby."""
    lower = spec([F(b"f")])
    upper_only = spec([F(b"g")], upper=[F(b"f")])
    group = frozenset({b"f", b"n"})

    def excused(detail: str, layers, history) -> bool:  # type: ignore[no-untyped-def]
        d = Divergence("ino:hardlink", "x", detail, group)
        return not label([d], layers, history)

    assert excused("share st_ino only on side b", lower, _history_with_link(b"f", b"n"))
    assert excused("share st_ino only on side a", lower, _history_with_link(b"f", b"n"))
    # a name outside the family
    d = Divergence("ino:hardlink", "x", "share st_ino only on side b", group | {b"g"})
    assert label([d], lower, _history_with_link(b"f", b"n")) == [d]
    # another kind of divergence about the same names
    d = Divergence("ino:stability", "x", "st_ino changed only on side b", frozenset({b"f"}))
    assert label([d], lower, _history_with_link(b"f", b"n")) == [d]
    # the file was in the upper already: the kernel shares st_ino there too
    assert not excused("share st_ino only on side b", upper_only, _history_with_link(b"f", b"n"))
    # no link made the group
    assert not excused("share st_ino only on side b", lower, [])
    # a link of another file
    assert not excused("share st_ino only on side b", lower, _history_with_link(b"g", b"n"))
