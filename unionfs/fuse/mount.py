"""Checking a layer set-up, then mounting it and serving requests until unmount.

Every check runs before anything is mounted or written, so a refused set-up
leaves nothing behind. The workdir and upperdir are locked for the life of the
mount: a second daemon over the same upper would corrupt it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from unionfs import lazylog
from unionfs.errors import UsageError
from unionfs.fuse import state
from unionfs.fuse.state import unescape_mountinfo
from unionfs.options import Options
from unionfs.overlay import markers
from unionfs.overlay.idmap import IdMapper, IdTable
from unionfs.overlay.markers import TRUSTED, USER, XattrNamespace
from unionfs.overlay.union import UnionConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    import trio

    from unionfs.fuse.operations import Operations
    from unionfs.overlay.union import Union

log = lazylog.get(__name__)

FSTYPE = "fuse.unionfs"


class Setup:
    """A checked set-up: absolute, symlink-free paths and the locks that guard them."""

    trace_path: Path | None = None  # -o trace=FILE, opened (append) before the mount
    trace_fd: int | None = None
    publish: bool = True  # the mount's state, for the inspection tools (see check_setup)

    def __init__(
        self,
        config: UnionConfig,
        mountpoint: Path,
        fuse_options: set[str],
        lock_fds: list[int],
        passthrough: str = "off",
        stack_depth: int = 0,
        passthrough_note: str = "",
    ) -> None:
        self.config = config
        self.mountpoint = mountpoint
        self.fuse_options = fuse_options
        self.lock_fds = lock_fds
        self.passthrough = passthrough  # auto | on | off, as resolved (see _passthrough)
        self.stack_depth = stack_depth  # how deep backing files may stack (0: plain fs)
        self.passthrough_note = passthrough_note  # why passthrough is off or limited

    def release(self) -> None:
        for fd in self.lock_fds:
            os.close(fd)
        self.lock_fds.clear()
        if self.trace_fd is not None:
            os.close(self.trace_fd)
            self.trace_fd = None


def resolve_dir(kind: str, raw: str) -> Path:
    """Resolve *raw* against the caller's cwd (following symlinks) and insist on a directory."""
    from unionfs.inspect.names import printable  # one line, whatever bytes the path has

    path = Path(os.path.abspath(raw))
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"{kind} {printable(raw)}: {e.strerror}") from None
    if not _is_dir(st):
        raise UsageError(f"{kind} {printable(raw)}: not a directory")
    return Path(os.path.realpath(path))


def _is_dir(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode)


def _check_lowers_apart(lowers: list[Path]) -> None:
    """As the kernel: a lower layer given twice ("conflicting lowerdir path"), or one
    inside another ("overlapping lowerdir path"), is refused."""
    seen: set[Path] = set()
    for path in lowers:  # linear: podman may give a hundred layers
        if path in seen:
            raise UsageError(f"lowerdir {path} is given twice")
        seen.add(path)
    for path in lowers:
        for parent in path.parents:
            if parent in seen:
                raise UsageError(f"lowerdir {path} is inside lowerdir {parent}")


def _inside(a: Path, b: Path) -> bool:
    """Whether *a* is *b* or lies below it."""
    return a == b or b in a.parents


def mounted_at(path: Path) -> str | None:
    """The filesystem type mounted exactly at *path*, from mountinfo (no stat: a dead
    FUSE mount would hang it). Paths are compared as bytes, escapes undone."""
    target = os.fsencode(path)
    found = None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                if unescape_mountinfo(fields[4]) == target:
                    found = fields[fields.index(b"-") + 1].decode(errors="replace")
    except OSError:
        return None
    return found


def filesystem_types(paths: list[Path]) -> dict[Path, str]:
    """The type of the filesystem each path is on, from mountinfo by device number."""
    devs = {}
    for path in paths:
        st = os.stat(path)
        devs[path] = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}".encode()
    types: dict[bytes, str] = {}
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                types[fields[2]] = fields[fields.index(b"-") + 1].decode(errors="replace")
    except OSError:
        return {}
    return {path: types[dev] for path, dev in devs.items() if dev in types}


