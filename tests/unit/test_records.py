"""``unionfs.records``: the NamedTuple stand-in and the JSON writer of the start-up path
behave as ``typing.NamedTuple`` and ``json.dumps`` do."""

from __future__ import annotations

import json
import typing

import pytest

from unionfs.records import Record, to_json


class Point(Record):
    """A point."""

    x: int
    y: int = 0
    label: str = "p"

    def moved(self, dx: int) -> Point:
        return self._replace(x=self.x + dx)

    @property
    def norm1(self) -> int:
        return abs(self.x) + abs(self.y)

    @classmethod
    def origin(cls) -> Point:
        return cls(0)


class TypedPoint(typing.NamedTuple):
    x: int
    y: int = 0
    label: str = "p"


def test_a_record_is_the_namedtuple_typing_would_make() -> None:
    p = Point(3, y=-4)
    t = TypedPoint(3, y=-4)
    assert tuple(p) == tuple(t) == (3, -4, "p")
    assert p == (3, -4, "p") and hash(p) == hash(t)
    assert p._fields == t._fields and p._field_defaults == t._field_defaults
    assert p._asdict() == t._asdict()
    assert repr(p) == "Point(x=3, y=-4, label='p')"
    assert p.moved(1) == Point(4, -4) and isinstance(p.moved(1), Point)
    assert p.norm1 == 7 and Point.origin() == Point(0, 0, "p")
    assert Point.__doc__ == "A point." and Point.__module__ == __name__
    x, y, label = p
    assert (x, y, label) == (3, -4, "p")
    with pytest.raises(AttributeError):
        p.x = 1  # type: ignore[misc]


def test_a_field_without_default_after_one_with_is_refused() -> None:
    with pytest.raises(TypeError):

        class Bad(Record):
            a: int = 0
            b: int  # type: ignore[misc]  # the mistake under test


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -12345678901234567890,
        1.5,
        "",
        'quote " backslash \\ slash /',
        "control \x00\x01\n\t\x1f\x7f",
        "non-ASCII é ü 日本",
        "emoji \U0001f600 beyond the BMP",
        "lone surrogates \udcff\udc80 from os.fsdecode",
        ["a", 1, None, [True, {"k": "v"}]],
        {"pid": 1, "config": {"lowers": ["/l1", "/l 2"], "upper": None}, "ids": {}},
    ],
)
def test_to_json_writes_what_json_dumps_writes(value: object) -> None:
    assert to_json(value) == json.dumps(value, separators=(",", ":"))
    assert json.loads(to_json(value)) == value


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: "x"}, b"bytes", {1, 2}])
def test_to_json_refuses_what_is_not_json(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        to_json(bad)
