"""Sessions of workload, kill, check.

A session starts from an empty upper over the shared lower layers and runs a
few *segments*. A segment mounts unionfs, runs workload ops through it until the
daemon is killed, then checks what the dead daemon left:

1. the workdir holds only temporary entries (``WORKDIR/work/#N.PID``, the shared
   whiteout) and nothing else;
2. the kernel overlay mounts the upper with (a copy of) that workdir, read-write;
3. the kernel's merged view equals the state after the acknowledged ops, with or
   without the op in flight. The states come from a kernel overlay over the same
   lowers and an upper of its own, which replays the ops unionfs acknowledged,
   each of which must give the result unionfs gave;
4. the upper holds no partial file, no orphan and no stray whiteout;
5. the next unionfs mount empties the workdir and shows the same merged view.

Two more states are accepted for the op in flight, both steps the kernel overlay
takes too: its copy-up done but not the op (the only trace is a lower hard link
split off), and, for a directory moved onto a whiteout, the whiteout swapped to
the old name but not yet removed, which a note in the workdir names for the next
mount to remove.

The next segment goes on from there with that mount. A kill that finds an
inconsistency ends its session (the states have parted), and a fresh one starts.

A kill is either a ``kill -9`` from outside, a random delay after the start of a
random op (it may land inside a system call: a big copy-up, say), or the daemon's
own SIGKILL right before or after its N-th change to the layers
(:mod:`tests.crash.daemon`), which reaches every window between two steps.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tests.crash import tree
from tests.crash.layers import BIG_FILES, build_lowers
from tests.crash.ops import GONE, Op, apply, close_all, run
from tests.crash.scripts import SCRIPTS
from tests.crash.workload import Workload
from tests.mounting import UnionMount, kernel_overlay, lazy_unmount, mount_type, start_unionfs
from unionfs.overlay.markers import is_whiteout

SEGMENT_TIMEOUT = 300.0  # a hung daemon is killed and reported, never waited for


@dataclass
class Logged:
    op: Op
    result: str
    task: str
    replay: str | None = None  # the kernel replay's result, once replayed
    note: str = ""


@dataclass
class Kill:
    number: int
    session: int
    how: str
    in_flight: int | None = None  # index in the session log
    outcome: str = ""  # "took effect", "had not taken effect", "neither state", ...
    leftovers: list[str] = field(default_factory=list)
    noted: set[str] = field(default_factory=set)  # whiteouts the next mount is to drop
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    seed: int
    kills: list[Kill] = field(default_factory=list)
    inconsistencies: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def summary(self) -> str:
        by_how: dict[str, int] = {}
        for k in self.kills:
            kind = k.how.split()[0]
            by_how[kind] = by_how.get(kind, 0) + 1
        outcomes: dict[str, int] = {}
        for k in self.kills:
            outcomes[k.outcome] = outcomes.get(k.outcome, 0) + 1
        staged = sum(1 for k in self.kills if k.leftovers)
        noted = sum(1 for k in self.kills if k.noted)
        lines = [
            f"kill points tried: {len(self.kills)} "
            f"({', '.join(f'{v} {h}' for h, v in sorted(by_how.items()))})",
            "op in flight: " + ", ".join(f"{v} {o}" for o, v in sorted(outcomes.items())),
            f"kills that left temporary entries in the workdir: {staged} "
            f"(a whiteout for the next mount to drop: {noted})",
            f"inconsistencies: {len(self.inconsistencies)}",
            f"elapsed: {self.elapsed:.0f}s (seed {self.seed})",
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class Plan:
    """How the daemon of a segment dies: ``by="self"`` right before its *change*-th
    change to the layers (``"N"``) or right after it (``"N+"``; ``"-"``: never), or
    ``by="kill-9"`` from outside, *delay* seconds after the start of a random op."""

    by: str
    change: str = "-"
    delay: float = 0.0

    def __str__(self) -> str:
        if self.by == "self":
            return f"self at-change {self.change}"
        return f"kill-9 delay {self.delay * 1000:.2f}ms"


class Inconsistent(Exception):
    pass


def _copy_tree(src: Path, dst: Path) -> None:
    """``cp -a``: devices (the shared whiteout), xattrs and hard links kept."""
    subprocess.run(["cp", "-a", os.fspath(src), os.fspath(dst)], check=True)


def _kind(entry: tree.Entry) -> str:
    c = str(entry[0])[0]
    return {"-": "f", "d": "d", "l": "l", "p": "p"}.get(c, c)


def model_of(view: tree.View) -> dict[str, str]:
    return {p: _kind(e) for p, e in view.items() if p and not p.endswith("/")}


class Run:
    """One crash-test run: shared lowers, then sessions until *kills* kill points."""

    def __init__(
        self,
        base: Path,
        seed: int,
        big: bool = True,
        out: TextIO | None = None,
        daemon_args: tuple[str, ...] = (),
    ) -> None:
        self.base = base
        self.seed = seed
        self.rng = random.Random(seed)
        self.out = out if out is not None else sys.stdout
        self.daemon_args = daemon_args
        self.report = Report(seed)
        _let_others_in(base)  # the workload makes entries as another user too
        self.lowers = build_lowers(base, seed, big)
        self.lower_view = self._lower_view()
        self.workload = Workload(self.rng, model_of(self.lower_view), list(BIG_FILES))
        self._session_no = 0

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _lower_view(self) -> tree.View:
        mnt = self.base / "lower-view"
        mnt.mkdir()
        with kernel_overlay(self.lowers, mnt):
            return tree.view(os.fspath(mnt))

    # -- the run ------------------------------------------------------------------

    def scripted(self, ops: list[Op], plan: Plan) -> Kill:
        """One session that runs exactly *ops*; the daemon dies as *plan* says, or after
        the last op."""
        self._session_no += 1
        with Session(self, self._session_no) as s:
            s.run(1, ops, plan)
        return self.report.kills[-1]

    def run(self, kills: int) -> Report:
        """Random kill points: sessions of one to four kills until *kills*."""
        with self._timed():
            while len(self.report.kills) < kills:
                self._session_no += 1
                with Session(self, self._session_no) as s:
                    s.run(min(self.rng.randint(1, 4), kills - len(self.report.kills)))
        return self.report

    def every_step(self, names: list[str]) -> Report:
        """Each script of :mod:`tests.crash.scripts` from an empty upper, killed right
        before and right after each change the daemon makes, until it runs to its end."""
        with self._timed():
            for name in names:
                self.say(f"-- {name}")
                n = 1
                while True:
                    ends = [
                        self.scripted(SCRIPTS[name], Plan("self", f"{n}{s}")).in_flight is None
                        for s in ("", "+")
                    ]
                    if any(ends):
                        break
                    n += 1
        return self.report

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        start = time.monotonic()
        lowers_before = [self._raw(p) for p in self.lowers]
        yield
        if [self._raw(p) for p in self.lowers] != lowers_before:
            self.report.inconsistencies.append("a lower layer changed")
            self.say("=== INCONSISTENCY: a lower layer changed")
        self.report.elapsed = time.monotonic() - start

    @staticmethod
    def _raw(path: Path) -> list[tuple[str, int, int]]:
        out = []
        for dirpath, _, names in os.walk(path):
            for n in names:
                st = os.lstat(os.path.join(dirpath, n))
                out.append((os.path.join(dirpath, n), st.st_ino, st.st_ctime_ns))
        return sorted(out)


class Session:
    """Fresh upper and workdir; a kernel overlay replaying what unionfs acknowledged."""

    def __init__(self, run: Run, number: int) -> None:
        self.r = run
        self.number = number
        self.dir = run.base / f"session-{number}"
        for name in ("upper", "work", "mnt", "kupper", "kwork", "kmnt", "check"):
            (self.dir / name).mkdir(parents=True)
        self.upper = self.dir / "upper"
        self.work = self.dir / "work"
        self.mnt = self.dir / "mnt"
        self.arm_file = self.dir / "armed"  # a self-killing daemon counts once it exists
        self.log: list[Logged] = []
        self.replayed = 0  # log entries the kernel replay has been given
        self.replay_handles: dict[int, int] = {}
        self.model = model_of(run.lower_view)
        self.um: UnionMount | None = None
        self.stack = contextlib.ExitStack()
        self.failed = False

    def __enter__(self) -> Session:
        self.stack.__enter__()
        self.stack.enter_context(
            kernel_overlay(
                self.r.lowers, self.dir / "kmnt", self.dir / "kupper", self.dir / "kwork"
            )
        )
        self.stack.callback(close_all, self.replay_handles)
        self.stack.callback(self._stop_unionfs)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.__exit__(*exc)  # type: ignore[arg-type]
        if not self.failed:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _stop_unionfs(self) -> None:
        um, self.um = self.um, None
        try:
            if um is not None:
                um.unmount()
        finally:
            if mount_type(self.mnt) is not None:  # whatever happened: nothing left behind
                lazy_unmount(self.mnt)

    # -- segments ----------------------------------------------------------------

    def run(self, segments: int, script: list[Op] | None = None, plan: Plan | None = None) -> None:
        """*segments* kill points; with *script*, one segment that runs exactly those ops
        (the daemon dies as *plan* says, or after the last op)."""
        plan = plan or self._pick_plan()
        self.um = self._mount(plan)
        for i in range(segments):
            kill = Kill(len(self.r.report.kills) + 1, self.number, str(plan))
            self.r.report.kills.append(kill)
            self._segment(kill, plan, script)
            plan = self._pick_plan()
            last = i == segments - 1
            try:
                self._check(kill, None if last else plan)
            except Inconsistent:
                self.failed = True
                self._report(kill)
                return
            finally:
                self.r.say(self._line(kill))

    def _pick_plan(self) -> Plan:
        r = self.r.rng
        if r.random() < 0.5:
            return Plan("self", f"{r.randint(1, 250)}{r.choice(('', '+'))}")
        return Plan("kill-9", delay=r.choice((0.0, r.uniform(0, 0.003), r.uniform(0, 0.04))))

    def _mount(self, plan: Plan | None) -> UnionMount:
        """unionfs; for a kill by its own hand, the daemon that counts its changes."""
        command = None
        self.arm_file.unlink(missing_ok=True)  # armed when the workload starts (_segment)
        if (plan and plan.by == "self") or self.r.daemon_args:
            spec = plan.change if plan and plan.by == "self" else "-"
            arm = ["--arm-file", os.fspath(self.arm_file)]
            command = [sys.executable, "-m", "tests.crash.daemon", spec, *arm]
            command += [*self.r.daemon_args, "--"]
        return start_unionfs(
            self.r.lowers, self.mnt, self.upper, self.work, command=command, timeout=60
        )

    def _segment(self, kill: Kill, plan: Plan, script: list[Op] | None = None) -> None:
        """Run ops through the mount until the daemon is dead, and unmount it."""
        um = self.um
        assert um is not None
        self.um = None
        r = self.r.rng
        max_ops = r.randint(5, 150)
        delay = None
        at_op = r.randrange(max_ops)
        if plan.by == "kill-9":
            delay = plan.delay
            kill.how += f" into op #{len(self.log) + at_op}"
        handles: dict[int, int] = {}
        queue: list[Op] = list(script) if script is not None else []
        task = "script"
        hung: list[bool] = []

        def on_hang() -> None:
            hung.append(True)
            um.proc.kill()

        watchdog = threading.Timer(SEGMENT_TIMEOUT, on_hang)
        watchdog.start()
        self.arm_file.touch()
        timer: threading.Timer | None = None
        done = 0
        try:
            while True:
                if not queue:
                    if script is not None or (delay is None and done >= max_ops):
                        break
                    task, queue = self.r.workload.task(self.model)
                    continue
                op = queue.pop(0)
                if delay is not None and done == at_op:
                    timer = threading.Timer(delay, um.proc.kill)
                    timer.start()
                result = run(op, os.fspath(self.mnt), handles)
                self.log.append(Logged(op, result, task))
                if result in GONE:
                    kill.in_flight = len(self.log) - 1
                    break
                if result == "ok":
                    apply(self.model, op)
                done += 1
            if kill.in_flight is None:
                kill.how += f" (idle after {done} ops)"
                um.proc.kill()
            else:
                try:  # it may still be on its way out
                    um.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    kill.problems.append("the mount broke while the daemon was alive")
                    um.proc.kill()
        finally:
            watchdog.cancel()
            if timer is not None:
                timer.join()
            close_all(handles)
            um.kill()  # reaps it, unmounts lazily
        if hung:
            kill.problems.append(f"hang: no answer for {SEGMENT_TIMEOUT:.0f}s; killed")
        if um.proc.returncode != -9:
            kill.problems.append(f"the daemon ended with status {um.proc.returncode}, not SIGKILL")
        if mount_type(self.mnt) is not None:
            lazy_unmount(self.mnt)
            kill.problems.append("the dead daemon's mount could not be removed")

    # -- checks -----------------------------------------------------------------

    def _check(self, kill: Kill, next_plan: Plan | None) -> None:
        problems = kill.problems
        temp, other = tree.workdir_leftovers(os.fspath(self.work))
        kill.leftovers = temp
        if other:
            problems.append(f"the workdir holds more than temporary entries: {other}")
        kill.noted = tree.drop_notes(os.fspath(self.work))
        seen = self._kernel_view(problems)
        if seen is not None:  # the kernel lists a noted whiteout in a dir without lower part
            seen = {p: e for p, e in seen.items() if p not in kill.noted or e[0] != "!lookup"}
        want = self._expected(kill, seen, problems)
        problems += tree.check_upper(os.fspath(self.upper), want, self.r.lower_view, kill.noted)
        # The next mount: clears the workdir, shows the same tree.
        try:
            self.um = self._mount(next_plan)
        except RuntimeError as e:
            problems.append(f"the next unionfs mount failed: {e}")
            raise Inconsistent from None
        temp, other = tree.workdir_leftovers(os.fspath(self.work))
        if temp or other:
            problems.append(f"the next unionfs mount left in the workdir: {temp + other}")
        for path in sorted(kill.noted):
            if os.path.lexists(self.upper / path) and is_whiteout(os.lstat(self.upper / path)):
                problems.append(f"the next unionfs mount left the noted whiteout {path}")
        shown = tree.view(os.fspath(self.mnt))
        if shown != want:
            problems.append("unionfs mounted again shows another tree than expected:")
            problems += tree.diff(shown, want)
        if next_plan is None:
            self._stop_unionfs()
        self.model = model_of(want)
        if problems:
            raise Inconsistent

    def _kernel_view(self, problems: list[str]) -> tree.View | None:
        """The kernel overlay's merged view of the upper the daemon left, mounted with a
        copy of its workdir (so that what unionfs does with it can be checked next)."""
        check = self.dir / "check"
        work = check / "work"
        _copy_tree(self.work, work)
        mnt = check / "mnt"
        mnt.mkdir()
        try:
            with kernel_overlay(self.r.lowers, mnt, self.upper, work):
                with open("/proc/self/mounts") as f:
                    opts = [ln.split()[3] for ln in f if ln.split()[1] == os.fspath(mnt)]
                if not opts or not opts[-1].startswith("rw"):
                    problems.append(f"the kernel overlay mounted read-only: {opts}")
                return tree.view(os.fspath(mnt))
        except subprocess.CalledProcessError as e:
            problems.append(f"the kernel overlay refused the upper and workdir: {e.stderr!r}")
            return None
        finally:
            shutil.rmtree(work, ignore_errors=True)
            mnt.rmdir()

    def _replay(self, upto: int, problems: list[str]) -> None:
        kroot = os.fspath(self.dir / "kmnt")
        while self.replayed < upto:
            e = self.log[self.replayed]
            e.replay = run(e.op, kroot, self.replay_handles)
            if e.replay != e.result:
                problems.append(
                    f"op #{self.replayed} {e.op}: unionfs answered {e.result}, "
                    f"the kernel overlay {e.replay}"
                )
            self.replayed += 1

    def _expected(self, kill: Kill, seen: tree.View | None, problems: list[str]) -> tree.View:
        """The state after the acknowledged ops, or after the op in flight too: whichever
        the kernel's view of the crashed upper equals."""
        kroot = os.fspath(self.dir / "kmnt")
        end = len(self.log) if kill.in_flight is None else kill.in_flight
        self._replay(end, problems)
        before = tree.view(kroot)
        if kill.in_flight is None:
            kill.outcome = "none in flight"
            if seen is not None and seen != before:
                problems.append("the tree is not the state after the acknowledged ops:")
                problems += tree.diff(seen, before)
            self._close_replay()
            return before
        e = self.log[kill.in_flight]
        split = self._split_links(seen, before)
        if split:
            # Only its copy-up happened, which is no change but for this one, as in
            # the kernel (index=off): the copy of a file hard-linked in a lower layer
            # is a link of its own. The replay copies the same files up.
            for i, path in enumerate(split):
                h = -1 - i
                for op in (Op("open", (path, "WRONLY", h)), Op("close", (h,))):
                    if run(op, kroot, self.replay_handles) != "ok":
                        problems.append(f"the replay could not copy {path} up")
            before = tree.view(kroot)
        if seen == before:
            e.note = "in flight: had not taken effect"
            kill.outcome = "had not taken effect"
            if split:
                e.note += f" (its copy-up of {', '.join(split)} had)"
                kill.outcome += " but its copy-up had"
            self.replayed += 1  # not replayed: it did not happen
            self._close_replay()
            return before
        e.replay = run(e.op, kroot, self.replay_handles)
        self.replayed += 1
        after = tree.view(kroot)
        self._close_replay()
        if seen == after:
            e.note = "in flight: took effect"
            kill.outcome = "took effect"
            return after
        e.note = "in flight: half done"
        kill.outcome = "neither state"
        if seen is not None:
            problems.append(
                f"the tree is neither the state before op #{kill.in_flight} nor after it"
            )
            problems.append(f" against the state before op #{kill.in_flight} ({e.op}):")
            problems += tree.diff(seen, before)
            problems.append(f" against the state after it (the kernel said {e.replay}):")
            problems += tree.diff(seen, after)
        return after

    def _split_links(self, seen: tree.View | None, before: tree.View) -> list[str]:
        """The paths where *seen* differs from *before* only by a lower hard link that
        has been split off (a lower nlink above 1, a smaller one now); [] unless
        that is the only difference."""
        if seen is None or set(seen) != set(before):
            return []
        split = []
        for path, got in seen.items():
            want = before[path]
            if got == want:
                continue
            lower = self.r.lower_view.get(path)
            same_but_nlink = got[:5] + got[6:] == want[:5] + want[6:]
            if not (same_but_nlink and lower and lower[5] and lower[5] > 1 and got[5] < want[5]):
                return []
            split.append(path)
        return split

    def _close_replay(self) -> None:
        close_all(self.replay_handles)

    # -- reporting --------------------------------------------------------------

    def _line(self, kill: Kill) -> str:
        where = "no op in flight"
        if kill.in_flight is not None:
            where = f"op #{kill.in_flight} {self.log[kill.in_flight].op} {kill.outcome}"
        staged = f"; workdir held {len(kill.leftovers)} temporary" if kill.leftovers else ""
        bad = f"; {len(kill.problems)} PROBLEM(S)" if kill.problems else ""
        return f"kill {kill.number} (session {self.number}, {kill.how}): {where}{staged}{bad}"

    def _report(self, kill: Kill) -> None:
        lines = [f"=== INCONSISTENCY at kill {kill.number} (session {self.number}, {kill.how})"]
        lines += [f"  {p}" for p in kill.problems]
        lines.append(f"  operation log of session {self.number} (from an empty upper):")
        task = None
        for i, e in enumerate(self.log):
            if e.task != task:
                task = e.task
                lines.append(f"    -- {task}")
            mark = " <== in flight at the kill" if i == kill.in_flight else ""
            note = f"  [{e.note}]" if e.note and i != kill.in_flight else ""
            lines.append(f"    [{i}] {e.op} -> {e.result}{note}{mark}")
        lines.append(f"  session directory: {self.dir}")
        text = "\n".join(lines)
        self.r.report.inconsistencies.append(text)
        self.r.say(text)


def _let_others_in(path: Path) -> None:
    """Make *path* and every directory above it traversable for other users."""
    for p in (path, *path.parents):
        st = os.stat(p)
        if not st.st_mode & 0o001:
            os.chmod(p, stat.S_IMODE(st.st_mode) | 0o111)


@contextlib.contextmanager
def base_dir(path: str | None) -> Iterator[Path]:
    """*path* (made if needed), or a temporary directory removed at the end."""
    if path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    import tempfile

    p = Path(tempfile.mkdtemp(prefix="unionfs-crash-"))
    try:
        yield p
    finally:
        with open("/proc/self/mounts") as f:
            left = [ln.split()[1] for ln in f if ln.split()[1].startswith(os.fspath(p))]
        for mnt in reversed(left):
            lazy_unmount(mnt)
        shutil.rmtree(p, ignore_errors=True)
