"""Layer specifications: generate lower layers from a seed and build them on disk.

A case's layers are described by plain data (:class:`Entry` lists, top layer
first) so that the very same layers can be materialized twice - once for the
kernel overlay, once for unionfs - and printed when a divergence is reported.
Everything that the kernel would otherwise stamp with "now" (mtimes, the
layer roots' modes) is set explicitly so the two copies are indistinguishable.
"""

from __future__ import annotations

import os
import random
import stat
from dataclasses import dataclass, field

#: Names that exercise quoting and byte handling; all are valid Linux names.
ODD_NAMES: tuple[bytes, ...] = (
    b"with space",
    b"\xff\xfe-latin1-\xe9",
    b"-leading-dash",
    b"N" * 255,
    "caf\u00e9".encode(),
)
PLAIN_NAMES: tuple[bytes, ...] = (b"a", b"b", b"c", b"d", b"dir", b"sub", b"f1", b"f2", b"x", b"y")

#: Owners other than root appear deliberately: copy-up must preserve them.
OWNERS: tuple[tuple[int, int], ...] = ((0, 0), (0, 0), (0, 0), (1000, 1000), (1001, 100), (0, 1000))
FILE_MODES = (0o644, 0o644, 0o600, 0o755, 0o4755, 0o2755, 0o444, 0o640, 0o6711)
DIR_MODES = (0o755, 0o755, 0o700, 0o1777, 0o2775, 0o555)
OPAQUE_XATTR = b"trusted.overlay.opaque"
#: Base of all layer timestamps: far in the past so they never look "fresh".
TIME_BASE_NS = 1_000_000_000 * 10**9


@dataclass
class Entry:
    """One directory entry of one layer.

    Attributes:
        path: Path relative to the layer root (bytes, no leading slash).
        kind: ``dir``, ``file``, ``symlink``, ``fifo``, ``whiteout``, ``hardlink``,
            ``chr`` or ``blk``.
        mode: Permission bits (incl. setuid/setgid/sticky) - ignored for symlinks.
        owner: ``(uid, gid)``.
        chunks: For files: ``(offset, data)`` pieces; the gaps are holes.
        size: For files: final size (may exceed the data: a trailing hole).
        target: Symlink target, or for ``hardlink`` the path of the linked file.
        xattrs: Extended attributes to set (``user.*`` and the opaque marker).
        mtime_ns: Explicit modification time.
        rdev: ``(major, minor)`` for device nodes.
    """

    path: bytes
    kind: str
    mode: int = 0o644
    owner: tuple[int, int] = (0, 0)
    chunks: list[tuple[int, bytes]] = field(default_factory=list)
    size: int = 0
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    mtime_ns: int = 0
    rdev: tuple[int, int] = (0, 0)

    def describe(self) -> str:
        """One readable line for divergence reports."""
        p = self.path.decode(errors="backslashreplace")
        if len(p) > 40:
            p = p[:20] + f"...({len(self.path)}B)"
        extra = ""
        if self.kind == "file":
            extra = f" size={self.size} chunks={[(o, len(d)) for o, d in self.chunks]}"
        elif self.kind in ("symlink", "hardlink"):
            extra = f" -> {self.target!r}"
        if self.kind not in ("symlink", "hardlink", "whiteout"):
            extra += f" mode={self.mode:o} owner={self.owner[0]}:{self.owner[1]}"
        if self.xattrs:
            extra += f" xattrs={sorted(k.decode() for k in self.xattrs)}"
        return f"{self.kind:8} {p}{extra}"


