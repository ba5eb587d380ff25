"""Reading tar archives that come from anyone: ``tarfile``, with its headers bounded.

``tarfile`` trusts its input in ways a layer from the internet must not be trusted:

- a PAX or GNU long-name header is read whole into memory, whatever size it claims;
- the PAX records are parsed with regular expressions that some Python releases
  run in quadratic time (CVE-2024-6232: a 1 MB header of digits takes hours);
- a stream reader keeps every entry it has read (``members``);
- an invalid header after the first one silently ends the archive;
- a negative size (base-256) moves the reader backwards.

``SafeTarInfo`` (the ``tarinfo`` class given to ``tarfile.open``) replaces how the
extended headers are parsed with bounded, linear code, so none of ``tarfile``'s
own PAX parsing ever runs, whatever the interpreter's version. The plain ustar
header, the entry data and the writer are still ``tarfile``'s.

Every refusal is a ``TarFormatError``: a ``tarfile.ReadError`` whose message says
what is wrong in a few words; the caller says where.
"""

from __future__ import annotations

import math
import tarfile
from collections.abc import Iterator
from typing import Any

_tar: Any = tarfile  # what the stubs leave out: the header errors, nti/nts, members

BLOCK = tarfile.BLOCKSIZE
_ZEROS = bytes(BLOCK)
MAX_HEADER = 1 << 20  # the data of one PAX or GNU long-name header
MAX_GLOBAL = 64 << 10  # the records of the PAX global headers, all together
MAX_GLOBAL_KEYS = 64
MAX_CHAIN = 8  # extended headers in a row before an entry (GNU tar writes 3 at most)
MAX_SPARSE = 100_000  # regions of one sparse file
MAX_DIGITS = 20  # a number in a header (2**64 has 20 digits)
MAX_MEMBERS = 100_000  # members of an archive read for random access (an image archive)

_PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_INT_KEYS = ("size", "uid", "gid", "GNU.sparse.size", "GNU.sparse.realsize")


class TarFormatError(tarfile.ReadError):
    """A malformed or oversized header; the message says what, in a few words."""


class SafeTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` whose extended headers are parsed here, bounded (see the module)."""

    _depth = 0  # extended headers before this one in the same chain

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile, depth: int = 0) -> SafeTarInfo:
        buf = tf.fileobj.read(BLOCK)
        if len(buf) == BLOCK:
            if buf == _ZEROS:
                raise _tar.EOFHeaderError("end of file header")
        elif depth == 0 and tf.offset > 0 and buf.count(0) == len(buf):
            # The end: zero blocks, or none at all (GNU tar and Go accept both).
            raise _tar.EOFHeaderError("end of file header")
        elif buf and (depth > 0 or tf.offset > 0):
            raise TarFormatError("the archive ends inside a header")
        try:
            obj = cls.frombuf(buf, tf.encoding, tf.errors)
        except _tar.InvalidHeaderError:
            if depth == 0 and tf.offset > 0:
                raise TarFormatError("invalid tar header") from None
            raise
        obj.offset = tf.fileobj.tell() - BLOCK
        obj._depth = depth
        member: SafeTarInfo = obj._proc_member(tf)  # type: ignore[attr-defined]
        return member

    # -- the kinds of header (tarfile's _proc_member calls these) --------------------

    def _proc_builtin(self, tf: tarfile.TarFile) -> SafeTarInfo:
        if self.size < 0:
            raise TarFormatError(f"negative size in the header of {self.name!r}")
        member: SafeTarInfo = super()._proc_builtin(tf)  # type: ignore[misc]
        return member

    def _proc_gnulong(self, tf: tarfile.TarFile) -> SafeTarInfo:
        """A GNU long name or long link target: the next header's name or target."""
        buf = self._special_data(tf)
        nxt = self._next_header(tf)
        nxt.offset = self.offset
        text = _tar.nts(buf, tf.encoding, tf.errors)
        if self.type == tarfile.GNUTYPE_LONGNAME:
            nxt.name = text.removesuffix("/") if nxt.isdir() else text
        else:
            nxt.linkname = text
        return nxt

    def _proc_sparse(self, tf: tarfile.TarFile) -> SafeTarInfo:
        """A sparse file in the old GNU format: up to 4 regions in the header, 21 more
        in each extension block after it."""
        structs, extended, real_size = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        if self.size < 0 or real_size < 0:
            raise TarFormatError(f"negative size in the header of {self.name!r}")
        regions = [(o, n) for o, n in structs if n]
        while extended:
            if len(regions) > MAX_SPARSE:
                raise TarFormatError(f"a sparse file of more than {MAX_SPARSE} regions")
            buf = tf.fileobj.read(BLOCK)
            if len(buf) < BLOCK:
                raise TarFormatError("the archive ends inside a header")
            for pos in range(0, 21 * 24, 24):
                try:
                    offset, length = (
                        _tar.nti(buf[pos : pos + 12]),
                        _tar.nti(buf[pos + 12 : pos + 24]),
                    )
                except (ValueError, tarfile.HeaderError):
                    break
                if length:
                    regions.append((offset, length))
            extended = bool(buf[504])
        _check_regions(regions, real_size, self.size)
        self.sparse = regions  # type: ignore[assignment]
        self.offset_data = tf.fileobj.tell()
        tf.offset = self.offset_data + _blocks(self.size)
        self.size = real_size
        return self

    def _proc_pax(self, tf: tarfile.TarFile) -> SafeTarInfo:
        """A PAX extended header (for the next entry) or global one (for every entry
        after it), parsed here in linear time; then the entry it describes."""
        records = parse_pax(self._special_data(tf)[: self.size])
        is_global = self.type == tarfile.XGLTYPE
        state: dict[str, str] = _tar_state(tf)
        headers = state if is_global else dict(state)
        binary = any(k == b"hdrcharset" and v == b"BINARY" for k, v in records)
        binary = binary or state.get("hdrcharset") == "BINARY"
        offsets: list[int] = []
        numbytes: list[int] = []
        for raw_key, raw_value in records:
            key = _decode(raw_key, "utf-8", tf)
            names = key in ("path", "linkpath", "uname", "gname")
            value = _decode(raw_value, tf.encoding if names and binary else "utf-8", tf)
            if is_global and (key == "size" or key.startswith("GNU.sparse.")):
                raise TarFormatError(f"a global PAX header sets {key!r}")
            _check_pax_value(key, value)
            if key == "GNU.sparse.offset":
                offsets.append(int(value))
            elif key == "GNU.sparse.numbytes":
                numbytes.append(int(value))
            headers[key] = value
        if is_global and (
            len(headers) > MAX_GLOBAL_KEYS
            or sum(len(k) + len(v) for k, v in headers.items()) > MAX_GLOBAL
        ):
            raise TarFormatError(f"PAX global headers of more than {MAX_GLOBAL} bytes")

        nxt = self._next_header(tf)
        if is_global:
            return nxt  # read with the new global records already (they are the state)
        stored = int(headers["size"]) if "size" in headers else nxt.size
        data_start = nxt.offset_data
        map_size = 0
        regions: list[tuple[int, int]] | None = None
        if "GNU.sparse.map" in headers:  # GNU sparse 0.1
            regions = _pairs(headers["GNU.sparse.map"])
        elif "GNU.sparse.size" in headers:  # GNU sparse 0.0
            if len(offsets) != len(numbytes) or len(offsets) > MAX_SPARSE:
                raise TarFormatError("a malformed sparse map")
            regions = list(zip(offsets, numbytes, strict=True))
        elif headers.get("GNU.sparse.major") == "1" and headers.get("GNU.sparse.minor") == "0":
            regions, map_size = _sparse_map_10(tf, stored)
            nxt.offset_data = data_start + map_size
        nxt._apply_pax_info(headers, tf.encoding, tf.errors)  # type: ignore[attr-defined]
        nxt.offset = self.offset
        if regions is not None:
            real = headers.get("GNU.sparse.realsize") or headers.get("GNU.sparse.size")
            nxt.size = int(real) if real is not None else stored
            regions = [(o, n) for o, n in regions if n]
            _check_regions(regions, nxt.size, stored - map_size)
            nxt.sparse = regions  # type: ignore[assignment]
        if "size" in headers and (nxt.isreg() or nxt.type not in tarfile.SUPPORTED_TYPES):
            tf.offset = data_start + _blocks(stored)
        return nxt

    # -- helpers ---------------------------------------------------------------------

    def _special_data(self, tf: tarfile.TarFile) -> bytes:
        """The data of an extended header, refused before it is read when too large."""
        if not 0 <= self.size <= MAX_HEADER:
            kind = "PAX" if self.type in _PAX_TYPES else "GNU long-name"
            raise TarFormatError(f"a {kind} header of {self.size} bytes (at most {MAX_HEADER})")
        buf = tf.fileobj.read(_blocks(self.size))
        if len(buf) < self.size:
            raise TarFormatError("the archive ends inside a header")
        return buf

    def _next_header(self, tf: tarfile.TarFile) -> SafeTarInfo:
        """The header an extended header belongs to."""
        if self._depth + 1 >= MAX_CHAIN:
            raise TarFormatError(f"more than {MAX_CHAIN} extended headers in a row")
        try:
            return self.fromtarfile(tf, self._depth + 1)
        except tarfile.HeaderError as e:
            raise TarFormatError(
                f"an extended header without a valid entry after it ({e})"
            ) from None


def parse_pax(data: bytes) -> list[tuple[bytes, bytes]]:
    """The ``LENGTH KEY=VALUE\\n`` records of a PAX header, in order, in one linear pass
    (never a regular expression over the whole header). Anything else is refused;
    zero bytes after the last record are padding."""
    records: list[tuple[bytes, bytes]] = []
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] == 0 and not data[pos:].strip(b"\0"):
            break
        space = data.find(b" ", pos, min(end, pos + MAX_DIGITS + 1))
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise TarFormatError("a malformed PAX record (no length)")
        length = int(digits)
        stop = pos + length
        if stop > end or stop <= space + 2 or data[stop - 1] != 0x0A:
            raise TarFormatError("a malformed PAX record (bad length)")
        key, eq, value = data[space + 1 : stop - 1].partition(b"=")
        if not eq or not key:
            raise TarFormatError("a malformed PAX record (no keyword)")
        records.append((key, value))
        pos = stop
    return records


def _decode(raw: bytes, encoding: str, tf: tarfile.TarFile) -> str:
    try:
        return raw.decode(encoding, "strict")
    except UnicodeDecodeError:
        return raw.decode(tf.encoding, tf.errors)


def _check_pax_value(key: str, value: str) -> None:
    """The numbers ``tarfile`` would read as 0 when malformed (or negative, which moves
    the reader backwards) are refused instead."""
    if key in _INT_KEYS or key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
        if not (value.isascii() and value.isdigit() and len(value) <= MAX_DIGITS):
            raise TarFormatError(f"PAX {key}={value[:30]!r}: not a number")
    elif key == "mtime":
        try:
            ok = len(value) <= 64 and math.isfinite(float(value))
        except ValueError:
            ok = False
        if not ok:
            raise TarFormatError(f"PAX mtime={value[:30]!r}: not a time")


def _pairs(text: str) -> list[tuple[int, int]]:
    """A GNU sparse 0.1 map: ``offset,size,offset,size...``."""
    if text.count(",") >= 2 * MAX_SPARSE:
        raise TarFormatError(f"a sparse file of more than {MAX_SPARSE} regions")
    parts = text.split(",")
    if len(parts) % 2 or not all(
        p.isascii() and p.isdigit() and len(p) <= MAX_DIGITS for p in parts
    ):
        raise TarFormatError("a malformed sparse map")
    numbers = [int(p) for p in parts]
    return list(zip(numbers[::2], numbers[1::2], strict=True))


def _sparse_map_10(tf: tarfile.TarFile, stored: int) -> tuple[list[tuple[int, int]], int]:
    """A GNU sparse 1.0 map, at the start of the entry's data: the number of regions,
    then an offset and a size for each, one decimal number a line, padded to a block.
    Returns the regions and the bytes the map took."""
    numbers: list[int] = []
    want = -1
    pending = b""
    used = 0
    while want < 0 or len(numbers) < want:
        line, nl, rest = pending.partition(b"\n")
        if not nl:
            if len(pending) > MAX_DIGITS or used + BLOCK > stored:
                raise TarFormatError("a malformed sparse map")
            block = tf.fileobj.read(BLOCK)
            if len(block) < BLOCK:
                raise TarFormatError("the archive ends inside a sparse map")
            used += BLOCK
            pending += block
            continue
        pending = rest
        if not line.isdigit() or len(line) > MAX_DIGITS:
            raise TarFormatError("a malformed sparse map")
        if want < 0:
            if int(line) > MAX_SPARSE:
                raise TarFormatError(f"a sparse file of more than {MAX_SPARSE} regions")
            want = 2 * int(line)
        else:
            numbers.append(int(line))
    return list(zip(numbers[::2], numbers[1::2], strict=True)), used


def _check_regions(regions: list[tuple[int, int]], size: int, stored: int) -> None:
    """Regions in order, inside the file, and no more data than the entry stores."""
    end = total = 0
    for offset, length in regions:
        if offset < end or offset + length > size:
            raise TarFormatError("a sparse map that does not fit its file")
        end = offset + length
        total += length
    if total > stored:
        raise TarFormatError("a sparse map larger than the data stored")


def _blocks(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _tar_state(tf: tarfile.TarFile) -> dict[str, str]:
    state: dict[str, str] = tf.pax_headers  # type: ignore[assignment]
    return state


# -- opening ---------------------------------------------------------------------------


class ForwardReader:
    """``read``, ``tell`` and a forward ``seek`` over a stream, for ``TarFile``.

    What ``tarfile``'s own stream mode does, without its cost per read: it joins
    and slices its whole buffer on every read (each 512-byte header), where this
    keeps the stream's last piece and an index into it."""

    def __init__(self, raw: Any, bufsize: int) -> None:
        self.raw = raw
        self.bufsize = bufsize
        self.buf = b""
        self.at = 0  # in buf
        self.pos = 0  # in the stream

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            n = 1 << 62
        end = self.at + n
        if end <= len(self.buf):  # the usual case: a header, a small file
            out = self.buf[self.at : end]
            self.at = end
            self.pos += n
            return out
        parts = [self.buf[self.at :]]
        got = len(parts[0])
        self.buf, self.at = b"", 0
        while got < n:
            piece = self.raw.read(self.bufsize)
            if not piece:
                break
            need = n - got
            if len(piece) > need:
                self.buf, self.at = piece, need
                piece = piece[:need]
            parts.append(piece)
            got += len(piece)
        self.pos += got
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        """Forward only (as ``tarfile``'s stream mode): up to *pos*, or the end."""
        if whence != 0 or pos < self.pos:
            raise tarfile.StreamError("seeking backwards is not allowed")
        skip = pos - self.pos
        while skip > len(self.buf) - self.at:  # past this piece: the next one
            skip -= len(self.buf) - self.at
            self.pos = pos - skip
            self.buf, self.at = self.raw.read(self.bufsize), 0
            if not self.buf:
                return self.pos  # the end
        self.at += skip
        self.pos = pos
        return pos


def open_stream(stream: Any, bufsize: int) -> tarfile.TarFile:
    """An uncompressed tar *stream*, read once from start to end (see ``entries``)."""
    reader: Any = ForwardReader(stream, bufsize)  # read and forward seeks only: enough
    return tarfile.TarFile(fileobj=reader, mode="r", tarinfo=SafeTarInfo)


def entries(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The entries of a stream, each forgotten once the next is read (``tarfile``
    keeps them all otherwise: memory in proportion to the number of entries)."""
    t: Any = tf
    while True:
        member = tf.next()
        t.members.clear()
        if member is None:
            return
        yield member


def open_archive(path: str) -> tarfile.TarFile:
    """An uncompressed tar file for random access, its members (at most
    ``MAX_MEMBERS``) read up front."""
    tf = tarfile.open(path, "r:", tarinfo=SafeTarInfo)  # noqa: SIM115 - the caller closes it
    t: Any = tf
    try:
        while tf.next() is not None:
            if len(t.members) > MAX_MEMBERS:
                raise TarFormatError(f"more than {MAX_MEMBERS} members")
        t._loaded = True
    except BaseException:
        tf.close()
        raise
    return tf
