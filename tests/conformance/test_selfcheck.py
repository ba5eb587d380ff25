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

from tests.conformance.cases import CASES, D, F, W, spec
from tests.conformance.cli import case_seed, format_report
from tests.conformance.compare import Divergence
from tests.conformance.exclusions import label
from tests.conformance.layers import OPAQUE_XATTR
from tests.conformance.ops import Op, op
from tests.conformance.runner import Case, make_case, run_case
from tests.conformance.shrink import shrink
from tests.mounting import faulty_command

KK = ("kernel", "kernel")
KU = ("kernel", "unionfs")
SELF_SEED = 7
SELF_CASES = 40
Snaps = tuple[dict[bytes, dict[str, object]], dict[bytes, dict[str, object]]]


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


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["redirect_dir=on", "metacopy=on"])
def test_kernel_vs_kernel_in_mode_has_zero_divergences(mode: str) -> None:
    """The modes' comparisons (redirect and metacopy xattrs, origins) are deterministic."""
    reports = []
    for i in range(10):
        case = make_case(case_seed(SELF_SEED + 1, i))
        out = run_case(case, KK, options=mode)
        if out.diverged or out.excluded:
            reports.append(format_report(case, None, out, KK, len(case.ops), mode))
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
    """Negative control: a difference planted just before one op, and the shrinker.

    Right before ``chmod s`` runs, side b's lower copy of ``s`` is rewritten
    densely (its content unchanged), so that copy-up copies it whole: the trees
    differ from that op on (the extents of ``s``), and in no replay without it.
    The shrinker must cut the op list down to just that op. A lower rewritten
    before the mount shows at once.
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

    def before_op(k: int, side, o: Op) -> None:  # type: ignore[no-untyped-def]
        if o == op("chmod", b"s", 0o600):
            _dense_rewrite(os.path.join(side.mnt, b"..", b"l0", b"s"))

    out = run_case(case, KK, before_op=before_op, post=False)
    assert out.stage == "op#3 chmod(b's', 0o600)" and "tree:extents" in out.kinds(), out
    kept, shrunk = shrink(case, out, KK, budget=60, before_op=before_op)
    assert kept == [3] and shrunk.diverged

    def tamper(base: bytes) -> None:
        _dense_rewrite(os.path.join(base, b"l0", b"s"))

    out = run_case(case, KK, tamper=tamper)
    assert out.stage == "initial" and out.kinds() == {"tree:extents"}, out


def test_planted_mode_difference_is_detected_at_mount() -> None:
    """Negative control: a mode difference in a lower shows in the initial tree."""
    case = Case(spec([F(b"a"), F(b"b")]), [op("stat", b"a")], seed=None)
    out = run_case(case, KK, tamper=lambda base: os.chmod(os.path.join(base, b"l0", b"b"), 0o4711))
    assert out.stage == "initial" and out.kinds() == {"tree:mode"}, out


def test_lower_modification_is_detected() -> None:
    """The lowers-unchanged check sees a lower modified while mounted."""

    def modify_lower(k: int, side, o) -> None:  # type: ignore[no-untyped-def]
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


# -- each exclusion covers its own situation and nothing nearby ------------------------

PASSED_THROUGH = spec([D(b"d"), F(b"d/f"), W(b"d/w"), D(b"e"), F(b"e/w")], [F(b"other")])
MERGED = spec([D(b"d"), W(b"d/w")], [D(b"d"), F(b"d/w"), F(b"d/g")])
ENOENT: dict[str, object] = {"error": "ENOENT"}


def _ok(value: object = None) -> tuple[str, object]:
    return ("ok", value)


def _excused(d: Divergence, layers, history=(), snaps=None, kinds=KU) -> bool:  # type: ignore[no-untyped-def]
    return not label([d], layers, list(history), kinds, snaps)


def _only_a(path: bytes, entry: object) -> Divergence:
    return Divergence("tree:only-a", repr(path), "", frozenset({path}), a=entry)


def _listing(k: int, o: Op, a: list[bytes], b: list[bytes]) -> tuple[Divergence, list]:  # type: ignore[type-arg]
    history = [(op("stat", b""), _ok(), _ok())] * k + [(o, _ok(a), _ok(b))]
    paths = frozenset(set(a) ^ set(b))
    return Divergence("result", f"op#{k} {o}", "", paths, a=_ok(a), b=_ok(b)), history


def test_the_whiteout_listing_exclusion_stays_narrow() -> None:
    snaps: Snaps = ({b"d/w": ENOENT}, {})
    assert _excused(_only_a(b"d/w", ENOENT), PASSED_THROUGH, snaps=snaps)
    d, h = _listing(2, op("readdir", b"d"), [b"f", b"w"], [b"f"])
    assert _excused(d, PASSED_THROUGH, h, snaps)
    # the kernel's entry is real, not a failed lookup
    assert not _excused(_only_a(b"d/w", {"fmt": 0o100000}), PASSED_THROUGH)
    # unionfs's side shows it
    only_b = Divergence("tree:only-b", "x", "", frozenset({b"d/w"}), b=ENOENT)
    assert not _excused(only_b, PASSED_THROUGH)
    # the same name in a directory with no whiteout of that name
    assert not _excused(_only_a(b"e/w", ENOENT), PASSED_THROUGH)
    d, h = _listing(0, op("readdir", b"e"), [b"w"], [])
    assert not _excused(d, PASSED_THROUGH, h, ({b"e/w": {"fmt": 0o100000}}, {}))
    # a merged directory: the kernel filters its whiteouts itself
    assert not _excused(_only_a(b"d/w", ENOENT), MERGED)
    d, h = _listing(0, op("readdir", b"d"), [b"g", b"w"], [b"g"])
    assert not _excused(d, MERGED, h)
    # a real name missing from unionfs's listing along with the whiteout
    d, h = _listing(0, op("readdir", b"d"), [b"f", b"w"], [])
    assert not _excused(d, PASSED_THROUGH, h, snaps)
    # a name only unionfs lists
    d, h = _listing(0, op("readdir", b"d"), [b"w"], [b"w", b"x"])
    assert not _excused(d, PASSED_THROUGH, h, snaps)
    # two kernels (the self-check) never need it
    assert not _excused(_only_a(b"d/w", ENOENT), PASSED_THROUGH, kinds=KK)
    # after the ops: the kernel over unionfs's upper lists it, unionfs over the kernel's not
    cross = Divergence("cross-kernel:only-b", "x", "", frozenset({b"d/w"}), b=ENOENT)
    assert _excused(cross, PASSED_THROUGH)
    cross = Divergence("cross-unionfs:only-b", "x", "", frozenset({b"d/w"}), b=ENOENT)
    assert not _excused(cross, PASSED_THROUGH)
    # a lower directory renamed (copied up, merged from then on) before the listing
    moved = [(op("rename", b"d", b"d2", "0"), _ok(), _ok())]
    assert not _excused(_only_a(b"d2/w", ENOENT), PASSED_THROUGH, moved)
    # a rename onto itself moves nothing: still passed through (case-seed 10000163)
    stayed = [(op("rename", b"d", b"d", "0"), _ok(), _ok())]
    assert _excused(_only_a(b"d/w", ENOENT), PASSED_THROUGH, stayed, snaps)
    # its subdirectories stay passed through, and their whiteouts move along
    deeper = spec([D(b"p"), D(b"p/d"), F(b"p/d/f"), W(b"p/d/w")], [F(b"other")])
    moved = [(op("rename", b"p", b"q", "0"), _ok(), _ok())]
    assert _excused(_only_a(b"q/d/w", ENOENT), deeper, moved)
    assert not _excused(_only_a(b"p/d/w", ENOENT), deeper, moved)


def test_the_failed_rename_exclusions_stay_narrow() -> None:
    layers = spec([D(b"m"), F(b"m/x")], upper=[D(b"u"), D(b"v")])
    fails = [(op("rename", b"u", b"m/u", "0"), ("err", "ENAMETOOLONG"), ("err", "ENAMETOOLONG"))]
    upper: Snaps = ({b"u": {"fmt": 0o040000}, b"v": {"fmt": 0o040000}}, {})
    opaque = {OPAQUE_XATTR: b"y"}

    def xattrs(path: bytes, a: dict, b: dict) -> Divergence:  # type: ignore[type-arg]
        return Divergence("upper:xattrs", repr(path), "", frozenset({path}), a=a, b=b)

    assert _excused(xattrs(b"u", opaque, {}), layers, fails, upper)
    assert not _excused(xattrs(b"u", {**opaque, b"user.k": b"1"}, {}), layers, fails, upper)
    assert not _excused(xattrs(b"u", {OPAQUE_XATTR: b"x"}, {}), layers, fails, upper)
    assert not _excused(xattrs(b"u", {}, opaque), layers, fails, upper)  # unionfs's side
    assert not _excused(xattrs(b"v", opaque, {}), layers, fails, upper)  # not the source
    worked = [(fails[0][0], _ok(), _ok())]
    assert not _excused(xattrs(b"u", opaque, {}), layers, worked, upper)
    into_upper = [(op("rename", b"u", b"v/u", "0"), *fails[0][1:])]  # v has no lower part
    assert not _excused(xattrs(b"u", opaque, {}), layers, into_upper, upper)
    assert not _excused(xattrs(b"m", opaque, {}), layers, fails, ({b"m": {"fmt": 0o040000}}, {}))

    stamped = [(op("stat", b""), _ok(), _ok())] * 3 + [
        (op("rename", b"p/a", b"p/b", "0"), ("err", "ENOTEMPTY"), ("err", "ENOTEMPTY"))
    ]
    tree: Snaps = ({b"p": {"fmt": 0o040000}, b"p/a": {"fmt": 0o100000}}, {})

    def mtime(path: bytes, a: object, b: object) -> Divergence:
        return Divergence("tree:mtime", repr(path), "", frozenset({path}), a=a, b=b)

    assert _excused(mtime(b"p", "op#3", 12345), layers, stamped, tree)
    assert not _excused(mtime(b"p", "op#2", 12345), layers, stamped, tree)  # another op
    assert not _excused(mtime(b"p", 12345, "op#3"), layers, stamped, tree)  # unionfs's side
    assert not _excused(mtime(b"p/a", "op#3", 12345), layers, stamped, tree)  # not a parent
    worked = stamped[:3] + [(stamped[3][0], _ok(), _ok())]
    assert not _excused(mtime(b"p", "op#3", 12345), layers, worked, tree)
    assert not _excused(mtime(b"p", "op#3", 12345), layers, stamped, tree, kinds=KK)


@pytest.mark.timeout(120)
def test_a_planted_bug_next_to_an_excused_whiteout_is_reported() -> None:
    """Live negative control: a daemon with a planted bug hides every entry named ``w``;
    the whiteout ``d/w`` the kernel lists is excused, the real file ``e/w`` is not."""
    case = Case(PASSED_THROUGH, [op("readdir", b"d"), op("readdir", b"e")], seed=None)
    out = run_case(case, KU, command=faulty_command("hide=w"))
    assert out.stage == "initial", out
    assert any(d.excluded_by and b"d/w" in d.paths for d in out.excluded), out
    assert [d.paths for d in out.divergences] == [frozenset({b"e/w"})], out
    clean = run_case(case, KU)
    assert not clean.diverged, clean


def test_the_passthrough_exclusion_stays_narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    layers = spec([F(b"f")])
    reads = [(op("open", 0, b"f", "O_RDONLY", 0o644), _ok(), _ok())]

    def excused(o: Op, b: object = ("err", "ETXTBSY"), after: int = 0, kinds=KU) -> bool:  # type: ignore[no-untyped-def]
        """Whether unionfs's result *b* for *o* (the kernel's: success) is excused,
        with *after* more ops run since."""
        history = [*reads, (o, _ok(), b)]
        d = Divergence("result", f"op#{len(history) - 1} {o}", "", frozenset({b"f"}), a=_ok(), b=b)
        history += [(op("stat", b"f"), _ok(), _ok())] * after
        return _excused(d, layers, history, kinds=kinds)

    write = op("open", 1, b"f", "O_WRONLY", 0o644)
    monkeypatch.setenv("UNIONFS_TEST_OPTIONS", "passthrough=on")
    assert excused(write)
    assert excused(op("truncate", b"f", 0))
    # a read-only open refused so is a bug
    assert not excused(op("open", 1, b"f", "O_RDONLY", 0o644))
    # another error
    assert not excused(write, b=("err", "EIO"))
    # an earlier op's result, not the last one's
    assert not excused(write, after=1)
    # two kernels never need it
    assert not excused(write, kinds=KK)
    # and without -o passthrough=on it never applies
    monkeypatch.setenv("UNIONFS_TEST_OPTIONS", "")
    assert not excused(write)
