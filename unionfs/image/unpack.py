"""Unpacking a layer tar into a kernel-format layer directory, safely.

Layer tars come from the internet. Every entry is checked before anything is
written, and nothing is ever written outside the target:

- names are plain relative paths: absolute names and ``..`` are refused;
- each directory on the way is opened with ``O_NOFOLLOW`` from its parent's fd,
  so a symlink planted by an earlier entry is never followed;
- a hard link must name an entry already unpacked in this layer;
- device nodes, setuid/setgid bits, ownership and ``trusted.*``/``security.*``
  xattrs only when running as root (else left out, device nodes and the bits with
  a warning); the overlay's own xattrs never;
- the entry count and the total size are limited (a tar bomb or a huge sparse
  claim fails cleanly).

OCI whiteouts become the kernel's: ``.wh.NAME`` a char 0/0 whiteout, and
``.wh..wh..opq`` the opaque xattr (written through ``unionfs.overlay.markers``),
so the result mounts with ``mount -t overlay`` as well as with unionfs. A
duplicate entry replaces the earlier one (the OCI rule: the last one wins).

Every refusal is an ``UnpackError`` naming the layer and the entry.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import partial

from unionfs import lazylog
from unionfs.image import tarreader
from unionfs.image.digest import CHUNK, ImageError
from unionfs.image.inorder import InOrder
from unionfs.image.tarreader import Entry, TarReader
from unionfs.overlay import acl, markers
from unionfs.overlay.layers import remove_tree
from unionfs.overlay.syscalls import fd_path
from unionfs.records import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from unionfs.image.digest import Readable

log = lazylog.get(__name__)

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SCHILY = "SCHILY.xattr."
_TAR_BUFFER = CHUNK  # what the archive is read in
# A regular file up to this size is read whole by the reading thread and handed to
# the making thread with its entry; a larger one is copied from the stream in pieces.
_WHOLE_MAX = CHUNK
_BATCH_ENTRIES = 64  # entries handed to the making thread at once, at most
_BATCH_BYTES = 4 << 20  # and their data
PATH_MAX = 4095
_FS_ENCODING = sys.getfilesystemencoding()
_TIME_MIN, _TIME_MAX = -(1 << 63), 1 << 63  # seconds (a time_t)
_ID_MAX = (1 << 32) - 1  # uid_t; -1 (all ones) means "unchanged" to chown
NAME_MAX = 255


class UnpackError(ImageError):
    """A layer entry refused (or a layer that cannot be read): one line."""


def os_reason(e: OSError) -> str:
    """An OS error as the image tools' messages word it: its text with a small first
    letter (``no such file or directory``), as their own messages are written."""
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]


class Limits(Record):
    """Bounds on what one layer may unpack to."""

    max_bytes: int = 64 << 30  # file data, and the uncompressed tar stream
    max_entries: int = 2_000_000


class _DirMeta:
    __slots__ = ("mode", "uid", "gid", "mtime_ns", "xattrs")

    def __init__(
        self,
        mode: int,
        uid: int = -1,
        gid: int = -1,
        mtime_ns: int | None = None,
        xattrs: dict[bytes, bytes] | None = None,
    ) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.xattrs = {} if xattrs is None else xattrs


def privileged() -> bool:
    return os.geteuid() == 0


def unpack_tar(
    stream: Readable,
    dest_fd: int,
    layer: str,
    limits: Limits | None = None,
    root: bool | None = None,
    tick: Callable[[], None] | None = None,
) -> int:
    """Unpack the uncompressed tar *stream* into the (empty) directory *dest_fd*.

    *layer* names the layer in errors. *root* (default: running as root) allows
    what only root may do. Returns the number of entries.
    """
    # Entries get their modes and xattrs from the tar alone: not the umask, and not a
    # default ACL the directory inherited from where the cache is (which would also
    # give every entry an access ACL).
    acl.clear(dest_fd, f"the directory of layer {layer}")
    u = _Unpacker(dest_fd, layer, limits or Limits(), privileged() if root is None else root)
    umask = os.umask(0)  # entries are made with their own modes (the decoder makes none)
    maker = InOrder("layer-entries")
    u.writes = writes = _Writes(layer)
    batch = _Batch(u, maker)
    try:
        try:
            try:
                reader = tarreader.TarReader(stream, _TAR_BUFFER)
                for member in reader:
                    _dispatch(u, batch, member, reader)
                    if tick is not None:
                        tick()
                batch.flush()
                maker.wait()
                writes.wait()
                u.finish()
            except BaseException:
                # The entries before this error are made first, and an error in one
                # of them is the one raised: the writes', then the making thread's.
                try:
                    batch.flush()
                    maker.wait()
                finally:
                    writes.wait()
                raise
        except tarreader.Truncated:
            raise UnpackError(f"layer {layer}: the tar archive is truncated") from None
        except tarreader.NotATar as e:
            if str(e) == "empty file":
                raise UnpackError(f"layer {layer}: not a tar archive (empty)") from None
            raise UnpackError(f"layer {layer}: not a valid tar archive: {e}") from None
        except tarreader.TarFormatError as e:
            raise UnpackError(f"layer {layer}: {e} {u.where()}") from None
        except EOFError:
            raise UnpackError(f"layer {layer}: the tar archive is truncated") from None
    finally:
        maker.close()  # before the unpacker's fds
        writes.close()
        os.umask(umask)
        u.close()
    return u.count


def _dispatch(u: _Unpacker, batch: _Batch, m: Entry, reader: TarReader) -> None:
    """Have entry *m* made in the making thread, in order, with its data read here;
    or here, once that thread is idle, when its data is too large to hold (or sparse)."""
    if not m.isreg():
        batch.add(m, None)
    elif m.sparse is None and m.size <= _WHOLE_MAX:
        batch.add(m, reader.read_data(m))
    else:
        batch.flush()
        batch.maker.wait()
        u.entry(m, reader)


class _Batch:
    """Entries handed to the making thread a batch at a time: each hand-over (a lock,
    a wake-up, the GIL passed back and forth) costs more than parsing an entry, so
    one per entry made the second thread a loss."""

    def __init__(self, u: _Unpacker, maker: InOrder) -> None:
        self.u = u
        self.maker = maker
        self.entries: list[tuple[Entry, bytes | None]] = []
        self.size = 0

    def add(self, m: Entry, data: bytes | None) -> None:
        self.entries.append((m, data))
        if data is not None:
            self.size += len(data)
        if len(self.entries) >= _BATCH_ENTRIES or self.size >= _BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Hand the batch over (gone from here even when the thread's error is raised
        instead: nothing after an error is made)."""
        if self.entries:
            entries, size = self.entries, self.size
            self.entries, self.size = [], 0
            self.maker.submit(partial(self.u.entries, entries), size)


