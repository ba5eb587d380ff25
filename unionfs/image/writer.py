"""``commit``: an upper directory written out as an OCI layer tar.

The upper may be in the kernel format or the OCI one (read through
``markers.read_layer_dir``); the layer is always in the OCI format: a whiteout
becomes an empty ``.wh.NAME`` file, an opaque directory gets a
``.wh..wh..opq`` entry right after its own. Entries are sorted, owners are
numeric, hard links inside the layer stay hard links, every xattr but the
overlay's own goes in as a PAX ``SCHILY.xattr.*`` record, and with
``source_date_epoch`` no mtime is later than it: the same upper always gives
the same bytes. With lower layers given, whiteouts and opaque markers that
hide nothing there are left out.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from unionfs.image.diff import LowerView, open_upper
from unionfs.image.digest import Digest, ImageError
from unionfs.overlay import markers
from unionfs.overlay.nodes import Node
from unionfs.overlay.syscalls import fd_path
from unionfs.overlay.union import join

log = logging.getLogger(__name__)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
COMPRESSIONS = ("gzip", "zstd", "none")


@dataclass
class Written:
    diff_id: Digest  # of the uncompressed tar
    digest: Digest  # of the file as written
    size: int  # of the file
    compression: str
    entries: int


def compression_for(path: str) -> str:
    """The compression a layer file's name asks for: ``.gz``/``.tgz``, ``.zst``, or none."""
    if path.endswith((".gz", ".tgz")):
        return "gzip"
    if path.endswith((".zst", ".zstd")):
        return "zstd"
    return "none"


class _Sink:
    """Counts and hashes what passes to *out*."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.count += len(data)
        self.out.write(data)
        return len(data)

    def digest(self) -> Digest:
        return Digest("sha256", self.hash.hexdigest())


class _Compressor:
    """The uncompressed tar goes in (and is hashed for the diff_id); compressed bytes
    go to *sink*. gzip has no timestamp or name in its header, so it is reproducible."""

    def __init__(self, sink: _Sink, compression: str) -> None:
        self.sink = sink
        self.tar_hash = hashlib.sha256()
        self.zstd: Any = None
        self.gzip: Any = None
        if compression == "gzip":
            self.gzip = zlib.compressobj(6, zlib.DEFLATED, 31)
        elif compression == "zstd":
            import zstandard

            self.zstd = zstandard.ZstdCompressor(level=3).stream_writer(
                sink,  # type: ignore[arg-type]
                closefd=False,
            )

    def write(self, data: bytes) -> int:
        self.tar_hash.update(data)
        if self.gzip is not None:
            self.sink.write(self.gzip.compress(data))
        elif self.zstd is not None:
            self.zstd.write(data)
        else:
            self.sink.write(data)
        return len(data)

    def finish(self) -> Digest:
        if self.gzip is not None:
            self.sink.write(self.gzip.flush())
        elif self.zstd is not None:
            self.zstd.close()
        return Digest("sha256", self.tar_hash.hexdigest())


def _inside(directory: Path, upper: Path) -> bool:
    """Whether *directory* is *upper* or below it, however either is named
    (symlinks, bind mounts): its real path's directories compared by inode."""
    try:
        top = os.stat(upper)
        here = os.path.realpath(directory)
    except OSError:
        return False  # the error comes when the upper or the output is opened
    while True:
        try:
            st = os.stat(here)
        except OSError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == (top.st_dev, top.st_ino):
            return True
        parent = os.path.dirname(here)
        if parent == here:
            return False
        here = parent


def write_layer(
    upper: Path,
    output: Path,
    lowers: list[Path] | None = None,
    compression: str | None = None,
    source_date_epoch: int | None = None,
) -> Written:
    """Write *upper* as a layer tar to *output* (atomically: a temporary file renamed
    into place when complete)."""
    compression = compression or compression_for(os.fspath(output))
    if _inside(output.parent, upper):
        raise ImageError(f"{output}: inside the upper {upper}, it would be part of the layer")
    fd = open_upper(upper)
    tmp_fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
    try:
        with os.fdopen(tmp_fd, "wb") as f:
            sink = _Sink(f)
            comp = _Compressor(sink, compression)
            with LowerView(lowers or []) as view:
                walker = _LayerWriter(comp, view, source_date_epoch)  # type: ignore[arg-type]
                walker.dir(fd, b"", view.root)
                walker.close()
            diff_id = comp.finish()
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return Written(diff_id, sink.digest(), sink.count, compression, walker.count)


