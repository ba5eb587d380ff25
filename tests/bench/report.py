"""Turn raw trials into the tables we print and paste into the README.

Why pair-by-pair ratios: competitors are interleaved per repetition, so the
unionfs trial and the fuse-overlayfs (or kernel) trial of the *same*
repetition ran seconds apart under the same background load; the median of
those per-repetition ratios is far less noisy than a ratio of medians on a
shared 2-core machine.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from workloads import Group, Metric

Trial = dict[str, Any]


def fmt_num(x: float) -> str:
    """Three significant digits, no scientific notation for normal ranges."""
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 100:
        return f"{x:,.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    if ax >= 0.01:
        return f"{x:.3f}"
    return f"{x:.4f}"


def spread(values: Sequence[float]) -> str:
    """``median (min–max)``; a single value is printed alone."""
    if not values:
        return "—"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt_num(med)
    return f"{fmt_num(med)} ({fmt_num(min(values))}–{fmt_num(max(values))})"


def ratio_spread(values: Sequence[float]) -> str:
    if not values:
        return "—"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.2f}×"
    return f"{med:.2f}× ({min(values):.2f}–{max(values):.2f})"


def _by(trials: Iterable[Trial]) -> dict[tuple[str, str], dict[int, Trial]]:
    """(competitor, group) -> rep -> trial, successful trials only."""
    out: dict[tuple[str, str], dict[int, Trial]] = defaultdict(dict)
    for t in trials:
        if t.get("type") != "trial" or t.get("error"):
            continue
        out[(str(t["competitor"]), str(t["group"]))][int(t["rep"])] = t
    return out


def slowdown(metric: Metric, ours: float, theirs: float) -> float | None:
    """How many times slower unionfs is (>1 = slower), whatever the unit's direction."""
    if metric.higher_is_better:
        return theirs / ours if ours > 0 else None
    return ours / theirs if theirs > 0 else None


def results_table(
    trials: list[Trial], groups: list[Group], competitors: list[str], subject: str = "unionfs"
) -> str:
    """Markdown table: one row per metric, medians (min–max) per competitor and
    the pair-by-pair slowdown of *subject* against fuse-overlayfs and the kernel."""
    by = _by(trials)
    refs = [c for c in ("fuse-overlayfs", "kernel") if c in competitors and subject in competitors]
    pairs: list[tuple[str, str]] = [(subject, r) for r in refs]
    traced = f"{subject}+trace"  # the cost of tracing: against the same daemon without it
    if traced in competitors and subject in competitors:
        pairs.append((traced, subject))
    head = ["workload", "unit", *competitors, *[f"{a} slowdown vs {b}" for a, b in pairs]]
    rows = [head, ["---"] * len(head)]
    for g in groups:
        for metric in g.metrics:
            row = [metric.label, metric.unit + (" ↑" if metric.higher_is_better else " ↓")]
            for c in competitors:
                vals = [
                    float(t["metrics"][metric.key])
                    for t in by.get((c, g.name), {}).values()
                    if metric.key in t["metrics"]
                ]
                row.append(spread(vals))
            for a_name, r in pairs:
                ours, theirs = by.get((a_name, g.name), {}), by.get((r, g.name), {})
                ratios = []
                for rep in sorted(set(ours) & set(theirs)):
                    a = ours[rep]["metrics"].get(metric.key)
                    b = theirs[rep]["metrics"].get(metric.key)
                    if a is not None and b is not None:
                        s = slowdown(metric, float(a), float(b))
                        if s is not None:
                            ratios.append(s)
                row.append(ratio_spread(ratios))
            if any(cell != "—" for cell in row[2:]):
                rows.append(row)
    return _md(rows)


def daemon_table(trials: list[Trial], groups: list[Group], competitors: list[str]) -> str:
    """Per trial type: mount latency (ms), daemon peak RSS (MiB) and daemon CPU
    seconds, median (min–max) over repetitions, for the competitors that mount."""
    by = _by(trials)
    mounted = [c for c in competitors if c != "plain"]
    head = ["trial", *[f"{c} mount ms" for c in mounted]]
    daemons = [c for c in mounted if c != "kernel"]
    head += [f"{c} peak RSS MiB" for c in daemons] + [f"{c} CPU s" for c in daemons]
    rows = [head, ["---"] * len(head)]
    for g in groups:
        row = [g.name]
        for c in mounted:
            vals = [
                float(t["mount_latency_s"]) * 1000
                for t in by.get((c, g.name), {}).values()
                if t.get("mount_latency_s") is not None
            ]
            row.append(spread(vals))
        for key, scale in (("daemon_peak_rss_kib", 1 / 1024), ("daemon_cpu_s", 1.0)):
            for c in daemons:
                vals = [
                    float(t[key]) * scale
                    for t in by.get((c, g.name), {}).values()
                    if t.get(key) is not None
                ]
                row.append(spread(vals))
        if any(cell != "—" for cell in row[1:]):
            rows.append(row)
    return _md(rows)


