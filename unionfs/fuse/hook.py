"""Load the C hook that adds to pyfuse3 what it withholds (``csrc/hook.h``).

It must be loaded with ``RTLD_GLOBAL`` before pyfuse3 is imported, so that
pyfuse3's call to libfuse's ``fuse_session_new`` binds to the hook. If it
cannot be (pyfuse3 already imported, the module not built, disabled with
``UNIONFS_NO_HOOK=1``), or if it finds pyfuse3's operation table not to be
what it expects, the daemon works without it: every directory is opened with
an ordinary handle and nothing is cached that pyfuse3 alone cannot cache.
One log line says which.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from unionfs import lazylog

log = lazylog.get(__name__)

DISABLE_ENV = "UNIONFS_NO_HOOK"
# Every CREATE to the daemon's Python side, also where the hook could make the file
# (csrc/opens.c): for comparisons, and to test the daemon's own way there.
PYTHON_CREATES_ENV = "UNIONFS_PYTHON_CREATES"


def python_creates() -> bool:
    return os.environ.get(PYTHON_CREATES_ENV, "") not in ("", "0")


def load() -> ModuleType | None:
    """Load the hook before pyfuse3; None when it is not there."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        log.info("C hook disabled (%s): listings and symlinks stay uncached", DISABLE_ENV)
        return None
    if "pyfuse3" in sys.modules:
        log.warning("C hook not loaded: pyfuse3 was imported first; listings stay uncached")
        return None
    mismatch = _libfuse_mismatch()
    if mismatch:
        log.warning("C hook not loaded: %s; listings and symlinks stay uncached", mismatch)
        return None
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from unionfs.fuse import _fusehook  # type: ignore[attr-defined]
    except ImportError as e:
        log.warning("C hook not available (%s): listings and symlinks stay uncached", e)
        return None
    finally:
        sys.setdlopenflags(flags)
    module: ModuleType = _fusehook
    return module


def _libfuse_mismatch() -> str:
    """Why the hook and pyfuse3 would not share one libfuse ('' when they would).

    The hook stands in for some of libfuse's functions in the whole process and
    passes calls on to the libfuse it was built against; if pyfuse3 was built
    against another one (libfuse3.so.3 is 3.14, .so.4 is 3.17), two libraries
    would serve one session. Read from the sonames each extension names, without
    loading either.
    """
    import importlib.util

    names = {}
    for module in ("unionfs.fuse._fusehook", "pyfuse3"):
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            return ""  # the import itself will say what is missing
        names[module] = _libfuse_soname(spec.origin)
    hook, pyfuse3 = names["unionfs.fuse._fusehook"], names["pyfuse3"]
    if hook and pyfuse3 and hook != pyfuse3:
        return f"it was built against {hook}, pyfuse3 against {pyfuse3} (make install)"
    return ""


def _libfuse_soname(path: str) -> str:
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            at = m.find(b"libfuse3.so.")
            name = m[at : at + 16] if at >= 0 else b""
    except (OSError, ValueError):
        return ""
    digits = name[len(b"libfuse3.so.") :]
    n = len(digits) - len(digits.lstrip(b"0123456789"))
    return name[: len(b"libfuse3.so.") + n].decode() if n else ""


def check_bound(hook: ModuleType | None) -> None:
    """After the session exists: one log line if the hook did not take."""
    if hook is not None and not hook.bound():
        log.warning("C hook not active (%s): listings and symlinks stay uncached", hook.why_not())


def listing_active(hook: ModuleType | None) -> bool:
    """Whether the kernel serves directories without opendir (after its INIT)."""
    return hook is not None and bool(hook.listing_active())


def configure(hook: ModuleType | None, passthrough: bool, stack_depth: int, killpriv: bool) -> None:
    """Before mounting: what to ask the kernel for in INIT (csrc/passthrough.c, killpriv.c)."""
    if hook is None:
        return
    hook.configure_passthrough(passthrough, stack_depth)
    hook.configure_killpriv(killpriv)