@dataclass
class LayerSpec:
    """All lower layers of a case, top-most first, and whether the mount is read-only."""

    lowers: list[list[Entry]]
    readonly: bool = False
    upper: list[Entry] = field(default_factory=list)

    def describe(self) -> str:
        out = []
        if self.upper:
            out.append("  upper (initial contents):")
            out.extend("    " + e.describe() for e in self.upper)
        for i, layer in enumerate(self.lowers):
            out.append(f"  lower {i} ({'top' if i == 0 else 'below'}):")
            out.extend("    " + e.describe() for e in layer)
        out.append(f"  readonly={self.readonly}")
        return "\n".join(out)

    def lower_hardlink_groups(self) -> list[set[bytes]]:
        """Paths that are hard links of one inode inside one lower layer."""
        groups: list[set[bytes]] = []
        for layer in self.lowers:
            by_target: dict[bytes, set[bytes]] = {}
            for e in layer:
                if e.kind == "hardlink":
                    by_target.setdefault(e.target, {e.target}).add(e.path)
            groups.extend(by_target.values())
        return groups

    def merged_view(self) -> dict[bytes, str]:
        """Approximate merged tree (path -> kind), used only to aim generated ops well."""
        view: dict[bytes, str] = {}
        for layer in [*reversed(self.lowers), self.upper]:
            for e in layer:
                parent = e.path.rpartition(b"/")[0]
                if parent and view.get(parent) != "dir":
                    continue
                if (
                    e.kind in ("whiteout",)
                    or (e.kind != "dir" and view.get(e.path) == "dir")
                    or (e.kind == "dir" and (OPAQUE_XATTR in e.xattrs or view.get(e.path) != "dir"))
                ):
                    for p in [p for p in view if p.startswith(e.path + b"/")]:
                        del view[p]
                view.pop(e.path, None)
                if e.kind != "whiteout":
                    view[e.path] = e.kind
        return view

    def all_paths(self) -> list[bytes]:
        seen: dict[bytes, None] = {}
        for layer in [*reversed(self.lowers), self.upper]:
            for e in layer:
                seen.setdefault(e.path, None)
        return list(seen)


def _file_content(rng: random.Random) -> tuple[list[tuple[int, bytes]], int]:
    """Random file data: empty, small, block-sized, multi-block or sparse."""
    shape = rng.choice(["empty", "small", "small", "block", "big", "sparse", "sparse-tail"])
    if shape == "empty":
        return [], 0
    if shape == "small":
        n = rng.randint(1, 64)
        return [(0, rng.randbytes(n))], n
    if shape == "block":
        return [(0, rng.randbytes(4096))], 4096
    if shape == "big":
        n = rng.randint(5000, 70000)
        return [(0, rng.randbytes(n))], n
    if shape == "sparse":
        a, b = rng.randbytes(100), rng.randbytes(50)
        return [(0, a), (600_000, b)], 600_050
    return [(8192, rng.randbytes(10))], 1 << 20  # data in the middle, hole at the end


def _skeleton(rng: random.Random) -> list[bytes]:
    """Candidate paths shared by all layers so that layers overlap and merge."""
    paths: list[bytes] = []

    def grow(prefix: bytes, depth: int) -> None:
        count = rng.randint(4, 7) if depth == 0 else rng.randint(1, 4)
        names = rng.sample(PLAIN_NAMES, count)
        if rng.random() < 0.5:
            names.append(rng.choice(ODD_NAMES))
        for name in names:
            p = prefix + name
            paths.append(p)
            if depth < 2 and rng.random() < 0.6:
                grow(p + b"/", depth + 1)

    grow(b"", 0)
    return paths


def _children_of(skel: list[bytes], p: bytes) -> bool:
    return any(q.startswith(p + b"/") for q in skel)


def generate(rng: random.Random) -> LayerSpec:
    """Random lower layers: overlapping trees with every overlay corner in reach."""
    n = rng.choice([1, 2, 2, 3, 3])
    readonly = rng.random() < 0.15
    with_upper = not readonly and rng.random() < 0.3
    skel = _skeleton(rng)
    layers: list[list[Entry]] = []
    stamp = 0
    for depth in range(n + with_upper):  # depth 0 = bottom-most layer, generated first
        is_bottom = depth == 0
        layer: list[Entry] = []
        dirs: set[bytes] = {b""}
        files: list[bytes] = []
        for p in skel:
            parent = p.rpartition(b"/")[0]
            if parent not in dirs or rng.random() < 0.35:
                continue
            stamp += 1
            e = Entry(p, "file", mtime_ns=TIME_BASE_NS + stamp * 1_000_003_007)
            e.owner = rng.choice(OWNERS)
            weights = {
                "dir": 50 if _children_of(skel, p) else 15,
                "file": 35,
                "symlink": 10,
                "fifo": 3,
                "whiteout": 0 if is_bottom else 10,
                "hardlink": 6 if files else 0,
            }
            e.kind = rng.choices(list(weights), list(weights.values()))[0]
            if e.kind == "dir":
                e.mode = rng.choice(DIR_MODES)
                dirs.add(p)
                if not is_bottom and rng.random() < 0.2:
                    e.xattrs[OPAQUE_XATTR] = b"y"
            elif e.kind == "file":
                e.mode = rng.choice(FILE_MODES)
                e.chunks, e.size = _file_content(rng)
                files.append(p)
            elif e.kind == "symlink":
                e.target = rng.choice(
                    [
                        b"a",
                        b"../a",
                        b"dir",
                        b"/etc",
                        b"missing-target",
                        b"/nonexistent/x",
                        b"sub/f1",
                    ]
                )
            elif e.kind == "fifo":
                e.mode = rng.choice((0o644, 0o600, 0o666))
            elif e.kind == "hardlink":
                e.target = rng.choice(files)
            if e.kind in ("dir", "file") and rng.random() < 0.25:
                e.xattrs[b"user.k" + str(rng.randint(1, 3)).encode()] = rng.randbytes(
                    rng.randint(0, 20)
                )
            layer.append(e)
        if is_bottom and rng.random() < 0.7 and not any(x.path == b"etc" for x in layer):
            layer.append(Entry(b"etc", "symlink", target=b"/etc", mtime_ns=TIME_BASE_NS + 17))
        layers.append(layer)
    upper = layers.pop() if with_upper else []
    return LayerSpec(lowers=list(reversed(layers)), readonly=readonly, upper=upper)


