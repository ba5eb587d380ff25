"""The trace where things go wrong: a FIFO nobody reads, a write that fails, a file
that is not a trace, a record with the wrong fields, names that are not one line.

No test here bets on timing: each waits (polling, with a generous deadline) for
something it can observe (a line in the daemon's log, a pipe that is full, a record a
reader got), or checks what holds whatever the timing (what was seen and what was
counted as dropped add up)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import Stack
from tests.mounting import REPO, UnionMount, unionfs_command
from tests.unit.conftest import write
from unionfs.errors import UsageError
from unionfs.fuse import state, tracing
from unionfs.inspect import trace as trace_cli
from unionfs.inspect.trace import last_copy_up, parse

HEADER = {
    "time": 1700000000.5,
    "event": "trace-start",
    "daemon": 42,
    "mountpoint": "/m",
    "layers": [{"index": 0, "role": "upper", "path": "/u"}],
}
WHITEOUT = {"time": 1700000001.25, "event": "whiteout", "path": "a", "outcome": "created"}
COPY_UP = {
    "time": 1700000002.0,
    "request": "chmod",
    "pid": 7,
    "uid": 0,
    "event": "copy-up",
    "path": "big",
    "layer": 1,
    "bytes": 5000,
    "method": "read/write",
    "duration_s": 0.001,
}


DEADLINE = 30.0  # seconds a test waits for what it can observe (a loaded machine is slow)
OTHER_USER = 1000  # who plants a state directory for someone else (no account needed)


def run(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO), **(env or {}))
    return subprocess.run(
        [*unionfs_command(), *args],
        capture_output=True,
        text=True,
        errors="surrogateescape",
        env=env,
        timeout=timeout,
    )


def line(rec: dict[str, Any]) -> str:
    return json.dumps(rec, separators=(",", ":")) + "\n"


def lines_of(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(x) for x in data.decode().splitlines() if x]


def trace_file(tmp_path: Path, *lines: str, name: str = "t.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(lines))
    return path


def no_traceback(res: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in res.stderr, res.stderr
    assert all(x.startswith("unionfs trace: ") for x in res.stderr.splitlines()), res.stderr


# -- the reader: whatever the file holds -------------------------------------------------


@pytest.mark.parametrize(
    "bad, why",
    [
        ("[1,2]", "a JSON array, not an object"),
        ('"str"', "a JSON string, not an object"),
        ("null", "a JSON null, not an object"),
        ("{not json", "not JSON"),
        ("[" * 100000 + "]" * 100000, "not JSON"),
        ('{"time":1,"event":"copy-up","path":"x","bytes":null}', "its bytes is not a count"),
        ('{"time":1,"event":"copy-up","path":"x","bytes":"big"}', "its bytes is not a count"),
        # Numbers too large for what reads them (a float, a size): not a traceback.
        (
            '{"time":1,"event":"copy-up","path":"x","bytes":' + "9" * 400 + "}",
            "its bytes is not a count",
        ),
        (
            f'{{"time":1,"event":"copy-up","path":"x","bytes":{1 << 63}}}',
            "its bytes is not a count",
        ),
        (
            '{"time":' + "9" * 400 + ',"event":"whiteout","path":"x"}',
            "its time is not a time of day",
        ),
        (
            '{"time":1,"event":"copy-up","path":"x","duration_s":' + "9" * 400 + "}",
            "its duration_s is not a number of seconds",
        ),
        ('{"time":1,"event":"dropped","count":' + "9" * 400 + "}", "its count is not a count"),
        (
            '{"time":1,"event":"whiteout","path":"x","pid":' + "9" * 400 + "}",
            "its pid is not a process id",
        ),
        ('{"time":1,"event":"whiteout","path":"x","uid":-1}', "its uid is not a user id"),
        ('{"time":1e300,"event":"copy-up","path":"x","bytes":1}', "its time is not a time of day"),
        ('{"time":"noon","event":"whiteout","path":"x"}', "its time is not a time of day"),
        ('{"event":"whiteout","path":"x"}', "no time"),
        ('{"time":1,"path":"x"}', "no event"),
        ('{"time":1,"event":"whiteout","path":["x"]}', "its path is not a string"),
        (
            '{"time":1,"event":"trace-start","layers":[1]}',
            "its layers is not a list of layers (index, role, path)",
        ),
    ],
)
def test_a_line_that_is_not_a_record_is_skipped_with_a_warning(
    tmp_path: Path, bad: str, why: str
) -> None:
    path = trace_file(tmp_path, line(HEADER), bad + "\n", line(COPY_UP))
    res = run("trace", os.fspath(path))
    no_traceback(res)
    assert res.returncode == 0
    assert res.stderr == f"unionfs trace: {path}:2: not a trace record ({why}); skipped\n"
    out = res.stdout.splitlines()
    assert len(out) == 2 and "trace of /m" in out[0] and "copy-up big from layer 1" in out[1]
    # --json passes the records only, as written.
    res = run("trace", "--json", os.fspath(path))
    no_traceback(res)
    assert res.returncode == 0 and res.stdout == line(HEADER) + line(COPY_UP)
    res = run("trace", "--summary", os.fspath(path))
    no_traceback(res)
    assert res.returncode == 0 and "4.9 KiB in 1 copy-ups" in res.stdout


def test_the_largest_numbers_a_record_may_hold_are_shown(tmp_path: Path) -> None:
    big = {**COPY_UP, "bytes": (1 << 63) - 1, "duration_s": float(1 << 62)}
    path = trace_file(tmp_path, line(HEADER), line(big))
    for mode in ([], ["--summary"], ["--json"]):
        res = run("trace", *mode, os.fspath(path))
        no_traceback(res)
        assert (res.returncode, res.stderr) == (0, ""), mode
    assert "8589934592.0 GiB" in run("trace", "--summary", os.fspath(path)).stdout


@pytest.mark.parametrize("mode", [[], ["--json"], ["--summary"]])
def test_a_file_that_is_not_a_trace_is_refused(tmp_path: Path, mode: list[str]) -> None:
    passwd = trace_file(tmp_path, "root:x:0:0:root:/root:/bin/bash\n" * 30, name="passwd")
    res = run("trace", *mode, os.fspath(passwd))
    no_traceback(res)
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == (
        f"unionfs trace: {passwd}: not a trace file: line 1 is not a trace record (not JSON)\n"
    )


def test_following_a_file_that_is_not_a_trace_is_refused_at_once(tmp_path: Path) -> None:
    """--follow of a short file of other lines (fewer than are needed to give up while
    reading): refused once all it holds is read, not waited on for ever. A file with
    nothing in it yet is waited on (a trace about to start): the run is cut by its
    timeout."""
    odd = trace_file(tmp_path, "garbage\nmore\n", name="odd")
    res = run("trace", "--follow", os.fspath(odd), timeout=DEADLINE)
    no_traceback(res)
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == (
        f"unionfs trace: {odd}: not a trace file: line 1 is not a trace record (not JSON)\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        run("trace", "--follow", os.fspath(trace_file(tmp_path, "", name="empty")), timeout=2)


@pytest.mark.parametrize("mode", [[], ["--json"], ["--summary"]])
def test_an_empty_file_has_no_trace_records(tmp_path: Path, mode: list[str]) -> None:
    for empty in (trace_file(tmp_path), Path(os.devnull)):
        res = run("trace", *mode, os.fspath(empty))
        no_traceback(res)
        assert (res.returncode, res.stdout) == (2, "")
        assert res.stderr == f"unionfs trace: {empty}: no trace records: it is empty\n"


def test_a_last_line_cut_short_is_reported(tmp_path: Path) -> None:
    path = trace_file(tmp_path, line(HEADER), line(WHITEOUT), line(COPY_UP)[:40])
    res = run("trace", os.fspath(path))
    no_traceback(res)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 2
    assert res.stderr == (
        f"unionfs trace: {path}:3: not a trace record (the last line, cut short: "
        "no newline at its end); skipped\n"
    )
    # A whole record without its newline is still a record.
    path.write_text(line(HEADER) + line(WHITEOUT).rstrip("\n"))
    res = run("trace", "--json", os.fspath(path))
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout == line(HEADER) + line(WHITEOUT)


def test_many_bad_lines_are_counted_not_listed(tmp_path: Path) -> None:
    path = trace_file(tmp_path, line(HEADER), *["garbage\n"] * 25, line(WHITEOUT))
    res = run("trace", os.fspath(path))
    no_traceback(res)
    warnings = res.stderr.splitlines()
    assert len(warnings) == 11 and warnings[0].endswith(
        ":2: not a trace record (not JSON); skipped"
    )
    assert warnings[-1] == f"unionfs trace: {path}: 25 lines in all are not trace records; skipped"
    assert len(res.stdout.splitlines()) == 2


def test_a_trace_that_starts_with_a_line_cut_short_is_still_a_trace(tmp_path: Path) -> None:
    """A FIFO's reader may start inside a line another reader left."""
    path = trace_file(tmp_path, line(WHITEOUT)[20:], line(HEADER), line(WHITEOUT))
    res = run("trace", os.fspath(path))
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 2
    assert res.stderr == f"unionfs trace: {path}:1: not a trace record (not JSON); skipped\n"


