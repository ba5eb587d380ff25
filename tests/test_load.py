"""Load: concurrent copy-up, namespace churn, bounded fds and memory.

Sizes and durations are small by default so ``make test`` stays fast;
``make stress DURATION=60`` runs them long and big (UNIONFS_STRESS_SECONDS and
UNIONFS_STRESS_FILES), printing operation counts, errors and the daemon's RSS.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import stat
import subprocess
import sys
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path

from tests.conftest import Mounted, Stack
from tests.mounting import REPO, start_unionfs, unionfs_command
from tests.test_merge import write

SECONDS = float(os.environ.get("UNIONFS_STRESS_SECONDS", "3"))
FILES = int(os.environ.get("UNIONFS_STRESS_FILES", "20000"))


def _writer(path: str, index: int, barrier: Barrier) -> None:
    barrier.wait()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"%d" % index, index)
    finally:
        os.close(fd)


def test_eight_writers_at_once_make_one_copy_up(stack: Stack, mounted: Mounted) -> None:
    write(stack.lowers[0] / "shared", b"." * 8 + b"lower tail" * 100_000)
    um = mounted(args=["-d"])
    barrier = mp.Barrier(8)
    procs = [
        mp.Process(target=_writer, args=(os.fspath(stack.mnt / "shared"), i, barrier))
        for i in range(8)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    data = (stack.mnt / "shared").read_bytes()
    assert data[:8] == b"01234567"  # every writer's byte landed in the one upper copy
    assert data[8:] == b"lower tail" * 100_000
    assert um.log().count("copied up <Node") == 1


def _churn(mnt: str, worker: int, seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """Create, rename, unlink and list in one shared directory; return the names kept."""
    rng = random.Random(worker)
    alive: set[str] = set()
    ops = errors = 0
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        name = f"w{worker}-{i}"
        try:
            choice = rng.random()
            if choice < 0.4 or not alive:
                with open(os.path.join(mnt, name), "wb") as f:
                    f.write(name.encode())
                alive.add(name)
            elif choice < 0.6:
                old = rng.choice(sorted(alive))
                os.rename(os.path.join(mnt, old), os.path.join(mnt, name))
                alive.discard(old)
                alive.add(name)
            elif choice < 0.8:
                old = rng.choice(sorted(alive))
                os.unlink(os.path.join(mnt, old))
                alive.discard(old)
            else:
                listed = {n for n in os.listdir(mnt) if n.startswith(f"w{worker}-")}
                if listed != alive:
                    errors += 1
            ops += 1
        except OSError:
            errors += 1
    out.put((worker, sorted(alive), ops, errors))


def test_parallel_namespace_churn(stack: Stack, mounted: Mounted) -> None:
    for i in range(50):  # some lower names to whiteout along the way
        write(stack.lowers[0] / f"lower-{i}")
    um = mounted()
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    procs = [
        mp.Process(target=_churn, args=(os.fspath(stack.mnt), w, SECONDS, q)) for w in range(4)
    ]
    for p in procs:
        p.start()
    for i in range(0, 50, 2):
        os.unlink(stack.mnt / f"lower-{i}")
    results = [q.get(timeout=SECONDS + 60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    expected = {n for _, alive, _, _ in results for n in alive}
    expected |= {f"lower-{i}" for i in range(1, 50, 2)}
    assert set(os.listdir(stack.mnt)) == expected
    total_ops = sum(r[2] for r in results)
    total_errors = sum(r[3] for r in results)
    print(
        f"\nchurn: {total_ops} operations in {SECONDS}s by 4 processes, {total_errors} errors, "
        f"daemon RSS {_rss_kib(um.pid)} KiB"
    )
    assert total_errors == 0
    for _, alive, _, _ in results:
        for name in alive[:20]:
            assert (stack.mnt / name).read_bytes().startswith(b"w")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def test_walking_a_big_tree_keeps_fds_bounded(stack: Stack, mounted: Mounted) -> None:
    per_dir = 100
    dirs = max(1, FILES // per_dir)
    for d in range(dirs):
        base = stack.lowers[d % 2] / f"d{d // 10}" / f"sub{d}"
        base.mkdir(parents=True, exist_ok=True)
        for f in range(per_dir):
            (base / f"f{f}").touch()
    um = mounted()
    limits = Path(f"/proc/{um.pid}/limits").read_text()
    line = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard  # the soft limit was raised to the hard one
    for _ in range(2):
        seen = 0
        for root, dirnames, filenames in os.walk(stack.mnt):
            for name in filenames:
                os.lstat(os.path.join(root, name))
                seen += 1
        assert seen == dirs * per_dir
    fds = len(os.listdir(f"/proc/{um.pid}/fd"))
    print(
        f"\nwalked {seen} files twice: daemon holds {fds} fds, "
        f"RSS {_rss_kib(um.pid)} KiB, peak {_hwm_kib(um.pid)} KiB"
    )
    assert fds < 1200  # bounded by the per-layer directory fd cache, not by the tree


def test_many_layers_share_the_fd_budget(tmp_path: Path) -> None:
    """Twelve lower layers of 300 directories each, the daemon allowed 2,048 files: a
    walk of the merged tree sees every directory. Each layer cached up to 512 directory
    fds of its own, so the layers together ran the daemon out of fds and every later
    open (a listing, a new file) failed until unmount; now a quarter of the limit is
    shared among them."""
    lowers = [tmp_path / f"l{i}" for i in range(12)]
    for i, lower in enumerate(lowers):
        for d in range(300):
            (lower / "t" / f"d{d}" / f"in{i}").mkdir(parents=True)
    upper, work, mnt = tmp_path / "u", tmp_path / "w", tmp_path / "m"
    for made in (upper, work, mnt):
        made.mkdir()
    um = start_unionfs(
        lowers, mnt, upper, work, command=["prlimit", "--nofile=2048:2048", *unionfs_command()]
    )
    try:
        seen = sum(len(dirnames) for _, dirnames, _ in os.walk(mnt / "t"))
        assert seen == 300 + 300 * 12
        fds = len(os.listdir(f"/proc/{um.pid}/fd"))
        assert fds <= 2048 // 4 + 64, fds
        write(mnt / "new", b"still works")
    finally:
        assert um.unmount() == 0, um.log()


_EMFILE = """
import os, resource, sys
from pathlib import Path
from unionfs.overlay.layers import Layer
root = Path(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
layer = Layer(0, root, writable=False, max_dirfds=512)
for d in range(100):
    layer.dirfd(b"d%d" % d)
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
fd = layer.dirfd(b"d100")  # no fd left: the cache gives back half of its own
assert os.path.samefile(f"/proc/self/fd/{fd}", root / "d100")
print("ok")
"""


def test_a_layer_out_of_fds_gives_back_cached_ones(tmp_path: Path) -> None:
    """With every fd taken (open files), opening one more directory of a layer closes
    the older half of its cache and succeeds, instead of failing (EMFILE) for good."""
    for d in range(101):
        (tmp_path / f"d{d}").mkdir()
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    res = subprocess.run(
        [sys.executable, "-c", _EMFILE, os.fspath(tmp_path)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert (res.returncode, res.stdout) == (0, "ok\n"), res.stderr


def test_closed_files_are_closed_by_the_daemon_too(stack: Stack, mounted: Mounted) -> None:
    """The kernel's RELEASE is answered in C and the daemon closes what the handles held
    in batches (unionfs/fuse/csrc/release.c): at the next open, and within a second when
    none comes. Either way no fd of a closed file stays behind."""
    for i in range(500):
        (stack.lowers[0] / f"f{i}").write_bytes(b"x")
    um = mounted()
    for i in range(500):
        fd = os.open(stack.mnt / f"f{i}", os.O_RDONLY)
        os.read(fd, 1)
        os.close(fd)
    assert _open_files(um.pid) < 20  # closed at each open
    keep = [os.open(stack.mnt / f"f{i}", os.O_RDONLY) for i in range(50)]
    assert _open_files(um.pid) >= 50
    for fd in keep:
        os.close(fd)  # the last closes: no open follows
    deadline = time.monotonic() + 10
    while _open_files(um.pid) > 0:
        assert time.monotonic() < deadline, "released handles still hold their fds"
        time.sleep(0.1)


def _open_files(pid: int) -> int:
    """The daemon's fds of regular files (not its stdio, directory fds, pipes, /dev/fuse)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if int(fd) <= 2:
            continue
        try:
            if stat.S_ISREG(os.stat(f"/proc/{pid}/fd/{fd}").st_mode):
                n += 1
        except OSError:
            continue  # closed meanwhile
    return n
