"""What a running mount publishes about itself: its layers, its trace file, its socket.

FUSE mounts show no options of their own in ``/proc/self/mountinfo``, so the
daemon writes ``RUNDIR/MAJ:MIN.json`` once mounted (``MAJ:MIN`` being the
mount's device number, which mountinfo does show) and removes it when it
exits. ``unionfs explain PATH`` and ``unionfs trace MNT`` find a mount's layers
there. A file left by a daemon that was killed is recognised (its pid is gone,
or the device is no longer a unionfs mount) and ignored or replaced.

``RUNDIR`` is ``$UNIONFS_RUNTIME_DIR`` if set, ``/run/unionfs`` for root,
``$XDG_RUNTIME_DIR/unionfs`` otherwise, and ``/tmp/unionfs-UID`` for a user
without ``XDG_RUNTIME_DIR``. A directory anyone may make in ``/tmp`` could
feed ``unionfs explain`` false layers and ``unionfs trace --follow`` another
socket, so neither side trusts what it did not make: the daemon creates the
directory itself (mode 0700, 0755 for root, whose state other users may read
as they read a kernel overlay's options in mountinfo), checks after ``mkdir``
that it owns it and that nobody else may write there, and writes every file
through the directory's fd with ``O_NOFOLLOW``; a reader takes a directory and
a state file only when they belong to the mount's owner (its ``user_id`` in
mountinfo) or to root and nobody else may write them.

Whoever owns a state directory may put anything in it under a state file's name,
and root's tools read the state of every user's mount (``unionfs convert`` that of
every mount there is), so reading one never blocks: it is opened through the
directory's fd with ``O_NONBLOCK`` (opening a FIFO would wait for a writer) and
without following a symlink, and read only if it is a regular file of at most
``STATE_MAX`` bytes; anything else is refused with the reason, as an untrusted
owner is. The daemon removes its own file at exit the same way (``withdraw``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from unionfs import lazylog
from unionfs.overlay.idmap import IdMap, IdMapper, IdTable
from unionfs.overlay.markers import TRUSTED, USER, XattrNamespace
from unionfs.overlay.union import UnionConfig
from unionfs.records import Record, to_json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = lazylog.get(__name__)

FSTYPE = "fuse.unionfs"
RUNDIR_ENV = "UNIONFS_RUNTIME_DIR"


ROOT_RUNDIR = Path("/run/unionfs")
STATE_MAX = 1 << 20  # bytes: a state file is a few kB; a larger one is refused, not read


def runtime_dir() -> Path:
    env = os.environ.get(RUNDIR_ENV)
    if env:
        return Path(env)
    return _usual_runtime_dir()


def _usual_runtime_dir() -> Path:
    """This user's runtime directory when ``$UNIONFS_RUNTIME_DIR`` is not set."""
    if os.geteuid() == 0:
        return ROOT_RUNDIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "unionfs"
    return _tmp_rundir(os.geteuid())


def _tmp_rundir(uid: int) -> Path:
    """The runtime directory of a user without ``XDG_RUNTIME_DIR``: in the shared /tmp."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"unionfs-{uid}"


def runtime_dirs_of(owner: int | None) -> list[Path]:
    """Where the daemon of a mount made by uid *owner* may have published its state,
    most likely first: ``$UNIONFS_RUNTIME_DIR`` if set, then this process's usual
    runtime directory when the mount is its user's (or the owner is unknown), else
    the owner's usual ones. (The usual ones too when that variable is set: a daemon
    started without it publishes there, and ``unionfs convert`` refuses to work
    while a live mount's state cannot be found.)"""
    dirs: list[Path] = []
    env = os.environ.get(RUNDIR_ENV)
    if env:
        dirs.append(Path(env))
    if owner is None or owner == os.geteuid():
        dirs.append(_usual_runtime_dir())
    elif owner == 0:
        dirs.append(ROOT_RUNDIR)
    else:
        dirs += [Path(f"/run/user/{owner}/unionfs"), _tmp_rundir(owner)]
    return list(dict.fromkeys(dirs))


# -- who may be trusted ------------------------------------------------------------


def unsafe(st: os.stat_result, owners: tuple[int, ...]) -> str | None:
    """Why a state directory or file with this stat is not to be trusted (None: it
    is): owned by someone other than *owners*, or writable by others than its owner."""
    if st.st_uid not in owners:
        allowed = " or ".join("root" if uid == 0 else f"uid {uid}" for uid in owners)
        return f"owned by uid {st.st_uid}, not by {allowed}"
    if st.st_mode & 0o022:
        return f"writable by others than its owner (mode {st.st_mode & 0o7777:04o})"
    return None


