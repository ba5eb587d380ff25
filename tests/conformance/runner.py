"""Run one case on two sides and report where they first diverge.

A case is a :class:`~tests.conformance.layers.LayerSpec` plus an op list. The
runner builds the layers twice, mounts side *a* and side *b* (normally the
kernel and unionfs; kernel and kernel for the self-check), replays the ops on
both, and compares after every op. It stops at the first op that diverges
(later differences would only be consequences). When every op agrees it
checks, after unmount: the upper dirs, the cross-mounts (each kind over the
other's upper must show the other's final tree) and that no lower changed.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.conformance import exclusions, layers, snapshot
from tests.conformance.compare import Clock, Divergence, diff_inodes, diff_trees, norm_result
from tests.conformance.mounts import MountError, Side
from tests.conformance.ops import Op, generate_ops
from tests.conformance.userns import unprivileged
from tests.conformance.worker import Hang, Worker, WorkerSetupError

DEFAULT_OPS = 25


def unprivileged_mode() -> bool:
    """The suite runs as an ordinary user (the kernel side mounts in a user namespace)."""
    return os.geteuid() != 0


def _listed_apart(ra: object, rb: object) -> frozenset[bytes]:
    """For two directory listings, the names only one side listed (for exclusions)."""
    if (
        isinstance(ra, tuple)
        and isinstance(rb, tuple)
        and ra[0] == rb[0] == "ok"
        and isinstance(ra[1], list)
        and isinstance(rb[1], list)
    ):
        return frozenset(set(ra[1]) ^ set(rb[1]))
    return frozenset()


@dataclass
class Case:
    spec: layers.LayerSpec
    ops: list[Op]
    seed: int | None = None


@dataclass
class Outcome:
    """Where a case first diverged (``stage`` is None when it did not)."""

    stage: str | None = None
    divergences: list[Divergence] = field(default_factory=list)
    excluded: list[Divergence] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return self.stage is not None

    def kinds(self) -> set[str]:
        return {d.kind for d in self.divergences}


def make_case(seed: int, n_ops: int = DEFAULT_OPS) -> Case:
    rng = random.Random(seed)
    spec = layers.generate(rng)
    return Case(spec, generate_ops(rng, spec.all_paths(), spec.merged_view(), n_ops), seed)


class _Run:
    """State of one execution; separated so cleanup lives in one ``finally``."""

    def __init__(
        self,
        case: Case,
        kinds: tuple[str, str],
        timeout: float,
        post: bool,
        tamper: Callable[[bytes], None] | None,
        before_op: Callable[[int, Side, Op], None] | None,
        options: str,
        command: list[str] | None = None,
    ):
        self.case, self.kinds, self.timeout, self.post = case, kinds, timeout, post
        self.tamper, self.before_op, self.options = tamper, before_op, options
        self.command = command
        self.tmp = os.fsencode(tempfile.mkdtemp(prefix="conf-", dir="/tmp"))
        self.sides: dict[str, Side] = {}
        self.workers: dict[str, Worker] = {}
        self.dirs: dict[str, tuple[list[bytes], bytes | None, bytes | None]] = {}
        self.clock = Clock()
        self.out = Outcome()
        self.history: list[tuple[Op, Any, Any]] = []  # each op run so far, with both results
        self.lower_index: dict[str, dict[int, str]] = {}  # per side: lower inode -> where

    def fail(
        self,
        stage: str,
        divs: list[Divergence],
        snaps: tuple[snapshot.Snapshot, snapshot.Snapshot] | None = None,
    ) -> bool:
        """Record the divergences of *stage* that no exclusion covers; *snaps* are the two
        trees they were found in (the exclusions look at them)."""
        ctx = exclusions.Context(self.case.spec, self.history, self.kinds, snaps)
        remaining = exclusions.label_in(divs, ctx)
        self.out.excluded.extend(d for d in divs if d.excluded_by)
        ending = [d.excluded_by for d in divs if d.excluded_by in exclusions.ENDS_CASE]
        if ending:
            # The rest of this op's divergences follow from the one that ends the case.
            self.out.notes.append(f"ended by name {ending[0]} at {stage}")
            return True
        if remaining:
            self.out.stage, self.out.divergences = stage, remaining
            self.note_daemon_logs()
            return True
        return False

    def note_daemon_logs(self) -> None:
        """Keep the tail of a unionfs log that shows a traceback (the temp dir goes away)."""
        for name, side in self.sides.items():
            log = side.log()
            if "Traceback" in log or "Error" in log:
                self.out.notes.append(f"unionfs log of side {name} (tail):\n{log[-2000:]}")

    def mount(
        self, name: str, kind: str, dirs: tuple[list[bytes], bytes | None, bytes | None], mnt: bytes
    ) -> Side | None:
        os.mkdir(mnt)
        try:
            side = Side(
                kind,
                dirs[0],
                dirs[1],
                dirs[2],
                mnt,
                self.options,
                self.command if kind == "unionfs" else None,
            )
        except MountError as e:
            self.fail(f"mount {name}", [Divergence("mount", name, str(e)[:500])])
            return None
        self.sides[name] = side
        try:
            self.workers[name] = Worker(mnt, self.timeout, side.worker_setup)
        except WorkerSetupError as e:
            self.fail(f"mount {name}", [Divergence("mount", name, str(e)[:500])])
            return None
        return side

    def hang(self, stage: str, name: str, err: Hang) -> None:
        side = self.sides.get(name)
        pid = side.pid if side else None
        self.fail(
            stage,
            [Divergence("hang", name, f"{side.kind if side else '?'} (daemon pid {pid}): {err}")],
        )
        if side:
            side.abort()

    def snaps(self, stage: str) -> tuple[snapshot.Snapshot, snapshot.Snapshot] | None:
        res = []
        for name in ("a", "b"):
            try:
                s = self.workers[name].call("snap")
            except Hang as e:
                self.hang(stage, name, e)
                return None
            if isinstance(s, tuple):  # ("crash", message)
                self.fail(stage, [Divergence("crash", name, str(s))])
                return None
            snapshot.identify(s, self.index(name))
            res.append(s)
        return res[0], res[1]

    def index(self, owner: str) -> dict[int, str]:
        """Side *owner*'s layer inodes: its lowers (fixed) and its upper as it is now."""
        upper = self.dirs[owner][1]
        if upper is None:
            return self.lower_index[owner]
        return {**self.lower_index[owner], **snapshot.inode_index([("u", upper)])}

    def run(self) -> Outcome:
        spec = self.case.spec
        for name in ("a", "b"):
            base = os.path.join(self.tmp, name.encode())
            os.mkdir(base)
            self.dirs[name] = layers.materialize(spec, base)
            if name == "b" and self.tamper:
                self.tamper(base)
        lowers_before = {n: [snapshot.take(p, "raw") for p in d[0]] for n, d in self.dirs.items()}
        for n, d in self.dirs.items():
            self.lower_index[n] = snapshot.inode_index([(f"l{i}", p) for i, p in enumerate(d[0])])
        self.clock.boundary()
        for name, kind in zip(("a", "b"), self.kinds, strict=True):
            if (
                self.mount(
                    name, kind, self.dirs[name], os.path.join(self.tmp, name.encode(), b"mnt")
                )
                is None
            ):
                return self.out
        pair = self.snaps("initial")
        self.clock.end()
        if pair is None or self.fail(
            "initial",
            diff_trees(*pair, self.clock, self.clock, "tree")
            + diff_inodes(None, pair[0], None, pair[1]),
            pair,
        ):
            return self.out
        for k, o in enumerate(self.case.ops):
            stage = f"op#{k} {o}"
            if self.before_op:
                self.before_op(k, self.sides["b"], o)
            self.clock.boundary()
            results = []
            for name in ("a", "b"):
                try:
                    results.append(self.workers[name].call("op", o))
                except Hang as e:
                    self.hang(stage, name, e)
                    return self.out
            new = self.snaps(stage)
            self.clock.end()
            if new is None:
                return self.out
            ra, rb = (norm_result(r, self.clock) for r in results)
            self.history.append((o, ra, rb))
            self.out.transcript.append(
                f"[{k}] {o} -> {ra!r:.120}" + ("" if ra == rb else f" | b: {rb!r:.120}")
            )
            divs = []
            if ra != rb:
                divs.append(
                    Divergence(
                        "result",
                        f"op#{k} {o}",
                        f"a={ra!r:.200} b={rb!r:.200}",
                        _listed_apart(ra, rb),
                        a=ra,
                        b=rb,
                    )
                )
            divs += diff_trees(*new, self.clock, self.clock, "tree")
            divs += diff_inodes(pair[0], new[0], pair[1], new[1])
            if self.fail(stage, divs, new):
                return self.out
            pair = new
        self.final = pair
        for name in ("a", "b"):
            self.workers.pop(name).stop()
            err = self.sides[name].close()
            if err and self.fail("unmount", [Divergence("unmount", name, err)]):
                return self.out
        if self.post and not spec.readonly:
            self.post_checks()
        if not self.out.diverged:
            self.fail(
                "lowers",
                [
                    d
                    for n, d0 in lowers_before.items()
                    for i, (before, lower) in enumerate(zip(d0, self.dirs[n][0], strict=True))
                    for d in diff_trees(
                        before,
                        snapshot.take(lower, "raw"),
                        None,
                        None,
                        f"lower{i}-{n}",
                        flavour="raw",
                    )
                ],
            )
        return self.out

    def post_checks(self) -> None:
        ua = snapshot.take(self.dirs["a"][1] or b"", "upper", self.index("a"))
        ub = snapshot.take(self.dirs["b"][1] or b"", "upper", self.index("b"))
        if self.fail(
            "upper", diff_trees(ua, ub, self.clock, self.clock, "upper", flavour="upper"), (ua, ub)
        ):
            return
        # kind of a over b's upper must show b's final tree, and vice versa.
        for mounted_kind, owner, final in (
            (self.kinds[0], "b", self.final[1]),
            (self.kinds[1], "a", self.final[0]),
        ):
            name = f"x{owner}"
            lowers, upper, _ = self.dirs[owner]
            work = os.path.join(self.tmp, owner.encode(), b"xwork")
            os.mkdir(work)
            side = self.mount(
                name,
                mounted_kind,
                (lowers, upper, work),
                os.path.join(self.tmp, owner.encode(), b"xmnt"),
            )
            if side is None:
                return
            stage = f"cross: {mounted_kind} over {self.kinds[0 if owner == 'a' else 1]}'s upper"
            try:
                snap = self.workers[name].call("snap")
            except Hang as e:
                self.hang(stage, name, e)
                return
            if isinstance(snap, tuple):
                self.fail(stage, [Divergence("crash", name, str(snap))])
                return
            snapshot.identify(snap, self.index(owner))
            self.workers.pop(name).stop()
            self.sides.pop(name).close()
            if unprivileged_mode():
                # In a user namespace the kernel cannot record origins (empty ones), so
                # st_ino of a copy-up is kept only while its inode is cached.
                for tree in (final, snap):
                    for ent in tree.values():
                        ent.pop("src", None)
            if self.fail(stage, diff_trees(final, snap, None, None, f"cross-{mounted_kind}")):
                return

    def cleanup(self) -> None:
        for w in self.workers.values():
            w.stop()
        for side in self.sides.values():
            if side.mounted:
                side.abort()
        remove_tree(self.tmp)


