"""``unionfs trace MNT|FILE``: a mount's overlay decisions, readable.

The daemon writes the events (``unionfs.fuse.tracing``): to its ``-o trace=``
file, and to every reader of its socket in the runtime dir. ``unionfs trace
MNT`` shows the trace file of the mount at MNT; ``--follow`` connects to the
socket and shows events as they happen, whether or not the mount has a trace
file. ``unionfs trace FILE`` reads a trace file (``--follow``: as it grows), or
a FIFO the daemon writes to.

Whatever the file holds, the reader never fails on it: a line that is not a
trace record (not JSON, not an object, a field of the wrong type, a last line
cut short) is skipped with a warning naming the file and the line, and a file
whose first lines hold no record at all is not taken for a trace. ``--json``
passes only the records, as they were written. The text output shows every
name with ``printable``: one line, whatever bytes it has.
"""

from __future__ import annotations

import json
import math
import os
import socket
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from unionfs.errors import UsageError
from unionfs.fuse import state
from unionfs.inspect.names import printable
from unionfs.options import human_size

POLL_INTERVAL = 0.2
STATE_WAIT = 3.0  # seconds a mount that has just started may take to publish its state
MAX_LINE = 1 << 20  # far longer than any record (two paths of 4,096 escaped bytes)
# Lines without a record at the start of a file before it is not taken for a trace.
NOT_A_TRACE_AFTER = 5
MAX_WARNINGS = 10  # skipped lines reported one by one; the rest are counted

WHOLE, CUT, LONG = "whole", "cut", "long"  # how a line ended (see ``_lines``)
CAUGHT_UP = "caught-up"  # following: all that was there is read (an empty "line")


def run(source: str, follow: bool = False, raw: bool = False, summary: bool = False) -> int:
    if raw and summary:
        raise UsageError("--json and --summary do not go together (see unionfs trace --help)")
    where, lines = _open(source, follow)
    reader = Reader(where, lines)
    # A name is printable() text, which keeps the letters of any script: a terminal
    # that cannot show one gets an escape, not a traceback.
    sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    if summary:
        print(summarize(rec for _, rec in reader))
        return 0
    if raw:
        # The records as written, whatever bytes they hold (read with surrogateescape).
        sys.stdout.flush()
        buf = sys.stdout.buffer
        for line, _ in reader:
            buf.write(line.encode("utf-8", "surrogateescape").rstrip(b"\n") + b"\n")
            if follow:
                buf.flush()
        return 0
    out = sys.stdout
    for _, rec in reader:
        out.write(describe(rec) + "\n")
        if follow:
            out.flush()
    return 0


# -- where the lines come from -----------------------------------------------------------


def _open(source: str, follow: bool) -> tuple[str, Iterator[tuple[str, str]]]:
    """What to call the source in messages, and its lines."""
    path = Path(source)
    if not path.exists():
        raise UsageError(f"{printable(source)}: no such mount or trace file")
    if not path.is_dir():  # a file, a FIFO the daemon writes to, /dev/stdin
        return source, _read_file(path, follow)
    mount = _mount_at(source)
    mnt = printable(mount.mountpoint)
    live = _live_state(mount)
    if follow:
        sock = _connect(live.socket) if live.socket is not None else None
        if sock is not None:
            return f"the trace socket of {os.fsdecode(mount.mountpoint)}", _read_socket(sock)
        if live.trace is not None and _is_file(live.trace):
            return live.trace, _read_file(Path(live.trace), follow=True)
        if live.trace is not None:
            raise UsageError(
                f"the mount at {mnt} has no trace socket (see the daemon's log) and traces "
                f"to {printable(live.trace)}, not a file: read that instead"
            )
        raise UsageError(f"the mount at {mnt} has no trace socket (see the daemon's log)")
    if live.trace is None:
        raise UsageError(
            f"the mount at {mnt} was not started with -o trace=FILE; use --follow to watch it live"
        )
    if not _is_file(live.trace):
        raise UsageError(
            f"the mount at {mnt} traces to {printable(live.trace)}, not a file: read that, "
            "or use --follow to watch it live"
        )
    return live.trace, _read_file(Path(live.trace), follow=False)


