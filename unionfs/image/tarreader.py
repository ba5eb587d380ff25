"""Reading tar archives that come from anyone: our own header parser, bounded.

A layer from the internet must not be trusted the way ``tarfile`` trusts its
input, and ``tarfile``'s reading costs about 100 µs of Python per entry (its
checksum summed in Python, a ``TarInfo`` built field by field, a dispatch per
header), more than the syscalls that make the entry. So the reading is ours:
ustar, PAX and GNU headers, the sparse formats GNU tar writes, and:

- a PAX or GNU long-name header larger than ``MAX_HEADER`` is refused before
  it is read (``tarfile`` reads it whole into memory, whatever size it claims);
- PAX records are parsed in one linear pass, never with a regular expression
  (some Python releases run ``tarfile``'s in quadratic time: CVE-2024-6232);
- a stream keeps nothing of the entries it has read;
- an invalid header after the first one is an error (``tarfile`` silently ends
  the archive there);
- a negative size (base-256) is refused (it would move the reader backwards);
- at most ``MAX_CHAIN`` extended headers in a row, ``MAX_SPARSE`` regions in a
  sparse file, regions in order and inside the file, global PAX records bounded;
- the end is a zero block, or the end of the stream where a header would start
  (GNU tar and Go accept both); a stream that ends inside a header, or inside an
  entry's data, is an error.

The values are read as ``tarfile`` reads them (octal or base-256 numbers, names
in the filesystem's encoding with ``surrogateescape``, PAX records overriding the
header's fields), so an archive unpacks as it did with ``tarfile``.

Every refusal is a ``TarFormatError`` whose message says what is wrong in a few
words; the caller says where. ``tarfile`` itself stays for writing layers (not
imported here: a command that only reads starts faster).
"""

from __future__ import annotations

import io
import math
import os
import sys
import zlib
from collections.abc import Iterator

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, BinaryIO

BLOCK = 512
_ZEROS = bytes(BLOCK)
_HIGH = bytes(range(128, 256))
MAX_HEADER = 1 << 20  # the data of one PAX or GNU long-name header
MAX_GLOBAL = 64 << 10  # the records of the PAX global headers, all together
MAX_GLOBAL_KEYS = 64
MAX_CHAIN = 8  # extended headers in a row before an entry (GNU tar writes 3 at most)
MAX_SPARSE = 100_000  # regions of one sparse file
MAX_DIGITS = 20  # a number in a header (2**64 has 20 digits)
MAX_MEMBERS = 100_000  # members of an archive read for random access (an image archive)

ENCODING = sys.getfilesystemencoding()  # names, as os.fsdecode reads them

REGTYPE, AREGTYPE, LNKTYPE, SYMTYPE = b"0", b"\0", b"1", b"2"
CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE, CONTTYPE = b"3", b"4", b"5", b"6", b"7"
GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE = b"L", b"K", b"S"
PAX_LOCAL, PAX_GLOBAL, SOLARIS_PAX = b"x", b"g", b"X"

_REGULAR = frozenset((REGTYPE, AREGTYPE, CONTTYPE, GNU_SPARSE))
_PAX_TYPES = frozenset((PAX_LOCAL, PAX_GLOBAL, SOLARIS_PAX))
_GNU_TYPES = frozenset((GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE))
# Types whose size is not data that follows the header (tarfile's rule: for these,
# only regular files carry data; an unknown type's data is skipped).
_NO_DATA = frozenset((LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE))
_INT_KEYS = ("size", "uid", "gid", "GNU.sparse.size", "GNU.sparse.realsize")
_SPARSE_NUMBERS = ("GNU.sparse.offset", "GNU.sparse.numbytes")


class TarFormatError(Exception):
    """A malformed or oversized header; the message says what, in a few words."""


class NotATar(TarFormatError):
    """The first header is not one: not a tar archive at all (or an empty file)."""


class Truncated(TarFormatError):
    """The stream ends inside an entry's data."""

    def __init__(self) -> None:
        super().__init__("unexpected end of data")


class _Bad(Exception):
    """A header block that is not one (the message is ``tarfile``'s word for it); the
    caller decides what that means where it was found."""


class _End(Exception):
    """The end-of-archive marker."""


