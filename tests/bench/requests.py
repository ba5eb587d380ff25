"""How many FUSE requests each daemon gets per operation (``bench.py --count``).

Time on a FUSE mount is mostly round trips, so fewer requests per operation is
the first thing to look for. Three operations, each on a fresh mount: extracting
the W6 archive (per file), 4k random writes to a copied-up file (per write), and
``/bin/true`` started from a shell in a chroot (per exec; needs the debootstrap
data set). fuse-overlayfs runs with ``-d`` and its libfuse debug lines are
counted; unionfs counts its own requests (the line it logs at unmount), so it is
not slowed by a debug log. The numbers do not depend on timing, so this mode
runs each operation once.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from competitors import Competitor, FuseOverlayfs, Mounted, Unionfs
from dataset import Dataset
from report import _md, fmt_num
from workloads import bind_dev, timed

WRITES = 2000


def _untar(m: Mounted, ds: Dataset) -> int:
    target = m.root / "bench-untar"
    target.mkdir()
    timed(["tar", "-C", os.fspath(target), "-xf", os.fspath(ds.tarball)])
    subprocess.run(["sync"], check=True)
    return int(ds.spec.untar_files)


def _random_writes(m: Mounted, ds: Dataset) -> int:
    path = m.root / ds.fio_rel
    os.utime(path)  # the copy-up first, as in W8
    size = ds.spec.fio_size
    rng = random.Random(1)
    block = b"w" * 4096
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(WRITES):
            os.pwrite(fd, block, rng.randrange(size // 4096) * 4096)
    finally:
        os.close(fd)
    return WRITES


def _execs(m: Mounted, ds: Dataset) -> int:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    loop = "i=0; while [ $i -lt 100 ]; do /bin/true; i=$((i+1)); done"
    with bind_dev(m.root):
        subprocess.run(["chroot", os.fspath(m.root), "/bin/sh", "-c", loop], check=True, env=env)
    return 100


OPERATIONS: list[tuple[str, str, Callable[[Mounted, Dataset], int], bool]] = [
    ("untar", "file", _untar, False),
    ("4k random write", "write", _random_writes, False),
    ("exec /bin/true", "exec", _execs, True),
]

_LIBFUSE_DEBUG = re.compile(rb"opcode: (\w+) \(\d+\)")


def _count(comp: Competitor, log: Path) -> Counter[str]:
    text = log.read_bytes() if log.exists() else b""
    if isinstance(comp, Unionfs):
        for line in reversed(text.splitlines()):
            if b" requests: " in line:
                pairs = (kv.split(b"=") for kv in line.split(b" requests: ", 1)[1].split())
                return Counter({k.decode().upper(): int(v) for k, v in pairs})
        return Counter()
    return Counter(m.group(1).decode() for m in _LIBFUSE_DEBUG.finditer(text))


def count_requests(
    ds: Dataset, unionfs: Unionfs, run_root: Path, log: Callable[[str], None]
) -> str:
    """Run every operation once per daemon; return the table."""
    fuse_overlayfs = FuseOverlayfs(debug=True)
    comps: list[Competitor] = [c for c in (fuse_overlayfs, unionfs) if c.available() is None]
    rows = [["operation", "daemon", "requests per op", "most frequent (per op)"], ["---"] * 4]
    for name, unit, run, needs_rootfs in OPERATIONS:
        if needs_rootfs and not ds.has_rootfs:
            log(f"count: skipping {name} (the data set has no rootfs)")
            continue
        for comp in comps:
            trial = run_root / f"count-{comp.name}"
            try:
                with comp.mount(ds.lowers, trial) as m:
                    n = run(m, ds)
                counts = _count(comp, trial / "daemon.log")
            finally:
                subprocess.run(["rm", "-rf", "--one-file-system", os.fspath(trial)], check=False)
            for noise in ("INIT", "DESTROY", "STATFS"):
                counts.pop(noise, None)
            total = sum(counts.values())
            top = ", ".join(f"{k.lower()} {fmt_num(v / n)}" for k, v in counts.most_common(5))
            rows.append([f"{name} (per {unit})", comp.name, fmt_num(total / n), top])
            log(f"count: {name} on {comp.name}: {total} requests for {n} {unit}s")
    return str(_md(rows))
