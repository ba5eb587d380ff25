"""Entry point: ``python -m tests.crash --kills N --seed S``."""

from __future__ import annotations

import argparse
import sys

from tests.crash.runner import Run, base_dir


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
    args = ap.parse_args(argv)
    if args.kills < 1:
        ap.error("--kills must be at least 1")
    with base_dir(args.basetemp) as base:
        report = Run(base, args.seed, big=not args.small).run(args.kills)
    print(report.summary())
    return 1 if report.inconsistencies else 0


if __name__ == "__main__":
    sys.exit(main())
