"""``unionfs commit``: an upper written as an OCI layer, reproducibly, and added to
an image layout. The oracle for the content: the layer, unpacked again and
stacked on the same lowers, gives the kernel overlay the same merged tree as
the upper itself."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.image.builders import Layer, Tar, write_oci_layout
from tests.image.mounts import image_mounted, tree
from tests.image.test_diff import kernel_trees, lower_layers, make_changes
from tests.image.test_layout import run
from tests.image.test_unpack import unpack
from unionfs.image.digest import ImageError
from unionfs.image.layout import open_image
from unionfs.image.writer import write_layer


def changed_upper(tmp_path: Path) -> tuple[list[Path], Path]:
    lowers = lower_layers(tmp_path)
    upper = tmp_path / "upper"
    upper.mkdir()

    def change(old: Path, new: Path) -> None:
        make_changes(new)
        (new / "etc/hard1").write_text("linked")
        os.link(new / "etc/hard1", new / "etc/hard2")
        os.setxattr(new / "etc/new", "user.note", b"\x00binary\xff")
        os.chown(new / "etc/new", 1234, 5678)

    kernel_trees(lowers, upper, tmp_path, change)
    return lowers, upper


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def test_layer_content_whiteouts_opaque_xattrs_links_owners(tmp_path: Path) -> None:
    lowers, upper = changed_upper(tmp_path)
    out = tmp_path / "layer.tar"
    w = write_layer(upper, out, lowers)
    ms = members(out)
    names = [m.name for m in ms]
    assert names == sorted(names, key=lambda n: n.split("/"))  # depth-first, sorted
    assert "etc/.wh.group" in names and ".wh.rmme" in names
    assert names[names.index("data") + 1] == "data/.wh..wh..opq"  # right after its directory
    by = {m.name: m for m in ms}
    assert by["etc/hard2"].islnk() and by["etc/hard2"].linkname == "etc/hard1"
    assert (
        by["etc/new"].pax_headers["SCHILY.xattr.user.note"].encode("utf-8", "surrogateescape")
        == b"\x00binary\xff"
    )
    assert (by["etc/new"].uid, by["etc/new"].gid, by["etc/new"].uname) == (1234, 5678, "")
    assert not any("overlay" in k for m in ms for k in m.pax_headers)  # trusted.overlay.* never
    assert w.entries == len(ms)
    assert str(w.diff_id) == "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()
    assert w.digest == w.diff_id  # uncompressed: the blob is the tar


def test_committed_layer_stacks_to_the_same_tree(tmp_path: Path) -> None:
    lowers, upper = changed_upper(tmp_path)
    out = tmp_path / "layer.tar.gz"
    write_layer(upper, out, lowers)
    unpacked = tmp_path / "unpacked"
    unpack(gzip.decompress(out.read_bytes()), unpacked)
    seen: dict[str, object] = {}
    kernel_trees(lowers, upper, tmp_path, lambda old, new: seen.update(upper=tree(new)))
    stacked = tmp_path / "empty-upper"
    stacked.mkdir()
    kernel_trees(
        [unpacked, *lowers], stacked, tmp_path, lambda old, new: seen.update(layer=tree(new))
    )
    assert seen["layer"] == seen["upper"]


def test_reproducible_and_clamped(tmp_path: Path) -> None:
    lowers, upper = changed_upper(tmp_path)
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    epoch = 1_000_000_000
    wa = write_layer(upper, a, lowers, source_date_epoch=epoch)
    wb = write_layer(upper, b, lowers, source_date_epoch=epoch)
    assert a.read_bytes() == b.read_bytes()
    assert (wa.diff_id, wa.digest) == (wb.diff_id, wb.digest)
    assert max(m.mtime for m in members(a)) == epoch  # the upper's files are all newer
    assert str(wa.digest) == "sha256:" + hashlib.sha256(a.read_bytes()).hexdigest()
    assert (
        str(wa.diff_id) == "sha256:" + hashlib.sha256(gzip.decompress(a.read_bytes())).hexdigest()
    )


def test_markers_that_hide_nothing_are_left_out_with_lowers(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    unpack(Tar().dir("d").file("d/x", b"x").bytes(), lower)
    upper = tmp_path / "upper"
    unpack(Tar().whiteout("d/x").whiteout("nothing").dir("new").opaque("new").bytes(), upper)
    out = tmp_path / "l.tar"
    write_layer(upper, out, [lower])
    assert [m.name for m in members(out)] == ["d", "d/.wh.x", "new"]
    write_layer(upper, out, [])
    assert [m.name for m in members(out)] == [
        ".wh.nothing",
        "d",
        "d/.wh.x",
        "new",
        "new/.wh..wh..opq",
    ]


def test_commit_into_an_image_layout(tmp_path: Path) -> None:
    """commit --image --tag: a new config, manifest and tag; the result reads back
    with every digest checked and mounts with the change in it."""
    base = write_oci_layout(
        tmp_path / "img",
        [Layer(Tar().dir("etc").file("etc/a", b"A").file("etc/b", b"B").bytes())],
        tag="base",
    )
    cache = tmp_path / "cache"
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with image_mounted(
        f"{base.path}:base", mnt, cache, ["--upper", os.fspath(upper), "--work", os.fspath(work)]
    ):
        (mnt / "etc/b").unlink()
        (mnt / "etc/c").write_text("C")
    res = run(
        "commit", os.fspath(upper), "-o", os.fspath(tmp_path / "new.tar.gz"), "--image", f"{base.path}:base",
        "--tag", "next", "--message", "remove b, add c", "--source-date-epoch", "1700000000", "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    blob = (tmp_path / "new.tar.gz").read_bytes()
    assert out["digest"] == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert out["diff_id"] == "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    assert (base.path / "blobs/sha256" / out["digest"].split(":")[1]).read_bytes() == blob
    with open_image(f"{base.path}:next") as image:
        assert [str(x.diff_id) for x in image.layers] == [base.diff_ids[0], out["diff_id"]]
        assert image.config["history"][-1] == {
            "created": "2023-11-14T22:13:20Z",
            "created_by": "unionfs commit",
            "comment": "remove b, add c",
        }
        assert image.layers[1].media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    index = json.loads((base.path / "index.json").read_text())
    assert [d["annotations"]["org.opencontainers.image.ref.name"] for d in index["manifests"]] == [
        "base",
        "next",
    ]
    with image_mounted(f"{base.path}:next", mnt, cache):
        assert sorted(os.listdir(mnt / "etc")) == ["a", "c"]


def test_commit_into_a_new_layout_starts_from_scratch(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "bin/hello").write_text("#!/bin/sh\necho hello\n")
    res = run("commit", os.fspath(rootfs), "--image", os.fspath(tmp_path / "new"), "--tag", "v1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith("diff_id  sha256:")
    with open_image(f"{tmp_path}/new:v1") as image:
        assert len(image.layers) == 1 and image.config["os"] == "linux"
    assert json.loads((tmp_path / "new/oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}


def test_commit_usage_errors(tmp_path: Path) -> None:
    res = run("commit", os.fspath(tmp_path))
    assert (res.returncode, res.stderr) == (
        1,
        "unionfs: nowhere to write the layer: give -o LAYER.tar or --image DIR --tag NEW\n",
    )
    res = run("commit", os.fspath(tmp_path), "--image", os.fspath(tmp_path / "x"))
    assert (res.returncode, res.stderr) == (1, "unionfs: --image and --tag go together\n")


def test_uppers_that_cannot_be_a_layer(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "moved").mkdir(parents=True)
    os.setxattr(upper / "moved", "trusted.overlay.redirect", b"/orig")
    with pytest.raises(ImageError) as e:
        write_layer(upper, tmp_path / "l.tar")
    assert str(e.value) == (
        "moved: has trusted.overlay.redirect (an upper written with the kernel's redirect_dir "
        "or metacopy on): its data is in the lower layers; give them with --lower"
    )
    assert os.listdir(tmp_path) == ["upper"]  # no layer file, not even a temporary one
    with pytest.raises(ImageError, match="inside the upper"):
        write_layer(upper, upper / "l.tar")


def test_an_output_inside_the_upper_by_another_name_is_refused(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "sub").mkdir(parents=True)
    (tmp_path / "ln").symlink_to("upper")
    (tmp_path / "bound").mkdir()
    for out in (tmp_path / "ln/l.tar", tmp_path / "ln/sub/l.tar", tmp_path / "bound/l.tar"):
        if out.parent.name == "bound":
            subprocess.run(["mount", "--bind", upper, tmp_path / "bound"], check=True)
        try:
            with pytest.raises(ImageError, match="inside the upper"):
                write_layer(upper, out)
        finally:
            if out.parent.name == "bound":
                subprocess.run(["umount", "-l", tmp_path / "bound"], check=True)
    assert sorted(os.listdir(upper)) == ["sub"]
    write_layer(upper, tmp_path / "l.tar")  # beside it is fine
