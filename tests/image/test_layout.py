"""Reading images (OCI layout, OCI archive, docker archive), checking every digest,
and the layer cache that keeps only verified, completely unpacked layers."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.image.builders import (
    Built,
    Layer,
    Tar,
    config_for,
    gz,
    sha256,
    write_docker_archive,
    write_oci_archive,
    write_oci_layout,
)
from tests.mounting import REPO, unionfs_command
from unionfs.image.cache import LayerCache, clean_stale, publish
from unionfs.image.digest import ImageError
from unionfs.image.layout import open_image


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    return subprocess.run(
        [*unionfs_command(), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def two_layers(compression: str = "gzip") -> list[Layer]:
    base = Tar().dir("etc").file("etc/a", b"A").file("etc/b", b"B").bytes()
    top = Tar().whiteout("etc/b").file("etc/c", b"C").bytes()
    return [Layer(base, compression, "base"), Layer(top, compression, "top")]


def fill_cache(ref: str, cache: Path) -> list[Path]:
    c = LayerCache(cache)
    with open_image(ref) as image:
        return [c.ensure(layer, len(image.layers)) for layer in image.layers]


@pytest.mark.parametrize("fmt", ["layout", "oci-archive", "docker-archive"])
@pytest.mark.parametrize("compression", ["gzip", "none", "zstd"])
def test_every_format_and_compression_unpacks_to_the_same_layers(
    tmp_path: Path, fmt: str, compression: str
) -> None:
    layers = two_layers(compression)
    if fmt == "layout":
        built = write_oci_layout(tmp_path / "img", layers)
    elif fmt == "oci-archive":
        built = write_oci_archive(tmp_path / "img.tar", layers)
    else:
        built = write_docker_archive(tmp_path / "img.tar", layers)
    with open_image(os.fspath(built.path)) as image:
        assert [str(x.diff_id) for x in image.layers] == built.diff_ids
        assert [x.created_by for x in image.layers] == ["base", "top"]
        if fmt != "docker-archive":
            assert [str(x.digest) for x in image.layers] == built.layer_digests
    dirs = fill_cache(os.fspath(built.path), tmp_path / "cache")
    assert [d.name for d in dirs] == [d.split(":")[1] for d in built.diff_ids]
    assert (dirs[0] / "etc/a").read_bytes() == b"A"
    assert os.lstat(dirs[1] / "etc/b").st_rdev == 0  # the kernel whiteout


def test_tags_pick_the_image(tmp_path: Path) -> None:
    a = write_oci_layout(tmp_path / "img", [Layer(Tar().file("a", b"1").bytes())], tag="one")
    b = write_oci_layout(tmp_path / "img", [Layer(Tar().file("b", b"2").bytes())], tag="two")
    with open_image(f"{tmp_path}/img:two") as image:
        assert str(image.layers[0].diff_id) == b.diff_ids[0]
    with open_image(f"{tmp_path}/img:one") as image:
        assert str(image.layers[0].diff_id) == a.diff_ids[0]
    with pytest.raises(ImageError, match=r"holds 2 images; name one as .*img:TAG \(one, two\)"):
        open_image(f"{tmp_path}/img")
    with pytest.raises(ImageError, match=r"no image tagged 'three' \(tags: one, two\)"):
        open_image(f"{tmp_path}/img:three")


def test_docker_archive_repo_tags(tmp_path: Path) -> None:
    built = write_docker_archive(
        tmp_path / "d.tar", two_layers(), tags=("localhost/app:1.0", "localhost/app:latest")
    )
    for ref in ("localhost/app:1.0", "app:1.0", "app", "app:latest"):
        with open_image(f"{built.path}:{ref}") as image:
            assert len(image.layers) == 2


def _corrupt_blob(built: Built, digest: str) -> None:
    path = built.path / "blobs/sha256" / digest.split(":")[1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _assert_cache_empty(cache: Path) -> None:
    assert os.listdir(cache / "layers/sha256") == []
    assert os.listdir(cache / "tmp") == []


def test_blob_digest_mismatch_is_refused_and_nothing_cached(tmp_path: Path) -> None:
    layers = two_layers("none")
    # The same length, one different byte: only the digest can tell.
    tampered = bytearray(layers[1].tar)
    tampered[600] ^= 1
    layers[1].blob_override = bytes(tampered)
    built = write_oci_layout(tmp_path / "img", layers)
    with pytest.raises(ImageError) as e:
        fill_cache(os.fspath(built.path), tmp_path / "cache")
    assert str(e.value) == (
        f"layer 2/2 {built.layer_digests[1][:19]}: blob digest mismatch: "
        f"expected {built.layer_digests[1]}, content is {sha256(bytes(tampered))}"
    )
    # The first layer is fine and stays; the bad one left nothing behind.
    assert os.listdir(tmp_path / "cache/layers/sha256") == [built.diff_ids[0].split(":")[1]]
    assert os.listdir(tmp_path / "cache/tmp") == []


def test_a_blob_larger_than_its_descriptor_is_not_read_past_it(tmp_path: Path) -> None:
    layers = two_layers()
    real = layers[1].blob
    # Valid gzip of a valid tar, much larger than the descriptor says: refused once
    # the reader passes the descriptor's size, before the large file is unpacked.
    layers[1].blob_override = gz(Tar().file("big", os.urandom(4 << 20)).bytes())
    built = write_oci_layout(tmp_path / "img", layers)
    with pytest.raises(ImageError) as e:
        fill_cache(os.fspath(built.path), tmp_path / "cache")
    assert str(e.value) == (
        f"layer 2/2 {built.layer_digests[1][:19]}: blob size mismatch: "
        f"expected {len(real)} bytes, the blob is larger"
    )
    assert os.listdir(tmp_path / "cache/layers/sha256") == [built.diff_ids[0].split(":")[1]]
    assert os.listdir(tmp_path / "cache/tmp") == []


def test_sha512_diff_ids_are_checked_with_sha512(tmp_path: Path) -> None:
    layers = two_layers("none")
    diff_ids = [f"sha512:{hashlib.sha512(x.tar).hexdigest()}" for x in layers]
    built = write_oci_layout(tmp_path / "img", layers, config=config_for(layers, diff_ids))
    paths = fill_cache(os.fspath(built.path), tmp_path / "cache")
    assert [(p.parent.name, p.name) for p in paths] == [
        ("sha512", d.split(":")[1]) for d in diff_ids
    ]
    assert (paths[1] / "etc/c").read_bytes() == b"C"


def test_diff_id_mismatch_is_refused(tmp_path: Path) -> None:
    layers = two_layers()
    wrong = sha256(b"something else")
    built = write_oci_layout(
        tmp_path / "img", layers, config=config_for(layers, [wrong, sha256(layers[1].tar)])
    )
    with pytest.raises(ImageError) as e:
        fill_cache(os.fspath(built.path), tmp_path / "cache")
    assert str(e.value) == (
        f"layer 1/2 {built.layer_digests[0][:19]}: diff_id mismatch: the config says {wrong}, "
        f"the uncompressed tar is {built.diff_ids[0]}"
    )
    _assert_cache_empty(tmp_path / "cache")


def test_manifest_and_config_digests_are_checked(tmp_path: Path) -> None:
    built = write_oci_layout(tmp_path / "img", two_layers())
    _corrupt_blob(built, built.config_digest)
    with pytest.raises(ImageError, match=r"config sha256:[0-9a-f]{12}: digest mismatch"):
        open_image(os.fspath(built.path))
    built = write_oci_layout(tmp_path / "img2", two_layers())
    _corrupt_blob(built, built.manifest_digest)
    with pytest.raises(ImageError, match=r"manifest sha256:[0-9a-f]{12}: digest mismatch"):
        open_image(os.fspath(built.path))


def test_a_digest_never_becomes_a_path_outside_blobs(tmp_path: Path) -> None:
    built = write_oci_layout(tmp_path / "img", two_layers())
    index = json.loads((built.path / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:../../../../etc/passwd"
    (built.path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match=r"malformed digest 'sha256:\.\./"):
        open_image(os.fspath(built.path))


def test_layer_count_must_match_diff_ids(tmp_path: Path) -> None:
    layers = two_layers()
    built = write_oci_layout(
        tmp_path / "img", layers, config=config_for(layers, [sha256(layers[0].tar)])
    )
    with pytest.raises(ImageError, match="the manifest lists 2 layers, the config 1 diff_ids"):
        open_image(os.fspath(built.path))


def test_cache_hit_unpacks_nothing(tmp_path: Path) -> None:
    built = write_oci_layout(tmp_path / "img", two_layers())
    first = fill_cache(os.fspath(built.path), tmp_path / "cache")
    marker = first[0] / "etc" / "added-after"
    marker.write_text("the cache is not unpacked again")
    # Blobs gone: a hit must not even open them.
    for d in built.layer_digests:
        (built.path / "blobs/sha256" / d.split(":")[1]).unlink()
    again = fill_cache(os.fspath(built.path), tmp_path / "cache")
    assert again == first and marker.exists()


def test_stale_temporary_unpack_is_cleaned(tmp_path: Path) -> None:
    built = write_oci_layout(tmp_path / "img", two_layers())
    LayerCache(tmp_path / "cache")
    # A directory named like an unpack by a process that no longer exists.
    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = tmp_path / "cache/tmp" / f"0123456789abcdef.{proc.pid}.xyz"
    (stale / "half").mkdir(parents=True)
    fill_cache(os.fspath(built.path), tmp_path / "cache")
    assert not stale.exists()


def test_a_live_unpack_is_not_cleaned_whatever_its_pid_says(tmp_path: Path) -> None:
    """An unpack in another pid namespace has a pid this one cannot see (or sees
    as some other process): its temporary directory is told live by its lock."""
    built = write_oci_layout(tmp_path / "img", two_layers())
    LayerCache(tmp_path / "cache")
    proc = subprocess.Popen(["true"])
    proc.wait()
    live = tmp_path / "cache/tmp" / f"0123456789abcdef.{proc.pid}.xyz"
    (live / "half").mkdir(parents=True)
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what unpack_into holds while it works
        fill_cache(os.fspath(built.path), tmp_path / "cache")
        assert (live / "half").is_dir()
    finally:
        os.close(fd)
    clean_stale(tmp_path / "cache/tmp")
    assert os.listdir(tmp_path / "cache/tmp") == []


def test_publishing_never_replaces_a_layer_already_there(tmp_path: Path) -> None:
    """A layer with no entries is an empty directory: a second unpack of it must not
    rename over the first, which a mount may be using."""
    final = tmp_path / "layer"
    final.mkdir()
    ino = os.stat(final).st_ino
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    assert not publish(os.fspath(tmp), final)
    assert os.stat(final).st_ino == ino and tmp.is_dir()
    os.rmdir(final)
    assert publish(os.fspath(tmp), final)
    assert not tmp.exists()


def test_zstd_needs_no_media_type_to_be_told(tmp_path: Path) -> None:
    """Compression is read from the blob's magic bytes, whatever the media type says."""
    layers = two_layers("zstd")
    built = write_oci_layout(tmp_path / "img", layers)
    mpath = built.path / "blobs/sha256" / built.manifest_digest.split(":")[1]
    manifest = json.loads(mpath.read_text())
    assert manifest["layers"][0]["mediaType"].endswith("+zstd")
    dirs = fill_cache(os.fspath(built.path), tmp_path / "cache")
    assert (dirs[1] / "etc/c").read_bytes() == b"C"


