"""When the adapter arms the C hook with attributes (``_COpens.arm_attrs``): never while
a request that may change the layers is in progress, and then once the last one ends,
from where each node is at that moment. Driven on plain directories, with a recording
stand-in for the hook module (the C side's own answers are tested on real mounts in
tests/test_opens.py)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from tests.unit.conftest import Layers, node, write
from unionfs.fuse.operations import _COpens
from unionfs.overlay.copyup import copy_up
from unionfs.overlay.idmap import IDENTITY
from unionfs.overlay.union import Union


class Hook:
    """The hook module's arming calls, recorded; every other call a no-op."""

    def __init__(self) -> None:
        self.armed: list[tuple[str, ...]] = []
        self.fail = False

    def configure_opens(self, on: bool, attrs: bool, *timeouts: float) -> bool:
        return on

    def arm_dir(
        self,
        ino: int,
        fd: int,
        path: bytes,
        one: bool,
        upper: bool,
        sole: bool,
        parts: tuple[tuple[int, bytes], ...] = (),
    ) -> bool:
        assert sole == (not parts)  # a merged directory comes with its parts below
        if self.fail:
            raise MemoryError
        self.armed.append(("dir", path.decode(), "upper" if upper else "lower", str(sole)))
        return True

    def arm_upper(self, ino: int, fd: int, path: bytes) -> bool:
        self.armed.append(("file", path.decode(), "upper"))
        return True

    def __getattr__(self, name: str) -> Any:
        return lambda *args: [] if name == "claim_all" else 0


def _c_opens(union: Union) -> tuple[_COpens, Hook]:
    hook = Hook()
    ops = SimpleNamespace(
        ids=IDENTITY,
        table=union.table,
        union=union,
        report_ino=lambda n: None,
        created_in_c=None,  # the hook's CREATE (configure_creates), unused here
        create_replied_in_c=None,
    )
    c = _COpens(hook, ops)  # type: ignore[arg-type]
    c.configure(True)
    return c, hook


async def test_attributes_given_during_a_change_are_armed_from_where_the_node_then_is(
    layers: Layers,
) -> None:
    write(layers.lowers[0] / "d" / "f")
    with layers.open() as u:
        c, hook = _c_opens(u)
        d = node(u, "d")
        c.change_starts()
        c.arm_attrs(d)  # the lower directory, asked for while the change runs
        await copy_up(u, d)  # the change: d now has an upper part
        assert hook.armed == []
        c.change_ends()
        assert hook.armed == [("dir", "d", "upper", "False")]


async def test_nothing_is_armed_until_the_last_change_ends(layers: Layers) -> None:
    (layers.upper / "new").mkdir()
    write(layers.upper / "new" / "f")
    with layers.open() as u:
        c, hook = _c_opens(u)
        new, f = node(u, "new"), node(u, "new/f")
        c.change_starts()
        c.change_starts()
        c.arm_attrs(new)
        c.arm_attrs(f)
        c.change_ends()
        assert hook.armed == []
        c.change_ends()
        assert sorted(hook.armed) == [("dir", "new", "upper", "True"), ("file", "new/f", "upper")]
        c.arm_attrs(f)  # no change in progress: at once
        assert hook.armed[-1] == ("file", "new/f", "upper")


async def test_a_node_dropped_or_a_reconfiguration_during_a_change_is_not_armed(
    layers: Layers,
) -> None:
    (layers.upper / "a").mkdir()
    (layers.upper / "b").mkdir()
    with layers.open() as u:
        c, hook = _c_opens(u)
        a, b = node(u, "a"), node(u, "b")
        c.change_starts()
        c.arm_attrs(a)
        c.arm_attrs(b)
        u.table.release(a)  # the kernel forgot it: its number may come to mean another
        c.change_ends()
        assert hook.armed == [("dir", "b", "upper", "True")]
        c.change_starts()
        c.arm_attrs(b)
        c.configure(True)  # tracing started or stopped meanwhile
        c.change_ends()
        assert len(hook.armed) == 1


async def test_a_failure_to_arm_after_a_change_is_logged_not_raised(
    layers: Layers, caplog: pytest.LogCaptureFixture
) -> None:
    (layers.upper / "a").mkdir()
    with layers.open() as u:
        c, hook = _c_opens(u)
        a = node(u, "a")
        c.change_starts()
        c.arm_attrs(a)
        hook.fail = True
        with caplog.at_level(logging.ERROR):
            c.change_ends()  # outside any request's boundary: must not end the mount
        assert "arming the attributes" in caplog.text
        assert c.changing == 0
