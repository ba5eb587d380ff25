"""uidmapping/gidmapping and squash_*: the ids shown versus the ids stored."""

from __future__ import annotations

import os

from tests.conftest import Mounted, Stack
from tests.test_merge import write
from tests.test_namespace import as_user, let_others_in

MAPPING = "uidmapping=0:1000:1:1:110000:65536,gidmapping=:0:1000:1:1:110000:65536"


def _owned(stack: Stack) -> None:
    for name, owner in (("root", 0), ("one", 1), ("unmapped", 70000)):
        write(stack.lowers[0] / name)
        os.chown(stack.lowers[0] / name, owner, owner)


def test_ids_are_shown_mapped_and_stored_unmapped(stack: Stack, mounted: Mounted) -> None:
    _owned(stack)
    let_others_in(stack)
    os.chmod(stack.upper, 0o777)
    mounted(extra_options=MAPPING)
    m = stack.mnt
    assert [
        (os.stat(m / n).st_uid, os.stat(m / n).st_gid) for n in ("root", "one", "unmapped")
    ] == [(1000, 1000), (110000, 110000), (65534, 65534)]
    r = as_user(f"touch {m}/by-1000", uid=1000, gid=1000)
    assert r.returncode == 0, r.stderr
    st = os.stat(stack.upper / "by-1000")
    assert (st.st_uid, st.st_gid) == (0, 0)  # host 1000 is the layers' 0
    os.chown(m / "one", 110005, 110006)
    st = os.stat(stack.upper / "one")
    assert (st.st_uid, st.st_gid) == (6, 7)  # 110000 is the layers' 1
    assert (os.stat(m / "one").st_uid, os.stat(m / "one").st_gid) == (110005, 110006)
    try:
        os.chown(m / "root", 5, 5)  # host id 5 is not mapped
        raise AssertionError("chown to an unmapped id succeeded")
    except OSError as e:
        assert e.errno == 22


def test_squash_options_show_one_owner(stack: Stack, mounted: Mounted) -> None:
    _owned(stack)
    mounted(extra_options="squash_to_uid=5,squash_to_root")
    for name in ("root", "one", "unmapped"):
        st = os.stat(stack.mnt / name)
        assert (st.st_uid, st.st_gid) == (5, 0)  # squash_to_uid wins over squash_to_root
    assert os.stat(stack.lowers[0] / "one").st_uid == 1