class Entry:
    """One member: the fields ``tarfile.TarInfo`` has that unpacking uses, under the
    same names. ``pax_headers`` is shared between entries: read it, never change it."""

    __slots__ = (
        "name",
        "type",
        "mode",
        "uid",
        "gid",
        "size",
        "mtime",
        "linkname",
        "devmajor",
        "devminor",
        "pax_headers",
        "sparse",
        "offset",
        "offset_data",
    )

    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int  # a sparse file's real size; its data stored is the regions' total
    mtime: int | float  # an int from the header, a float from a PAX record
    linkname: str
    devmajor: int
    devminor: int
    pax_headers: dict[str, str]
    sparse: list[tuple[int, int]] | None  # (offset, length) of a sparse file's data
    offset: int  # of its first header
    offset_data: int  # of its data

    def isreg(self) -> bool:
        return self.type in _REGULAR

    def isdir(self) -> bool:
        return self.type == DIRTYPE

    def issym(self) -> bool:
        return self.type == SYMTYPE

    def islnk(self) -> bool:
        return self.type == LNKTYPE

    def ischr(self) -> bool:
        return self.type == CHRTYPE

    def isblk(self) -> bool:
        return self.type == BLKTYPE

    def isfifo(self) -> bool:
        return self.type == FIFOTYPE

    def isdev(self) -> bool:
        return self.type in (CHRTYPE, BLKTYPE, FIFOTYPE)

    def __repr__(self) -> str:
        return f"<Entry {self.name!r} type {self.type!r} size {self.size}>"


_EMPTY: dict[str, str] = {}


# -- one header block ------------------------------------------------------------------


def number(field: bytes) -> int:
    """A numeric header field: octal digits (up to a NUL, spaces around them) or
    base-256 (first byte 0x80, or 0xff for a negative number), as ``tarfile`` reads
    them. Anything else is ``_Bad``."""
    try:  # the usual field: digits, a NUL or space after them (int skips spaces)
        return int(field.rstrip(b"\0"), 8)
    except ValueError:
        pass  # a NUL inside, an empty field, base-256, not a number at all
    if field[0] in (0x80, 0xFF):
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else n
    try:
        return int(field.partition(b"\0")[0].strip() or b"0", 8)
    except ValueError:
        raise _Bad("invalid header") from None


def _text(field: bytes) -> str:
    return field.partition(b"\0")[0].decode(ENCODING, "surrogateescape")


def checksum_ok(buf: bytes) -> bool:
    """The header's checksum field against the sum of its bytes (the field itself
    counted as spaces), unsigned or, as some old tars wrote it, signed. The sum is
    zlib's: Adler-32 started at 0 has the plain byte sum in its low 16 bits, exact
    for 256 bytes (at most 65280, below its modulus)."""
    stored = number(buf[148:156])
    field = buf[148:156]
    total = (
        (zlib.adler32(buf[:256], 0) & 0xFFFF)
        + (zlib.adler32(buf[256:], 0) & 0xFFFF)
        - (zlib.adler32(field, 0) & 0xFFFF)
        + 8 * 0x20
    )
    if stored == total:
        return True
    high = (BLOCK - len(buf.translate(None, _HIGH))) - (8 - len(field.translate(None, _HIGH)))
    return stored == total - 256 * high


def parse_header(buf: bytes) -> Entry:
    """The fields of one 512-byte header block (not the zero block), ``_Bad`` when it
    is not a header: a checksum that does not match, a number that is not one."""
    if not checksum_ok(buf):
        raise _Bad("bad checksum")
    e = Entry()
    t = buf[156:157]
    name = _text(buf[:100])
    if t == AREGTYPE and name.endswith("/"):
        t = DIRTYPE  # the old V7 way to write a directory
    e.type = t
    try:  # the usual fields, in one go (see number)
        e.mode = int(buf[100:108].rstrip(b"\0"), 8)
        e.uid = int(buf[108:116].rstrip(b"\0"), 8)
        e.gid = int(buf[116:124].rstrip(b"\0"), 8)
        e.size = int(buf[124:136].rstrip(b"\0"), 8)
        e.mtime = int(buf[136:148].rstrip(b"\0"), 8)
    except ValueError:
        e.mode = number(buf[100:108])
        e.uid = number(buf[108:116])
        e.gid = number(buf[116:124])
        e.size = number(buf[124:136])
        e.mtime = number(buf[136:148])
    e.linkname = _text(buf[157:257]) if buf[157] else ""
    if t in (CHRTYPE, BLKTYPE):
        e.devmajor = number(buf[329:337])
        e.devminor = number(buf[337:345])
    else:
        e.devmajor = e.devminor = 0
    if t == DIRTYPE:
        name = name.rstrip("/")
    # The ustar prefix; a GNU header keeps other fields there (times, sparse map).
    if buf[345] and buf[257:263] == b"ustar\0" and t not in _GNU_TYPES:
        name = _text(buf[345:500]) + "/" + name
    e.name = name
    e.sparse = None
    e.pax_headers = _EMPTY
    return e


