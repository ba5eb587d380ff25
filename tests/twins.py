"""Twin set-ups: the same layers built twice, one copy under unionfs, one under the
kernel overlay, mounted with the same options, so a test compares what each shows.

Inode numbers of the two copies differ, so they are compared by what they stand
for: ``identity`` names the layer inode behind a path's ``st_ino`` (``l0:a/b`` is
the inode at ``a/b`` in the top lower layer, ``u:x`` the one at ``x`` in the upper).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conformance.snapshot import inode_index
from tests.features import hook_enabled, libfuse_version
from tests.mounting import start_unionfs

__all__ = ["HOOK", "libfuse_version"]

HOOK = hook_enabled()  # `make test` runs both ways


def write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@dataclass
class Twin:
    """One copy: its layers (top first), upper, work and mountpoint."""

    kind: str
    lowers: list[Path]
    upper: Path
    work: Path
    mnt: Path

    def identity(self, path: str) -> str:
        """Which layer inode the st_ino of *path* (below the mount) is."""
        st = os.lstat(self.mnt / path) if path else os.stat(self.mnt)
        index = inode_index(
            [(f"l{i}", os.fsencode(p)) for i, p in enumerate(self.lowers)]
            + [("u", os.fsencode(self.upper))]
        )
        return index.get(st.st_ino, f"not a layer inode ({st.st_ino})")

    def mount(self, options: str = "") -> contextlib.AbstractContextManager[Path]:
        """Mount this copy with its own kind; the mountpoint, unmounted at the end."""
        if self.kind == "kernel":
            return _kernel(self, options)
        return _unionfs(self, options)

    def remount_work(self) -> None:
        """A fresh workdir, for a mount of the other kind over this upper."""
        subprocess.run(["rm", "-rf", os.fspath(self.work)], check=True)
        self.work.mkdir()


def _kernel(t: Twin, options: str) -> contextlib.AbstractContextManager[Path]:
    from tests.mounting import kernel_overlay

    return kernel_overlay(t.lowers, t.mnt, t.upper, t.work, options)


@contextlib.contextmanager
def _unionfs(t: Twin, options: str) -> Iterator[Path]:
    um = start_unionfs(t.lowers, t.mnt, t.upper, t.work, extra_options=options)
    try:
        yield t.mnt
    finally:
        assert um.unmount() == 0, um.log()


def twins(
    tmp_path: Path, fill: Callable[[list[Path]], None], n_lowers: int = 1
) -> tuple[Twin, Twin]:
    """Two copies of the layers *fill* makes (it gets the lowers, top first): unionfs's
    and the kernel's."""
    out = []
    for kind in ("unionfs", "kernel"):
        base = tmp_path / kind
        lowers = [base / f"l{i}" for i in range(n_lowers)]
        dirs = [*lowers, base / "upper", base / "work", base / "mnt"]
        for d in dirs:
            d.mkdir(parents=True)
        fill(lowers)
        out.append(Twin(kind, lowers, base / "upper", base / "work", base / "mnt"))
    return out[0], out[1]


def kernel_over(t: Twin) -> Twin:
    """A kernel-kind view of *t*'s layers (to mount the kernel over unionfs's upper)."""
    return Twin("kernel", t.lowers, t.upper, t.work, t.mnt)


def unionfs_over(t: Twin) -> Twin:
    return Twin("unionfs", t.lowers, t.upper, t.work, t.mnt)


def overlay_xattrs(t: Twin) -> dict[str, dict[bytes, bytes]]:
    """Every overlay xattr in *t*'s upper, with each origin as the header it has and the
    layer inode it names, and the root's random uuid as its length (the rest differs
    between any two copies)."""
    from tests.conformance.snapshot import take

    index = inode_index(
        [(f"l{i}", os.fsencode(p)) for i, p in enumerate(t.lowers)] + [("u", os.fsencode(t.upper))]
    )
    out: dict[str, dict[bytes, bytes]] = {}
    for path, e in take(os.fsencode(t.upper), "upper", index).items():
        xs = {k: v for k, v in e.get("xattrs", {}).items() if b".overlay." in k}
        if xs:
            out[path.decode(errors="backslashreplace")] = xs
    return out
