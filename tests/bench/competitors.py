"""The four things being compared, behind one "mount a fresh union" interface.

Why one interface: every trial must get a fresh mount and a fresh, empty
upper dir, and must record the same per-trial facts (mount latency, daemon
peak RSS and CPU seconds) no matter which implementation serves the files.

Safety: everything mounted or spawned here is torn down in ``finally``; a
failed clean unmount falls back to a lazy unmount plus SIGKILL of the PID
*we* started (never a process found by name).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if os.fspath(REPO) not in sys.path:
    sys.path.insert(0, os.fspath(REPO))

from tests.mounting import escape_path, lazy_unmount, mount_type, overlay_options  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Mounted:
    """A live union (or the plain copy) for one trial."""

    root: Path  # where the workload runs
    mount_latency_s: float | None  # None for the plain copy
    pid: int | None = None  # daemon PID for FUSE competitors
    plain: bool = False
    upper: Path | None = None  # the trial's upper dir (None for the plain copy)
    facts: dict[str, float | int | None] = field(default_factory=dict)

    def sample_daemon(self) -> None:
        """Record the daemon's peak RSS and CPU seconds (call just before unmount)."""
        if self.pid is None:
            return
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.facts["daemon_peak_rss_kib"] = int(line.split()[1])
            self.facts["daemon_cpu_s"] = _cpu_seconds(self.pid)
        except (OSError, IndexError, ValueError):
            pass


def _cpu_seconds(pid: int) -> float:
    """utime + stime of *pid* (fields 14/15 of /proc/PID/stat, indexes 11/12 after ")")."""
    stat_fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return round((int(stat_fields[11]) + int(stat_fields[12])) / CLK_TCK, 3)


class Competitor:
    """Base class: ``mount()`` yields a :class:`Mounted` and always cleans up."""

    only_groups: tuple[str, ...] | None = None  # a variant measured on these groups only

    name = "?"
    fstype: str | None = None

    def available(self) -> str | None:
        """None if usable here, else the reason it is skipped."""
        return None

    def version(self) -> str:
        return ""

    @contextmanager
    def mount(self, lowers: list[Path], trial_dir: Path) -> Iterator[Mounted]:
        raise NotImplementedError
        yield  # pragma: no cover

    # -- mount latency: the real command, as a container engine runs it ----------

    def cycle_command(self, opts: str, mnt: Path) -> list[str] | None:
        """The command that mounts and returns once the mount is ready (None: no mount)."""
        return None

    def cycle_env(self, times_file: Path) -> dict[str, str]:
        return dict(os.environ)

    def unmount_command(self, mnt: Path) -> list[str]:
        return ["fusermount3", "-u", os.fspath(mnt)]

    def mount_cycles(
        self, lowers: list[Path], trial_dir: Path, cycles: int
    ) -> tuple[dict[str, float], dict[str, object]]:
        """Mount and unmount *cycles* times with fresh dirs; medians of exec -> the
        command returned (ready) and exec -> the first stat answered, in ms, and
        (unionfs) the median time of each start-up phase."""
        mount_ms: list[float] = []
        stat_ms: list[float] = []
        phases: dict[str, list[tuple[float, float]]] = {}
        for i in range(cycles):
            upper, work, mnt = _trial_dirs(trial_dir / f"c{i}")
            times_file = trial_dir / f"c{i}" / "startup.json"
            cmd = self.cycle_command(overlay_options(lowers, upper, work), mnt)
            if cmd is None:
                return {}, {}
            t0 = time.time()
            p0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, env=self.cycle_env(times_file))
            p1 = time.perf_counter()
            try:
                if res.returncode != 0:
                    raise RuntimeError(f"{cmd[0]} exited {res.returncode}: {res.stderr[-500:]!r}")
                os.stat(mnt)
                p2 = time.perf_counter()
            finally:
                if mount_type(mnt) is not None:
                    done = subprocess.run(self.unmount_command(mnt), capture_output=True)
                    if done.returncode != 0:
                        lazy_unmount(mnt)
            mount_ms.append((p1 - p0) * 1000)
            stat_ms.append((p2 - p0) * 1000)
            for name, wall, cpu in _startup_phases(times_file, t0, t0 + (p1 - p0)):
                phases.setdefault(name, []).append((wall, cpu))
            time.sleep(0.05)  # let the daemon exit before the next cycle
        facts: dict[str, object] = {
            "startup_phases_ms": {
                name: [
                    round(statistics.median(w for w, _ in v), 1),
                    round(statistics.median(c for _, c in v), 1),
                ]
                for name, v in phases.items()
            }  # fmt: skip
        }
        metrics = {
            "mount_ms": statistics.median(mount_ms),
            "mount_stat_ms": statistics.median(stat_ms),
        }
        return metrics, facts if phases else {}