def _owners(owner: int) -> tuple[int, ...]:
    return (owner,) if owner == 0 else (owner, 0)


class Refused(Exception):
    """A state file that is not read, and why (the exception's text)."""


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symlink",
}


def _open_regular(dfd: int, name: str) -> tuple[int, os.stat_result]:
    """An fd of the regular file *name* in the directory *dfd*, and its stat, opened
    without ever waiting: ``O_NONBLOCK`` (a FIFO's open would wait for a writer, a
    leased file's for the lease), no symlink followed, no controlling terminal taken.
    Refused when it is not a regular file; OSError as the calls raise it."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(name, flags, dir_fd=dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "of an unknown type")
            raise Refused(f"not a regular file ({kind})")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_at(
    dfd: int, name: str, owners: tuple[int, ...], limit: int = STATE_MAX
) -> tuple[bytes, os.stat_result]:
    """The contents of the state file *name* in the directory *dfd*, and its stat,
    never blocking (``_open_regular``): a regular file of *owners* that nobody else
    may write, of at most *limit* bytes; Refused (with why) otherwise."""
    too_big = f"more than the {limit} bytes a state file may have"
    fd, st = _open_regular(dfd, name)
    try:
        why = unsafe(st, owners)
        if why is not None:
            raise Refused(why)
        if st.st_size > limit:
            raise Refused(f"{st.st_size} bytes, {too_big}")
        data = b""
        while len(data) <= limit:  # one byte past it tells a file that grew meanwhile
            chunk = os.read(fd, limit + 1 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise Refused(too_big)
    return data, st


def open_rundir(path: Path, owners: tuple[int, ...]) -> int:
    """An fd of the runtime directory *path* (itself no symlink), once it is found
    trustworthy; OSError with the reason otherwise (the path as its filename)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        why = unsafe(os.fstat(fd), owners)
    except BaseException:
        os.close(fd)
        raise
    if why is not None:
        os.close(fd)
        raise PermissionError(errno.EPERM, f"refused: {why}", os.fspath(path))
    return fd


def _make_rundir() -> int:
    """Create this daemon's runtime directory if need be, and open it: mode 0700 (0755
    for root); after ``mkdir``, whoever made it, it must be this user's (or root's)
    and writable by nobody else."""
    d = runtime_dir()
    euid = os.geteuid()
    d.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(d, 0o755 if euid == 0 else 0o700)
    return open_rundir(d, _owners(euid))


# -- mountinfo ---------------------------------------------------------------------


class MountEntry(Record):
    mountpoint: bytes
    device: str  # "MAJ:MIN"
    fstype: str
    owner: int | None = None  # who mounted it: a FUSE mount's user_id (None: not said)


