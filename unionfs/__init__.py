"""unionfs: a FUSE union filesystem with the Linux kernel overlayfs's semantics and format."""

__version__ = "0.1.0"