def test_the_arguments_and_sources_trace_refuses_say_why(tmp_path: Path) -> None:
    path = trace_file(tmp_path, line(HEADER))
    res = run("trace", "--json", "--summary", os.fspath(path))
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == (
        "unionfs trace: argument --summary: not allowed with argument --json "
        "(see unionfs trace --help)\n"
    )
    plain = tmp_path / "plain"
    plain.mkdir()
    res = run("trace", os.fspath(plain))
    assert res.returncode == 2 and "lowerdir" not in res.stderr
    assert res.stderr == (
        f"unionfs trace: {plain}: a directory, neither a unionfs mount nor a trace file\n"
    )
    res = run("trace", os.fspath(tmp_path / "nothing"))
    assert res.stderr == f"unionfs trace: {tmp_path / 'nothing'}: no such mount or trace file\n"


def test_names_in_the_text_output_are_one_line(tmp_path: Path) -> None:
    """A name with a newline, an escape sequence or bytes that are not UTF-8 (which the
    daemon writes as lone surrogates) is shown escaped; --json keeps it as written."""
    name = os.fsdecode(b"evil\n\x1b[31mred\xff")
    header = {**HEADER, "mountpoint": "/m\nx", "layers": [{"index": 0, "role": "up\x1b", "path": name}]}  # fmt: skip
    copy = {**COPY_UP, "path": name, "for": name + "/child", "method": "\x1b[2J"}
    refused = {
        "time": 1700000003.0,
        "event": "refused",
        "path": name,
        "errno": "EOPNOTSUPP",
        "why": "why\nnot",
        "xattr": "trusted.\n",
    }
    odd = {"time": 1700000004.0, "event": "new\x1bkind", "path": "\ud800" + name}
    path = trace_file(tmp_path, line(header), line(copy), line(refused), line(odd))
    res = run("trace", os.fspath(path))
    no_traceback(res)
    assert res.returncode == 0 and res.stderr == ""
    out = res.stdout.splitlines()
    assert len(out) == 4 and "\x1b" not in res.stdout
    shown = "evil\\n\\x1b[31mred\\xff"
    assert "trace of /m\\nx " in out[0] and f"0 up\\x1b {shown}" in out[0]
    assert f"copy-up {shown} from layer 1" in out[1] and f"a parent of {shown}/child" in out[1]
    assert "by \\x1b[2J in" in out[1]
    assert f"refused EOPNOTSUPP on {shown}, xattr trusted.\\n (why\\nnot)" in out[2]
    assert out[3].endswith(f"new\\x1bkind \\xed\\xa0\\x80{shown}")
    summary = run("trace", "--summary", os.fspath(path))
    assert summary.returncode == 0 and "\x1b" not in summary.stdout
    assert f"4.9 KiB  {shown}" in summary.stdout
    assert "EOPNOTSUPP: why\\nnot" in summary.stdout
    # The records themselves are lossless: --json gives them back as written.
    raw = run("trace", "--json", os.fspath(path))
    assert raw.stdout == path.read_text()
    assert json.loads(raw.stdout.splitlines()[1])["path"] == name


