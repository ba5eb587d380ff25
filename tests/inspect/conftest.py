"""The inspection tools' tests: layers as the unit tier builds them."""

from __future__ import annotations

from tests.unit.conftest import layers

__all__ = ["layers"]