def _set_times(path: bytes, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def build_layer(entries: list[Entry], root: bytes) -> None:
    """Create *entries* below the existing directory *root*.

    Ownership is applied before the mode (chown clears setuid/setgid) and the
    mtimes last, children before parents, because creating a child touches the
    parent directory's mtime.
    """
    for e in entries:
        p = os.path.join(root, e.path)
        if e.kind == "dir":
            os.mkdir(p)
        elif e.kind == "file":
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                for off, data in e.chunks:
                    os.pwrite(fd, data, off)
                os.ftruncate(fd, e.size)
            finally:
                os.close(fd)
        elif e.kind == "symlink":
            os.symlink(e.target, p)
        elif e.kind == "fifo":
            os.mkfifo(p, 0o600)
        elif e.kind == "whiteout":
            os.mknod(p, stat.S_IFCHR, os.makedev(0, 0))
        elif e.kind in ("chr", "blk"):
            kind = stat.S_IFCHR if e.kind == "chr" else stat.S_IFBLK
            os.mknod(p, kind | 0o600, os.makedev(*e.rdev))
        elif e.kind == "hardlink":
            os.link(os.path.join(root, e.target), p)
        else:
            raise ValueError(e.kind)
    for e in entries:
        p = os.path.join(root, e.path)
        if e.kind in ("hardlink", "whiteout"):
            continue
        os.chown(p, *e.owner, follow_symlinks=False)
        for name, value in e.xattrs.items():  # before the mode: a 0444 file refuses user.*
            os.setxattr(p, name, value, follow_symlinks=False)
        if e.kind != "symlink":
            os.chmod(p, e.mode)
    for e in reversed(entries):
        if e.kind != "hardlink":
            _set_times(os.path.join(root, e.path), e.mtime_ns)
    fix_root(root)


def fix_root(root: bytes) -> None:
    """Give a layer/upper root deterministic attributes (mkdtemp makes it 0700, "now")."""
    os.chmod(root, 0o755)
    _set_times(root, TIME_BASE_NS)


def materialize(spec: LayerSpec, base: bytes) -> tuple[list[bytes], bytes | None, bytes | None]:
    """Build the lowers (plus upper/work unless read-only) under *base*.

    Returns:
        ``(lowers top-first, upper, work)``; upper and work are None when read-only.
        A read-only spec with a single lower gets an empty extra lower, because
        the kernel refuses a read-only overlay with one lowerdir.
    """
    lowers = []
    for i, layer in enumerate(spec.lowers):
        d = os.path.join(base, b"l%d" % i)
        os.mkdir(d)
        build_layer(layer, d)
        lowers.append(d)
    if spec.readonly and len(lowers) == 1:
        d = os.path.join(base, b"lempty")
        os.mkdir(d)
        fix_root(d)
        lowers.append(d)
    if spec.readonly:
        return lowers, None, None
    upper, work = os.path.join(base, b"upper"), os.path.join(base, b"work")
    os.mkdir(upper)
    os.mkdir(work)
    build_layer(spec.upper, upper)
    return lowers, upper, work
