"""Profile the unionfs daemon with py-spy while a workload runs (``bench.py --profile``).

Why collapsed ("raw") stacks instead of only a flame graph: they can be
summed here into a plain-text top list (self time and inclusive time per
function) that fits in a report; the SVG is written too, for humans.
py-spy attaches to the daemon's PID after the mount is up and detaches when
the daemon exits at unmount, so only that workload is profiled. Idle time
(trio blocked in epoll for the next FUSE request) is excluded by py-spy's
default, so percentages are of the daemon's busy samples; note that a daemon
woken for a request but still waiting for a CPU counts as busy, in whatever
frame it slept (usually trio's epoll ``get_events``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from competitors import Unionfs
from dataset import Dataset
from workloads import Config, Group

# Empty: py-spy pauses the daemon for each sample, which keeps its idle
# detection exact (with --nonblocking, time in epoll_wait showed up as busy).
PYSPY_MODE: list[str] = os.environ.get("BENCH_PYSPY_ARGS", "").split()


def ensure_pyspy(python: str) -> str:
    """Path of py-spy, pip-installing it into the venv on first use."""
    venv_bin = Path(python).parent
    exe = venv_bin / "py-spy"
    if not exe.exists() and shutil.which("py-spy") is None:
        subprocess.run([python, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return os.fspath(exe) if exe.exists() else str(shutil.which("py-spy"))


def summarize(raw: Path, top: int = 15) -> str:
    """Top functions by self and inclusive share of busy samples from a
    py-spy ``--format raw`` (collapsed stacks) file."""
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        n = int(count_s)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]  # fmt: skip
        if not frames:
            continue
        total += n
        self_c[_short(frames[-1])] += n
        for f in {_short(f) for f in frames}:
            incl_c[f] += n
    if total == 0:
        return "  (no busy samples)"
    lines = [f"  busy samples: {total}", "  self%  function (file:line)"]
    for f, n in self_c.most_common(top):
        lines.append(f"  {100 * n / total:5.1f}  {f}")
    lines.append("  incl%  function, unionfs frames only")
    shown = 0
    for f, n in incl_c.most_common():
        if "unionfs/" in f:
            lines.append(f"  {100 * n / total:5.1f}  {f}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(lines)


def _short(frame: str) -> str:
    """``func (/long/path/unionfs/x.py:12)`` -> ``func (unionfs/x.py:12)``."""
    func, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("/unionfs/", "/site-packages/", "/lib/python3"):
        if marker in where:
            where = marker.lstrip("/") + where.split(marker, 1)[1]
            break
    return f"{func} ({where})" if where else func


def profile_unionfs(
    ds: Dataset,
    cfg: Config,
    groups: list[Group],
    unionfs: Unionfs,
    run_root: Path,
    out_dir: Path,
    log: Callable[[str], None],
) -> str:
    """Run each group once on a fresh unionfs mount under py-spy; return the text report."""
    pyspy = ensure_pyspy(unionfs.python)
    report = []
    for g in groups:
        trial_dir = run_root / f"profile-{g.name}"
        raw = out_dir / f"profile-{g.name}.txt"
        svg = out_dir / f"profile-{g.name}.svg"
        spies: list[subprocess.Popen[bytes]] = []
        t0 = time.perf_counter()
        try:
            with unionfs.mount(ds.lowers, trial_dir) as m:
                assert m.pid is not None
                cmd = [pyspy, "record", "--pid", str(m.pid), "--rate", "200", *PYSPY_MODE]
                for extra in (["--format", "raw", "-o", os.fspath(raw)], ["-o", os.fspath(svg)]):
                    spies.append(
                        subprocess.Popen(
                            [*cmd, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                        )
                    )
                time.sleep(1.0)  # let py-spy attach before the workload starts
                metrics = g.run(m, ds, cfg)
            # The daemon exited at unmount; py-spy notices and writes its output.
            for p in spies:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.terminate()
                    p.wait(timeout=10)
        finally:
            for p in spies:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            subprocess.run(["rm", "-rf", "--one-file-system", os.fspath(trial_dir)], check=False)
        dt = time.perf_counter() - t0
        shown = ", ".join(f"{k}={v:.3g}" for k, v in metrics.items())
        log(f"profiled {g.name} in {dt:.1f}s ({shown})")
        report.append(f"## {g.name} ({shown})\n{summarize(raw) if raw.exists() else '  (no data)'}")
    print(f"py-spy outputs in {out_dir}", file=sys.stderr)
    return "\n\n".join(report)
