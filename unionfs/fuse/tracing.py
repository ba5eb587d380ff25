"""Tracing a live mount: the overlay's decisions, one JSON object a line.

The core reports each decision to ``Union.events`` (``unionfs.overlay.events``);
while someone listens, that is a ``Tracer``. Who listens: the ``-o trace=FILE``
file, and each ``unionfs trace --follow`` connected to the mount's socket.
Nobody listening, ``Union.events`` is None and the request path pays nothing
but one ``is not None`` test per decision and per request.

A request never waits for the trace: ``emit`` appends to a bounded list and
returns; a trio task takes the list every ``FLUSH_INTERVAL`` seconds, encodes
it and writes it in a worker thread. When the list is full (the disk or a
reader is slower than the mount), events are dropped and counted, and the next
flush writes a ``dropped`` record with the count.

Record fields: ``time`` (Unix seconds), ``pid``/``uid`` of the caller and
``request`` (the FUSE request, refined: chmod, chown, truncate, utimes, open
for write, ...) when a request caused it, ``event``, ``path`` (relative to the
mount's root), and per event: ``layer``, ``outcome``, ``bytes``, ``method``,
``duration_s``, ``errno``, ``why``, ``bits``; ``for`` is the request's own path
when the event is about another one (a parent copied up for a child).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import logging
import os
import socket
import time
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


def encode_path(path: bytes) -> str:
    return os.fsdecode(path)


class Subscriber:
    """One ``unionfs trace --follow``: its own queue of encoded batches."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[bytes](SUBSCRIBER_BACKLOG)
        self.dropped = 0


class Tracer:
    def __init__(self, union: Union, header: dict[str, Any], trace_fd: int | None = None) -> None:
        self.union = union
        self.header = header  # the first record of a file or a stream: the mount and its layers
        self.trace_fd = trace_fd
        self.subscribers: list[Subscriber] = []
        self.buffer: list[dict[str, Any]] = []
        self.dropped = 0  # since the last flush
        self.dropped_total = 0
        self.written = 0
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
            self.emit(REFUSED, e.path, errno=_errname(e.errno), why=e.strerror)
        elif e.errno in LAYER_ERRNOS:
            req = CURRENT.get()
            path = req.describe()[3] if req is not None else None
            self.emit(LAYER_ERROR, path or b"", errno=_errname(e.errno), why=e.strerror)

    # -- listeners -----------------------------------------------------------

    @property
    def listening(self) -> bool:
        return self.trace_fd is not None or bool(self.subscribers)

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
        if self.trace_fd is not None:
            await trio.to_thread.run_sync(_write_all, self.trace_fd, encode([self.header]))
        try:
            while True:
                await trio.sleep(FLUSH_INTERVAL)
                # A flush taken out of the buffer is written whole: cancelled half-way
                # (at unmount), its events would be lost.
                with trio.CancelScope(shield=True):
                    await self.flush()
        finally:
            with trio.CancelScope(shield=True):
                await self.flush()
                end = {"time": round(time.time(), 6), "event": "trace-end"}
                end.update(events=self.written, dropped=self.dropped_total)
                if self.trace_fd is not None:
                    with contextlib.suppress(OSError):
                        await trio.to_thread.run_sync(_write_all, self.trace_fd, encode([end]))

    async def flush(self) -> None:
        batch, self.buffer = self.buffer, []
        if self.dropped:
            batch.append({"time": round(time.time(), 6), "event": "dropped", "count": self.dropped})
            self.dropped_total += self.dropped
            self.dropped = 0
        if not batch:
            return
        data = await trio.to_thread.run_sync(encode, batch)
        self.written += len(batch)
        for sub in list(self.subscribers):  # a reader that lags loses events, not the mount
            try:
                sub.send.send_nowait(data)
            except trio.WouldBlock:
                sub.dropped += len(batch)
            except trio.ClosedResourceError:
                self.unsubscribe(sub)
        if self.trace_fd is not None:
            try:
                await trio.to_thread.run_sync(_write_all, self.trace_fd, data)
            except OSError as e:
                log.warning("trace file: %s; %d events lost", e.strerror, len(batch))

    def close(self) -> None:
        global active
        self.union.events = None
        active = None
        if on_change is not None:
            on_change(False)
        if self.trace_fd is not None:
            os.close(self.trace_fd)
            self.trace_fd = None


def encode(batch: Sequence[dict[str, Any]]) -> bytes:
    """JSON lines; paths (bytes) as strings, undecodable bytes as ``\\udcXX`` escapes."""
    return b"".join(
        json.dumps(rec, default=_default, separators=(",", ":")).encode() + b"\n" for rec in batch
    )


def _default(value: object) -> object:
    if isinstance(value, bytes):
        return os.fsdecode(value)
    raise TypeError(type(value).__name__)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


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
    tracer = Tracer(union, header, trace_fd)
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
