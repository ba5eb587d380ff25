"""``unionfs explain`` against the kernel overlay, over the conformance suite's random layers.

For every path of every generated case, explain's verdict (visible or not, the
type, and the content of the layer it says provides the path) must be what a
kernel overlay mount of the same layers shows, and what explain says the mount
shows (mode, owner, size, mtime, link target, a directory's names) must be
what the kernel shows too. The same layers converted to the OCI format
(``unionfs convert --to oci``, lowers only: the upper is always in the
kernel's format) must give the same verdicts, since unionfs honours both.

``make test`` runs ``CASES`` cases; ``UNIONFS_EXPLAIN_ORACLE_CASES=1000`` (or
``make explain-oracle``) runs more, ``UNIONFS_EXPLAIN_ORACLE_SEED`` picks others.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
from pathlib import Path

import pytest

from tests.conformance.layers import LayerSpec, generate, materialize
from tests.mounting import kernel_overlay
from unionfs.inspect.convert import Converter
from unionfs.inspect.explain import Explanation, explain, kind_of
from unionfs.inspect.stack import Stack
from unionfs.overlay.markers import TRUSTED
from unionfs.overlay.union import UnionConfig

CASES = int(os.environ.get("UNIONFS_EXPLAIN_ORACLE_CASES", "200"))
SEED = int(os.environ.get("UNIONFS_EXPLAIN_ORACLE_SEED", "11"))


def kernel_view(mnt: bytes, rel: bytes) -> os.stat_result | None:
    """The kernel mount's answer for *rel*, reached without following symlinks
    (explain names paths as written); None when it is not there."""
    cur = mnt
    parts = rel.split(b"/")
    for i, part in enumerate(parts):
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            return None
    return st


def kernel_names(path: bytes) -> set[bytes]:
    """A kernel directory listing, without the stray whiteouts it lists (and then
    cannot look up) in directories that are not merged."""
    out = set()
    for name in os.listdir(path):
        try:
            os.lstat(os.path.join(path, name))
        except FileNotFoundError:
            continue
        out.add(name)
    return out


def paths_of(spec: LayerSpec) -> list[bytes]:
    paths = spec.all_paths()
    extra = [p + b"/x" for p in paths[:20]] + [b"missing", b"a/b/c"]
    return [b"", *paths, *extra]


def compare(exp: Explanation, mnt: bytes, rel: bytes, layers: list[bytes]) -> list[str]:
    """What differs between explain's verdict and the kernel mount's answer."""
    st = kernel_view(mnt, rel) if rel else os.lstat(mnt)
    where = rel.decode(errors="backslashreplace") or "/"
    if st is None:
        return (
            []
            if not exp.visible
            else [f"{where}: explain says visible ({exp.verdict}); the kernel has nothing"]
        )
    if not exp.visible:
        return [
            f"{where}: explain says not visible ({exp.verdict}); the kernel shows a {kind_of(st)}"
        ]
    out = []
    if exp.kind != kind_of(st):
        out.append(f"{where}: explain says {exp.kind}, the kernel shows {kind_of(st)}")
        return out
    full = os.path.join(mnt, rel) if rel else mnt
    assert exp.layer is not None and exp.shown is not None
    provider = os.path.join(layers[exp.layer], rel) if rel else layers[exp.layer]
    if stat.S_ISREG(st.st_mode):
        with open(full, "rb") as a, open(provider, "rb") as b:
            if a.read() != b.read():
                out.append(
                    f"{where}: the content of layer {exp.layer}'s file is not what the kernel shows"
                )
    if stat.S_ISLNK(st.st_mode) and os.readlink(full) != os.readlink(provider):
        out.append(f"{where}: layer {exp.layer}'s link target is not the kernel's")
    shown = exp.shown
    for key, value in (
        ("mode", stat.filemode(st.st_mode)),
        ("uid", st.st_uid),
        ("gid", st.st_gid),
        ("mtime_ns", st.st_mtime_ns),
    ):
        if shown[key] != value:
            out.append(f"{where}: explain shows {key} {shown[key]!r}, the kernel {value!r}")
    if not stat.S_ISDIR(st.st_mode) and shown["size"] != st.st_size:
        out.append(f"{where}: explain shows size {shown['size']}, the kernel {st.st_size}")
    return out


def listing_differs(
    exps: dict[bytes, Explanation], names: dict[bytes, set[bytes]], mnt: bytes
) -> list[str]:
    """A directory's names as explain lists them must be the kernel's, and the layers'
    contributions must add up to them."""
    out = []
    for rel, mine in names.items():
        st = kernel_view(mnt, rel) if rel else os.lstat(mnt)
        if st is None or not stat.S_ISDIR(st.st_mode):
            continue  # compare() reports it
        theirs = kernel_names(os.path.join(mnt, rel) if rel else mnt)
        if mine != theirs:
            out.append(f"{rel!r}: explain lists {sorted(mine)}, the kernel {sorted(theirs)}")
        if sum(exps[rel].entries.values()) != len(theirs):
            out.append(f"{rel!r}: the layers' contributions {exps[rel].entries} do not add up")
    return out


def explain_all(
    stack: Stack, paths: list[bytes]
) -> tuple[dict[bytes, Explanation], dict[bytes, set[bytes]]]:
    """Every path explained, and the names of each visible directory (as listed by the core)."""
    union = stack.open()
    try:
        exps = {rel: explain(union, rel, stack) for rel in paths}
        names = {
            rel: set(union.names(exp.node))
            for rel, exp in exps.items()
            if exp.node is not None and exp.node.is_dir
        }
        return exps, names
    finally:
        union.close()


def to_oci(lowers: list[bytes], base: Path) -> list[bytes]:
    """Copies of the lowers with their markers in the OCI format."""
    out = []
    for i, lower in enumerate(lowers):
        dest = base / f"oci{i}"
        shutil.copytree(os.fsdecode(lower), dest, symlinks=True, copy_function=_copy)
        Converter(dest, "oci", False, TRUSTED).run()
        out.append(os.fsencode(dest))
    return out


def _copy(src: str, dst: str) -> None:
    st = os.lstat(src)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        os.mknod(dst, st.st_mode, st.st_rdev)  # whiteouts, fifos
        shutil.copystat(src, dst, follow_symlinks=False)
    else:
        shutil.copy2(src, dst, follow_symlinks=False)


@pytest.mark.timeout(max(600, CASES))  # about 0.1 s a case; much more on a loaded machine
def test_explain_agrees_with_the_kernel(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    failures: list[str] = []
    checked = 0
    for case in range(CASES):
        seed = rng.randrange(1 << 32)
        spec = generate(random.Random(seed))
        base = tmp_path / f"c{case}"
        base.mkdir()
        lowers, upper, work = materialize(spec, os.fsencode(base))
        config = UnionConfig(
            lowers=[Path(os.fsdecode(p)) for p in lowers],
            upper=Path(os.fsdecode(upper)) if upper else None,
            readonly=upper is None,
        )
        layers = ([upper] if upper else []) + lowers
        paths = paths_of(spec)
        exps, names = explain_all(Stack(config), paths)
        oci_lowers = [Path(os.fsdecode(p)) for p in to_oci(lowers, base)]
        oci_config = UnionConfig(lowers=oci_lowers, upper=config.upper, readonly=config.readonly)
        oci, _ = explain_all(Stack(oci_config), paths)
        mnt = base / "mnt"
        mnt.mkdir()
        paths_str = [os.fsdecode(p) for p in lowers]
        up, wk = (os.fsdecode(upper), os.fsdecode(work)) if upper and work else (None, None)
        with kernel_overlay(paths_str, mnt, up, wk):
            bmnt = os.fsencode(mnt)
            problems = []
            for rel in paths:
                problems += compare(exps[rel], bmnt, rel, layers)
                o, e = oci[rel], exps[rel]
                if (o.visible, o.kind, o.layer) != (e.visible, e.kind, e.layer):
                    problems.append(
                        f"{rel!r}: over OCI-format lowers explain says {o.visible, o.kind, o.layer}"
                        f" ({o.verdict}), over the kernel format {e.visible, e.kind, e.layer}"
                    )
            problems += listing_differs(exps, names, bmnt)
        checked += len(paths)
        if problems:
            failures.append(
                f"case {case} (seed {seed}):\n{spec.describe()}\n  " + "\n  ".join(problems)
            )
        shutil.rmtree(base)
    assert not failures, "\n\n".join(failures[:5])
    assert checked > CASES * 10  # the cases had paths to check
    print(f"explain agrees with the kernel: {CASES} cases, {checked} paths (seed {SEED})")
