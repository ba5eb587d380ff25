"""Named exclusions: intentional, documented differences between unionfs and the kernel.

A divergence is only ever excluded *by name*, here, with the reason written
down and the matching condition as narrow as the difference itself. The
comparators stay strict; this registry only labels what they found. Excluded
divergences are still printed (tagged) so they remain visible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tests.conformance.compare import Divergence
from tests.conformance.layers import LayerSpec


@dataclass(frozen=True)
class Exclusion:
    name: str
    reason: str
    applies: Callable[[Divergence, LayerSpec], bool]


def _lower_hardlink_group(d: Divergence, spec: LayerSpec) -> bool:
    if d.kind != "ino:hardlink" or not d.paths:
        return False
    return any(d.paths <= group for group in spec.lower_hardlink_groups())


def _lower_hardlink_copy_up(d: Divergence, spec: LayerSpec) -> bool:
    if d.kind != "ino:stability" or len(d.paths) != 1:
        return False
    return any(d.paths <= group for group in spec.lower_hardlink_groups())


EXCLUSIONS: tuple[Exclusion, ...] = (
    Exclusion(
        name="lower-hardlink-st_ino",
        reason=(
            "pyfuse3 makes the FUSE node id the reported st_ino, so two hard links that exist "
            "inside one lower layer get distinct st_ino in unionfs, while the kernel reports "
            "the lower inode number for both. After copy-up both break the link anyway; links "
            "made through the mount share st_ino on both sides. Limited to groups whose paths "
            "are all hard links of one inode inside one lower layer."
        ),
        applies=_lower_hardlink_group,
    ),
    Exclusion(
        name="lower-hardlink-copy-up-st_ino",
        reason=(
            "Same root cause as lower-hardlink-st_ino: on copy-up of a file that has hard "
            "links inside its lower layer (nlink > 1, index=off) the kernel stops reporting the "
            "lower inode number and reports the new upper inode's, because the links may be "
            "broken into different upper files. unionfs cannot change st_ino of a live FUSE "
            "node (pyfuse3: node id == st_ino), so its st_ino stays stable. Limited to paths "
            "that are hard links inside one lower layer."
        ),
        applies=_lower_hardlink_copy_up,
    ),
)


def label(divergences: list[Divergence], spec: LayerSpec) -> list[Divergence]:
    """Tag each divergence that a named exclusion covers; returns the untagged ones."""
    remaining = []
    for d in divergences:
        for ex in EXCLUSIONS:
            if ex.applies(d, spec):
                d.excluded_by = ex.name
                break
        else:
            remaining.append(d)
    return remaining