def check_setup(opts: Options, mountpoint: str, repeated_lowers: bool = False) -> Setup:
    """The set-up *opts* describe, checked as the kernel checks its own (and more).
    *repeated_lowers*: one directory may be given as several layers (an image that
    has one layer twice: its cached directory), which the kernel refuses."""
    if not opts.lowers:
        raise UsageError("no lowerdir given (-o lowerdir=TOP:...:BOTTOM)")
    if (opts.upper is None) != (opts.work is None):
        given, missing = ("upperdir", "workdir") if opts.work is None else ("workdir", "upperdir")
        raise UsageError(f"{given} needs {missing} too")
    lowers = [resolve_dir("lowerdir", p) for p in opts.lowers]
    if not repeated_lowers:
        _check_lowers_apart(lowers)
    upper = work = None
    if opts.upper is not None and opts.work is not None:
        upper = resolve_dir("upperdir", opts.upper)
        work = resolve_dir("workdir", opts.work)

    raw_mnt = Path(os.path.abspath(mountpoint))
    if mounted_at(raw_mnt) == FSTYPE or mounted_at(Path(os.path.realpath(raw_mnt))) == FSTYPE:
        raise UsageError(f"mountpoint {mountpoint}: a unionfs is already mounted there")
    mnt = resolve_dir("mountpoint", mountpoint)

    named = [("lowerdir", p) for p in lowers]
    if upper is not None and work is not None:
        if _inside(upper, work) or _inside(work, upper):
            raise UsageError(f"upperdir {upper} and workdir {work} must be separate directories")
        if os.stat(upper).st_dev != os.stat(work).st_dev:
            raise UsageError(f"workdir {work} is not on the same filesystem as upperdir {upper}")
        for lower in lowers:
            for kind, path in (("upperdir", upper), ("workdir", work)):
                if _inside(path, lower) or _inside(lower, path):
                    raise UsageError(f"{kind} {path} and lowerdir {lower} overlap")
        named += [("upperdir", upper), ("workdir", work)]
    for kind, path in named:
        if _inside(mnt, path):
            raise UsageError(f"mountpoint {mnt} is inside {kind} {path}")
        if _inside(path, mnt):
            raise UsageError(f"{kind} {path} is inside mountpoint {mnt}")

    trace = _trace_path(opts.trace, mnt, named) if opts.trace is not None else None

    check_fuse_device()
    unprivileged = os.geteuid() != 0
    if unprivileged and upper is not None:
        _check_owned("upperdir", upper)
    if unprivileged and ("allow_other" in opts.fuse or "allow_root" in opts.fuse):
        _check_user_allow_other("allow_other" if "allow_other" in opts.fuse else "allow_root")

    locks: list[int] = []
    try:
        if upper is not None and work is not None:
            for kind, path in (("upperdir", upper), ("workdir", work)):
                if not opts.readonly:
                    _check_writable(kind, path)
                locks.append(_lock(kind, path))
        xattrs = _xattr_namespace(opts, work)
    except BaseException:
        for fd in locks:
            os.close(fd)
        raise

    fuse = {"fsname=unionfs", "subtype=unionfs", "default_permissions"}
    if not unprivileged:
        # Like the kernel overlay: other users and setuid binaries in a container work.
        fuse |= {"allow_other", "suid", "dev"}
    fuse |= opts.fuse
    # A layer on a nosuid/nodev filesystem must not gain those powers through this mount.
    for path in [*lowers, *([upper] if upper is not None else [])]:
        flags = os.statvfs(path).f_flag
        if flags & os.ST_NOSUID:
            fuse.add("nosuid")
        if flags & os.ST_NODEV:
            fuse.add("nodev")
    for flag, opposite in (("suid", "nosuid"), ("dev", "nodev"), ("exec", "noexec")):
        if opposite in fuse:
            fuse.discard(flag)
    readonly = opts.readonly or upper is None
    if readonly:
        fuse.add("ro")
    passthrough, depth, note = _passthrough(
        opts, [*lowers, *([upper] if upper is not None else [])]
    )
    config = UnionConfig(
        lowers=lowers,
        upper=upper,
        work=work,
        readonly=readonly,
        fsync=opts.fsync,
        sync_copy_up=opts.sync_copy_up,
        writeback=opts.writeback,
        static_nlink=opts.static_nlink,
        acl=opts.acl,
        xattrs=xattrs,
        redirect=redirect_mode(opts, xattrs),
        metacopy=opts.metacopy,
        ids=id_mapper(opts),
    )
    setup = Setup(config, mnt, fuse, locks, passthrough, depth, note)
    if trace is not None:
        from unionfs.fuse import tracing  # a FIFO: opened without waiting for a reader

        try:
            setup.trace_fd = tracing.open_file(trace)
        except OSError as e:
            setup.release()
            raise UsageError(f"trace file {trace}: {e.strerror}") from None
        setup.trace_path = trace
    inside = _runtime_dir_in([("mountpoint", mnt), *named])
    if inside is not None:
        setup.publish = False
        rundir, kind, where = inside
        log.warning(
            "the runtime directory %s is inside the %s %s: the mount's state is not "
            "published, so unionfs explain, check and trace --follow will not find it "
            "(set %s to a directory outside it)",
            rundir,
            kind,
            where,
            state.RUNDIR_ENV,
        )
    return setup