def remove_tree(path: bytes) -> None:
    """Remove a case's directory, also what an ordinary user cannot remove at first: the
    kernel overlay leaves its ``work/work`` with mode 0 (the unprivileged mode), and
    layers have read-only directories."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for top, dirs, _ in os.walk(path):
        for d in dirs:
            sub = os.path.join(top, d)
            if not os.path.islink(sub):
                with contextlib.suppress(OSError):
                    os.chmod(sub, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def run_case(
    case: Case,
    kinds: tuple[str, str] = ("kernel", "unionfs"),
    timeout: float = 10.0,
    post: bool = True,
    tamper: Callable[[bytes], None] | None = None,
    before_op: Callable[[int, Side, Op], None] | None = None,
    options: str = "",
    command: list[str] | None = None,
) -> Outcome:
    """Execute *case* on both sides; never leaves a mount, daemon or temp dir behind.

    Args:
        tamper: Test hook: called with side b's base dir after its layers are
            built, to plant a difference (the comparator's negative control).
        before_op: Test hook: called with the op's index, side b and the op before
            each op (e.g. to stop the daemon and provoke a hang).
        options: Mount options both sides get (a mode: ``redirect_dir=on``, ...).
        command: Test hook: the unionfs command line to run (a daemon with a planted
            fault, ``tests/faults.py``), for negative controls.
    """
    notes: list[str] = []
    if os.geteuid() != 0:  # the unprivileged mode: layers as an ordinary user builds them
        case = Case(unprivileged(case.spec), case.ops, case.seed)
    if "unionfs" in kinds:
        case, notes = exclusions.drop_unsupported(case)
    r = _Run(case, kinds, timeout, post, tamper, before_op, options, command)
    try:
        out = r.run()
    finally:
        r.cleanup()
    out.notes[:0] = notes
    return out
