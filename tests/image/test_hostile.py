"""The hostile-input corpus: layer tars that must be refused, each with the one line
that says why, and nothing written outside the target directory.

Every case runs through the same path as ``image mount`` (``unpack_blob``: the
decompressor, both digests, the tar reader, the entry checks) on plain
directories; the last test runs one through the command line.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.image.builders import (
    END,
    Tar,
    pax_header,
    pax_record,
    raw_file,
    raw_header,
)
from tests.mounting import REPO, unionfs_command
from unionfs.image.cache import unpack_blob
from unionfs.image.digest import ImageError
from unionfs.image.unpack import Limits

L = "evil"  # the layer's label in every message


def _gnu_sparse(size: int) -> bytes:
    """A GNU sparse member claiming *size* bytes, with one byte of data (made by GNU tar)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        f = Path(d, "sparse")
        with open(f, "wb") as fh:
            fh.truncate(size)
            fh.seek(size - 1)
            fh.write(b"x")
        out = Path(d, "t.tar")
        subprocess.run(
            ["tar", "--sparse", "--format=gnu", "-cf", os.fspath(out), "-C", d, "sparse"],
            check=True,
        )
        return out.read_bytes()


def _zeros_after_end(n: int) -> bytes:
    """A valid small tar followed by *n* zero bytes, gzip-compressed: tiny on the
    wire, huge when expanded (a decompression bomb that no header announces)."""
    return gzip.compress(Tar().file("a", b"x").bytes() + bytes(n), mtime=0)


def _truncated() -> bytes:
    data = Tar().file("big", b"y" * 5000).bytes()
    return data[:1024]


def _bad_gzip() -> bytes:
    blob = gzip.compress(Tar().file("a", b"x" * 1000).bytes(), mtime=0)
    return blob[:20] + bytes(20) + blob[40:]


