"""Delta debugging: the shortest op list that still diverges the same way.

Because ops never depend on earlier outcomes (see :mod:`ops`), any sub-list of
a case's ops is itself a valid case, which is what makes classic ddmin
(Zeller & Hildebrandt) applicable directly. "The same way" means: the first
divergent stage shares at least one divergence kind with the original, so a
``result`` divergence is not traded for an unrelated ``tree:mtime`` one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tests.conformance.ops import Op
from tests.conformance.runner import Case, Outcome, run_case

T = TypeVar("T")


def ddmin(items: Sequence[T], still_fails: Callable[[list[T]], bool], deadline: float) -> list[T]:
    """A 1-minimal sub-list of *items* for which *still_fails* holds (best effort by *deadline*)."""
    current = list(items)
    n = 2
    while len(current) >= 2 and time.monotonic() < deadline:
        size = -(-len(current) // n)
        chunks = [current[i : i + size] for i in range(0, len(current), size)]
        for chunk in chunks:  # try a single chunk
            if still_fails(chunk):
                current, n = chunk, 2
                break
        else:
            for i in range(len(chunks)):  # try removing one chunk
                rest = [x for j, c in enumerate(chunks) if j != i for x in c]
                if still_fails(rest):
                    current, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(current):
                    break
                n = min(len(current), n * 2)
    if len(current) == 1 and still_fails([]):
        return []
    return current


def shrink(
    case: Case,
    original: Outcome,
    kinds: tuple[str, str],
    budget: float = 120.0,
    timeout: float = 10.0,
    **hooks: Any,
) -> tuple[list[int], Outcome]:
    """Shrink *case*'s ops; returns the kept op indices and the outcome of that replay.

    Args:
        hooks: Passed on to :func:`run_case` (test hooks such as ``tamper``).
    """
    deadline = time.monotonic() + budget
    wanted = original.kinds()
    indexed = list(enumerate(case.ops))
    # Ops after the first divergent one cannot matter: cut them first.
    if original.stage and original.stage.startswith("op#"):
        last = int(original.stage.split()[0][3:])
        indexed = indexed[: last + 1]
    if original.stage and not original.stage.startswith(
        ("op#", "unmount", "upper", "cross", "lowers")
    ):
        indexed = []  # diverged before any op ran
    best: dict[str, Outcome] = {}

    def still_fails(sub: list[tuple[int, Op]]) -> bool:
        out = run_case(
            Case(case.spec, [o for _, o in sub], case.seed),
            kinds,
            timeout,
            post=not original.stage or not original.stage.startswith("op#"),
            **hooks,
        )
        ok = out.diverged and bool(out.kinds() & wanted)
        if ok:
            best[",".join(str(i) for i, _ in sub)] = out
        return ok

    kept = ddmin(indexed, still_fails, deadline) if indexed else []
    key = ",".join(str(i) for i, _ in kept)
    outcome = best.get(key) or run_case(
        Case(case.spec, [o for _, o in kept], case.seed), kinds, timeout, **hooks
    )
    return [i for i, _ in kept], outcome