class _Unpacker:
    def __init__(self, root_fd: int, layer: str, limits: Limits, root: bool) -> None:
        self.root_fd = root_fd
        self.layer = layer
        self.limits = limits
        self.root = root
        self.count = 0
        self.total = 0
        self.path = ""  # the entry being unpacked, for errors
        self.dirfds: OrderedDict[bytes, int] = OrderedDict()
        self.whiteouts: set[bytes] = set()  # whiteouts made here from .wh. files
        self.oci_whiteouts: set[bytes] = set()  # those kept as .wh. files (no mknod)
        self.opaque: set[bytes] = set()
        self.dirs: dict[bytes, _DirMeta] = {b"": _DirMeta(0o755)}
        self.children: dict[bytes, set[bytes]] = {}  # what forget() must find
        self.dropped_bits = False
        self.writes: _Writes | None = None  # small files' data and metadata, written there
        self.skipped: set[bytes] = set()  # device nodes left out (not root)
        self.skipped_devices = False
        # What a new entry is owned by already (not so below a setgid directory).
        setgid = os.fstat(root_fd).st_mode & stat.S_ISGID
        self.ids = (-2, -2) if setgid else (os.geteuid(), os.getegid())

    # -- errors ------------------------------------------------------------------

    def fail(self, why: str) -> UnpackError:
        return UnpackError(f"layer {self.layer}: entry {self.path!r}: {why}")

    def where(self) -> str:
        """Where the reader is, for an error in the archive itself."""
        return f"after entry {self.path!r}" if self.count else "before the first entry"

    # -- directories -------------------------------------------------------------

    def close(self) -> None:
        for fd in self.dirfds.values():
            os.close(fd)
        self.dirfds.clear()

    def dirfd(self, path: bytes, create: bool = True) -> int:
        """An ``O_PATH`` fd of directory *path* in the layer, made (mode 0755) when it is
        missing and *create*. Each component is opened from its parent with
        ``O_NOFOLLOW``: a symlink on the way is an error, never followed."""
        if not path:
            return self.root_fd
        fd = self.dirfds.get(path)
        if fd is not None:
            self.dirfds.move_to_end(path)
            return fd
        # Down from the nearest directory already open (iteratively: a tar may nest
        # directories thousands deep).
        parts = path.split(b"/")
        i = len(parts) - 1
        while i > 0 and b"/".join(parts[:i]) not in self.dirfds:
            i -= 1
        pfd = self.dirfds[b"/".join(parts[:i])] if i > 0 else self.root_fd
        for j in range(i, len(parts)):
            sub = b"/".join(parts[: j + 1])
            pfd = self._open_dir(pfd, sub, parts[j], create)
            self.dirfds[sub] = pfd
        while len(self.dirfds) > 256:  # the newest (this path's) stay open
            os.close(self.dirfds.popitem(last=False)[1])
        return pfd

    def _open_dir(self, pfd: int, path: bytes, name: bytes, create: bool) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except FileNotFoundError:
            if not create:
                raise
            self._give_way(pfd, path, name, isdir=True)
            os.mkdir(name, 0o700, dir_fd=pfd)
            self.dirs[path] = _DirMeta(0o755)
            self._note(path)
            return os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError as e:
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            if path in self.whiteouts and create:
                # Deleted earlier in this layer, now a directory: one that hides the
                # layers below, as the whiteout did.
                os.unlink(name, dir_fd=pfd)
                self.whiteouts.discard(path)
                os.mkdir(name, 0o700, dir_fd=pfd)
                self.dirs[path] = _DirMeta(0o755)
                self._note(path)
                self.opaque.add(path)
                self._note(path)
                return os.open(name, _DIR_FLAGS, dir_fd=pfd)
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise self.fail(f"{os.fsdecode(path)!r} on the way is {what}") from None

    def _note(self, path: bytes) -> None:
        """Index *path* (and its directories) under its parent, for ``forget``: every
        path the tables below hold is in this tree."""
        while path:
            parent = path.rpartition(b"/")[0]
            kids = self.children.get(parent)
            if kids is None:
                kids = self.children[parent] = set()
            elif path in kids:
                return
            kids.add(path)
            path = parent

    def forget(self, path: bytes) -> None:
        """*path* was removed: drop what is known of it and everything below it, in
        time proportional to what that is (a layer may replace thousands of trees)."""
        self.children.get(path.rpartition(b"/")[0], set()).discard(path)
        prefix = path + b"/"
        for p in [p for p in self.dirfds if p == path or p.startswith(prefix)]:
            os.close(self.dirfds.pop(p))  # at most 256 of them
        stack = [path]
        while stack:
            p = stack.pop()
            self.dirs.pop(p, None)
            for s in (self.whiteouts, self.oci_whiteouts, self.opaque, self.skipped):
                s.discard(p)
            stack.extend(self.children.pop(p, ()))

    # -- names -------------------------------------------------------------------

    def clean(self, name: str, what: str = "path") -> bytes:
        raw = name.encode(_FS_ENCODING, "surrogateescape")  # os.fsencode
        if b"\0" in raw:
            raise self.fail(f"{what} contains a NUL byte")
        if raw.startswith(b"/"):
            raise self.fail(f"absolute {what}: refused")
        parts = raw.split(b"/")
        path = raw
        if b"" in parts or b"." in parts:  # rare: only "a//b", "./a", "a/"
            parts = [p for p in parts if p not in (b"", b".")]
            path = b"/".join(parts)
        if b".." in parts:
            raise self.fail(f"{what} leaves the layer through '..'")
        if len(path) > PATH_MAX or max(map(len, parts), default=0) > NAME_MAX:
            raise self.fail(f"{what} too long")
        return path

    # -- entries -----------------------------------------------------------------

    def entries(self, batch: list[tuple[Entry, bytes | None]]) -> None:
        for m, data in batch:
            self.entry(m, data)

    def entry(self, m: Entry, src: _Source) -> None:
        """Make entry *m*; *src* is a regular file's data, read already or to be
        read from the archive (or None: no data)."""
        self.path = m.name
        self.count += 1
        if self.count > self.limits.max_entries:
            raise self.fail(f"more than {self.limits.max_entries} entries")
        path = self.clean(m.name)
        if m.isreg():
            self.total += m.size
            if self.total > self.limits.max_bytes:
                raise self.fail(
                    f"the layer's files add up to more than {self.limits.max_bytes} bytes"
                )
        if not _TIME_MIN <= m.mtime < _TIME_MAX:
            raise self.fail(f"mtime {m.mtime} out of range")
        if not (0 <= m.uid < _ID_MAX and 0 <= m.gid < _ID_MAX):
            raise self.fail(f"owner {m.uid}:{m.gid} out of range")
        try:  # (what failures() does, without a context manager's cost per entry)
            self._entry(path, m, src)
        except UnpackError:
            raise
        except (OSError, OverflowError, ValueError, RecursionError) as e:
            raise self._failure(e) from None

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """What making the entry ``self.path`` raised, as one line naming it."""
        try:
            yield
        except UnpackError:
            raise
        except (OSError, OverflowError, ValueError, RecursionError) as e:
            raise self._failure(e) from None

    def _failure(self, e: Exception) -> UnpackError:
        if isinstance(e, OSError):
            return self.fail(e.strerror or str(e))
        if isinstance(e, RecursionError):
            return self.fail("the directory tree it replaces is too deep")
        return self.fail(f"bad header value: {e}")

    def _entry(self, path: bytes, m: Entry, src: _Source) -> None:
        if not path:
            if not m.isdir():
                raise self.fail("the layer's root must be a directory")
            self.dirs[b""] = self._dir_meta(m)
            return
        parent, _, name = path.rpartition(b"/")
        if b"/.wh." in b"/" + parent and self._in_bookkeeping(parent):
            return
        if markers.is_oci_name(name):
            self._marker(parent, name)
            return
        if m.type not in _KNOWN_TYPES:
            raise self.fail(f"unsupported entry type {m.type!r}")
        if m.ischr() and m.devmajor == 0 and m.devminor == 0:
            raise self.fail(
                "a character device 0/0 is a kernel whiteout; layers mark deletions with .wh. files"
            )
        if m.isdev() and not self.root:
            self._skip_device(path)
            return
        if m.islnk():
            self._hardlink(path, parent, name, m)
            return
        pfd = self.dirfd(parent)
        self._give_way(pfd, path, name, m.isdir())
        try:
            self._create(pfd, name, m, src)
        except FileExistsError:
            # Rare: a duplicate entry. Make room by the OCI rule, then create it again.
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode) and m.isdir():
                self.dirs[path] = self._dir_meta(m)  # the same directory again
                return
            self._remove(path, pfd, name, st, m.isdir())
            self._create(pfd, name, m, src)
        if m.isdir():
            self.dirs[path] = self._dir_meta(m)
            self._note(path)

    def _in_bookkeeping(self, parent: bytes) -> bool:
        """Whether *parent*, which has a ``.wh.`` component, is inside aufs bookkeeping
        (``.wh..wh.plnk/...``: skipped). Any other ``.wh.`` directory is refused: the
        kernel would show it as a directory, unionfs as a whiteout."""
        parts = parent.split(b"/")
        for i, part in enumerate(parts):
            if markers.is_oci_meta(part):
                return True
            if markers.is_oci_name(part):
                way = os.fsdecode(b"/".join(parts[: i + 1]))
                raise self.fail(f"{way!r} on the way is a whiteout's name")
        return False

    def _create(self, pfd: int, name: bytes, m: Entry, src: _Source) -> None:
        """Make the entry (which must not exist: EEXIST otherwise), with its mode from
        the start where it can be (the umask is 0 while unpacking), so most entries
        need no chmod and, owned by the unpacker, no chown."""
        mode = self._mode(m) & 0o777
        if m.isdir():
            os.mkdir(name, 0o700, dir_fd=pfd)  # its own mode once its entries are in
        elif m.isreg():
            self._file(pfd, name, m, src, mode)
        elif m.issym():
            os.symlink(os.fsencode(m.linkname), name, dir_fd=pfd)
            self._meta(pfd, name, m, symlink=True)
        elif m.isfifo():
            os.mkfifo(name, mode, dir_fd=pfd)
            self._meta(pfd, name, m, created_mode=mode)
        else:  # a device node (root only, checked above)
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(name, kind | mode, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
            self._meta(pfd, name, m, created_mode=mode)

    def _remove(self, path: bytes, pfd: int, name: bytes, st: os.stat_result, isdir: bool) -> None:
        """Make room for a later entry of the same name: the last one wins."""
        if path in self.whiteouts:
            self.whiteouts.discard(path)
            if isdir:
                self.opaque.add(path)  # the whiteout's deletion of the layers below stays
                self._note(path)
            os.unlink(name, dir_fd=pfd)
            return
        if stat.S_ISDIR(st.st_mode):
            self.forget(path)
            remove_tree(pfd, name)
        else:
            os.unlink(name, dir_fd=pfd)

    def _skip_device(self, path: bytes) -> None:
        """A device node without root: left out, as unprivileged engines do, with one
        warning for the layer (hard links to it are left out too)."""
        if not self.skipped_devices:
            log.warning("layer %s: device nodes skipped (not running as root)", self.layer)
            self.skipped_devices = True
        self.skipped.add(path)
        self._note(path)

    def _give_way(self, pfd: int, path: bytes, name: bytes, isdir: bool) -> None:
        """An entry is made at *path*: a whiteout kept as an OCI file there goes, as a
        kernel whiteout would be replaced (a directory stays opaque, hiding the
        layers below as the whiteout did)."""
        if self.oci_whiteouts and path in self.oci_whiteouts:
            os.unlink(markers.oci_whiteout_name(name), dir_fd=pfd)
            self.oci_whiteouts.discard(path)
            if isdir:
                self.opaque.add(path)
                self._note(path)

    def _marker(self, parent: bytes, name: bytes) -> None:
        if name == markers.OCI_OPAQUE:
            self.dirfd(parent)  # the directory exists, even if no entry made it
            if parent:
                self.opaque.add(parent)
                self._note(parent)
            return
        deleted = markers.oci_deleted(name)
        if deleted is None or markers.is_oci_meta(name):
            return  # aufs bookkeeping: nothing to unpack
        if deleted in (b"", b".", b".."):
            raise self.fail("whiteout of no name")
        pfd = self.dirfd(parent)
        target = parent + b"/" + deleted if parent else deleted
        if target in self.oci_whiteouts:
            return  # deleted already
        st = _lstat(pfd, deleted)
        if st is None:
            try:
                markers.make_device_whiteout(pfd, deleted)
            except PermissionError:
                # No unprivileged whiteouts on this kernel or filesystem: keep the OCI
                # file, which unionfs reads in a lower layer just the same.
                markers.make_oci_whiteout(pfd, deleted)
                self.oci_whiteouts.add(target)
                self._note(target)
                return
            self.whiteouts.add(target)
            self._note(target)
        elif stat.S_ISDIR(st.st_mode) and target not in self.whiteouts:
            # The layers below lose theirs; this layer's own directory stays.
            self.opaque.add(target)
            self._note(target)
        # A non-directory of this layer already hides what is below it.

    def _hardlink(self, path: bytes, parent: bytes, name: bytes, m: Entry) -> None:
        """A second name for an entry unpacked earlier in this layer, found the same
        careful way (so never anything outside it)."""
        target = self.clean(m.linkname, "hard link target")
        if target in self.skipped:
            self.skipped.add(path)
            self._note(path)
            return
        tparent, _, tname = target.rpartition(b"/")
        if not target or target in self.whiteouts or markers.is_oci_name(tname):
            raise self.fail(f"hard link to {m.linkname!r}, which is not a file of this layer")
        try:
            # A copy: opening the link's own directory below may evict the cached one.
            tfd = os.dup(self.dirfd(tparent, create=False))
        except (FileNotFoundError, UnpackError):
            raise self.fail(
                f"hard link to {m.linkname!r}, which is not earlier in this layer"
            ) from None
        try:
            tst = _lstat(tfd, tname)
            if tst is None:
                raise self.fail(f"hard link to {m.linkname!r}, which is not earlier in this layer")
            if stat.S_ISDIR(tst.st_mode):
                raise self.fail(f"hard link to the directory {m.linkname!r}")
            pfd = self.dirfd(parent)
            st = _lstat(pfd, name)
            if st is not None:
                if st.st_ino == tst.st_ino and st.st_dev == tst.st_dev:
                    return  # already that file
                self._remove(path, pfd, name, st, False)
            self._give_way(pfd, path, name, False)
            os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)

    def _file(self, pfd: int, name: bytes, m: Entry, src: _Source, mode: int) -> None:
        later = isinstance(src, bytes) and self.writes is not None
        meta = self._file_meta(m, mode) if later else None  # (it checks the xattrs)
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            mode,
            dir_fd=pfd,
        )
        if later:
            assert self.writes is not None and isinstance(src, bytes) and meta is not None
            self.writes.add(fd, src, meta, m.name)  # the fd is the writes' now
            return
        try:
            assert src is not None  # a regular file's data comes with it (_dispatch)
            if isinstance(src, bytes):
                _write_all(fd, src)
            elif m.sparse is not None:
                _copy_sparse(src, m, fd)
            elif m.size:
                _copy(src, m, fd)
            self._meta(pfd, name, m, fd=fd, created_mode=mode)
        finally:
            os.close(fd)

    # -- metadata ----------------------------------------------------------------

    def _mode(self, m: Entry) -> int:
        mode = m.mode & 0o7777
        if not self.root and mode & (stat.S_ISUID | stat.S_ISGID):
            if not self.dropped_bits:
                log.warning(
                    "layer %s: setuid/setgid bits dropped (not running as root)", self.layer
                )
                self.dropped_bits = True
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        return mode

    def _xattrs(self, m: Entry) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for key, value in m.pax_headers.items():
            if not key.startswith(_SCHILY):
                continue
            name = key[len(_SCHILY) :].encode("utf-8", "surrogateescape")
            if markers.is_private_xattr(name):
                raise self.fail(f"the overlay's own xattr {os.fsdecode(name)!r} is not allowed")
            if not self.root and name.startswith((b"trusted.", b"security.")):
                continue
            out[name] = value.encode("utf-8", "surrogateescape")
        return out

    def _file_meta(self, m: Entry, created_mode: int) -> _FileMeta:
        """What ``_meta`` would apply to a new regular file, worked out (and checked)
        here, in order, for the writer thread to apply."""
        owner = (m.uid, m.gid) if self.root and (m.uid, m.gid) != self.ids else None
        mode = self._mode(m)
        return owner, -1 if mode == created_mode else mode, self._xattrs(m), _mtime_ns(m)

    def _dir_meta(self, m: Entry) -> _DirMeta:
        return _DirMeta(
            self._mode(m),
            m.uid if self.root else -1,
            m.gid if self.root else -1,
            _mtime_ns(m),
            self._xattrs(m),
        )

    def _meta(
        self,
        pfd: int,
        name: bytes,
        m: Entry,
        fd: int = -1,
        symlink: bool = False,
        created_mode: int = -1,
    ) -> None:
        """Owner, mode, xattrs, times, in that order: chown clears setuid bits and
        file capabilities, so it goes first. Each only when it changes something."""
        target: int | bytes = fd if fd >= 0 else fd_path(pfd, name)
        if self.root and (m.uid, m.gid) != self.ids:
            if fd >= 0:
                os.fchown(fd, m.uid, m.gid)
            else:
                os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        mode = self._mode(m)
        if not symlink and mode != created_mode:
            if fd >= 0:
                os.fchmod(fd, mode)
            else:
                os.chmod(name, mode, dir_fd=pfd)
        for key, value in self._xattrs(m).items():
            self._setxattr(target, key, value)
        ns = _mtime_ns(m)
        if fd >= 0:
            os.utime(fd, ns=(ns, ns))
        else:
            os.utime(name, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)

    def _set_opaque(self, pfd: int, name: bytes) -> None:
        """The kernel's opaque xattr: ``trusted.overlay.opaque`` as root, else
        ``user.overlay.opaque`` (what the kernel reads with ``userxattr``, and unionfs
        always); on a filesystem without user xattrs, the OCI marker file, which
        unionfs reads in a lower layer just the same."""
        if self.root:
            markers.set_opaque(pfd, name)
            return
        try:
            markers.set_opaque(pfd, name, markers.USER)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
                raise
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            markers.make_oci_opaque(fd)
        finally:
            os.close(fd)

    def _setxattr(self, target: int | bytes, key: bytes, value: bytes) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except OSError as e:
            raise self.fail(f"cannot set xattr {os.fsdecode(key)!r}: {e.strerror}") from None

    def finish(self) -> None:
        """Directories last, deepest first: their modes may forbid writing into them,
        and every entry made inside changed their mtimes."""
        self.path = "(directories)"
        with self.failures():
            self._finish()

    def _finish(self) -> None:
        for path in sorted(self.dirs, key=lambda p: p.count(b"/") + (1 if p else 0), reverse=True):
            meta = self.dirs[path]
            parent, _, name = path.rpartition(b"/")
            if path:
                pfd = self.dirfd(parent, create=False)
                target = fd_path(pfd, name)
                follow = False
            else:
                target, follow = fd_path(self.root_fd), True
            self.path = os.fsdecode(path) or "."
            if path in self.opaque:
                self._set_opaque(pfd, name)
            if meta.uid >= 0 and (meta.uid, meta.gid) != self.ids:  # made by us: ours
                os.chown(target, meta.uid, meta.gid, follow_symlinks=follow)
            os.chmod(target, meta.mode, follow_symlinks=follow)
            for key, value in meta.xattrs.items():
                self._setxattr(target if not follow else self.root_fd, key, value)
            if meta.mtime_ns is not None:
                os.utime(target, ns=(meta.mtime_ns, meta.mtime_ns), follow_symlinks=follow)


