"""``unionfs convert --to kernel|oci DIR``: rewrite a layer's markers in the other format.

In place, one entry at a time, and each entry atomically as far as the layer's
meaning goes: the new marker is written first, then the old one removed. In
between both are there, and they say the same thing to unionfs (which honours
both formats in a lower layer), so a crash at any point leaves a layer that
shows the same tree; running the command again finishes the work.

- ``--to kernel``: ``.wh.NAME`` becomes a character device 0/0 ``NAME`` (when
  the layer also has its own ``NAME``, the whiteout is dropped, and a directory
  ``NAME`` becomes opaque, which is what the pair means in the OCI format);
  ``.wh..wh..opq`` becomes the opaque xattr, and an opaque xattr in the other
  namespace moves to this stack's (``trusted.overlay.*``, or ``user.overlay.*``
  with ``--userxattr``).
- ``--to oci``: a whiteout becomes ``.wh.NAME`` and the opaque xattr (either
  namespace) becomes ``.wh..wh..opq``. A whiteout of a name longer than 251
  bytes, a directory or device named ``.wh.*``, a redirect and a metacopy have
  no OCI form: each is reported and left as it is (exit status 1).

A directory whose entries are rewritten gets its access and modification times
back afterwards, so the converted layer shows the same tree, times included;
directories are read with ``O_NOATIME`` where the caller may, so ``--dry-run``
changes nothing at all. A mount inside the layer is not descended into (the
kernel overlay does not see it either: it sees the directory under it); it is
reported and left as it is.

A directory that is, is inside or holds a layer, the upper or the workdir of a
live unionfs or kernel overlay mount is refused (``--dry-run`` may still look). A
live unionfs mount's layers are found in the state its daemon publishes
(``unionfs.fuse.state``); while one publishes none this process can read, its
layers are unknown and every directory is refused (fail closed), naming that mount
and why its state could not be read.

Each change is reported as soon as it is made, so the output of a run that fails
or is interrupted (Ctrl-C stops it between two entries) lists exactly what was
done. Every marker is written and read through ``unionfs.overlay.markers``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from unionfs.errors import UsageError
from unionfs.fuse import state
from unionfs.inspect import markerinfo
from unionfs.inspect.names import directory_arg, printable
from unionfs.overlay import markers
from unionfs.overlay.markers import TRUSTED, USER, XattrNamespace
from unionfs.overlay.syscalls import fd_path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Change:
    rel: bytes
    action: str  # what was (or would be) done
    ok: bool = True

    def path(self, root: bytes) -> str:
        return printable(os.path.join(root, self.rel) if self.rel else root)

    def as_json(self, root: bytes) -> dict[str, object]:
        return {
            "path": self.path(root),
            "relpath": printable(self.rel),
            "action": self.action,
            "ok": self.ok,
        }


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class Converter:
    def __init__(
        self,
        root: Path,
        to: str,
        dry_run: bool,
        ns: XattrNamespace,
        report: Callable[[Change], None] | None = None,
    ) -> None:
        self.root = root
        self.to = to
        self.dry_run = dry_run
        self.ns = ns
        self.report = report  # called with each change as soon as it is made
        self.changes: list[Change] = []
        self.stop = False  # set (by a signal handler) to stop before the next entry
        self._broot = os.fsencode(root)
        self._dev = 0
        self._mounts: set[bytes] = set()
        self._dirty = False  # the directory being converted had an entry made or removed

    def run(self) -> list[Change]:
        with contextlib.suppress(OSError):
            self._mounts = {m.mountpoint for m in state.mountinfo()}
        rootfd = self._open(-1, self._broot, b"")
        try:
            self._dev = os.fstat(rootfd).st_dev
            # The root is reached as "." in itself: markers.py writes a directory's
            # xattrs through a name in a directory fd, and "/" has no name in a parent.
            self._dir(rootfd, b".", b"")
        finally:
            os.close(rootfd)
        return self.changes

    def _note(self, rel: bytes, action: str, ok: bool = True) -> None:
        change = Change(rel, action, ok)
        self.changes.append(change)
        if self.report is not None:
            self.report(change)

    def _shown(self, rel: bytes) -> str:
        return printable(os.path.join(self._broot, rel) if rel else self._broot)

    @contextlib.contextmanager
    def _doing(self, rel: bytes, what: str, xattr: bytes = b"") -> Iterator[None]:
        """Say which step on which path failed, as one line (not the fd path the
        call was made with)."""
        try:
            yield
        except OSError as e:
            hint = ""
            if xattr.startswith(TRUSTED.prefix) and e.errno in (errno.EPERM, errno.EACCES):
                hint = (
                    " (only root, with CAP_SYS_ADMIN, may write trusted.* xattrs; --userxattr "
                    "writes user.overlay.* instead, for a stack mounted with userxattr)"
                )
            raise UsageError(
                f"{self._shown(rel)}: cannot {what}: {e.strerror or e}{hint}"
            ) from None

    def _check_stop(self) -> None:
        if self.stop:
            raise KeyboardInterrupt

    def _open(self, parent_fd: int, name: bytes, rel: bytes) -> int:
        """Open the directory *name* without touching its access time where the caller
        may (the owner, or root): reading it must not change what the layer shows."""
        dir_fd = parent_fd if parent_fd >= 0 else None
        with self._doing(rel, "open the directory"):
            try:
                return os.open(name, _DIR_FLAGS | os.O_NOATIME, dir_fd=dir_fd)
            except PermissionError:
                return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)

    def _dir(self, parent_fd: int, dname: bytes, rel: bytes) -> None:
        """Convert directory *dname* of *parent_fd* (*rel* in the layer) and everything below."""
        self._check_stop()
        fd = self._open(parent_fd, dname, rel)
        try:
            with self._doing(rel, "stat the directory"):
                before = os.fstat(fd)
            self._dirty = False
            try:
                names = self._entries(parent_fd, dname, fd, rel)
            finally:
                if self._dirty:
                    self._restore_times(fd, rel, before)
            for name in names:
                self._check_stop()
                st = self._stat(fd, rel, name)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    continue
                child = _join(rel, name)
                if st.st_dev != self._dev or os.path.join(self._broot, child) in self._mounts:
                    self._note(
                        child,
                        "a mount point: not descended into (the kernel overlay sees the "
                        "directory under it); left as is",
                        ok=False,
                    )
                    continue
                self._dir(fd, name, child)
        finally:
            os.close(fd)

    def _entries(self, parent_fd: int, dname: bytes, fd: int, rel: bytes) -> list[bytes]:
        """Convert the markers of the directory *fd* itself and of its entries; its
        entries' names."""
        if self.to == "oci":
            self._opaque_to_oci(parent_fd, dname, fd, rel)
        else:
            self._opaque_namespace(parent_fd, dname, fd, rel)
        with self._doing(rel, "read the directory"), os.scandir(fd) as it:
            names = sorted(os.fsencode(d.name) for d in it)
        for name in names:
            self._check_stop()
            st = self._stat(fd, rel, name)
            if st is None:
                continue  # removed by an earlier conversion in this directory
            if self.to == "kernel":
                self._to_kernel(parent_fd, dname, fd, rel, name, st)
            else:
                self._to_oci(fd, rel, name, st)
                self._unconvertible(fd, rel, name)
        return names

    def _stat(self, fd: int, rel: bytes, name: bytes) -> os.stat_result | None:
        with self._doing(_join(rel, name), "stat"):
            try:
                return os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return None

    def _restore_times(self, fd: int, rel: bytes, before: os.stat_result) -> None:
        """Give the directory back the times it had before its entries were rewritten:
        a merged view shows them."""
        try:
            os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))
        except OSError as e:
            self._note(
                rel,
                f"its entries were rewritten but its times could not be restored: {e.strerror}",
                ok=False,
            )

    def _unlink(self, fd: int, rel: bytes, name: bytes) -> None:
        with self._doing(_join(rel, name), "remove it"):
            os.unlink(name, dir_fd=fd)
        self._dirty = True

    def _set_opaque(self, parent_fd: int, name: bytes, rel: bytes) -> None:
        with self._doing(rel, f"set {self.ns.opaque.decode()}", self.ns.opaque):
            markers.set_opaque(parent_fd, name, self.ns)

    # -- OCI -> kernel ---------------------------------------------------------------

    def _to_kernel(
        self, parent_fd: int, dname: bytes, fd: int, rel: bytes, name: bytes, st: os.stat_result
    ) -> None:
        if not stat.S_ISREG(st.st_mode) or not markers.is_oci_name(name):
            return
        path = _join(rel, name)
        if name == markers.OCI_OPAQUE:
            if not self.dry_run:
                self._set_opaque(parent_fd, dname, rel)
                self._unlink(fd, rel, name)
            self._note(rel, f"opaque: {printable(markers.OCI_OPAQUE)} -> {self.ns.opaque.decode()}")
            return
        deleted = markers.oci_deleted(name)
        assert deleted is not None
        target = _join(rel, deleted)
        own = self._stat(fd, rel, deleted)
        if own is None or markers.is_whiteout(own):
            if not self.dry_run:
                if own is None:
                    with self._doing(target, "make a whiteout (a character device 0/0)"):
                        markers.make_device_whiteout(fd, deleted)
                    self._dirty = True
                self._unlink(fd, rel, name)
            self._note(target, f"whiteout: {printable(path)} -> character device 0/0")
        elif stat.S_ISDIR(own.st_mode):
            # Both a directory and its whiteout: the OCI format's "replaced" directory.
            if not self.dry_run:
                self._set_opaque(fd, deleted, target)
                self._unlink(fd, rel, name)
            self._note(
                target, f"whiteout beside a directory: {printable(path)} -> opaque directory"
            )
        else:
            if not self.dry_run:
                self._unlink(fd, rel, name)
            self._note(
                path, "whiteout of a name this layer has itself: removed (it hid nothing more)"
            )

    # -- kernel -> OCI ---------------------------------------------------------------

    def _to_oci(self, fd: int, rel: bytes, name: bytes, st: os.stat_result) -> None:
        path = _join(rel, name)
        if markers.is_whiteout(st):
            if len(name) > markers.OCI_NAME_MAX:
                self._note(
                    path,
                    f"whiteout of a {len(name)}-byte name: no OCI form (.wh. + name > 255 bytes); left as is",
                    ok=False,
                )
                return
            oci_name = markers.oci_whiteout_name(name)
            if not self.dry_run:
                with (
                    self._doing(_join(rel, oci_name), "make the whiteout file"),
                    contextlib.suppress(FileExistsError),
                ):
                    markers.make_oci_whiteout(fd, name)
                self._unlink(fd, rel, name)
            self._note(path, f"whiteout: character device 0/0 -> {printable(oci_name)}")
        elif markers.is_oci_name(name) and not stat.S_ISREG(st.st_mode):
            # (A .wh. file is an OCI marker already: a lower layer means it so.)
            self._note(
                path,
                "a non-file named .wh.*: in the OCI format it would be a marker; left as is",
                ok=False,
            )

    def _opaque_namespace(self, parent_fd: int, name: bytes, fd: int, rel: bytes) -> None:
        """An opaque xattr in the other namespace moves to this stack's (``--userxattr``)."""
        other = markers.other(self.ns)
        found = markerinfo.xattrs(fd_path(fd), follow=True)
        if found.get(other.opaque) != b"y" or found.get(self.ns.opaque) == b"y":
            return
        if not self.dry_run:
            self._set_opaque(parent_fd, name, rel)
            markers.clear_opaque(parent_fd, name, other)
        self._note(rel, f"opaque: {other.opaque.decode()} -> {self.ns.opaque.decode()}")

    def _unconvertible(self, fd: int, rel: bytes, name: bytes) -> None:
        """Redirects and metadata-only copies have no form in the OCI format."""
        found = markerinfo.xattrs(fd_path(fd, name))
        for ns in (TRUSTED, USER):
            for what in (b"redirect", b"metacopy"):
                if ns.prefix + what in found:
                    xattr = (ns.prefix + what).decode()
                    self._note(
                        _join(rel, name),
                        f"{xattr}: a {what.decode()} has no OCI form; left as is",
                        ok=False,
                    )

    def _opaque_to_oci(self, parent_fd: int, name: bytes, fd: int, rel: bytes) -> None:
        found = markerinfo.xattrs(fd_path(fd), follow=True)
        for ns in (TRUSTED, USER):
            if found.get(ns.opaque) != b"y":
                continue
            if not self.dry_run:
                with self._doing(_join(rel, markers.OCI_OPAQUE), "make the opaque file"):
                    markers.make_oci_opaque(fd)
                self._dirty = True
                markers.clear_opaque(parent_fd, name, ns)
            self._note(rel, f"opaque: {ns.opaque.decode()} -> {printable(markers.OCI_OPAQUE)}")