def test_explain_reads_only_the_copy_ups_a_trace_really_holds(tmp_path: Path) -> None:
    good = {**COPY_UP, "bytes": 10}
    path = trace_file(
        tmp_path,
        line(HEADER),
        line(good),
        '{"time":1,"event":"copy-up","path":"big","bytes":null}\n',
        '["copy-up"]\n',
        '{"time":1e300,"event":"copy-up","path":"big","bytes":1}\n',
        '{"time":1,"event":"copy-up","path":"big","bytes":' + "9" * 400 + "}\n",
        '{"time":' + "9" * 400 + ',"event":"copy-up","path":"big","bytes":1}\n',
    )
    assert last_copy_up(os.fspath(path), b"big") == good
    assert last_copy_up(os.fspath(path), b"other") is None


# -- the daemon: a trace written to a FIFO or a full disk ------------------------------


def _drain(fd: int, out: bytearray) -> None:
    os.set_blocking(fd, True)
    while chunk := os.read(fd, 1 << 16):
        out += chunk


def _read_now(fd: int) -> bytes:
    got = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 1 << 16):
            got += chunk
    return got


def _read_a_line(fd: int, out: bytearray, timeout: float = DEADLINE) -> None:
    """Read what the pipe holds until a whole line came."""
    deadline = time.monotonic() + timeout
    while b"\n" not in out:
        assert time.monotonic() < deadline, "no line came"
        out += _read_now(fd)
        time.sleep(0.02)