def _live_state(mount: state.MountEntry) -> state.MountState:
    """The state the daemon of *mount* published; a mount that has just started may
    take a moment to publish it (waited for, ``STATE_WAIT``), but a state that is
    there and refused (not to be trusted, unreadable) is not waited for. UsageError
    naming what was looked at and why it cannot be used."""
    deadline = time.monotonic() + STATE_WAIT
    while True:
        found, why = state.find_state(mount.device, mount.owner)
        if found is not None:
            return found
        missing = state.not_there_yet(why)
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    owner = "" if mount.owner is None else f" (mounted by uid {mount.owner})"
    hint = f": an older daemon, or another {state.RUNDIR_ENV}" if missing else ""
    raise UsageError(
        f"the unionfs mount at {printable(mount.mountpoint)}{owner} published no state "
        f"that can be used ({printable(why)}{hint}): its trace cannot be found"
    )


def _is_file(path: str) -> bool:
    """Whether *path* is a regular file: what a FIFO holds goes to one reader only."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True  # opening it says what is wrong


def _mount_at(source: str) -> state.MountEntry:
    """The unionfs mounted on the directory *source* (the last one mounted there)."""
    real = os.fsencode(os.path.realpath(source))
    mounts = [m for m in state.mountinfo() if m.fstype == state.FSTYPE]
    here = [m for m in mounts if m.mountpoint == real]
    if here:
        return here[-1]
    around = [m.mountpoint for m in mounts if real.startswith(m.mountpoint.rstrip(b"/") + b"/")]
    if around:
        mnt = printable(max(around, key=len))
        raise UsageError(f"{printable(source)}: not a mountpoint (the mount is at {mnt})")
    raise UsageError(f"{printable(source)}: a directory, neither a unionfs mount nor a trace file")


def _read_file(path: Path, follow: bool) -> Iterator[tuple[str, str]]:
    try:
        f = open(path, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except OSError as e:
        raise UsageError(f"trace file {printable(str(path))}: {e.strerror}") from None
    with f:
        yield from _lines(f.readline, follow)


def _lines(readline: Callable[[int], str], follow: bool) -> Iterator[tuple[str, str]]:
    """Each line and how it ended: ``WHOLE`` (a newline), ``CUT`` (the end of the input,
    without one) or ``LONG`` (longer than ``MAX_LINE``: not a record; the rest of it is
    passed over). Following, a line being written is waited for."""
    pending = ""
    long = False
    caught_up = False
    while True:
        chunk = readline(MAX_LINE)
        if chunk:
            if long:
                long = not chunk.endswith("\n")  # the rest of a long line: passed over
                continue
            pending += chunk
            if pending.endswith("\n"):
                yield pending, WHOLE
                pending = ""
            elif len(pending) >= MAX_LINE:
                yield pending[:80], LONG
                pending = ""
                long = True
            continue
        if not follow:
            if pending:
                yield pending, CUT
            return
        if not caught_up:
            caught_up = True
            yield "", CAUGHT_UP
        time.sleep(POLL_INTERVAL)


def _connect(path: str, wait: float = 3.0) -> socket.socket | None:
    """Connect to a mount's trace socket; a mount that has just started may take a
    moment to listen. None when nothing listens there."""
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A listener whose backlog is full (one the state directory's owner put there,
        # say) would hold a blocking connect for ever: never longer than the wait.
        sock.settimeout(max(deadline - time.monotonic(), 0.05))
        try:
            sock.connect(path)
            sock.settimeout(None)
            return sock
        except OSError:  # socket.timeout is one
            sock.close()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)


def _read_socket(sock: socket.socket) -> Iterator[tuple[str, str]]:
    with sock, sock.makefile("r", encoding="utf-8", errors="surrogateescape") as f:
        yield from _lines(f.readline, follow=False)


# -- records: what a line must be -----------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What a count, a size or a time may be: what the daemon writes fits in 63 bits, and a
# larger number (an int of 400 digits) would overflow what reads it (a float, a size).
LIMIT = 1 << 63


def _is_count(v: object) -> bool:
    return _is_int(v) and 0 <= v < LIMIT  # type: ignore[operator]


def _is_number(v: object) -> bool:
    if isinstance(v, float):
        return math.isfinite(v) and 0 <= v < LIMIT
    return _is_count(v)


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _is_layers(v: object) -> bool:
    return isinstance(v, list) and all(
        isinstance(la, dict)
        and _is_count(la.get("index"))
        and _is_str(la.get("role"))
        and _is_str(la.get("path"))
        for la in v
    )


# The fields the daemon writes, with what each must be; a field not named here (a newer
# daemon's) is let through, and shown by --json only.
_STRINGS = ("path", "for", "request", "why", "errno", "outcome", "method", "bits", "xattr")
_COUNTS = ("layer", "bytes", "count", "events", "dropped", "daemon")
FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    **{name: (_is_str, "a string") for name in (*_STRINGS, "mountpoint")},
    **{name: (_is_count, "a count") for name in _COUNTS},
    "pid": (lambda v: v is None or _is_count(v), "a process id"),
    "uid": (lambda v: v is None or _is_count(v), "a user id"),
    "duration_s": (_is_number, "a number of seconds"),
    "data_only": (lambda v: isinstance(v, bool), "true or false"),
    "layers": (_is_layers, "a list of layers (index, role, path)"),
}


def parse(line: str) -> tuple[dict[str, Any] | None, str]:
    """The trace record on *line*, or None and why the line is not one."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return None, "not JSON"
    if not isinstance(rec, dict):
        return None, f"a JSON {_json_type(rec)}, not an object"
    if not isinstance(rec.get("event"), str) or not rec["event"]:
        return None, "no event"
    if "time" not in rec:
        return None, "no time"
    t = rec["time"]
    if not _is_number(t) or _clock(float(t)) is None:
        return None, "its time is not a time of day"
    for name, (ok, what) in FIELDS.items():
        if name in rec and not ok(rec[name]):
            return None, f"its {name} is not {what}"
    return rec, ""


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return "number"


