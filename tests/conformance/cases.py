"""Hand-written cases: one readable case per known overlayfs corner.

Each case is a tiny layer spec plus an op list, run through the same runner
(and the same after-unmount checks) as the random cases. The layer DSL:
``F`` file, ``D`` directory, ``S`` symlink, ``P`` fifo, ``W`` whiteout,
``H`` hard link (to an earlier file of the same layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.conformance.layers import OPAQUE_XATTR, TIME_BASE_NS, Entry, LayerSpec
from tests.conformance.ops import Op, op
from tests.conformance.runner import Case


def F(
    path: bytes,
    data: bytes = b"data\n",
    mode: int = 0o644,
    owner: tuple[int, int] = (0, 0),
    chunks: list[tuple[int, bytes]] | None = None,
    size: int | None = None,
    xattrs: dict[bytes, bytes] | None = None,
) -> Entry:
    ch = chunks if chunks is not None else ([(0, data)] if data else [])
    return Entry(
        path, "file", mode, owner, ch, size if size is not None else len(data), xattrs=xattrs or {}
    )


def D(
    path: bytes,
    mode: int = 0o755,
    owner: tuple[int, int] = (0, 0),
    opaque: bool = False,
    xattrs: dict[bytes, bytes] | None = None,
) -> Entry:
    x = dict(xattrs or {})
    if opaque:
        x[OPAQUE_XATTR] = b"y"
    return Entry(path, "dir", mode, owner, xattrs=x)


def S(path: bytes, target: bytes) -> Entry:
    return Entry(path, "symlink", target=target)


def P(path: bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> Entry:
    return Entry(path, "fifo", mode, owner)


def W(path: bytes) -> Entry:
    return Entry(path, "whiteout")


def H(path: bytes, target: bytes) -> Entry:
    return Entry(path, "hardlink", target=target)


REDIRECT = b"trusted.overlay.redirect"
METACOPY = b"trusted.overlay.metacopy"


def R(path: bytes, redirect: bytes, opaque: bool = False) -> Entry:
    """A directory with a redirect xattr (as a kernel with redirect_dir=on writes)."""
    return D(path, opaque=opaque, xattrs={REDIRECT: redirect})


def M(path: bytes, size: int, redirect: bytes | None = None, mode: int = 0o600) -> Entry:
    """A metadata-only copy: an empty sparse file of *size* with the metacopy xattr."""
    x = {METACOPY: b""}
    if redirect is not None:
        x[REDIRECT] = redirect
    return F(path, b"", mode, size=size, xattrs=x)


def spec(
    *lowers: list[Entry], upper: list[Entry] | None = None, readonly: bool = False
) -> LayerSpec:
    """Layers top-most first; mtimes are assigned deterministically in order."""
    stamp = 0
    for layer in [*lowers, upper or []]:
        for e in layer:
            stamp += 1
            e.mtime_ns = e.mtime_ns or TIME_BASE_NS + stamp * 1_000_000_007
    return LayerSpec(list(lowers), readonly, upper or [])


@dataclass
class Named:
    name: str
    why: str
    spec: LayerSpec
    ops: list[Op]
    mode: str = ""  # mount options both sides get (redirect_dir=on, metacopy=on, ...)

    def case(self) -> Case:
        return Case(self.spec, self.ops)


SPARSE = [(0, b"head"), (1 << 20, b"middle")]
LONG = b"L" * 255

CASES: list[Named] = [
    Named(
        "rmdir-mkdir-opaque",
        "rmdir of a lower dir then mkdir makes an opaque upper dir",
        spec([D(b"d"), F(b"d/f")]),
        [
            op("unlink", b"d/f"),
            op("rmdir", b"d"),
            op("mkdir", b"d", 0o755),
            op("readdir", b"d"),
            op("open", 0, b"d/g", "WRONLY|CREAT", 0o644),
            op("close", 0),
            op("readdir", b"d"),
        ],
    ),
    Named(
        "unlink-lower-hardlink",
        "unlinking one lower hard link leaves the other (nlink as lower)",
        spec([F(b"a", b"shared"), H(b"b", b"a"), D(b"d")]),
        [
            op("lstat", b"b"),
            op("unlink", b"a"),
            op("lstat", b"b"),
            op("readdir", b""),
            op("link", b"b", b"d/c"),
            op("lstat", b"b"),
        ],
    ),
    Named(
        "rename-over-whiteout",
        "rename onto a name whose lower entry was deleted (whiteout)",
        spec([F(b"a", b"A"), F(b"b", b"B"), F(b"c", b"C")]),
        [
            op("unlink", b"b"),
            op("rename", b"a", b"b", "0"),
            op("readdir", b""),
            op("unlink", b"b"),
            op("rename", b"c", b"b", "NOREPLACE"),
            op("readdir", b""),
        ],
    ),
    Named(
        "copy-up-fifo",
        "metadata change on a lower fifo copies it up as a fifo",
        spec([P(b"p", 0o640, (1000, 1000))]),
        [op("chmod", b"p", 0o600), op("lstat", b"p"), op("setxattr", b"p", b"user.k1", b"v", "0")],
    ),
    Named(
        "copy-up-setuid",
        "copy-up keeps setuid/setgid and owner; chown then clears them",
        spec([F(b"s", b"#!bin\n", 0o6755, (1000, 1000))]),
        [
            op("open", 0, b"s", "WRONLY", 0),
            op("pwrite", 0, 2, b"XX"),
            op("close", 0),
            op("stat", b"s"),
            op("chown", b"s", 1001, -1, True),
            op("stat", b"s"),
        ],
    ),
    Named(
        "copy-up-255-byte-name",
        "copy-up of a file with a 255-byte name",
        spec([D(b"d"), F(b"d/" + LONG, b"long")]),
        [
            op("setxattr", b"d/" + LONG, b"user.k1", b"v", "CREATE"),
            op("readdir", b"d"),
            op("rename", b"d/" + LONG, LONG, "0"),
            op("readdir", b""),
        ],
    ),
    Named(
        "copy-up-sparse",
        "copy-up keeps a sparse file sparse (holes compared in upper)",
        spec([F(b"s", chunks=SPARSE, size=3 << 20)]),
        [
            op("chmod", b"s", 0o600),
            op("open", 0, b"s", "RDWR", 0),
            op("pread", 0, 1 << 20, 6),
            op("pwrite", 0, 2 << 20, b"x"),
            op("close", 0),
        ],
    ),
    Named(
        "open-write-nothing",
        "open for write with nothing written still copies up",
        spec([F(b"a", b"unchanged", 0o640, (1000, 100))]),
        [op("open", 0, b"a", "WRONLY", 0), op("close", 0), op("stat", b"a")],
    ),
    Named(
        "chmod-lower-dir-list",
        "chmod of a lower dir copies it up; its listing stays merged",
        spec([D(b"d", 0o755), F(b"d/x")], [D(b"d", 0o700), F(b"d/y")]),
        [op("chmod", b"d", 0o711), op("readdir", b"d"), op("stat", b"d"), op("stat", b"d/y")],
    ),
    Named(
        "symlink-to-lower-dir",
        "a symlink to a dir in a lower is followed inside the mount",
        spec([D(b"real"), F(b"real/f", b"in real"), S(b"link", b"real")]),
        [
            op("readdir", b"link"),
            op("readlink", b"link"),
            op("stat", b"link"),
            op("open", 0, b"link/f", "WRONLY|APPEND", 0),
            op("write", 0, b"+"),
            op("close", 0),
            op("lstat", b"link"),
            op("readdir", b"real"),
        ],
    ),
    Named(
        "upper-dir-over-lower-symlink",
        "a dir in the upper hides a symlink in a lower",
        spec([S(b"x", b"target"), D(b"target"), F(b"target/t")], upper=[D(b"x"), F(b"x/f")]),
        [
            op("readdir", b"x"),
            op("lstat", b"x"),
            op("rmdir", b"x"),
            op("unlink", b"x/f"),
            op("rmdir", b"x"),
            op("lstat", b"x"),
            op("symlink", b"target", b"x"),
            op("readdir", b"x"),
        ],
    ),
    Named(
        "rename-dir-with-lower-parts",
        "rename of a dir with lower parts is EXDEV (redirect_dir=off)",
        spec([D(b"d"), F(b"d/f"), D(b"e")]),
        [
            op("rename", b"d", b"d2", "0"),
            op("rename", b"d", b"e", "EXCHANGE"),
            op("mkdir", b"n", 0o755),
            op("rename", b"n", b"m", "0"),
            op("rename", b"m", b"e", "0"),
            op("rename", b"d/f", b"e/f", "0"),
            op("readdir", b""),
            op("readdir", b"e"),
        ],
    ),
    Named(
        "xattr-on-merged-dir",
        "user xattr on a dir merged from two lowers",
        spec([D(b"d", xattrs={b"user.k1": b"top"}), F(b"d/a")], [D(b"d"), F(b"d/b")]),
        [
            op("getxattr", b"d", b"user.k1"),
            op("setxattr", b"d", b"user.k1", b"new", "REPLACE"),
            op("setxattr", b"d", b"user.k2", b"v", "CREATE"),
            op("listxattr", b"d"),
            op("removexattr", b"d", b"user.k1"),
            op("listxattr", b"d"),
            op("readdir", b"d"),
        ],
    ),
    Named(
        "readonly-errnos",
        "a read-only mount (lowers only) refuses every change with EROFS",
        spec([F(b"a"), D(b"d"), S(b"l", b"a")], [F(b"b"), D(b"d"), F(b"d/x")], readonly=True),
        [
            op("open", 0, b"a", "WRONLY", 0),
            op("open", 1, b"a", "RDONLY", 0),
            op("read", 1, 100),
            op("open", 2, b"new", "WRONLY|CREAT", 0o644),
            op("unlink", b"a"),
            op("mkdir", b"e", 0o755),
            op("rmdir", b"d"),
            op("rename", b"a", b"z", "0"),
            op("chmod", b"a", 0o600),
            op("chown", b"a", 1000, 1000, True),
            op("utimes", b"a", 1, 2, True),
            op("setxattr", b"a", b"user.k1", b"v", "0"),
            op("removexattr", b"a", b"user.k1"),
            op("truncate", b"a", 0),
            op("link", b"a", b"a2"),
            op("symlink", b"a", b"s"),
            op("mknod", b"f", "fifo", 0o644, 0, 0),
            op("access", b"a", 2),
            op("access", b"a", 4),
            op("statvfs", b""),
            op("readdir", b"d"),
        ],
    ),
    Named(
        "unlink-open-file",
        "an open lower file stays usable after unlink",
        spec([F(b"a", b"0123456789")]),
        [
            op("open", 0, b"a", "RDWR", 0),
            op("unlink", b"a"),
            op("fstat", 0),
            op("pwrite", 0, 3, b"xy"),
            op("pread", 0, 0, 20),
            op("readdir", b""),
            op("close", 0),
        ],
    ),
    Named(
        "rename-flags",
        "RENAME_WHITEOUT is refused; EXCHANGE swaps lower and upper files",
        spec([F(b"a", b"A"), F(b"b", b"B")]),
        [
            op("rename", b"a", b"b", "WHITEOUT"),
            op("open", 0, b"c", "WRONLY|CREAT", 0o600),
            op("close", 0),
            op("rename", b"a", b"c", "EXCHANGE"),
            op("rename", b"b", b"c", "NOREPLACE"),
            op("readdir", b""),
        ],
    ),
    Named(
        "utimes-and-devices",
        "explicit times survive copy-up; device nodes can be created",
        spec([F(b"a"), D(b"d")]),
        [
            op("utimes", b"a", 1_300_000_000_123_456_789, 1_300_000_001_987_654_321, True),
            op("utimes", b"d", 5 * 10**17, 6 * 10**17, False),
            op("mknod", b"d/c", "chr", 0o600, 1, 3),
            op("mknod", b"d/b", "blk", 0o600, 7, 5),
            op("lstat", b"d/c"),
            op("stat", b"a"),
        ],
    ),
    # Regression cases for divergences the random suite found (see the report in README).
    Named(
        "whiteout-in-lower-only-dir",
        "the kernel lists a whiteout of a dir that exists in one layer only, lookup says ENOENT",
        spec([D(b"d"), F(b"d/f"), W(b"d/w")], [F(b"other")]),
        [op("readdir", b"d"), op("lstat", b"d/w"), op("open", 0, b"d/w", "WRONLY|CREAT", 0o644)],
    ),
    Named(
        "xattr-chmod-utimes-on-mount-root",
        "the mount root is a merged dir like any other: xattrs, chmod and utimes work on it",
        spec([F(b"a")], [D(b"d")]),
        [
            op("setxattr", b"", b"user.k1", b"v", "CREATE"),
            op("getxattr", b"", b"user.k1"),
            op("removexattr", b"", b"user.k2"),
            op("listxattr", b""),
            op("chmod", b"", 0o711),
            op("utimes", b"", 10**18, 2 * 10**18, True),
            op("stat", b""),
        ],
    ),
    Named(
        "trusted-overlay-xattrs-hidden",
        "trusted.overlay.* is invisible through the mount: ENODATA, never ENOTSUP",
        spec([D(b"o", opaque=True), F(b"o/x"), F(b"f")], [D(b"o"), F(b"o/hidden")]),
        [
            op("getxattr", b"o", b"trusted.overlay.opaque"),
            op("getxattr", b"f", b"trusted.overlay.opaque"),
            op("removexattr", b"o", b"trusted.overlay.opaque"),
            op("listxattr", b"o"),
            op("readdir", b"o"),
        ],
    ),
    Named(
        "whiteout-owner-in-setgid-dir",
        "whiteouts are made in the workdir and renamed in: root:root even in a setgid dir",
        spec([D(b"g", 0o2775, (0, 1000)), F(b"g/f"), D(b"g/sub")]),
        [op("unlink", b"g/f"), op("rmdir", b"g/sub"), op("readdir", b"g")],
    ),
    Named(
        "failed-setxattr-still-copies-up",
        "the kernel copies up before the xattr call, so a failing REPLACE leaves a copy",
        spec([D(b"d"), F(b"d/f", b"x", 0o640, (1000, 1000)), H(b"d/h", b"d/f")]),
        [
            op("setxattr", b"d/f", b"user.k1", b"v", "REPLACE"),
            op("lstat", b"d/f"),
            op("lstat", b"d/h"),
        ],
    ),
    Named(
        "rename-lower-dir-over-nonempty-dir",
        "EXDEV (lower parts, redirect_dir=off) is reported before ENOTEMPTY",
        spec([D(b"d"), F(b"d/f"), D(b"t"), F(b"t/x")]),
        [op("rename", b"d", b"t", "0"), op("mkdir", b"u", 0o755), op("rename", b"u", b"t", "0")],
    ),
    # -- st_ino, as the kernel shows it (compared by which layer inode it is) ----------
    Named(
        "lower-hardlink-st_ino",
        "names of one lower inode show its st_ino and nlink; copy-up splits one of them off",
        spec([D(b"d"), F(b"d/a", b"shared"), H(b"d/b", b"d/a"), H(b"c", b"d/a")]),
        [
            op("lstat", b"d/a"),
            op("chmod", b"d/a", 0o600),
            op("lstat", b"d/a"),
            op("lstat", b"d/b"),
            op("open", 0, b"c", "WRONLY|APPEND", 0),
            op("write", 0, b"more"),
            op("close", 0),
            op("readdir", b"d"),
            op("link", b"d/b", b"d/e"),
            op("lstat", b"d/b"),
        ],
    ),
    Named(
        "merged-dir-and-copy-up-st_ino",
        "a merged directory shows its lower part's st_ino; a copy-up keeps the lower one",
        spec([D(b"d"), F(b"d/f"), S(b"d/s", b"f"), P(b"d/p")], upper=[D(b"d"), F(b"d/u")]),
        [
            op("chmod", b"d/f", 0o600),
            op("chown", b"d/s", 1000, 1000, False),
            op("chmod", b"d/p", 0o600),
            op("rename", b"d/f", b"g", "0"),
            op("link", b"g", b"d/h"),
            op("readdir", b"d"),
        ],
    ),
    # -- the rest of the syscall surface ------------------------------------------------
    Named(
        "fallocate-seek-copy-range",
        "fallocate modes, SEEK_DATA/SEEK_HOLE on lower and upper files, copy_file_range",
        spec([F(b"s", chunks=SPARSE, size=3 << 20), F(b"t", b"0123456789" * 100)]),
        [
            op("open", 0, b"s", "RDONLY", 0),
            op("lseek", 0, 0, "DATA"),
            op("lseek", 0, 5, "HOLE"),
            op("lseek", 0, 2 << 20, "DATA"),
            op("open", 1, b"t", "RDWR", 0),
            op("fallocate", 1, "KEEP_SIZE", 0, 1 << 20),
            op("fallocate", 1, "0", 4096, 8192),
            op("fallocate", 1, "PUNCH_HOLE|KEEP_SIZE", 0, 4096),
            op("fallocate", 1, "ZERO_RANGE", 100, 3000),
            op("lseek", 1, 0, "DATA"),
            op("copy_file_range", 0, 1, 0, 50, 10000),
            op("open", 2, b"new", "RDWR|CREAT|EXCL", 0o644),
            op("copy_file_range", 0, 2, 1 << 20, 10, 1 << 20),
            op("fallocate", 0, "0", 0, 10),
            op("fstat", 2),
            op("close", 0),
            op("close", 1),
            op("close", 2),
        ],
    ),
    Named(
        "chown-minus-one-copies-up",
        "chown(path, -1, -1) copies up and touches the ctime only (setuid dropped for files)",
        spec([F(b"f", mode=0o4755), D(b"d")]),
        [op("chown", b"f", -1, -1, True), op("chown", b"d", -1, -1, True), op("stat", b"f")],
    ),
    # -- redirect_dir --------------------------------------------------------------------
    Named(
        "redirect-rename-lower-dirs",
        "redirect_dir=on: lower directories move (relative, absolute, nested redirects)",
        spec(
            [D(b"a"), D(b"a/b"), D(b"a/b/d"), F(b"a/b/d/file"), D(b"x")],
            [D(b"p"), D(b"p/q"), D(b"p/q/r"), F(b"p/q/r/f"), D(b"w1"), F(b"w1/in"), D(b"w2")],
        ),
        [
            op("rename", b"a/b/d", b"a/b/d2", "0"),
            op("readdir", b"a/b/d2"),
            op("rename", b"a/b/d2", b"x/moved", "0"),
            op("rename", b"x/moved", b"x/moved2", "0"),
            op("rename", b"p", b"P2", "0"),
            op("rename", b"P2/q/r", b"x/r2", "0"),
            op("readdir", b"x/r2"),
            op("rmdir", b"w2"),
            op("rename", b"w1", b"w2", "0"),
            op("mkdir", b"a/made", 0o755),
            op("mkdir", b"new", 0o755),
            op("rename", b"new", b"a/new", "0"),
            op("rename", b"x/moved2", b"a/b/d", "0"),
            op("readdir", b"a/b/d"),
            op("unlink", b"x/r2/f"),
            op("rmdir", b"x/r2"),
            op("readdir", b""),
        ],
        mode="redirect_dir=on",
    ),
    Named(
        "redirect-too-long",
        "redirect_dir=on: an absolute redirect over 256 bytes is EXDEV, as the kernel's",
        spec([D(LONG), D(LONG + b"/" + b"M" * 60), F(LONG + b"/" + b"M" * 60 + b"/f"), D(b"t")]),
        [
            op("rename", LONG + b"/" + b"M" * 60, b"t/m", "0"),
            op("rename", LONG, b"t/long", "0"),
            op("readdir", b"t"),
        ],
        mode="redirect_dir=on",
    ),
    Named(
        "redirects-found-in-layers",
        "redirects written by a redirect_dir=on kernel are followed (default follow mode); "
        "as after a real rename, no redirect target is visible under its own name too (the "
        "kernel answers ESTALE for two names of one lower directory)",
        spec(
            [
                D(b"src"),
                F(b"src/inL1"),
                R(b"dirC", b"/deep/x"),
                F(b"dirC/C_L1"),
                D(b"o", opaque=True),
                D(b"deep"),
                W(b"deep/x"),
                D(b"sub"),
                D(b"sub/srcrel"),
                F(b"sub/srcrel/rel_L1"),
            ],
            [
                D(b"src"),
                F(b"src/inL2"),
                D(b"deep"),
                D(b"deep/x"),
                F(b"deep/x/deepx_L2"),
                D(b"o"),
                D(b"o/p"),
                F(b"o/p/under_opaque"),
            ],
            upper=[
                W(b"src"),
                R(b"dirA", b"/src"),
                F(b"dirA/inU"),
                D(b"sub"),
                W(b"sub/srcrel"),
                R(b"sub/dirB", b"srcrel"),
                R(b"dirD", b"/elsewhere", opaque=True),
                R(b"dirE", b"/o/p"),
                R(b"dirK", b"/nonexistent"),
                F(b"fileH", b"upperfile", xattrs={REDIRECT: b"/src/inL1"}),
            ],
        ),
        [
            op("readdir", b"dirA"),
            op("readdir", b"dirC"),
            op("readdir", b"dirD"),
            op("readdir", b"dirE"),
            op("readdir", b"dirK"),
            op("readdir", b"sub/dirB"),
            op("stat", b"dirA/inL1"),
            op("open", 0, b"dirA/inL2", "WRONLY|APPEND", 0),
            op("write", 0, b"x"),
            op("close", 0),
            op("unlink", b"dirA/inL1"),
            op("readdir", b"dirA"),
            op("readdir", b""),
        ],
    ),
    Named(
        "invalid-redirects",
        "an empty redirect, a relative one with a slash or an absolute one with an empty "
        "component fails the lookup with EINVAL",
        spec([D(b"src"), F(b"src/f")], upper=[R(b"dirI", b"a/b"), R(b"dirJ", b"/src/")]),
        [op("stat", b"dirI"), op("readdir", b"dirJ"), op("readdir", b""), op("rmdir", b"dirI")],
    ),
    Named(
        "redirects-refused-with-nofollow",
        "redirect_dir=nofollow: a redirected directory is EPERM, an opaque one is fine",
        spec(
            [D(b"src"), F(b"src/f")],
            upper=[R(b"dirA", b"/src"), R(b"dirD", b"/src", opaque=True)],
        ),
        [op("stat", b"dirA"), op("readdir", b"dirD"), op("readdir", b"")],
        mode="redirect_dir=nofollow",
    ),
    # -- metacopy --------------------------------------------------------------------------
    Named(
        "metacopy-metadata-then-data",
        "metacopy=on: chmod/chown/utimes/xattrs copy up metadata only; a write copies the data",
        spec([F(b"a", b"A" * 5000), F(b"b", b"B" * 70000), F(b"c", chunks=SPARSE, size=2 << 20)]),
        [
            op("chmod", b"a", 0o600),
            op("chown", b"b", 1000, 1000, True),
            op("utimes", b"c", 10**18, 2 * 10**18, True),
            op("setxattr", b"a", b"user.k1", b"v", "CREATE"),
            op("stat", b"a"),
            op("open", 0, b"a", "RDONLY", 0),
            op("read", 0, 100),
            op("open", 1, b"a", "WRONLY|APPEND", 0),
            op("write", 1, b"tail"),
            op("pread", 0, 4990, 100),
            op("close", 0),
            op("close", 1),
            op("truncate", b"b", 100),
            op("open", 2, b"c", "RDWR", 0),
            op("lseek", 2, 0, "HOLE"),
            op("close", 2),
        ],
        mode="metacopy=on",
    ),
    Named(
        "metacopy-rename-link",
        "metacopy=on: a renamed or linked metadata-only copy keeps its data by a redirect",
        spec([D(b"d"), F(b"d/f", b"F" * 3000), F(b"g", b"G"), H(b"h", b"g"), D(b"e")]),
        [
            op("rename", b"d/f", b"d/f2", "0"),
            op("rename", b"d/f2", b"e/f3", "0"),
            op("link", b"e/f3", b"d/f4"),
            op("chmod", b"g", 0o600),
            op("rename", b"g", b"d/g2", "0"),
            op("stat", b"d/f4"),
            op("open", 0, b"d/f4", "WRONLY|APPEND", 0),
            op("write", 0, b"+"),
            op("close", 0),
            op("stat", b"e/f3"),
        ],
        mode="metacopy=on",
    ),
    Named(
        "metacopy-found-in-layers",
        "a metadata-only copy in a lower layer finds its data by its redirect; missing data "
        "is EIO; without metacopy=on it is EPERM",
        spec(
            [
                M(b"meta", 28, b"/deep/blob"),
                D(b"sub"),
                M(b"sub/m2", 8, b"rel"),
                M(b"lost", 5, b"/nothing"),
            ],
            [
                D(b"deep"),
                F(b"deep/blob", b"real data from deep/blob.."),
                D(b"sub"),
                F(b"sub/rel", b"rel data"),
            ],
        ),
        [op("stat", b"meta"), op("readdir", b""), op("stat", b"lost"), op("stat", b"sub/m2")],
        mode="metacopy=on",
    ),
    Named(
        "metacopy-refused-without-metacopy",
        "without metacopy=on a metadata-only copy is EPERM (the kernel will not follow it)",
        spec(
            [M(b"meta", 28, b"/deep/blob"), F(b"plain")],
            [D(b"deep"), F(b"deep/blob", b"real data from deep/blob..")],
        ),
        [op("stat", b"meta"), op("readdir", b""), op("open", 0, b"meta", "RDONLY", 0)],
    ),
]
