"""The overlay's decisions, as events for whoever is tracing, and its refusals.

A ``Union`` has an ``events`` attribute: None (tracing off, every decision
point pays one ``is not None`` test) or a ``Sink`` that the FUSE adapter
attaches while a trace file or a ``unionfs trace --follow`` listens. The core
says *what* it decided (a copy-up, a whiteout, an opaque directory, bits
dropped); who asked and when is added by the sink, which knows the request.

A check that refuses a request by an overlay rule (EXDEV for a merged
directory, EINVAL for a reserved name, EROFS) raises ``Refused``: an ordinary
``OSError`` with that errno, so callers need not know it, which the adapter
and ``unionfs explain`` recognise as the overlay's own decision.
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False

# Event kinds (the ``event`` field of a trace record).
COPY_UP = "copy-up"
WHITEOUT = "whiteout"  # outcome: created / removed
OPAQUE = "opaque"  # outcome: created
PRIVILEGE_DROPPED = "privilege-dropped"  # setuid/setgid/capabilities cleared
REFUSED = "refused"  # an overlay rule refused a request: EXDEV, EINVAL, EROFS, ...
LAYER_ERROR = "layer-error"  # a layer's filesystem failed a request: EIO, ENOSPC, ...

if TYPE_CHECKING:  # only annotations name it: typing costs start-up time (unionfs.records)
    from typing import Any, Protocol

    class Sink(Protocol):
        def emit(self, kind: str, path: bytes, **fields: Any) -> None:
            """Record one decision about *path* (relative to the layer roots)."""


def errno_name(err: int | None) -> str:
    """The usual name of an errno (EOPNOTSUPP rather than its alias ENOTSUP)."""
    if err == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"
    return errno.errorcode.get(err or 0, str(err))


class Refused(OSError):
    """A request refused by an overlay rule; ``strerror`` says which rule, and
    ``filename`` is the path (relative to the layer roots) it was about (empty: the
    request's own path). ``xattr`` names the extended attribute a refused setxattr
    was about: a trace record keeps it apart from the path."""

    def __init__(self, err: int, why: str, path: bytes = b"", xattr: bytes | None = None) -> None:
        super().__init__(err, why, path)
        self.xattr = xattr

    @property
    def path(self) -> bytes:
        return self.filename if isinstance(self.filename, bytes) else os.fsencode(self.filename)