class Reader:
    """The records of one source, each with its line as written. A line that is not a
    record is skipped, with a warning on stderr that names the source and the line;
    ``UsageError`` when the source turns out not to be a trace (nothing read so far
    was a record: nothing has been shown)."""

    def __init__(self, where: str, lines: Iterable[tuple[str, str]]) -> None:
        self.where = where
        self.lines = lines
        self.records = 0
        self.skipped = 0

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        held: list[tuple[int, str]] = []  # lines skipped before the first record
        n = 0
        for line, ending in self.lines:
            if ending == CAUGHT_UP:
                if held and not self.records:  # what the file holds is no trace: no waiting
                    raise self._not_a_trace(held)
                continue
            n += 1
            if not line.strip():
                continue  # an empty line (a pipe's new reader after a line cut short)
            rec, problem = (None, "longer than any record") if ending == LONG else parse(line)
            if rec is None and ending == CUT:
                problem = "the last line, cut short: no newline at its end"
            if rec is None:
                if self.records:
                    self._skip(n, problem)
                    continue
                held.append((n, problem))
                if len(held) >= NOT_A_TRACE_AFTER:
                    raise self._not_a_trace(held)
                continue
            for skipped in held:
                self._skip(*skipped)
            held.clear()
            self.records += 1
            yield line, rec
        if not self.records:
            if held:
                raise self._not_a_trace(held)
            raise UsageError(f"{printable(self.where)}: no trace records: it is empty")
        if self.skipped > MAX_WARNINGS:
            _warn(f"{self.where}: {self.skipped:,} lines in all are not trace records; skipped")

    def _skip(self, n: int, problem: str) -> None:
        self.skipped += 1
        if self.skipped <= MAX_WARNINGS:
            _warn(f"{self.where}:{n}: not a trace record ({problem}); skipped")

    def _not_a_trace(self, held: list[tuple[int, str]]) -> UsageError:
        n, problem = held[0]
        return UsageError(
            f"{printable(self.where)}: not a trace file: line {n} is not a trace record ({problem})"
        )


def _warn(message: str) -> None:
    print(f"unionfs trace: {printable(message)}", file=sys.stderr, flush=True)


# -- readable lines --------------------------------------------------------------


def _show(value: object) -> str:
    """A name or a word of a record, as one line of text (see ``printable``)."""
    text = str(value)
    try:
        return printable(text)
    except UnicodeEncodeError:  # a surrogate no file name decodes to (a JSON "\\ud800")
        return printable("".join(_as_bytes(ch) for ch in text))


def _as_bytes(ch: str) -> str:
    """A lone surrogate as the bytes it would take, each escaped (others stay)."""
    if "\ud800" <= ch <= "\udfff" and not "\udc80" <= ch <= "\udcff":
        return ch.encode("utf-8", "surrogatepass").decode("utf-8", "surrogateescape")
    return ch


def _clock(t: float) -> str | None:
    try:
        return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"
    except (OverflowError, OSError, ValueError):
        return None


