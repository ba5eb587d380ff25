"""The image tools against real podman, skopeo and umoci.

One image is built by podman (kernel overlay driver) from a busybox-static base
imported from a local tarball: deletions, an opaque directory, a symlink, a
hard link, a setuid file and an xattr. Then:

- ``podman save`` in both archive formats, ``unionfs image mount`` of each,
  compared file by file with ``podman image mount`` of the same image;
- the same changes made in a unionfs image mount and in a podman container:
  ``unionfs diff`` equals ``podman diff``;
- ``unionfs commit --image`` of the result: skopeo copies it, podman loads and
  runs it, umoci unpacks it to the tree the unionfs mount shows;
- every layer's digest and diff_id equal ``sha256sum`` of the files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engines.conftest import Store, write_context
from tests.image.mounts import image_mounted, tree
from tests.mounting import REPO, unionfs_command

BASE = "localhost/imgtest/base:latest"
BUILT = "localhost/imgtest/built:latest"
CONTAINERFILE = f"""\
FROM {BASE}
RUN set -e; \\
    mkdir -p /data/opq/sub /data/gone/deep; \\
    echo a > /data/opq/a; echo b > /data/opq/sub/b; echo x > /data/gone/deep/x; \\
    echo keep > /data/keep; echo linked > /data/hl1; ln /data/hl1 /data/hl2; \\
    ln -s ../data/keep /data/sym; cp /bin/busybox /data/suid; chmod 4755 /data/suid; \\
    rm /bin/vi
RUN set -e; \\
    rm -rf /data/opq; mkdir /data/opq; echo new > /data/opq/new; \\
    rm -rf /data/gone; rm /data/keep; echo second > /data/keep2; chmod 0700 /data/opq
