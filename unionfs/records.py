"""Value types for the modules the mount command runs before its mount is ready.

``typing`` costs about 8 ms of every mount's start-up here, and those modules
use it only for ``NamedTuple``. ``Record`` is written like ``typing.NamedTuple``
(a class body of annotated fields, defaults, methods) and becomes the same kind
of class: a ``collections.namedtuple`` with the body's methods, so a record is a
tuple, compares and hashes as one, and has ``_asdict``/``_replace``. The type
checker sees ``typing.NamedTuple`` itself, so the fields keep their types.

``to_json`` writes the plain data of a state file (``unionfs.fuse.state``)
without importing ``json``, another 5 ms: the stdlib's own C escaper makes the
strings, so the output is what ``json.dumps`` writes without spaces.
"""

from __future__ import annotations

import collections

__all__ = ["Record", "to_json"]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple as Record
else:

    class _RecordMeta(type):
        def __new__(mcls, name: str, bases: tuple[type, ...], ns: dict[str, object]) -> type:
            if not bases:
                return super().__new__(mcls, name, bases, ns)  # Record itself
            fields = list(ns.get("__annotations__", {}))
            given = [f for f in fields if f in ns]
            if given != fields[len(fields) - len(given) :]:
                raise TypeError(f"{name}: a field without a default follows one with")
            base = collections.namedtuple(  # noqa: PYI024
                name, fields, defaults=[ns[f] for f in given], module=str(ns["__module__"])
            )
            for key, value in ns.items():
                if key not in fields and key not in ("__annotations__", "__module__"):
                    setattr(base, key, value)
            return base

    class Record(metaclass=_RecordMeta):
        """Subclass it as ``typing.NamedTuple``."""


try:
    from _json import encode_basestring_ascii as _string
except ImportError:  # another Python: the same function, in Python
    from json.encoder import py_encode_basestring_ascii as _string


def to_json(value: object) -> str:
    """*value* (dicts with str keys, lists, tuples, str, int, float, bool, None) as JSON."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return str(_string(value))
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"not JSON: {value!r}")
        return float.__repr__(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"not a JSON key: {k!r}")
            items.append(f"{_string(k)}:{to_json(v)}")
        return "{" + ",".join(items) + "}"
    raise TypeError(f"not JSON: {type(value).__name__}")