_Source = bytes | TarReader | None
# A new file's owner to set (or None), mode to set (or -1), xattrs, mtime in ns.
_FileMeta = tuple[tuple[int, int] | None, int, dict[bytes, bytes], int]


class _Writes:
    """The data and metadata of small new files, written by a thread of their own.

    Creating an entry (its checks, the ``open`` that makes it) stays in order in
    the making thread; what follows on the open fd (``write``, ``fchown``,
    ``fchmod``, ``fsetxattr``, ``futimens``, ``close``) changes only that file,
    so it can go on in the kernel, the GIL free, while the next entries are made:
    most of the kernel's work for a small file. Handed over a batch at a time;
    ``wait`` before anything looks at the files (the directories' metadata last).
    An error names its entry, as the making thread's do."""

    def __init__(self, layer: str) -> None:
        self.layer = layer
        self.thread = InOrder(
            "layer-writes", max_calls=4, max_bytes=16 << 20
        )  # 5 batches of files open at most
        self.batch: list[tuple[int, bytes, _FileMeta, str] | None] = []
        self.size = 0
        self.sent: list[list[tuple[int, bytes, _FileMeta, str] | None]] = []

    def add(self, fd: int, data: bytes, meta: _FileMeta, name: str) -> None:
        self.batch.append((fd, data, meta, name))
        self.size += len(data)
        if len(self.batch) >= _BATCH_ENTRIES or self.size >= _BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            batch, size = self.batch, self.size
            self.batch, self.size = [], 0
            self.sent = [b for b in self.sent if any(b)]  # the ones not done
            self.sent.append(batch)  # (its fds closed by close() if never written)
            self.thread.submit(partial(self._write, batch), size)

    def wait(self) -> None:
        self.flush()
        self.thread.wait()

    def close(self) -> None:
        """Stop the thread; the files it has not written are closed unwritten (after
        an error: the layer is discarded)."""
        self.thread.close()
        for batch in [*self.sent, self.batch]:
            for item in batch:
                if item is not None:
                    os.close(item[0])
        self.sent = []
        self.batch = []

    def _write(self, batch: list[tuple[int, bytes, _FileMeta, str] | None]) -> None:
        for i, item in enumerate(batch):
            assert item is not None
            fd, data, (owner, mode, xattrs, ns), name = item
            batch[i] = None  # done, whatever happens: the fd is closed below
            key = b""
            try:
                if data:
                    _write_all(fd, data)
                if owner is not None:
                    os.fchown(fd, *owner)
                if mode >= 0:
                    os.fchmod(fd, mode)
                for key, value in xattrs.items():
                    os.setxattr(fd, key, value)
                key = b""
                os.utime(fd, ns=(ns, ns))
            except OSError as e:
                why = e.strerror or str(e)
                if key:
                    why = f"cannot set xattr {os.fsdecode(key)!r}: {why}"
                raise UnpackError(f"layer {self.layer}: entry {name!r}: {why}") from None
            finally:
                os.close(fd)


