"""Tracing a live mount: the overlay's decisions, one JSON object a line.

The core reports each decision to ``Union.events`` (``unionfs.overlay.events``);
while someone listens, that is a ``Tracer``. Who listens: the ``-o trace=FILE``
file, and each ``unionfs trace --follow`` connected to the mount's socket.
Nobody listening, ``Union.events`` is None and the request path pays nothing
but one ``is not None`` test per decision and per request.

A request never waits for the trace: ``emit`` appends to a bounded list and
returns; a trio task takes the list every ``FLUSH_INTERVAL`` seconds, encodes
it (in a worker thread) and hands it to each listener's own bounded queue,
never waiting for one: each ``--follow`` reader's task sends its queue to its
socket, and the trace file's own thread (``FileWriter``, not one of trio's,
which copy-ups use) writes its queue to the file. When the list or a queue is
full (the disk or a reader is slower than the mount, a pipe nobody reads),
events are dropped and counted, and that listener's next record is a
``dropped`` one with the count: a listener that lags loses its own events, not
the others'. Events a write could not deliver (a FIFO nobody reads, a full
disk) are counted the same way (``TraceFile``).

Record fields: ``time`` (Unix seconds), ``pid``/``uid`` of the caller and
``request`` (the FUSE request, refined: chmod, chown, truncate, utimes, open
for write, ...) when a request caused it, ``event``, ``path`` (relative to the
mount's root), and per event: ``layer``, ``outcome``, ``bytes``, ``method``,
``duration_s``, ``errno``, ``why``, ``bits``, ``xattr``; ``for`` is the request's
own path when the event is about another one (a parent copied up for a child).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import logging
import os
import select
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from unionfs.fuse import state
from unionfs.overlay.events import LAYER_ERROR, REFUSED, Refused
from unionfs.overlay.events import errno_name as _errname
from unionfs.overlay.union import Union, join

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.1
CAPACITY = 1 << 16  # events held between two flushes before dropping
SUBSCRIBER_BACKLOG = 64  # encoded batches queued per live reader before dropping
# Events (and bytes) queued for the trace file while a write is stuck before dropping.
FILE_BACKLOG = 1 << 16
FILE_BACKLOG_BYTES = 64 << 20
WRITE_CHUNK = 1 << 20  # at most this much a write: each one that returns is progress
# At unmount: how long a trace FIFO may go unread (no byte taken) before what is left
# to write is dropped; while the mount runs, a write waits as long as it takes (in the
# file's own thread: nothing else waits for it).
UNMOUNT_PATIENCE = 5.0
# At unmount, a write that does not return at all (a hung disk) is left behind this
# much later than a pipe is given up on: the daemon exits without the file's end.
STUCK_GRACE = 5.0

# Errors that say a layer's filesystem failed, not that the request was wrong.
# (EROFS too: a read-only mount's EROFS is the kernel's, which never asks the daemon.)
LAYER_ERRNOS = frozenset(
    {errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.ESTALE, errno.EUCLEAN, errno.EBADMSG, errno.EROFS}
)

# The tracer the request boundary reports to; None while nobody listens.
active: Tracer | None = None
# Told whether anyone traces now (the C hook then leaves every READ to Python).
on_change: Callable[[bool], None] | None = None


class Request:
    """The request being served: what it is, who asked, and its path, worked out only
    when one of its decisions is recorded (most requests decide nothing)."""

    __slots__ = ("_union", "_name", "_args", "_described")

    def __init__(self, union: Union, name: str, args: Sequence[Any]) -> None:
        self._union = union
        self._name = name
        self._args = args
        self._described: tuple[str, int | None, int | None, bytes | None] | None = None

    def describe(self) -> tuple[str, int | None, int | None, bytes | None]:
        """(request, caller pid, caller uid, path)."""
        if self._described is None:
            args = self._args
            # pyfuse3's RequestContext, the last argument of the requests that have one
            # (not imported: this module must not import pyfuse3 before the C hook).
            ctx = args[-1] if args and hasattr(args[-1], "umask") else None
            self._described = (
                _refine(self._name, args),
                ctx.pid if ctx is not None else None,
                ctx.uid if ctx is not None else None,
                _target(self._union, self._name, args),
            )
        return self._described


CURRENT: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "unionfs_request", default=None
)


class Subscriber:
    """One ``unionfs trace --follow``: its own queue of encoded batches."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[bytes](SUBSCRIBER_BACKLOG)
        self.dropped = 0


