"""Pictures of trees for the crash checks: the merged view, and the upper as stored.

A merged view maps each path to what a program can observe of it: type, mode,
owner, size, content (a CRC, big files included), symlink target, device, the
link count of non-directories, user xattrs, and the mtime of non-directories.
An mtime is kept exactly when it is a fixed old time (set by the layers or by a
``utime`` op: all of those lie before 2010) and as ``"recent"`` otherwise, since
two runs never write at the same nanosecond. Directory mtimes and link counts,
atimes, ctimes and inode numbers are left out: no two mounts agree on them.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import zlib
from typing import Any

from unionfs.overlay.markers import is_whiteout

FIXED_BEFORE = 1262304000 * 10**9  # 2010-01-01: every fixed time of the test is older
Entry = tuple[Any, ...]
View = dict[str, Entry]


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def crc(path: str) -> int:
    value = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, 1 << 20):
            value = zlib.crc32(chunk, value)
    finally:
        os.close(fd)
    return value


def _user_xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
        return tuple(
            sorted(
                (n, os.getxattr(path, n, follow_symlinks=False))
                for n in names
                if n.startswith("user.") and not n.startswith("user.overlay.")
            )
        )
    except OSError as e:
        return (("<error>", _errname(e).encode()),)


def entry(path: str) -> Entry:
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    detail: object = None
    if kind == stat.S_IFREG:
        detail = crc(path)
    elif kind == stat.S_IFLNK:
        detail = os.readlink(path)
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        detail = st.st_rdev
    is_dir = kind == stat.S_IFDIR
    mtime: object = None
    if not is_dir:
        mtime = st.st_mtime_ns if st.st_mtime_ns < FIXED_BEFORE else "recent"
    return (
        stat.filemode(st.st_mode),
        st.st_uid,
        st.st_gid,
        None if is_dir else st.st_size,
        detail,
        None if is_dir else st.st_nlink,
        mtime,
        _user_xattrs(path),
    )


def view(root: str) -> View:
    """The merged view below *root*; an entry that is listed but cannot be looked up
    (a whiteout a kernel overlay lists) is recorded with its errno."""
    out: View = {}

    def walk(rel: str) -> None:
        full = os.path.join(root, rel) if rel else root
        try:
            names = sorted(os.listdir(full))
        except OSError as e:
            out[rel + "/"] = ("!listdir", _errname(e))
            return
        for name in names:
            child = os.path.join(rel, name) if rel else name
            try:
                out[child] = entry(os.path.join(root, child))
            except OSError as e:
                out[child] = ("!lookup", _errname(e))
                continue
            if out[child][0].startswith("d"):
                walk(child)

    out[""] = entry(root)
    walk("")
    return out


def diff(got: View, want: View, limit: int = 20) -> list[str]:
    """Lines naming each path whose picture differs (``-`` missing, ``+`` extra)."""
    lines = []
    for path in sorted(set(got) | set(want)):
        g, w = got.get(path), want.get(path)
        if g == w:
            continue
        if g is None:
            lines.append(f"  - {path or '/'}: missing (expected {w})")
        elif w is None:
            lines.append(f"  + {path or '/'}: unexpected {g}")
        else:
            lines.append(f"  ~ {path or '/'}: {g}, expected {w}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"  ... {len(lines) - limit} more"]
    return lines


# -- the upper and the workdir as stored ------------------------------------------

TEMP_NAME = re.compile(r"#[0-9a-f]+\.\d+(\.drop)?")  # Union.tmp_name()
SHARED_WHITEOUTS = ("#whiteout", "#whiteout.new")


def is_opaque(path: str) -> bool:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def check_upper(upper: str, expected: View, lower: View, noted: set[str]) -> list[str]:
    """No partial file, no orphan, no stray whiteout in the upper, against the merged
    view *expected* and the view of the lower layers alone *lower*.

    - every entry that is not a whiteout is a path of *expected* of the same type,
      and a regular file has its expected size and content (else: orphan, partial);
    - every whiteout hides something: the lower layers show its path and no
      directory above it in the upper is opaque (else: stray). A stray whiteout is
      not harmless: the kernel overlay lists it in a directory that exists in the
      upper only (a name that cannot be looked up) and refuses to remove that
      directory (ENOTEMPTY). One is allowed where a note in the workdir names it
      (*noted*): the daemon died between moving a directory onto a whiteout and
      dropping the whiteout that went to the old name (the kernel overlay takes
      the same two steps); the next unionfs mount drops it.
    """
    problems: list[str] = []

    def walk(rel: str, opaque_above: bool) -> None:
        full = os.path.join(upper, rel) if rel else upper
        for name in sorted(os.listdir(full)):
            child = os.path.join(rel, name) if rel else name
            path = os.path.join(upper, child)
            st = os.lstat(path)
            if is_whiteout(st):
                if (child not in lower or opaque_above) and child not in noted:
                    problems.append(f"stray whiteout in the upper: {child} (hides nothing)")
                continue
            want = expected.get(child)
            if want is None or want[0][0] != stat.filemode(st.st_mode)[0]:
                problems.append(
                    f"orphan in the upper: {child} ({stat.filemode(st.st_mode)}), "
                    f"the merged view should have {want[0] if want else 'nothing'} there"
                )
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_size, crc(path)) != (want[3], want[4]):
                problems.append(
                    f"partial file in the upper: {child} ({st.st_size} bytes, "
                    f"expected {want[3]} bytes with crc {want[4]:08x})"
                )
            if stat.S_ISDIR(st.st_mode):
                walk(child, opaque_above or is_opaque(path))

    walk("", False)
    return problems


def drop_notes(work: str) -> set[str]:
    """The upper paths that notes in WORKDIR/work name (``#N.PID.drop`` symlinks)."""
    inner = os.path.join(work, "work")
    return {
        os.readlink(os.path.join(inner, name))
        for name in os.listdir(inner)
        if name.endswith(".drop") and os.path.islink(os.path.join(inner, name))
    }


def workdir_leftovers(work: str) -> tuple[list[str], list[str]]:
    """What WORKDIR holds: (temporary entries, anything else)."""
    temp: list[str] = []
    other: list[str] = []
    for name in sorted(os.listdir(work)):
        if name != "work":
            other.append(name)
    inner = os.path.join(work, "work")
    if os.path.isdir(inner):
        for name in sorted(os.listdir(inner)):
            if name in SHARED_WHITEOUTS:
                continue
            (temp if TEMP_NAME.fullmatch(name) else other).append("work/" + name)
    return temp, other
