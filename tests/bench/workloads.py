"""The workloads (W1-W9). Each trial runs one group on a fresh mount.

Why grouped: some numbers only make sense after another on the *same* mount
(W2 "warm walk" is the walk after W1's cold one; W4 warm follows W4 cold; the
fio random-write run follows the random-read run plus an untimed copy-up).
Every group gets its own fresh mount and empty upper, as the issue asks.

All timing uses ``time.perf_counter`` around the real tool (find, tar, dd,
fio, chroot ...) so the harness' own Python overhead is not in the numbers.
The plain-copy baseline has no upper to throw away, so the groups that
change the tree restore it afterwards, untimed.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from competitors import Mounted
from dataset import Dataset

# Groups whose trials make thousands of files (W6's, W7's whiteouts): their trees are
# removed only at the end of the run. On an ext4 without a journal (as this
# machine's), the inode allocator skips inodes freed in the last minute or more
# (``recently_deleted``): files made right after thousands were deleted take
# several times longer to make, whichever competitor makes them. (The plain copy's
# untar tree goes to KEPT, beside the data set, for the same reason.)
KEEP_GROUPS = frozenset({"untar", "rmrf"})
KEPT = "kept"

Metrics = dict[str, float]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool = False


@dataclass(frozen=True)
class Config:
    quick: bool
    fio_runtime: int  # seconds per fio job
    chroot_loops: int  # dpkg -l / perl start-ups per W9 trial
    sh_execs: int  # /bin/true execs inside the chroot shell loop
    mount_cycles: int = 10  # mounts per mount-latency trial


@dataclass(frozen=True)
class Group:
    """One trial type: what it measures and the function doing it."""

    name: str
    metrics: tuple[Metric, ...]
    run: Callable[[Mounted, Dataset, Config], Metrics]
    needs_rootfs: bool = False


def drop_caches() -> None:
    """Write back dirty pages, then drop page cache, dentries and inodes."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd: list[str], ok: tuple[int, ...] = (0,), **kw: object) -> tuple[float, bytes]:
    """Run *cmd*; return (seconds, stdout). Raises if the exit code is not in *ok*."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, **kw)  # type: ignore[call-overload]
    dt = time.perf_counter() - t0
    if res.returncode not in ok:
        err = res.stderr.decode(errors="replace")[-800:]
        raise RuntimeError(f"{cmd[0]} exited {res.returncode}: {err}")
    return dt, res.stdout


# ----------------------------------------------------------------- W1 + W2


def walk(m: Mounted, ds: Dataset, cfg: Config) -> Metrics:
    """W1 cold find+stat of the whole tree after drop_caches, then W2 the same walk warm."""
    cmd = ["find", os.fspath(m.root), "-printf", "%y %s %m %U %G %T@ %p\n"]
    drop_caches()
    cold, out = timed(cmd)
    warm, out2 = timed(cmd)
    return {
        "walk_cold_s": cold,
        "walk_warm_s": warm,
        "entries": float(out.count(b"\n")),
        "entries_warm": float(out2.count(b"\n")),
    }


# ---------------------------------------------------------------------- W3


def tar_read(m: Mounted, ds: Dataset, cfg: Config) -> Metrics:
    """W3: read every file (except bench-big/, which W4 covers) with tar, warm.

    tar writes into a pipe, not /dev/null: GNU tar detects an archive on
    /dev/null and then skips reading file contents.
    """
    script = f"set -o pipefail; tar -C {_q(m.root)} --exclude=./bench-big -cf - . | wc -c"
    cmd = ["bash", "-c", script]
    timed(cmd, ok=(0, 1))  # untimed warm-up pass (tar exits 1 on "file changed")
    dt, out = timed(cmd, ok=(0, 1))
    return {"tar_warm_s": dt, "tar_bytes": float(out.strip() or 0)}


# ---------------------------------------------------------------------- W4


def seq_read(m: Mounted, ds: Dataset, cfg: Config) -> Metrics:
    """W4: sequential read of the big lower file with dd bs=1M, cold then warm."""
    path = m.root / ds.big_rel
    size = ds.spec.big_size
    cmd = ["dd", f"if={path}", "of=/dev/null", "bs=1M"]
    drop_caches()
    cold, _ = timed(cmd)
    warm, _ = timed(cmd)
    return {"seq_cold_MBps": size / cold / 1e6, "seq_warm_MBps": size / warm / 1e6}


# ---------------------------------------------------------------------- W5


def copy_up(m: Mounted, ds: Dataset, cfg: Config) -> Metrics:
    """W5: latency of appending one byte to the big lower file (forces a full copy-up).

    Timed from open() to close() returning; not followed by fsync. The lower
    file is usually in the page cache from W4 trials of all competitors alike.
    """
    path = m.root / ds.big_rel
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    size = os.stat(path).st_size
    if size != ds.spec.big_size + 1:
        raise RuntimeError(f"after append size is {size}, expected {ds.spec.big_size + 1}")
    out = {"copyup_s": dt}
    if m.upper is not None:  # proof that the data really was copied up (not a metacopy)
        up = m.upper / ds.big_rel
        out["upper_bytes"] = float(up.stat().st_size) if up.exists() else -1.0
        out["upper_blocks_bytes"] = float(up.stat().st_blocks * 512) if up.exists() else -1.0
    if m.plain:
        os.truncate(path, ds.spec.big_size)
    return out


# ---------------------------------------------------------------------- W6


def untar(m: Mounted, ds: Dataset, cfg: Config) -> Metrics:
    """W6: extract the ~5k-file archive into a new dir of the mount, then ``sync``."""
    target = m.root / "bench-untar"
    t0 = time.perf_counter()
    target.mkdir()
    timed(["tar", "-C", os.fspath(target), "-xf", os.fspath(ds.tarball)])
    t1 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    t2 = time.perf_counter()
    n = sum(len(f) for _d, _s, f in os.walk(target))
    if n != ds.spec.untar_files:
        raise RuntimeError(f"untar produced {n} files, expected {ds.spec.untar_files}")
    if m.plain:  # out of the plain copy, removed at the end of the run (see KEEP_GROUPS)
        kept = ds.root / KEPT
        kept.mkdir(exist_ok=True)
        target.rename(tempfile.mkdtemp(dir=kept) + "/untar")
    return {"untar_s": t1 - t0, "untar_sync_s": t2 - t0}


# ---------------------------------------------------------------------- W7


def rm_rf(m: Mounted, ds: Dataset, cfg: Config) -> Metrics:
    """W7: ``rm -rf`` of the large lower dir (the stdlib copy): thousands of whiteouts."""
    target = m.root / ds.rmrf_rel
    dt, _ = timed(["rm", "-rf", os.fspath(target)])
    if target.exists():
        raise RuntimeError(f"{target} still exists after rm -rf")
    if m.plain:
        subprocess.run(
            ["cp", "-a", os.fspath(ds.lower1 / ds.rmrf_rel), os.fspath(target)], check=True
        )
    return {"rmrf_s": dt}


# --------------------------------------------------------------------- W11


def chown_r(m: Mounted, ds: Dataset, cfg: Config) -> Metrics:
    """W11: ``chown -R`` of the whole tree (a container build's ``chown -R app /``),
    and how much the upper holds afterwards: with metacopy=on the data stays below."""
    owners: list[tuple[str, int, int]] = []
    if m.plain:  # restored afterwards, untimed
        for root, dirs, files in os.walk(m.root):
            for name in [*dirs, *files]:
                p = os.path.join(root, name)
                st = os.lstat(p)
                owners.append((p, st.st_uid, st.st_gid))
    dt, _ = timed(["chown", "-R", "-h", "4242:4242", os.fspath(m.root)])
    out = {"chown_s": dt}
    if m.upper is not None:
        _, du = timed(["du", "-s", "-B1", os.fspath(m.upper)])
        out["chown_upper_MB"] = int(du.split()[0]) / 1e6
    for p, uid, gid in owners:
        os.lchown(p, uid, gid)
    return out


# ---------------------------------------------------------------------- W8


def _fio(path: Path, rw: str, size: int, runtime: int, extra: list[str]) -> float:
    cmd = [
        "fio", "--name=w8", f"--filename={path}", f"--rw={rw}", "--bs=4k",
        "--ioengine=psync", f"--size={size}", f"--runtime={runtime}", "--time_based",
        "--output-format=json", *extra,
    ]  # fmt: skip
    _dt, out = timed(cmd, timeout=runtime * 10 + 60)
    text = out.decode(errors="replace")
    data = json.loads(text[text.index("{") :])
    job = data["jobs"][0]
    return float(job["read" if "read" in rw else "write"]["iops"])


def fio_random(m: Mounted, ds: Dataset, cfg: Config) -> Metrics:
    """W8: fio 4k random read of the lower file (warm), then random write after an untimed copy-up.

    psync, one job, buffered I/O (O_DIRECT is not something every FUSE daemon
    accepts). Warm on purpose: with fio's default invalidate=1 the kernel and
    plain runs would read from disk while a FUSE daemon's reads still hit the
    host page cache of the lower file, comparing the disk with RAM instead of
    one file system path with another. So the file is read once (untimed) and
    fio runs with invalidate=0. The write job ends with fsync (end_fsync=1).
    """
    path = m.root / ds.fio_rel
    size = ds.spec.fio_size
    timed(["dd", f"if={path}", "of=/dev/null", "bs=1M"])  # warm-up, untimed
    rr = _fio(path, "randread", size, cfg.fio_runtime, ["--invalidate=0"])
    os.utime(path)  # copy-up now, so the write run measures writes, not copy-up (W5 does)
    rw = _fio(path, "randwrite", size, cfg.fio_runtime, ["--invalidate=0", "--end_fsync=1"])
    return {"randread_iops": rr, "randwrite_iops": rw}


# --------------------------------------------------------------------- W10

READERS = (1, 4, 8)


def parallel_readers(m: Mounted, ds: Dataset, cfg: Config) -> Metrics:
    """W10: 1, 4 and 8 concurrent ``tar cf - usr | cat`` of the same tree, warm.

    Several processes using one mount at once (builds, CI runners, containers
    on one host): a daemon that works on one core saturates it. Timed from the
    start of the first reader to the end of the last; one untimed pass first.
    """
    sub = "usr" if (m.root / "usr").is_dir() else "."
    exclude = "--exclude=./bench-big" if sub == "." else ""
    script = f"set -o pipefail; tar -C {_q(m.root)} {exclude} -cf - {sub} | cat >/dev/null"
    timed(["bash", "-c", script], ok=(0, 1))  # warm-up
    out: Metrics = {}
    for n in READERS:
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["bash", "-c", script], stderr=subprocess.PIPE) for _ in range(n)]
        for p in procs:
            _, err = p.communicate()
            if p.returncode not in (0, 1):
                raise RuntimeError(f"tar reader exited {p.returncode}: {err.decode()[-300:]}")
        out[f"par{n}_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------- W9

PERL_MODULES = [
    "POSIX", "Fcntl", "File::Spec", "List::Util", "Scalar::Util", "Getopt::Long",
    "IO::File", "File::Temp", "Text::ParseWords", "File::Path", "File::Basename", "Cwd",
    "Data::Dumper", "Storable", "File::Find", "Time::Local",
]  # fmt: skip


def perl_modules_present(root: Path) -> list[str]:
    """The subset of PERL_MODULES that the rootfs' perl-base can load."""
    ok = []
    for mod in PERL_MODULES:
        res = subprocess.run(["chroot", os.fspath(root), "perl", f"-M{mod}", "-e", "1"],
                             capture_output=True)  # fmt: skip
        if res.returncode == 0:
            ok.append(mod)
    return ok


_perl_cache: dict[str, list[str]] = {}


def chroot_startup(m: Mounted, ds: Dataset, cfg: Config) -> Metrics:
    """W9: process start-up inside ``chroot MNT``.

    minbase has no python3, so besides ``dpkg -l`` x N we time ``perl`` loading
    the perl-base modules (the closest analogue of "python3 importing stdlib
    modules") x N, and a ``/bin/sh`` loop exec'ing ``/bin/true`` many times.
    """
    root = os.fspath(m.root)
    if "mods" not in _perl_cache:
        _perl_cache["mods"] = perl_modules_present(ds.plain)
    mods = [f"-M{x}" for x in _perl_cache["mods"]]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "COLUMNS": "200"}
    with bind_dev(m.root):
        t0 = time.perf_counter()
        for _ in range(cfg.chroot_loops):
            subprocess.run(["chroot", root, "dpkg", "-l"], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        t1 = time.perf_counter()
        for _ in range(cfg.chroot_loops):
            subprocess.run(["chroot", root, "perl", *mods, "-e", "1"], check=True, env=env,
                           stdout=subprocess.DEVNULL)  # fmt: skip
        t2 = time.perf_counter()
        loop = f"i=0; while [ $i -lt {cfg.sh_execs} ]; do /bin/true; i=$((i+1)); done"
        subprocess.run(["chroot", root, "/bin/sh", "-c", loop], check=True, env=env)
        t3 = time.perf_counter()
    return {"dpkg_l_s": t1 - t0, "perl_mods_s": t2 - t1, "sh_exec_s": t3 - t2}


@contextmanager
def bind_dev(root: Path) -> Iterator[None]:
    """Bind the host /dev over ROOT/dev for the chroot, as container runtimes do.

    FUSE mounts are ``nodev`` by default, so the rootfs' own device nodes
    (/dev/null, which perl opens) would fail there but not on the kernel
    overlay; the bind mount makes all competitors equal. Unmounted in finally
    (lazily if busy), before the union itself is unmounted.
    """
    dev = root / "dev"
    subprocess.run(["mount", "--bind", "/dev", os.fspath(dev)], check=True, capture_output=True)
    try:
        yield
    finally:
        if subprocess.run(["umount", os.fspath(dev)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", os.fspath(dev)], capture_output=True)


def _q(p: Path) -> str:
    import shlex

    return shlex.quote(os.fspath(p))


def groups(cfg: Config, ds: Dataset) -> list[Group]:
    """All trial types, labelled with this data set's sizes."""
    n, k = cfg.chroot_loops, cfg.sh_execs
    big = f"{ds.spec.big_size >> 20} MiB"
    untar_n = ds.spec.untar_files
    rm_n = int(str(ds.info.get("stdlib_files", 0)))
    return [
        Group("walk", (
            Metric("walk_cold_s", "W1 find+stat, cold", "s"),
            Metric("walk_warm_s", "W2 find+stat, warm", "s"),
        ), walk),
        Group("tar", (Metric("tar_warm_s", "W3 tar read all files, warm", "s"),), tar_read),
        Group("seqread", (
            Metric("seq_cold_MBps", f"W4 seq read {big} file, cold", "MB/s", True),
            Metric("seq_warm_MBps", f"W4 seq read {big} file, warm", "MB/s", True),
        ), seq_read),
        Group("copyup", (Metric("copyup_s", f"W5 append 1 byte to {big} lower file", "s"),),
              copy_up),
        Group("untar", (
            Metric("untar_s", f"W6 untar {untar_n} files", "s"),
            Metric("untar_sync_s", f"W6 untar {untar_n} files + sync", "s"),
        ), untar),
        Group("rmrf", (Metric("rmrf_s", f"W7 rm -rf lower dir ({rm_n} files)", "s"),), rm_rf),
        Group("fio", (
            Metric("randread_iops", f"W8 fio 4k randread {ds.spec.fio_size >> 20} MiB", "IOPS", True),
            Metric("randwrite_iops", f"W8 fio 4k randwrite {ds.spec.fio_size >> 20} MiB", "IOPS", True),
        ), fio_random),
        Group("parallel", tuple(
            Metric(f"par{n}_s", f"W10 {n} parallel readers (tar usr | cat), warm", "s")
            for n in READERS
        ), parallel_readers),
        Group("chown", (
            Metric("chown_s", "W11 chown -R of the whole tree", "s"),
            Metric("chown_upper_MB", "W11 upper size after chown -R", "MB"),
        ), chown_r),
        Group("chroot", (
            Metric("dpkg_l_s", f"W9 chroot dpkg -l x{n}", "s"),
            Metric("perl_mods_s", f"W9 chroot perl -M<mods> x{n}", "s"),
            Metric("sh_exec_s", f"W9 chroot sh: /bin/true x{k}", "s"),
        ), chroot_startup, needs_rootfs=True),
        Group("mount", (
            Metric("mount_ms", "mount latency: exec to ready, median", "ms"),
            Metric("mount_stat_ms", "mount latency: exec to first stat answered, median", "ms"),
        ), mount_latency),
    ]  # fmt: skip


def mount_latency(m: Mounted, ds: Dataset, cfg: Config) -> Metrics:
    """Mount latency, exec to ready, as a container engine sees it: the command in its
    daemon mode, returning once the mount is usable (bench.py runs this group with the
    competitor's own cycles, see ``Competitor.mount_cycles``)."""
    raise NotImplementedError("run through Competitor.mount_cycles")
