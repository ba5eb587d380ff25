"""An ordinary user's daemon takes the rights the kernel overlay's mounter has.

When an ordinary user mounts the kernel overlay, they do it in a user
namespace of their own, where they hold every capability over the files they
own: copy-up can write into a copied-up directory of mode 0555, keep a setgid
bit, set the times of a file it does not have write access to. An
unprivileged unionfs daemon does the same: once the FUSE mount exists
(fusermount3 made it, outside any namespace), it moves into a new user
namespace that maps its own uid and gid to themselves. It still is that user,
shows the same owners, and can touch nothing it could not reach before; only
its own files stop being guarded against it by their modes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

log = logging.getLogger(__name__)

CLONE_NEWUSER = 0x10000000
_libc = ctypes.CDLL(None, use_errno=True)


def _write(path: str, data: str) -> None:
    with open(path, "w") as f:
        f.write(data)


def take_owner_rights() -> bool:
    """Enter a user namespace mapping our own ids to themselves; returns whether it
    did. Only for an unprivileged, still single-threaded process."""
    if os.geteuid() == 0:
        return False
    if threading.active_count() != 1:
        log.warning("cannot enter a user namespace from a multi-threaded daemon")
        return False
    uid, gid = os.geteuid(), os.getegid()
    if _libc.unshare(CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        log.warning("no user namespace (%s): copy-up is limited by file modes", os.strerror(err))
        return False
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    log.info("running in a user namespace of our own (uid %d, gid %d)", uid, gid)
    return True