def id_mapper(opts: Options) -> IdMapper:
    """The owner mapping that ``uidmapping``/``gidmapping``/``squash_*`` ask for."""
    squash_uid = (
        opts.squash_uid if opts.squash_uid is not None else (0 if opts.squash_root else None)
    )
    squash_gid = (
        opts.squash_gid if opts.squash_gid is not None else (0 if opts.squash_root else None)
    )
    return IdMapper(IdTable(opts.uid_map, squash_uid), IdTable(opts.gid_map, squash_gid))


def _runtime_dir_in(places: list[tuple[str, Path]]) -> tuple[Path, str, Path] | None:
    """The runtime directory (resolved), with the first of *places* (kind, path; the
    mountpoint first) it lies in; None when in none. Asked before mounting: it stats
    the way there. A state written in the mount would wait on this very daemon before
    it serves (a hang); in a layer, it would change what the layer shows, unless on
    another filesystem mounted there."""
    rundir = Path(os.path.realpath(state.runtime_dir()))
    existing = rundir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    for i, (kind, where) in enumerate(places):
        if _inside(rundir, where) and (i == 0 or os.stat(existing).st_dev == os.stat(where).st_dev):
            return rundir, kind, where
    return None


def _trace_path(raw: str, mnt: Path, named: list[tuple[str, Path]]) -> Path:
    """The trace file's absolute path: outside the mount (writing it would wait on
    the daemon itself) and outside every layer (it would change what they show)."""
    path = Path(os.path.abspath(raw))
    parent = Path(os.path.realpath(path.parent))
    if not parent.is_dir():
        raise UsageError(f"trace file {raw}: no such directory {path.parent}")
    path = parent / path.name
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        is_dir = False
    except OSError as e:  # its directory cannot be searched
        raise UsageError(f"trace file {raw}: {e.strerror}") from None
    if is_dir:
        raise UsageError(f"trace file {raw}: is a directory")
    for kind, where in [("mountpoint", mnt), *named]:
        if _inside(path, where):
            raise UsageError(f"trace file {path} is inside {kind} {where}")
    return path


def _passthrough(opts: Options, layers: list[Path]) -> tuple[str, int, str]:
    """The passthrough mode this mount can have, the stacking depth it needs, and
    what to log about it.

    Registering backing files needs CAP_SYS_ADMIN, and the kernel does not pass
    files through under its write-back cache. A backing file on a stacking
    filesystem (a layer on overlayfs: the nested-container case) needs the mount
    to declare one more level of stacking, after which no overlay can be mounted
    over this one; ``auto`` keeps the mount stackable and turns passthrough off
    there, ``on`` takes the deeper stack.
    """
    from unionfs.fuse.passthrough import STACKED_FILESYSTEMS

    mode = opts.passthrough
    if mode == "off":
        return "off", 0, ""
    why = None
    if opts.writeback:
        why = "writeback=1 (the kernel does not pass files through under its write-back cache)"
    elif os.geteuid() != 0:
        why = "not running as root (backing files need CAP_SYS_ADMIN)"
    if why is not None:
        if mode == "on":
            raise UsageError(f"passthrough=on: not possible with {why}")
        return "off", 0, f"passthrough off: {why}"
    stacked = next(
        (p for p, t in filesystem_types(layers).items() if t in STACKED_FILESYSTEMS), None
    )
    if stacked is None:
        return mode, 0, ""
    if mode == "on":
        return (
            "on",
            1,
            f"layer {stacked} is on a stacked filesystem: nothing can stack over this mount",
        )
    return "off", 0, f"passthrough off: layer {stacked} is on a stacked filesystem (on allows it)"


