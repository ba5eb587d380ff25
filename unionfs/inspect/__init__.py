"""Inspection tools: ``unionfs explain``, ``trace``, ``check`` and ``convert``.

They answer "why does this path look the way it does?" with the overlay's own
code: every verdict comes from ``unionfs.overlay`` (resolution, the checks of
each change, the markers), run on the layer directories without a mount.
"""
