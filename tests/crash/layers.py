"""The lower layers the crash workload runs over, built from a seed.

Two lowers shaped like a small root filesystem: merged directories, a file and a
directory that the top lower overrides, an opaque directory and a whiteout in
the top lower, hard links, symlinks, a FIFO, setuid and sticky modes, other
owners, user xattrs, and big files whose copy-up takes a while. Every time in
them is a fixed time before 2010 (see :mod:`tests.crash.tree`).
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

from unionfs.overlay.markers import TRUSTED

MiB = 1 << 20
BIG_FILES = {"usr/lib/big.img": 16 * MiB, "var/cache/big.db": 8 * MiB, "opt/big.bin": 4 * MiB}


def _old_time(rng: random.Random) -> int:
    return rng.randrange(978307200, 1230768000) * 10**9  # 2001..2008


def build_lowers(root: Path, seed: int, big: bool = True) -> list[Path]:
    """Create ``root/l1`` (top) and ``root/l2`` and return them, top first."""
    rng = random.Random(seed)
    l1, l2 = root / "l1", root / "l2"
    for layer in (l1, l2):
        layer.mkdir()

    def data(n: int) -> bytes:
        return rng.randbytes(n)

    def f(layer: Path, path: str, size: int, mode: int = 0o644, owner: int = 0) -> None:
        p = layer / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data(size))
        os.chown(p, owner, owner)
        os.chmod(p, mode)

    def d(layer: Path, path: str, mode: int = 0o755, owner: int = 0) -> None:
        p = layer / path
        p.mkdir(parents=True, exist_ok=True)
        os.chown(p, owner, owner)
        os.chmod(p, mode)

    # The bottom layer: a small system.
    for name in ("passwd", "group", "hosts", "fstab"):
        f(l2, f"etc/{name}", rng.randrange(50, 3000))
    for name in ("a.conf", "b.conf", "c.conf"):
        f(l2, f"etc/conf.d/{name}", rng.randrange(10, 500))
    os.setxattr(l2 / "etc/hosts", "user.note", b"lower")
    f(l2, "usr/bin/tool", 20000, 0o755)
    os.link(l2 / "usr/bin/tool", l2 / "usr/bin/tool-hardlink")
    os.symlink("tool", l2 / "usr/bin/sh")
    f(l2, "usr/bin/suid", 3000, 0o4755)
    f(l2, "usr/lib/libx.so.1", 200_000, 0o755)
    os.symlink("libx.so.1", l2 / "usr/lib/libx.so")
    for pkg in ("pkg1", "pkg2", "pkg3"):
        for name in ("README", "COPYING", "NEWS"):
            f(l2, f"usr/share/doc/{pkg}/{name}", rng.randrange(100, 9000))
    f(l2, "var/log/syslog", 65536, 0o640)
    f(l2, "var/log/old.log", 5000, 0o640)
    d(l2, "var/empty")
    d(l2, "var/spool/mail", 0o1777)
    f(l2, "home/user/notes.txt", 4000, 0o600, owner=1000)
    f(l2, "home/user/docs/report.txt", 12000, 0o644, owner=1000)
    f(l2, "home/user/docs/draft.txt", 300, 0o644, owner=1000)
    d(l2, "home/user/docs", 0o750, owner=1000)
    d(l2, "home/user", 0o700, owner=1000)
    d(l2, "tmp", 0o1777)
    d(l2, "srv/www")
    for i in range(6):
        f(l2, f"srv/www/page{i}.html", rng.randrange(100, 20000))
    os.mkfifo(l2 / "var/fifo", 0o620)
    for path, size in BIG_FILES.items():
        f(l2, path, size if big else size // 64)
    # The top layer: overrides, merges, an opaque directory and a whiteout.
    f(l1, "etc/hosts", 400)
    f(l1, "etc/new.conf", 90)
    f(l1, "etc/conf.d/d.conf", 70)
    d(l1, "usr/share/doc/pkg2")
    os.setxattr(l1 / "usr/share/doc/pkg2", TRUSTED.opaque, b"y")
    f(l1, "usr/share/doc/pkg2/README", 600)
    d(l1, "var/log")
    os.mknod(l1 / "var/log/old.log", stat.S_IFCHR | 0o600, 0)
    f(l1, "srv/www/page0.html", 700)
    f(l1, "opt/app/run.sh", 300, 0o755)
    f(l1, "opt/app/data/items.db", 40000)
    # Fixed old times everywhere, directories last.
    for layer in (l1, l2):
        for dirpath, dirnames, filenames in os.walk(layer, topdown=False):
            for name in filenames + dirnames:
                p = os.path.join(dirpath, name)
                if not stat.S_ISCHR(os.lstat(p).st_mode):
                    t = _old_time(rng)
                    os.utime(p, ns=(t, t), follow_symlinks=False)
        t = _old_time(rng)
        os.utime(layer, ns=(t, t))
    return [l1, l2]
