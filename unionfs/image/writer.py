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

An upper the kernel wrote with ``redirect_dir=on`` or ``metacopy=on`` keeps part
of what it shows in the lowers; with the lowers given, it is read as a mount
shows it (``MergedView``, the overlay's own lookup): a metadata-only copy goes
in with its data, and a moved directory (a layer has no redirects) goes in
whole, opaque over what the lowers have at its new name.

The layer goes to a file (``write_layer``: a temporary file beside it, renamed
into place when complete; only a regular file is ever replaced) or to a
descriptor such as stdout (``write_layer_to``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from unionfs import lazylog
from unionfs.image.diff import LowerView, MergedView, open_upper
from unionfs.image.digest import Digest, ImageError
from unionfs.image.unpack import os_reason
from unionfs.overlay import markers
from unionfs.overlay.nodes import Node
from unionfs.overlay.syscalls import RENAME_NOREPLACE, fd_path, renameat2
from unionfs.overlay.union import join

log = lazylog.get(__name__)
_AT_FDCWD = -100

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
COMPRESSIONS = ("gzip", "zstd", "none")


@dataclass
class Written:
    diff_id: Digest  # of the uncompressed tar
    digest: Digest  # of the file as written
    size: int  # of the file
    compression: str
    entries: int


# Suffixes of compressions a layer is never written in (OCI layers are gzip, zstd
# or plain tars): a file so named would lie about its content.
_FOREIGN = {
    ".xz": "xz",
    ".txz": "xz",
    ".bz2": "bzip2",
    ".tbz": "bzip2",
    ".tbz2": "bzip2",
    ".tb2": "bzip2",
    ".lz4": "lz4",
    ".lzma": "lzma",
    ".tlz": "lzma",
    ".lz": "lzip",
    ".lzo": "lzop",
    ".z": "compress",
    ".taz": "compress",
    ".br": "brotli",
    ".sz": "snappy",
    ".zip": "zip",
    ".7z": "7z",
}


def compression_for(path: str) -> str:
    """The compression a layer file's name asks for: ``.tar`` none, ``.gz``/``.tgz``
    gzip, ``.zst``/``.zstd``/``.tzst`` zstd. Any other name is refused (``ImageError``):
    one that names another compression, and one that names none (``--compression``
    then says what to write)."""
    name = os.path.basename(path).lower()
    if name.endswith((".gz", ".tgz")):
        return "gzip"
    if name.endswith((".zst", ".zstd", ".tzst")):
        return "zstd"
    if name.endswith(".tar"):
        return "none"
    suffix = os.path.splitext(name)[1]
    if suffix in _FOREIGN:
        raise ImageError(
            f"{path}: a name for {_FOREIGN[suffix]} data; a layer is written uncompressed "
            "(.tar), gzip (.tar.gz) or zstd (.tar.zst)"
        )
    raise ImageError(
        f"{path}: the name does not say the compression: end it in .tar, .tar.gz or "
        ".tar.zst, or give --compression none|gzip|zstd"
    )


class NeedsLowers(ImageError):
    """The upper keeps part of what it shows in lower layers that were not given."""


class _Sink:
    """Counts and hashes what passes to *out* (*name* in errors). Once ``discard`` is
    set (the layer failed) nothing more is written: the tar writer's own clean-up
    then writes nowhere."""

    def __init__(self, out: BinaryIO, name: str) -> None:
        self.out = out
        self.name = name
        self.hash = hashlib.sha256()
        self.count = 0
        self.discard = False

    def write(self, data: bytes) -> int:
        if self.discard:
            return len(data)
        self.hash.update(data)
        self.count += len(data)
        try:
            self.out.write(data)
        except BrokenPipeError:
            raise  # the reader is gone: the command ends quietly
        except OSError as e:
            raise ImageError(f"{self.name}: writing the layer: {os_reason(e)}") from None
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

    def abort(self) -> None:
        """Stop: nothing more reaches the output (the sink discards it)."""
        self.sink.discard = True
        if self.zstd is not None:
            with contextlib.suppress(Exception):
                self.zstd.close()


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


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a fifo",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symlink",
}


def _kind(st: os.stat_result) -> str:
    return _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")


def output_target(path: Path) -> Path:
    """Where a layer file named *path* is written. Only a regular file is ever
    replaced: a directory, a device, a fifo or a socket is refused, and a symlink is
    followed to the regular file it leads to, which is replaced (the symlink stays as
    it is); a symlink to nothing or to anything else is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise ImageError(f"{path}: {os_reason(e)}") from None
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ImageError(f"{path}: a symlink to nothing: not written through") from None
        except OSError as e:
            raise ImageError(f"{path}: {os_reason(e)}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(
                f"{path}: a symlink to {_kind(st)}, not a regular file: not replaced{_hint(st)}"
            )
        real = Path(os.path.realpath(path))
        try:
            same = os.lstat(real)
        except OSError:
            same = None
        if same is None or (same.st_dev, same.st_ino) != (st.st_dev, st.st_ino):
            # A link in /proc to a deleted or unreachable file: no name to replace.
            raise ImageError(f"{path}: a symlink to a file that has no name: not written through")
        return real
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path}: {_kind(st)}, not a regular file: not replaced{_hint(st)}")
    return path


def _hint(st: os.stat_result) -> str:
    """For what a stream could go to: how to send the layer to stdout instead."""
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        return " (-o - writes the layer to stdout)"
    return ""


def write_layer(
    upper: Path,
    output: Path,
    lowers: list[Path] | None = None,
    compression: str | None = None,
    source_date_epoch: int | None = None,
) -> Written:
    """Write *upper* as a layer tar to the file *output* (see ``output_target``):
    atomically, as a temporary file beside the file it replaces, renamed into place
    when complete."""
    compression = compression or compression_for(os.fspath(output))
    target = output_target(output)
    if _inside(target.parent, upper):
        raise ImageError(f"{output}: inside the upper {upper}, it would be part of the layer")
    fd = open_upper(upper)
    try:
        try:
            tmp_fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        except OSError as e:
            raise ImageError(f"{target.parent}: cannot write there: {os_reason(e)}") from None
        try:
            f = os.fdopen(tmp_fd, "wb")
            try:
                written = _write(
                    upper, fd, f, os.fspath(target), lowers, compression, source_date_epoch
                )
                try:
                    f.flush()
                    os.fsync(f.fileno())
                    os.fchmod(f.fileno(), 0o644)
                except OSError as e:
                    raise ImageError(f"{target}: writing the layer: {os_reason(e)}") from None
            finally:
                # After a failed write (a full disk) the buffer's rest cannot be written
                # either: closing must not raise that again over the first error.
                with contextlib.suppress(OSError):
                    f.close()
            _replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    finally:
        os.close(fd)
    return written


def write_layer_to(
    upper: Path,
    out_fd: int,
    lowers: list[Path] | None = None,
    compression: str = "none",
    source_date_epoch: int | None = None,
) -> Written:
    """Write *upper* as a layer tar to the open descriptor *out_fd* (stdout, say), as
    it is made: nothing is renamed, and a failure leaves what was written so far."""
    try:
        st = os.fstat(out_fd)
    except OSError as e:
        raise ImageError(f"the output: {os_reason(e)}") from None
    if stat.S_ISREG(st.st_mode):
        with contextlib.suppress(OSError):
            where = os.readlink(f"/proc/self/fd/{out_fd}")
            if _inside(Path(os.path.dirname(where)), upper):
                raise ImageError(
                    f"{where}: inside the upper {upper}, it would be part of the layer"
                )
    fd = open_upper(upper)
    try:
        return _write(
            upper, fd, _FdWriter(out_fd), "the output", lowers, compression, source_date_epoch
        )
    finally:
        os.close(fd)


class _FdWriter:
    """Unbuffered writes to a descriptor that is not ours (nothing is left buffered
    to be flushed, or to fail, when it is gone)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        return len(data)


def _write(
    upper: Path,
    fd: int,
    out: Any,
    name: str,
    lowers: list[Path] | None,
    compression: str,
    epoch: int | None,
) -> Written:
    """The upper directory *fd* (*upper*) as a layer tar, written to *out* (*name* in
    errors)."""
    sink = _Sink(out, name)
    comp = _Compressor(sink, compression)
    with LowerView(lowers or []) as view, contextlib.closing(MergedView(upper, lowers or [])) as merged:  # fmt: skip
        walker = _LayerWriter(comp, view, merged, epoch)  # type: ignore[arg-type]
        try:
            walker.dir(fd, b"", view.root)
            walker.close()
        except BaseException as e:
            # Nothing more is written: not the tar's end, and nothing when the tar
            # writer is collected after the output is closed.
            comp.abort()
            with contextlib.suppress(Exception):
                walker.close()
            if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):
                # Reading the upper (writing errors are the sink's ImageError).
                what = os.fsdecode(e.filename) if e.filename else "the upper"
                raise ImageError(f"{what}: {os_reason(e)} (changed while committing?)") from None
            raise
    diff_id = comp.finish()
    return Written(diff_id, sink.digest(), sink.count, compression, walker.count)


