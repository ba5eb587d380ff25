"""``-o`` option strings, parsed the way fuse-overlayfs users (and podman) write them.

Options are separated by commas. Empty options (``,,``) and a trailing comma
are ignored; ``\\,`` and ``\\:`` escape a comma or colon inside a path; a value
in double quotes may contain commas (``context="a:b:c1,c2"``).
"""

from __future__ import annotations

from unionfs.errors import UsageError
from unionfs.overlay.idmap import IdMap


class Options:
    """The mount options as given (``parse_options``); unset ones keep these defaults."""

    upper: str | None = None
    work: str | None = None
    readonly: bool = False
    fsync: bool = True  # fsync requests reach the disk (volatile / fsync=0: acknowledged only)
    # Copy-ups synced before they are put in place, as the kernel's fsync= option: 0 none
    # (the default, as fuse-overlayfs), 1 the copied data (fsync=auto), 2 every copy-up
    # of a file or directory, data or not (fsync=strict).
    sync_copy_up: int = 0
    writeback: bool = False
    passthrough: str = "auto"  # auto | on | off: FUSE passthrough (unionfs.fuse.passthrough)
    static_nlink: bool = False
    acl: bool = True  # noacl: a directory's default ACL never spares a new entry the umask
    userxattr: bool = False  # markers in user.overlay.* (automatic when trusted.* is refused)
    timeout: float | None = None
    trace: str | None = None  # -o trace=FILE: the overlay's decisions as JSON lines
    squash_root: bool = False
    squash_uid: int | None = None  # wins over squash_root, whatever the order
    squash_gid: int | None = None
    # redirect_dir: "on", "follow" or "nofollow" (None: not given; the default is
    # "follow", as the kernel's with redirect_always_follow); metacopy=on implies "on".
    redirect: str | None = None
    metacopy: bool = False

    def __init__(self) -> None:
        self.lowers: list[str] = []
        self.uid_map: list[IdMap] = []
        self.gid_map: list[IdMap] = []
        self.fuse: set[str] = set()  # passed on to the FUSE mount
        self.ignored: list[str] = []  # accepted, documented no-ops


# Mount flags handed to the kernel as they are.
FUSE_FLAGS = {
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "sync",
    "async",
    "dirsync",
    "allow_other",
    "allow_root",
    "default_permissions",
}
# Accepted and ignored: they change nothing this daemon does or must do.
NO_OPS = {
    "rw",
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "_netdev",
    "nofail",
    "private",
    "fast_ino",
    "debug",
    "lazytime",
    "nolazytime",
    "silent",
    "loud",
}
NO_OP_VALUES = {
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
    "xattr_permissions",
    "threaded",
    "index",
    "xino",
    "plugins",
    "comment",
    "fsname",
    "subtype",
    "max_read",
    "blksize",
    "noxattrs",
    "nfs_export",
    "uuid",
}


def split_options(text: str) -> list[str]:
    """Split on commas that are neither escaped nor inside double quotes.

    Escapes are kept (a path value is unescaped later, once it is split on its
    own colons); quotes are dropped.
    """
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    if quoted:
        raise UsageError(f"unterminated quote in options: {text}")
    out.append("".join(cur))
    return [o for o in out if o]