def _wait_for(what: Callable[[], bool], timeout: float = DEADLINE, about: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting for {about or what}"
        time.sleep(0.02)


def _logged(um: UnionMount, text: str) -> None:
    """Wait until the daemon's log says *text*."""
    _wait_for(lambda: text in um.log(), about=f"{text!r} in the daemon's log:\n{um.log()}")


def _records(data: bytes) -> list[dict[str, Any]]:
    """The records in *data*, as ``unionfs trace`` reads them: a line that is not one
    (cut short by a write the daemon gave up on) is skipped."""
    recs = []
    for text in data.decode(errors="surrogateescape").splitlines():
        rec, _ = parse(text)
        if rec is not None:
            recs.append(rec)
    return recs


def _full(fd: int) -> bool:
    """Whether the pipe *fd* writes to holds all it can (a write would wait)."""
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return not any(ev & select.POLLOUT for _, ev in poll.poll(0))


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _patient(seconds: float) -> list[str]:
    """The daemon's command, waiting at most *seconds* for a pipe at unmount."""
    code = (
        "import sys; from unionfs.fuse import tracing; "
        f"tracing.UNMOUNT_PATIENCE = {seconds}; "
        "from unionfs.cli import main; raise SystemExit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code]


def test_events_a_fifo_reader_missed_are_counted(stack: Stack, tmp_path: Path) -> None:
    """The reader goes away while the mount works, another comes: it gets the header
    again, then how many events nobody read; none is lost uncounted."""
    n = 300
    for i in range(n):
        write(stack.lowers[1] / f"f{i}")
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    first_got, got = bytearray(), bytearray()
    with _fd(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)) as first:
        um = stack.mount(extra_options=f"trace={fifo}")
        try:
            _read_a_line(first, first_got)
            assert lines_of(bytes(first_got))[0]["event"] == "trace-start"
            os.close(first)  # the reader goes away
            for i in range(n):
                os.unlink(um.mountpoint / f"f{i}")
            _logged(um, "nobody has it open")  # the daemon had events for nobody
            with _fd(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)) as second:
                _read_a_line(second, got)  # the daemon opened it again: a writer is there
                drain = threading.Thread(target=_drain, args=(second, got))
                drain.start()
                assert um.unmount() == 0
                drain.join(timeout=30)
        finally:
            um.unmount()
    recs = lines_of(bytes(got))
    assert recs[0]["event"] == "trace-start"  # each reader gets the header
    seen = len([r for r in recs if r["event"] == "whiteout"])
    dropped = sum(r["count"] for r in recs if r["event"] == "dropped")
    assert recs[-1]["event"] == "trace-end"
    assert dropped > 0 and seen + dropped == n
    assert (recs[-1]["events"], recs[-1]["dropped"]) == (seen, dropped)


def test_a_fifo_reader_that_never_reads_does_not_hold_the_daemon(
    stack: Stack, tmp_path: Path
) -> None:
    """At unmount the daemon waits for a pipe that is not read only so long; then it
    goes, and says in its log what the trace could not take."""
    n = 2000  # far more than a pipe holds
    for i in range(n):
        write(stack.lowers[1] / f"f{i}")
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    with _fd(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)) as reader:
        um = stack.mount(extra_options=f"trace={fifo}", command=_patient(1.0))
        try:
            for i in range(n):
                os.unlink(um.mountpoint / f"f{i}")
            assert os.listdir(um.mountpoint) == []  # the requests never waited
            subprocess.run(["fusermount3", "-u", os.fspath(um.mountpoint)], check=True)
            assert um.proc.wait(timeout=60) == 0  # while the reader still holds the pipe
        finally:
            um.unmount()
        held = _read_now(reader)
    # What the pipe holds: whole records, and lines the daemon cut short when it gave
    # up (even after that, a small write can fit in the pipe's last page: a newline, a
    # dropped record, trace-end). The whiteouts in it are those the daemon counted as
    # written; with the ones it counted as dropped, they are all.
    recs = _records(held)
    assert recs[0]["event"] == "trace-start"
    assert {r["event"] for r in recs} <= {"trace-start", "whiteout", "dropped", "trace-end"}
    seen = len([r for r in recs if r["event"] == "whiteout"])
    end = [r for r in recs if r["event"] == "trace-end"]
    if end:
        written, dropped = end[0]["events"], end[0]["dropped"]
    else:
        said = re.search(r"its end was not written \((\d+) events, (\d+) dropped\)", um.log())
        assert said is not None, um.log()
        written, dropped = int(said[1]), int(said[2])
    assert written == seen and dropped > 0 and seen + dropped == n


