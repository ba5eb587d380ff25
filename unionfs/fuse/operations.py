"""The pyfuse3 adapter: each handler turns a FUSE request into a call on the union.

This is the error boundary. Only ``FUSEError`` may leave a pyfuse3 handler:
any other exception would end ``pyfuse3.main()`` and the mount with it. So an
``OSError`` becomes its errno, and anything else is a bug, logged with its
traceback and answered with EIO while the mount goes on.

The FUSE protocol's own bookkeeping lives here too: which replies give the
kernel a reference to an inode (each one is a ``hold`` on the node, undone by
``forget``), and directory handles and offsets (``unionfs.fuse.listing``).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import itertools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import ModuleType
from typing import Any, TypeVar, cast

import pyfuse3
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, RequestContext

from unionfs.fuse import hook, tracing
from unionfs.fuse.listing import COOKIE_BITS, COOKIE_MASK, Cookied, Cookies, DirHandle, cookie_of
from unionfs.fuse.passthrough import CACHED, Passthrough
from unionfs.overlay import namespace
from unionfs.overlay.files import Change, Files, Kill, wants_write
from unionfs.overlay.idmap import IdMapper
from unionfs.overlay.namespace import Caller
from unionfs.overlay.nodes import Node
from unionfs.overlay.union import Union, is_name_only

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# Lower layers cannot change while mounted, and every change to the upper goes
# through this daemon, so the kernel may keep what it was told for long: it
# drops what it cached itself when a request through it changes a name, and
# the union tells it (``attr_changed``) when a change has effects it cannot see.
ENTRY_TIMEOUT = 300.0
ATTR_TIMEOUT = 300.0


DEBUG = False  # set by the command line for -d: log every request and its errno

# The name the C hook gives an O_TMPFILE request it hands to create: no real name
# holds a slash.
TMPFILE_NAME = b"/"

# A listing entry without a node: the C hook (csrc/ino.c) reports it with node id
# 0 and the st_ino in the low bits. No node id has these high bits.
NODELESS_TAG = 0xFFFE << 48


def boundary(fn: F) -> F:
    """Map OSError to its errno; turn any other exception into a logged EIO.

    Every request passes here, so the path without an error does nothing else
    unless request logging is on.
    """
    return cast(F, _guard(fn, answer=True))


# The requests that never change where a node's data is (the rest may: a copy-up, a
# new whiteout, a name removed). An open is one when it only reads.
_KEEPS_LAYERS = frozenset(
    [
        "lookup",
        "forget",
        "getattr",
        "readlink",
        "read",
        "write",
        "release",
        "fsync",
        "opendir",
        "readdir",
        "releasedir",
        "fsyncdir",
        "statfs",
        "getxattr",
        "listxattr",
        "access",
    ]
)


def _guard(fn: Callable[..., Awaitable[Any]], answer: bool) -> Callable[..., Awaitable[Any]]:
    """The boundary around *fn*. Without *answer* (requests the kernel expects no
    reply to, like forget) every error is only logged.

    It also keeps the C hook from answering opens while a request that may change
    the layers is in progress, and takes over the handles it has (``_COpens``)."""
    name = fn.__name__
    keeps = name in _KEEPS_LAYERS
    is_open = name == "open"

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        if DEBUG:
            log.debug("%s%r", name, args[1:])
        c_opens: _COpens | None = args[0].c_opens
        changes = (
            c_opens is not None and not keeps and not (is_open and not opens_to_change(args[2]))
        )
        tracer = tracing.active  # None unless someone traces the mount
        token = tracing.enter(args[0], name, args) if tracer is not None else None
        busy: memoryview | None = args[0].busy
        if busy is not None:  # no run of C answers lingers meanwhile (csrc/requests.c)
            busy[0] += 1
        try:
            if changes:
                c_opens.change_starts()  # type: ignore[union-attr]
            return await fn(*args)
        except FUSEError:
            if not answer:
                return None
            raise
        except OSError as e:
            if tracer is not None:
                tracer.failed(e)
            if not answer:
                log.warning("%s%r failed: %s", name, args[1:], e)
                return None
            if not e.errno:
                log.exception("OSError without errno in %s", name)
                raise FUSEError(errno.EIO) from None
            if DEBUG:
                log.debug("%s -> %s", name, errno.errorcode.get(e.errno, e.errno))
            raise FUSEError(e.errno) from None
        except Exception:
            if not answer:
                log.exception("unexpected error in %s%r", name, args[1:])
                return None
            log.exception("unexpected error in %s%r; answering EIO", name, args[1:])
            raise FUSEError(errno.EIO) from None
        finally:
            if busy is not None:
                busy[0] -= 1
            if changes:
                c_opens.change_ends()  # type: ignore[union-attr]
            if token is not None:
                tracing.CURRENT.reset(token)

    return wrapper


def opens_to_change(flags: int) -> bool:
    """An open that writes or truncates (it copies the file up first)."""
    return wants_write(flags) or bool(flags & os.O_TRUNC)


# How many nodes' attributes wait for the changes in progress to end (``_COpens``);
# beyond that they are not armed (many changes at once: an untar in parallel).
_ARM_LATER_MAX = 1024


class _COpens:
    """Read-only opens of lower files answered by the C hook (csrc/opens.c).

    Once the daemon has answered an open of a lower file for reading, it *arms* the
    inode, and the hook answers the next such opens alike; their handles stay in C
    (which also closes them at RELEASE) until the daemon needs one (``claim``). It
    arms only while no request that may change the layers is in progress
    (``changing``); when one starts it disarms every inode and claims every handle
    (a copy-up moves the open files of its inode): an armed inode's data is where it
    was armed. A node dropped is disarmed.

    The attributes of directories and of files in the upper layer are armed likewise
    (GETATTR, SETATTR in the upper layer, LOOKUP of missing names and CREATE in a
    directory that is only there) whenever the daemon gives them; asked
    while a change is in progress, they are armed once the last one has ended, from
    where the node is then (an untar's new file and its directory, for the requests
    that follow its CREATE). A CREATE answered in C is the one change made with no
    request that may change the layers in progress: the hook makes the file, calls
    ``Operations.created_in_c`` for its node at once, so nothing armed can see it half
    made, and keeps its handle as it keeps the read-only opens it answers."""

    def __init__(self, fusehook: ModuleType, ops: Operations) -> None:
        self._hook = fusehook
        self._ops = ops
        self.changing = 0  # requests in progress that may change the layers
        self.disarm = fusehook.disarm
        self._disarm_all = fusehook.disarm_all
        self._unclaimed = fusehook.unclaimed
        self._claim_ino = fusehook.claim_ino
        self._arm = fusehook.arm
        self._arm_dir = fusehook.arm_dir
        self._arm_upper = fusehook.arm_upper
        self.on = False
        self.attrs = False  # attributes too (owners shown as stored)
        self._later: dict[int, Node] = {}  # attributes to arm once the changes end

    def configure(self, on: bool) -> None:
        # GETATTR of an armed inode too, when its attributes are the lower file's own.
        attrs = self._ops.ids.identity
        self.claim_all()
        self._later.clear()
        self.on = bool(self._hook.configure_opens(on, attrs, ATTR_TIMEOUT, ENTRY_TIMEOUT))
        self.attrs = self.on and attrs
        ops = self._ops
        self._hook.configure_creates(
            ops.created_in_c if self.attrs and not hook.python_creates() else None,
            ops.create_replied_in_c,
            ops.union.config.writeback,
            ops.union.grpid,
        )

    def change_starts(self) -> None:
        """A request that may change the layers starts (``changing`` counts it; the
        caller counts it down when the request ends, whatever happens here)."""
        self.changing += 1
        self._disarm_all()
        if self._unclaimed():
            self.claim_all()

    def change_ends(self) -> None:
        """The request that ``change_starts`` counted has ended: when it was the last
        one, arm the attributes asked for meanwhile, of the nodes still in the table."""
        self.changing -= 1
        if self.changing or not self._later:
            return
        later, self._later = self._later, {}
        ops = self._ops
        for ino, node in later.items():
            if ops.table.find(ino) is node:
                try:
                    # The st_ino the hook shows must be its own now (a copy-up of a
                    # hard link gives it another), as when the daemon gives attributes.
                    ops.report_ino(node)
                    self.arm_attrs(node)
                except Exception:  # outside the request's boundary: never end the mount
                    log.exception("arming the attributes of inode %d", ino)

    def claim(self, fh: int) -> None:
        """Take over the handle *fh* if the hook answered its open (``Files.claim``)."""
        found = self._hook.claim(fh)
        if found is not None:
            self._file(*found)

    def claim_all(self) -> None:
        for found in self._hook.claim_all():
            self._file(*found)

    def claim_ino(self, ino: int) -> None:
        """Take over the handle of a file the hook created and passes through, before
        another open of it is planned (``Passthrough.plan``: one backing file)."""
        found = self._claim_ino(ino)
        if found is not None:
            self._file(*found)

    def _file(self, fh: int, ino: int, fd: int, flags: int, backing: int) -> None:
        """File a handle taken over from the hook. Should that fail, the handle is
        closed (the kernel then gets EBADF for it), never left on a stale fd."""
        ops = self._ops
        try:
            node = ops.table.get(ino)
            ops.files.adopt(node, fd, flags, fh)
        except Exception:  # cannot be: the kernel keeps an open file's inode
            log.exception("taking over a handle opened in C (inode %d)", ino)
            self._hook.set_fd(fh, -1)
            os.close(fd)
            return
        ops.passthrough.adopted(fh, node, backing, node.layer)

    def arm(self, node: Node) -> None:
        """After the daemon answered a read-only open of the lower file of *node*, or
        found it by LOOKUP: the next such opens are answered in C, from its place."""
        if self.on and self.changing == 0:
            place = node.place
            self._arm(node.ino, place.layer.root_fd, place.path)

    def arm_attrs(self, node: Node) -> None:
        """After the daemon gave the attributes of *node*: the next GETATTRs of a
        directory, or of a regular file in the upper layer, are answered in C from its
        topmost part, and their SETATTRs in the upper layer too."""
        if not self.attrs or node.parent is None:
            return
        is_dir = node.kind == stat.S_IFDIR
        if not is_dir and (node.kind != stat.S_IFREG or not node.layer.writable or node.metacopy):
            return  # a lower file (armed by its opens), or another kind: nothing here
        if self.changing:
            if len(self._later) < _ARM_LATER_MAX:
                self._later[node.ino] = node
            return
        union = self._ops.union
        place = node.place
        if is_dir:
            writable = place.layer.writable and not union.readonly
            one = union.nlink_is_one(node)
            sole = not node.lowers  # nothing below: a missing name is missing
            # A merged directory: a name none of its parts holds is missing too.
            parts = tuple((p.layer.root_fd, p.path) for p in node.lowers)
            self._arm_dir(node.ino, place.layer.root_fd, place.path, one, writable, sole, parts)
        elif not union.readonly:
            self._arm_upper(node.ino, place.layer.root_fd, place.path)


def no_reply_boundary(fn: F) -> F:
    """``boundary`` for a request without a reply: any error is logged, and the
    mount goes on."""
    return cast(F, _guard(fn, answer=False))


def caller(ctx: RequestContext, ids: IdMapper, mode: int = 0) -> Caller:
    """The requester, with its ids as they are stored in the layers."""
    groups: frozenset[int] = frozenset()
    if mode & stat.S_ISGID and not stat.S_ISDIR(mode) and ctx.uid != 0:
        groups = frozenset(  # only the setgid rule needs them
            ids.gids.stored_or_overflow(g) for g in pyfuse3.get_sup_groups(ctx.pid)
        )
    if ids.identity:
        return Caller(ctx.uid, ctx.gid, ctx.umask, groups)
    return Caller(
        ids.uids.stored_or_overflow(ctx.uid),
        ids.gids.stored_or_overflow(ctx.gid),
        ctx.umask,
        groups,
    )


def _no_kill() -> None:
    return None


def _only_kills(fields: pyfuse3.SetattrFields) -> bool:
    """A setattr that changes nothing: under KILLPRIV_V2 the kernel sends one when it
    wants setuid/setgid dropped and has nothing to pass the wish on with (a write
    through passthrough by a caller without CAP_FSETID, chown(-1, -1))."""
    return not (
        fields.update_size
        or fields.update_mode
        or fields.update_uid
        or fields.update_gid
        or fields.update_atime
        or fields.update_mtime
    )


def _invalidate_data(ino: int) -> None:
    """Drop the kernel's cached pages of *ino* (for a directory: its cached listing)."""
    with contextlib.suppress(OSError):
        pyfuse3.invalidate_inode(ino)


