"""How the inspection tools print names (``unionfs.inspect.names``)."""

from __future__ import annotations

import pytest

from unionfs.inspect.names import printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"plain/path", "plain/path"),
        ("été".encode(), "été"),
        (b"a\nb\tc\rd", "a\\nb\\tc\\rd"),
        (b"\x1b[31mred", "\\x1b[31mred"),
        (b"bad\xff\xfeutf", "bad\\xff\\xfeutf"),
        (b"back\\slash", "back\\\\slash"),
        (b"with space", "with space"),
        ("zero\u200bwidth".encode(), "zero\\xe2\\x80\\x8bwidth"),
        ("c1\u0085".encode(), "c1\\xc2\\x85"),
    ],
)
def test_a_name_prints_as_one_line_that_tells_its_bytes(raw: bytes, shown: str) -> None:
    assert printable(raw) == shown
    assert printable(raw.decode("utf-8", "surrogateescape")) == shown
    assert shown.isprintable()


def test_two_names_never_print_alike() -> None:
    names = [b"a\\x41", b"a\x41", b"a\\\\x41", b"a\\A", b"a\nb", b"a\\nb"]
    assert len({printable(n) for n in names}) == len(names)


def test_a_long_name_is_cut_in_the_middle_for_a_message() -> None:
    from unionfs.inspect.names import brief

    assert brief(b"short") == "short"
    long = b"a" * 70 + b"\n" + b"z" * 100_000
    shown = brief(long)
    assert len(shown) < 130 and shown.isprintable()
    assert shown.startswith("a" * 66) and shown.endswith(f"{'z' * 25} (100,071 bytes)")