# -- PAX records -----------------------------------------------------------------------


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


def _check_pax_value(key: str, value: str) -> None:
    """The numbers ``tarfile`` would read as 0 when malformed (or negative, which moves
    the reader backwards) are refused instead."""
    if key in _INT_KEYS or key in _SPARSE_NUMBERS:
        if not (value.isascii() and value.isdigit() and len(value) <= MAX_DIGITS):
            raise TarFormatError(f"PAX {key}={value[:30]!r}: not a number")
    elif key == "mtime":
        try:
            ok = len(value) <= 64 and math.isfinite(float(value))
        except ValueError:
            ok = False
        if not ok:
            raise TarFormatError(f"PAX mtime={value[:30]!r}: not a time")


def _apply_pax(e: Entry, headers: dict[str, str]) -> None:
    """What the records say over the header's own fields (each checked already)."""
    for key, value in headers.items():
        if key == "path":
            e.name = value.rstrip("/")
        elif key == "linkpath":
            e.linkname = value
        elif key == "size" or key == "GNU.sparse.size" or key == "GNU.sparse.realsize":
            e.size = int(value)
        elif key == "uid":
            e.uid = int(value)
        elif key == "gid":
            e.gid = int(value)
        elif key == "mtime":
            e.mtime = float(value)
        elif key == "GNU.sparse.name":
            e.name = value
    e.pax_headers = headers


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


# -- the stream ------------------------------------------------------------------------


class ForwardReader:
    """``read`` and forward skips over a stream, without a copy of the stream's
    pieces for each read: the last piece and an index into it. A seekable file is
    seeked over what is skipped rather than read."""

    def __init__(self, raw: Any, bufsize: int) -> None:
        self.raw = raw
        self.bufsize = bufsize
        self.buf = b""
        self.at = 0  # in buf
        self.pos = 0  # in the stream
        self.seekable = False
        if isinstance(raw, io.IOBase) and raw.seekable():
            self.seekable = True
            self.pos = raw.tell()

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

    def skip_to(self, pos: int) -> bool:
        """Forward to *pos*; False when the stream ends before it (then at its end)."""
        if pos < self.pos:
            raise ValueError("a tar stream is read forward only")
        skip = pos - self.pos
        if skip <= len(self.buf) - self.at:
            self.at += skip
            self.pos = pos
            return True
        if self.seekable:  # the last byte before pos is there: pos is not past the end
            self.buf, self.at = b"", 0
            self.raw.seek(pos - 1)
            self.pos = pos - 1
            return len(self.read(1)) == 1
        while skip > len(self.buf) - self.at:  # past this piece: the next one
            skip -= len(self.buf) - self.at
            self.pos = pos - skip
            self.buf, self.at = self.raw.read(self.bufsize), 0
            if not self.buf:
                return False
        self.at += skip
        self.pos = pos
        return True


