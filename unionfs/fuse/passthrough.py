"""Which opens the kernel serves by itself (FUSE passthrough), decided per open.

With passthrough, the reply to an open names a *backing file* (a real file
registered with the FUSE device, see ``csrc/passthrough.c``) and the kernel
then reads, writes and maps it directly: the daemon sees no READ or WRITE for
that open. That is only right when nothing the daemon does later must change
what the open file shows. So an open is passed through when its file is in the
upper layer (it never moves again), or a lower file when no copy-up can ever
happen (a read-only mount). A lower file opened read-only on a writable mount
is served by the daemon (``cached``): after a copy-up, it must show the upper
copy, as on the kernel overlay. ``passthrough=on`` passes those through too;
see ``write_blocked`` for what that costs.

The kernel's rules for one inode (fs/fuse/iomode.c): while a file is open
through passthrough, every other open of that inode must be passed through
with the same backing file, and while one is open through the page cache, none
may be passed through (a reply that breaks either rule fails the caller's open
with EIO). So each inode's opens are counted by kind, a new open follows the
kind already there, and one backing file serves all its passthrough opens.

Privileges: a write through passthrough reaches the backing file with the
daemon's credentials, which would keep setuid/setgid. But before it, the
kernel checks the writer's own credentials against the FUSE inode
(file_remove_privs) and, when bits must go, sends a setattr: under KILLPRIV_V2
an otherwise empty one, which the daemon answers by dropping them
(``Operations.setattr``), and the reply refreshes the mode the kernel shows.
``security.capability`` it asks for and removes the same way. So passthrough
writes drop privileges as on the kernel overlay, whoever writes and whoever
opened the file.

Page cache: a file written through passthrough may still have pages in the
kernel's cache from an earlier open through the daemon. So an open of an upper
file through the daemon drops them (no ``keep_cache``); with passthrough on,
such opens are rare (a file that is also open read-only from before its
copy-up). Lower files never change: their pages are kept.
"""

from __future__ import annotations

import errno
from types import ModuleType

from unionfs import lazylog
from unionfs.records import Record

TYPE_CHECKING = False

if TYPE_CHECKING:
    from unionfs.overlay.layers import Layer
    from unionfs.overlay.nodes import Node

log = lazylog.get(__name__)

MODES = ("auto", "on", "off")

# Filesystems that stack on others (mountinfo names): a backing file there needs the
# mount to allow one more level of stacking, after which nothing could stack over it.
STACKED_FILESYSTEMS = {"overlay", "ecryptfs"}

PASSTHROUGH, CACHED = "passthrough", "cached"


class Plan(Record):
    """How one open is answered."""

    kind: str
    tag: int = 0  # the backing id, carried in the file handle's upper half
    keep_cache: bool = True


CACHED_PLAN = Plan(CACHED)


class _InodeIO:
    """The opens of one inode the kernel knows of, by kind."""

    __slots__ = ("cached", "passthrough", "backing", "layer")

    def __init__(self) -> None:
        self.cached = 0
        self.passthrough = 0
        self.backing = 0  # backing id while passthrough > 0
        self.layer: Layer | None = None  # where that backing file is


