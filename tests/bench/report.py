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
    pairs = [(subject, r) for r in refs]
    traced = f"{subject}+trace"  # the cost of tracing: against the same daemon without it
    if traced in competitors and subject in competitors:
        pairs.append((traced, subject))
    head = ["workload", "unit", *competitors, *[f"{a} ÷ {b}" for a, b in pairs]]
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