# -- the live-mount guard ---------------------------------------------------------------


@dataclass
class _LiveDir:
    """A directory a live mount uses."""

    path: bytes  # as the mount names it
    role: str  # "a layer", "the upper", "the workdir"
    mount: bytes  # its mountpoint
    kind: str  # "live mount" (unionfs) or "live kernel overlay mount"


def _unescape_layer(value: bytes) -> bytes:
    """A layer path as the kernel overlay takes it from its options: a backslash
    keeps the next byte as it is (the kernel's ``ovl_unescape``)."""
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i : i + 1] == b"\\":
            i += 1
        out += value[i : i + 1]
        i += 1
    return bytes(out)


def _split_lowerdir(value: bytes) -> list[bytes]:
    """The layers of a kernel overlay's ``lowerdir=``: split at each ``:`` a backslash
    does not escape (``::`` before the data-only layers), then unescaped."""
    parts: list[bytes] = []
    cur = bytearray()
    i = 0
    while i < len(value):
        c = value[i : i + 1]
        if c == b"\\":
            cur += value[i : i + 2]
            i += 2
            continue
        if c == b":":
            if cur:
                parts.append(_unescape_layer(bytes(cur)))
            cur = bytearray()
        else:
            cur += c
        i += 1
    if cur:
        parts.append(_unescape_layer(bytes(cur)))
    return parts


