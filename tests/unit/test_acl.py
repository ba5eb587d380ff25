"""unionfs.overlay.acl: what a default ACL gives a new entry (the kernel's
``posix_acl_create``). The mount tests hold the whole path to the kernel overlay
(tests/test_namespace.py); these the computation's corners."""

from __future__ import annotations

import errno
import stat
import struct

import pytest

from unionfs.overlay import acl

_ANY = 0xFFFFFFFF


def _value(*entries: tuple[int, int, int], version: int = 2) -> bytes:
    value = acl.encode(list(entries))
    return value if version == 2 else struct.pack("<I", version) + value[4:]


MINIMAL = _value((acl.USER_OBJ, 7, _ANY), (acl.GROUP_OBJ, 5, _ANY), (acl.OTHER, 0, _ANY))
NAMED = _value(
    (acl.USER_OBJ, 7, _ANY),
    (acl.USER, 6, 1000),
    (acl.GROUP_OBJ, 7, _ANY),
    (acl.MASK, 5, _ANY),
    (acl.OTHER, 4, _ANY),
)


def test_a_minimal_default_acl_narrows_the_mode_and_leaves_no_acl() -> None:
    assert acl.inherit(MINIMAL, stat.S_IFREG | 0o666) == (stat.S_IFREG | 0o640, None, None)
    # A directory keeps the default ACL for its own children; special bits stay.
    assert acl.inherit(MINIMAL, stat.S_IFDIR | 0o2777) == (stat.S_IFDIR | 0o2750, None, MINIMAL)


def test_named_entries_give_an_access_acl_whose_mask_the_mode_narrows() -> None:
    mode, access, default = acl.inherit(NAMED, stat.S_IFREG | 0o644)
    # group bits from the mask (r-x & r--), the mask narrowed to them; other r-- & r--.
    assert mode == stat.S_IFREG | 0o644
    assert access == _value(
        (acl.USER_OBJ, 6, _ANY),
        (acl.USER, 6, 1000),
        (acl.GROUP_OBJ, 7, _ANY),
        (acl.MASK, 4, _ANY),
        (acl.OTHER, 4, _ANY),
    )
    assert default is None


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x02\x00\x00",
        _value((acl.USER_OBJ, 7, _ANY), version=1),
        _value((acl.USER_OBJ, 7, _ANY), (0x40, 7, _ANY), (acl.OTHER, 0, _ANY)),
        _value((acl.USER_OBJ, 7, _ANY), (acl.OTHER, 0, _ANY)),  # no group entry
        MINIMAL + b"\x00",
    ],
)
def test_a_value_no_filesystem_would_store_is_an_eio(value: bytes) -> None:
    with pytest.raises(OSError) as e:
        acl.inherit(value, stat.S_IFREG | 0o666)
    assert e.value.errno == errno.EIO


def test_without_unmapped_drops_only_what_names_an_unmapped_id() -> None:
    """What a daemon in a user namespace writes for an ACL naming ids it cannot map
    (they read as -1): the ACL less those entries, granting nobody more than before."""
    u, g, m, o, uo, go = acl.USER, acl.GROUP, acl.MASK, acl.OTHER, acl.USER_OBJ, acl.GROUP_OBJ
    x = acl.UNMAPPED
    assert acl.without_unmapped(MINIMAL) is None
    assert acl.without_unmapped(NAMED) is None  # 1000 is mapped
    assert acl.without_unmapped(b"\x02\x00") is None  # not an ACL: the setxattr's error stands
    # Another named entry is left: the mask stays, as it is.
    assert acl.without_unmapped(
        _value((uo, 7, x), (u, 7, x), (g, 6, 50), (go, 4, x), (m, 7, x), (o, 0, x))
    ) == _value((uo, 7, x), (g, 6, 50), (go, 4, x), (m, 7, x), (o, 0, x))
    # Nothing named is left: the mask goes, the owning group keeps what it had under it.
    assert acl.without_unmapped(
        _value((uo, 7, x), (u, 7, x), (g, 7, x), (go, 6, x), (m, 5, x), (o, 0, x))
    ) == _value((uo, 7, x), (go, 4, x), (o, 0, x))
