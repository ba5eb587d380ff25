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
from unionfs.options import parse_options
from unionfs.overlay.markers import TRUSTED, USER
from unionfs.overlay.union import Union, UnionConfig


@dataclass
class Stack:
    config: UnionConfig
    live: state.MountState | None = None  # the mount, when the layers are a live mount's

    def open(self) -> Union:
        """The overlay over these layers, read-only in effect: no workdir, nothing written."""
        try:
            return Union(self.config.replace(work=None))
        except OSError as e:
            raise UsageError(f"cannot open the layers: {e}") from None

    def open_lowers(self) -> Union:
        """The same stack without its upper: what the lower layers alone show."""
        config = UnionConfig(
            lowers=self.config.lowers,
            ids=self.config.ids,
            xattrs=self.config.xattrs,
            redirect=self.config.redirect,
            metacopy=self.config.metacopy,
        )
        return Union(config)

    def layer_paths(self) -> list[Path]:
        upper = [self.config.upper] if self.config.upper is not None else []
        return [*upper, *self.config.lowers]


def _directory(kind: str, raw: str) -> Path:
    path = Path(os.path.realpath(raw))
    if not path.is_dir():
        raise UsageError(f"{kind} {raw}: not a directory")
    return path


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
    """The unionfs mount that *path* is in, and *path* relative to its root.

    The path is taken as written (symlinks inside the mount are not followed: the
    question is about that name); if that finds no mount, the symlinks of its
    leading directories are resolved, as for a path reached through a link.
    """
    mounts = [m for m in state.mountinfo() if m.fstype == state.FSTYPE]
    target = os.fsencode(os.path.abspath(path))
    found = _longest_prefix(mounts, target)
    if found is None:
        parts = target.split(b"/")
        for i in range(2, len(parts) + 1):
            prefix = os.path.realpath(b"/".join(parts[:i]))
            hit = [m for m in mounts if m.mountpoint == prefix]
            if hit:
                rest = b"/".join(parts[i:])
                return hit[-1], rest
        raise UsageError(
            f"{path}: not inside a unionfs mount (or give the layers: -o lowerdir=...)"
        )
    return found


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
    may take a moment to publish it."""
    deadline = time.monotonic() + wait
    found = state.read_state(mount.device)
    while found is None and time.monotonic() < deadline:
        time.sleep(0.05)
        found = state.read_state(mount.device)
    if found is None:
        raise UsageError(
            f"the unionfs mount at {os.fsdecode(mount.mountpoint)} published no state in "
            f"{state.runtime_dir()} (an older daemon, or another {state.RUNDIR_ENV}); "
            "give its layers with -o lowerdir=...,upperdir=..."
        )
    return Stack(found.union_config(), found)


def from_live_path(path: str) -> tuple[Stack, bytes]:
    mount, rel = locate(path)
    return from_mount(mount), rel


def from_mountpoint(path: str) -> Stack:
    """The stack of the mount at exactly *path* (``unionfs trace MNT``)."""
    mount, rel = locate(path)
    if rel:
        raise UsageError(
            f"{path}: not a mountpoint (the mount is at {os.fsdecode(mount.mountpoint)})"
        )
    return from_mount(mount)


def relative(path: str) -> bytes:
    """A path inside the merged view, for a stack given by options: ``/etc/x`` and
    ``etc/x`` both name ``etc/x``; ``..`` may not climb above the root."""
    parts: list[bytes] = []
    for part in os.fsencode(path).split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not parts:
                raise UsageError(f"{path}: climbs above the merged root")
            parts.pop()
            continue
        parts.append(part)
    return b"/".join(parts)
