"""``unionfs image mount`` for tests: a foreground daemon this test owns (by PID),
always unmounted in ``finally``."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.mounting import REPO, UnionMount, mount_type, unionfs_command


def start_image_mount(
    image: str | os.PathLike[str],
    mnt: Path,
    cache: Path,
    extra: Sequence[str] = (),
    timeout: float = 60.0,
) -> UnionMount:
    cmd = [
        *unionfs_command(),
        "image",
        "mount",
        "-f",
        "--cache",
        os.fspath(cache),
        *extra,
        os.fspath(image),
        os.fspath(mnt),
    ]
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    log = mnt.parent / f".{mnt.name}.image-mount.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    um = UnionMount(mnt, proc, log, cmd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mount_type(mnt) == "fuse.unionfs":
            return um
        if proc.poll() is not None:
            raise RuntimeError(f"image mount exited with {proc.returncode}: {um.log()}")
        time.sleep(0.02)
    um.kill()
    raise RuntimeError(f"image mount did not mount within {timeout}s: {um.log()}")


@contextlib.contextmanager
def image_mounted(
    image: str | os.PathLike[str], mnt: Path, cache: Path, extra: Sequence[str] = ()
) -> Iterator[UnionMount]:
    um = start_image_mount(image, mnt, cache, extra)
    try:
        yield um
    finally:
        assert um.unmount() == 0, um.log()


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below *root*: type, mode, owner, content or target, xattrs (values)."""
    import hashlib
    import stat

    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    extra = (st.st_size, hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            xattrs = tuple(
                sorted(
                    (k, os.getxattr(path, k, follow_symlinks=False))
                    for k in os.listxattr(path, follow_symlinks=False)
                )
            )
            out[os.path.relpath(path, root)] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                extra,
                xattrs,
            )
    return out