def _startup_phases(path: Path, t0: float, t_end: float) -> list[tuple[str, float, float]]:
    """unionfs's start-up marks (unionfs/startup.py) as (phase, wall ms, CPU ms), plus
    the parent's return after the last mark; empty when there are none."""
    try:
        marks = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    out = []
    prev, prev_cpu = t0, 0.0
    for name, wall, cpu in marks:
        out.append(
            (name, (wall - prev) * 1000, ((cpu - prev_cpu) if cpu >= prev_cpu else cpu) * 1000)
        )
        prev, prev_cpu = wall, cpu
    out.append(("return", (t_end - prev) * 1000, 0.0))
    return out


class Plain(Competitor):
    """The native baseline: the merged tree as a plain copy on the same ext4."""

    name = "plain"

    def __init__(self, plain_root: Path) -> None:
        self.plain_root = plain_root

    @contextmanager
    def mount(self, lowers: list[Path], trial_dir: Path) -> Iterator[Mounted]:
        yield Mounted(self.plain_root, None, plain=True)


class KernelOverlay(Competitor):
    """Kernel overlayfs with default options (the reference implementation)."""

    name = "kernel"
    fstype = "overlay"

    def __init__(self, options: str = "", name: str = "kernel") -> None:
        self.options = options
        self.name = name

    def version(self) -> str:
        return os.uname().release

    def cycle_command(self, opts: str, mnt: Path) -> list[str] | None:
        return ["mount", "-t", "overlay", "overlay", "-o", opts, os.fspath(mnt)]

    def unmount_command(self, mnt: Path) -> list[str]:
        return ["umount", os.fspath(mnt)]

    @contextmanager
    def mount(self, lowers: list[Path], trial_dir: Path) -> Iterator[Mounted]:
        upper, work, mnt = _trial_dirs(trial_dir)
        opts = overlay_options(lowers, upper, work) + ("," + self.options if self.options else "")
        t0 = time.perf_counter()
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, os.fspath(mnt)],
            check=True,
            capture_output=True,
        )
        latency = time.perf_counter() - t0
        try:
            yield Mounted(mnt, latency, upper=upper)
        finally:
            if subprocess.run(["umount", os.fspath(mnt)], capture_output=True).returncode != 0:
                lazy_unmount(mnt)


class FuseDaemon(Competitor):
    """A FUSE daemon run in the foreground (``-f``) as a child we own.

    Owning the PID is what lets us read VmHWM and utime+stime from /proc, and
    kill exactly our process if the clean unmount hangs. The per-trial mount time
    is from spawn until the mount shows up in /proc/self/mountinfo (polled every
    5 ms, the same for both FUSE competitors) and answers a stat.
    """

    def command(self, opts: str, mnt: Path) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    @contextmanager
    def mount(self, lowers: list[Path], trial_dir: Path) -> Iterator[Mounted]:
        upper, work, mnt = _trial_dirs(trial_dir)
        opts = overlay_options(lowers, upper, work)
        log_path = trial_dir / "daemon.log"
        t0 = time.perf_counter()
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(
                self.command(opts, mnt),
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd="/",
            )
        try:
            deadline = t0 + 30.0
            while mount_type(mnt) != self.fstype:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {proc.returncode}: "
                        + log_path.read_text(errors="replace")[-2000:]
                    )
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{self.name} did not mount within 30 s")
                time.sleep(0.005)
            # A daemon may mount before it serves (unionfs's premount): the workload
            # starts once the mount answers, so no trial counts the daemon's start-up
            # (the mount latency rows report it).
            os.stat(mnt)
            m = Mounted(mnt, time.perf_counter() - t0, pid=proc.pid, upper=upper)
            m.facts["daemon_cpu_ready_s"] = _cpu_seconds(proc.pid)  # start-up, not workload
            yield m
        finally:
            _stop_fuse(proc, mnt)


class FuseOverlayfs(FuseDaemon):
    name = "fuse-overlayfs"
    fstype = "fuse.fuse-overlayfs"

    def __init__(self, debug: bool = False) -> None:
        self.debug = debug  # -d: libfuse logs every request (bench.py --count)

    def available(self) -> str | None:
        return None if _which("fuse-overlayfs") else "fuse-overlayfs not installed"

    def version(self) -> str:
        res = subprocess.run(["fuse-overlayfs", "--version"], capture_output=True, text=True)
        for line in (res.stdout + res.stderr).splitlines():
            if line.startswith("fuse-overlayfs"):
                return line.split("version", 1)[-1].strip()
        return "?"

    def command(self, opts: str, mnt: Path) -> list[str]:
        return ["fuse-overlayfs", "-d" if self.debug else "-f", "-o", opts, os.fspath(mnt)]

    def cycle_command(self, opts: str, mnt: Path) -> list[str] | None:
        return ["fuse-overlayfs", "-o", opts, os.fspath(mnt)]