def test_a_fifo_nobody_reads_yet_does_not_hold_up_the_mount(stack: Stack, tmp_path: Path) -> None:
    """The mount does not wait for a reader (it says there is none); the events until
    one comes are counted, and the reader gets the header first."""
    write(stack.lowers[1] / "f")
    write(stack.lowers[1] / "g")
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    um = stack.mount(extra_options=f"trace={fifo}", timeout=30)
    got = bytearray()
    try:
        assert "is a FIFO nobody reads yet" in um.log()
        os.unlink(um.mountpoint / "f")  # nobody reads: dropped, counted
        _logged(um, "nobody has it open")
        with _fd(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)) as reader:
            _read_a_line(reader, got)
            os.unlink(um.mountpoint / "g")
            drain = threading.Thread(target=_drain, args=(reader, got))
            drain.start()
            assert um.unmount() == 0
            drain.join(timeout=30)
    finally:
        um.unmount()
    recs = lines_of(bytes(got))
    assert [r["event"] for r in recs] == ["trace-start", "dropped", "whiteout", "trace-end"]
    assert recs[1]["count"] == 1 and recs[2]["path"] == "g"
    assert (recs[-1]["events"], recs[-1]["dropped"]) == (1, 1)


def test_a_line_cut_short_by_its_newline_only_is_counted_as_written(tmp_path: Path) -> None:
    """A write that fails (a full disk) just before a line's newline leaves a whole
    record, which the next write's newline ends and the reader takes: it counts as
    written, not as dropped, so what a reader sees and what was dropped add up."""
    path = tmp_path / "t.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    file = tracing.TraceFile(fd, path, tracing.encode([HEADER]))
    try:
        assert file.deliver(b"", [])  # the header
        real = file._write

        def all_but_the_newline(payload: bytes) -> tuple[int, OSError | None]:
            done, _ = real(payload[:-1])
            return done, OSError(errno.ENOSPC, "No space left on device")

        file._write = all_but_the_newline  # type: ignore[method-assign]
        first = tracing.encode([WHITEOUT, {**WHITEOUT, "path": "b"}])
        file.deliver(first, [(1, 0), (1, 0)])
        file._write = real  # type: ignore[method-assign]
        file.deliver(tracing.encode([{**WHITEOUT, "path": "c"}]), [(1, 0)])
        file.finish()
    finally:
        file.close()
    recs = _records(path.read_bytes())
    seen = [r["path"] for r in recs if r["event"] == "whiteout"]
    assert seen == ["a", "b", "c"]
    assert recs[-1]["event"] == "trace-end"
    assert (recs[-1]["events"], recs[-1]["dropped"]) == (3, 0)


def _follower(mountpoint: Path) -> tuple[subprocess.Popen[bytes], list[dict[str, Any]]]:
    """``unionfs trace MNT --follow --json``, and the records it gets (a thread reads them)."""
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    proc = subprocess.Popen(
        [*unionfs_command(), "trace", os.fspath(mountpoint), "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    got: list[dict[str, Any]] = []

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            got.append(json.loads(raw))

    threading.Thread(target=read, daemon=True).start()
    return proc, got


def test_a_fifo_reader_that_stops_reading_does_not_cut_off_the_followers(
    stack: Stack, tmp_path: Path
) -> None:
    """The trace FIFO's reader stops reading, its pipe is full: a ``--follow`` reader
    still gets each event as it happens (the file's writer waits on its own)."""
    n = 2000  # far more than a pipe holds
    for i in range(n):
        write(stack.lowers[1] / f"f{i}")
    write(stack.lowers[1] / "marker")
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    with _fd(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)):  # a reader that never reads
        um = stack.mount(extra_options=f"trace={fifo}", command=_patient(1.0), timeout=DEADLINE)
        follower = None
        try:
            for i in range(n):
                os.unlink(um.mountpoint / f"f{i}")
            with _fd(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)) as probe:
                _wait_for(lambda: _full(probe), about="the trace FIFO to be full")
            follower, got = _follower(um.mountpoint)
            _wait_for(lambda: any(r["event"] == "trace-start" for r in got), about="a header")
            os.unlink(um.mountpoint / "marker")
            _wait_for(
                lambda: any(r["event"] == "whiteout" and r["path"] == "marker" for r in got),
                about="the follower to get the event",
            )
            assert os.listdir(um.mountpoint) == []
        finally:
            if follower is not None:
                follower.kill()
                follower.wait(timeout=DEADLINE)
            um.unmount()


