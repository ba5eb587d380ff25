"""``commit`` of an upper the kernel wrote with ``redirect_dir=on`` or ``metacopy=on``
(podman's default mount options on some distributions): a moved directory keeps its
contents in the lowers and a metadata-only copy its data, so the layer must carry
them. The oracle: the committed layer, unpacked on top of the same lowers, mounted by
the kernel, shows exactly the tree the kernel showed over the original upper."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from tests.image.builders import Tar
from tests.image.test_layout import run
from tests.image.test_unpack import unpack
from tests.mounting import kernel_overlay, unionfs_mounted
from tests.treesnap import diff, snapshot


def _lowers(tmp_path: Path) -> list[Path]:
    base = Tar().dir("bin").file("bin/busybox", b"bb" * 500, mode=0o755)
    base.symlink("bin/sh", "busybox").dir("bin/sub").file("bin/sub/f", b"f").file("bin/sub/g", b"g")
    base.file("bin/a", b"linked").hardlink("bin/b", "bin/a")
    base.dir("etc").file("etc/passwd", b"root:x:0:0\n").dir("etc/ssl").file("etc/ssl/c", b"cert")
    base.dir("usr").dir("usr/lib").file("usr/lib/x", b"x" * 5000).file("usr/lib/y", b"y" * 70)
    base.dir("sbin").file("sbin/old", b"hidden by the move")  # the move's target has lowers
    unpack(base.bytes(), tmp_path / "base")
    top = Tar().dir("etc").file("etc/motd", b"hi").dir("bin").whiteout("bin/sub/g")
    unpack(top.bytes(), tmp_path / "top")
    return [tmp_path / "top", tmp_path / "base"]


def _change(m: Path) -> None:
    """What a container does: moves, metadata changes, and changes inside moved trees."""
    os.rename(m / "sbin", m / "sbin-was")
    os.rename(m / "bin", m / "sbin")  # a redirect; its target name had lower contents
    (m / "new").mkdir()
    os.rename(m / "etc", m / "new/etc")  # an absolute redirect, below an added directory
    os.rename(m / "new/etc/ssl", m / "new/etc/tls")  # a redirect inside a moved directory
    os.chmod(m / "sbin/busybox", 0o700)  # metacopy=on: a metadata-only copy in a moved dir
    os.chown(m / "usr/lib/x", 1000, 1000)  # ... and one outside
    os.setxattr(m / "usr/lib/x", "user.k", b"v")
    os.link(m / "usr/lib/x", m / "usr/lib/x-link")  # two names of one metadata-only copy
    os.chmod(m / "usr/lib/y", 0o600)
    os.rename(m / "usr/lib/y", m / "usr/lib/z")  # a moved metadata-only copy (a file redirect)
    os.unlink(m / "sbin/sub/f")  # a whiteout inside a moved directory
    (m / "sbin/added").write_bytes(b"new")
    (m / "new/etc/passwd").write_bytes(b"changed")  # a full copy-up below a redirect


@pytest.mark.parametrize("writer", ["kernel", "unionfs"])
@pytest.mark.parametrize("mode", ["redirect_dir=on", "metacopy=on"])
def test_commit_of_a_kernel_upper_with_redirects(tmp_path: Path, mode: str, writer: str) -> None:
    """The upper written by the kernel, or by unionfs in the kernel's format."""
    lowers = _lowers(tmp_path)
    upper, work = tmp_path / "upper", tmp_path / "work"
    for d in (upper, work, tmp_path / "m", tmp_path / "again"):
        d.mkdir()
    if writer == "kernel":
        with kernel_overlay(lowers, tmp_path / "m", upper, work, mode) as m:
            _change(m)
            expected = snapshot(m, mtimes=False)
    else:
        with unionfs_mounted(lowers, tmp_path / "m", upper, work, mode):
            _change(tmp_path / "m")
        with kernel_overlay(lowers, tmp_path / "m", upper, work, mode) as m:
            expected = snapshot(m, mtimes=False)  # what the kernel shows of it
    moved = [p for p in ("sbin", "new/etc") if "trusted.overlay.redirect" in os.listxattr(upper / p)]  # fmt: skip
    assert moved == ["sbin", "new/etc"]
    copies = [p for p in ("sbin/busybox", "usr/lib/x", "usr/lib/z") if "trusted.overlay.metacopy" in os.listxattr(upper / p)]  # fmt: skip
    assert copies == (["sbin/busybox", "usr/lib/x", "usr/lib/z"] if mode == "metacopy=on" else [])

    layer = tmp_path / "layer.tar"
    lower_arg = ":".join(os.fspath(p) for p in lowers)
    res = run("commit", os.fspath(upper), "--lower", lower_arg, "-o", os.fspath(layer))
    assert res.returncode == 0, res.stderr
    with tarfile.open(layer) as tf:
        names = tf.getnames()
        assert tf.getmember("sbin/busybox").size == 1000  # the data, from the lower
        assert tf.getmember("sbin/a").isfile() and tf.getmember("sbin/b").islnk()
        assert tf.getmember("usr/lib/x").isfile() and tf.getmember("usr/lib/x-link").islnk()
        assert tf.getmember("usr/lib/x").size == 5000
        for member in tf.getmembers():  # no overlay xattr in the layer
            assert not any(".overlay." in k for k in member.pax_headers), member.name
    assert "sbin/.wh..wh..opq" in names  # the moved directory hides what sbin had
    assert "new/.wh..wh..opq" not in names  # nothing below to hide
    assert ".wh.bin" in names and ".wh.etc" in names
    assert "sbin/sub/g" not in names and "sbin/sub/f" not in names  # deleted, in either layer

    unpack(layer.read_bytes(), tmp_path / "layer")
    with kernel_overlay([tmp_path / "layer", *lowers], tmp_path / "again") as again:
        got = snapshot(again, mtimes=False)
    assert diff(expected, got) == []

    # Without the lowers what the upper holds is not known: one line, no layer.
    res = run("commit", os.fspath(upper), "-o", os.fspath(tmp_path / "no.tar"))
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "give them with --lower" in res.stderr
    assert not (tmp_path / "no.tar").exists()


