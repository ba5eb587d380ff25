"""``unionfs trace MNT|FILE``: a mount's overlay decisions, readable.

The daemon writes the events (``unionfs.fuse.tracing``): to its ``-o trace=``
file, and to every reader of its socket in the runtime dir. ``unionfs trace
MNT`` shows the trace file of the mount at MNT; ``--follow`` connects to the
socket and shows events as they happen, whether or not the mount has a trace
file. ``unionfs trace FILE`` reads a trace file (``--follow``: as it grows).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from unionfs.errors import UsageError
from unionfs.inspect import stack as stacks
from unionfs.options import human_size

POLL_INTERVAL = 0.2


def run(source: str, follow: bool = False, raw: bool = False, summary: bool = False) -> int:
    lines = _open(source, follow)
    if summary:
        print(summarize(_records(lines)))
        return 0
    out = sys.stdout
    for line in lines:
        if raw:
            out.write(line)
        else:
            try:
                out.write(describe(json.loads(line)) + "\n")
            except ValueError:
                continue  # a line cut short by a crash
        if follow:
            out.flush()
    return 0


def _open(source: str, follow: bool) -> Iterator[str]:
    path = Path(source)
    if path.is_file():
        return _read_file(path, follow)
    if not path.is_dir():
        raise UsageError(f"{source}: no such mount or trace file")
    live = stacks.from_mountpoint(source).live
    assert live is not None
    if follow:
        sock = _connect(live.socket) if live.socket is not None else None
        if sock is not None:
            return _read_socket(sock)
        if live.trace is not None:
            return _read_file(Path(live.trace), follow=True)
        raise UsageError(f"the mount at {source} has no trace socket (see the daemon's log)")
    if live.trace is None:
        raise UsageError(
            f"the mount at {source} was not started with -o trace=FILE; "
            "use --follow to watch it live"
        )
    return _read_file(Path(live.trace), follow=False)


def _read_file(path: Path, follow: bool) -> Iterator[str]:
    try:
        f = open(path, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except OSError as e:
        raise UsageError(f"trace file {path}: {e.strerror}") from None
    with f:
        pending = ""
        while True:
            chunk = f.readline()
            if chunk:
                pending += chunk
                if pending.endswith("\n"):
                    yield pending
                    pending = ""
                continue
            if not follow:
                return
            time.sleep(POLL_INTERVAL)


def _connect(path: str, wait: float = 3.0) -> socket.socket | None:
    """Connect to a mount's trace socket; a mount that has just started may take a
    moment to listen. None when nothing listens there."""
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)


def _read_socket(sock: socket.socket) -> Iterator[str]:
    with sock, sock.makefile("r", encoding="utf-8", errors="surrogateescape") as f:
        yield from f


def _records(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        with contextlib.suppress(ValueError):
            yield json.loads(line)


# -- readable lines --------------------------------------------------------------


def _when(rec: dict[str, Any]) -> str:
    t = float(rec.get("time", 0))
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def describe(rec: dict[str, Any]) -> str:
    kind = rec.get("event", "?")
    path = rec.get("path") or "/"
    who = ""
    if rec.get("request"):
        who = f"[{rec['request']} pid {rec.get('pid')} uid {rec.get('uid')}] "
    why = f" ({rec['why']})" if rec.get("why") else ""
    if kind == "copy-up":
        text = (
            f"copy-up {path} from layer {rec.get('layer')}: {rec.get('bytes', 0):,} bytes "
            f"by {rec.get('method')} in {rec.get('duration_s', 0):.6f} s"
        )
        if rec.get("for"):
            text += f", a parent of {rec['for']}"
    elif kind == "whiteout":
        text = f"whiteout {rec.get('outcome')} at {path}{why}"
    elif kind == "opaque":
        text = f"opaque directory {rec.get('outcome', 'created')} at {path}{why}"
    elif kind == "refused":
        text = f"refused {rec.get('errno')} on {path}{why}"
    elif kind == "privilege-dropped":
        text = f"{rec.get('bits')} dropped on {path}{why}"
    elif kind == "layer-error":
        text = f"layer error {rec.get('errno')} on {path}{why}"
    elif kind == "dropped":
        text = f"{rec.get('count')} events dropped: the trace fell behind the mount"
    elif kind == "trace-start":
        layers = ", ".join(
            f"{la['index']} {la['role']} {la['path']}" for la in rec.get("layers", [])
        )
        text = (
            f"trace of {rec.get('mountpoint')} (daemon pid {rec.get('daemon')}); layers: {layers}"
        )
    elif kind == "trace-end":
        text = f"trace ends: {rec.get('events')} events, {rec.get('dropped')} dropped"
    else:
        text = f"{kind} {path}"
    return f"{_when(rec)} {who}{text}"


# -- totals ------------------------------------------------------------------------


def summarize(records: Iterable[dict[str, Any]], top: int = 10) -> str:
    kinds: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    by_reason_n: Counter[str] = Counter()
    by_path: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    dropped = 0
    for rec in records:
        kind = rec.get("event", "?")
        if kind in ("trace-start", "trace-end"):
            continue
        if kind == "dropped":
            dropped += int(rec.get("count", 0))
            continue
        kinds[kind if kind != "whiteout" else f"whiteout {rec.get('outcome')}"] += 1
        if kind == "copy-up":
            reason = rec.get("request") or "?"
            if rec.get("for"):
                reason += " (parents)"
            by_reason[reason] += int(rec.get("bytes", 0))
            by_reason_n[reason] += 1
            by_path[rec.get("path", "")] += int(rec.get("bytes", 0))
        elif kind == "refused":
            refused[f"{rec.get('errno')}: {rec.get('why')}"] += 1
    lines = ["events:"] + [f"  {n:>9,}  {k}" for k, n in kinds.most_common()]
    if dropped:
        lines.append(f"  {dropped:>9,}  dropped (the trace fell behind)")
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
    """The last copy-up event of *relpath* recorded in the trace file, if any."""
    want = os.fsdecode(relpath)
    found: dict[str, Any] | None = None
    try:
        f: TextIO = open(trace, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except OSError:
        return None
    with f:
        for line in f:
            if '"copy-up"' not in line:
                continue
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("event") == "copy-up" and rec.get("path") == want:
                    found = rec
    return found
