#!/usr/bin/env python3
"""unionfs benchmark: unionfs vs kernel overlayfs vs fuse-overlayfs vs a plain copy.

Usage (as root, from the repo; ``make bench [QUICK=1]`` does the same)::

    .venv/bin/python tests/bench/bench.py            # full run (~10 min)
    .venv/bin/python tests/bench/bench.py --quick    # subset, ~1.3 min
    .venv/bin/python tests/bench/bench.py --profile  # py-spy on unionfs W1/W6/W7

Method, and why:
* Every trial gets a fresh mount and a fresh empty upper dir, so no trial
  benefits from another's copy-ups or daemon caches. The trees of the trials
  that make thousands of files are removed only at the end of the run, so no
  trial makes files where thousands were just deleted (see KEEP_GROUPS).
* Competitors are interleaved per repetition and the order rotates
  (A B C D, then B C D A, ...), so slow drift in background load (this machine
  is shared) hits all competitors alike; ratios are taken pair by pair within a
  repetition, then the median is reported with the min–max spread.
* Raw trials go to ``bench-results/<stamp>-<mode>.jsonl`` (one JSON object a
  line; the first line is metadata), the tables to ``<stamp>-<mode>.md``.
* Nothing is left mounted: each mount is torn down in ``finally`` (lazy
  unmount + SIGKILL of our own daemon PID as the fallback), and a final sweep
  checks our scratch dir.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, os.fspath(HERE))

import report  # noqa: E402
from competitors import (  # noqa: E402
    Competitor,
    FuseOverlayfs,
    KernelOverlay,
    Plain,
    TracedUnionfs,
    Unionfs,
    snapshot_unionfs,
    sweep_stale_mounts,
)
from dataset import FULL, QUICK, Dataset, build_dataset, cache_root  # noqa: E402
from workloads import KEEP_GROUPS, KEPT, Config, Group, groups, perl_modules_present  # noqa: E402

# The metacopy variants run the chown group only (W11: chown -R with metacopy=on);
# unionfs-passthrough (-o passthrough=on) the sequential read only (W4, the option's
# trade-off: README, "FUSE passthrough").
ALL_COMPETITORS = [
    "plain",
    "kernel",
    "fuse-overlayfs",
    "unionfs",
    "kernel-metacopy",
    "unionfs-metacopy",
    "unionfs-passthrough",
]
TOOLS = {"fuse-overlayfs": "fuse-overlayfs", "fio": "fio", "debootstrap": "debootstrap"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_tools() -> None:
    """apt-get install the competitors/tools that are missing (one update, one install)."""
    missing = [pkg for prog, pkg in TOOLS.items() if shutil.which(prog) is None]
    if not missing:
        return
    log(f"installing with apt-get: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False, env=env)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="small generated tree, 3 reps, short fio; < 2 min"
    )
    ap.add_argument("--reps", type=int, help="repetitions (default 5, quick 3)")
    ap.add_argument(
        "--competitors",
        default=",".join(ALL_COMPETITORS),
        help="comma list from: " + ",".join(ALL_COMPETITORS),
    )
    ap.add_argument(
        "--groups",
        help="comma list of trial types (default: all): "
        "walk,tar,seqread,copyup,untar,rmrf,fio,parallel,chown,chroot,mount",
    )
    ap.add_argument(
        "--data",
        choices=["auto", "debootstrap", "generated"],
        default="auto",
        help="bottom layer: auto = debootstrap for full, generated for --quick",
    )
    ap.add_argument("--fio-runtime", type=int, help="seconds per fio job (default 5, quick 1)")
    ap.add_argument("--unionfs-options", default="", help="extra -o options for unionfs")
    ap.add_argument(
        "--trace",
        action="store_true",
        help="also run unionfs with -o trace=FILE (competitor unionfs+trace): the cost of tracing",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="instead of the comparison: py-spy profile of unionfs on walk,untar,rmrf",
    )
    ap.add_argument(
        "--count",
        action="store_true",
        help="instead of the comparison: FUSE requests per untar file, random write and exec",
    )
    ap.add_argument("--build-only", action="store_true", help="build/cache the data set and exit")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results")
    return ap.parse_args(argv)


def unionfs_python() -> str:
    """The interpreter that has pyfuse3: the repo's venv if present (so running
    this script with the system python still measures unionfs), else ours."""
    venv = REPO / ".venv" / "bin" / "python"
    return os.fspath(venv) if venv.exists() else sys.executable


def make_competitors(
    names: list[str], ds: Dataset, args: argparse.Namespace, code: Path
) -> list[Competitor]:
    table: dict[str, Competitor] = {
        "plain": Plain(ds.plain),
        "kernel": KernelOverlay(),
        "fuse-overlayfs": FuseOverlayfs(),
        "unionfs": Unionfs(unionfs_python(), args.unionfs_options, code),
        "kernel-metacopy": KernelOverlay("metacopy=on", "kernel-metacopy"),
        "unionfs-metacopy": Unionfs(
            unionfs_python(),
            ",".join(o for o in (args.unionfs_options, "metacopy=on") if o),
            code,
            "unionfs-metacopy",
        ),
        "unionfs-passthrough": Unionfs(
            unionfs_python(),
            ",".join(o for o in (args.unionfs_options, "passthrough=on") if o),
            code,
            "unionfs-passthrough",
        ),
        "unionfs+trace": TracedUnionfs(unionfs_python(), args.unionfs_options, code),
    }
    for variant in ("kernel-metacopy", "unionfs-metacopy"):
        table[variant].only_groups = ("chown",)
    table["unionfs-passthrough"].only_groups = ("seqread",)
    if args.trace and "unionfs" in names and "unionfs+trace" not in names:
        names = [*names, "unionfs+trace"]
    chosen = []
    for n in names:
        if n not in table:
            raise SystemExit(f"unknown competitor {n!r}")
        why = table[n].available()
        if why:
            log(f"skipping {n}: {why}")
            continue
        chosen.append(table[n])
    return chosen


def run_trial(
    comp: Competitor,
    group: Group,
    ds: Dataset,
    cfg: Config,
    run_root: Path,
    rep: int,
    slot: int,
    log_dir: Path,
) -> dict[str, object]:
    """One trial: fresh mount + empty upper, the group's workload, teardown."""
    trial_dir = run_root / f"r{rep}-{group.name}-{comp.name}"
    rec: dict[str, object] = {
        "type": "trial", "rep": rep, "slot": slot, "competitor": comp.name,
        "group": group.name, "start": dt.datetime.now(dt.timezone.utc).isoformat(),
    }  # fmt: skip
    t0 = time.perf_counter()
    try:
        if group.name == "mount":
            metrics, facts = comp.mount_cycles(ds.lowers, trial_dir, cfg.mount_cycles)
            if not metrics:
                raise RuntimeError("no mount to time (the plain copy)")
            rec["metrics"] = metrics
            rec.update(facts)
        else:
            with comp.mount(ds.lowers, trial_dir) as m:
                rec["mount_latency_s"] = m.mount_latency_s
                try:
                    rec["metrics"] = group.run(m, ds, cfg)
                finally:
                    m.sample_daemon()
                    rec.update(m.facts)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failing competitor must not stop the others
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        mnt = trial_dir / "mnt"
        from tests.mounting import mount_type

        requests = _daemon_requests(trial_dir / "daemon.log")
        if requests:
            rec["daemon_requests"] = requests
        if mnt.exists() and mount_type(mnt) is not None:
            rec["error"] = str(rec.get("error", "")) + " [mount still present; kept scratch dir]"
        elif trial_dir.exists():
            daemon_log = trial_dir / "daemon.log"
            if rec.get("error") and daemon_log.exists():  # keep the evidence of a failure
                log_dir.mkdir(parents=True, exist_ok=True)
                kept = log_dir / f"{trial_dir.name}.log"
                shutil.copyfile(daemon_log, kept)
                rec["daemon_log"] = os.fspath(kept)
            if group.name not in KEEP_GROUPS:  # those at the end of the run
                subprocess.run(
                    ["rm", "-rf", "--one-file-system", os.fspath(trial_dir)], check=False
                )
    rec["wall_s"] = round(time.perf_counter() - t0, 3)
    return rec