FUSE_DEVICE = os.makedev(10, 229)


def check_fuse_device() -> None:
    """/dev/fuse must be the FUSE character device and openable for reading and writing."""
    try:
        st = os.stat("/dev/fuse")
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"/dev/fuse: {e.strerror} (is the fuse module loaded?)") from None
    os.close(fd)
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != FUSE_DEVICE:
        raise UsageError("/dev/fuse: not the FUSE device (expected character device 10:229)")


def redirect_mode(opts: Options, xattrs: XattrNamespace) -> str:
    """The redirect_dir mode. As the kernel's ``userxattr``, markers in ``user.overlay.*``
    allow neither redirects nor metacopy: redirects found are refused (EPERM), and
    asking for either is an error."""
    if not xattrs.userxattr:
        return opts.redirect or "follow"
    asked = [f"redirect_dir={opts.redirect}"] if opts.redirect in ("on", "follow") else []
    if opts.metacopy:
        asked = ["metacopy=on"]
    if asked:
        why = "" if opts.userxattr else " (trusted.* xattrs cannot be written here)"
        raise UsageError(f"conflicting options: userxattr,{asked[0]}{why}")
    return "nofollow"


def _xattr_namespace(opts: Options, work: Path | None) -> XattrNamespace:
    """``user.overlay.*`` when asked (``-o userxattr``) or when ``trusted.*`` cannot be
    written (an ordinary user, root in a user namespace), as the kernel's
    ``userxattr`` option does; otherwise ``trusted.overlay.*``."""
    if opts.userxattr:
        return USER
    if work is None or opts.readonly:
        return TRUSTED if os.geteuid() == 0 else USER
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        writable = markers.trusted_xattrs_writable(fd)
    except OSError as e:
        raise UsageError(f"workdir {work}: cannot set xattrs: {e.strerror}") from None
    finally:
        os.close(fd)
    if not writable:
        log.info("trusted.* xattrs cannot be written here: markers go in user.overlay.*")
    return TRUSTED if writable else USER


def _check_owned(kind: str, path: Path) -> None:
    """An unprivileged mount must own its upper: copy-up and chmod of what it holds
    would fail half-way in one owned by someone else."""
    uid = os.stat(path).st_uid
    if uid != os.geteuid():
        raise UsageError(f"{kind} {path}: owned by uid {uid}; an unprivileged mount needs its own")


FUSE_CONF = "/etc/fuse.conf"


def _check_user_allow_other(option: str) -> None:
    """fusermount3 refuses allow_other/allow_root to ordinary users unless the
    administrator allowed it; say so before anything is mounted."""
    try:
        with open(FUSE_CONF) as f:
            allowed = any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        allowed = False
    if not allowed:
        raise UsageError(
            f"{option}: not allowed for unprivileged users without user_allow_other in {FUSE_CONF}"
        )


def _check_writable(kind: str, path: Path) -> None:
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        raise UsageError(f"{kind} {path}: on a read-only filesystem")
    if not os.access(path, os.W_OK):
        raise UsageError(f"{kind} {path}: not writable")


# How long a lock held by another daemon is waited for: one that was just unmounted is
# still shutting down (fusermount3 -u returns before the daemon has exited), and a
# remount right after an unmount (a container restarted) must not fail for that.
LOCK_WAIT = 3.0


