"""The image tools' small option helpers: sizes, and paths in a lowerdir= value."""

from __future__ import annotations

import argparse

import pytest

from unionfs.image.cli import _human, parse_size
from unionfs.options import escape_path, split_path_list


@pytest.mark.parametrize(
    ("text", "value"),
    [("123", 123), ("123B", 123), ("64K", 64 << 10), ("64kb", 64 << 10), ("10MiB", 10 << 20)]
    + [("2G", 2 << 30), (" 1T ", 1 << 40)],
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["10iB", "10BB", "K", "1.5G", "-1", "10X"])
def test_not_sizes(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size(text)


def test_human_sizes() -> None:
    assert [_human(n) for n in (-1, 0, 1023, 1536, 5 << 20, 3 << 30, 5 << 40)] == [
        "?",
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 GiB",
        "5120.0 GiB",
    ]


def test_escaped_paths_read_back_as_they_were() -> None:
    paths = ["/plain", "/a:b", "/c,d", "/back\\slash", "/all\\:,:"]
    assert split_path_list(":".join(escape_path(p) for p in paths)) == paths
