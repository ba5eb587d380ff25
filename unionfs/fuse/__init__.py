"""The FUSE side: the pyfuse3 adapter, what the C hook adds to pyfuse3, and the
mount's set-up checks and lifecycle. The overlay's rules live in
``unionfs.overlay``; this package only translates requests and replies."""