def _daemon_requests(log_path: Path) -> dict[str, int]:
    """unionfs's request counts, from the line it logs at unmount (csrc/requests.c)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return {}
    for line in reversed(text.splitlines()):
        if " requests: " in line:
            pairs = (item.split("=") for item in line.split(" requests: ", 1)[1].split())
            return {k: int(v) for k, v in pairs}
    return {}


def code_digest(code: Path) -> str:
    """Short sha256 over the snapshot's files: identifies exactly what was measured."""
    h = hashlib.sha256()
    for f in sorted((code / "unionfs").rglob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def meta_record(
    ds: Dataset,
    comps: list[Competitor],
    cfg: Config,
    args: argparse.Namespace,
    group_list: list[Group],
    code: Path,
) -> dict[str, object]:
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "?"
    git = subprocess.run(
        ["git", "-C", os.fspath(REPO), "log", "-1", "--format=%h %cI"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", os.fspath(REPO), "status", "--porcelain", "unionfs"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "type": "meta",
        "unionfs_code_sha256": code_digest(code),
        "git": git + (" (unionfs/ has uncommitted changes)" if dirty else ""),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "mode": "quick" if args.quick else "full",
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "debian": debian,
        "python": platform.python_version(),
        "versions": {c.name: c.version() for c in comps},
        "dataset": {"name": ds.root.name, **ds.info},
        "config": {"reps": args.reps, "fio_runtime": cfg.fio_runtime,
                   "chroot_loops": cfg.chroot_loops, "sh_execs": cfg.sh_execs},
        "groups": [g.name for g in group_list],
        "w9_perl_modules": (
            perl_modules_present(ds.plain)
            if ds.has_rootfs and any(g.name == "chroot" for g in group_list)
            else []
        ),
        "competitors": [c.name for c in comps],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the bench needs root (mount, drop_caches, chroot)")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    args.reps = args.reps or (3 if args.quick else 5)
    cfg = Config(
        quick=args.quick,
        fio_runtime=args.fio_runtime or (1 if args.quick else 5),
        chroot_loops=10,
        sh_execs=100,
        mount_cycles=5 if args.quick else 10,
    )
    ensure_tools()
    # The package's bytecode up to date, as an installed one has it: with
    # PYTHONDONTWRITEBYTECODE in the environment, every daemon start would otherwise
    # compile each module edited since `make install` (tens of ms of mount latency).
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", os.fspath(REPO / "unionfs")], check=True
    )
    t_start = time.perf_counter()
    ds = build_dataset(REPO, QUICK if args.quick else FULL, args.data, log)
    log(
        f"data set {ds.root.name}: merged tree {ds.info.get('merged_entries')} entries, "
        f"{ds.info.get('whiteouts')} whiteouts, {ds.info.get('modified')} modified, "
        f"opaque {ds.info.get('opaque_dir')}, big file {ds.spec.big_size >> 20} MiB"
    )

    if args.build_only:
        print(json.dumps(ds.info, indent=1))
        return 0

    all_groups = groups(cfg, ds)
    wanted = args.groups.split(",") if args.groups else [g.name for g in all_groups]
    group_list = [g for g in all_groups if g.name in wanted]
    for g in group_list:
        if g.needs_rootfs and not ds.has_rootfs:
            log(f"skipping {g.name}: the data set has no real rootfs (generated tree)")
    group_list = [g for g in group_list if not g.needs_rootfs or ds.has_rootfs]

    run_root = cache_root(REPO) / "run"
    run_root.mkdir(parents=True, exist_ok=True)
    stale = sweep_stale_mounts(run_root, ds.root)
    if stale:
        log(f"lazy-unmounted stale mounts from an earlier run: {stale}")
    remove_kept(run_root, ds)

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    # One frozen copy of the unionfs code for the whole run (see Unionfs).
    code = snapshot_unionfs(cache_root(REPO) / f"code-{stamp}-{os.getpid()}", unionfs_python())
    try:
        return _run(args, ds, cfg, all_groups, group_list, run_root, stamp, code, t_start)
    finally:
        shutil.rmtree(code, ignore_errors=True)


def remove_kept(run_root: Path, ds: Dataset) -> None:
    """Remove the trials' trees (those of KEEP_GROUPS are kept until now) and what
    an interrupted run left (after ``sweep_stale_mounts``: ``--one-file-system``
    would stop at a mount still there)."""
    for leftover in [*run_root.iterdir(), ds.root / KEPT]:
        subprocess.run(["rm", "-rf", "--one-file-system", os.fspath(leftover)], check=False)


def _run(
    args: argparse.Namespace,
    ds: Dataset,
    cfg: Config,
    all_groups: list[Group],
    group_list: list[Group],
    run_root: Path,
    stamp: str,
    code: Path,
    t_start: float,
) -> int:
    """The profile mode or the comparison proper, once everything is prepared."""

    if args.count:
        from requests import count_requests

        uf = Unionfs(unionfs_python(), args.unionfs_options, code)
        try:
            text = count_requests(ds, uf, run_root, log)
        finally:
            sweep_stale_mounts(run_root, ds.root)
        out = args.out / f"{stamp}-count.md"
        out.write_text(text + "\n")
        print(text)
        return 0

    if args.profile:
        from pyspy_profile import profile_unionfs

        uf = Unionfs(unionfs_python(), args.unionfs_options, code)
        why = uf.available()
        if why:
            raise SystemExit(why)
        prof_groups = [
            g for g in all_groups if g.name in (args.groups or "walk,untar,rmrf").split(",")
        ]
        out_dir = args.out / f"{stamp}-profile"
        out_dir.mkdir()
        try:
            text = profile_unionfs(ds, cfg, prof_groups, uf, run_root, out_dir, log)
        finally:
            sweep_stale_mounts(run_root, ds.root)
        (out_dir / "summary.txt").write_text(text + "\n")
        print(text)
        return 0

    comps = make_competitors(args.competitors.split(","), ds, args, code)
    jsonl = args.out / f"{stamp}-{'quick' if args.quick else 'full'}.jsonl"
    log_dir = jsonl.with_suffix(".logs")
    trials: list[dict[str, object]] = []
    with open(jsonl, "w") as out:
        out.write(json.dumps(meta_record(ds, comps, cfg, args, group_list, code)) + "\n")
        try:
            for rep in range(args.reps):
                k = rep % len(comps)
                order = comps[k:] + comps[:k]
                log(f"repetition {rep + 1}/{args.reps}: order {' '.join(c.name for c in order)}")
                for g in group_list:
                    for slot, comp in enumerate(order):
                        if comp.only_groups is not None and g.name not in comp.only_groups:
                            continue
                        if g.name == "mount" and comp.name == "plain":
                            continue  # nothing to mount
                        rec = run_trial(comp, g, ds, cfg, run_root, rep, slot, log_dir)
                        trials.append(rec)
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
                        shown = rec.get("error") or ", ".join(
                            f"{key}={val:.3g}"
                            for key, val in rec.get("metrics", {}).items()  # type: ignore[attr-defined]
                        )
                        log(f"  {g.name:8s} {comp.name:15s} {shown}")
        finally:
            left = sweep_stale_mounts(run_root, ds.root)
            if left:
                log(f"WARNING: had to lazy-unmount {left}")
            remove_kept(run_root, ds)

    names = [c.name for c in comps]
    elapsed = time.perf_counter() - t_start
    header = (
        f"unionfs benchmark ({'quick' if args.quick else 'full'}), {args.reps} repetitions, "
        f"{platform.release()} kernel, {os.cpu_count()} CPUs, data {ds.root.name} "
        f"({ds.info.get('merged_entries')} merged entries), took {elapsed / 60:.1f} min.\n"
        "Cells: median (min–max) over repetitions. Ratio columns: how many times slower "
        "unionfs is than the other (>1 = slower), median of per-repetition pairs."
    )
    text = "\n\n".join(
        s for s in (
            header,
            report.results_table(trials, group_list, names),
            "Goals (issue 15): median of the per-repetition ratios, with their range:",
            report.goals_table(trials),
            report.scaling_note(trials, names),
            "unionfs start-up, exec to ready, by phase (median ms, wall / CPU):",
            report.startup_table(trials),
            "Daemon requests and CPU per request (unionfs counts its own; per trial):",
            report.requests_table(trials, group_list),
            "Per trial: mount latency, daemon peak RSS (VmHWM) and CPU seconds (utime+stime):",
            report.daemon_table(trials, group_list, names),
            report.consistency_notes(trials),
            report.errors_table(trials),
        ) if s
    )  # fmt: skip
    print(text)
    md = jsonl.with_suffix(".md")
    md.write_text(text + "\n")
    log(f"raw trials: {jsonl}\nsummary: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
