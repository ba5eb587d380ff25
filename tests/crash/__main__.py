"""Entry point: ``python -m tests.crash --kills N --seed S``."""

from __future__ import annotations

import argparse
import sys

from tests.crash.runner import Run, base_dir
from tests.crash.scripts import SCRIPTS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.crash",
        description="kill -9 the unionfs daemon at random points of a mixed workload and "
        "check what it leaves behind after each kill",
    )
    ap.add_argument("--kills", type=int, default=100, help="kill points to try (default 100)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--basetemp", help="directory for the layers (kept); default: a temporary one")
    ap.add_argument(
        "--small", action="store_true", help="big lower files 64 times smaller (quicker)"
    )
    ap.add_argument(
        "--every-step",
        nargs="?",
        const=",".join(SCRIPTS),
        metavar="SCRIPTS",
        help="instead: kill before and after every change of the short scripts "
        "(comma-separated; default all: " + ", ".join(SCRIPTS) + ")",
    )
    args = ap.parse_args(argv)
    if args.kills < 1:
        ap.error("--kills must be at least 1")
    names = args.every_step.split(",") if args.every_step else []
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        ap.error(f"no such script: {', '.join(unknown)}")
    with base_dir(args.basetemp) as base:
        run = Run(base, args.seed, big=not args.small and not names)
        report = run.every_step(names) if names else run.run(args.kills)
    print(report.summary())
    return 1 if report.inconsistencies else 0


if __name__ == "__main__":
    sys.exit(main())