def test_cli_image_unpack_and_layer_import(tmp_path: Path) -> None:
    built = write_oci_archive(tmp_path / "img.tar", two_layers())
    res = run("image", "unpack", os.fspath(built.path), os.fspath(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"lowerdir={tmp_path}/out/002:{tmp_path}/out/001\n"
    assert (tmp_path / "out/001/etc/b").read_bytes() == b"B"
    assert os.lstat(tmp_path / "out/002/etc/b").st_rdev == 0

    layer = tmp_path / "top.tar.gz"
    layer.write_bytes(two_layers()[1].blob)
    res = run("layer", "import", "--json", os.fspath(layer), os.fspath(tmp_path / "imported"))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["diff_id"] == built.diff_ids[1]
    assert out["digest"] == sha256(layer.read_bytes())
    assert sorted(os.listdir(tmp_path / "imported/etc")) == ["b", "c"]

    res = run("layer", "import", os.fspath(layer), os.fspath(tmp_path / "imported"))
    assert (res.returncode, res.stderr) == (
        1,
        f"unionfs: {tmp_path}/imported: exists and is not an empty directory\n",
    )


def _syncfs_calls(*args: str) -> int:
    """How many syncfs calls a unionfs command makes, under strace."""
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    res = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=syncfs", "-o", "/dev/stderr", *unionfs_command(), *args],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return sum("syncfs(" in line for line in res.stderr.splitlines())


def test_import_and_unpack_flush_to_disk_only_with_sync(tmp_path: Path) -> None:
    """Like tar -x, an unpack into a directory of the user's leaves the flushing to
    the kernel; --sync waits for the disk before the directory gets its name."""
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(two_layers()[0].blob)
    assert _syncfs_calls("layer", "import", os.fspath(layer), os.fspath(tmp_path / "a")) == 0
    assert (
        _syncfs_calls("layer", "import", "--sync", os.fspath(layer), os.fspath(tmp_path / "b")) >= 1
    )
    assert (tmp_path / "b/etc/a").read_bytes() == b"A"
    built = write_oci_archive(tmp_path / "img.tar", two_layers())
    assert _syncfs_calls("image", "unpack", os.fspath(built.path), os.fspath(tmp_path / "c")) == 0
    assert (
        _syncfs_calls("image", "unpack", "--sync", os.fspath(built.path), os.fspath(tmp_path / "d"))
        >= 2
    )


def test_the_cache_flushes_each_layer_before_it_enters(tmp_path: Path) -> None:
    """The cache trusts what it holds, so a layer's data is on disk before its
    rename (after a power loss, a layer is there whole or not at all); a cached
    image is used without flushing anything."""
    built = write_oci_archive(tmp_path / "img.tar", two_layers())
    args = ["image", "mount", "--cache", os.fspath(tmp_path / "cache"), "--print-kernel-mount"]
    args += [os.fspath(built.path), os.fspath(tmp_path / "mnt")]
    assert _syncfs_calls(*args) >= 2
    assert len(os.listdir(tmp_path / "cache/layers/sha256")) == 2
    assert _syncfs_calls(*args) == 0
