"""The bounded tar reader (``unionfs.image.tarreader``): what GNU tar writes still
unpacks as ``tar -x`` unpacks it (the extended headers are parsed by our code, not
``tarfile``'s), and what ``tarfile`` alone would do wrong with hostile input does
not happen. The refusals themselves are in the hostile corpus (test_hostile.py)."""

from __future__ import annotations

import gc
import io
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.image.builders import END, Tar, padded, pax_header, pax_record, raw_file, raw_header
from unionfs.image import tarreader
from unionfs.image.unpack import unpack_tar


def _unpack(tar: Path | bytes, dest: Path) -> None:
    dest.mkdir()
    data = tar if isinstance(tar, bytes) else tar.read_bytes()
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        unpack_tar(io.BytesIO(data), fd, "test", root=False)
    finally:
        os.close(fd)


def _tree(top: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every entry below *top*: kind, size, content or symlink target."""
    out: dict[str, tuple[str, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(top)):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.fsdecode(os.path.relpath(full, os.fsencode(top)))
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", 0, b"")
            else:
                with open(full, "rb") as f:
                    out[rel] = ("file", st.st_size, f.read())
    return out


def _source(src: Path) -> None:
    """Files that need every kind of extended header GNU tar writes."""
    src.mkdir()
    deep = src / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / ("f" * 150)).write_bytes(b"long name")
    (src / "link").symlink_to("t" * 200)
    (src / os.fsdecode(b"latin1-\xe9")).write_bytes(b"not utf-8")
    (src / "unicode-é").write_bytes(b"utf-8")
    with open(src / "sparse", "wb") as f:
        f.truncate(3 << 20)
        for offset in (0, 70_000, 1 << 20, (3 << 20) - 3):
            f.seek(offset)
            f.write(b"abc")
    os.link(src / "sparse", src / "hard")
    os.utime(src / "unicode-é", ns=(1_500_000_000_123_456_789, 1_500_000_000_123_456_789))


@pytest.mark.parametrize(
    "flags",
    [
        ["--format=gnu", "--sparse"],
        ["--format=posix", "--sparse", "--sparse-version=0.0"],
        ["--format=posix", "--sparse", "--sparse-version=0.1"],
        ["--format=posix", "--sparse", "--sparse-version=1.0"],
        ["--format=posix"],
    ],
    ids=["gnu-sparse", "posix-sparse-0.0", "posix-sparse-0.1", "posix-sparse-1.0", "posix"],
)
def test_gnu_tar_archives_unpack_as_tar_x_unpacks_them(tmp_path: Path, flags: list[str]) -> None:
    src = tmp_path / "src"
    _source(src)
    tar = tmp_path / "t.tar"
    subprocess.run(["tar", *flags, "-cf", tar, "-C", src, "."], check=True)
    (tmp_path / "x").mkdir()
    subprocess.run(["tar", "-xf", tar, "-C", tmp_path / "x"], check=True)
    _unpack(tar, tmp_path / "u")
    expected = _tree(tmp_path / "x")
    assert len(expected) == 8
    assert _tree(tmp_path / "u") == expected
    u = tmp_path / "u"
    got, want = (os.stat(d / "unicode-é").st_mtime_ns for d in (u, tmp_path / "x"))
    assert abs(got - want) < 1000  # tarfile's times are floats
    assert os.stat(u / "sparse").st_ino == os.stat(u / "hard").st_ino
    if "--sparse" in flags:  # the holes stay holes
        assert os.stat(u / "sparse").st_blocks * 512 < 1 << 20


def test_global_headers_apply_to_the_entries_after_them(tmp_path: Path) -> None:
    data = (
        raw_file(b"before", b"1")
        + pax_header(pax_record(b"mtime", b"1234567890.5"), b"g")
        + raw_file(b"after", b"2")
        + pax_header(pax_record(b"path", b"renamed"))
        + raw_file(b"plain", b"3")
        + END
    )
    _unpack(data, tmp_path / "u")
    assert sorted(os.listdir(tmp_path / "u")) == ["after", "before", "renamed"]
    assert os.stat(tmp_path / "u/after").st_mtime_ns == 1_234_567_890_500_000_000
    assert os.stat(tmp_path / "u/renamed").st_mtime_ns == 1_234_567_890_500_000_000
    assert os.stat(tmp_path / "u/before").st_mtime_ns != 1_234_567_890_500_000_000


def test_a_record_of_a_million_digits_is_read_in_linear_time(tmp_path: Path) -> None:
    """Well formed, so no check of the records' shape can refuse it: ``tarfile``'s
    own parsing (CVE-2024-6232, unpatched before 3.11.10/3.12.6) searches it with a
    backtracking regex for hours; ours reads it once."""
    data = pax_header(pax_record(b"comment", b"7" * 1_000_000)) + raw_file(b"f", b"x") + END
    _unpack(data, tmp_path / "u")
    assert os.listdir(tmp_path / "u") == ["f"]


def test_a_stream_forgets_the_entries_it_has_read(tmp_path: Path) -> None:
    """``tarfile`` keeps every member it has read, even in stream mode: memory in
    proportion to the entries of a layer (and to their PAX headers). Ours keeps
    none: each entry is gone once nothing else holds it."""
    t = Tar()
    for i in range(50):
        t.file(f"forgotten-{i}", b"x", pax_headers={"comment": "c" * 1000})
    reader = tarreader.TarReader(io.BytesIO(t.bytes()), 64 << 10)
    seen = 0
    for e in reader:
        assert e.name == f"forgotten-{seen}"
        live = [
            o
            for o in gc.get_objects()
            if isinstance(o, tarreader.Entry) and o.name.startswith("forgotten-")
        ]
        assert live == [e]  # every earlier one is gone
        del live
        seen += 1
    assert seen == 50


def test_a_docker_archive_of_too_many_members_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    path.write_bytes(b"".join(raw_file(b"f%d" % i) for i in range(10)) + END)
    with tarreader.open_archive(os.fspath(path)) as tf:
        assert len(tf.getmembers()) == 10
    limit = tarreader.MAX_MEMBERS
    try:
        tarreader.MAX_MEMBERS = 5
        with pytest.raises(tarreader.TarFormatError, match="more than 5 members"):
            tarreader.open_archive(os.fspath(path))
    finally:
        tarreader.MAX_MEMBERS = limit


class _Trickle:
    """A stream that gives at most *n* bytes a read, however many are asked for."""

    def __init__(self, data: bytes, n: int) -> None:
        self.data = io.BytesIO(data)
        self.n = n

    def read(self, size: int = -1, /) -> bytes:
        return self.data.read(min(self.n, size) if size >= 0 else self.n)


@pytest.mark.parametrize("seekable", [False, True])
@pytest.mark.parametrize("piece", [1, 7, 512, 1 << 20])
def test_the_forward_reader_reads_and_skips_across_pieces(piece: int, seekable: bool) -> None:
    """Reads of any size across the stream's pieces, forward skips (read over, or
    seeked over in a file), the end where the data ends, no way back."""
    data = bytes(range(256)) * 40  # 10240 bytes
    raw = io.BufferedReader(io.BytesIO(data), piece) if seekable else _Trickle(data, piece)
    r = tarreader.ForwardReader(raw, piece)
    assert r.seekable == seekable
    assert r.read(3) == data[:3] and r.tell() == 3
    assert r.skip_to(1000)
    assert r.read(2000) == data[1000:3000]
    assert r.skip_to(3000)  # where it is already
    with pytest.raises(ValueError):
        r.skip_to(2999)
    assert r.skip_to(10000)
    assert r.read(1000) == data[10000:] and r.tell() == len(data)
    assert r.read(1) == b"" and r.skip_to(len(data))
    assert not r.skip_to(20000)


# -- the header parser's edge cases ------------------------------------------------------


def _with(header: bytes, at: int, field: bytes, signed: bool = False) -> bytes:
    """*header* with *field* written at offset *at*, its checksum made again (the
    signed sum, as some old tars wrote it, with *signed*)."""
    b = bytearray(header)
    b[at : at + len(field)] = field
    b[148:156] = b" " * 8
    total = sum(x - 256 if signed and x >= 128 else x for x in b)
    b[148:156] = b"%06o\0 " % total
    return bytes(b)


def _entries(data: bytes) -> list[tarreader.Entry]:
    return list(tarreader.TarReader(io.BytesIO(data), 4096))


def test_numbers_in_base_256_are_read() -> None:
    """GNU tar writes a number that does not fit its octal field in base-256 (first
    byte 0x80): a size over 8 GiB, a uid over 2**21."""
    h = raw_header(b"big", 5)
    h = _with(h, 108, b"\x80" + (3_000_000).to_bytes(7, "big"))  # uid
    h = _with(h, 124, b"\x80" + (5).to_bytes(11, "big"))  # size
    (e,) = _entries(h + padded(b"hello") + END)
    assert (e.name, e.uid, e.size) == ("big", 3_000_000, 5)
    assert e.offset_data == 512


def test_a_checksum_that_does_not_match_is_refused(tmp_path: Path) -> None:
    bad = bytearray(raw_header(b"a", 1))
    bad[0:1] = b"b"  # the name changed, not the checksum
    with pytest.raises(tarreader.NotATar, match="^bad checksum$"):
        _entries(bytes(bad) + padded(b"x") + END)
    with pytest.raises(tarreader.TarFormatError, match="^invalid tar header$"):
        _entries(raw_file(b"first", b"1") + bytes(bad) + padded(b"x") + END)


def test_a_signed_checksum_is_accepted() -> None:
    name = "caf\xe9".encode("latin-1")  # a byte >= 128: the two sums differ
    h = _with(raw_header(name, 1), 0, name, signed=True)
    (e,) = _entries(h + padded(b"x") + END)
    assert os.fsencode(e.name) == name


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"1000 path=x\n", "bad length"),  # longer than the header's data
        (b"8 path=xy\n", "bad length"),  # ends before its newline
        (b"12345678901234567890123 path=x\n", "no length"),  # more digits than any size
        (b" path=x\n", "no length"),
        (b"9 pathx\n\n", "no keyword"),
    ],
)
def test_pax_records_of_wrong_lengths_are_refused(body: bytes, why: str) -> None:
    with pytest.raises(tarreader.TarFormatError, match=f"^a malformed PAX record \\({why}\\)$"):
        _entries(pax_header(body) + raw_file(b"f") + END)


def test_gnu_long_names_and_link_targets() -> None:
    name = b"d/" + b"n" * 200
    target = b"t" * 300
    data = (
        raw_header(b"././@LongLink", len(name) + 1, b"L")
        + padded(name + b"\0")
        + raw_header(b"d/nnnn", 3)
        + padded(b"abc")
        + raw_header(b"././@LongLink", len(target), b"K")
        + padded(target)
        + raw_header(b"link", 0, b"2")
        + raw_header(b"././@LongLink", 6, b"L")
        + padded(b"dir/x/")
        + raw_header(b"dir/", 0, b"5")
        + END
    )
    f, link, d = _entries(data)
    assert (os.fsencode(f.name), f.size, f.offset) == (name, 3, 0)
    assert (link.name, os.fsencode(link.linkname)) == ("link", target)
    assert (d.name, d.isdir()) == ("dir/x", True)


def test_ustar_prefix_and_old_directories() -> None:
    """A ustar name is its prefix field, a slash, and its name field; a GNU header
    keeps other fields there. An old tar writes a directory as a file named with a
    trailing slash."""
    prefixed = _with(raw_header(b"name", 0), 345, b"some/prefix")
    gnu = _with(_with(raw_header(b"gnu", 0), 257, b"ustar  \0"), 345, b"00000000001\0")
    old_dir = raw_header(b"olddir/", 0, b"\0")
    a, b, c = _entries(prefixed + gnu + old_dir + END)
    assert a.name == "some/prefix/name"
    assert b.name == "gnu"
    assert (c.name, c.isdir()) == ("olddir", True)


def test_a_stream_ending_inside_data_or_a_header_is_refused(tmp_path: Path) -> None:
    """The data of an entry nobody reads is skipped: a stream that ends inside it is
    truncated all the same; one that ends inside the next header too."""
    data = raw_file(b"a", b"x" * 5000) + raw_file(b"b", b"y") + END
    reader = tarreader.TarReader(io.BytesIO(data[:3000]), 512)
    assert next(iter(reader)).name == "a"
    with pytest.raises(tarreader.Truncated):
        reader.next()
    reader = tarreader.TarReader(io.BytesIO(data[: 512 + 5120 + 100]), 512)
    assert reader.next() is not None
    with pytest.raises(tarreader.TarFormatError, match="^the archive ends inside a header$"):
        reader.next()
    # where a header would start, the end is the end (no zero blocks at all)
    assert [e.name for e in _entries(data[: 512 + 5120 + 1024])] == ["a", "b"]