def split_path_list(value: str) -> list[str]:
    """Split ``lowerdir`` on unescaped colons and unescape each path."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            cur.append(value[i + 1])
            i += 2
            continue
        if c == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def escape_path(path: str) -> str:
    """A path as one item of a ``lowerdir`` value (``split_path_list`` reads it back):
    backslashes, colons and commas escaped."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def unescape(value: str) -> str:
    """Drop the backslash of every escape: ``\\,`` is a comma, ``\\\\`` a backslash."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            i += 1
        out.append(value[i])
        i += 1
    return "".join(out)


# The largest id a file can have: uid_t and gid_t are 32 bits, and all ones means "none".
MAX_ID = (1 << 32) - 2


def parse_idmap(name: str, value: str) -> list[IdMap]:
    """``uidmapping=INSIDE:OUTSIDE:COUNT[:INSIDE:OUTSIDE:COUNT...]``.

    podman writes a leading colon and may chain several ranges.
    """
    nums = [p for p in value.split(":") if p != ""]
    if not nums or len(nums) % 3:
        raise UsageError(f"{name}: expected INSIDE:OUTSIDE:COUNT triples, got {value!r}")
    try:
        ints = [int(n) for n in nums]
    except ValueError:
        raise UsageError(f"{name}: not a number in {value!r}") from None
    if any(n < 0 for n in ints):
        raise UsageError(f"{name}: negative id in {value!r}")
    maps = [IdMap(ints[i], ints[i + 1], ints[i + 2]) for i in range(0, len(ints), 3)]
    for m in maps:
        if m.count == 0:
            raise UsageError(f"{name}: a range of 0 ids in {value!r}")
        if max(m.inside, m.outside) + m.count - 1 > MAX_ID:
            raise UsageError(f"{name}: an id above {MAX_ID} in {value!r}")
    return maps


# The longest cache timeout (about 31 years): libfuse hands the kernel whole seconds.
MAX_TIMEOUT = 1e9


def _id(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"{name}: not a number: {value!r}") from None
    if n < 0:
        raise UsageError(f"{name}: must not be negative: {value!r}")
    if n > MAX_ID:
        raise UsageError(f"{name}: above the largest id, {MAX_ID}: {value!r}")
    return n


def _bool(name: str, value: str) -> bool:
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{name}: expected 0 or 1, got {value!r}")


def _fsync(value: str) -> tuple[bool, int]:
    """``fsync=``: fuse-overlayfs's 0/1 or the kernel's auto/strict/volatile, as
    (fsync requests reach the disk, how much of a copy-up is synced)."""
    kernel = {"auto": (True, 1), "strict": (True, 2), "volatile": (False, 0)}
    if value in kernel:
        return kernel[value]
    try:
        return _bool("fsync", value), 0
    except UsageError:
        raise UsageError(f"fsync: expected 0, 1, auto, strict or volatile, got {value!r}") from None


def parse_options(strings: list[str], opts: Options | None = None) -> Options:
    """Parse every ``-o`` string given, in order; later options win."""
    opts = opts or Options()
    for text in strings:
        for item in split_options(text):
            key, eq, value = item.partition("=")
            _apply(opts, key, value if eq else None, item)
    if opts.metacopy:
        # As the kernel: metacopy=on needs redirects, and turns them on unless told otherwise.
        if opts.redirect not in (None, "on"):
            # Worded as the kernel words it: off names the mode it became (follow).
            raise UsageError(f"conflicting options: metacopy=on,redirect_dir={opts.redirect}")
        opts.redirect = "on"
    return opts


REDIRECT_MODES = {"on": "on", "follow": "follow", "nofollow": "nofollow", "off": "follow"}


# Options that are a word alone: a value given to one is a mistake (ro=0 is not "not ro").
FLAGS = {"ro", "volatile", "static_nlink", "squash_to_root", "noacl", "userxattr"}


def _apply(opts: Options, key: str, value: str | None, item: str) -> None:  # noqa: C901
    if value is not None and (key in FLAGS or key in FUSE_FLAGS or key in NO_OPS):
        raise UsageError(f"option {key} takes no value: {item}")

    def need() -> str:
        if value is None or value == "":
            raise UsageError(f"option {key} needs a value")
        return value

    if key == "lowerdir":
        lowers = split_path_list(need())
        if any(p == "" for p in lowers):
            raise UsageError(f"empty path in lowerdir={value}")
        opts.lowers = lowers
    elif key == "upperdir":
        opts.upper = unescape(need())
    elif key == "workdir":
        opts.work = unescape(need())
    elif key == "ro":
        opts.readonly = True
    elif key == "volatile":
        opts.fsync, opts.sync_copy_up = False, 0
    elif key == "fsync":
        opts.fsync, opts.sync_copy_up = _fsync(need())
    elif key == "writeback":
        opts.writeback = _bool(key, need())
    elif key == "passthrough":
        mode = need()
        if mode not in ("auto", "on", "off"):
            raise UsageError(f"passthrough: expected auto, on or off, got {value!r}")
        opts.passthrough = mode
    elif key == "trace":
        opts.trace = unescape(need())
    elif key == "static_nlink":
        opts.static_nlink = True
    elif key == "noacl" and value is None:
        opts.acl = False
    elif key == "userxattr" and value is None:
        opts.userxattr = True
    elif key == "timeout":
        try:
            opts.timeout = float(need())
        except ValueError:
            raise UsageError(f"timeout: not a number: {value!r}") from None
        if not 0 <= opts.timeout <= MAX_TIMEOUT:  # NaN too
            raise UsageError(f"timeout: expected 0 to {MAX_TIMEOUT:.0f} seconds, got {value!r}")
    elif key == "uidmapping":
        opts.uid_map = parse_idmap(key, need())
    elif key == "gidmapping":
        opts.gid_map = parse_idmap(key, need())
    elif key == "redirect_dir":
        redirect = REDIRECT_MODES.get(need())
        if redirect is None:
            raise UsageError(f"redirect_dir: expected on, follow, nofollow or off, got {value!r}")
        opts.redirect = redirect
    elif key == "metacopy":
        if need() not in ("on", "off"):
            raise UsageError(f"metacopy: expected on or off, got {value!r}")
        opts.metacopy = value == "on"
    elif key == "squash_to_root":
        opts.squash_root = True
    elif key == "squash_to_uid":
        opts.squash_uid = _id(key, need())
    elif key == "squash_to_gid":
        opts.squash_gid = _id(key, need())
    elif key in FUSE_FLAGS and value is None:
        opts.fuse.add(key)
    elif key in NO_OPS and value is None:
        opts.ignored.append(key)
    elif key in NO_OP_VALUES or key.startswith("x-"):
        opts.ignored.append(item)
    else:
        raise UsageError(f"unknown option: {item}")


def human_size(n: float) -> str:
    """A size as the command lines print it: 1023 B, 1.0 KiB, 256.0 MiB, ..."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
