"""Names as the inspection tools print them: one line each, whatever bytes they hold.

A name in a layer may hold any byte but ``/`` and NUL: newlines, terminal escape
sequences, bytes that are not UTF-8. Printed as they are, one would break "one line
per finding" and another could drive the reader's terminal. ``printable`` shows every
such byte as a backslash escape (``\\n``, ``\\t``, ``\\x1b``, ``\\xff``) and a backslash
itself as ``\\\\``, so the text is one line and says exactly which bytes the name
has. The JSON output uses the same text: a JSON string cannot hold bytes that are not
UTF-8 (a lone surrogate is not recovered by other readers), and this form is.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from unionfs.errors import UsageError

_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x5C: "\\\\"}


def printable(name: bytes | str) -> str:
    """*name* (bytes, or a str as ``os.fsdecode`` makes it) as one line of text."""
    raw = os.fsencode(name) if isinstance(name, str) else name
    text = raw.decode("utf-8", errors="surrogateescape")
    if text.isprintable() and "\\" not in text:
        return text  # the usual case: nothing to escape
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code in _NAMED:
            out.append(_NAMED[code])
        elif not ch.isprintable() and ch != " ":
            out.extend(f"\\x{b:02x}" for b in ch.encode())
        else:
            out.append(ch)
    return "".join(out)


def brief(path: str | bytes, limit: int = 100) -> str:
    """*path* for a one-line message: printable, and cut in the middle when long."""
    text = printable(path)
    if len(text) <= limit:
        return text
    size = len(os.fsencode(path))
    return f"{text[: limit * 2 // 3]}...{text[-(limit // 4) :]} ({size:,} bytes)"


def directory_arg(raw: str, kind: str = "") -> Path:
    """A directory given on the command line, resolved; a one-line error naming it (and
    *kind*, as ``layer``) and saying what is wrong: missing, not a directory, refused."""
    what = f"{kind} {printable(raw)}" if kind else printable(raw)
    path = Path(os.path.realpath(raw))
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise UsageError(f"{what}: {e.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise UsageError(f"{what}: not a directory")
    return path
