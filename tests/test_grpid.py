"""Ownership of new entries on an upper filesystem that gives them their directory's group
(``grpid``), and the VFS's setgid rule, against the kernel overlay on the same upper.

Apart from ``test_namespace.py``: it needs a loop device for its own ext4, which the
container stage (``examples/ci-container.sh``) does not have.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.features import hook_enabled
from tests.mounting import mounted_by, start_unionfs
from tests.test_namespace import let_others_in
from tests.twins import twins
from unionfs.fuse.hook import PYTHON_CREATES_ENV


@contextlib.contextmanager
def _ext4(at: Path, options: str) -> Iterator[Path]:
    """A fresh ext4 filesystem mounted at *at* with *options* (a loop device)."""
    image = at.parent / (at.name + ".img")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", os.fspath(image)], check=True, capture_output=True)
    at.mkdir()
    try:
        with mounted_by(["mount", "-o", f"loop,{options}", os.fspath(image)], at):
            yield at
    finally:
        image.unlink()


_GROUP_MAKES = """
import os, sys
os.umask(0o022)
for d in sys.argv[1:]:
    for name, mode in (("f644", 0o644), ("f2755", 0o2755), ("f2644", 0o2644)):
        os.close(os.open(os.path.join(d, name), os.O_CREAT | os.O_WRONLY, mode))
    os.mkdir(os.path.join(d, "sub"))
    os.close(os.open(os.path.join(d, "sub", "in"), os.O_CREAT | os.O_WRONLY, 0o644))
    os.mkfifo(os.path.join(d, "fifo"))
    os.symlink("target", os.path.join(d, "link"))
"""


def _group_entries(mnt: Path) -> None:
    """Root's and user 1000's (in no other group) new entries in three directories of
    group 2000: a lower one, a lower setgid one, and one only in the upper (where the
    hook answers CREATE), made now."""
    (mnt / "up").mkdir()
    os.chown(mnt / "up", 0, 2000)
    os.chmod(mnt / "up", 0o777)
    for d in ("low", "lowsgid", "up"):
        os.close(os.open(mnt / d / "rootf", os.O_CREAT | os.O_WRONLY, 0o644))
        os.mkdir(mnt / d / "rootd")
    dirs = [os.fspath(mnt / d) for d in ("low", "lowsgid", "up")]
    made = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", sys.executable, "-c",
         _GROUP_MAKES, *dirs],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr


def _owners(top: Path) -> dict[str, tuple[int, int, str]]:
    """Owner, group and mode of every entry below *top*."""
    return {
        str(p.relative_to(top)): (st.st_uid, st.st_gid, stat.filemode(st.st_mode))
        for p in sorted(top.rglob("*"))
        if (st := os.lstat(p))
    }


@pytest.mark.parametrize("how", ["plain", "python"])
@pytest.mark.parametrize("fs_options", ["grpid", "nogrpid"])
def test_new_entries_take_the_group_the_upper_filesystem_gives_the_kernel_overlays(
    tmp_path: Path, fs_options: str, how: str
) -> None:
    """An upper filesystem mounted ``grpid`` (ext4 here) gives every new entry its
    directory's group, and a new directory no setgid bit of its own: the kernel
    overlay's entries too, since it makes them on the upper. unionfs finds this out at
    mount, and gives the entries it builds in the workdir, or made in place as the
    daemon, or made in C as the caller, the same owners. Either way, a file in a setgid
    directory keeps a setgid bit its maker asked for without being in the directory's
    group when it comes without group-exec (the VFS's rule). The kernel overlay over
    the same layers is the oracle, for root's and another user's files, setgid files,
    directories, fifos and symlinks."""
    assert subprocess.run(["losetup", "-f"], capture_output=True).returncode == 0, "no loop device"

    def fill(lowers: list[Path]) -> None:
        for d, mode in (("low", 0o777), ("lowsgid", 0o2777)):
            (lowers[0] / d).mkdir()
            os.chown(lowers[0] / d, 0, 2000)
            os.chmod(lowers[0] / d, mode)

    with _ext4(tmp_path / "fs", fs_options) as fs:
        os.chmod(fs, 0o755)
        let_others_in(Stack(fs, [], fs, fs, fs))
        u, k = twins(fs, fill)
        with k.mount() as mnt:
            _group_entries(mnt)
        env = {PYTHON_CREATES_ENV: "1"} if how == "python" else {}
        um = start_unionfs(u.lowers, u.mnt, u.upper, u.work, env=env)
        try:
            _group_entries(u.mnt)
            shown = _owners(u.mnt)
        finally:
            assert um.unmount() == 0, um.log()
        got, expected, log = _owners(u.upper), _owners(k.upper), um.log()
    assert got == expected
    assert {p: o for p, o in shown.items() if p in got} == got
    if fs_options == "grpid":
        assert expected["low/f644"][:2] == (1000, 2000) and expected["low/sub"][2] == "drwxr-xr-x"
    else:
        assert expected["low/f644"][:2] == (1000, 1000)
    assert expected["lowsgid/f2644"][2] == "-rw-r-Sr--"
    if how == "plain" and hook_enabled():
        assert (_in_c_creates(log) or 0) >= 4, log


def _in_c_creates(log: str) -> int | None:
    found = re.search(r"creates: (\d+)", log)
    return int(found.group(1)) if found else None