"""


def unionfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    res = subprocess.run(
        [*unionfs_command(), *args], capture_output=True, text=True, env=env, timeout=300
    )
    if check and res.returncode != 0:
        raise AssertionError(f"unionfs {' '.join(args)} exited {res.returncode}: {res.stderr}")
    return res


def run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload]
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {res.returncode}: {res.stderr}")
    return res  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def saved(kernel_store: Store, base_tar: Path, tools_dir: Path) -> dict[str, Path]:
    """The image built by podman and saved as oci-archive and docker-archive."""
    kernel_store.podman("import", os.fspath(base_tar), BASE)
    ctx = write_context(tools_dir / "ctx", CONTAINERFILE)
    kernel_store.podman(
        "build", "--network", "none", "-t", BUILT, "-f", "Containerfile", os.fspath(ctx)
    )
    out = {}
    for fmt in ("oci-archive", "docker-archive"):
        path = tools_dir / f"built-{fmt}.tar"
        kernel_store.podman("save", "--format", fmt, "-o", os.fspath(path), BUILT)
        out[fmt] = path
    return out


@pytest.fixture(scope="module")
def podman_tree(kernel_store: Store, saved: dict[str, Path]) -> Iterator[Path]:
    """``podman image mount`` of the built image: the reference tree."""
    path = Path(kernel_store.podman("image", "mount", BUILT).stdout.strip())
    try:
        yield path
    finally:
        kernel_store.podman("image", "umount", "-f", BUILT, check=False)


@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive"])
def test_image_mount_equals_podman_image_mount(
    fmt: str, saved: dict[str, Path], podman_tree: Path, tools_dir: Path
) -> None:
    want = tree(podman_tree)
    # What the image must contain for this comparison to mean anything.
    assert "data/gone" not in want and "bin/vi" not in want and "data/keep" not in want
    assert sorted(p for p in want if p.startswith("data/opq")) == ["data/opq", "data/opq/new"]
    assert want["data/suid"][1] == 0o4755
    assert want["data/sym"][4] == "../data/keep"
    assert want["etc/note"][5] == (("user.origin", b"unionfs-test\x00\xff"),)
    mnt = tools_dir / f"mnt-{fmt}"
    mnt.mkdir()
    with image_mounted(saved[fmt], mnt, tools_dir / "cache"):
        got = tree(mnt)
        assert os.lstat(mnt / "data/hl1").st_nlink == 2
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differ = sorted(p for p in set(got) & set(want) if got[p] != want[p])
    assert (missing, extra, differ) == ([], [], []), [
        (p, got.get(p), want.get(p)) for p in differ[:5]
    ]
    assert os.lstat(podman_tree / "data/hl1").st_ino == os.lstat(podman_tree / "data/hl2").st_ino


def test_layers_digests_equal_sha256sum(saved: dict[str, Path], tools_dir: Path) -> None:
    """``image layers`` reports for every layer what sha256sum says of its blob (and of
    the blob uncompressed, for the diff_id)."""
    layout = tools_dir / "sums-layout"
    run("tar", "-xf", os.fspath(saved["oci-archive"]), "-C", os.fspath(_mkdir(layout)))
    rows = json.loads(
        unionfs(
            "image",
            "layers",
            "--json",
            "--cache",
            os.fspath(tools_dir / "cache"),
            os.fspath(layout),
        ).stdout
    )
    assert len(rows) == 3
    for row in rows:
        blob = layout / "blobs/sha256" / row["digest"].split(":")[1]
        assert "sha256:" + run("sha256sum", os.fspath(blob)).stdout.split()[0] == row["digest"]
        raw = run(
            "sh", "-c", f"(gzip -dc < '{blob}' 2>/dev/null || cat '{blob}') | sha256sum"
        ).stdout
        assert "sha256:" + raw.split()[0] == row["diff_id"]
    assert rows[2]["deleted"] >= 4  # opq/a, opq/sub, gone, keep


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def make_changes(root: Path) -> None:
    """add, modify, delete, replace a directory (the same in both worlds)."""
    (root / "data/added").write_text("added\n")
    with open(root / "etc/passwd", "a") as f:
        f.write("user:x:1000:1000::/home/user:/bin/sh\n")
    (root / "data/keep2").unlink()
    shutil.rmtree(root / "data/opq")
    (root / "data/opq").mkdir()
    (root / "data/opq/replaced").write_text("replaced\n")
    (root / "newdir/sub").mkdir(parents=True)
    (root / "newdir/sub/file").write_text("deep\n")
    shutil.rmtree(root / "home")


def cached_lowers(image: str, cache: Path) -> list[str]:
    from unionfs.image.cache import LayerCache
    from unionfs.image.layout import open_image

    c = LayerCache(cache)
    with open_image(image) as img:
        return [os.fspath(c.path(x.diff_id)) for x in reversed(img.layers)]


@pytest.fixture(scope="module")
def container_upper(saved: dict[str, Path], tools_dir: Path) -> dict[str, object]:
    """The changes made in a writable unionfs image mount: its upper, and the merged
    tree the mount showed."""
    upper, work, mnt = (_mkdir(tools_dir / n) for n in ("c-upper", "c-work", "c-mnt"))
    extra = ["--upper", os.fspath(upper), "--work", os.fspath(work)]
    with image_mounted(saved["oci-archive"], mnt, tools_dir / "cache", extra):
        make_changes(mnt)
        merged = tree(mnt)
    return {"upper": upper, "merged": merged}


def test_diff_equals_podman_diff(
    vfs_store: Store, saved: dict[str, Path], container_upper: dict[str, object], tools_dir: Path
) -> None:
    vfs_store.podman("load", "-i", os.fspath(saved["docker-archive"]))
    vfs_store.podman("create", "--name", "changed", BUILT, "true")
    root = Path(vfs_store.podman("mount", "changed").stdout.strip())
    try:
        make_changes(root)
        podman_lines = vfs_store.podman("diff", "changed").stdout.splitlines()
    finally:
        vfs_store.podman("umount", "changed", check=False)
    lowers = cached_lowers(os.fspath(saved["oci-archive"]), tools_dir / "cache")
    ours = unionfs(
        "diff", str(container_upper["upper"]), "--lower", ":".join(lowers)
    ).stdout.splitlines()
    assert sorted(ours) == sorted(podman_lines)
    for line in ("A /data/added", "C /etc/passwd", "D /data/keep2", "C /data/opq",
                 "D /data/opq/new", "A /data/opq/replaced", "A /newdir/sub/file", "D /home"):  # fmt: skip
        assert line in ours


@pytest.fixture(scope="module")
def committed(
    saved: dict[str, Path], container_upper: dict[str, object], tools_dir: Path
) -> dict[str, object]:
    """The container's upper committed onto a layout made by skopeo from the oci-archive."""
    layout = tools_dir / "layout"
    run("skopeo", "copy", f"oci-archive:{saved['oci-archive']}", f"oci:{layout}:base")
    lowers = cached_lowers(f"{layout}:base", tools_dir / "cache")
    out = json.loads(
        unionfs(
            "commit", str(container_upper["upper"]), "--lower", ":".join(lowers),
            "-o", os.fspath(tools_dir / "committed.tar.gz"), "--image", f"{layout}:base",
            "--tag", "committed", "--message", "changed by a test", "--json",
        ).stdout
    )  # fmt: skip
    return {"layout": layout, **out}