class Tracer:
    def __init__(
        self,
        union: Union,
        header: dict[str, Any],
        trace_fd: int | None = None,
        trace_path: Path | None = None,
    ) -> None:
        self.union = union
        self.header = header  # the first record of a file or a stream: the mount and its layers
        self.file = (
            TraceFile(trace_fd, trace_path, encode([header])) if trace_fd is not None else None
        )
        self.writer = FileWriter(self.file) if self.file is not None else None
        self.subscribers: list[Subscriber] = []
        self.buffer: list[dict[str, Any]] = []
        self.dropped = 0  # since the last flush
        self._attach()

    # -- the request side (trio thread, never blocks) -------------------------

    def emit(self, kind: str, path: bytes, **fields: Any) -> None:
        if len(self.buffer) >= CAPACITY:
            self.dropped += 1
            return
        rec: dict[str, Any] = {"time": round(time.time(), 6)}
        req = CURRENT.get()
        target = None
        if req is not None:
            rec["request"], rec["pid"], rec["uid"], target = req.describe()
        rec["event"] = kind
        rec["path"] = path
        rec.update(fields)
        if target is not None and target != path:
            rec["for"] = target
        self.buffer.append(rec)

    def failed(self, e: OSError) -> None:
        """A request ends with *e*: record it if an overlay rule or a layer caused it."""
        if isinstance(e, Refused):
            # A refusal that names no path is about the request's own.
            path = e.path or _request_path()
            if e.xattr is not None:
                self.emit(REFUSED, path, errno=_errname(e.errno), why=e.strerror, xattr=e.xattr)
            else:
                self.emit(REFUSED, path, errno=_errname(e.errno), why=e.strerror)
        elif e.errno in LAYER_ERRNOS:
            self.emit(LAYER_ERROR, _request_path(), errno=_errname(e.errno), why=e.strerror)

    # -- listeners -----------------------------------------------------------

    @property
    def listening(self) -> bool:
        return self.file is not None or bool(self.subscribers)

    def _attach(self) -> None:
        """Point the union and the request boundary here while anyone listens."""
        global active
        on = self.listening
        self.union.events = self if on else None
        active = self if on else None
        if on_change is not None:
            on_change(on)

    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        sub.send.send_nowait(encode([self.header]))
        self.subscribers.append(sub)
        self._attach()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with contextlib.suppress(ValueError):
            self.subscribers.remove(sub)
        sub.send.close()
        self._attach()

    # -- the flush task ----------------------------------------------------------

    async def run(self) -> None:
        """Drain the buffer until cancelled; the last events are written on the way out."""
        if self.writer is not None:
            self.writer.start()
        try:
            while True:
                # A flush taken out of the buffer is handed on whole: cancelled half-way
                # (at unmount), its events would be lost. It never waits for a listener.
                with trio.CancelScope(shield=True):
                    await self.flush()
                await trio.sleep(FLUSH_INTERVAL)
        finally:
            with trio.CancelScope(shield=True):
                await self.flush()
                if self.writer is not None:
                    await self.writer.finish()

    async def flush(self) -> None:
        batch, self.buffer = self.buffer, []
        overflow, self.dropped = self.dropped, 0
        if overflow:
            batch.append({"time": round(time.time(), 6), "event": "dropped", "count": overflow})
        if not batch:
            return
        data = await trio.to_thread.run_sync(encode, batch)
        for sub in list(self.subscribers):  # a reader that lags loses events, not the mount
            try:
                sub.send.send_nowait(data)
            except trio.WouldBlock:  # its events, and those the dropped record reported
                sub.dropped += len(batch) - (1 if overflow else 0) + overflow
            except trio.ClosedResourceError:
                self.unsubscribe(sub)
        if self.writer is not None:  # nor does the file: its thread writes what it is given
            lines = [(1, 0)] * (len(batch) - (1 if overflow else 0))
            if overflow:
                lines.append((0, overflow))
            self.writer.put(data, lines, overflow)

    def close(self) -> None:
        global active
        self.union.events = None
        active = None
        if on_change is not None:
            on_change(False)
        if self.writer is not None and self.writer.running:
            return  # a write that never returned: its fd stays open until the daemon exits
        if self.file is not None:
            self.file.close()


