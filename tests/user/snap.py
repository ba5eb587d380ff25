"""Print a tree's snapshot (tests/treesnap.py) as a Python literal; run inside a
user namespace, where the kernel overlay is mounted with userxattr."""

from __future__ import annotations

import sys

from tests.treesnap import snapshot

if __name__ == "__main__":
    print(repr(snapshot(sys.argv[1])))