class Unionfs(FuseDaemon):
    """The daemon under test, run as ``python -m unionfs -f``.

    *code_root* is a directory holding the ``unionfs`` package: by default a
    snapshot taken when the bench starts (see :func:`snapshot_unionfs`), so
    every trial of one run measures the same code even while the package is
    being edited and committed during a long run. The daemon runs with cwd
    ``/`` so ``-m`` cannot pick up a ``unionfs/`` from the current directory.
    """

    name = "unionfs"
    fstype = "fuse.unionfs"

    def __init__(
        self, python: str, extra_options: str = "", code_root: Path = REPO, name: str = "unionfs"
    ) -> None:
        self.python = python
        self.extra_options = extra_options
        self.code_root = code_root
        self.name = name

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.fspath(self.code_root) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def _version_run(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.python, "-m", "unionfs", "--version"],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd="/",
        )

    def available(self) -> str | None:
        res = self._version_run()
        if res.returncode != 0:
            return "unionfs not runnable yet: " + (res.stderr.strip().splitlines() or ["?"])[-1]
        return None

    def version(self) -> str:
        res = self._version_run()
        return (res.stdout + res.stderr).strip().splitlines()[0] if res.returncode == 0 else "?"

    def command(self, opts: str, mnt: Path) -> list[str]:
        if self.extra_options:
            opts += "," + self.extra_options
        return [self.python, "-m", "unionfs", "-f", "-o", opts, os.fspath(mnt)]

    def cycle_command(self, opts: str, mnt: Path) -> list[str] | None:
        """What the installed ``unionfs`` command runs (its console script), in its
        daemon mode: it returns once the mount is ready."""
        if self.extra_options:
            opts += "," + self.extra_options
        script = "import sys; from unionfs.cli import main; sys.exit(main())"
        return [self.python, "-c", script, "-o", opts, os.fspath(mnt)]

    def cycle_env(self, times_file: Path) -> dict[str, str]:
        env = self.env()
        env["UNIONFS_STARTUP_TIMES"] = os.fspath(times_file)
        return env


class TracedUnionfs(Unionfs):
    """unionfs with ``-o trace=FILE`` (in the trial's scratch dir): what tracing costs."""

    name = "unionfs+trace"

    def command(self, opts: str, mnt: Path) -> list[str]:
        trace = escape_path(mnt.parent / "trace.jsonl")
        return super().command(f"{opts},trace={trace}", mnt)


def snapshot_unionfs(dest: Path, python: str = sys.executable) -> Path:
    """Copy the repo's ``unionfs`` package to *dest*/unionfs and compile its bytecode,
    as an installed package has it (this environment may forbid writing it at run
    time, which would add the compilation to every mount); returns *dest*."""
    shutil.copytree(
        REPO / "unionfs", dest / "unionfs", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run([python, "-m", "compileall", "-q", os.fspath(dest / "unionfs")], check=True)
    return dest


def _which(prog: str) -> bool:
    return shutil.which(prog) is not None


def _trial_dirs(trial_dir: Path) -> tuple[Path, Path, Path]:
    upper, work, mnt = trial_dir / "upper", trial_dir / "work", trial_dir / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True, exist_ok=True)
    return upper, work, mnt


def _stop_fuse(proc: subprocess.Popen[bytes], mnt: Path, timeout: float = 30.0) -> None:
    """Clean unmount via fusermount3; lazy unmount + SIGKILL of *our* PID on failure."""
    if proc.poll() is None and mount_type(mnt) is not None:
        subprocess.run(["fusermount3", "-u", os.fspath(mnt)], capture_output=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if mount_type(mnt) is not None:
            lazy_unmount(mnt)
        proc.kill()
        proc.wait(timeout=10)
    if mount_type(mnt) is not None:
        lazy_unmount(mnt)


def sweep_stale_mounts(*roots: Path) -> list[str]:
    """Lazy-unmount anything still mounted under our own scratch/data dirs (a
    crashed earlier run of this bench); returns what was unmounted."""
    prefixes = tuple(os.fspath(r.resolve()) + "/" for r in roots)
    found: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefixes):
                found.append(point)
    for point in sorted(found, key=len, reverse=True):
        lazy_unmount(point)
    return found