async def _eventually(what: Callable[[], bool], about: str) -> None:
    with trio.move_on_after(DEADLINE):
        while not what():
            await trio.sleep(0.02)
    assert what(), f"timed out waiting for {about}"


async def _then(first: Callable[[], Awaitable[object]], then: Callable[[], object]) -> None:
    await first()
    then()


def test_a_stuck_trace_file_holds_no_trio_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the daemon: a flush hands the events to the file's own thread and returns,
    the pipe full or not, and none of trio's worker threads (which copy-ups use) waits
    on it; at the end the file's thread gives up as at unmount."""
    monkeypatch.setattr(tracing, "UNMOUNT_PATIENCE", 0.2)
    monkeypatch.setattr(tracing, "on_change", None)
    monkeypatch.setattr(tracing, "active", None)
    union: Any = type("FakeUnion", (), {"events": None})()
    r, w = os.pipe()
    with _fd(r), _fd(w):

        async def main() -> tuple[tracing.Tracer, list[bytes]]:
            tracer = tracing.Tracer(union, HEADER, os.dup(w), None)
            limiter = trio.to_thread.current_default_thread_limiter()
            got: list[bytes] = []
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(tracer.run)
                    sub = tracer.subscribe()
                    for i in range(2000):
                        tracer.emit("whiteout", b"f%d" % i, outcome="created")
                    await _eventually(lambda: _full(w), "the file's thread to fill the pipe")
                    # (Its own flushes encode in a worker thread, for a moment.)
                    await _eventually(lambda: limiter.borrowed_tokens == 0, "no worker thread")
                    for k in range(3):
                        tracer.emit("whiteout", b"later%d" % k, outcome="created")
                        # (Not cancelled on a deadline: a flush waiting on a worker thread
                        # would not return for it.)
                        flushed = trio.Event()
                        nursery.start_soon(_then, tracer.flush, flushed.set)
                        with trio.move_on_after(DEADLINE):
                            await flushed.wait()
                        assert flushed.is_set(), "a flush waited for the trace file"
                        await _eventually(lambda: limiter.borrowed_tokens == 0, "no worker thread")
                    while True:
                        with trio.fail_after(DEADLINE):
                            got.append(await sub.receive.receive())
                        if b"later2" in got[-1]:
                            break
                    assert tracer.writer is not None and tracer.writer.running
                    nursery.cancel_scope.cancel()
            finally:
                tracer.close()
            return tracer, got

        tracer, got = trio.run(main)
    recs = lines_of(b"".join(got))
    assert [r["path"] for r in recs if r["event"] == "whiteout"][-3:] == [
        "later0",
        "later1",
        "later2",
    ]
    assert tracer.file is not None and tracer.writer is not None and not tracer.writer.running
    # Nobody read the pipe: what it could not take was counted as lost.
    assert tracer.file.gave_up and tracer.file.written + tracer.file.lost_total == 2003


