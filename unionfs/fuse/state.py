"""What a running mount publishes about itself: its layers, its trace file, its socket.

FUSE mounts show no options of their own in ``/proc/self/mountinfo``, so the
daemon writes ``RUNDIR/MAJ:MIN.json`` once mounted (``MAJ:MIN`` being the
mount's device number, which mountinfo does show) and removes it when it
exits. ``unionfs explain PATH`` and ``unionfs trace MNT`` find a mount's layers
there. A file left by a daemon that was killed is recognised (its pid is gone,
or the device is no longer a unionfs mount) and ignored or replaced.

``RUNDIR`` is ``$UNIONFS_RUNTIME_DIR`` if set, ``/run/unionfs`` for root,
``$XDG_RUNTIME_DIR/unionfs`` otherwise.
"""

from __future__ import annotations

import contextlib
import os
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


def runtime_dir() -> Path:
    env = os.environ.get(RUNDIR_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/unionfs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "unionfs"
    import tempfile

    return Path(tempfile.gettempdir()) / f"unionfs-{os.geteuid()}"


# -- mountinfo ---------------------------------------------------------------------


class MountEntry(Record):
    mountpoint: bytes
    device: str  # "MAJ:MIN"
    fstype: str


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
            fstype = fields[fields.index(b"-") + 1].decode(errors="replace")
            out.append(MountEntry(unescape_mountinfo(fields[4]), fields[2].decode(), fstype))
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
    """Write the state file atomically; returns its path."""
    d = runtime_dir()
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = state_path(state.device)
    tmp = d / f".{state.device}.{os.getpid()}.tmp"
    tmp.write_text(to_json(state._asdict()) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


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
        log.warning("cannot publish the mount's state in %s: %s", runtime_dir(), e)
        return None


def withdraw(path: Path, pid: int) -> None:
    """Remove the state file at *path* if it is still the one of *pid*."""
    import json

    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()


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
    import json

    try:
        data = json.loads(state_path(device).read_text())
        state = MountState(**data)
    except (OSError, ValueError, TypeError):
        return None
    if state.device != device or not _alive(state.pid):
        return None
    return state


def sweep() -> None:
    """Remove state files of daemons that are gone (killed without cleaning up)."""
    d = runtime_dir()
    live = {m.device for m in mountinfo() if m.fstype == FSTYPE}
    with contextlib.suppress(OSError):
        for f in [*d.glob("*.json"), *d.glob("*.sock")]:
            if _stale(f.name.rpartition(".")[0], live):
                with contextlib.suppress(OSError):
                    f.unlink()


def _stale(device: str, live: set[str]) -> bool:
    """Left by a daemon that is gone: its device is not mounted, or its pid is dead.
    A mount whose state file is not written yet is not stale."""
    if device not in live:
        return True
    try:
        pid = _pid_of(state_path(device).read_bytes())
    except OSError:
        return False
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


def socket_path(device: str) -> Path:
    return runtime_dir() / f"{device}.sock"