def _overlay_dirs(mount: bytes, options: bytes) -> list[_LiveDir]:
    """The directories a kernel overlay mount uses, from its super options in
    mountinfo. The kernel shows ``lowerdir``, ``upperdir`` and ``workdir`` as the
    mount was given them (the backslash escapes too), ``lowerdir+`` and ``datadir+``
    as they are; mountinfo then writes a comma, space, tab, newline or backslash
    as ``\\ooo``. A relative path (as given to mount) cannot be resolved now: left out."""
    kind = "live kernel overlay mount"
    out: list[_LiveDir] = []
    for option in options.split(b","):
        key, eq, raw = option.partition(b"=")
        if not eq:
            continue
        value = state.unescape_mountinfo(raw)
        if key == b"lowerdir":
            out += [_LiveDir(p, "a layer", mount, kind) for p in _split_lowerdir(value)]
        elif key in (b"lowerdir+", b"datadir+"):
            out.append(_LiveDir(value, "a layer", mount, kind))
        elif key == b"upperdir":
            out.append(_LiveDir(_unescape_layer(value), "the upper", mount, kind))
        elif key == b"workdir":
            out.append(_LiveDir(_unescape_layer(value), "the workdir", mount, kind))
    return [d for d in out if d.path.startswith(b"/")]