# name -> (blob, limits, root, expected error line)
Case = tuple[Callable[[], bytes], Limits | None, bool, str]
CASES: dict[str, Case] = {
    "absolute name": (
        lambda: Tar().file("/etc/evil", b"x").bytes(),
        None,
        True,
        f"layer {L}: entry '/etc/evil': absolute path: refused",
    ),
    "dot-dot": (
        lambda: Tar().file("../escape", b"x").bytes(),
        None,
        True,
        f"layer {L}: entry '../escape': path leaves the layer through '..'",
    ),
    "dot-dot inside": (
        lambda: Tar().dir("a").file("a/../../escape", b"x").bytes(),
        None,
        True,
        f"layer {L}: entry 'a/../../escape': path leaves the layer through '..'",
    ),
    "through a planted symlink": (
        lambda: Tar().symlink("etc", "/etc").file("etc/evil", b"x").bytes(),
        None,
        True,
        f"layer {L}: entry 'etc/evil': 'etc' on the way is a symlink",
    ),
    "through a planted relative symlink": (
        lambda: Tar().symlink("up", "..").file("up/escape", b"x").bytes(),
        None,
        True,
        f"layer {L}: entry 'up/escape': 'up' on the way is a symlink",
    ),
    "through a planted symlink, deeper": (
        lambda: Tar().dir("a").symlink("a/b", "/tmp").file("a/b/c/evil", b"x").bytes(),
        None,
        True,
        f"layer {L}: entry 'a/b/c/evil': 'a/b' on the way is a symlink",
    ),
    "hard link to an absolute path": (
        lambda: Tar().hardlink("passwd", "/etc/passwd").bytes(),
        None,
        True,
        f"layer {L}: entry 'passwd': absolute hard link target: refused",
    ),
    "hard link out through dot-dot": (
        lambda: Tar().hardlink("passwd", "../../etc/passwd").bytes(),
        None,
        True,
        f"layer {L}: entry 'passwd': hard link target leaves the layer through '..'",
    ),
    "hard link through a planted symlink": (
        lambda: Tar().symlink("etc", "/etc").hardlink("passwd", "etc/passwd").bytes(),
        None,
        True,
        f"layer {L}: entry 'passwd': hard link to 'etc/passwd', which is not earlier in this layer",
    ),
    "hard link to nothing": (
        lambda: Tar().hardlink("h", "missing").bytes(),
        None,
        True,
        f"layer {L}: entry 'h': hard link to 'missing', which is not earlier in this layer",
    ),
    "hard link to a directory": (
        lambda: Tar().dir("d").hardlink("h", "d").bytes(),
        None,
        True,
        f"layer {L}: entry 'h': hard link to the directory 'd'",
    ),
    "hard link to a whiteout": (
        lambda: Tar().whiteout("gone").hardlink("h", "gone").bytes(),
        None,
        True,
        f"layer {L}: entry 'h': hard link to 'gone', which is not a file of this layer",
    ),
    "file below a file": (
        lambda: Tar().file("f", b"x").file("f/g", b"y").bytes(),
        None,
        True,
        f"layer {L}: entry 'f/g': 'f' on the way is not a directory",
    ),
    "char device 0/0": (
        lambda: Tar().device("x", tarfile.CHRTYPE, 0, 0).bytes(),
        None,
        True,
        f"layer {L}: entry 'x': a character device 0/0 is a kernel whiteout; "
        "layers mark deletions with .wh. files",
    ),
    "overlay xattr": (
        lambda: Tar().dir("d", xattrs={"trusted.overlay.redirect": b"/etc"}).bytes(),
        None,
        True,
        f"layer {L}: entry 'd': the overlay's own xattr 'trusted.overlay.redirect' is not allowed",
    ),
    "user overlay xattr": (
        lambda: Tar().file("f", xattrs={"user.overlay.opaque": b"y"}).bytes(),
        None,
        True,
        f"layer {L}: entry 'f': the overlay's own xattr 'user.overlay.opaque' is not allowed",
    ),
    "whiteout of nothing": (
        lambda: Tar().file("a/.wh.").bytes(),
        None,
        True,
        f"layer {L}: entry 'a/.wh.': whiteout of no name",
    ),
    "whiteout of dot-dot": (
        lambda: Tar().dir("a").file("a/.wh...").bytes(),
        None,
        True,
        f"layer {L}: entry 'a/.wh...': whiteout of no name",
    ),
    "name too long": (
        lambda: Tar().file("d/" + "n" * 300, b"x").bytes(),
        None,
        True,
        f"layer {L}: entry 'd/{'n' * 300}': path too long",
    ),
    "unsupported type": (
        lambda: Tar().raw("label", b"V").bytes(),
        None,
        True,
        f"layer {L}: entry 'label': unsupported entry type b'V'",
    ),
    "too many entries": (
        lambda: _many(20),
        Limits(max_entries=10),
        True,
        f"layer {L}: entry 'f10': more than 10 entries",
    ),
    "files too big": (
        lambda: Tar().file("a", b"x" * 600).file("b", b"y" * 600).bytes(),
        Limits(max_bytes=1000),
        True,
        f"layer {L}: entry 'b': the layer's files add up to more than 1000 bytes",
    ),
    "huge sparse claim": (
        lambda: _gnu_sparse(1 << 40),
        None,
        True,
        f"layer {L}: entry 'sparse': the layer's files add up to more than 68719476736 bytes",
    ),
    "decompression bomb": (
        lambda: _zeros_after_end(8 << 20),
        Limits(max_bytes=1 << 20),
        True,
        f"layer {L}: expands to more than {(1 << 20) + (1 << 20)} bytes",
    ),
    "truncated tar": (
        _truncated,
        None,
        True,
        f"layer {L}: the tar archive is truncated",
    ),
    # Entries are made in a second thread while the next ones are read: an entry
    # refused there is still the error, not what is wrong after it in the archive.
    "refused entry, then a truncated tar": (
        lambda: raw_file(b"/etc/evil", b"x") + _truncated(),
        None,
        True,
        f"layer {L}: entry '/etc/evil': absolute path: refused",
    ),
    # A small file's data and metadata are written in a third thread: its error is
    # still the one raised, before a later entry's.
    "xattr the kernel refuses, then a refused entry": (
        lambda: (
            Tar()
            .file("ok", b"1")
            .file("b", b"2", xattrs={"user.big": b"v" * 70_000})
            .file("/etc/evil", b"x")
            .bytes()
        ),
        None,
        True,
        f"layer {L}: entry 'b': cannot set xattr 'user.big': Argument list too long",
    ),
    "not a tar": (
        lambda: b"this is not a tar archive at all\n" * 40,
        None,
        True,
        f"layer {L}: not a valid tar archive: invalid header",
    ),
    "empty blob": (
        lambda: b"",
        None,
        True,
        f"layer {L}: not a tar archive (empty)",
    ),
    # -- tarfile's own weak points (tarreader bounds them) ---------------------------
    "PAX header of a million digits (quadratic regex on some Pythons)": (
        lambda: pax_header(b"0" * 1_000_000) + raw_file(b"f") + END,
        None,
        True,
        f"layer {L}: a malformed PAX record (no length) before the first entry",
    ),
    "GNU sparse 0.0 record of a million digits": (
        lambda: pax_header(b"1 GNU.sparse.size=1\n" + b"0" * 1_000_000) + raw_file(b"f") + END,
        None,
        True,
        f"layer {L}: a malformed PAX record (bad length) before the first entry",
    ),
    "PAX header claiming 3 GiB": (
        lambda: raw_header(b"././@PaxHeader", 3 << 30, b"x") + END,
        None,
        True,
        f"layer {L}: a PAX header of 3221225472 bytes (at most 1048576) before the first entry",
    ),
    "global PAX header claiming 3 GiB": (
        lambda: raw_file(b"ok") + raw_header(b"././@PaxHeader", 3 << 30, b"g") + END,
        None,
        True,
        f"layer {L}: a PAX header of 3221225472 bytes (at most 1048576) after entry 'ok'",
    ),
    "GNU long name claiming 3 GiB": (
        lambda: raw_header(b"././@LongLink", 3 << 30, b"L") + END,
        None,
        True,
        f"layer {L}: a GNU long-name header of 3221225472 bytes (at most 1048576) "
        "before the first entry",
    ),
    "negative size": (
        lambda: (
            raw_file(b"ok", b"1")
            + raw_header(b"a", size_field=b"\xff" * 4 + (-(1 << 40) % (1 << 64)).to_bytes(8, "big"))
            + END
        ),
        None,
        True,
        f"layer {L}: negative size in the header of 'a' after entry 'ok'",
    ),
    "negative PAX size": (
        lambda: pax_header(pax_record(b"size", b"-4096")) + raw_file(b"f") + END,
        None,
        True,
        f"layer {L}: PAX size='-4096': not a number before the first entry",
    ),
    "corrupt header in the middle": (
        lambda: raw_file(b"first", b"1") + b"\x01" * 512 + raw_file(b"second", b"2") + END,
        None,
        True,
        f"layer {L}: invalid tar header after entry 'first'",
    ),
    "ends inside a header": (
        lambda: raw_file(b"first", b"1") + raw_header(b"second")[:300],
        None,
        True,
        f"layer {L}: the archive ends inside a header after entry 'first'",
    ),
    "extended header with no entry after it": (
        lambda: raw_file(b"first", b"1") + pax_header(pax_record(b"path", b"x")) + END,
        None,
        True,
        f"layer {L}: an extended header without a valid entry after it (end of file header) "
        "after entry 'first'",
    ),
    "extended headers without end": (
        lambda: pax_header(pax_record(b"comment", b"c")) * 9 + raw_file(b"f") + END,
        None,
        True,
        f"layer {L}: more than 8 extended headers in a row before the first entry",
    ),
    "PAX record of a wrong length": (
        lambda: pax_header(b"99 path=x\n") + raw_file(b"f") + END,
        None,
        True,
        f"layer {L}: a malformed PAX record (bad length) before the first entry",
    ),
    "PAX record without a keyword": (
        lambda: pax_header(pax_record(b"", b"x")) + raw_file(b"f") + END,
        None,
        True,
        f"layer {L}: a malformed PAX record (no keyword) before the first entry",
    ),
    "PAX mtime that is not a time": (
        lambda: pax_header(pax_record(b"mtime", b"nan")) + raw_file(b"f") + END,
        None,
        True,
        f"layer {L}: PAX mtime='nan': not a time before the first entry",
    ),
    "global PAX header setting the size": (
        lambda: pax_header(pax_record(b"size", b"10"), b"g") + raw_file(b"f") + END,
        None,
        True,
        f"layer {L}: a global PAX header sets 'size' before the first entry",
    ),
    "sparse 1.0 map of garbage": (
        lambda: (
            pax_header(
                pax_record(b"GNU.sparse.major", b"1")
                + pax_record(b"GNU.sparse.minor", b"0")
                + pax_record(b"GNU.sparse.name", b"s")
                + pax_record(b"GNU.sparse.realsize", b"100")
            )
            + raw_file(b"s", b"zz\n".ljust(512, b"\0"))
            + END
        ),
        None,
        True,
        f"layer {L}: a malformed sparse map before the first entry",
    ),
    "sparse 0.1 map of garbage": (
        lambda: (
            Tar()
            .file("f", b"1", pax_headers={"GNU.sparse.map": "0,zz", "GNU.sparse.size": "10"})
            .bytes()
        ),
        None,
        True,
        f"layer {L}: a malformed sparse map before the first entry",
    ),
    "sparse region far past the end of its file": (
        lambda: (
            pax_header(
                pax_record(b"GNU.sparse.map", b"4611686018427387904,1")
                + pax_record(b"GNU.sparse.size", b"10")
                + pax_record(b"GNU.sparse.name", b"s")
            )
            + raw_file(b"s", b"x")
            + END
        ),
        None,
        True,
        f"layer {L}: a sparse map that does not fit its file before the first entry",
    ),
    "sparse map claiming more data than stored": (
        lambda: (
            pax_header(
                pax_record(b"GNU.sparse.map", b"0,4096")
                + pax_record(b"GNU.sparse.size", b"8192")
                + pax_record(b"GNU.sparse.name", b"s")
            )
            + raw_file(b"s", b"x")
            + END
        ),
        None,
        True,
        f"layer {L}: a sparse map larger than the data stored before the first entry",
    ),
    # -- header values the unpacker cannot apply ------------------------------------
    "mtime out of range": (
        lambda: Tar().dir("d", pax_headers={"mtime": "1e20"}).bytes(),
        None,
        True,
        f"layer {L}: entry 'd': mtime 1e+20 out of range",
    ),
    "owner out of range": (
        lambda: Tar().dir("d", pax_headers={"uid": "99999999999999"}).bytes(),
        None,
        True,
        f"layer {L}: entry 'd': owner 99999999999999:0 out of range",
    ),
    # -- names that mean one thing to unionfs and another to the kernel -------------
    "entry below a whiteout's name": (
        lambda: Tar().file(".wh.foo/bar", b"1").bytes(),
        None,
        True,
        f"layer {L}: entry '.wh.foo/bar': '.wh.foo' on the way is a whiteout's name",
    ),
    "entry below the opaque marker": (
        lambda: Tar().dir("a").file("a/.wh..wh..opq/x", b"1").bytes(),
        None,
        True,
        f"layer {L}: entry 'a/.wh..wh..opq/x': 'a/.wh..wh..opq' on the way is a whiteout's name",
    ),
    "hard link to a whiteout file": (
        lambda: Tar().file("x", b"1").whiteout("x").hardlink("h", ".wh.x").bytes(),
        None,
        True,
        f"layer {L}: entry 'h': hard link to '.wh.x', which is not a file of this layer",
    ),
    "corrupt gzip": (
        _bad_gzip,
        None,
        True,
        f"layer {L}: corrupt gzip data: Error -3 while decompressing data: invalid code -- missing end-of-block",
    ),
}