def unescape_mountinfo(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as ``\\ooo`` octal."""
    if b"\\" not in field:
        return field
    first, *rest = field.split(b"\\")
    out = [first]
    for part in rest:
        code = part[:3]
        if len(code) == 3 and all(0x30 <= c <= 0x37 for c in code):
            out.append(bytes([int(code, 8)]) + part[3:])
        else:
            out.append(b"\\" + part)
    return b"".join(out)


def mountinfo() -> list[MountEntry]:
    out: list[MountEntry] = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            fstype = fields[sep + 1].decode(errors="replace")
            owner = None
            for opt in fields[sep + 3].split(b",") if len(fields) > sep + 3 else ():
                if opt.startswith(b"user_id=") and opt[8:].isdigit():
                    owner = int(opt[8:])
            out.append(MountEntry(unescape_mountinfo(fields[4]), fields[2].decode(), fstype, owner))
    return out


def device_of(mountpoint: Path) -> str | None:
    """The device number of the unionfs mounted at *mountpoint* (the last one mounted)."""
    target = os.fsencode(mountpoint)
    found = None
    for m in mountinfo():
        if m.mountpoint == target and m.fstype == FSTYPE:
            found = m.device
    return found


# -- the state file ------------------------------------------------------------------


class MountState(Record):
    pid: int
    mountpoint: str
    device: str
    config: dict[str, Any]  # UnionConfig's plain fields (paths as strings)
    ids: dict[str, Any]  # the owner mapping (``ids_to_json``)
    trace: str | None = None  # the -o trace= file
    socket: str | None = None  # where ``unionfs trace --follow`` connects

    def union_config(self) -> UnionConfig:
        return config_from_json(self.config, ids_from_json(self.ids))


def ids_to_json(ids: IdMapper) -> dict[str, Any]:
    return {
        name: {"ranges": [[r.inside, r.outside, r.count] for r in t.ranges], "squash": t.squash}
        for name, t in (("uids", ids.uids), ("gids", ids.gids))
    }


def ids_from_json(data: dict[str, Any]) -> IdMapper:
    def table(d: dict[str, Any]) -> IdTable:
        return IdTable([IdMap(*r) for r in d.get("ranges", [])], d.get("squash"))

    return IdMapper(table(data.get("uids", {})), table(data.get("gids", {})))


def config_to_json(config: UnionConfig) -> dict[str, Any]:
    """UnionConfig's fields that are plain data; paths as (surrogate-escaped) strings."""
    out: dict[str, Any] = {}
    for name, value in vars(config).items():
        if isinstance(value, Path):
            out[name] = os.fspath(value)
        elif isinstance(value, XattrNamespace):
            out[name] = value.prefix.decode()
        elif isinstance(value, list) and all(isinstance(v, Path) for v in value):
            out[name] = [os.fspath(v) for v in value]
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
    return out


_PATHS = ("upper", "work")  # UnionConfig's fields that hold one path (or None)


def config_from_json(data: dict[str, Any], ids: IdMapper) -> UnionConfig:
    known = vars(UnionConfig([]))  # its fields (a file of another version may differ)
    kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in known}
    kwargs["lowers"] = [Path(v) for v in data.get("lowers", [])]
    for name in _PATHS:
        if kwargs.get(name) is not None:
            kwargs[name] = Path(kwargs[name])
    if "xattrs" in kwargs:
        kwargs["xattrs"] = USER if kwargs["xattrs"] == USER.prefix.decode() else TRUSTED
    kwargs["ids"] = ids
    return UnionConfig(**kwargs)


def state_path(device: str) -> Path:
    return runtime_dir() / f"{device}.json"


def publish(state: MountState) -> Path:
    """Write the state file atomically, in a runtime directory this user owns; returns
    its path. Root's is readable by every user (0644), another user's by that user
    only (0600); a temporary file is never more than that, even for a moment."""
    dfd = _make_rundir()
    try:
        name = f"{state.device}.json"
        tmp = f".{state.device}.{os.getpid()}.tmp"
        mode = 0o644 if os.geteuid() == 0 else 0o600
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)  # left by a killed daemon that had this pid
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
            dir_fd=dfd,
        )  # fmt: skip
        try:
            try:
                os.fchmod(fd, mode)  # exactly that: the umask takes bits off, never adds
                os.write(fd, (to_json(state._asdict()) + "\n").encode())
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)
    return state_path(state.device)


def publish_mount(config: UnionConfig, mountpoint: Path, trace: Path | None = None) -> Path | None:
    """Publish the state of this process's mount at *mountpoint* (with where its trace
    socket will be); None when it is not mounted or cannot be published (that costs
    only the inspection tools, never the mount: a warning says why)."""
    device = device_of(mountpoint)
    if device is None:
        return None
    try:
        sweep()
        return publish(
            MountState(
                pid=os.getpid(),
                mountpoint=os.fspath(mountpoint),
                device=device,
                config=config_to_json(config),
                ids=ids_to_json(config.ids),
                trace=os.fspath(trace) if trace is not None else None,
                socket=os.fspath(socket_path(device)),
            )
        )
    except OSError as e:
        log.warning(
            "cannot publish the mount's state in %s: %s%s",
            runtime_dir(),
            e.strerror or e,
            f" ({os.fsdecode(e.filename)})" if e.filename else "",
        )
        return None


