"""Short op lists over the crash test's layers, each an operation whose change takes
several steps in the daemon. ``python -m tests.crash --every-step`` kills the
daemon right before and right after each of its changes to the layers while it
runs each of them, so every window between two steps is checked.
"""

from __future__ import annotations

from tests.crash.ops import Op

SCRIPTS: dict[str, list[Op]] = {
    "truncate-lower": [Op("truncate", ("etc/passwd", 10))],
    "otrunc-lower": [
        Op("open", ("etc/group", "WRONLY|TRUNC", 1)),
        Op("close", (1,)),
    ],
    "write-lower": [
        Op("open", ("etc/fstab", "RDWR", 1)),
        Op("write", (1, 100, b"changed")),
        Op("close", (1,)),
    ],
    "create-setuid": [Op("create", ("etc/prog", 0o4755, 1)), Op("close", (1,))],
    "mkdir-sticky": [Op("mkdir", ("etc/sticky", 0o1777))],
    "chown-lower-dir": [Op("chown", ("usr/share/doc/pkg1", 1000, 1000))],
    "link-lower-hardlinked": [
        Op("link", ("usr/bin/tool", "tmp/tool2")),
    ],
    "remove-upper-over-lower": [
        Op("open", ("etc/hosts", "RDWR", 1)),
        Op("write", (1, 0, b"new")),
        Op("close", (1,)),
        Op("unlink", ("etc/hosts",)),
    ],
    "create-over-whiteout": [
        Op("unlink", ("etc/hosts",)),
        Op("create", ("etc/hosts", 0o640, 1)),
        Op("write", (1, 0, b"x")),
        Op("close", (1,)),
    ],
    "mkdir-over-whiteout": [
        Op("unlink", ("etc/hosts",)),
        Op("mkdir", ("etc/hosts", 0o750)),
    ],
    "move-lower-file": [Op("rename", ("etc/passwd", "tmp/passwd", ""))],
    "move-dir-onto-whiteout": [
        Op("mkdir", ("tmp/new", 0o755)),
        Op("unlink", ("etc/fstab",)),
        Op("rename", ("tmp/new", "etc/fstab", "")),
    ],
    "move-dir-over-emptied-merged": [
        Op("mkdir", ("tmp/d", 0o755)),
        Op("unlink", ("var/log/syslog",)),
        Op("rename", ("tmp/d", "var/log", "")),
    ],
    "rmdir-emptied-merged": [
        Op("unlink", ("var/log/syslog",)),
        Op("rmdir", ("var/log",)),
    ],
    "exchange-lower": [Op("rename", ("etc/passwd", "etc/group", "EXCHANGE"))],
    # Another user's entries, in the sticky tmp of the lower layer (merged).
    "user-create": [Op("create", ("tmp/ufile", 0o640, 1), 1000), Op("close", (1,))],
    "user-mkdir": [Op("mkdir", ("tmp/udir", 0o750), 1000)],
    "user-mkfifo": [Op("mkfifo", ("tmp/ufifo", 0o640), 1000)],
    "user-symlink": [Op("symlink", ("target", "tmp/ulink"), 1000)],
}
