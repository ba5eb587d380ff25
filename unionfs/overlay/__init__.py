"""The overlay's semantics, and nothing else.

Layers, markers (whiteouts, opaque directories), nodes and inode numbers,
resolution and merging, copy-up, changes to names, id mapping: everything
here works on plain directories, without a mount. Nothing in this package
imports pyfuse3 or the command line's option parser (``tests/unit`` checks
that), so the FUSE daemon, the image tools and the inspection tools all use
this one implementation of the rules.
"""