def _many(n: int) -> bytes:
    t = Tar()
    for i in range(n):
        t.file(f"f{i}", b"")
    return t.bytes()


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_layer_is_refused_with_one_line(case: str, tmp_path: Path) -> None:
    make, limits, root, expected = CASES[case]
    if root and os.geteuid() != 0:
        pytest.fail("the corpus runs as root (the suite does): root-only checks come first")
    # The target sits next to things a hostile tar would like to reach.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    target = tmp_path / "layer"
    target.mkdir()
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ImageError) as e:
            unpack_blob(io.BytesIO(make()), fd, L, limits, root=root)
    finally:
        os.close(fd)
    assert str(e.value) == expected
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(outside)) == ["keep"]
    assert sorted(os.listdir(tmp_path)) == ["layer", "outside"]


def test_cli_refusal_is_one_line_and_leaves_no_directory(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(Tar().file("ok", b"1").file("../../escape", b"x").bytes())
    dest = tmp_path / "dest"
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    res = subprocess.run(
        [*unionfs_command(), "layer", "import", os.fspath(bad), os.fspath(dest)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 1
    assert (
        res.stderr
        == "unionfs: layer bad.tar: entry '../../escape': path leaves the layer through '..'\n"
    )
    assert not dest.exists()
    assert sorted(os.listdir(tmp_path)) == ["bad.tar"]  # the temporary directory is gone too
