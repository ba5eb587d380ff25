"""``unionfs image layers``: per-layer history, A/C/D counts and hidden bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.image.builders import Layer, Tar, write_oci_layout
from tests.image.test_layout import run


def test_counts_and_hidden_bytes(tmp_path: Path) -> None:
    base = (
        Tar().dir("etc").file("etc/keep", b"1234").file("etc/gone", b"12345")
        .dir("opq").file("opq/old", b"123456").dir("opq/deep").file("opq/deep/f", b"1234567")
        .file("big", b"x" * 1000).hardlink("big2", "big").file("stays", b"s")
    )  # fmt: skip
    mid = Tar().whiteout("etc/gone").opaque("opq").file("opq/new", b"n").file("big", b"small")
    top = Tar().dir("etc").file("etc/keep", b"changed").file("etc/added", b"a")
    layers = [
        Layer(base.bytes(), created_by="/bin/sh -c build base"),
        Layer(mid.bytes(), "none", created_by="/bin/sh -c  rm   things"),
        Layer(top.bytes(), "zstd", created_by="COPY etc /etc"),
    ]
    built = write_oci_layout(tmp_path / "img", layers)
    res = run(
        "image", "layers", "--json", "--cache", os.fspath(tmp_path / "cache"), os.fspath(built.path)
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["digest"] for r in rows] == built.layer_digests
    assert [r["diff_id"] for r in rows] == built.diff_ids
    assert [r["size"] for r in rows] == [len(x.blob) for x in layers]
    assert [r["created_by"] for r in rows] == [x.created_by for x in layers]
    assert [(r["added"], r["changed"], r["deleted"]) for r in rows] == [
        (10, 0, 0),  # every entry of the first layer is new
        (1, 3, 3),  # C etc, opq, big; D etc/gone, opq/old, opq/deep; A opq/new
        (1, 2, 0),  # C etc, etc/keep; A etc/added
    ]
    # Hidden in the first layer: etc/keep (4, overwritten), etc/gone (5, deleted),
    # opq/old and opq/deep/f (6 + 7, behind the opaque directory); not big, replaced
    # by the second layer, whose data its hard link big2 still shows.
    assert [r["hidden_bytes"] for r in rows] == [4 + 5 + 6 + 7, 0, 0]

    res = run("image", "layers", "--cache", os.fspath(tmp_path / "cache"), os.fspath(built.path))
    out = res.stdout.splitlines()
    assert out[0].split() == [
        "LAYER",
        "DIGEST",
        "SIZE",
        "ADDED",
        "CHANGED",
        "DELETED",
        "HIDDEN",
        "CREATED",
        "BY",
    ]
    assert out[2].endswith("/bin/sh -c rm things")
    assert out[1].split()[1] == built.layer_digests[0][:19]