def describe(rec: dict[str, Any]) -> str:
    """One line for a record ``parse`` accepted."""
    kind = _show(rec["event"])
    path = _show(rec.get("path") or "/")
    who = ""
    if rec.get("request"):
        who = f"[{_show(rec['request'])} pid {rec.get('pid')} uid {rec.get('uid')}] "
    why = f" ({_show(rec['why'])})" if rec.get("why") else ""
    if kind == "copy-up":
        text = (
            f"copy-up {path} from layer {rec.get('layer', '?')}: {rec.get('bytes', 0):,} bytes "
            f"by {_show(rec.get('method', '?'))} in {rec.get('duration_s', 0):.6f} s"
        )
        if rec.get("data_only"):
            text += " (the data of a metadata-only copy)"
        if rec.get("for"):
            text += f", a parent of {_show(rec['for'])}"
    elif kind == "whiteout":
        text = f"whiteout {_show(rec.get('outcome'))} at {path}{why}"
    elif kind == "opaque":
        text = f"opaque directory {_show(rec.get('outcome', 'created'))} at {path}{why}"
    elif kind == "refused":
        text = f"refused {_show(rec.get('errno'))} on {path}"
        if rec.get("xattr"):
            text += f", xattr {_show(rec['xattr'])}"
        text += why
    elif kind == "privilege-dropped":
        text = f"{_show(rec.get('bits'))} dropped on {path}{why}"
    elif kind == "layer-error":
        text = f"layer error {_show(rec.get('errno'))} on {path}{why}"
    elif kind == "dropped":
        text = (
            f"{rec.get('count', '?')} events dropped: the trace fell behind the mount, "
            "or nobody read it"
        )
    elif kind == "trace-start":
        layers = ", ".join(
            f"{la['index']} {_show(la['role'])} {_show(la['path'])}" for la in rec.get("layers", [])
        )
        text = (
            f"trace of {_show(rec.get('mountpoint'))} (daemon pid {rec.get('daemon')}); "
            f"layers: {layers}"
        )
    elif kind == "trace-end":
        text = f"trace ends: {rec.get('events')} events, {rec.get('dropped')} dropped"
    else:
        text = f"{kind} {path}"
    return f"{_clock(rec['time'])} {who}{text}"


# -- totals ------------------------------------------------------------------------


def summarize(records: Iterable[dict[str, Any]], top: int = 10) -> str:
    """Totals of records ``parse`` accepted."""
    kinds: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    by_reason_n: Counter[str] = Counter()
    by_path: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    dropped = 0
    for rec in records:
        kind = _show(rec["event"])
        if kind in ("trace-start", "trace-end"):
            continue
        if kind == "dropped":
            dropped += rec.get("count", 0)
            continue
        kinds[kind if kind != "whiteout" else f"whiteout {_show(rec.get('outcome'))}"] += 1
        if kind == "copy-up":
            reason = _show(rec.get("request") or "?")
            if rec.get("for"):
                reason += " (parents)"
            by_reason[reason] += rec.get("bytes", 0)
            by_reason_n[reason] += 1
            by_path[_show(rec.get("path", ""))] += rec.get("bytes", 0)
        elif kind == "refused":
            refused[f"{_show(rec.get('errno'))}: {_show(rec.get('why'))}"] += 1
    lines = ["events:"] + [f"  {n:>9,}  {k}" for k, n in kinds.most_common()]
    if dropped:
        lines.append(f"  {dropped:>9,}  dropped (the trace fell behind, or nobody read it)")
    if len(lines) == 1:
        lines = ["events: none"]
    if by_reason:
        total = sum(by_reason.values())
        lines += [
            "",
            f"copy-up: {human_size(total)} in {sum(by_reason_n.values()):,} copy-ups, by request:",
        ]
        for reason, nbytes in by_reason.most_common():
            lines.append(f"  {human_size(nbytes):>10}  {by_reason_n[reason]:>7,} x  {reason}")
        if any(by_path.values()):
            lines += ["", f"largest copy-ups (top {top}):"]
        for path, nbytes in by_path.most_common(top):
            if nbytes:
                lines.append(f"  {human_size(nbytes):>10}  {path}")
    if refused:
        lines += ["", "refused:"] + [f"  {n:>9,}  {k}" for k, n in refused.most_common()]
    return "\n".join(lines)


# -- for explain: what the trace knows about one path ---------------------------------


def last_copy_up(trace: str, relpath: bytes) -> dict[str, Any] | None:
    """The last copy-up event of *relpath* recorded in the trace file, if any (a record
    ``parse`` accepts: its fields have their types)."""
    want = os.fsdecode(relpath)
    found: dict[str, Any] | None = None
    if not _is_file(trace):
        return None  # a FIFO: reading it would take the events from its reader
    try:
        f: TextIO = open(trace, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except OSError:
        return None
    with f:
        for line in f:
            if '"copy-up"' not in line:
                continue
            rec, _ = parse(line)
            if rec is not None and rec["event"] == "copy-up" and rec.get("path") == want:
                found = rec
    return found