def encode(batch: Sequence[dict[str, Any]]) -> bytes:
    """JSON lines; paths (bytes) as strings, undecodable bytes as ``\\udcXX`` escapes."""
    return b"".join(
        json.dumps(rec, default=_default, separators=(",", ":")).encode() + b"\n" for rec in batch
    )


def _default(value: object) -> object:
    if isinstance(value, bytes):
        return os.fsdecode(value)
    raise TypeError(type(value).__name__)


def _request_path() -> bytes:
    """The path of the request being served (empty: none, or the root)."""
    req = CURRENT.get()
    path = req.describe()[3] if req is not None else None
    return path or b""


# -- the -o trace= file ------------------------------------------------------------------


def open_file(path: Path) -> int:
    """Open the ``-o trace=`` file before the mount, never waiting for anyone: a file
    (made, mode 0600, if there is none) or a device, for appending; a FIFO that a
    reader has open, for writing; a FIFO nobody reads, only as a handle (``O_PATH``),
    which ``TraceFile`` opens for writing once a reader opens it, and meanwhile the
    events are dropped and counted (said here, on the mount command's stderr). An
    ``OSError`` is for the caller to report."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        # O_NONBLOCK: a FIFO with no reader fails (ENXIO) instead of waiting for one.
        fd = os.open(path, flags | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):  # a socket: nothing to open
            os.close(fd)
            raise
        log.warning(
            "trace file %s is a FIFO nobody reads yet: its events are dropped (and counted) "
            "until a reader opens it",
            path,
        )
        return fd
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.set_blocking(fd, True)  # a terminal, say, is written as it always was
    return fd


def _is_handle(fd: int) -> bool:
    """Whether *fd* is an ``O_PATH`` handle (it cannot be written)."""
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH)


class FileWriter:
    """The thread that writes the ``-o trace=`` file: its own, not one of trio's (which
    copy-ups use), so a write that waits (a pipe nobody reads, a slow or hung disk)
    holds nothing but this thread and this file's events.

    The flush task hands it each encoded batch (``put``), never waiting: a batch that
    does not fit in the queue (``FILE_BACKLOG`` events, ``FILE_BACKLOG_BYTES``) is
    counted as lost, and the file's next ``dropped`` record says how many. Between
    batches the thread looks at a FIFO every ``FLUSH_INTERVAL`` (a reader may come).
    At unmount (``finish``) it writes what it still holds, giving up on a pipe
    ``UNMOUNT_PATIENCE`` seconds after the last progress, then ``trace-end``; a write
    that never returns is left behind ``STUCK_GRACE`` seconds later still.
    """

    def __init__(self, file: TraceFile) -> None:
        self.file = file
        self._cond = threading.Condition()
        self._queue: deque[tuple[bytes, list[tuple[int, int]], int]] = deque()
        self._held = 0  # events (lines) in the queue
        self._held_bytes = 0
        # Refused by a full queue, for the thread to count: events (and those the
        # dropped records among them reported) to report, and events lost in all.
        self._refused_report = 0
        self._refused_lost = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._failed_once = False

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._done.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="unionfs-trace-file", daemon=True)
        self._thread.start()

    def put(self, data: bytes, lines: list[tuple[int, int]], overflow: int) -> None:
        """Queue *data* (see ``TraceFile.deliver``); the trio thread, never waiting."""
        with self._cond:
            if self._queue and (
                self._held + len(lines) > FILE_BACKLOG
                or self._held_bytes + len(data) > FILE_BACKLOG_BYTES
            ):
                self._refused_report += sum(events + reported for events, reported in lines)
                self._refused_lost += sum(events for events, _ in lines) + overflow
            else:
                self._queue.append((data, lines, overflow))
                self._held += len(lines)
                self._held_bytes += len(data)
            self._cond.notify()

    async def finish(self) -> None:
        """At unmount: let the thread write what it holds, then the file's end; wait
        for it as long as it makes progress (``UNMOUNT_PATIENCE``, ``STUCK_GRACE``)."""
        file = self.file
        file.stop()
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is None:
            return
        while not self._done.is_set():
            since = time.monotonic() - max(file.progress, file.stopped_at or 0.0)
            if since >= UNMOUNT_PATIENCE + STUCK_GRACE:
                with self._cond:
                    queued = sum(o + sum(e for e, _ in ls) for _, ls, o in self._queue)
                    lost = file.lost_total + queued + self._refused_lost
                log.warning(
                    "trace file %s: a write has not returned for %.0f s: its end was not "
                    "written (%d events, at least %d dropped)",
                    file.path,
                    since,
                    file.written,
                    lost,
                )
                return
            await trio.sleep(FLUSH_INTERVAL / 4)

    def _take(self, wait: bool) -> tuple[tuple[bytes, list[tuple[int, int]], int] | None, bool]:
        """The next batch (None: none), and whether the mount is going; waiting for one
        (at most ``FLUSH_INTERVAL`` when a FIFO is to be looked at) when *wait*."""
        file = self.file
        with self._cond:
            if wait and not self._queue and not self._stopping:
                self._cond.wait(None if file.idle else FLUSH_INTERVAL)
            item = self._queue.popleft() if self._queue else None
            if item is not None:
                self._held -= len(item[1])
                self._held_bytes -= len(item[0])
            file.lost += self._refused_report
            file.lost_total += self._refused_lost
            self._refused_report = self._refused_lost = 0
            return item, self._stopping

    def _run(self) -> None:
        file = self.file
        try:
            wait = False  # the first round writes the header at once
            while True:
                item, stopping = self._take(wait)
                wait = item is None
                if item is None and stopping:
                    break
                if item is None and file.idle:
                    continue
                self._deliver(*(item or (b"", [], 0)))
            self._deliver(b"", [], 0, end=True)
        finally:
            self._done.set()

    def _deliver(
        self, data: bytes, lines: list[tuple[int, int]], overflow: int, end: bool = False
    ) -> None:
        try:
            if end:
                self.file.finish()
            else:
                self.file.deliver(data, lines, overflow)
        except OSError as e:  # deliver counts what it could not write: never the mount
            log.warning("trace file %s: %s", self.file.path, e)
        except Exception:  # a bug: said once, and the thread goes on with the next batch
            if not self._failed_once:
                self._failed_once = True
                log.exception("trace file %s: cannot be written", self.file.path)


class TraceFile:
    """The ``-o trace=`` file, written by its ``FileWriter``'s thread (only).

    A file is appended to, its header once at the start. A FIFO is a live stream: it
    is open for writing (non-blocking) only while a reader has it open, and each new
    reader gets the header first. A pipe that is not read holds the file's thread, and
    its queue fills meanwhile (then drops, counting); at unmount the writer waits at
    most ``UNMOUNT_PATIENCE`` seconds without progress. Events nobody could read (a
    FIFO without a reader, a write that failed: the reader went away, a full disk) are
    counted: the next ``dropped`` record that gets through says how many, and
    ``trace-end`` how many in all. A line a failed write cut short is ended before
    the next write, so the other lines stay whole records.
    """

    def __init__(self, fd: int, path: Path | None, header: bytes) -> None:
        self.path = path
        self.header = header
        self.fd: int | None = fd  # open for writing; None: a FIFO nobody reads
        self.handle: int | None = None  # a FIFO's O_PATH handle, to open it again
        self.fifo = stat.S_ISFIFO(os.fstat(fd).st_mode)
        if self.fifo:
            if _is_handle(fd):
                self.handle, self.fd = fd, None
            else:
                self.handle = self._open_again(fd, os.O_PATH)
                os.set_blocking(fd, False)
        self.send_header = True  # the reader (or the file) has not had it yet
        self.lost = 0  # events lost since the last dropped record written
        self.lost_total = 0
        self.written = 0  # events written (not counting the dropped records)
        self.torn = False  # the last write stopped inside a line
        self.failing = False  # a failure was logged: not again until a write gets through
        self.stopped_at: float | None = None  # when the unmount began (set by the trio thread)
        self.progress = 0.0  # when a write last took some bytes (read by the trio thread)
        self.gave_up = False  # at unmount, a reader that does not read was waited for
        self.unread = False  # events were lost to a FIFO nobody had open (and it was said)

    @property
    def idle(self) -> bool:
        """Nothing to do without new events (a FIFO is looked at every flush: readers come)."""
        return not (self.fifo or self.send_header or self.lost or self.torn)

    def stop(self) -> None:
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()

    def deliver(self, data: bytes, lines: Sequence[tuple[int, int]], overflow: int = 0) -> bool:
        """Write *data*, whose *lines* each hold (events, events a dropped record reports),
        after what a reader still needs (the header, a dropped record); *overflow* events
        were dropped before they reached *data*. Whether all of it was written."""
        self.lost_total += overflow
        if self.fifo:
            self._follow_reader()
        parts: list[bytes] = []
        kinds: list[tuple[int, int]] = []  # per line: events, dropped events reported
        header_at = -1
        if self.fd is not None:
            if self.send_header:
                header_at = len(kinds)
                parts.append(self.header)
                kinds.append((0, 0))
            if self.lost:
                note = {"time": round(time.time(), 6), "event": "dropped", "count": self.lost}
                parts.append(encode([note]))
                kinds.append((0, self.lost))
                self.lost = 0
        parts.append(data)
        kinds.extend(lines)
        payload = b"".join(parts)
        if not payload:
            return True
        prefix = b"\n" if self.torn else b""  # ends the line a failed write cut short
        done, err = self._write(prefix + payload) if self.fd is not None else (0, None)
        if done >= len(prefix):
            self.torn = False
        done = max(done - len(prefix), 0)
        # A line written but for its newline is a record (the reader takes a last line
        # that is whole JSON), and the next write's newline ends it: it counts as written.
        complete = payload[: done + 1].count(b"\n")
        if self.fd is None and not self.unread and any(e or r for e, r in kinds):
            self.unread = True
            log.info(
                "trace file %s: nobody has it open: its events are dropped (and counted) "
                "until a reader opens it",
                self.path,
            )
        for i, (events, reported) in enumerate(kinds):
            if i < complete:
                self.written += events
                if i == header_at:
                    self.send_header = False
            else:
                self.lost += events + reported
                self.lost_total += events
        if done:
            self.torn = payload[done - 1 : done] != b"\n"
        if err is not None:
            self._failed(err)
        elif complete == len(kinds):
            self.failing = False
        return complete == len(kinds)

    def finish(self) -> None:
        """At unmount: the ``trace-end`` record, with the count of events and of those lost."""
        end = {"time": round(time.time(), 6), "event": "trace-end"}
        end.update(events=self.written, dropped=self.lost_total)
        if not self.deliver(encode([end]), [(0, 0)]):
            log.warning(
                "trace file %s: its end was not written (%d events, %d dropped)",
                self.path,
                self.written,
                self.lost_total,
            )

    def close(self) -> None:
        for fd in (self.fd, self.handle):
            if fd is not None:
                os.close(fd)
        self.fd = self.handle = None

    def _write(self, payload: bytes) -> tuple[int, OSError | None]:
        """Write as much of *payload* as can be: the bytes written, and what stopped it."""
        assert self.fd is not None
        view = memoryview(payload)
        done = 0
        progress = time.monotonic()
        while done < len(view):
            try:
                done += os.write(self.fd, view[done : done + WRITE_CHUNK])
                progress = self.progress = time.monotonic()
                continue
            except BlockingIOError:
                pass  # a pipe full: wait for its reader
            except OSError as e:
                return done, e
            stopped = self.stopped_at
            if stopped is not None and (
                self.gave_up or time.monotonic() - max(progress, stopped) >= UNMOUNT_PATIENCE
            ):
                self.gave_up = True
                return done, TimeoutError(
                    errno.ETIMEDOUT, f"not read for {UNMOUNT_PATIENCE:g} s at unmount"
                )
            poll = select.poll()
            poll.register(self.fd, select.POLLOUT)
            poll.poll(FLUSH_INTERVAL * 1000)
        return done, None

    def _follow_reader(self) -> None:
        """A FIFO: let go of a pipe whose reader went away (what it holds goes with it,
        and the next reader starts on a line of its own); open it again once read."""
        if self.fd is not None:
            poll = select.poll()
            poll.register(self.fd, select.POLLOUT)
            if any(ev & select.POLLERR for _, ev in poll.poll(0)):
                self._let_go()
        if self.fd is None and self.handle is not None:
            try:
                self.fd = self._open_again(self.handle, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return  # nobody reads it (ENXIO)
            self.send_header = True
            self.torn = False
            self.unread = False

    def _open_again(self, fd: int, flags: int) -> int:
        """The file open as *fd*, opened again with *flags*: through /proc (the very
        FIFO, wherever its name went), else by its path."""
        try:
            return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
        except FileNotFoundError:
            if self.path is None:
                raise
            return os.open(self.path, flags | os.O_CLOEXEC)

    def _let_go(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        log.info("trace file %s: its reader went away", self.path)

    def _failed(self, e: OSError) -> None:
        if self.fifo and e.errno == errno.EPIPE:
            self._let_go()
            return
        if isinstance(e, TimeoutError):
            return  # at unmount: finish() says what was lost
        if not self.failing:
            self.failing = True
            log.warning(
                "trace file %s: %s; events are dropped (and counted) until it can be written",
                self.path,
                e.strerror,
            )


# -- who asked: the request boundary calls ``enter`` while tracing -------------------


def enter(ops: Any, name: str, args: Sequence[Any]) -> contextvars.Token[Request | None]:
    """Note the request being served, for the events it causes."""
    return CURRENT.set(Request(ops.union, name, args))


def _refine(name: str, args: Sequence[Any]) -> str:
    if name == "setattr" and len(args) > 3:
        fields = args[3]
        parts = []
        if fields.update_mode:
            parts.append("chmod")
        if fields.update_uid or fields.update_gid:
            parts.append("chown")
        if fields.update_size:
            parts.append("truncate")
        if fields.update_atime or fields.update_mtime:
            parts.append("utimes")
        return "+".join(parts) or name
    if name == "open" and len(args) > 2:
        flags = args[2]
        if flags & os.O_TRUNC:
            return "open O_TRUNC"
        if flags & os.O_ACCMODE != os.O_RDONLY:
            return "open for write"
    return name


# Requests whose first arguments are (parent inode, name) and (inode).
_BY_NAME = {"lookup", "mknod", "mkdir", "symlink", "unlink", "rmdir", "rename", "create"}
_BY_INODE = {"getattr", "setattr", "readlink", "open", "opendir", "getxattr", "listxattr"}
_BY_INODE |= {"setxattr", "removexattr", "access", "link"}


def _target(union: Union, name: str, args: Sequence[Any]) -> bytes | None:
    try:
        if name in _BY_NAME:
            return join(union.node(args[1]).path, args[2])
        if name in _BY_INODE:
            return union.node(args[1]).path
    except (OSError, IndexError, TypeError):
        return None
    return None


# -- the socket ``unionfs trace --follow`` connects to --------------------------------


async def serve_socket(
    tracer: Tracer, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, 0o600)  # the events name every path the mount's users touch
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_follow, tracer, stream)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        await listener.aclose()


async def _follow(tracer: Tracer, stream: trio.SocketStream) -> None:
    sub = tracer.subscribe()
    try:
        async with stream, trio.open_nursery() as nursery:

            async def until_closed() -> None:
                while await stream.receive_some(4096):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_closed)
            async for data in sub.receive:
                if sub.dropped:
                    note = {"time": round(time.time(), 6), "event": "dropped", "count": sub.dropped}
                    sub.dropped = 0
                    data = encode([note]) + data
                await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        tracer.unsubscribe(sub)


# -- the control plane of one mount ----------------------------------------------------


async def control(
    union: Union,
    mountpoint: Path,
    trace_path: Path | None,
    trace_fd: int | None,
    publish: bool = True,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Publish the mount's state (unless not *publish*), trace to the file and serve
    ``unionfs trace --follow`` until cancelled; then withdraw the state. Failing to
    publish costs only the inspection tools, never the mount."""
    header: dict[str, Any] = {
        "time": round(time.time(), 6),
        "event": "trace-start",
        "daemon": os.getpid(),
        "mountpoint": os.fspath(mountpoint),
        "layers": [
            {"index": layer.index, "role": "upper" if layer.writable else "lower",
             "path": os.fspath(layer.path)}
            for layer in union.layers
        ],
    }  # fmt: skip
    tracer = Tracer(union, header, trace_fd, trace_path)
    published = state.publish_mount(union.config, mountpoint, trace_path) if publish else None
    sock = os.fspath(state.socket_path(published.stem)) if published is not None else None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tracer.run)
            if published is not None and sock is not None:
                try:
                    await nursery.start(serve_socket, tracer, sock)
                except OSError as e:
                    log.warning("no trace socket at %s: %s", sock, e)
            task_status.started()
    finally:
        if published is not None:
            state.withdraw(published, os.getpid())
        tracer.close()
