"""``unionfs check`` and ``unionfs convert`` on layer directories."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.layers import generate, materialize
from tests.mounting import REPO, UnionMount, unionfs_command
from tests.unit.conftest import NS, is_whiteout, opaque, whiteout, write
from unionfs.inspect.convert import Converter
from unionfs.inspect.explain import explain
from unionfs.inspect.stack import Stack
from unionfs.overlay.union import UnionConfig


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    return subprocess.run(
        [*unionfs_command(), *args], capture_output=True, text=True, env=env, timeout=120
    )


def check(*args: str | Path) -> tuple[int, list[dict[str, Any]]]:
    res = run("check", *[os.fspath(a) for a in args], "--json")
    assert res.returncode in (0, 1), res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    return res.returncode, lines


def codes(found: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(f["code"], f["severity"], f["relpath"]) for f in found if "code" in f}


@pytest.fixture
def lay(tmp_path: Path) -> list[Path]:
    dirs = [tmp_path / n for n in ("top", "mid", "bottom")]
    for d in dirs:
        d.mkdir()
    return dirs


# -- findings --------------------------------------------------------------------------


def test_markers_that_do_nothing_are_warnings(lay: list[Path]) -> None:
    whiteout(lay[2] / "wo")
    opaque(lay[2] / "od")
    write(lay[2] / "d" / ".wh..wh..opq", b"")
    whiteout(lay[0] / "orphan")
    write(lay[1] / ".wh.alsoorphan", b"")
    write(lay[2] / "real", b"x")
    whiteout(lay[0] / "real")
    status, found = check(*lay)
    assert status == 0
    assert codes(found) >= {
        ("no-op-whiteout", "warning", "wo"),
        ("no-op-opaque", "warning", "od"),
        ("no-op-opaque", "warning", "d/.wh..wh..opq"),
        ("orphan-whiteout", "warning", "orphan"),
        ("orphan-whiteout", "warning", ".wh.alsoorphan"),
    }
    assert not any(c[2] == "real" for c in codes(found) if c[0] != "hidden-file")


def test_mixed_formats_depend_on_who_reads_the_layers(lay: list[Path]) -> None:
    write(lay[2] / "a", b"1")
    write(lay[2] / "b", b"2")
    whiteout(lay[1] / "a")
    write(lay[1] / ".wh.b", b"")
    status, found = check(*lay)
    assert status == 0
    assert ("mixed-formats", "warning", "") in codes(found)
    status, found = check("--for", "kernel", *lay)
    assert status == 1 and ("oci-marker-for-kernel", "error", ".wh.b") in codes(found)
    status, found = check("--for", "oci", *lay)
    assert status == 1 and ("kernel-whiteout-in-oci", "error", "a") in codes(found)


def test_oci_markers_in_the_upper_change_the_view(lay: list[Path], tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    write(upper / ".wh.x", b"")
    write(lay[2] / "x")
    status, found = check(*lay, "--upper", upper)
    assert status == 1
    assert ("oci-marker-in-upper", "error", ".wh.x") in codes(found)


def test_other_tools_and_other_namespaces_xattrs(lay: list[Path]) -> None:
    write(lay[0] / "f")
    os.setxattr(lay[0] / "f", b"user.fuseoverlayfs.override_stat", b"0:0:0755")
    write(lay[0] / "g")
    os.setxattr(lay[0] / "g", b"user.containers.something", b"1")
    (lay[0] / "d").mkdir()
    write(lay[2] / "d" / "below")
    os.setxattr(lay[0] / "d", b"user.overlay.opaque", b"y")
    os.setxattr(lay[0] / "d", b"trusted.overlay.redirect", b"/elsewhere")
    (lay[0] / "e").mkdir()
    os.setxattr(lay[0] / "e", b"trusted.overlay.redirect", b"a/b")  # relative with a '/'
    write(lay[0] / "m")
    os.setxattr(lay[0] / "m", b"trusted.overlay.metacopy", b"")
    status, found = check(*lay)
    assert status == 1
    assert codes(found) >= {
        ("foreign-xattr", "error", "f"),
        ("foreign-xattr", "warning", "g"),
        ("other-namespace-xattr", "warning", "d"),
        ("redirect", "info", "d"),
        ("invalid-redirect", "error", "e"),
        ("metacopy-without-metacopy", "error", "m"),
    }
    # mounted with metacopy=on the copy is fine; with nofollow the redirect is refused
    _, found = check("--metacopy", "--redirect-dir", "nofollow", *lay)
    assert {("metacopy", "info", "m"), ("redirect-not-followed", "error", "d")} <= codes(found)
    assert ("metacopy-without-metacopy", "error", "m") not in codes(found)
    status, found = check("--for", "kernel", *lay)
    assert ("other-namespace-xattr", "error", "d") in codes(found)


def test_names_too_long_for_the_oci_format(lay: list[Path]) -> None:
    name = "n" * 255
    write(lay[2] / name)
    whiteout(lay[0] / name)
    _, found = check("--for", "oci", *lay)
    assert ("name-too-long-for-oci", "error", name) in codes(found)
    status, found = check(*lay)
    assert ("name-too-long-for-oci", "warning", name) in codes(found)


def test_hard_links_across_layers(lay: list[Path], tmp_path: Path) -> None:
    write(lay[2] / "f")
    os.link(lay[2] / "f", lay[1] / "g")
    status, found = check(*lay)
    assert status == 0
    assert ("cross-layer-hardlink", "warning", "g") in codes(found)
    upper = tmp_path / "upper"
    upper.mkdir()
    os.link(lay[2] / "f", upper / "h")
    status, found = check(*lay, "--upper", upper)
    assert status == 1 and ("cross-layer-hardlink", "error", "h") in codes(found)


def test_wasted_space_is_what_higher_layers_hide(lay: list[Path]) -> None:
    write(lay[2] / "big", b"x" * 10000)
    whiteout(lay[1] / "big")
    write(lay[2] / "d" / "inside", b"y" * 300)
    opaque(lay[0] / "d")
    write(lay[2] / "shadowed", b"z" * 40)
    write(lay[0] / "shadowed", b"new")
    write(lay[2] / "kept", b"k" * 7)
    _, found = check(*lay)
    hidden = {f["relpath"]: f["message"] for f in found if f.get("code") == "hidden-file"}
    assert hidden == {
        "big": "10,000 bytes stored, never shown: hidden by a whiteout in layer 1 (kernel format: a character device 0/0)",
        "d/inside": "300 bytes stored, never shown: cut off at d: below layer 0's opaque directory",
        "shadowed": "40 bytes stored, never shown: hidden by layer 0's regular file",
    }
    assert found[-1]["wasted_bytes"] == 10340 and found[-1]["wasted_files"] == 3


def test_workdir_findings(tmp_path: Path, lay: list[Path]) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    inside = upper / "work"
    inside.mkdir()
    _, found = check(*lay, "--upper", upper, "--work", inside)
    assert ("workdir-inside-upper", "error", "") in codes(found)
    shm = Path("/dev/shm") / f"unionfs-check-{os.getpid()}"
    shm.mkdir()
    try:
        status, found = check(*lay, "--upper", upper, "--work", shm)
        assert status == 1 and ("workdir-other-filesystem", "error", "") in codes(found)
    finally:
        shm.rmdir()


def test_the_readable_form_is_one_line_per_finding(lay: list[Path]) -> None:
    whiteout(lay[2] / "wo")
    res = run("check", *map(os.fspath, lay))
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert lines[0] == (
        f"{lay[2]}/wo: warning [no-op-whiteout] a whiteout in the bottom layer hides nothing: "
        "there is no layer below"
    )
    assert lines[-1].startswith("1 entries in 3 layers: 0 errors, 1 warnings")
    bad = run("check", "/nonexistent")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "unionfs check: layer /nonexistent: No such file or directory"
    )


# -- convert -----------------------------------------------------------------------------


def test_generated_layers_pass_and_convert_both_ways(tmp_path: Path) -> None:
    """The conformance generator's (kernel-format) layers pass check; converted to
    OCI they pass check --for oci and show the same tree; converted back, the same
    markers are there again."""
    rng = random.Random(5)
    for case in range(12):
        spec = generate(random.Random(rng.randrange(1 << 32)))
        base = tmp_path / f"c{case}"
        base.mkdir()
        lowers, _, _ = materialize(spec, os.fsencode(base))
        paths = [Path(os.fsdecode(p)) for p in lowers]
        status, found = check("--for", "kernel", *paths)
        assert status == 0, [f for f in found if f.get("severity") == "error"]
        before = _markers(paths)
        views = _views(paths, spec.all_paths())
        for p in paths:
            res = run("convert", "--to", "oci", os.fspath(p))
            assert res.returncode == 0, res.stdout + res.stderr
        status, found = check("--for", "oci", *paths)
        assert status == 0, [f for f in found if f.get("severity") == "error"]
        assert _views(paths, spec.all_paths()) == views
        for p in paths:
            assert run("convert", "--to", "kernel", os.fspath(p)).returncode == 0
        assert _markers(paths) == before
        shutil.rmtree(base)


def _views(
    lowers: list[Path], paths: list[bytes]
) -> dict[bytes, tuple[bool, str | None, int | None]]:
    stack = Stack(UnionConfig(lowers=lowers, readonly=True, xattrs=NS))
    union = stack.open()
    try:
        return {p: (e.visible, e.kind, e.layer) for p in paths for e in [explain(union, p)]}
    finally:
        union.close()


def _markers(layers: list[Path]) -> set[tuple[str, str]]:
    """Every kernel-format marker of the layers: (path, whiteout | opaque)."""
    out = set()
    for layer in layers:
        for dirpath, dirnames, filenames in os.walk(layer):
            for name in filenames:
                if is_whiteout(Path(dirpath) / name):
                    out.add((os.path.join(dirpath, name), "whiteout"))
            for name in dirnames:
                path = os.path.join(dirpath, name)
                try:
                    if os.getxattr(path, NS.opaque, follow_symlinks=False) == b"y":
                        out.add((path, "opaque"))
                except OSError:
                    pass
    return out


def test_a_half_done_conversion_shows_the_same_and_finishes(lay: list[Path]) -> None:
    """Each entry gets its new marker before losing the old one: a layer caught in
    between (both markers) shows the same tree, and converting again finishes."""
    write(lay[1] / "gone")
    whiteout(lay[0] / "gone")
    write(lay[0] / ".wh.gone", b"")  # as a crash between the two steps leaves it
    views = _views(lay, [b"gone"])
    assert views[b"gone"][0] is False
    changes = Converter(lay[0], "oci", False, NS).run()
    assert [(c.rel, c.ok) for c in changes] == [(b"gone", True)]
    assert not (lay[0] / "gone").exists() and (lay[0] / ".wh.gone").exists()
    assert _views(lay, [b"gone"]) == views


def test_what_cannot_be_converted_is_left_and_reported(lay: list[Path]) -> None:
    whiteout(lay[0] / ("n" * 255))
    write(lay[1] / ("n" * 255))
    res = run("convert", "--to", "oci", os.fspath(lay[0]))
    assert res.returncode == 1
    assert "no OCI form (.wh. + name > 255 bytes); left as is" in res.stdout
    assert is_whiteout(lay[0] / ("n" * 255))


def test_a_live_mounts_layer_is_not_converted(
    stack: Any, mounted: Callable[..., UnionMount]
) -> None:
    write(stack.lowers[0] / ".wh.x", b"")
    um = mounted()
    res = run("convert", "--to", "kernel", os.fspath(stack.lowers[0]))
    assert res.returncode == 2
    assert f"is a layer of the live mount at {um.mountpoint}: unmount it first" in res.stderr
    assert (stack.lowers[0] / ".wh.x").exists()