_KNOWN_TYPES = {
    tarreader.REGTYPE,
    tarreader.AREGTYPE,
    tarreader.CONTTYPE,
    tarreader.GNU_SPARSE,
    tarreader.DIRTYPE,
    tarreader.SYMTYPE,
    tarreader.LNKTYPE,
    tarreader.CHRTYPE,
    tarreader.BLKTYPE,
    tarreader.FIFOTYPE,
}


def _lstat(dirfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _mtime_ns(m: Entry) -> int:
    if type(m.mtime) is int:  # a plain header's: exact, and no float on the way
        return m.mtime * 1_000_000_000
    return int(round(float(m.mtime) * 1e9))


def _copy(src: TarReader, m: Entry, fd: int) -> None:
    """The data of the regular file *m* written to *fd*, a piece at a time."""
    src.skip_to(m.offset_data)
    left = m.size
    while left > 0:
        chunk = src.read_exact(min(CHUNK, left))
        left -= len(chunk)
        _write_all(fd, chunk)


def _copy_sparse(src: TarReader, m: Entry, fd: int) -> None:
    """A sparse entry: its data regions, stored one after the other from
    ``offset_data``, are written where the map puts them; the rest stays holes
    (never a stream of zeros as long as the size the entry claims)."""
    src.skip_to(m.offset_data)
    assert m.sparse is not None
    for offset, length in m.sparse:
        os.lseek(fd, offset, os.SEEK_SET)
        left = length
        while left > 0:
            chunk = src.read_exact(min(CHUNK, left))
            left -= len(chunk)
            _write_all(fd, chunk)
    os.ftruncate(fd, m.size)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
