"""Which layers to inspect: given with ``-o lowerdir=...``, or those of a live mount.

A live mount's layers come from the state file its daemon publishes
(``unionfs.fuse.state``). The union built here never has a workdir: the
inspection tools read layers and never write, and a live mount's workdir must
not be touched (opening one clears what is in it).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from unionfs.errors import UsageError
from unionfs.fuse import state
from unionfs.fuse.mount import id_mapper, redirect_mode
from unionfs.inspect.names import brief, directory_arg
from unionfs.options import parse_options
from unionfs.overlay.markers import TRUSTED, USER
from unionfs.overlay.union import Union, UnionConfig


@dataclass
class Stack:
    config: UnionConfig
    live: state.MountState | None = None  # the mount, when the layers are a live mount's

    def open(self) -> Union:
        """The overlay over these layers, only looked at: no workdir, nothing written
        (not the uuid, origin or impure markers a mount records), while ``readonly``
        still says whether the stack is, which the predictions go by (EROFS)."""
        try:
            union = Union(self.config.replace(work=None), inspect_only=True)
        except OSError as e:
            raise UsageError(f"cannot open the layers: {e}") from None
        return union

    def open_lowers(self) -> Union:
        """The same stack without its upper: what the lower layers alone show."""
        config = UnionConfig(
            lowers=self.config.lowers,
            ids=self.config.ids,
            xattrs=self.config.xattrs,
            redirect=self.config.redirect,
            metacopy=self.config.metacopy,
        )
        return Union(config, inspect_only=True)

    def layer_paths(self) -> list[Path]:
        upper = [self.config.upper] if self.config.upper is not None else []
        return [*upper, *self.config.lowers]


NAME_MAX = 255  # the kernel's limits on a path it is given, checked before any lookup
PATH_MAX = 4096  # with its terminating NUL


def check_length(path: str) -> None:
    """What the kernel answers before it looks anything up: ENAMETOOLONG for a path of
    PATH_MAX bytes or more, or a name of more than NAME_MAX."""
    raw = os.fsencode(path)
    if len(raw) >= PATH_MAX:
        raise UsageError(
            f"{brief(path)}: File name too long (ENAMETOOLONG): the path has {len(raw):,} "
            f"bytes, the kernel takes at most {PATH_MAX - 1:,}"
        )
    for name in raw.split(b"/"):
        if len(name) > NAME_MAX:
            raise UsageError(
                f"{brief(path)}: File name too long (ENAMETOOLONG): a name of "
                f"{len(name):,} bytes, the kernel takes at most {NAME_MAX}"
            )


def _directory(kind: str, raw: str) -> Path:
    return directory_arg(raw, kind)


def from_options(option_strings: list[str]) -> Stack:
    """The stack that ``-o lowerdir=...[,upperdir=...][,ro]`` describes."""
    opts = parse_options(option_strings)
    if not opts.lowers:
        raise UsageError("no lowerdir given (-o lowerdir=TOP:...:BOTTOM)")
    lowers = [_directory("lowerdir", p) for p in opts.lowers]
    upper = _directory("upperdir", opts.upper) if opts.upper is not None else None
    work = _directory("workdir", opts.work) if opts.work is not None else None
    xattrs = USER if opts.userxattr else TRUSTED
    config = UnionConfig(
        lowers=lowers,
        upper=upper,
        work=work,
        readonly=opts.readonly or upper is None,
        ids=id_mapper(opts),
        xattrs=xattrs,
        redirect=redirect_mode(opts, xattrs),
        metacopy=opts.metacopy,
    )
    return Stack(config)


def locate(path: str) -> tuple[state.MountEntry, bytes]:
    """The unionfs mount that *path* is in, and the rest of *path* below its root, as
    written (``..``, ``.`` and a trailing ``/`` kept for ``explain.walk``).

    The path is followed as the kernel follows it up to the mount (symlinks and
    ``..`` outside it resolved); what follows the mountpoint is not touched: the
    question is about the names as written there.
    """
    mounts = [m for m in state.mountinfo() if m.fstype == state.FSTYPE]
    raw = os.fsencode(path)
    if not raw.startswith(b"/"):
        raw = os.fsencode(os.getcwd()) + b"/" + raw
    parts = raw.split(b"/")
    cur = b"/"
    found = _longest_prefix(mounts, cur)
    i = 0
    while found is None and i < len(parts):
        part = parts[i]
        i += 1
        if part in (b"", b"."):
            continue
        if part == b"..":
            cur = os.path.dirname(cur)
            continue
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            cur = os.path.realpath(cur)
        found = _longest_prefix(mounts, cur)
    if found is None:
        raise UsageError(
            f"{brief(path)}: not inside a unionfs mount (or give the layers: -o lowerdir=...)"
        )
    mount, inner = found
    base = inner.split(b"/") if inner else []
    # A unionfs mounted inside this one, on a directory that plain names below lead to.
    names: list[bytes] = []
    for j in range(i, len(parts)):
        if parts[j] in (b"", b".", b".."):
            break
        names.append(parts[j])
        target = os.path.join(mount.mountpoint, *base, *names)
        deeper = [m for m in mounts if m.mountpoint == target]
        if deeper:
            mount, base, names, i = deeper[-1], [], [], j + 1
    return mount, b"/".join([*base, *parts[i:]])


def _longest_prefix(
    mounts: list[state.MountEntry], target: bytes
) -> tuple[state.MountEntry, bytes] | None:
    best: state.MountEntry | None = None
    for m in mounts:
        mp = m.mountpoint.rstrip(b"/")
        inside = target == (mp or b"/") or target.startswith(mp + b"/")
        if inside and (best is None or len(m.mountpoint) >= len(best.mountpoint)):
            best = m
    if best is None:
        return None
    return best, target[len(best.mountpoint.rstrip(b"/")) :].strip(b"/")


def from_mount(mount: state.MountEntry, wait: float = 3.0) -> Stack:
    """The stack of a live mount, from its state file; a mount that has just started
    may take a moment to publish it (a state refused is not waited for)."""
    deadline = time.monotonic() + wait
    found, why = state.find_state(mount.device, mount.owner)
    while found is None and state.not_there_yet(why) and time.monotonic() < deadline:
        time.sleep(0.05)
        found, why = state.find_state(mount.device, mount.owner)
    if found is None:
        owner = "" if mount.owner is None else f" (mounted by uid {mount.owner})"
        raise UsageError(
            f"the unionfs mount at {brief(mount.mountpoint)}{owner} has no state it "
            f"published that can be used: {why}; give its layers with "
            "-o lowerdir=...,upperdir=..."
        )
    return Stack(found.union_config(), found)


def from_live_path(path: str) -> tuple[Stack, bytes]:
    """The stack of the mount *path* is in, to read its layers' markers, and *path*
    below its root (as written)."""
    mount, rel = locate(path)
    stack = from_mount(mount)
    if stack.config.xattrs is TRUSTED and os.geteuid() != 0:
        # Its opaque, redirect and metacopy markers are invisible here: every verdict
        # that depends on one would be wrong, and nothing would say so.
        raise UsageError(
            f"the unionfs mount at {brief(mount.mountpoint)} keeps its markers in "
            f"{TRUSTED.prefix.decode()}*, which only root can read (this is uid "
            f"{os.geteuid()}): run unionfs explain as root"
        )
    return stack, rel


def from_mountpoint(path: str) -> Stack:
    """The stack of the mount at exactly *path* (``unionfs trace MNT``)."""
    mount, rel = locate(path)
    if os.path.normpath(rel or b".") != b".":
        raise UsageError(
            f"{brief(path)}: not a mountpoint (the mount is at {brief(mount.mountpoint)})"
        )
    return from_mount(mount)


def relative(path: str) -> bytes:
    """A path inside the merged view, for a stack given by options: ``/etc/x`` and
    ``etc/x`` both name ``etc/x``. The rest is kept as written (``..``, ``.``, a
    trailing ``/``): ``explain.walk`` looks it up as the kernel would."""
    return os.fsencode(path).lstrip(b"/")
