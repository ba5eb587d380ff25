"""The FUSE mount made before the daemon loads its libraries (mount latency).

Loading trio and pyfuse3 takes most of a mount's start-up (about 200 ms on a
small machine), and libfuse mounts only once they are loaded. So a daemon
running as root opens ``/dev/fuse`` and mounts it itself with ``mount(2)``, as
libfuse would, right after the layers are opened; it then says the mount is
ready, and loads the libraries meanwhile. libfuse is handed the mounted device
as ``/dev/fd/N`` (its way of taking over a mount made by someone else). The
kernel queues what arrives at the mount in between, starting with its INIT, and
whoever touches the mount first waits for the daemon's answer, as on any FUSE
mount whose daemon is busy.

The mount options are libfuse's, computed the way it does (``default_permissions``
and ``allow_other`` for the kernel, the rest as mount flags, ``nosuid,nodev``
unless ``suid``/``dev``); the tests compare both mounts' options. Where
``mount(2)`` is refused (no CAP_SYS_ADMIN: an ordinary user, whom fusermount3
mounts), or with ``UNIONFS_NO_PREMOUNT=1``, libfuse mounts as before.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import stat
from pathlib import Path

DISABLE_ENV = "UNIONFS_NO_PREMOUNT"

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_SYNCHRONOUS = 16
_MS_DIRSYNC = 128
_MS_NOATIME = 1024
_MS_NODIRATIME = 2048
_MS_RELATIME = 1 << 21
_MS_STRICTATIME = 1 << 24
_MNT_DETACH = 2

# Option: (flag, set). libfuse starts from nosuid,nodev.
_FLAGS = {
    "ro": (_MS_RDONLY, True),
    "rw": (_MS_RDONLY, False),
    "suid": (_MS_NOSUID, False),
    "nosuid": (_MS_NOSUID, True),
    "dev": (_MS_NODEV, False),
    "nodev": (_MS_NODEV, True),
    "exec": (_MS_NOEXEC, False),
    "noexec": (_MS_NOEXEC, True),
    "async": (_MS_SYNCHRONOUS, False),
    "sync": (_MS_SYNCHRONOUS, True),
    "dirsync": (_MS_DIRSYNC, True),
    "atime": (_MS_NOATIME, False),
    "noatime": (_MS_NOATIME, True),
    "diratime": (_MS_NODIRATIME, False),
    "nodiratime": (_MS_NODIRATIME, True),
    "relatime": (_MS_RELATIME, True),
    "strictatime": (_MS_STRICTATIME, True),
}
# Access-time options that libfuse's option parser refuses in one version or another
# (3.14 knows none of these but atime; 3.17 knows nodiratime but not atime): they are
# mount flags only, set by the premount and never handed to libfuse.
ATIME_ONLY = frozenset({"atime", "relatime", "strictatime", "diratime", "nodiratime"})


def for_libfuse(options: set[str]) -> set[str]:
    """*options* without those libfuse may refuse (``ATIME_ONLY``): when libfuse mounts
    (no premount) they are dropped, as fusermount3 would not pass them either."""
    return options - ATIME_ONLY


_KERNEL = ("default_permissions", "allow_other")

_libc = ctypes.CDLL(None, use_errno=True)
_mount = _libc.mount
_mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def arguments(options: set[str]) -> tuple[bytes, bytes, int, str]:
    """``mount(2)``'s source, type, flags and the options after ``fd=...`` for the FUSE
    options *options* (``fsname=``, ``subtype=``, flags, kernel options)."""
    source, fstype = "unionfs", "fuse"
    flags = _MS_NOSUID | _MS_NODEV
    kernel: list[str] = []
    for opt in sorted(options):
        key, _, value = opt.partition("=")
        if key == "fsname":
            source = value
        elif key == "subtype":
            fstype = "fuse." + value
        elif opt in _FLAGS:
            flag, on = _FLAGS[opt]
            flags = flags | flag if on else flags & ~flag
        elif opt in ("allow_other", "allow_root"):
            if "allow_other" not in kernel:
                kernel.append("allow_other")
        elif opt in _KERNEL:
            kernel.append(opt)
    return os.fsencode(source), os.fsencode(fstype), flags, ",".join(kernel)


def mount(mountpoint: Path, options: set[str]) -> int | None:
    """Mount ``/dev/fuse`` on *mountpoint*; its fd, or None where this process may not
    mount (libfuse then does, through fusermount3) or premounting is disabled."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0") or os.geteuid() != 0:
        return None
    source, fstype, flags, kernel = arguments(options)
    mode = stat.S_IFMT(os.stat(mountpoint).st_mode)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = f"fd={fd},rootmode={mode:o},user_id={os.getuid()},group_id={os.getgid()}"
    if kernel:
        data += "," + kernel
    if _mount(source, os.fsencode(mountpoint), fstype, flags, data.encode()) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        if err in (errno.EPERM, errno.EACCES):
            return None  # no CAP_SYS_ADMIN here: libfuse will use fusermount3
        raise OSError(err, os.strerror(err), os.fspath(mountpoint))
    return fd


def unmount(mountpoint: Path, fd: int) -> None:
    """Undo ``mount`` (lazily, as libfuse does), unless the mount is already gone: a
    device whose connection ended (``umount`` by someone else, ``fusermount3 -u``)
    reports POLLERR, and then whatever is mounted there now is not ours."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    for _fd, events in poller.poll(0):
        if events & select.POLLERR:
            return
    if _umount2(os.fsencode(mountpoint), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, os.strerror(err), os.fspath(mountpoint))


def abandon(mountpoint: Path, fd: int) -> None:
    """Give up a mount libfuse never took over: unmount it, close its device."""
    try:
        unmount(mountpoint, fd)
    finally:
        os.close(fd)
