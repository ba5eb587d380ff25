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

Every marker is written and read through ``unionfs.overlay.markers``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from unionfs.errors import UsageError
from unionfs.fuse import state
from unionfs.inspect import markerinfo
from unionfs.overlay import markers
from unionfs.overlay.markers import TRUSTED, USER, XattrNamespace
from unionfs.overlay.syscalls import fd_path


@dataclass
class Change:
    rel: bytes
    action: str  # what was (or would be) done
    ok: bool = True

    def as_json(self) -> dict[str, object]:
        return {"path": os.fsdecode(self.rel), "action": self.action, "ok": self.ok}


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class Converter:
    def __init__(self, root: Path, to: str, dry_run: bool, ns: XattrNamespace) -> None:
        self.root = root
        self.to = to
        self.dry_run = dry_run
        self.ns = ns
        self.changes: list[Change] = []

    def run(self) -> list[Change]:
        # The root too is reached as a name in its parent, as markers.py writes them.
        pfd = os.open(self.root.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._dir(pfd, os.fsencode(self.root.name), b"")
        finally:
            os.close(pfd)
        return self.changes

    def _note(self, rel: bytes, action: str, ok: bool = True) -> None:
        self.changes.append(Change(rel, action, ok))

    def _dir(self, parent_fd: int, dname: bytes, rel: bytes) -> None:
        """Convert directory *dname* of *parent_fd* (*rel* in the layer) and everything below."""
        fd = os.open(
            dname, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd
        )
        try:
            if self.to == "oci":
                self._opaque_to_oci(parent_fd, dname, fd, rel)
            else:
                self._opaque_namespace(parent_fd, dname, fd, rel)
            with os.scandir(fd) as it:
                names = sorted(os.fsencode(d.name) for d in it)
            for name in names:
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed by an earlier conversion in this directory
                if self.to == "kernel":
                    self._to_kernel(parent_fd, dname, fd, rel, name, st)
                else:
                    self._to_oci(fd, rel, name, st)
                if self.to == "oci":
                    self._unconvertible(fd, rel, name)
            for name in names:
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    self._dir(fd, name, _join(rel, name))
        finally:
            os.close(fd)

    # -- OCI -> kernel ---------------------------------------------------------------

    def _to_kernel(
        self, parent_fd: int, dname: bytes, fd: int, rel: bytes, name: bytes, st: os.stat_result
    ) -> None:
        if not stat.S_ISREG(st.st_mode) or not markers.is_oci_name(name):
            return
        path = _join(rel, name)
        if name == markers.OCI_OPAQUE:
            self._note(
                rel, f"opaque: {os.fsdecode(markers.OCI_OPAQUE)} -> {self.ns.opaque.decode()}"
            )
            if not self.dry_run:
                markers.set_opaque(parent_fd, dname, self.ns)
                os.unlink(name, dir_fd=fd)
            return
        deleted = markers.oci_deleted(name)
        assert deleted is not None
        target = _join(rel, deleted)
        try:
            own = os.stat(deleted, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            own = None
        if own is None or markers.is_whiteout(own):
            self._note(target, f"whiteout: {os.fsdecode(path)} -> character device 0/0")
            if not self.dry_run:
                if own is None:
                    markers.make_device_whiteout(fd, deleted)
                os.unlink(name, dir_fd=fd)
        elif stat.S_ISDIR(own.st_mode):
            # Both a directory and its whiteout: the OCI format's "replaced" directory.
            self._note(
                target, f"whiteout beside a directory: {os.fsdecode(path)} -> opaque directory"
            )
            if not self.dry_run:
                markers.set_opaque(fd, deleted, self.ns)
                os.unlink(name, dir_fd=fd)
        else:
            self._note(
                path, "whiteout of a name this layer has itself: removed (it hid nothing more)"
            )
            if not self.dry_run:
                os.unlink(name, dir_fd=fd)

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
            self._note(
                path,
                f"whiteout: character device 0/0 -> {os.fsdecode(markers.oci_whiteout_name(name))}",
            )
            if not self.dry_run:
                with contextlib.suppress(FileExistsError):
                    markers.make_oci_whiteout(fd, name)
                os.unlink(name, dir_fd=fd)
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
        self._note(rel, f"opaque: {other.opaque.decode()} -> {self.ns.opaque.decode()}")
        if not self.dry_run:
            markers.set_opaque(parent_fd, name, self.ns)
            markers.clear_opaque(parent_fd, name, other)

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
            self._note(rel, f"opaque: {ns.opaque.decode()} -> {os.fsdecode(markers.OCI_OPAQUE)}")
            if not self.dry_run:
                markers.make_oci_opaque(fd)
                markers.clear_opaque(parent_fd, name, ns)


def _in_live_mount(root: Path) -> str | None:
    """The mountpoint of a live unionfs whose layer *root* is, if any."""
    with contextlib.suppress(OSError):
        for m in state.mountinfo():
            if m.fstype != state.FSTYPE:
                continue
            live = state.read_state(m.device)
            if live is None:
                continue
            paths = [*live.config.get("lowers", []), live.config.get("upper")]
            if any(p is not None and Path(p) == root for p in paths):
                return live.mountpoint
    return None


def run(
    directory: str, to: str, dry_run: bool = False, as_json: bool = False, userxattr: bool = False
) -> int:
    root = Path(os.path.realpath(directory))
    if not root.is_dir():
        raise UsageError(f"{directory}: not a directory")
    busy = _in_live_mount(root)
    if busy is not None and not dry_run:
        raise UsageError(f"{root} is a layer of the live mount at {busy}: unmount it first")
    conv = Converter(root, to, dry_run, USER if userxattr else TRUSTED)
    try:
        changes = conv.run()
    except PermissionError as e:
        raise UsageError(
            f"{e.filename or root}: {e.strerror} (making whiteouts needs root)"
        ) from None
    failed = 0
    for c in changes:
        failed += not c.ok
        if as_json:
            print(json.dumps(c.as_json()))
        else:
            mark = "" if c.ok else "not converted: "
            print(f"{os.fsdecode(os.path.join(os.fsencode(root), c.rel))}: {mark}{c.action}")
    verb = "would change" if dry_run else "changed"
    done = sum(c.ok for c in changes)
    print(
        f"{verb} {done} markers to the {to} format; {failed} left as they are",
        file=sys.stderr if as_json else sys.stdout,
    )
    return 1 if failed else 0
