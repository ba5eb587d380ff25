"""The trace where things go wrong: a FIFO nobody reads, a write that fails, a file
that is not a trace, a record with the wrong fields, names that are not one line."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack
from tests.mounting import REPO, UnionMount, unionfs_command
from tests.unit.conftest import write
from unionfs.fuse import tracing
from unionfs.inspect.trace import last_copy_up

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


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
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


@pytest.mark.parametrize("mode", [[], ["--json"], ["--summary"]])
def test_a_file_that_is_not_a_trace_is_refused(tmp_path: Path, mode: list[str]) -> None:
    passwd = trace_file(tmp_path, "root:x:0:0:root:/root:/bin/bash\n" * 30, name="passwd")
    res = run("trace", *mode, os.fspath(passwd))
    no_traceback(res)
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == (
        f"unionfs trace: {passwd}: not a trace file: line 1 is not a trace record (not JSON)\n"
    )


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


def _read_a_line(fd: int, out: bytearray, timeout: float = 10) -> None:
    """Read what the pipe holds until a whole line came."""
    deadline = time.monotonic() + timeout
    while b"\n" not in out:
        assert time.monotonic() < deadline, "no line came"
        out += _read_now(fd)
        time.sleep(0.02)


def _wait_for(what: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


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
            time.sleep(0.5)  # the daemon has tried to write them, to nobody
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
            assert um.proc.wait(timeout=20) == 0  # while the reader still holds the pipe
        finally:
            um.unmount()
        held = _read_now(reader)
    whole = held.decode().splitlines()[:-1]  # the last line may be cut short
    assert json.loads(whole[0])["event"] == "trace-start"
    assert all(json.loads(x)["event"] == "whiteout" for x in whole[1:])
    assert "its end was not written" in um.log() and " dropped)" in um.log()


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
        time.sleep(0.3)
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
            time.sleep(0.5)  # the daemon has tried to write them
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
