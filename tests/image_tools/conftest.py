"""Real podman, skopeo and umoci against the image tools: private stores only.

Two containers-storage stores live in one temporary directory for the session:
``kernel`` (the overlay driver over the kernel's overlayfs: it builds the test
image, so its layers carry real opaque markers, and ``podman image mount`` of it
is the reference tree) and ``vfs`` (the vfs driver: its ``podman diff`` is
docker's whole-tree comparison, the semantics ``unionfs diff`` follows; the
overlay driver's own diff reports a replaced directory as deleted instead).
The machine's own container storage is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engines.conftest import Store, make_base_rootfs, scratch_dir

sys.modules.setdefault("tests.image_tools.conftest", sys.modules[__name__])

TOOLS = ("podman", "skopeo", "umoci", "runc", "conmon", "sha256sum", "tar")


@pytest.fixture(scope="session")
def tools_dir() -> Iterator[Path]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not Path("/bin/busybox").is_file():
        missing.append("busybox-static")
    if missing:
        pytest.skip(
            "image tools not installed (run `bash tests/image_tools/install-deps.sh`): "
            + ", ".join(missing)
        )
    if os.geteuid() != 0:
        pytest.skip("the image tool tests drive rootful podman and need root")
    with scratch_dir("unionfs-image-tools-", "UNIONFS_IMAGE_TOOLS_KEEP", "image tool") as d:
        yield d


def _store(root: Path, name: str, driver: str) -> Store:
    root.mkdir(parents=True)
    store = Store(name=name, root=root, mount_program=None)
    store.write_config(mountopt="nodev")
    if driver != "overlay":
        text = store.storage_conf.read_text().replace('driver = "overlay"', f'driver = "{driver}"')
        store.storage_conf.write_text(text.split("[storage.options.overlay]")[0])
    return store


@pytest.fixture(scope="session")
def kernel_store(tools_dir: Path) -> Iterator[Store]:
    store = _store(tools_dir / "kernel", "kernel-overlay", "overlay")
    try:
        yield store
    finally:
        problems = store.cleanup()
        assert not problems, "\n".join(problems)


@pytest.fixture(scope="session")
def vfs_store(tools_dir: Path) -> Iterator[Store]:
    store = _store(tools_dir / "vfs", "vfs", "vfs")
    try:
        yield store
    finally:
        problems = store.cleanup()
        assert not problems, "\n".join(problems)


@pytest.fixture(scope="session")
def base_tar(tools_dir: Path) -> Path:
    """busybox-static and a file with a user xattr, archived by GNU tar with its xattrs."""
    rootfs = tools_dir / "base-rootfs"
    make_base_rootfs(rootfs)
    note = rootfs / "etc" / "note"
    note.write_text("an xattr on me\n")
    os.setxattr(note, "user.origin", b"unionfs-test\x00\xff")
    tar = tools_dir / "base.tar"
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=user.*", "--numeric-owner", "--owner=0",
         "--group=0", "-cf", os.fspath(tar), "-C", os.fspath(rootfs), "."],
        check=True,
    )  # fmt: skip
    return tar