def test_a_write_that_never_returns_is_left_behind_at_unmount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A hung disk: the file's thread is stuck in a write. The mount goes on meanwhile,
    and at unmount the daemon leaves that thread behind and says the end is missing."""
    monkeypatch.setattr(tracing, "UNMOUNT_PATIENCE", 0.1)
    monkeypatch.setattr(tracing, "STUCK_GRACE", 0.1)
    monkeypatch.setattr(tracing, "on_change", None)
    monkeypatch.setattr(tracing, "active", None)
    union: Any = type("FakeUnion", (), {"events": None})()
    path = tmp_path / "t.jsonl"
    entered, release = threading.Event(), threading.Event()

    def hung(payload: bytes) -> tuple[int, OSError | None]:
        entered.set()
        release.wait()
        return 0, OSError(errno.EIO, "Input/output error")

    async def main() -> tracing.Tracer:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        tracer = tracing.Tracer(union, HEADER, fd, path)
        assert tracer.file is not None
        monkeypatch.setattr(tracer.file, "_write", hung)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tracer.run)
                await _eventually(entered.is_set, "the write")
                tracer.emit("whiteout", b"a", outcome="created")
                with trio.fail_after(DEADLINE):
                    await tracer.flush()  # not held by the write
                nursery.cancel_scope.cancel()
        finally:
            tracer.close()
        return tracer

    try:
        with caplog.at_level("WARNING", logger=tracing.__name__):
            tracer = trio.run(main)
        assert tracer.writer is not None and tracer.writer.running
        assert "a write has not returned for" in caplog.text
        assert "its end was not written (0 events, at least 1 dropped)" in caplog.text
        assert tracer.file is not None and tracer.file.fd is not None  # left open for it
    finally:
        release.set()
    assert tracer.writer is not None
    _wait_for(lambda: not tracer.writer.running, about="the thread to end")  # type: ignore[union-attr]
    tracer.file.close()


def test_a_trace_file_that_cannot_be_written_counts_what_it_lost(
    stack: Stack, tmp_path: Path
) -> None:
    """A full disk: the events that did not fit are counted in the next record that
    does, a line cut short stays one bad line, and the daemon goes on."""
    n = 400
    for i in range(n):
        write(stack.lowers[1] / f"f{i}")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", disk], check=True)
    try:
        trace = disk / "trace.jsonl"
        um = stack.mount(extra_options=f"trace={trace}")
        try:
            _wait_for(lambda: trace.stat().st_size > 0)
            filler = disk / "filler"
            with contextlib.suppress(OSError), open(filler, "wb") as f:
                while True:  # every block the trace has not taken
                    f.write(b"x" * 4096)
                    f.flush()
            for i in range(n):
                os.unlink(um.mountpoint / f"f{i}")
            _logged(um, "until it can be written")  # a write failed: the disk is full
            filler.unlink()
            assert um.unmount() == 0
        finally:
            um.unmount()
        res = run("trace", "--json", os.fspath(trace))
        assert res.returncode == 0
        recs = [json.loads(x) for x in res.stdout.splitlines()]
        assert "not a trace record" in res.stderr or res.stderr == ""
        seen = len([r for r in recs if r["event"] == "whiteout"])
        dropped = sum(r["count"] for r in recs if r["event"] == "dropped")
        assert recs[-1]["event"] == "trace-end"
        assert dropped > 0 and seen + dropped == n
        assert (recs[-1]["events"], recs[-1]["dropped"]) == (seen, dropped)
    finally:
        subprocess.run(["umount", "-l", disk], check=False)


# -- what a refused request names -------------------------------------------------------


def test_a_refused_xattr_is_named_apart_from_the_path(
    stack: Stack, mounted: Callable[..., UnionMount], tmp_path: Path
) -> None:
    (stack.lowers[1] / "etc" / "sub").mkdir(parents=True)
    trace = tmp_path / "trace.jsonl"
    um = mounted(extra_options=f"trace={trace}")
    with pytest.raises(OSError) as e:
        os.setxattr(um.mountpoint / "etc" / "sub", "trusted.overlay.opaque", b"y")
    assert e.value.errno == errno.EOPNOTSUPP
    # RENAME_WHITEOUT: no flag but NOREPLACE and EXCHANGE reaches an overlay.
    libc = ctypes.CDLL(None, use_errno=True)
    src, dst = (os.fsencode(um.mountpoint / "etc" / n) for n in ("sub", "sub2"))
    assert libc.renameat2(-100, src, -100, dst, 4) == -1
    assert ctypes.get_errno() == errno.EINVAL
    assert um.unmount() == 0
    recs = [json.loads(x) for x in trace.read_text().splitlines()]
    refused = [r for r in recs if r["event"] == "refused"]
    assert [(r["request"], r["path"], r["errno"]) for r in refused] == [
        ("setxattr", "etc/sub", "EOPNOTSUPP"),
        ("rename", "etc/sub", "EINVAL"),
    ]
    assert refused[0]["xattr"] == "trusted.overlay.opaque" and "for" not in refused[0]
    assert "xattr" not in refused[1] and "for" not in refused[1]
    text = run("trace", os.fspath(trace)).stdout
    assert "refused EOPNOTSUPP on etc/sub, xattr trusted.overlay.opaque (the overlay's" in text


def test_open_file_never_waits_for_a_fifo_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    with _fd(tracing.open_file(fifo)) as handle:  # nobody reads: a handle, at once
        with pytest.raises(OSError):
            os.write(handle, b"x")
    with (
        _fd(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)) as reader,
        _fd(tracing.open_file(fifo)) as writer,
    ):
        assert os.write(writer, b"x\n") == 2 and os.read(reader, 10) == b"x\n"
    plain = tmp_path / "t.jsonl"
    with _fd(tracing.open_file(plain)) as fd:
        assert os.get_blocking(fd) and os.stat(plain).st_mode & 0o777 == 0o600


# -- where unionfs trace MNT finds the trace ------------------------------------------


def _a_mount(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A directory ``unionfs trace`` takes for a unionfs mount (device 0:4250)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    entry = state.MountEntry(os.fsencode(mnt), "0:4250", state.FSTYPE, 0)
    monkeypatch.setattr(trace_cli, "_mount_at", lambda source: entry)
    return mnt


def _no_sleep(*_: object) -> None:
    raise AssertionError("waited")


def test_a_refused_state_is_named_and_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mnt = _a_mount(monkeypatch, tmp_path)
    why = "/run/unionfs: refused: owned by uid 1000, not by root"
    calls: list[str] = []

    def find_state(device: str, owner: int | None = None) -> tuple[None, str]:
        calls.append(device)
        return None, why

    monkeypatch.setattr(state, "find_state", find_state)
    monkeypatch.setattr(time, "sleep", _no_sleep)
    for follow in (False, True):
        with pytest.raises(UsageError) as e:
            trace_cli._open(os.fspath(mnt), follow)
        assert str(e.value) == (
            f"the unionfs mount at {mnt} (mounted by uid 0) published no state that can be "
            f"used ({why}): its trace cannot be found"
        )
    assert calls == ["0:4250", "0:4250"]


def test_a_state_not_published_yet_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount that has just started publishes its state a moment later."""
    mnt = _a_mount(monkeypatch, tmp_path)
    trace = trace_file(tmp_path, line(HEADER))
    live = state.MountState(1, os.fspath(mnt), "0:4250", {}, {}, os.fspath(trace), None)
    answers: list[tuple[state.MountState | None, str]] = [
        (None, "no directory /run/unionfs"),
        (None, "no /run/unionfs/0:4250.json"),
        (live, ""),
    ]
    monkeypatch.setattr(state, "find_state", lambda *a: answers.pop(0))
    monkeypatch.setattr(time, "sleep", lambda _: None)
    where, lines = trace_cli._open(os.fspath(mnt), False)
    assert where == os.fspath(trace) and [x for x, _ in lines] == [line(HEADER)]
    assert answers == []
    # Never published (an older daemon): said once the wait is over.
    monkeypatch.setattr(trace_cli, "STATE_WAIT", 0.0)
    monkeypatch.setattr(state, "find_state", lambda *a: (None, "no /run/unionfs/0:4250.json"))
    with pytest.raises(UsageError) as e:
        trace_cli._open(os.fspath(mnt), False)
    assert "(no /run/unionfs/0:4250.json: an older daemon, or another UNIONFS_RUNTIME_DIR)" in str(
        e.value
    )