def _lock(kind: str, path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) and time.monotonic() < deadline:
                time.sleep(0.01)
                continue
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UsageError(f"{kind} {path} is in use by another unionfs mount") from None
            raise UsageError(f"{kind} {path}: cannot lock: {e.strerror}") from None


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: a busy mount holds many fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(
    setup: Setup, ready: Callable[[], None], timeout: float | None = None, debug: bool = False
) -> int:
    """Mount, call *ready*, serve until unmounted or signalled; returns the exit status.

    *debug* logs every request and its errno.

    As root the layers are opened and the mount made before the libraries load
    (``premount``), and *ready* is called then, unless ``passthrough=on`` may
    still refuse the mount once the kernel's INIT is answered."""
    from unionfs import startup
    from unionfs.fuse import hook, premount
    from unionfs.overlay.union import Union

    os.umask(0)  # modes of new files are computed per request (caller's umask)
    raise_fd_limit()
    try:
        union = Union(setup.config)
    except OSError as e:
        raise UsageError(_layers_error(setup.config, e)) from None
    startup.mark("layers")
    told = False

    def ready_once() -> None:
        nonlocal told
        if not told:
            told = True
            ready()

    fuse_fd: int | None = None
    published: Path | None = None
    # Until trio's handlers take over (_run), a stop signal is noted, not fatal: a
    # premounted daemon killed while loading would leave a dead mount behind.
    signals = _hold_signals()
    try:
        try:
            fuse_fd = premount.mount(setup.mountpoint, setup.fuse_options)
        except OSError as e:
            raise UsageError(f"mountpoint {setup.mountpoint}: mount failed: {e.strerror}") from None
        if fuse_fd is not None:
            try:
                startup.mark("mount")
                if setup.passthrough != "on" and setup.publish:
                    # Published before the caller goes on, as when libfuse mounts: the
                    # inspection tools (and `unionfs convert`'s refusal) find the mount.
                    published = state.publish_mount(
                        setup.config, setup.mountpoint, setup.trace_path
                    )
                    ready_once()
            except BaseException:
                premount.abandon(setup.mountpoint, fuse_fd)
                raise
        fusehook = _serve_mounted(setup, union, fuse_fd, ready_once, timeout, debug, signals)
    finally:
        if published is not None:
            state.withdraw(published, os.getpid())
        union.close()
        setup.release()
    counts = hook.request_counts(fusehook)
    if counts:  # make bench reads this line (daemon CPU per request)
        log.info("requests: %s", " ".join(f"{k}={v}" for k, v in counts.items()))
        log.info("reads answered in C: %d", hook.reads_served(fusehook))
        log.info(
            "opens answered in C: %d, getattrs: %d, setattrs: %d, lookups of missing names: "
            "%d, creates: %d",
            *hook.opens_served(fusehook),
        )
        log.info(
            "requests read in runs of C answers: %d, waited for: %d; "
            "waited for after a Python answer: %d",
            *hook.in_runs(fusehook),
        )
        from unionfs.fuse import loop  # loaded with pyfuse3, which served the counts

        queued = loop.found_queued(sys.modules.get("pyfuse3"))
        if queued is not None:
            log.info("found queued when the request loop came to wait: %d", queued)
    log.info("unmounted %s", setup.mountpoint)
    return 0


def _serve_mounted(
    setup: Setup,
    union: Union,
    fuse_fd: int | None,
    ready: Callable[[], None],
    timeout: float | None,
    debug: bool,
    signals: list[int],
) -> ModuleType | None:
    """Load the libraries, hand libfuse the mount (made here when *fuse_fd* is
    None), serve until unmounted; returns the C hook (None without it)."""
    # From here modules and libraries log through logging itself: before the mount is
    # ready (libfuse mounting), their records must be held for syslog too (cli.py).
    lazylog.load()
    from unionfs.fuse import hook, premount, privileges

    taken = False  # whether libfuse holds fuse_fd (it closes it)
    try:
        fusehook = hook.load()  # before pyfuse3 is imported
        if setup.passthrough_note:
            log.info("%s", setup.passthrough_note)
        hook.configure(
            fusehook,
            setup.passthrough != "off",
            setup.stack_depth,
            killpriv=not setup.config.readonly,
        )
        from unionfs.fuse import loop

        if fusehook is not None and loop.plain():
            fusehook.configure_release(False)

        import pyfuse3
        import trio

        from unionfs import startup
        from unionfs.fuse import operations
        from unionfs.fuse.operations import Operations

        startup.mark("libraries")
        operations.DEBUG = debug
        if timeout is not None:
            operations.ENTRY_TIMEOUT = operations.ATTR_TIMEOUT = timeout
        ops = Operations(union, fusehook, setup.passthrough)
        target = os.fspath(setup.mountpoint) if fuse_fd is None else f"/dev/fd/{fuse_fd}"
        try:
            pyfuse3.init(ops, target, premount.for_libfuse(setup.fuse_options))
        except RuntimeError as e:
            raise UsageError(f"mountpoint {setup.mountpoint}: mount failed: {e}") from None
        taken = True
        if fuse_fd is None:
            startup.mark("mount")
        hook.check_bound(fusehook)
        if fusehook is not None and fusehook.bound():
            loop.install(pyfuse3, fusehook.run_waited, fusehook.linger_for)
            # Runs of requests answered in C, read back to back (csrc/requests.c).
            fusehook.configure_inline(not loop.plain(), loop.linger_us())
        privileges.take_owner_rights()
        try:
            trio.run(
                _run,
                ops,
                ready,
                lambda: _check_init(ops, setup.passthrough, fusehook),
                union,
                setup,
                signals,
            )
        finally:
            try:
                if fuse_fd is not None:
                    premount.unmount(setup.mountpoint, fuse_fd)
            finally:
                pyfuse3.close(unmount=True)  # closes fuse_fd too
                ops.release_queued()
    finally:
        if fuse_fd is not None and not taken:
            premount.abandon(setup.mountpoint, fuse_fd)
    return fusehook


