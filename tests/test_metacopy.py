"""metacopy=on, as the kernel overlay does it: metadata changes copy up metadata
only, the data follows on the first open for writing, and each kind mounts the
upper the other wrote. Every test runs the same steps on unionfs and on the
kernel overlay over a copy of the same layers and compares what they show.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.treesnap import diff, snapshot
from tests.twins import Twin, kernel_over, overlay_xattrs, twins, unionfs_over, write

SIZE = 300_000


def _rootfs(lowers: list[Path]) -> None:
    for d in ("bin", "lib/x", "etc"):
        for i in range(5):
            write(lowers[0] / d / f"f{i}", bytes([i]) * SIZE)
    os.symlink("bin/f0", lowers[0] / "link")
    os.link(lowers[0] / "bin" / "f1", lowers[0] / "etc" / "hard")


def _files(t: Twin) -> dict[str, tuple[int, int, str]]:
    """Size, blocks and content hash of every regular file, as the mount shows them."""
    out = {}
    for root, _, names in os.walk(t.mnt):
        for n in names:
            p = Path(root) / n
            if p.is_symlink():
                continue
            st = p.stat()
            out[str(p.relative_to(t.mnt))] = (
                st.st_size,
                st.st_blocks,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return out


def _upper_blocks(t: Twin) -> int:
    return sum(
        os.lstat(Path(root) / n).st_blocks for root, _, names in os.walk(t.upper) for n in names
    )


def test_chown_r_copies_metadata_only(tmp_path: Path) -> None:
    u, k = twins(tmp_path, _rootfs)
    seen = {}
    for t in (u, k):
        with t.mount("metacopy=on"):
            subprocess.run(["chown", "-R", "1000:1000", os.fspath(t.mnt)], check=True)
            seen[t.kind] = (snapshot(t.mnt, mtimes=False), _files(t))
    assert diff(seen["unionfs"][0], seen["kernel"][0]) == []
    assert seen["unionfs"][1] == seen["kernel"][1]  # st_blocks are the lower data's
    assert overlay_xattrs(u) == overlay_xattrs(k)
    assert _upper_blocks(u) == _upper_blocks(k) < 15 * SIZE // 512 // 10  # no data copied


def test_the_first_open_for_writing_copies_the_data(tmp_path: Path) -> None:
    u, k = twins(tmp_path, _rootfs)
    seen = {}
    for t in (u, k):
        with t.mount("metacopy=on"):
            os.chmod(t.mnt / "bin" / "f2", 0o700)
            os.rename(t.mnt / "bin" / "f3", t.mnt / "etc" / "moved")
            os.link(t.mnt / "lib" / "x" / "f4", t.mnt / "etc" / "linked")
            with open(t.mnt / "bin" / "f2", "rb") as f:  # reads the lower data
                head = f.read(10)
            with open(t.mnt / "bin" / "f2", "r+b") as f:  # copies the data in place
                f.write(b"changed")
            with open(t.mnt / "etc" / "moved", "ab") as f:
                f.write(b"tail")
            os.truncate(t.mnt / "etc" / "linked", 100)
            seen[t.kind] = (head, snapshot(t.mnt, mtimes=False), _files(t))
    assert seen["unionfs"][0] == seen["kernel"][0]
    assert diff(seen["unionfs"][1], seen["kernel"][1]) == []
    assert seen["unionfs"][2] == seen["kernel"][2]
    assert overlay_xattrs(u) == overlay_xattrs(k)


@pytest.mark.parametrize("writer", ["unionfs", "kernel"])
def test_each_kind_shows_the_tree_the_other_wrote_with_metacopy(
    tmp_path: Path, writer: str
) -> None:
    u, k = twins(tmp_path, _rootfs)
    first = u if writer == "unionfs" else k
    with first.mount("metacopy=on"):
        subprocess.run(["chown", "-R", "1:1", os.fspath(first.mnt / "lib")], check=True)
        os.rename(first.mnt / "bin" / "f0", first.mnt / "etc" / "f0")
        written = (snapshot(first.mnt), _files(first))
    first.remount_work()
    reader = kernel_over(first) if writer == "unionfs" else unionfs_over(first)
    with reader.mount("metacopy=on"):
        assert diff(snapshot(reader.mnt), written[0]) == []
        assert _files(reader) == written[1]
    reader.remount_work()
    with reader.mount():  # without metacopy=on the kernel refuses to follow them
        with pytest.raises(PermissionError):
            os.stat(reader.mnt / "lib" / "x" / "f0")


def _broken(lowers: list[Path]) -> None:
    write(lowers[0] / "bottom", b"")
    os.truncate(lowers[0] / "bottom", 4)  # sparse, as every metadata-only copy is made
    os.setxattr(lowers[0] / "bottom", b"trusted.overlay.metacopy", b"")  # nothing below it


@pytest.mark.parametrize("mode", ["metacopy=off", "metacopy=on"])
def test_broken_metadata_only_copies_fail_as_on_the_kernel(tmp_path: Path, mode: str) -> None:
    """A metadata-only copy with no data below is EIO; found without metacopy=on,
    EPERM, but only once something is found below it (as ovl_lookup orders them)."""
    u, k = twins(tmp_path, _broken)
    seen: dict[str, list[str]] = {}
    for t in (u, k):
        write(t.upper / "orphan", b"")
        os.truncate(t.upper / "orphan", 4)
        os.setxattr(t.upper / "orphan", b"trusted.overlay.metacopy", b"")
        with t.mount(mode):
            seen[t.kind] = []
            for name in ("orphan", "bottom"):
                try:
                    os.stat(t.mnt / name)
                    seen[t.kind].append("ok")
                except OSError as e:
                    seen[t.kind].append(errno.errorcode[e.errno or 0])
    assert seen["unionfs"] == seen["kernel"]