class _LayerWriter:
    def __init__(self, out: BinaryIO, view: LowerView, epoch: int | None) -> None:
        self.tf = tarfile.open(  # noqa: SIM115 - closed by close()
            fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8"
        )
        self.view = view
        self.epoch = epoch
        self.links: dict[tuple[int, int], str] = {}  # inode -> first name in the layer
        self.count = 0

    def close(self) -> None:
        self.tf.close()

    def mtime(self, st: os.stat_result) -> int:
        t = int(st.st_mtime)
        return min(t, self.epoch) if self.epoch is not None else t

    def dir(self, fd: int, path: bytes, old: Node | None) -> None:
        d = markers.read_layer_dir(fd)
        # A marker matters only for what the lowers have; without lowers given, all stay.
        known = self.view.root is not None
        if d.opaque and path and (not known or old is not None):
            self.marker(join(path, markers.OCI_OPAQUE), os.fstat(fd))
        below = None if d.opaque else old  # what the lowers merge into this directory
        # Sorted by the names as written: a whiteout sorts as its .wh. name.
        listed = [(markers.oci_whiteout_name(n), n, True) for n in d.deleted]
        listed += [(n, n, False) for n in d.names]
        for written, name, whiteout in sorted(listed):
            p = join(path, name)
            if whiteout:
                if not known or self.view.entry(below, name) is not None:
                    self.marker(join(path, written), os.fstat(fd))
                continue
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            self.entry(fd, name, p, st)
            if stat.S_ISDIR(st.st_mode):
                was = self.view.entry(below, name)
                child_old = self.view.directory(below, was) if was and below else None
                child = os.open(name, _DIR, dir_fd=fd)
                try:
                    self.dir(child, p, child_old)
                finally:
                    os.close(child)

    def marker(self, path: bytes, dir_st: os.stat_result) -> None:
        ti = tarfile.TarInfo(os.fsdecode(path))
        ti.type = tarfile.REGTYPE
        ti.mode = 0o644
        ti.mtime = self.mtime(dir_st)
        ti.uname = ti.gname = ""
        self.tf.addfile(ti)
        self.count += 1

    def entry(self, dirfd: int, name: bytes, path: bytes, st: os.stat_result) -> None:
        ti = tarfile.TarInfo(os.fsdecode(path))
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.uname = ti.gname = ""
        ti.mtime = self.mtime(st)
        mode = st.st_mode
        data: BinaryIO | None = None
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(mode) and st.st_nlink > 1 and key in self.links:
            ti.type = tarfile.LNKTYPE
            ti.linkname = self.links[key]
        elif stat.S_ISREG(mode):
            ti.type = tarfile.REGTYPE
            ti.size = st.st_size
            data = _open_file(dirfd, name)
        elif stat.S_ISDIR(mode):
            ti.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            ti.type = tarfile.SYMTYPE
            ti.linkname = os.fsdecode(os.readlink(name, dir_fd=dirfd))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            ti.type = tarfile.FIFOTYPE
        else:
            log.warning("%s: a socket cannot go in a layer: left out", os.fsdecode(path))
            return
        if not stat.S_ISDIR(mode) and st.st_nlink > 1 and key not in self.links:
            self.links[key] = ti.name
        ti.pax_headers = _xattrs(fd_path(dirfd, name), path)
        try:
            self.tf.addfile(ti, data)
        except OSError as e:
            raise ImageError(
                f"{os.fsdecode(path)}: {e.strerror or e} (changed while committing?)"
            ) from None
        finally:
            if data is not None:
                data.close()
        self.count += 1


def _open_file(dirfd: int, name: bytes) -> BinaryIO:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags | os.O_NOATIME, dir_fd=dirfd)
    except PermissionError:
        fd = os.open(name, flags, dir_fd=dirfd)
    return io.FileIO(fd, "rb")


_UNSUPPORTED = (b"redirect", b"metacopy")  # kernel features whose data is elsewhere


def _xattrs(path: bytes, shown: bytes) -> dict[str, str]:
    """Every xattr but the overlay's own, as PAX records (binary values kept byte for byte).

    An upper written by a kernel overlay with ``redirect_dir`` or ``metacopy`` on
    keeps a renamed directory's or a copied-up file's contents in the lower
    layers: such an upper cannot become a layer on its own, and is refused."""
    out: dict[str, str] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in sorted(names):
        raw = os.fsencode(name)
        if markers.is_private_xattr(raw):
            if raw.rpartition(b".")[2] in _UNSUPPORTED:
                raise ImageError(
                    f"{os.fsdecode(shown)}: has {name} (an upper written with the kernel's "
                    "redirect_dir or metacopy on): its data is in the lower layers"
                )
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        out["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
    return out