def _check_init(ops: Operations, passthrough: str, fusehook: ModuleType | None) -> None:
    """Once the kernel's INIT is handled: refuse a mount that lacks what was demanded."""
    from unionfs.fuse import hook

    if passthrough == "on" and not ops.passthrough.active:
        state = hook.passthrough_state(fusehook)
        if fusehook is None:
            why = "the C hook is not loaded"
        elif not state["built"]:
            why = "unionfs was built against libfuse < 3.17 (make install LIBFUSE=3.17)"
        elif not state["capable"]:
            why = (
                "the kernel does not offer it (it needs Linux >= 6.9 with CONFIG_FUSE_PASSTHROUGH)"
            )
        else:
            why = "it was not negotiated"
        raise UsageError(f"passthrough=on: FUSE passthrough is not available: {why}")


async def _run(
    ops: Operations,
    ready: Callable[[], None],
    check_init: Callable[[], None],
    union: Union,
    setup: Setup,
    signals: list[int],
) -> None:
    """Serve requests; call *ready* once the kernel's INIT is handled and passes
    *check_init* (the kernel sends INIT as soon as it mounts). A stop signal noted
    before trio took them over (*signals*) unmounts then."""
    import trio

    from unionfs import startup
    from unionfs.fuse import tracing

    trace_fd, setup.trace_fd = setup.trace_fd, None  # the tracer closes it
    initialized = trio.Event()
    ops.on_init = initialized.set
    refused: UsageError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals)
        await nursery.start(
            tracing.control, union, setup.mountpoint, setup.trace_path, trace_fd, setup.publish
        )
        nursery.start_soon(_main, nursery.cancel_scope)
        nursery.start_soon(_release_now_and_then, ops)
        await initialized.wait()
        try:
            check_init()
        except UsageError as e:
            refused = e  # raised below, not as part of the nursery's exception group
            nursery.cancel_scope.cancel()
        else:
            startup.mark("init")
            startup.write()
            ready()
            if signals:
                import pyfuse3

                log.info("received %s while starting: unmounting", signal.Signals(signals[0]).name)
                pyfuse3.terminate()
    if refused is not None:
        raise refused


def _hold_signals() -> list[int]:
    """Note SIGTERM, SIGINT and SIGHUP in the returned list instead of dying of them
    (or raising KeyboardInterrupt), until trio's own handlers replace these."""
    noted: list[int] = []

    def note(signum: int, _frame: object) -> None:
        noted.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, note)
    return noted


async def _release_now_and_then(ops: Operations) -> None:
    """Released handles are mostly closed at the next open; this catches the rest."""
    import trio

    while True:
        await trio.sleep(1.0)
        ops.release_queued()


async def _main(scope: trio.CancelScope) -> None:
    """pyfuse3's request loop; when it ends (unmounted), so does everything else."""
    import pyfuse3

    await pyfuse3.main()
    scope.cancel()


async def _stop_on_signals() -> None:
    import pyfuse3
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def _layers_error(config: UnionConfig, e: OSError) -> str:
    """The one line for layers that cannot be opened: an upper on an overlay (a
    container's own root) by name, since nothing in the errno says so."""
    from unionfs.overlay.syscalls import OVERLAYFS_SUPER_MAGIC, fs_magic

    if (
        config.upper is not None
        and not config.readonly
        and e.errno in (errno.EPERM, errno.EINVAL)
        and fs_magic(config.upper) == OVERLAYFS_SUPER_MAGIC
    ):
        return (
            f"upperdir {config.upper} is on an overlay filesystem, which refuses whiteouts "
            "(character devices 0/0): put upperdir and workdir on a tmpfs or a volume"
        )
    return f"cannot open layers: {e}"