def _replace(tmp: str, target: Path) -> None:
    """Rename the finished *tmp* to *target*, never over anything but a regular file:
    what is there is looked at again (it may have changed while the layer was
    written), and where nothing is, the rename never replaces what appears meanwhile."""
    for _ in range(2):
        try:
            now: os.stat_result | None = os.lstat(target)
        except FileNotFoundError:
            now = None
        if now is not None and not stat.S_ISREG(now.st_mode):
            raise ImageError(f"{target}: now {_kind(now)}, not a regular file: not replaced")
        try:
            if now is None:
                renameat2(
                    _AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(target), RENAME_NOREPLACE
                )
            else:
                os.rename(tmp, target)
            return
        except OSError as e:
            if e.errno == errno.EEXIST:
                continue  # made meanwhile: looked at again
            if e.errno == errno.EINVAL and now is None:
                os.rename(tmp, target)  # a filesystem without RENAME_NOREPLACE
                return
            raise ImageError(f"{target}: {os_reason(e)}") from None
    raise ImageError(f"{target}: keeps changing while it is written: not replaced")


class _LayerWriter:
    def __init__(
        self, out: BinaryIO, view: LowerView, merged: MergedView, epoch: int | None
    ) -> None:
        self.tf = tarfile.open(  # noqa: SIM115 - closed by close()
            fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8"
        )
        self.view = view
        self.merged = merged  # the upper over the lowers, for what the upper keeps elsewhere
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
            pax, private = _xattrs(fd_path(fd, name))
            is_dir = stat.S_ISDIR(st.st_mode)
            # What a moved directory or a metadata-only copy keeps in the lowers.
            elsewhere = private.get(b"redirect" if is_dir else b"metacopy")
            if not stat.S_ISREG(st.st_mode) and not is_dir:
                elsewhere = None
            if elsewhere is not None and not known:
                raise NeedsLowers(
                    f"{os.fsdecode(p)}: has {os.fsdecode(elsewhere)} (an upper written with the "
                    "kernel's redirect_dir or metacopy on): its data is in the lower layers; "
                    "give them with --lower"
                )
            if elsewhere is not None and is_dir:
                self.redirected(fd, name, p, st, pax, below)
                continue
            data = self.merged_data(path, name) if elsewhere is not None else None
            self.entry(fd, name, p, st, pax, data)
            if is_dir:
                was = self.view.entry(below, name)
                child_old = self.view.directory(below, was) if was and below else None
                child = os.open(name, _DIR, dir_fd=fd)
                try:
                    self.dir(child, p, child_old)
                finally:
                    os.close(child)

    # -- what the upper keeps in the lowers (redirect_dir, metacopy) ------------------

    def redirected(
        self, fd: int, name: bytes, path: bytes, st: os.stat_result, pax: dict[str, str],
        below: Node | None,
    ) -> None:  # fmt: skip
        """A directory the kernel moved (it has a redirect): a layer has no redirects, so
        it goes in whole, as the mount shows it, opaque over what the lowers have there."""
        self.entry(fd, name, path, st, pax)
        if below is not None and self.view.entry(below, name) is not None:
            self.marker(join(path, markers.OCI_OPAQUE), st)
        try:
            node = self.merged.node(path)
        except OSError as e:
            raise ImageError(
                f"{os.fsdecode(path)}: following its redirect: {os_reason(e)}"
            ) from None
        self.merged_dir(node, path)

    def merged_dir(self, node: Node, path: bytes) -> None:
        """Everything in the merged directory *node* (at *path*), from the layer that
        has each entry, file data from the file that holds it."""
        union = self.merged.union
        for name in sorted(union.names(node)):
            entry = union.resolve(node, name)
            if entry is None:
                continue
            p = join(path, name)
            child = union.node_for(node, entry)
            parent, real = entry.place.split()
            dirfd = entry.layer.dirfd(parent)
            st = os.stat(real, dir_fd=dirfd, follow_symlinks=False)
            pax, _ = _xattrs(fd_path(dirfd, real))
            data = None
            if stat.S_ISREG(st.st_mode):
                data = io.FileIO(union.open_data(child, os.O_RDONLY), "rb")
                dirfd = -1  # (opening may have closed it: the entry needs no more of it)
            self.entry(dirfd, real, p, st, pax, data)
            if stat.S_ISDIR(st.st_mode):
                self.merged_dir(child, p)

    def merged_data(self, path: bytes, name: bytes) -> BinaryIO:
        """The data of the metadata-only copy *name* in the directory *path*."""
        union = self.merged.union
        try:
            found = union.lookup(self.merged.node(path), name)
            if found is None:
                raise FileNotFoundError(errno.ENOENT, "not in the merged tree")
            return io.FileIO(union.open_data(found[0], os.O_RDONLY), "rb")
        except OSError as e:
            where = os.fsdecode(join(path, name))
            raise ImageError(f"{where}: finding its data in the lowers: {os_reason(e)}") from None

    def marker(self, path: bytes, dir_st: os.stat_result) -> None:
        ti = tarfile.TarInfo(os.fsdecode(path))
        ti.type = tarfile.REGTYPE
        ti.mode = 0o644
        ti.mtime = self.mtime(dir_st)
        ti.uname = ti.gname = ""
        self.tf.addfile(ti)
        self.count += 1

    def entry(
        self, dirfd: int, name: bytes, path: bytes, st: os.stat_result, pax: dict[str, str],
        data: BinaryIO | None = None,
    ) -> None:  # fmt: skip
        """*name* in *dirfd* (stat *st*, xattrs *pax*) as the layer's *path*; a regular
        file's data is read from *data* when given (it is then closed), else from it."""
        ti = tarfile.TarInfo(os.fsdecode(path))
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.uname = ti.gname = ""
        ti.mtime = self.mtime(st)
        mode = st.st_mode
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(mode) and st.st_nlink > 1 and key in self.links:
            ti.type = tarfile.LNKTYPE
            ti.linkname = self.links[key]
        elif stat.S_ISREG(mode):
            ti.type = tarfile.REGTYPE
            if data is None:
                data = _open_file(dirfd, name)
            ti.size = os.fstat(data.fileno()).st_size
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
        if ti.type != tarfile.REGTYPE and data is not None:
            data.close()  # a hard link: its data went in with the first name
            data = None
        if not stat.S_ISDIR(mode) and st.st_nlink > 1 and key not in self.links:
            self.links[key] = ti.name
        ti.pax_headers = pax
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


def _xattrs(path: bytes) -> tuple[dict[str, str], dict[bytes, bytes]]:
    """Every xattr but the overlay's own, as PAX records (binary values kept byte for
    byte); and the overlay's own, by suffix (``redirect``, ``metacopy``, ...) to
    their full names."""
    out: dict[str, str] = {}
    private: dict[bytes, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out, private
    for name in sorted(names):
        raw = os.fsencode(name)
        if markers.is_private_xattr(raw):
            private.setdefault(raw.rpartition(b".")[2], raw)
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        out["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
    return out, private