@dataclass
class _Unknown:
    """A live unionfs mount whose layers cannot be known: it publishes no state this
    process can read."""

    mount: bytes  # its mountpoint
    device: str  # MAJ:MIN
    owner: int | None  # its user_id
    why: str  # what ``state.find_state`` says


# A mount that has just started may take a moment to publish its state (as
# ``stacks.from_mount`` waits for it).
STATE_WAIT = 2.0


def _unionfs_dirs(mount: bytes, live: state.MountState) -> list[_LiveDir]:
    """The layers, upper and workdir of the unionfs mount at *mount*, from its state."""
    kind = "live mount"
    out = []
    for lower in live.config.get("lowers", []):
        out.append(_LiveDir(os.fsencode(lower), "a layer", mount, kind))
    for key, role in (("upper", "the upper"), ("work", "the workdir")):
        if live.config.get(key) is not None:
            out.append(_LiveDir(os.fsencode(live.config[key]), role, mount, kind))
    return out


def _owner(options: bytes) -> int | None:
    """A FUSE mount's ``user_id``, from its super options in mountinfo."""
    for opt in options.split(b","):
        if opt.startswith(b"user_id=") and opt[8:].isdigit():
            return int(opt[8:])
    return None


def _live_dirs(wait: float = STATE_WAIT) -> tuple[list[_LiveDir], list[_Unknown]]:
    """Every layer, upper and workdir of the live unionfs and kernel overlay mounts;
    and the live unionfs mounts whose state cannot be read (after up to *wait*
    seconds), whose layers are unknown."""
    out: list[_LiveDir] = []
    unknown: list[_Unknown] = []
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return out, unknown
    for line in lines:
        fields = line.split()
        if b"-" not in fields[6:]:
            continue
        sep = fields.index(b"-", 6)
        mount = state.unescape_mountinfo(fields[4])
        fstype = fields[sep + 1] if len(fields) > sep + 1 else b""
        if fstype == b"overlay" and len(fields) > sep + 3:
            out += _overlay_dirs(mount, fields[sep + 3])
        elif fstype == state.FSTYPE.encode():
            device = fields[2].decode()
            owner = _owner(fields[sep + 3]) if len(fields) > sep + 3 else None
            live, why = state.find_state(device, owner)
            if live is None:
                unknown.append(_Unknown(mount, device, owner, why))
            else:
                out += _unionfs_dirs(mount, live)
    deadline = time.monotonic() + wait
    while unknown and time.monotonic() < deadline:
        time.sleep(0.05)
        left = []
        for u in unknown:
            live, why = state.find_state(u.device, u.owner)
            if live is None:
                u.why = why
                left.append(u)
            else:
                out += _unionfs_dirs(u.mount, live)
        unknown = left
    return out, unknown


