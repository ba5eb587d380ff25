"""Run the unionfs daemon with faults planted in its core, for tests of the error boundary.

``python -m tests.faults FAULT[,FAULT...] -- UNIONFS-ARGS...`` starts the
ordinary command line after patching the core in this process only:

- ``lookup=NAME``: looking up NAME raises a bug (not an OSError);
- ``forget``: every release of a kernel reference raises a bug;
- ``hide=NAME``: listings leave out every entry named NAME (a planted bug of the
  shape an exclusion must not cover; see ``tests/conformance/test_selfcheck.py``);
- ``eio=NAME``: looking up NAME fails with EIO, as a failing layer would;
- ``trace_capacity=N``: the trace holds N events between flushes (0: drops them all).

Production code has no hook for this; the faults are planted from here.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from unionfs.overlay.nodes import NodeTable
from unionfs.overlay.union import Union


def plant(spec: str) -> None:
    for fault in spec.split(","):
        kind, _, arg = fault.partition("=")
        if kind == "lookup":
            name = arg.encode()
            real_lookup = Union.lookup

            def lookup(
                self: Union, parent: Any, n: bytes, _real: Any = real_lookup, _name: bytes = name
            ) -> Any:
                if n == _name:
                    raise RuntimeError(f"injected fault on lookup of {n!r}")
                return _real(self, parent, n)

            Union.lookup = lookup  # type: ignore[method-assign,assignment]
        elif kind == "hide":
            hidden = arg.encode()
            real_names = Union.names

            def names(self: Union, node: Any, _real: Any = real_names, _h: bytes = hidden) -> Any:
                return [n for n in _real(self, node) if n != _h]

            Union.names = names  # type: ignore[method-assign]
        elif kind == "eio":
            bad = arg.encode()
            real = Union.lookup

            def failing(
                self: Union, parent: Any, n: bytes, _real: Any = real, _bad: bytes = bad
            ) -> Any:
                if n == _bad:
                    raise OSError(errno.EIO, "injected I/O error", n)
                return _real(self, parent, n)

            Union.lookup = failing  # type: ignore[method-assign,assignment]
        elif kind == "trace_capacity":
            from unionfs.fuse import tracing

            tracing.CAPACITY = int(arg)
        elif kind == "forget":

            def release_ino(self: NodeTable, ino: int, count: int) -> None:
                raise RuntimeError(f"injected fault on forget of {ino}")

            NodeTable.release_ino = release_ino  # type: ignore[method-assign]
        else:
            raise SystemExit(f"unknown fault: {fault}")


if __name__ == "__main__":
    sep = sys.argv.index("--")
    plant(sys.argv[1])
    from unionfs.cli import main

    raise SystemExit(main(sys.argv[sep + 1 :]))