class TarReader:
    """The entries of an uncompressed tar stream, read once from start to end, each
    forgotten once the next is read.

    Iterating gives an ``Entry`` for each member; its data (``read_data``, or
    ``read_exact`` after ``skip_to(entry.offset_data)``) is to be read before the
    next entry is asked for: what is not read is skipped."""

    def __init__(self, stream: Any, bufsize: int) -> None:
        self.stream = ForwardReader(stream, bufsize)
        self.start = self.stream.pos
        self.offset = self.start  # of the next header
        self.globals: dict[str, str] = {}  # PAX global records: replaced, never changed

    def __iter__(self) -> Iterator[Entry]:
        while (e := self.next()) is not None:
            yield e

    def next(self) -> Entry | None:
        """The next entry, or None at the end of the archive."""
        if self.stream.pos != self.offset and not self.stream.skip_to(self.offset):
            raise Truncated
        try:
            return self._member(0)
        except _End:
            return None

    # -- the data ------------------------------------------------------------------

    def read_exact(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise Truncated
        return data

    def read_data(self, e: Entry) -> bytes:
        """The whole data of the (not sparse) regular file *e*."""
        if self.stream.pos != e.offset_data and not self.stream.skip_to(e.offset_data):
            raise Truncated
        return self.read_exact(e.size)

    def skip_to(self, pos: int) -> None:
        if not self.stream.skip_to(pos):
            raise Truncated

    # -- the headers ---------------------------------------------------------------

    def _block(self, depth: int) -> bytes:
        buf = self.stream.read(BLOCK)
        if len(buf) == BLOCK:
            if buf == _ZEROS:
                if depth:
                    raise _Bad("end of file header")
                raise _End
            return buf
        first = depth == 0 and self.offset == self.start
        if depth == 0 and not first and not buf.strip(b"\0"):
            raise _End  # zero blocks cut short, or none at all
        if first:
            raise NotATar("empty file" if not buf else "truncated header")
        if buf:
            raise TarFormatError("the archive ends inside a header")
        raise _Bad("empty header")

    def _member(self, depth: int) -> Entry:
        """The entry whose first header starts here (*depth* extended headers before
        it in its chain)."""
        start = self.stream.pos
        buf = self._block(depth)
        try:
            e = parse_header(buf)
            sparse = _gnu_sparse(buf) if e.type == GNU_SPARSE else None
        except _Bad as err:
            if depth:
                raise
            if start == self.start:
                raise NotATar(str(err)) from None
            raise TarFormatError("invalid tar header") from None
        e.offset = start
        t = e.type
        if t in _PAX_TYPES:
            return self._pax(e, depth)
        if t in (GNU_LONGNAME, GNU_LONGLINK):
            return self._gnulong(e, depth)
        if e.size < 0:
            raise TarFormatError(f"negative size in the header of {e.name!r}")
        if sparse is not None:
            self._old_gnu_sparse(e, *sparse)
        else:
            e.offset_data = data = self.stream.pos
            self.offset = data if t in _NO_DATA else data + _blocks(e.size)
        if self.globals:
            _apply_pax(e, self.globals)
            if t == DIRTYPE:
                e.name = e.name.rstrip("/")
        return e

    def _next(self, e: Entry, depth: int) -> Entry:
        """The entry an extended header belongs to."""
        if depth + 1 >= MAX_CHAIN:
            raise TarFormatError(f"more than {MAX_CHAIN} extended headers in a row")
        try:
            nxt = self._member(depth + 1)
        except _Bad as err:
            raise TarFormatError(
                f"an extended header without a valid entry after it ({err})"
            ) from None
        nxt.offset = e.offset
        return nxt

    def _special(self, e: Entry) -> bytes:
        """The data of an extended header, refused before it is read when too large."""
        if not 0 <= e.size <= MAX_HEADER:
            kind = "PAX" if e.type in _PAX_TYPES else "GNU long-name"
            raise TarFormatError(f"a {kind} header of {e.size} bytes (at most {MAX_HEADER})")
        buf = self.stream.read(_blocks(e.size))
        if len(buf) < e.size:
            raise TarFormatError("the archive ends inside a header")
        return buf[: e.size]

    def _gnulong(self, e: Entry, depth: int) -> Entry:
        """A GNU long name or long link target: the next header's name or target."""
        text = _text(self._special(e))
        nxt = self._next(e, depth)
        if e.type == GNU_LONGNAME:
            nxt.name = text.removesuffix("/") if nxt.type == DIRTYPE else text
        else:
            nxt.linkname = text
        return nxt

    def _old_gnu_sparse(
        self, e: Entry, regions: list[tuple[int, int]], extended: bool, real_size: int
    ) -> None:
        """A sparse file in the old GNU format: up to 4 regions in the header, 21 more
        in each extension block after it."""
        if real_size < 0:
            raise TarFormatError(f"negative size in the header of {e.name!r}")
        while extended:
            if len(regions) > MAX_SPARSE:
                raise TarFormatError(f"a sparse file of more than {MAX_SPARSE} regions")
            buf = self.stream.read(BLOCK)
            if len(buf) < BLOCK:
                raise TarFormatError("the archive ends inside a header")
            for pos in range(0, 21 * 24, 24):
                try:
                    offset, length = number(buf[pos : pos + 12]), number(buf[pos + 12 : pos + 24])
                except _Bad:
                    break
                if length:
                    regions.append((offset, length))
            extended = bool(buf[504])
        _check_regions(regions, real_size, e.size)
        e.sparse = regions
        e.offset_data = self.stream.pos
        self.offset = e.offset_data + _blocks(e.size)
        e.size = real_size

    def _pax(self, e: Entry, depth: int) -> Entry:
        """A PAX extended header (for the next entry) or global one (for every entry
        after it), parsed here in linear time; then the entry it describes."""
        records = parse_pax(self._special(e))
        is_global = e.type == PAX_GLOBAL
        headers = dict(self.globals)  # a new dict: entries share the old one
        offsets: list[int] = []
        numbytes: list[int] = []
        for raw_key, raw_value in records:
            key = raw_key.decode(ENCODING, "surrogateescape")
            value = raw_value.decode(ENCODING, "surrogateescape")
            if is_global and (key == "size" or key.startswith("GNU.sparse.")):
                raise TarFormatError(f"a global PAX header sets {key!r}")
            _check_pax_value(key, value)
            if key == "GNU.sparse.offset":
                offsets.append(int(value))
            elif key == "GNU.sparse.numbytes":
                numbytes.append(int(value))
            headers[key] = value
        if is_global:
            if (
                len(headers) > MAX_GLOBAL_KEYS
                or sum(len(k) + len(v) for k, v in headers.items()) > MAX_GLOBAL
            ):
                raise TarFormatError(f"PAX global headers of more than {MAX_GLOBAL} bytes")
            self.globals = headers
            return self._next(e, depth)  # read with the new global records already

        nxt = self._next(e, depth)
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
            regions, map_size = self._sparse_map_10(stored)
            nxt.offset_data = data_start + map_size
        _apply_pax(nxt, headers)
        if nxt.type == DIRTYPE:
            nxt.name = nxt.name.rstrip("/")
        if regions is not None:
            real = headers.get("GNU.sparse.realsize") or headers.get("GNU.sparse.size")
            nxt.size = int(real) if real is not None else stored
            regions = [(o, n) for o, n in regions if n]
            _check_regions(regions, nxt.size, stored - map_size)
            nxt.sparse = regions
        if "size" in headers and nxt.type not in _NO_DATA:
            self.offset = data_start + _blocks(stored)
        return nxt

    def _sparse_map_10(self, stored: int) -> tuple[list[tuple[int, int]], int]:
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
                block = self.stream.read(BLOCK)
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


def _gnu_sparse(buf: bytes) -> tuple[list[tuple[int, int]], bool, int]:
    """The old GNU sparse header's own fields: its first regions, whether extension
    blocks follow, the file's real size."""
    regions: list[tuple[int, int]] = []
    for pos in range(386, 386 + 4 * 24, 24):
        try:
            offset, length = number(buf[pos : pos + 12]), number(buf[pos + 12 : pos + 24])
        except _Bad:
            break
        if length:
            regions.append((offset, length))
    return regions, bool(buf[482]), number(buf[483:495])


# -- random access ---------------------------------------------------------------------


class Archive:
    """An uncompressed tar file for random access (an image archive): its members
    (at most ``MAX_MEMBERS``) read up front, seeking over their data."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            reader = TarReader(self.file, 64 << 10)
            self.members: list[Entry] = []
            for e in reader:
                self.members.append(e)
                if len(self.members) > MAX_MEMBERS:
                    raise TarFormatError(f"more than {MAX_MEMBERS} members")
        except BaseException:
            self.file.close()
            raise

    def getmembers(self) -> list[Entry]:
        return self.members

    def extractfile(self, e: Entry) -> BinaryIO:
        """The data of the regular (not sparse) member *e*, read in place."""
        if not e.isreg() or e.sparse is not None:
            raise TarFormatError(f"{e.name!r} is not a plain regular file")
        return io.BufferedReader(_Region(self.file.fileno(), e.offset_data, e.size))

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Region(io.RawIOBase):
    """Bytes *start* to *start* + *size* of a file, read with ``pread`` (so regions of
    one file can be read at once); the file ending early is an error."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self.fd = fd
        self.pos = start
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left)
        if n <= 0:
            return 0
        data = os.pread(self.fd, n, self.pos)
        if not data:
            raise Truncated
        b[: len(data)] = data
        self.pos += len(data)
        self.left -= len(data)
        return len(data)


def open_archive(path: str) -> Archive:
    """An uncompressed tar file for random access (see ``Archive``)."""
    return Archive(path)
