"""Content digests and compressed streams: what every blob is checked against.

A layer blob is read once, as a stream: its bytes are hashed for the blob digest
(the manifest's), decompressed, and hashed again for the diff_id (the image
config's ``rootfs.diff_ids``), while the tar reader consumes the result. A digest
string from an image is validated before it is ever used to build a path.
"""

from __future__ import annotations

import hashlib
import re
import zlib

from unionfs.errors import UsageError
from unionfs.records import Record

# Not imported at run time: ``typing`` and ``dataclasses`` would add about 40 ms
# to the start of every image command here (a ``layer import`` is measured
# against ``tar -x``).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO, Protocol

    class Readable(Protocol):
        def read(self, n: int = -1, /) -> bytes: ...


CHUNK = 1 << 20


class ImageError(UsageError):
    """A bad image, layer or cache: one line that names the image, layer or entry."""


_DIGEST_RE = {
    "sha256": re.compile(r"[0-9a-f]{64}"),
    "sha512": re.compile(r"[0-9a-f]{128}"),
}


class Digest(Record):
    """``algorithm:hex``, validated (so ``hex`` is safe as a file name)."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: object, what: str = "digest") -> Digest:
        if not isinstance(text, str) or ":" not in text:
            raise ImageError(f"{what}: not a digest: {text!r}")
        algorithm, _, hexpart = text.partition(":")
        pattern = _DIGEST_RE.get(algorithm)
        if pattern is None:
            raise ImageError(f"{what}: unsupported digest algorithm {algorithm!r}")
        if not pattern.fullmatch(hexpart):
            raise ImageError(f"{what}: malformed digest {text!r}")
        return cls(algorithm, hexpart)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        return f"{self.algorithm}:{self.hex[:12]}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)


def sha256_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


class HashingReader:
    """Reads through *raw*, hashing and counting every byte that passes."""

    def __init__(self, raw: Readable, algorithm: str = "sha256", limit: int | None = None) -> None:
        self.raw = raw
        self.hash = hashlib.new(algorithm)
        self.count = 0
        self.limit = limit  # more bytes than this is an error (a decompression bomb)

    def read(self, n: int = -1, /) -> bytes:
        data = self.raw.read(n if n is not None and n >= 0 else CHUNK)
        self.hash.update(data)
        self.count += len(data)
        if self.limit is not None and self.count > self.limit:
            raise LimitExceeded(self.limit)
        return data

    def drain(self) -> None:
        """Read to the end, so the digest covers every byte (tar padding too)."""
        while self.read(CHUNK):
            pass

    def digest(self) -> Digest:
        return Digest(self.hash.name, self.hash.hexdigest())


class LimitExceeded(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _Peeked:
    """A stream with its first bytes already read, for sniffing the compression."""

    def __init__(self, head: bytes, raw: Readable) -> None:
        self.head = head
        self.raw = raw

    def read(self, n: int = -1, /) -> bytes:
        if self.head:
            out, self.head = self.head, b""
            return out
        return self.raw.read(n)


class _GzipReader:
    """gzip decompression of a stream, every member of it (``gzip -c a b`` output too),
    with bounded output per call so a bomb never sits in memory."""

    def __init__(self, raw: Readable) -> None:
        self.raw = raw
        self.z = zlib.decompressobj(31)
        self.pending = b""  # compressed input not yet given to the decompressor
        self.eof = False
        self.started = False  # the current member has had input

    def read(self, n: int = -1, /) -> bytes:
        want = n if n > 0 else CHUNK
        while True:
            if self.z.unconsumed_tail:
                data = self.z.unconsumed_tail
            elif self.pending:
                data, self.pending = self.pending, b""
            else:
                if self.eof:
                    return b""
                data = self.raw.read(CHUNK)
                if not data:
                    self.eof = True
                    if self.started:
                        raise zlib.error("truncated gzip stream")
                    return b""
            if not self.started:
                data = data.lstrip(b"\0")  # zero padding between or after members
                if not data:
                    continue
            out = self.z.decompress(data, want)
            self.started = True
            if self.z.eof:
                self.pending = self.z.unused_data
                self.z = zlib.decompressobj(31)
                self.started = False
            if out:
                return out


def decompressed(raw: Readable) -> tuple[Readable, str]:
    """The decompressed stream of *raw* and its compression's name (``gzip``,
    ``zstd`` or ``none``), told by the magic bytes, whatever a media type claims."""
    head = b""
    while len(head) < 4:
        more = raw.read(4 - len(head))
        if not more:
            break
        head += more
    stream = _Peeked(head, raw)
    if head.startswith(GZIP_MAGIC):
        return _GzipReader(stream), "gzip"
    if head.startswith(ZSTD_MAGIC):
        import zstandard  # only needed for zstd layers

        reader = zstandard.ZstdDecompressor().stream_reader(
            stream,  # type: ignore[arg-type]
            read_across_frames=True,
            closefd=False,
        )
        return reader, "zstd"
    return stream, "none"


def hash_file(f: BinaryIO, algorithm: str = "sha256") -> Digest:
    h = hashlib.new(algorithm)
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return Digest(algorithm, h.hexdigest())


class Decoder:
    """A layer blob read, hashed and decompressed in a worker thread, a bounded queue
    ahead of the tar reader that calls ``read``.

    zlib, zstd and sha256 release the GIL, so decompressing and hashing overlap
    the unpacking of the entries, as ``tar -xz``'s separate gzip process does. An
    uncompressed blob is hashed once: its blob digest is its diff_id (both sha256).
    Errors in the worker (corrupt data, the size limit) are raised by ``read``.
    """

    _QUEUE = 8  # chunks of CHUNK bytes in flight at most

    def __init__(
        self,
        raw: Readable,
        algorithm: str = "sha256",
        limit: int | None = None,
        tar_algorithm: str = "sha256",
    ) -> None:
        import queue
        import threading

        self.blob = HashingReader(raw, algorithm)
        self.algorithm = algorithm
        self.tar_algorithm = tar_algorithm  # the diff_id's
        self.limit = limit
        self.kind = "none"
        self.tar_count = 0
        self._tar_digest: Digest | None = None
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(self._QUEUE)
        self._stop = threading.Event()
        self._chunk = b""
        self._pos = 0
        self._eof = False
        self._thread = threading.Thread(target=self._work, name="layer-decoder", daemon=True)
        self._thread.start()

    # -- the worker ----------------------------------------------------------------

    def _work(self) -> None:
        try:
            data, self.kind = decompressed(self.blob)
            shared = self.kind == "none" and self.algorithm == self.tar_algorithm
            tar_hash = None if shared else hashlib.new(self.tar_algorithm)
            while not self._stop.is_set():
                chunk = data.read(CHUNK)
                if not chunk:
                    break
                if tar_hash is not None:
                    tar_hash.update(chunk)
                self.tar_count += len(chunk)
                if self.limit is not None and self.tar_count > self.limit:
                    raise LimitExceeded(self.limit)
                self._put(chunk)
            self.blob.drain()  # trailing bytes after the compressed stream count too
            self._tar_digest = (
                self.blob.digest()
                if tar_hash is None
                else Digest(self.tar_algorithm, tar_hash.hexdigest())
            )
            self._put(None)
        except BaseException as e:  # handed to the reader, which raises it
            self._put(e)

    def _put(self, item: bytes | BaseException | None) -> None:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # -- the reader ----------------------------------------------------------------

    def read(self, n: int = -1, /) -> bytes:
        """Up to *n* bytes (all of them: -1), at most what is left of the worker's
        current chunk, as a raw stream's read: a whole chunk is passed on as it
        is, never copied (the tar reader asks for a chunk at a time)."""
        if n == 0:
            return b""
        if n is None or n < 0:
            n = 1 << 62
        while self._pos >= len(self._chunk):
            if self._eof:
                return b""
            item = self._queue.get()
            if item is None:
                self._eof = True
                return b""
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            self._chunk, self._pos = item, 0
        if self._pos == 0 and n >= len(self._chunk):
            piece = self._chunk
        else:
            piece = self._chunk[self._pos : self._pos + n]
        self._pos += len(piece)
        return piece

    def finish(self) -> Digest:
        """Read to the end (tar padding too) and return the diff_id."""
        while self.read(CHUNK):
            pass
        self._thread.join()
        assert self._tar_digest is not None
        return self._tar_digest

    def close(self) -> None:
        """Stop the worker (after an error on the reader's side)."""
        self._stop.set()
        self._thread.join()