def _invalidate_attrs(ino: int) -> None:
    # OSError: the kernel does not know the inode, so it has nothing cached to drop.
    with contextlib.suppress(OSError):
        pyfuse3.invalidate_inode(ino, attr_only=True)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True

    def __init__(
        self,
        union: Union,
        fusehook: ModuleType | None = None,
        passthrough: str = "off",
    ) -> None:
        super().__init__()
        # Whether the kernel serves directories without opendir (csrc/listing.c):
        # asked once the kernel's INIT is handled; then READDIR carries the inode.
        self._hook = fusehook
        self._by_inode = False
        # Whether the kernel leaves dropping setuid/setgid to us (csrc/killpriv.c),
        # and then how to learn that the request being handled asks for it.
        self._killpriv = False
        self._request_kill: Callable[[], tuple[int, int] | None] = _no_kill
        # Which opens the kernel serves by itself (unionfs.fuse.passthrough).
        self.passthrough = Passthrough(fusehook, passthrough, copy_up_possible=not union.readonly)
        self.on_init: Callable[[], None] | None = None  # called once INIT is handled
        # RELEASE answered in C (csrc/release.c): the handles it queued are closed here.
        self._release_deferred = False
        # OPEN of lower files for reading answered in C (csrc/opens.c), once INIT is in.
        self.c_opens: _COpens | None = None
        # Python handlers in progress, for the C hook's runs of answers (csrc/requests.c).
        self.busy: memoryview | None = (
            fusehook.busy_counter().cast("i") if fusehook is not None else None
        )
        # Read by pyfuse3 when the kernel's INIT arrives (-o writeback=1).
        self.enable_writeback_cache = union.config.writeback
        self.union = union
        self.files = Files(union)
        self.table = union.table
        self.dirs: dict[int, DirHandle] = {}
        self.cookies = Cookies(union)
        self._next_dh = itertools.count(1)
        self.ids = union.config.ids
        union.on_attr_change = _invalidate_attrs
        # What the C hook adds, once the kernel's INIT is handled (see init).
        self._set_ino: Callable[[int, int], None] | None = None
        self._reported: dict[int, int] = {}  # node id -> st_ino given to the hook
        self._xattr_flags = False

    def init(self) -> None:
        """Called by pyfuse3 once the kernel's INIT is handled."""
        fusehook = self._hook
        if hook.ino_reporting(fusehook):
            assert fusehook is not None
            self._set_ino = fusehook.set_ino
            self.table.on_drop.append(self._dropped)
        if hook.ops_active(fusehook):
            assert fusehook is not None
            set_fd = fusehook.set_fd
            self._xattr_flags = True
            self.files.on_open = lambda fh, f: set_fd(fh, f.fd)
            self.files.on_close = lambda fh: set_fd(fh, -1)
            self.union.on_fd_change = lambda f: set_fd(f.fh, f.fd)
            # READ of page-cached data in C too, unless every request is to be seen.
            configure_reads = fusehook.configure_reads
            configure_reads(not DEBUG and tracing.active is None)
            if hook.feature_active(fusehook, "opens"):
                c_opens = self.c_opens = _COpens(fusehook, self)
                self.files.claim = c_opens.claim
                c_opens.configure(not DEBUG and tracing.active is None)
                self.table.on_drop.append(lambda node: c_opens.disarm(node.ino))

            def traced(on: bool) -> None:  # every request is to be seen while traced
                configure_reads(not DEBUG and not on)
                if self.c_opens is not None:
                    self.c_opens.configure(not DEBUG and not on)

            tracing.on_change = traced
        else:
            log.debug("no fallocate, SEEK_DATA or copy_file_range; setxattr flags unseen")
        self._by_inode = hook.listing_active(fusehook)
        if self._by_inode:
            log.debug("directory listings are cached by the kernel (no opendir)")
        else:
            log.debug("directory listings go through opendir handles (listing hook not active)")
        self._killpriv = hook.killpriv_active(self._hook)
        if self._killpriv:
            assert self._hook is not None
            self._request_kill = self._hook.request_kill
        self.passthrough.start(hook.passthrough_state(self._hook)["active"])
        if self._hook is not None and hook.feature_active(self._hook, "caps"):
            self.union.on_caps_known = self._hook.caps_known
        self._release_deferred = hook.release_deferred(self._hook)
        log.debug(
            "killpriv_v2 %s, passthrough %s",
            "on" if self._killpriv else "off",
            "on" if self.passthrough.active else "off",
        )
        if self.on_init is not None:
            self.on_init()

    def _kill(self, ctx: RequestContext | None = None) -> Kill | None:
        """The privilege bits this request's truncate or write must drop: the kernel
        says so under KILLPRIV_V2 (a caller without CAP_FSETID); without it, an
        O_TRUNC open by a caller other than root. Ask before the handler's first await.
        """
        if self._killpriv:
            sender = self._request_kill()
            return None if sender is None else self._kill_by(*sender)
        if ctx is not None and ctx.uid != 0:
            return self._kill_by(ctx.gid, ctx.pid)
        return None

    def _kill_by(self, gid: int, pid: int, root: bool = False) -> Kill:
        """A kill by the caller with *gid* and *pid*: setgid without group-exec goes
        only if that caller is not in the file's group (and is not root)."""
        ids = self.ids

        def in_group(file_gid: int) -> bool:
            if root:
                return True
            try:
                groups = {gid, *pyfuse3.get_sup_groups(pid)}
            except OSError:
                groups = {gid}  # the caller is gone: count only its own group
            return file_gid in {ids.gids.stored_or_overflow(g) for g in groups}

        return Kill(in_group)

    # -- helpers -------------------------------------------------------------

    def _entry(self, node: Node, st: os.stat_result | None = None) -> EntryAttributes:
        if st is None:
            st = self.union.stat(node)
        e = EntryAttributes()
        e.st_ino = node.ino
        e.generation = node.generation
        e.entry_timeout = ENTRY_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = st.st_mode
        e.st_nlink = self.union.shown_nlink(node, st)
        self._known(node)
        ids = self.ids
        if ids.identity:
            e.st_uid = st.st_uid
            e.st_gid = st.st_gid
        else:
            e.st_uid = ids.uids.shown(st.st_uid)
            e.st_gid = ids.gids.shown(st.st_gid)
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _known(self, node: Node) -> None:
        """The kernel is given the attributes of *node*: the hook shows its st_ino, and
        may answer its next GETATTRs (``_COpens.arm_attrs``)."""
        self.report_ino(node)
        if self.c_opens is not None:
            self.c_opens.arm_attrs(node)

    def report_ino(self, node: Node) -> None:
        """Tell the hook which st_ino to show for *node*, if that changed."""
        if self._set_ino is not None and node.st_ino != self._reported.get(node.ino, node.ino):
            self._report_ino(node)

    def _report_ino(self, node: Node) -> None:
        """Tell the hook which st_ino to show for *node* (its id when they agree)."""
        assert self._set_ino is not None
        self._set_ino(node.ino, node.st_ino)
        if node.st_ino == node.ino:
            self._reported.pop(node.ino, None)
        else:
            self._reported[node.ino] = node.st_ino

    def _dropped(self, node: Node) -> None:
        """A node left the table: its id may come back for another inode."""
        if node.ino in self._reported:
            assert self._set_ino is not None
            self._set_ino(node.ino, node.ino)
            del self._reported[node.ino]

    def _node(self, ino: int) -> Node:
        return self.union.node(ino)

    @contextlib.contextmanager
    def _names_change(self, *parents: Node) -> Iterator[None]:
        """Around a request that adds or removes names in *parents*: their cached
        listings are dropped afterwards, whether it succeeded or not (a failed
        rename may have made a directory opaque). The kernel drops its own."""
        try:
            yield
        except BaseException:
            # The kernel drops its cached listing only after a success; a failure
            # may still have changed names (a whiteout made, then an error).
            for parent in parents:
                _invalidate_data(parent.ino)
            raise
        finally:
            for parent in parents:
                self.cookies.names_changed(parent)
                if self.c_opens is not None:
                    # The kernel asks for their attributes again (their times moved);
                    # armed when the change (every names change is one) has ended.
                    self.c_opens.arm_attrs(parent)

    def _reply_entry(self, node: Node, st: os.stat_result | None = None) -> EntryAttributes:
        """An entry reply, which gives the kernel a reference to *node*."""
        self.table.hold(node)
        try:
            return self._entry(node, st)
        except BaseException:
            self.table.release(node)
            raise

    # -- names ---------------------------------------------------------------

    @boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        found = self.union.lookup(self._node(parent_inode), name)
        if found is None:
            # A negative entry the kernel may cache: names appear only through this mount,
            # and the kernel forgets a negative entry when it creates that name.
            miss = EntryAttributes()
            miss.st_ino = 0
            miss.entry_timeout = ENTRY_TIMEOUT
            return miss
        node = found[0]
        reply = self._reply_entry(*found)
        if (
            self.c_opens is not None
            and node.kind == stat.S_IFREG
            and not node.layer.writable
            and not node.metacopy
            and self.passthrough.lower_reads_cached()
        ):
            # A lower file looked up by name is usually opened next (an exec, a module
            # found along a search path): its first read-only open is answered in C too,
            # as the daemon would answer it (``_opened``).
            self.c_opens.arm(node)
        return reply

    @no_reply_boundary
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.table.release_ino(ino, count)

    @boundary
    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        return self._entry(self._node(inode))

    @boundary
    async def setattr(
        self,
        inode: int,
        attr: EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        kill = self._kill() if self._killpriv else None  # before any await
        if kill is None and self._killpriv and _only_kills(fields):
            kill = self._kill_by(ctx.gid, ctx.pid, root=ctx.uid == 0)
        elif kill is not None and (fields.update_uid or fields.update_gid):
            # The kernel asks for a kill with every chown, whoever calls; as the VFS
            # does, root keeps a setgid bit without group-exec.
            kill = self._kill_by(ctx.gid, ctx.pid, root=ctx.uid == 0)
        elif not self._killpriv and (fields.update_uid or fields.update_gid) and ctx.uid != 0:
            # Without KILLPRIV_V2 the kernel drops setgid before a chown only with
            # group-exec; the VFS also drops it when the caller is not in the file's
            # group, and the daemon's own chown (as root) would keep it.
            kill = self._kill_by(ctx.gid, ctx.pid)
        change = Change(
            kill=kill,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=self.ids.uids.stored(attr.st_uid) if fields.update_uid else None,
            gid=self.ids.gids.stored(attr.st_gid) if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        node = self._node(inode)
        if change.size is not None and self.passthrough.write_blocked(node):
            self.release_queued()  # a reader closed just before: its RELEASE waits there
            if self.passthrough.write_blocked(node):
                raise FUSEError(errno.ETXTBSY)
        await self.files.setattr(node, change, fh)
        return self._entry(node)

    @boundary
    async def readlink(self, inode: int, ctx: RequestContext) -> bytes:
        return self.union.readlink(self._node(inode))

    @boundary
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        parent = self._node(parent_inode)
        with self._names_change(parent):
            node = await namespace.create_node(
                self.union, parent, name, mode, caller(ctx, self.ids, mode), rdev=rdev
            )
        return self._reply_entry(node)

    @boundary
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: RequestContext
    ) -> EntryAttributes:
        mode = stat.S_IFDIR | stat.S_IMODE(mode)
        parent = self._node(parent_inode)
        with self._names_change(parent):
            node = await namespace.create_node(
                self.union, parent, name, mode, caller(ctx, self.ids, mode)
            )
        return self._reply_entry(node)

    @boundary
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: RequestContext
    ) -> EntryAttributes:
        parent = self._node(parent_inode)
        with self._names_change(parent):
            node = await namespace.create_node(
                self.union,
                parent,
                name,
                stat.S_IFLNK | 0o777,
                caller(ctx, self.ids),
                target=target,
            )
        return self._reply_entry(node)

    @boundary
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: RequestContext
    ) -> EntryAttributes:
        parent = self._node(new_parent_inode)
        with self._names_change(parent):
            node = await namespace.link(self.union, self._node(inode), parent, new_name)
        return self._reply_entry(node)

    @boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        parent = self._node(parent_inode)
        with self._names_change(parent):
            await namespace.remove(self.union, parent, name, want_dir=False)

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        parent = self._node(parent_inode)
        with self._names_change(parent):
            await namespace.remove(self.union, parent, name, want_dir=True)

    @boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: RequestContext,
    ) -> None:
        old_parent = self._node(parent_inode_old)
        new_parent = self._node(parent_inode_new)
        with self._names_change(old_parent, new_parent):
            await namespace.rename(self.union, old_parent, name_old, new_parent, name_new, flags)

    # -- files ---------------------------------------------------------------

    def release_queued(self) -> None:
        """Close what the handles the kernel released (answered in C) still hold: at
        each open, now and then, and at unmount."""
        if not self._release_deferred:
            return
        for fh in hook.take_released(self._hook):
            try:
                self._release(fh)
            except Exception:
                log.exception("releasing file handle %d", fh)

    @boundary
    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        kill = self._kill(ctx)  # before any await: it describes this request
        self.release_queued()
        node = self._node(inode)
        if self.c_opens is not None:
            self.c_opens.claim_ino(node.ino)  # a file the hook created, still open there
        if wants_write(flags) and self.passthrough.write_blocked(node):
            raise FUSEError(errno.ETXTBSY)
        fd = await self.files.open_fd(node, flags, kill=kill)
        return self._opened(node, fd, flags)

    def _opened(self, node: Node, fd: int, flags: int) -> FileInfo:
        """The reply to an open or create of *node* on its real *fd* (in ``node.layer``):
        the handle, and whether the kernel serves it by itself (passthrough)."""
        # *fd* is in the layer with the data: a lower one for a metadata-only copy.
        plan = self.passthrough.plan(node, self.union.data_layer(node), fd)
        try:
            fh = self.files.add(node, fd, flags, tag=plan.tag)
        except BaseException:
            self.passthrough.not_opened(node, plan)
            os.close(fd)
            raise
        self.passthrough.opened(fh, node, plan)
        if (
            self.c_opens is not None
            and plan.kind == CACHED
            and plan.keep_cache
            and not node.layer.writable
            and not node.metacopy
            and not opens_to_change(flags)
            and node.parent is not None
        ):
            # The next opens like this one are answered in C (csrc/opens.c).
            self.c_opens.arm(node)
        return FileInfo(fh=fh, keep_cache=plan.keep_cache)

    @boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        self.release_queued()
        parent = self._node(parent_inode)
        st: os.stat_result | None = None
        if name == TMPFILE_NAME:  # O_TMPFILE, handed over by the C hook (csrc/ops.c)
            node, fd = await namespace.create_tmpfile(
                self.union, parent, mode, flags, caller(ctx, self.ids, mode)
            )
        else:
            with self._names_change(parent):
                node, fd, st = await namespace.create_file(
                    self.union, parent, name, mode, flags, caller(ctx, self.ids, mode)
                )
        info = self._opened(node, fd, flags)
        try:
            return info, self._reply_entry(node, st)
        except BaseException:
            self._release(info.fh)  # the kernel never learns of this open
            raise

    def created_in_c(self, parent_inode: int, name: bytes, fd: int) -> tuple[int, int] | None:
        """A regular file the C hook made for a CREATE in a directory only in the upper
        layer (csrc/opens.c), open on *fd*, which the hook keeps as the handle (like the
        opens it answers): the node for it, called from the hook while it answers.
        Returns the node's number and generation, with the reference the reply gives
        the kernel held; or None, and the hook removes the file and the request comes
        here the ordinary way. Never raises (nothing outside a request would catch it)."""
        node: Node | None = None
        try:
            parent = self._node(parent_inode)
            node = namespace.adopt_created(self.union, parent, name, os.fstat(fd))
            self.union.caps_absent(node)  # a file just made has no capability
            self.cookies.names_changed(parent)
            self.report_ino(node)  # (the hook arms its attributes itself)
            self.table.hold(node)
        except BaseException:
            log.exception("a file created in C (%r in inode %d)", name, parent_inode)
            if node is not None:
                self.table.maybe_drop(node)
            return None
        return node.ino, node.generation

    def create_replied_in_c(self, ino: int, delivered: bool) -> None:
        """After the reply to a CREATE answered in C (``created_in_c``): what can wait
        for it, done while the caller goes on. Not *delivered* (the caller was
        interrupted), the kernel has no reference to node *ino*."""
        try:
            if not delivered:
                self.table.release_ino(ino, 1)
            self.release_queued()  # at every open, as ``create`` does
        except BaseException:
            log.exception("after a file created in C (inode %d)", ino)

    @boundary
    async def read(  # type: ignore[override]  # pyfuse3 takes any buffer, not just bytes
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        return await self.files.read(fh, off, size)

    @boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.files.write(fh, off, buf, self._kill() if self._killpriv else None)

    @boundary
    async def release(self, fh: int) -> None:
        self._release(fh)

    def _release(self, fh: int) -> None:
        self.files.release(fh)
        self.passthrough.released(fh)

    @boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.files.fsync(fh, datasync)

    # -- directories ---------------------------------------------------------

    @boundary
    async def opendir(self, inode: int, ctx: RequestContext) -> int:
        if self._by_inode:
            # The kernel stops sending opendir/releasedir and caches listings;
            # each READDIR then carries the directory's inode as its handle.
            raise FUSEError(errno.ENOSYS)
        node = self._node(inode)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        dh = next(self._next_dh)
        self.dirs[dh] = DirHandle(node)
        self.table.hold(node)
        return dh

    @boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if self._by_inode:
            self._readdir_by_inode(self._node(fh), start_id, token)
            return
        dh = self.dirs[fh]
        if dh.entries is None or start_id == 0:
            # An open handle keeps its own listing: offsets index into it.
            dh.entries = [(i + 2, e) for i, e in enumerate(self.union.listing(dh.node))]
        self._reply_entries(dh.node, dh.entries, max(start_id - 2, 0), start_id, 0, token)

    def _readdir_by_inode(self, node: Node, offset: int, token: pyfuse3.ReaddirToken) -> None:
        """READDIR without an open handle; the kernel caches what it gets.

        An offset is a cookie (low 32 bits) and the directory's name generation
        when this read began at offset 0 (high bits), carried along the read.
        The kernel's cache has a race: a reply computed before a name changed can
        be stored after the change, when another reader has restarted filling the
        cache, and the cache then completes with the stale names. Such a read is
        known by its old generation: when it reaches its end, its pages are
        dropped before the (empty) last reply, so the kernel finds the finished
        cache incomplete on the next read and fills it anew.
        """
        listing = self.cookies.listing(node)
        now = self.cookies.generation(node)
        gen = offset >> COOKIE_BITS if offset else now
        start = offset & COOKIE_MASK
        first = bisect.bisect_left(listing, start, key=cookie_of)
        sent = self._reply_entries(node, listing, first, start, gen << COOKIE_BITS, token)
        if not sent and gen != now:
            _invalidate_data(node.ino)

    def _reply_entries(
        self,
        node: Node,
        listing: list[Cookied],
        first: int,
        start: int,
        high: int,
        token: pyfuse3.ReaddirToken,
    ) -> int:
        """Fill one READDIRPLUS reply from *listing*, (cookie, entry) pairs, from index
        *first*; returns how many entries it holds (0: the end of the directory).
        The offset that continues after an entry is *high* | (its cookie + 1)."""
        union = self.union
        sent = 0
        # "." and ".." first, as cookies 0 and 1; the kernel counts no lookup for them.
        for cookie, name, target in ((0, b".", node), (1, b"..", node.parent or node)):
            if start <= cookie:
                if not pyfuse3.readdir_reply(token, name, self._entry(target), high | (cookie + 1)):
                    return sent
                sent += 1
        fresh = node.layer.writable  # stats of upper entries may have changed since
        for i in range(first, len(listing)):
            cookie, entry = listing[i]
            child: Node | None = None
            try:
                # Entries of a directory with an upper part are looked up again: the
                # listing may even be from before the directory was copied up.
                if fresh or is_name_only(entry):
                    found = union.lookup(node, entry.name)
                    if found is None:
                        continue  # removed since the listing was taken
                    child, st = found
                else:
                    child, st = union.node_for(node, entry), entry.st
                attrs = self._entry(child, st)
            except OSError:
                # Listed but not found (an invalid redirect, a metacopy without data):
                # the kernel lists it, and says why on lookup.
                nameonly = self._nodeless(node, entry.name)
                if nameonly is None:
                    continue
                child, attrs = None, nameonly
            if not pyfuse3.readdir_reply(token, entry.name, attrs, high | (cookie + 1)):
                if child is not None:
                    self.table.maybe_drop(child)
                return sent
            if child is not None:
                self.table.hold(child)  # each entry given is a reference, as with lookup
            sent += 1
        return sent

    def _nodeless(self, node: Node, name: bytes) -> EntryAttributes | None:
        """A listing entry without a node (FUSE node id 0): its name, type and number.

        The C hook turns the tagged number into node id 0 and that st_ino; without
        the hook such a name is left out of the listing."""
        if self._set_ino is None:
            return None
        raw = self.union.raw_entry(node, name)
        if raw is None:
            return None
        layer, st = raw
        ino = self.union.inos.real(layer, st.st_ino)
        if ino >= NODELESS_TAG:
            return None
        e = EntryAttributes()
        e.st_ino = NODELESS_TAG | ino
        e.st_mode = st.st_mode
        e.entry_timeout = 0
        e.attr_timeout = 0
        return e

    @boundary
    async def releasedir(self, fh: int) -> None:
        dh = self.dirs.pop(fh)
        self.table.release(dh.node)

    @boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        node = self._node(fh) if self._by_inode else self.dirs[fh].node
        await self.files.fsync_dir(node)

    @boundary
    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        sv = self.union.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = sv.f_bsize
        out.f_frsize = sv.f_frsize
        out.f_blocks = sv.f_blocks
        out.f_bfree = sv.f_bfree
        out.f_bavail = sv.f_bavail
        out.f_files = sv.f_files
        out.f_ffree = sv.f_ffree
        out.f_favail = sv.f_favail
        out.f_namemax = sv.f_namemax
        return out

    # -- extended attributes -------------------------------------------------

    @boundary
    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        return self.union.getxattr(self._node(inode), name)

    @boundary
    async def listxattr(self, inode: int, ctx: RequestContext) -> list[bytes]:
        return self.union.listxattr(self._node(inode))

    @boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: RequestContext) -> None:
        flags = 0
        if self._xattr_flags:  # the hook puts the flags in front of the value
            flags, value = value[0], value[1:]
        await self.files.setxattr(self._node(inode), name, value, flags)

    @boundary
    async def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        await self.files.removexattr(self._node(inode), name)

    @boundary
    async def access(self, inode: int, mode: int, ctx: RequestContext) -> bool:
        # default_permissions makes the kernel check modes itself; this is only
        # reached for existence checks.
        self.union.stat(self._node(inode))
        return True
