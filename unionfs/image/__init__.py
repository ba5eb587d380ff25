"""OCI images and layers from the shell: read image layouts and archives, keep a
digest-verified cache of unpacked layers, unpack layer tars safely, and write
an upper directory back out as a layer (``unionfs image|diff|commit|layer``).

The overlay rules themselves are not here: whiteouts and opaque markers are read
and written through ``unionfs.overlay.markers``, and what a stack of layers shows
is asked of ``unionfs.overlay.union``.
"""
