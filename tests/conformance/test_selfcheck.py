"""Self-check: the suite run kernel overlay against kernel overlay must see nothing.

Any divergence between two kernel overlays over identical copies is a bug in
the suite (non-determinism in the generator, the snapshot or the comparator),
so these tests assert zero divergences - with no named exclusion applied.

Deliberately *not* compared, and why (see also compare.py):

* atime - depends on relatime and caching, not on overlay semantics.
* ctime - nobody can set it, and copy-up bumps it in implementation-specific
  sub-steps (temp file in the workdir, chown, rename). Lower layers' ctime
  *is* compared: it proves the lowers stayed untouched.
* st_dev, and st_ino across the two mounts - different filesystems and copies.
  Inode identity is checked within each mount instead: hard-link groups and
  whether a surviving path kept its st_ino.
* readdir order - unspecified; listings are compared sorted.
* directory st_size/st_nlink - filesystem private; the upper dirs' entries
  are compared after unmount instead.
* "now" timestamps - compared as the index of the op that set them (each op
  runs in its own clock window), explicit/copied timestamps exactly.
* in the upper dir after unmount: trusted.overlay.* other than ``opaque``
  (origin/impure hold file handles that differ for any two copies), nlink and
  mtime of whiteouts (the kernel hard-links one shared whiteout inode), and
  exact extent maps: side b must allocate no more bytes than side a (the
  kernel copies up in 1 MiB chunks and skips holes only at chunk starts).
"""

from __future__ import annotations

import os
import stat

import pytest

from tests.conformance.cases import CASES, F, spec
from tests.conformance.cli import case_seed, format_report
from tests.conformance.ops import op
from tests.conformance.runner import Case, make_case, run_case
from tests.conformance.shrink import shrink

KK = ("kernel", "kernel")
SELF_SEED = 7
SELF_CASES = 40


@pytest.mark.timeout(240)
def test_kernel_vs_kernel_random_has_zero_divergences() -> None:
    """Random cases (fixed seed): two kernel overlays never differ."""
    reports = []
    for i in range(SELF_CASES):
        case = make_case(case_seed(SELF_SEED, i))
        out = run_case(case, KK)
        if out.diverged or out.excluded:
            reports.append(format_report(case, None, out, KK, len(case.ops)))
    assert not reports, "\n\n".join(reports)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("named", CASES, ids=[c.name for c in CASES])
def test_kernel_vs_kernel_handwritten(named) -> None:  # type: ignore[no-untyped-def]
    out = run_case(named.case(), KK, options=named.mode)
    assert not out.diverged and not out.excluded, format_report(named.case(), None, out, KK, 0)


def _dense_rewrite(path: bytes) -> None:
    """Rewrite a file without holes, keeping its metadata: invisible through a mount."""
    st = os.lstat(path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_planted_difference_is_detected_and_shrunk() -> None:
    """Negative control: a difference that only copy-up reveals, and the shrinker.

    Side b's lower copy of ``s`` is rewritten densely: the merged trees stay
    identical until ``s`` is copied up, then the upper dirs differ (sparse vs
    not). The shrinker must cut the op list down to just the copy-up.
    """
    sparse = F(b"s", chunks=[(0, b"x")], size=4 << 20)
    case = Case(
        spec([sparse, F(b"t")]),
        [
            op("stat", b"s"),
            op("readdir", b""),
            op("chmod", b"t", 0o600),
            op("chmod", b"s", 0o600),
            op("stat", b"s"),
        ],
        seed=None,
    )

    def tamper(base: bytes) -> None:
        _dense_rewrite(os.path.join(base, b"l0", b"s"))

    out = run_case(case, KK, tamper=tamper)
    assert out.stage == "upper" and "upper:allocated" in out.kinds(), out
    kept, shrunk = shrink(case, out, KK, budget=60, tamper=tamper)
    assert kept == [3] and shrunk.diverged


def test_planted_mode_difference_is_detected_at_mount() -> None:
    """Negative control: a mode difference in a lower shows in the initial tree."""
    case = Case(spec([F(b"a"), F(b"b")]), [op("stat", b"a")], seed=None)
    out = run_case(case, KK, tamper=lambda base: os.chmod(os.path.join(base, b"l0", b"b"), 0o4711))
    assert out.stage == "initial" and out.kinds() == {"tree:mode"}, out


def test_lower_modification_is_detected() -> None:
    """The lowers-unchanged check sees a lower modified while mounted."""

    def modify_lower(k: int, side) -> None:  # type: ignore[no-untyped-def]
        if k == 0:
            os.chmod(os.path.join(side.mnt, b"..", b"l0", b"b"), stat.S_IRUSR)

    case = Case(spec([F(b"a"), F(b"b")]), [op("stat", b"a")], seed=None)
    out = run_case(case, KK, before_op=modify_lower)
    assert out.diverged, out


def test_cli_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m tests.conformance`` ends with ``cases=N diverged=M``."""
    from tests.conformance.cli import main

    assert main(["--cases", "2", "--seed", "3", "--sides", "kernel,kernel"]) == 0
    assert "cases=2 diverged=0" in capsys.readouterr().out.splitlines()
