"""Command line: ``python -m tests.conformance --cases N --seed S``.

Runs N random cases (case *i* of seed *S* has case seed ``S*10000+i``), shrinks
every divergent one and prints its seed, layers and shortest diverging op
list together with the command that replays exactly that list. Ends with
``cases=N diverged=M`` and the divergences by kind.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

from tests.conformance.compare import Divergence
from tests.conformance.exclusions import EXCLUSIONS
from tests.conformance.mounts import KINDS
from tests.conformance.runner import DEFAULT_OPS, Case, Outcome, make_case, run_case
from tests.conformance.shrink import shrink


def case_seed(seed: int, i: int) -> int:
    return seed * 10000 + i


def _renumber(outcome: Outcome, kept: list[int]) -> Outcome:
    def fix(text: str | None) -> str | None:
        if text and text.startswith("op#"):
            j, _, rest = text[3:].partition(" ")
            if j.isdigit() and int(j) < len(kept):
                return f"op#{kept[int(j)]}" + (" " + rest if rest else "")
        return text

    divs = [
        Divergence(d.kind, fix(d.where) or "", d.detail, d.paths, d.excluded_by)
        for d in outcome.divergences
    ]
    return Outcome(fix(outcome.stage), divs, outcome.excluded, outcome.notes, outcome.transcript)


def format_report(
    case: Case, kept: list[int] | None, outcome: Outcome, kinds: tuple[str, str], n_ops: int
) -> str:
    """The readable divergence report (also used by the pytest tests)."""
    ops = case.ops if kept is None else [case.ops[i] for i in kept]
    if kept:  # a replay numbers its ops 0..n-1: show the original indices
        outcome = _renumber(outcome, kept)
    idx = list(range(len(case.ops))) if kept is None else kept
    lines = [
        f"=== DIVERGENCE case-seed={case.seed} ({kinds[0]} = a, {kinds[1]} = b) ===",
        "layers:",
        case.spec.describe(),
        f"op list ({len(ops)} ops{'' if kept is None else ', shrunk'}):",
    ]
    lines += [f"  [{i}] {o}" for i, o in zip(idx, ops, strict=True)] or [
        "  (none: diverges right after mount)"
    ]
    lines.append(f"first divergence at: {outcome.stage}")
    lines += [f"  {d}" for d in outcome.divergences[:25]]
    if len(outcome.divergences) > 25:
        lines.append(f"  ... {len(outcome.divergences) - 25} more")
    lines += [f"  {d}" for d in dict.fromkeys(str(x) for x in outcome.excluded)][:5]
    lines += [f"  note: {n}" for n in outcome.notes]
    if case.seed is not None:
        sel = f" --ops {','.join(map(str, kept))}" if kept is not None else ""
        side = "" if kinds == ("kernel", "unionfs") else f" --sides {','.join(kinds)}"
        lines.append(
            f"replay: python -m tests.conformance --case-seed {case.seed} "
            f"--n-ops {n_ops}{sel}{side}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.conformance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--case-seed", type=int, help="run this single case (e.g. from a report)")
    ap.add_argument("--ops", help="comma-separated op indices of the case to keep (replay)")
    ap.add_argument("--n-ops", type=int, default=DEFAULT_OPS, help="ops generated per case")
    ap.add_argument(
        "--sides",
        default="kernel,unionfs",
        help="the two sides, e.g. kernel,kernel for the self-check",
    )
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per op before a hang")
    ap.add_argument("--no-shrink", action="store_true")
    ap.add_argument("--shrink-budget", type=float, default=180.0, help="seconds per divergence")
    ap.add_argument("--list-exclusions", action="store_true")
    args = ap.parse_args(argv)
    if args.list_exclusions:
        for ex in EXCLUSIONS:
            print(f"{ex.name}: {ex.reason}")
        return 0
    kinds_t = tuple(args.sides.split(","))
    if len(kinds_t) != 2 or not set(kinds_t) <= set(KINDS):
        ap.error(f"--sides takes two of {','.join(KINDS)}")
    kinds: tuple[str, str] = (kinds_t[0], kinds_t[1])
    seeds = (
        [args.case_seed]
        if args.case_seed is not None
        else [case_seed(args.seed, i) for i in range(args.cases)]
    )
    by_kind: collections.Counter[str] = collections.Counter()
    excluded: collections.Counter[str] = collections.Counter()
    diverged = 0
    start = time.monotonic()
    for s in seeds:
        case = make_case(s, args.n_ops)
        kept: list[int] | None = None
        if args.ops is not None:
            kept = [int(i) for i in args.ops.split(",") if i != ""]
            case = Case(case.spec, [case.ops[i] for i in kept], s)
        out = run_case(case, kinds, args.timeout)
        for d in out.excluded:
            excluded[d.excluded_by or "?"] += 1
        if not out.diverged:
            print(f"case-seed={s}: ok", flush=True)
            continue
        diverged += 1
        for k in sorted(out.kinds()):
            by_kind[k] += 1
        print(f"case-seed={s}: DIVERGED at {out.stage}", flush=True)
        if kept is None and not args.no_shrink:
            kept, out = shrink(case, out, kinds, args.shrink_budget, args.timeout)
            if not out.diverged:  # flaky: report the unshrunk run instead
                kept, out = None, run_case(case, kinds, args.timeout)
        full = make_case(s, args.n_ops)
        print(format_report(full, kept, out, kinds, args.n_ops), flush=True)
    print(f"elapsed={time.monotonic() - start:.1f}s")
    print(f"cases={len(seeds)} diverged={diverged}")
    for k, v in by_kind.most_common():
        print(f"  {k}: {v}")
    for k, v in excluded.most_common():
        print(f"  excluded by name {k}: {v}")
    return 1 if diverged else 0


if __name__ == "__main__":
    sys.exit(main())