class Passthrough:
    """The per-open decisions and the backing files they hold.

    *mode* is the ``passthrough=`` option; *copy_up_possible* is False for a
    read-only mount, whose lower files can then be passed through safely.
    Nothing is passed through until ``start`` finds it negotiated.
    """

    def __init__(self, hook: ModuleType | None, mode: str, copy_up_possible: bool) -> None:
        self._hook = hook
        self.mode = mode
        self._lower_ok = mode == "on" or not copy_up_possible
        self.active = False
        self._inodes: dict[int, _InodeIO] = {}
        self._opens: dict[int, tuple[int, str]] = {}  # fh -> (inode, kind)
        self._failed: set[int] = set()  # errnos of failed backing_open already logged

    def start(self, active: bool) -> None:
        """Called once the kernel's INIT is handled."""
        self.active = active and self.mode != "off"

    # -- decisions -----------------------------------------------------------

    def lower_reads_cached(self) -> bool:
        """Whether a read-only open of a lower file is served by the daemon through the
        page cache, never passed through (the ``plan`` of such an open, as long as
        nothing passes the inode through: ``passthrough=on`` or a read-only mount)."""
        return not (self.active and self._lower_ok)

    def plan(self, node: Node, layer: Layer, fd: int) -> Plan:
        """Decide how an open of *node* (its real regular file *fd* in *layer*) is
        answered, and register a backing file when it is passed through. Call
        ``opened`` with the handle once it exists."""
        if not self.active:
            return CACHED_PLAN
        io = self._inodes.get(node.ino)
        if io is None:
            io = self._inodes[node.ino] = _InodeIO()
        if io.passthrough > 0:
            # The same backing file for every open: even a lower one after a copy-up
            # (passthrough=on), whose data stays the upper copy's (write_blocked).
            return Plan(PASSTHROUGH, io.backing, keep_cache=False)
        if io.cached == 0 and (layer.writable or self._lower_ok):
            backing = self._backing_open(fd)
            if backing:
                io.backing, io.layer = backing, layer
                return Plan(PASSTHROUGH, backing, keep_cache=False)
        return Plan(CACHED, keep_cache=not layer.writable)

    def write_blocked(self, node: Node) -> bool:
        """Whether *node* cannot be written now: a lower file open read-only through
        passthrough (only with ``passthrough=on``). Every open of the inode must use
        that lower backing file, so none may write it, nor may a truncate change the
        upper copy under it: the caller gets ETXTBSY until those opens are closed."""
        io = self._inodes.get(node.ino)
        return (
            io is not None
            and io.passthrough > 0
            and io.layer is not None
            and (not io.layer.writable)
        )

    def _backing_open(self, fd: int) -> int:
        assert self._hook is not None
        try:
            backing: int = self._hook.backing_open(fd)
        except OSError as e:
            # ELOOP: the file is on a stacked filesystem; EPERM: no CAP_SYS_ADMIN; ...
            if e.errno not in self._failed:
                self._failed.add(e.errno or 0)
                log.warning("passthrough refused for a file (%s); served by the daemon", e)
            return 0
        return backing

    # -- bookkeeping ---------------------------------------------------------

    def opened(self, fh: int, node: Node, plan: Plan) -> None:
        """The kernel got handle *fh* answered by *plan*."""
        if not self.active:
            return
        io = self._inodes[node.ino]
        if plan.kind == PASSTHROUGH:
            io.passthrough += 1
        elif plan.kind == CACHED:
            io.cached += 1
        self._opens[fh] = (node.ino, plan.kind)

    def adopted(self, fh: int, node: Node, backing: int = 0, layer: Layer | None = None) -> None:
        """The kernel got handle *fh* from the C hook (csrc/opens.c): a lower file opened
        without passthrough, or one it created, passed through with the *backing* id of
        that file in *layer* (its first open: the hook hands it over before ``plan``
        of another, see ``claim_ino``). What ``plan`` would have decided for it."""
        if not self.active:
            return
        io = self._inodes.get(node.ino)
        if io is None:
            io = self._inodes[node.ino] = _InodeIO()
        if backing:
            if io.passthrough and io.backing != backing:  # cannot be: see above
                log.warning("inode %d passed through with two backing files", node.ino)
            io.passthrough += 1
            io.backing, io.layer = backing, layer
            self._opens[fh] = (node.ino, PASSTHROUGH)
            return
        io.cached += 1
        self._opens[fh] = (node.ino, CACHED)

    def not_opened(self, node: Node, plan: Plan) -> None:
        """*plan* was made, but the open failed before the kernel got a handle."""
        if not self.active:
            return
        io = self._inodes.get(node.ino)
        if io is not None and plan.kind == PASSTHROUGH and io.passthrough == 0:
            self._close(io)
        self._forget_if_idle(node.ino)

    def released(self, fh: int) -> None:
        found = self._opens.pop(fh, None)
        if found is None:
            return
        ino, kind = found
        io = self._inodes[ino]
        if kind == PASSTHROUGH:
            io.passthrough -= 1
            if io.passthrough == 0:
                self._close(io)
        elif kind == CACHED:
            io.cached -= 1
        self._forget_if_idle(ino)

    def _close(self, io: _InodeIO) -> None:
        assert self._hook is not None
        try:
            self._hook.backing_close(io.backing)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("closing backing file %d: %s", io.backing, e)
        except RuntimeError:
            pass  # the session has ended (unmount): the kernel dropped its backing files
        io.backing, io.layer = 0, None

    def _forget_if_idle(self, ino: int) -> None:
        io = self._inodes.get(ino)
        if io is not None and io.cached == 0 and io.passthrough == 0:
            del self._inodes[ino]

    def counts(self) -> dict[str, int]:
        """Open handles by kind (for tests and the debug log)."""
        out = {PASSTHROUGH: 0, CACHED: 0}
        for _ino, kind in self._opens.values():
            out[kind] += 1
        return out
