"""The unprivileged mode: an ordinary user's unionfs against the kernel overlay that
the same user mounts with ``userxattr`` in a user namespace.

The kernel side is the kind ``userns-kernel``: its worker process (the one that
runs the ops) unshares a user and a mount namespace, maps the user's own ids to
themselves, mounts the overlay there, and then drops every capability, so the
ops run with exactly an ordinary user's rights on both sides. The mount goes
away with the worker (its mount namespace dies with it), so nothing can be
left mounted.

Layers built by an ordinary user belong to that user, carry the opaque
marker as ``user.overlay.opaque`` and hold no device nodes but whiteouts:
``unprivileged`` turns any case into that shape.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
from collections.abc import Callable

from tests.conformance.layers import OPAQUE_XATTR, Entry, LayerSpec

USER_OPAQUE = b"user.overlay.opaque"
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
_CAP_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write(path: str, data: str) -> None:
    with open(path, "w") as f:
        f.write(data)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_all_capabilities() -> None:
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def _enter_userns() -> None:
    """A user and mount namespace mapping our ids to themselves, as both sides'
    callers have it, so an id that is not ours means the same on both sides."""
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _check(_libc.mount(b"none", b"/", None, 0x40000 | 0x4000, None), "make / private")


def caller_in_userns() -> None:
    """The unionfs side's worker in the unprivileged mode: the same namespace shape as
    the kernel side's, without a mount of its own, and no capabilities."""
    _enter_userns()
    _drop_all_capabilities()


def kernel_mount_in_userns(
    lowers: list[bytes], upper: bytes | None, work: bytes | None, mnt: bytes
) -> Callable[[], None]:
    """What the kernel side's worker runs first (in the forked child)."""
    from tests.mounting import overlay_options

    opts = overlay_options(
        [os.fsdecode(p) for p in lowers],
        os.fsdecode(upper) if upper else None,
        os.fsdecode(work) if work else None,
    )

    def setup() -> None:
        _enter_userns()
        _check(
            _libc.mount(b"overlay", mnt, b"overlay", 0, (opts + ",userxattr").encode()),
            "mount overlay",
        )
        _drop_all_capabilities()

    return setup


def _entry(e: Entry, uid: int, gid: int) -> Entry:
    xattrs = {(USER_OPAQUE if k == OPAQUE_XATTR else k): v for k, v in e.xattrs.items()}
    return dataclasses.replace(e, owner=(uid, gid), xattrs=xattrs)


def unprivileged(spec: LayerSpec) -> LayerSpec:
    """*spec* as an ordinary user can build it: owned by that user, opaque markers in
    ``user.overlay.*``, no device nodes."""
    uid, gid = os.getuid(), os.getgid()

    def layer(entries: list[Entry]) -> list[Entry]:
        return [_entry(e, uid, gid) for e in entries if e.kind not in ("chr", "blk")]

    return dataclasses.replace(
        spec, lowers=[layer(entries) for entries in spec.lowers], upper=layer(spec.upper)
    )