def withdraw(path: Path, pid: int) -> None:
    """Remove the state file at *path* if it is still the one of *pid*. Read through
    its directory's fd as a reader reads it (``read_at``: a FIFO put in its place
    must not hang the daemon at exit), and removed only if the name still leads to
    the file read; anything else there is left as it is."""
    import json

    owners = _owners(os.geteuid())
    try:
        dfd = open_rundir(path.parent, owners)
    except OSError:
        return
    try:
        data, st = read_at(dfd, path.name, owners)
        found = json.loads(data)
        if not isinstance(found, dict) or found.get("pid") != pid:
            return
        now = os.stat(path.name, dir_fd=dfd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path.name, dir_fd=dfd)
    except (OSError, ValueError, Refused):
        pass
    finally:
        os.close(dfd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(device: str) -> MountState | None:
    """The state of the live mount with this device number, or None."""
    return find_state(device)[0]


def owner_of(device: str) -> int | None:
    """Who made the unionfs mount with this device number (its ``user_id``)."""
    for m in mountinfo():
        if m.device == device and m.fstype == FSTYPE:
            return m.owner
    return None


def find_state(device: str, owner: int | None = None) -> tuple[MountState | None, str]:
    """The state of the live mount with this device number, made by uid *owner* (found
    in mountinfo when not given); or None and why none could be used. Only a state
    directory and file of the mount's owner or root, writable by nobody else, count."""
    if owner is None:
        owner = owner_of(device)
    owners = _owners(owner) if owner is not None else _owners(os.geteuid())
    reasons: list[str] = []
    for d in runtime_dirs_of(owner):
        state, why = _read_in(d, device, owners)
        if state is not None:
            return state, ""
        reasons.append(why)
    return None, "; ".join(reasons)


def _read_in(d: Path, device: str, owners: tuple[int, ...]) -> tuple[MountState | None, str]:
    import json

    path = d / f"{device}.json"
    try:
        dfd = open_rundir(d, owners)
    except FileNotFoundError:
        return None, f"no directory {d}"
    except OSError as e:
        return None, f"{d}: {e.strerror}"
    try:
        raw, _ = read_at(dfd, path.name, owners)
    except FileNotFoundError:
        return None, f"no {path}"
    except Refused as e:
        return None, f"{path}: refused: {e}"
    except OSError as e:
        return None, f"{path}: {e.strerror}"
    finally:
        os.close(dfd)
    try:
        state = MountState(**json.loads(raw))
        state.union_config()  # every field of the right kind
    except (ValueError, TypeError, AttributeError):
        return None, f"{path}: unreadable (not a mount state this unionfs writes)"
    if state.device != device:
        return None, f"{path} is the state of another device ({state.device})"
    if not _alive(state.pid):
        return None, f"{path} was left by a daemon that is gone (pid {state.pid})"
    return state, ""


def sweep() -> None:
    """Remove what daemons that are gone (killed without cleaning up) left in this
    user's runtime directory: state files, sockets and half-written temporary files."""
    try:
        dfd = open_rundir(runtime_dir(), _owners(os.geteuid()))
    except OSError:
        return  # none yet, or not to be trusted (publishing says why)
    try:
        live = {m.device for m in mountinfo() if m.fstype == FSTYPE}
        for name in os.listdir(dfd):
            if name.endswith((".json", ".sock")):
                gone = _stale(dfd, name.rpartition(".")[0], live)
            elif name.startswith(".") and name.endswith(".tmp"):
                pid = name[1:-4].rpartition(".")[2]  # .MAJ:MIN.PID.tmp
                gone = pid.isdigit() and not _alive(int(pid))
            else:
                continue
            if gone:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _stale(dfd: int, device: str, live: set[str]) -> bool:
    """Left by a daemon that is gone: its device is not mounted, or its pid is dead.
    A mount whose state file is not written yet is not stale."""
    if device not in live:
        return True
    try:
        fd, _ = _open_regular(dfd, f"{device}.json")  # a FIFO there must not hang the mount
    except (OSError, Refused):
        return False
    try:
        pid = _pid_of(os.read(fd, 64))
    finally:
        os.close(fd)
    return pid is not None and not _alive(pid)


def _pid_of(data: bytes) -> int | None:
    """The pid in a state file, which ``publish`` writes first; None if it is not
    one. Read without json: a new mount sweeps before it is ready, and json is one of
    the modules it does not load by then (tests/test_premount.py)."""
    head, _, rest = data.partition(b",")
    key, _, value = head.partition(b":")
    if key != b'{"pid"' or not value.isdigit():
        return None
    return int(value)


def not_there_yet(why: str) -> bool:
    """Whether ``find_state``'s reason says only that the state is not there (yet): no
    directory, no file, or one a daemon that is gone left (the new one replaces it). A
    reader waits a moment for such a state (a mount just started), never for one refused."""
    return all(
        part.startswith("no ") or " was left by a daemon that is gone (pid " in part
        for part in why.split("; ")
    )


def socket_path(device: str) -> Path:
    return runtime_dir() / f"{device}.sock"