def _identity(path: bytes) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _lineage(path: bytes) -> set[tuple[int, int]]:
    """The identities of *path* and of each directory above it."""
    out = set()
    while True:
        ident = _identity(path)
        if ident is not None:
            out.add(ident)
        parent = os.path.dirname(path)
        if parent == path:
            return out
        path = parent


def _live_conflict(root: Path, ignore: Sequence[bytes] = ()) -> str | None:
    """Why *root* must not be converted now: it is, is inside or holds a layer, the
    upper or the workdir of a live unionfs or kernel overlay mount; or a live unionfs
    mount publishes no state this process can read, so its layers are unknown (fail
    closed: they might be any directory), unless its mountpoint is in *ignore* (the
    caller vouches that it does not use *root*). Directories are compared by identity
    (device and inode), so another path to the same one (a symlink, a bind mount) is
    caught too."""
    broot = os.fsencode(root)
    mine = _identity(broot)
    above = _lineage(broot)
    dirs, unknown = _live_dirs()
    for d in dirs:
        real = os.path.realpath(d.path)
        ident = _identity(real)
        if ident is None:
            continue
        where = f"{d.kind} at {printable(d.mount)}: unmount it first"
        if ident == mine:
            return f"{printable(broot)} is {d.role} of the {where}"
        if ident in above:
            return f"{printable(broot)} is inside {printable(real)}, {d.role} of the {where}"
        if mine in _lineage(real):
            return f"{printable(broot)} holds {printable(real)}, {d.role} of the {where}"
    for u in unknown:
        if u.mount in ignore:
            continue
        return (
            f"the live unionfs mount at {printable(u.mount)} publishes no state this command "
            f"can read ({u.why}): its layers are unknown, so nothing is converted while it "
            f"is mounted; unmount it first, or --ignore-mount {printable(u.mount)} if it "
            "uses nothing in or around this directory"
        )
    return None


