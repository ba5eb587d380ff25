"""Owner mapping between the ids stored in the layers and the ids the mount shows.

``uidmapping=UID:MAPPED:LEN`` (fuse-overlayfs's option, as podman passes it for
a user namespace): a file stored with owner ``UID+i`` is shown as owned by
``MAPPED+i``; a caller or a chown with ``MAPPED+i`` is stored as ``UID+i``. So
one image store serves containers in different user namespaces without
chown'ing the files. Ids outside every range are shown as the overflow id,
and cannot be stored (EINVAL, as chown to an unmapped id in a user namespace).

``squash_to_uid``/``squash_to_gid``/``squash_to_root`` show every file as
owned by one user/group; what is stored is unchanged.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence


class IdMap:
    """One ``uidmapping``/``gidmapping`` range: *count* ids from *inside* (stored
    in the layers) correspond to ids from *outside* (shown in the mount)."""

    __slots__ = ("inside", "outside", "count")

    def __init__(self, inside: int, outside: int, count: int) -> None:
        self.inside = inside
        self.outside = outside
        self.count = count

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IdMap):
            return NotImplemented
        return (self.inside, self.outside, self.count) == (other.inside, other.outside, other.count)

    def __repr__(self) -> str:
        return f"IdMap(inside={self.inside}, outside={self.outside}, count={self.count})"


OVERFLOW_ID = 65534


class IdTable:
    """One direction-aware mapping for uids or gids."""

    def __init__(self, ranges: Sequence[IdMap], squash: int | None = None) -> None:
        self.ranges = list(ranges)
        self.squash = squash

    @property
    def identity(self) -> bool:
        return not self.ranges and self.squash is None

    def shown(self, stored: int) -> int:
        if self.squash is not None:
            return self.squash
        if not self.ranges:
            return stored
        for r in self.ranges:
            if r.inside <= stored < r.inside + r.count:
                return r.outside + (stored - r.inside)
        return OVERFLOW_ID

    def stored(self, shown: int) -> int:
        if not self.ranges:
            return shown
        for r in self.ranges:
            if r.outside <= shown < r.outside + r.count:
                return r.inside + (shown - r.outside)
        raise OSError(errno.EINVAL, f"id {shown} is not mapped")

    def stored_or_overflow(self, shown: int) -> int:
        """For new files of an unmapped caller: owned by the overflow id, not refused."""
        try:
            return self.stored(shown)
        except OSError:
            return OVERFLOW_ID


class IdMapper:
    def __init__(self, uids: IdTable, gids: IdTable) -> None:
        self.uids = uids
        self.gids = gids
        # Asked for every attribute the daemon gives: worked out once (the tables
        # never change after the mount starts).
        self.identity = uids.identity and gids.identity


IDENTITY = IdMapper(IdTable([]), IdTable([]))