def passthrough_state(hook: ModuleType | None) -> dict[str, bool]:
    """``built`` (against libfuse >= 3.17), ``capable`` (the kernel offers it) and
    ``active`` (negotiated); the last two are valid once the kernel's INIT arrived."""
    if hook is None:
        return {"built": False, "capable": False, "active": False}
    state: dict[str, bool] = hook.passthrough_state()
    return state


def killpriv_active(hook: ModuleType | None) -> bool:
    """Whether the kernel leaves dropping setuid/setgid to the daemon (KILLPRIV_V2)."""
    return hook is not None and bool(hook.killpriv_active())


# FUSE opcode numbers (linux/fuse.h), for the request counts.
OPCODES = {
    1: "lookup", 2: "forget", 3: "getattr", 4: "setattr", 5: "readlink", 6: "symlink",
    8: "mknod", 9: "mkdir", 10: "unlink", 11: "rmdir", 12: "rename", 13: "link", 14: "open",
    15: "read", 16: "write", 17: "statfs", 18: "release", 20: "fsync", 21: "setxattr",
    22: "getxattr", 23: "listxattr", 24: "removexattr", 25: "flush", 26: "init",
    27: "opendir", 28: "readdir", 29: "releasedir", 30: "fsyncdir", 31: "getlk", 32: "setlk",
    33: "setlkw", 34: "access", 35: "create", 36: "interrupt", 37: "bmap", 38: "destroy",
    39: "ioctl", 40: "poll", 42: "batch_forget", 43: "fallocate", 44: "readdirplus",
    45: "rename2", 46: "lseek", 47: "copy_file_range", 50: "syncfs", 51: "tmpfile", 52: "statx",
}  # fmt: skip


def request_counts(hook: ModuleType | None) -> dict[str, int]:
    """Requests received so far by name (csrc/requests.c); empty without the hook."""
    if hook is None:
        return {}
    counts: dict[int, int] = hook.request_counts()
    return {OPCODES.get(op, str(op)): n for op, n in sorted(counts.items())}


def reads_served(hook: ModuleType | None) -> int:
    """How many READs the hook answered itself (csrc/ops.c); 0 without it."""
    return hook.reads_served() if hook is not None else 0


def opens_served(hook: ModuleType | None) -> tuple[int, int, int, int, int]:
    """How many OPENs, GETATTRs, SETATTRs, LOOKUPs of missing names and CREATEs the
    hook answered itself (csrc/opens.c)."""
    if hook is None or not feature_active(hook, "opens"):
        return 0, 0, 0, 0, 0
    opens, attrs, setattrs, misses, creates = hook.opens_served()
    return int(opens), int(attrs), int(setattrs), int(misses), int(creates)


def in_runs(hook: ModuleType | None) -> tuple[int, int, int]:
    """How many requests runs of C answers read, how many of those they waited for, and
    how many the request loop waited for after a Python answer (csrc/requests.c)."""
    if hook is None:
        return 0, 0, 0
    read, waited, after_python = hook.run_counts()
    return int(read), int(waited), int(after_python)


def feature_active(hook: ModuleType | None, name: str) -> bool:
    """Whether the feature *name* wrapped pyfuse3's table (valid once the session exists)."""
    return hook is not None and hook.bound() and name in hook.features()


def release_deferred(hook: ModuleType | None) -> bool:
    """Whether RELEASE is answered in C and queued for ``take_released`` (csrc/release.c)."""
    return feature_active(hook, "release")


def take_released(hook: ModuleType | None) -> list[int]:
    """The file handles released since the last call (already answered)."""
    if hook is None:
        return []
    fhs: list[int] = hook.take_released()
    return fhs


def ino_reporting(hook: ModuleType | None) -> bool:
    """Whether an st_ino other than the node id can be reported (``csrc/ino.c``)."""
    return hook is not None and bool(hook.bound())


def ops_active(hook: ModuleType | None) -> bool:
    """Whether setxattr flags reach the daemon and fallocate, lseek and copy_file_range
    are served from the real fds (``csrc/ops.c``)."""
    return hook is not None and bool(hook.bound()) and bool(hook.ops_active())