def errors_table(trials: list[Trial]) -> str:
    errs = [t for t in trials if t.get("type") == "trial" and t.get("error")]
    if not errs:
        return ""
    lines = ["Failed trials:"]
    for t in errs:
        lines.append(f"- rep {t['rep']} {t['competitor']} {t['group']}: {str(t['error'])[:300]}")
    return "\n".join(lines)


def consistency_notes(trials: list[Trial]) -> str:
    """Flag a competitor that saw a different tree than the plain copy: a fast
    but wrong union would otherwise look good. Checks the W1 entry count and
    the W3 archive size (which also exposes hard links shown as distinct
    inodes: tar then stores their data twice)."""
    by = _by(trials)
    checks = (("walk", "entries", "walk entries"), ("tar", "tar_bytes", "tar archive bytes"))
    notes = []
    for group, key, what in checks:
        seen: dict[str, set[int]] = defaultdict(set)
        for (c, g), reps in by.items():
            if g == group:
                for t in reps.values():
                    if key in t["metrics"]:
                        seen[c].add(int(t["metrics"][key]))
        ref = seen.get("plain")
        if not ref:
            continue
        for c, vals in sorted(seen.items()):
            if vals != ref:
                notes.append(f"- {c}: {what} {sorted(vals)} vs plain copy {sorted(ref)}")
    return ("Differences from the plain copy:\n" + "\n".join(notes)) if notes else ""


