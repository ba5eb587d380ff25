"""unionfs: a FUSE union filesystem with the Linux kernel overlayfs's semantics and format."""

__version__ = "0.1.0"

from unionfs import startup as _startup  # noqa: E402

_startup.mark("interpreter")  # the interpreter is up (make bench: mount latency phases)