def test_commit_onto_the_base_image_takes_its_layers(tmp_path: Path) -> None:
    """``commit --image DIR:BASE`` without --lower: a container layer on BASE, so an upper
    that keeps data in the lowers takes BASE's layers from the layer cache."""
    lowers = _lowers(tmp_path)
    img, cache = tmp_path / "img", tmp_path / "cache"
    for layer, base, tag in ((lowers[1], "", "v1"), (lowers[0], ":v1", "v2")):
        res = run("commit", os.fspath(layer), "--image", f"{img}{base}", "--tag", tag)
        assert res.returncode == 0, res.stderr
    upper, work = tmp_path / "upper", tmp_path / "work"
    for d in (upper, work, tmp_path / "m", tmp_path / "again"):
        d.mkdir()
    with kernel_overlay(lowers, tmp_path / "m", upper, work, "metacopy=on") as m:
        _change(m)
        expected = snapshot(m, mtimes=False)
    res = run("commit", os.fspath(upper), "--image", f"{img}:v2", "--tag", "v3", "--cache", os.fspath(cache))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert os.listdir(cache / "layers/sha256")  # the base's layers, unpacked there
    unpacked = tmp_path / "unpacked"
    res = run("image", "unpack", f"{img}:v3", os.fspath(unpacked))
    assert res.returncode == 0, res.stderr
    stack = sorted(unpacked.iterdir(), reverse=True)
    assert len(stack) == 3
    with kernel_overlay(stack, tmp_path / "again") as again:
        assert diff(expected, snapshot(again, mtimes=False)) == []
    # A new layout has no base: nothing to take the lowers from.
    res = run("commit", os.fspath(upper), "--image", os.fspath(tmp_path / "new"), "--tag", "x")
    assert res.returncode == 1 and "give them with --lower" in res.stderr, res.stderr
