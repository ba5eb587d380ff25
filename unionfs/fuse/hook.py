"""Load the C hook that lets the kernel cache directory listings (``_fusehook.c``).

It must be loaded with ``RTLD_GLOBAL`` before pyfuse3 is imported, so that
pyfuse3's call to libfuse's ``fuse_session_new`` binds to the hook's wrapper.
If it cannot be (pyfuse3 already imported, the module not built), the daemon
works as before: every directory is opened with an ordinary handle.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)


def _never() -> bool:
    return False


def load() -> Callable[[], bool]:
    """Load the hook; returns whether directories are served without opendir
    (the answer is valid once the kernel's INIT has been handled)."""
    if "pyfuse3" in sys.modules:
        log.debug("pyfuse3 imported before the listing hook: listings stay uncached")
        return _never
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from unionfs.fuse import _fusehook  # type: ignore[attr-defined]
    except ImportError as e:
        log.debug("listing hook not available (%s): listings stay uncached", e)
        return _never
    finally:
        sys.setdlopenflags(flags)
    active: Callable[[], bool] = _fusehook.active
    return active
