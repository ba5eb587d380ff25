"""The layer cache: each layer unpacked once, under the digest of its uncompressed tar.

``CACHE/layers/sha256/HEX`` is the kernel-format directory of the layer whose
diff_id is ``sha256:HEX``. A layer is unpacked into ``CACHE/tmp`` while both of
its digests are computed from the stream, and renamed into place only when
both match and its data is on disk: a half-unpacked, unverified or (after a
power loss) zero-filled layer never enters the cache, which trusts what it
holds from then on. Two processes unpacking the same layer at once both
finish; the first rename wins and the other copy is dropped.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from unionfs.image.digest import Decoder, Digest, ImageError, LimitExceeded
from unionfs.image.unpack import Limits, UnpackError, unpack_tar
from unionfs.overlay.syscalls import RENAME_NOREPLACE, renameat2
from unionfs.records import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO, TypeVar

    from unionfs.image.digest import Readable
    from unionfs.image.layout import LayerRef
    from unionfs.image.progress import Progress

    T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def default_cache_dir() -> Path:
    """``/var/cache/unionfs`` as root, else ``$XDG_CACHE_HOME/unionfs`` (``~/.cache``)."""
    if os.geteuid() == 0:
        return Path("/var/cache/unionfs")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "unionfs"


def layer_label(layer: LayerRef, count: int) -> str:
    """How errors and progress name a layer: its position and blob digest."""
    return f"{layer.index + 1}/{count} {(layer.digest or layer.diff_id).short}"


class Unpacked(Record):
    digest: Digest  # of the blob as read
    size: int  # of the blob
    diff_id: Digest  # of the uncompressed tar
    entries: int
    compression: str


def unpack_blob(
    raw: Readable,
    dest_fd: int,
    label: str,
    limits: Limits | None = None,
    progress: Progress | None = None,
    total: int = -1,
    algorithm: str = "sha256",
    root: bool | None = None,
    expect: Digest | None = None,
    diff_algorithm: str = "sha256",
) -> Unpacked:
    """Unpack the layer blob *raw* (compressed or not) into the empty directory
    *dest_fd*, hashing the blob and the uncompressed tar as they stream past.

    When the unpack fails and the blob's digest should be *expect*, a blob that is
    not that one is reported as such: the error that matters (a corrupt download),
    rather than what the corruption happened to break in the tar."""
    limits = limits or Limits()
    decoder = Decoder(raw, algorithm, limits.max_bytes + (1 << 20), diff_algorithm)

    def tick() -> None:
        if progress is not None:
            progress.update(f"unpacking layer {label}", decoder.blob.count, total)

    try:
        try:
            count = unpack_tar(decoder, dest_fd, label, limits, root, tick)
            diff_id = decoder.finish()
        except ImportError:
            raise ImageError(
                f"layer {label}: zstd-compressed, and the zstandard module is not installed"
            ) from None
        except LimitExceeded as e:
            raise UnpackError(f"layer {label}: expands to more than {e.limit} bytes") from None
        except (zlib.error, EOFError) as e:
            raise UnpackError(f"layer {label}: corrupt {decoder.kind} data: {e}") from None
        except UnpackError:
            raise
        except OSError as e:
            raise ImageError(f"layer {label}: {e.strerror or e}") from None
        except Exception as e:
            if type(e).__name__ == "ZstdError":
                raise UnpackError(f"layer {label}: corrupt zstd data: {e}") from None
            raise
    except ImageError:
        if expect is not None:
            _check_blob_digest(decoder, expect, label)
        raise
    finally:
        decoder.close()
        if progress is not None:
            progress.done()
    blob = decoder.blob
    return Unpacked(blob.digest(), blob.count, diff_id, count, decoder.kind)


class _Capped:
    """A blob as its descriptor gives its size: a byte more is an error at once,
    not after a larger blob has been unpacked whole."""

    def __init__(self, raw: BinaryIO, size: int, label: str) -> None:
        self.raw = raw
        self.size = size
        self.left = size
        self.label = label

    def read(self, n: int = -1, /) -> bytes:
        want = self.left + 1 if n is None or n < 0 else min(n, self.left + 1)
        data = self.raw.read(want)
        self.left -= len(data)
        if self.left < 0:
            raise ImageError(
                f"layer {self.label}: blob size mismatch: expected {self.size} bytes, "
                "the blob is larger"
            )
        return data


def _check_blob_digest(decoder: Decoder, expect: Digest, label: str) -> None:
    """After a failed unpack: the blob read to its end, and refused when its digest is
    not *expect*."""
    decoder.close()
    try:
        decoder.blob.drain()
    except (OSError, ImageError):
        return  # the first error stands
    got = decoder.blob.digest()
    if got != expect:
        raise ImageError(
            f"layer {label}: blob digest mismatch: expected {expect}, content is {got}"
        ) from None


def unpack_layer(
    layer: LayerRef,
    dest_fd: int,
    label: str,
    limits: Limits | None = None,
    progress: Progress | None = None,
) -> Unpacked:
    """Unpack an image's layer, checking its blob digest and size (the manifest's)
    and its diff_id (the config's). Raises ``ImageError`` on any mismatch; the
    caller discards the directory."""
    try:
        raw = layer.open()
    except OSError as e:
        raise ImageError(f"layer {label}: {e.strerror}") from None
    with raw:
        algorithm = layer.digest.algorithm if layer.digest else "sha256"
        got = unpack_blob(
            raw if layer.size < 0 else _Capped(raw, layer.size, label),
            dest_fd,
            label,
            limits,
            progress,
            layer.size,
            algorithm,
            expect=layer.digest,
            diff_algorithm=layer.diff_id.algorithm,
        )
    if layer.digest is not None and got.digest != layer.digest:
        raise ImageError(
            f"layer {label}: blob digest mismatch: expected {layer.digest}, content is {got.digest}"
        )
    if layer.size >= 0 and got.size != layer.size:
        raise ImageError(
            f"layer {label}: blob size mismatch: expected {layer.size} bytes, read {got.size}"
        )
    if got.diff_id != layer.diff_id:
        raise ImageError(
            f"layer {label}: diff_id mismatch: the config says {layer.diff_id}, "
            f"the uncompressed tar is {got.diff_id}"
        )
    return got


def syncfs(fd: int) -> None:
    """Flush the filesystem holding *fd*: the unpacked data is on disk before the
    rename that publishes it."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def writeback(fd: int, interval: float = 0.5) -> Iterator[list[OSError]]:
    """Flush the filesystem holding *fd* every *interval* seconds in a thread while
    the body runs: the data goes to disk while more is unpacked, so the final
    ``syncfs`` (which stays: nothing is published before its data is on disk) has
    little left to wait for. The thread only waits, in the kernel; the flushing
    itself is the kernel's writeback work. Yields the list where the thread puts
    the write-back error it sees, for the caller to raise: ``syncfs`` reports an
    error once per descriptor, so the final one would not."""
    stop = threading.Event()
    failed: list[OSError] = []

    def flush() -> None:
        while not stop.wait(interval):
            try:
                syncfs(fd)
            except OSError as e:
                failed.append(e)
                return

    thread = threading.Thread(target=flush, name="layer-writeback", daemon=True)
    thread.start()
    try:
        yield failed
    finally:
        stop.set()
        thread.join()


def make_temp_dir(parent: str | Path, prefix: str) -> str:
    """A new directory (mode 0700) in *parent* named *prefix* and random letters, as
    ``tempfile.mkdtemp`` makes, without importing ``tempfile`` (and ``shutil`` and
    ``random`` with it) into every image command's start."""
    for _ in range(100):
        path = os.path.join(parent, prefix + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no unused temporary name", os.fspath(parent))


def discard_tree(path: str | Path) -> None:
    """Remove an unpacked tree, read-only directories included (their modes were
    applied from the tar); symlinks are never followed."""
    with contextlib.suppress(FileNotFoundError):
        for dirpath, dirnames, _ in os.walk(path):
            for d in dirnames:
                with contextlib.suppress(OSError):
                    full = os.path.join(dirpath, d)
                    if not os.path.islink(full):
                        os.chmod(full, 0o700)
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        import shutil

        shutil.rmtree(path)


def publish(tmp: str, final: Path) -> bool:
    """Rename the finished directory *tmp* to *final*; False when *final* exists
    already (another process got there first: its copy is as good, same digest).
    Never replaces it, even empty: a mount may be using it."""
    try:
        renameat2(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(final), RENAME_NOREPLACE)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def unpack_into(
    final: Path,
    tmpdir: Path,
    prefix: str,
    unpack: Callable[[int], T],
    replace_empty: bool = False,
    sync: bool = False,
) -> tuple[T, bool]:
    """Run *unpack* on a new directory in *tmpdir*, then publish it as *final*; or
    drop it when *final* exists by then (see ``publish``; with *replace_empty*, an
    empty *final* is removed first). With *sync*, its data is on disk before it is
    published. Returns what *unpack* returned and whether it was published. The
    directory is locked (``flock``) while in use: that is how ``clean_stale`` tells a
    live unpack from a dead one's leftovers, whatever pid namespace either runs in."""
    try:
        parent = os.open(tmpdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"{tmpdir}: {e.strerror}") from None
    try:
        # Shared: made and locked before clean_stale (exclusive) can look at it.
        fcntl.flock(parent, fcntl.LOCK_SH)
        try:
            tmp = make_temp_dir(tmpdir, prefix)
        except OSError as e:
            raise ImageError(f"{tmpdir}: cannot make a directory: {e.strerror}") from None
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            discard_tree(tmp)
            raise
    finally:
        os.close(parent)  # the shared lock goes with it
    try:
        try:
            if sync:
                with writeback(fd) as failed:
                    result = unpack(fd)
                try:
                    if failed:
                        raise failed[0]
                    syncfs(fd)
                except OSError as e:
                    raise ImageError(f"{final}: flushing to disk: {e.strerror}") from None
            else:
                result = unpack(fd)
            if replace_empty:
                with contextlib.suppress(FileNotFoundError, OSError):
                    os.rmdir(final)  # only if empty
            published = publish(tmp, final)
        finally:
            os.close(fd)
        if not published:
            discard_tree(tmp)
    except BaseException:
        discard_tree(tmp)
        raise
    return result, published


def clean_stale(tmpdir: Path) -> None:
    """Drop what unpacks that died left in *tmpdir*: the directories nobody holds
    locked (see ``unpack_into``)."""
    parent = os.open(tmpdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(parent, fcntl.LOCK_EX)
        for name in os.listdir(parent):
            try:
                fd = os.open(name, _DIR_NOFOLLOW, dir_fd=parent)
            except OSError:
                continue  # not a directory, or gone
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live unpack
            finally:
                os.close(fd)
            discard_tree(tmpdir / name)
    finally:
        os.close(parent)


class LayerCache:
    def __init__(self, root: Path, limits: Limits | None = None) -> None:
        self.root = root
        self.limits = limits or Limits()
        try:
            (root / "tmp").mkdir(parents=True, exist_ok=True, mode=0o700)
            (root / "layers" / "sha256").mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as e:
            raise ImageError(f"cache {root}: {e.strerror}") from None

    def path(self, diff_id: Digest) -> Path:
        return self.root / "layers" / diff_id.algorithm / diff_id.hex

    def empty_dir(self) -> Path:
        """An empty directory: a neutral bottom layer where one is needed."""
        path = self.root / "empty"
        path.mkdir(mode=0o755, exist_ok=True)
        return path

    def ensure(self, layer: LayerRef, count: int, progress: Progress | None = None) -> Path:
        """The cached directory of *layer*, unpacked and verified first if needed."""
        final = self.path(layer.diff_id)
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.root / "tmp")

        def unpack(fd: int) -> None:
            unpack_layer(layer, fd, layer_label(layer, count), self.limits, progress)

        prefix = f"{layer.diff_id.hex[:16]}.{os.getpid()}."
        unpack_into(final, self.root / "tmp", prefix, unpack, sync=True)
        return final