def _as_mountinfo(mountpoint: str) -> bytes:
    """*mountpoint* as mountinfo names it: its parent resolved, not the mountpoint
    itself (that would ask the mount's daemon, which may not answer)."""
    path = os.path.abspath(mountpoint)
    parent, name = os.path.split(path)
    return os.fsencode(os.path.join(os.path.realpath(parent), name) if name else path)


# -- the command ---------------------------------------------------------------------


@contextlib.contextmanager
def _stopped_by_sigint(conv: Converter) -> Iterator[None]:
    """Ctrl-C stops the run between two entries, so none is left half converted (a
    second one stops it at once, in a call that hangs, say)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if conv.stop:
            raise KeyboardInterrupt
        conv.stop = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(
    directory: str,
    to: str,
    dry_run: bool = False,
    as_json: bool = False,
    userxattr: bool = False,
    ignore_mounts: Sequence[str] = (),
) -> int:
    """Convert, printing each change as it is made (``--json``: one JSON object per
    line, then one with the summary), and the summary also when it stops early.
    *ignore_mounts*: mountpoints of live unionfs mounts whose unreadable state does
    not stop the conversion (the caller vouches that they do not use *directory*);
    a mount whose layers are known is never ignored."""
    root = directory_arg(directory)
    if not dry_run:
        busy = _live_conflict(root, [_as_mountinfo(m) for m in ignore_mounts])
        if busy is not None:
            raise UsageError(busy)
    broot = os.fsencode(root)

    def show(c: Change) -> None:
        if as_json:
            line = json.dumps(c.as_json(broot))
        else:
            line = f"{c.path(broot)}: {'' if c.ok else 'not converted: '}{c.action}"
        _write(line)

    conv = Converter(root, to, dry_run, USER if userxattr else TRUSTED, report=show)
    stopped = None
    try:
        with _stopped_by_sigint(conv):
            conv.run()
    except KeyboardInterrupt:
        stopped = "interrupted"
        raise
    except BaseException as e:
        stopped = str(e) or type(e).__name__
        raise
    finally:
        _summary(conv, as_json, stopped)
    return 1 if any(not c.ok for c in conv.changes) else 0


def _summary(conv: Converter, as_json: bool, stopped: str | None) -> None:
    done = sum(c.ok for c in conv.changes)
    left = len(conv.changes) - done
    verb = "would change" if conv.dry_run else "changed"
    text = f"{verb} {done} markers to the {conv.to} format; {left} left as they are"
    if stopped == "interrupted":
        text = f"interrupted: {text}"
        if not conv.dry_run:
            text += "; running the command again finishes the work"
    elif stopped is not None:
        text = f"stopped by an error: {text}"
    if as_json:
        out = {"summary": text, "changed": done, "left": left, "complete": stopped is None}
        if stopped is not None:
            out["stopped"] = stopped
        text = json.dumps(out)
    _write(text)


def _write(line: str) -> None:
    """One line on stdout, out at once. A reader that goes away (``| head``) ends the
    listing, not the conversion."""
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