def _md(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        if set(r) == {"---"}:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        else:
            out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(out)


# -- goals -------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """One row of the issue's goal table: a pairwise ratio (or an absolute value) and
    its target. *ratio* is unionfs's value over the reference's for higher-is-better
    metrics (MB/s, IOPS) and the same quotient for times: the target says which way."""

    label: str
    group: str
    key: str
    reference: str | None  # competitor to compare with, None: unionfs's own value
    target: float
    at_least: bool  # True: ratio >= target is met; False: ratio <= target
    variant: str | None = None  # measure this competitor instead of the subject


GOALS = (
    Goal("W4 seq read, cold (MB/s ÷ kernel)", "seqread", "seq_cold_MBps", "kernel", 0.8, True),
    Goal("W4 seq read, warm (MB/s ÷ kernel)", "seqread", "seq_warm_MBps", "kernel", 0.8, True),
    Goal("W4 seq read, warm, -o passthrough=on (MB/s ÷ kernel, reported)", "seqread",
         "seq_warm_MBps", "kernel", float("inf"), True, "unionfs-passthrough"),
    Goal("W8 random read (IOPS ÷ kernel)", "fio", "randread_iops", "kernel", 0.5, True),
    Goal("W8 random write (IOPS ÷ kernel)", "fio", "randwrite_iops", "kernel", 0.5, True),
    Goal("W6 untar + sync (time ÷ fuse-overlayfs)", "untar", "untar_sync_s", "fuse-overlayfs", 1.0, False),
    Goal("W6 untar + sync (time ÷ kernel, reported)", "untar", "untar_sync_s", "kernel", float("inf"), False),
    Goal("W9 dpkg -l (time ÷ fuse-overlayfs)", "chroot", "dpkg_l_s", "fuse-overlayfs", 1.0, False),
    Goal("W9 perl (time ÷ fuse-overlayfs)", "chroot", "perl_mods_s", "fuse-overlayfs", 1.0, False),
    Goal("W9 sh /bin/true (time ÷ fuse-overlayfs)", "chroot", "sh_exec_s", "fuse-overlayfs", 1.0, False),
    Goal("mount latency, exec to ready (ms)", "mount", "mount_ms", None, 100.0, False),
    Goal("W10 4 parallel readers (time ÷ fuse-overlayfs)", "parallel", "par4_s", "fuse-overlayfs", 1.0, False),
    Goal("W10 8 parallel readers (time ÷ fuse-overlayfs)", "parallel", "par8_s", "fuse-overlayfs", 1.0, False),
    # No regression: the previous round's targets, all met then.
    Goal("W1 cold walk (time ÷ fuse-overlayfs)", "walk", "walk_cold_s", "fuse-overlayfs", 1.5, False),
    Goal("W2 warm walk (time ÷ fuse-overlayfs)", "walk", "walk_warm_s", "fuse-overlayfs", 1.0, False),
    Goal("W3 tar read (time ÷ fuse-overlayfs)", "tar", "tar_warm_s", "fuse-overlayfs", 1.0, False),
    Goal("W5 copy-up (time ÷ fuse-overlayfs)", "copyup", "copyup_s", "fuse-overlayfs", 1.0, False),
    Goal("W7 rm -rf (time ÷ fuse-overlayfs)", "rmrf", "rmrf_s", "fuse-overlayfs", 1.5, False),
    Goal("W10 1 reader (time ÷ fuse-overlayfs)", "parallel", "par1_s", "fuse-overlayfs", 1.0, False),
)  # fmt: skip


def goals_table(trials: list[Trial], subject: str = "unionfs") -> str:
    by = _by(trials)
    rows = [["goal", "measured", "target", "verdict"], ["---"] * 4]
    for g in GOALS:
        ours = by.get((g.variant or subject, g.group), {})
        if g.reference is None:
            values = [float(t["metrics"][g.key]) for t in ours.values() if g.key in t["metrics"]]
        else:
            theirs = by.get((g.reference, g.group), {})
            values = []
            for rep in sorted(set(ours) & set(theirs)):
                a = ours[rep]["metrics"].get(g.key)
                b = theirs[rep]["metrics"].get(g.key)
                if a is not None and b:
                    values.append(float(a) / float(b))
        if not values:
            continue
        med = statistics.median(values)
        shown = spread(values) if g.reference is None else ratio_spread(values)
        if g.target == float("inf"):
            target, verdict = "(reported)", ""
        else:
            target = ("≥ " if g.at_least else "≤ ") + (
                f"{g.target:g}×" if g.reference else f"{g.target:g}"
            )
            met = med >= g.target if g.at_least else med <= g.target
            verdict = "met" if met else "**missed**"
        rows.append([g.label, shown, target, verdict])
    rss = [
        float(t["daemon_peak_rss_kib"]) / 1024
        for (c, _g), reps in by.items()
        if c == subject
        for t in reps.values()
        if t.get("daemon_peak_rss_kib") is not None
    ]
    if rss:
        rows.append(["daemon peak RSS, worst trial (MiB)", fmt_num(max(rss)), "≤ 64",
                     "met" if max(rss) <= 64 else "**missed**"])  # fmt: skip
    return _md(rows) if len(rows) > 2 else ""


def scaling_note(trials: list[Trial], competitors: list[str]) -> str:
    """How W10's time grows from 1 to 4 to 8 readers, per competitor (median seconds)."""
    by = _by(trials)
    lines = []
    for c in competitors:
        reps = by.get((c, "parallel"), {})
        med = {}
        for n in (1, 4, 8):
            vals = [float(t["metrics"][f"par{n}_s"]) for t in reps.values()
                    if f"par{n}_s" in t["metrics"]]  # fmt: skip
            if vals:
                med[n] = statistics.median(vals)
        if len(med) == 3 and med[1] > 0:
            lines.append(f"- {c}: {fmt_num(med[1])} s → {fmt_num(med[4])} s "
                         f"({med[4] / med[1]:.2f}×) → {fmt_num(med[8])} s ({med[8] / med[1]:.2f}×)")  # fmt: skip
    return ("W10 growth from 1 to 4 to 8 readers:\n" + "\n".join(lines)) if lines else ""


def startup_table(trials: list[Trial], subject: str = "unionfs") -> str:
    phases: dict[str, list[tuple[float, float]]] = {}
    for t in trials:
        if t.get("competitor") == subject and t.get("startup_phases_ms") and not t.get("error"):
            for name, (wall, cpu) in t["startup_phases_ms"].items():
                phases.setdefault(name, []).append((wall, cpu))
    if not phases:
        return ""
    rows = [["phase", "wall ms", "CPU ms"], ["---"] * 3]
    for name, vals in phases.items():
        rows.append([name, fmt_num(statistics.median(w for w, _ in vals)),
                     fmt_num(statistics.median(c for _, c in vals))])  # fmt: skip
    return _md(rows)


def requests_table(trials: list[Trial], groups: list[Group], subject: str = "unionfs") -> str:
    """Per trial type: unionfs's requests (median total, the top kinds) and its daemon
    CPU per request in µs (median over repetitions; the CPU spent starting up, until the
    mount appeared, is left out)."""
    by = _by(trials)
    rows = [["trial", "requests", "most", "CPU µs / request"], ["---"] * 4]
    for g in groups:
        reps = [t for t in by.get((subject, g.name), {}).values() if t.get("daemon_requests")]
        if not reps:
            continue
        totals = [sum(t["daemon_requests"].values()) for t in reps]
        per = [(float(t["daemon_cpu_s"]) - float(t.get("daemon_cpu_ready_s", 0))) * 1e6 / tot
               for t, tot in zip(reps, totals, strict=True)
               if t.get("daemon_cpu_s") is not None and tot]  # fmt: skip
        kinds: dict[str, list[int]] = defaultdict(list)
        for t in reps:
            for k, v in t["daemon_requests"].items():
                kinds[k].append(int(v))
        top = sorted(kinds.items(), key=lambda kv: -statistics.median(kv[1]))[:4]
        most = ", ".join(f"{k} {int(statistics.median(v))}" for k, v in top)
        rows.append([g.name, fmt_num(statistics.median(totals)), most,
                     fmt_num(statistics.median(per)) if per else "—"])  # fmt: skip
    return _md(rows) if len(rows) > 2 else ""