def test_follow_without_a_socket_does_not_read_a_mounts_fifo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the FIFO would take the events from its reader: refused, in one line."""
    mnt = _a_mount(monkeypatch, tmp_path)
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    live = state.MountState(1, os.fspath(mnt), "0:4250", {}, {}, os.fspath(fifo), None)
    monkeypatch.setattr(state, "find_state", lambda *a: (live, ""))
    with pytest.raises(UsageError) as e:
        trace_cli._open(os.fspath(mnt), True)
    assert str(e.value) == (
        f"the mount at {mnt} has no trace socket (see the daemon's log) and traces to "
        f"{fifo}, not a file: read that instead"
    )
    # A trace file is followed instead.
    trace = trace_file(tmp_path, line(HEADER))
    monkeypatch.setattr(state, "find_state", lambda *a: (live._replace(trace=os.fspath(trace)), ""))
    where, _ = trace_cli._open(os.fspath(mnt), True)
    assert where == os.fspath(trace)


def test_trace_says_why_a_mounts_state_was_refused(
    stack: Stack, mounted: Callable[..., UnionMount], tmp_path: Path
) -> None:
    """Another user made the runtime directory (mode 0777): the daemon publishes
    nothing there, and ``unionfs trace MNT`` says which directory it refused and why."""
    planted = tmp_path / "planted-run"
    planted.mkdir()
    os.chmod(planted, 0o777)
    os.chown(planted, OTHER_USER, OTHER_USER)
    env = {state.RUNDIR_ENV: os.fspath(planted)}
    um = mounted(env=env, extra_options=f"trace={tmp_path / 'trace.jsonl'}", timeout=DEADLINE)
    _logged(um, "cannot publish")
    res = run("trace", os.fspath(um.mountpoint), env=env)
    no_traceback(res)
    assert (res.returncode, res.stdout) == (2, "")
    assert f"{planted}: refused: owned by uid {OTHER_USER}" in res.stderr
    assert "its trace cannot be found" in res.stderr and len(res.stderr.splitlines()) == 1