def test_commit_digests_equal_sha256sum(committed: dict[str, object], tools_dir: Path) -> None:
    layer = tools_dir / "committed.tar.gz"
    assert committed["digest"] == "sha256:" + run("sha256sum", os.fspath(layer)).stdout.split()[0]
    raw = run("sh", "-c", f"gzip -dc < '{layer}' | sha256sum").stdout
    assert committed["diff_id"] == "sha256:" + raw.split()[0]
    blob = Path(str(committed["layout"])) / "blobs/sha256" / str(committed["digest"]).split(":")[1]
    assert blob.read_bytes() == layer.read_bytes()


def test_committed_image_runs_in_podman(
    kernel_store: Store, committed: dict[str, object], tools_dir: Path
) -> None:
    layout = committed["layout"]
    info = json.loads(run("skopeo", "inspect", f"oci:{layout}:committed").stdout)
    assert info["Layers"][-1] == committed["digest"]
    archive = tools_dir / "committed-oci.tar"
    run(
        "skopeo",
        "copy",
        f"oci:{layout}:committed",
        f"oci-archive:{archive}:localhost/imgtest/committed:latest",
    )
    kernel_store.podman("load", "-i", os.fspath(archive))
    script = (
        "cat /data/added; tail -n 1 /etc/passwd; test ! -e /data/keep2 && echo keep2-gone; "
        "ls /data/opq; cat /newdir/sub/file; test ! -e /home && echo home-gone"
    )
    res = kernel_store.podman(
        "run", "--rm", "localhost/imgtest/committed:latest", "sh", "-c", script
    )
    assert res.stdout.splitlines() == [
        "added",
        "user:x:1000:1000::/home/user:/bin/sh",
        "keep2-gone",
        "replaced",
        "deep",
        "home-gone",
    ]


def test_umoci_unpack_equals_the_merged_tree(
    committed: dict[str, object], container_upper: dict[str, object], tools_dir: Path
) -> None:
    bundle = tools_dir / "bundle"
    run("umoci", "unpack", "--image", f"{committed['layout']}:committed", os.fspath(bundle))
    unpacked = tree(bundle / "rootfs")
    merged = container_upper["merged"]
    assert isinstance(merged, dict)
    differ = sorted(p for p in set(unpacked) | set(merged) if unpacked.get(p) != merged.get(p))
    assert differ == [], [(p, unpacked.get(p), merged.get(p)) for p in differ[:5]]
    # And the committed image, mounted by unionfs from the layout, is that tree too.
    mnt = _mkdir(tools_dir / "committed-mnt")
    with image_mounted(f"{committed['layout']}:committed", mnt, tools_dir / "cache"):
        assert tree(mnt) == unpacked
