"""The mixed workload: tasks of a container's life, as lists of single-call ops.

Each task (:meth:`Workload.task`) looks at the namespace model (what the ops so
far made of the tree) and returns the ops that do it: untar an archive, overwrite
files (in place, truncating, appending, or by writing a new file and renaming it
over the old), rename files and directories, delete (``rm``, ``rmdir``,
``rm -rf``), create where a lower file was deleted (over its whiteout), copy up
the big lower files, change modes, owners, times and xattrs.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from collections.abc import Callable

from tests.crash.ops import PAGE, Op, apply

KINDS_NONDIR = ("f", "l", "p")
MODES_FILE = (0o644, 0o600, 0o755, 0o640, 0o4755, 0o2755, 0o444)
MODES_DIR = (0o755, 0o700, 0o1777, 0o2775, 0o750)
OWNERS = (0, 1000, 1234)
USER = 1000  # who makes entries of a user other than root


def _parent(path: str) -> str:
    return os.path.dirname(path)


class Workload:
    """Generates tasks from a seed; *lower* is the view of the lower layers alone."""

    def __init__(self, rng: random.Random, lower: dict[str, str], big_files: list[str]) -> None:
        self.rng = rng
        self.lower = lower
        self.big_files = big_files
        self._names = 0
        self._handles = 0
        self.tasks: list[tuple[int, Callable[[dict[str, str]], list[Op]]]] = [
            (3, self.untar),
            (4, self.overwrite),
            (2, self.rename_file),
            (2, self.rename_dir),
            (3, self.delete),
            (2, self.create_over_whiteout),
            (2, self.big_copy_up),
            (2, self.attributes),
            (1, self.create_new),
            (2, self.user_entries),
        ]

    # -- helpers ---------------------------------------------------------------

    def task(self, model: dict[str, str]) -> tuple[str, list[Op]]:
        weights = [w for w, _ in self.tasks]
        fn = self.rng.choices([t for _, t in self.tasks], weights)[0]
        return fn.__name__, fn(model)

    def name(self, prefix: str = "n") -> str:
        self._names += 1
        return f"{prefix}{self._names}"

    def handle(self) -> int:
        self._handles += 1
        return self._handles

    def pick(self, model: dict[str, str], kinds: tuple[str, ...]) -> str | None:
        paths = sorted(p for p, k in model.items() if k in kinds)
        return self.rng.choice(paths) if paths else None

    def pick_dir(self, model: dict[str, str], exclude_under: str | None = None) -> str:
        dirs = [""] + sorted(p for p, k in model.items() if k == "d")
        if exclude_under is not None:
            dirs = [d for d in dirs if d != exclude_under and not d.startswith(exclude_under + "/")]
        return self.rng.choice(dirs)

    def new_path(self, model: dict[str, str], prefix: str = "n") -> str:
        parent = self.pick_dir(model)
        return os.path.join(parent, self.name(prefix)) if parent else self.name(prefix)

    def deleted_lower(self, model: dict[str, str], kinds: tuple[str, ...] = ()) -> str | None:
        """A path the lower layers show that is gone now (a whiteout hides it), in a
        directory that exists."""
        paths = sorted(
            p
            for p, k in self.lower.items()
            if p not in model
            and (not kinds or k in kinds)
            and (_parent(p) == "" or model.get(_parent(p)) == "d")
        )
        return self.rng.choice(paths) if paths else None

    def data(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def write_file(self, h: int, content: bytes) -> list[Op]:
        """One page per write: a write is then one request and one write in the daemon."""
        return [
            Op("write", (h, off, content[off : off + PAGE])) for off in range(0, len(content), PAGE)
        ]

    def page_write(self, h: int, limit: int) -> Op:
        off = self.rng.randrange(0, max(1, limit))
        room = PAGE - off % PAGE
        return Op("write", (h, off, self.data(self.rng.randint(1, room))))

    # -- tasks -----------------------------------------------------------------

    def user_entries(self, model: dict[str, str]) -> list[Op]:
        """Another user's new files, directories, fifos and symlinks, in a directory
        anyone may write in or in one of theirs: never the daemon's (root's), not even
        for a moment (the daemon builds them in the workdir and renames them in; the
        hook makes them under the user's fsuid)."""
        r = self.rng
        shared = ("tmp", "var/spool/mail")
        dirs = sorted(
            p
            for p, k in model.items()
            if k == "d" and (p in shared or (p.startswith(shared) and "/u" in p))
        )
        if not dirs:
            return []
        ops: list[Op] = []
        for _ in range(r.randint(1, 4)):
            path = os.path.join(r.choice(dirs), self.name("u"))
            kind = r.choice(("f", "d", "p", "l"))
            if kind == "f":
                h = self.handle()
                ops.append(Op("create", (path, r.choice(MODES_FILE), h), USER))
                ops += self.write_file(h, self.data(r.randint(0, 2 * PAGE)))
                ops.append(Op("close", (h,)))
            elif kind == "d":
                ops.append(Op("mkdir", (path, r.choice(MODES_DIR)), USER))
            elif kind == "p":
                ops.append(Op("mkfifo", (path, 0o640), USER))
            else:
                ops.append(Op("symlink", ("target", path), USER))
        return ops

    def untar(self, model: dict[str, str]) -> list[Op]:
        """Extract a fresh archive the way tar does: directories made private first and
        given their modes, owners and times last; an existing file unlinked first."""
        r = self.rng
        choice = r.random()
        top: str | None = None
        if choice < 0.3:
            top = self.deleted_lower(model, ("d",))  # over the whiteout of a lower dir
        elif choice < 0.5:
            top = self.pick(model, ("d",))  # into an existing directory
        if top is None:
            top = self.new_path(model, "pkg")
        archive = self._archive(top)
        ops: list[Op] = []
        scratch = dict(model)
        dirs: list[tarfile.TarInfo] = []
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            for m in tar.getmembers():
                new: list[Op] = []
                if m.isdir():
                    if scratch.get(m.name) != "d":
                        new.append(Op("mkdir", (m.name, 0o700)))
                        dirs.append(m)
                else:
                    if m.name in scratch and scratch[m.name] != "d":
                        new.append(Op("unlink", (m.name,)))
                    if m.isfile():
                        h = self.handle()
                        f = tar.extractfile(m)
                        assert f is not None
                        new.append(Op("create", (m.name, 0o600, h)))
                        new += self.write_file(h, f.read())
                        new.append(Op("close", (h,)))
                        new.append(Op("chown", (m.name, m.uid, m.gid)))
                        new.append(Op("chmod", (m.name, m.mode)))
                        new.append(Op("utime", (m.name, int(m.mtime) * 10**9)))
                    elif m.issym():
                        new.append(Op("symlink", (m.linkname, m.name)))
                        new.append(Op("chown", (m.name, m.uid, m.gid)))
                        new.append(Op("utime", (m.name, int(m.mtime) * 10**9)))
                    elif m.islnk():
                        new.append(Op("link", (m.linkname, m.name)))
                for op in new:
                    apply(scratch, op)
                ops += new
        for m in reversed(dirs):
            ops.append(Op("chown", (m.name, m.uid, m.gid)))
            ops.append(Op("chmod", (m.name, m.mode)))
            ops.append(Op("utime", (m.name, int(m.mtime) * 10**9)))
        return ops

    def _archive(self, top: str) -> bytes:
        r = self.rng
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

            def add(name: str, kind: bytes, **kw: object) -> tarfile.TarInfo:
                ti = tarfile.TarInfo(name)
                ti.type = kind
                ti.uid = ti.gid = r.choice(OWNERS)
                ti.mtime = r.randrange(978307200, 1230768000)
                for k, v in kw.items():
                    setattr(ti, k, v)
                return ti

            dirs = [top]
            tar.addfile(add(top, tarfile.DIRTYPE, mode=r.choice(MODES_DIR)))
            files: list[str] = []
            for _ in range(r.randint(2, 10)):
                kind = r.random()
                parent = r.choice(dirs)
                name = f"{parent}/{self.name('m')}"
                if kind < 0.2:
                    dirs.append(name)
                    tar.addfile(add(name, tarfile.DIRTYPE, mode=r.choice(MODES_DIR)))
                elif kind < 0.8:
                    size = r.choice((0, r.randrange(1, 3000), r.randrange(3000, 40000)))
                    ti = add(name, tarfile.REGTYPE, mode=r.choice(MODES_FILE), size=size)
                    tar.addfile(ti, io.BytesIO(self.data(size)))
                    files.append(name)
                elif kind < 0.9 or not files:
                    tar.addfile(
                        add(name, tarfile.SYMTYPE, linkname=r.choice(("../x", "y", "/etc")))
                    )
                else:
                    tar.addfile(add(name, tarfile.LNKTYPE, linkname=r.choice(files)))
        return buf.getvalue()

    def overwrite(self, model: dict[str, str]) -> list[Op]:
        r = self.rng
        lower_files = sorted(p for p in model if model[p] == "f" and self.lower.get(p) == "f")
        path = r.choice(lower_files) if lower_files and r.random() < 0.5 else None
        path = path or self.pick(model, ("f",))
        if path is None:
            return self.create_new(model)
        h = self.handle()
        way = r.choice(("truncate", "in-place", "replace", "append", "ftruncate"))
        if way == "truncate":
            return [
                Op("open", (path, "WRONLY|TRUNC", h)),
                *self.write_file(h, self.data(r.randrange(0, 3 * PAGE))),
                Op("close", (h,)),
            ]
        if way == "in-place":
            writes = [self.page_write(h, 64 * 1024) for _ in range(r.randint(1, 3))]
            return [Op("open", (path, "RDWR", h)), *writes, Op("close", (h,))]
        if way == "append":
            # One byte: an append does not start at a page boundary, and a kill
            # inside a write that crosses one may cut it there (as on any filesystem).
            data = self.data(1)
            return [
                Op("open", (path, "WRONLY|APPEND", h)),
                Op("write", (h, None, data)),
                Op("close", (h,)),
            ]
        if way == "ftruncate":
            size = r.randrange(0, 3 * PAGE)
            return [Op("open", (path, "RDWR", h)), Op("ftruncate", (h, size)), Op("close", (h,))]
        tmp = os.path.join(_parent(path), self.name(".tmp"))
        return [
            Op("create", (tmp, 0o644, h)),
            *self.write_file(h, self.data(r.randrange(1, 2 * PAGE))),
            Op("close", (h,)),
            Op("rename", (tmp, path, "")),
        ]

    def rename_file(self, model: dict[str, str]) -> list[Op]:
        r = self.rng
        src = self.pick(model, KINDS_NONDIR)
        if src is None:
            return self.create_new(model)
        way = r.random()
        flags = ""
        dst: str | None = None
        if way < 0.25:
            dst = self.pick(model, KINDS_NONDIR)  # over another file
        elif way < 0.5:
            dst = self.deleted_lower(model)  # onto a whiteout
        elif way < 0.6:
            dst = self.pick(model, KINDS_NONDIR)
            flags = "EXCHANGE"
        if dst is None:
            dst = self.new_path(model)
            flags = r.choice(("", "NOREPLACE"))
        return [Op("rename", (src, dst, flags))]

    def rename_dir(self, model: dict[str, str]) -> list[Op]:
        """Directories with a lower part refuse (EXDEV, as in the kernel without
        redirect_dir): mv then copies. Those made in the upper move."""
        r = self.rng
        upper_dirs = sorted(p for p, k in model.items() if k == "d" and p not in self.lower)
        src = r.choice(upper_dirs) if upper_dirs and r.random() < 0.85 else None
        src = src or self.pick(model, ("d",))
        if src is None:
            return self.create_new(model)
        way = r.random()
        dst: str | None = None
        if way < 0.35:
            dst = self.deleted_lower(model)  # onto a whiteout
            if dst is not None and (dst == src or dst.startswith(src + "/")):
                dst = None
        elif way < 0.55:
            empty = sorted(
                p
                for p, k in model.items()
                if k == "d"
                and p != src
                and not p.startswith(src + "/")
                and not src.startswith(p + "/")
                and not any(q.startswith(p + "/") for q in model)
            )
            dst = r.choice(empty) if empty else None  # over an empty directory
        if dst is None:
            parent = self.pick_dir(model, exclude_under=src)
            dst = os.path.join(parent, self.name("d")) if parent else self.name("d")
        return [Op("rename", (src, dst, ""))]

    def delete(self, model: dict[str, str]) -> list[Op]:
        r = self.rng
        way = r.random()
        if way < 0.4:
            path = self.pick(model, KINDS_NONDIR)
            return [Op("unlink", (path,))] if path else []
        path = self.pick(model, ("d",))
        if path is None:
            return []
        below = sorted((p for p in model if p.startswith(path + "/")), reverse=True)
        ops = [Op("rmdir" if model[p] == "d" else "unlink", (p,)) for p in below]
        if way < 0.7:
            ops.append(Op("rmdir", (path,)))  # rm -rf; otherwise rm -rf path/*
        return ops

    def create_over_whiteout(self, model: dict[str, str]) -> list[Op]:
        r = self.rng
        path = self.deleted_lower(model)
        if path is None:
            return self.delete(model)
        way = r.random()
        if way < 0.45:
            h = self.handle()
            return [
                Op("create", (path, r.choice(MODES_FILE), h)),
                *self.write_file(h, self.data(r.randrange(0, 2 * PAGE))),
                Op("close", (h,)),
            ]
        if way < 0.75:
            return [Op("mkdir", (path, r.choice(MODES_DIR)))]
        if way < 0.85:
            return [Op("symlink", ("target", path))]
        if way < 0.92:
            return [Op("mkfifo", (path, 0o644))]
        src = self.pick(model, ("f",))
        return [Op("link", (src, path))] if src else []

    def big_copy_up(self, model: dict[str, str]) -> list[Op]:
        r = self.rng
        present = [p for p in self.big_files if model.get(p) == "f"]
        path = r.choice(present) if present else self.pick(model, ("f",))
        if path is None:
            return self.create_new(model)
        way = r.random()
        h = self.handle()
        if way < 0.3:
            return [Op("open", (path, "WRONLY", h)), self.page_write(h, 8 << 20), Op("close", (h,))]
        if way < 0.4:
            return [Op("open", (path, "RDWR", h)), Op("close", (h,))]
        if way < 0.55:
            return [Op("chmod", (path, r.choice(MODES_FILE)))]
        if way < 0.7:
            return [Op("chown", (path, r.choice(OWNERS), r.choice(OWNERS)))]
        if way < 0.8:
            return [Op("truncate", (path, r.randrange(0, 6 << 20)))]
        if way < 0.9:
            return [Op("setxattr", (path, "user.tag", self.data(8)))]
        return [Op("link", (path, self.new_path(model, "ln")))]

    def attributes(self, model: dict[str, str]) -> list[Op]:
        r = self.rng
        path = self.pick(model, ("f", "d", "l", "p"))
        if path is None:
            return []
        way = r.random()
        if way < 0.35 and model[path] != "l":
            modes = MODES_DIR if model[path] == "d" else MODES_FILE
            return [Op("chmod", (path, r.choice(modes)))]
        if way < 0.7:
            return [Op("chown", (path, r.choice(OWNERS), r.choice(OWNERS)))]
        if way < 0.85:
            return [Op("utime", (path, r.randrange(978307200, 1230768000) * 10**9))]
        if model[path] == "l":
            return []  # user xattrs are not allowed on symlinks
        return [Op("setxattr", (path, "user.k", self.data(r.randint(1, 32))))]

    def create_new(self, model: dict[str, str]) -> list[Op]:
        r = self.rng
        path = self.new_path(model)
        way = r.random()
        if way < 0.5:
            h = self.handle()
            return [
                Op("create", (path, r.choice(MODES_FILE), h)),
                *self.write_file(h, self.data(r.randrange(0, 3 * PAGE))),
                Op("close", (h,)),
            ]
        if way < 0.75:
            return [Op("mkdir", (path, r.choice(MODES_DIR)))]
        if way < 0.85:
            return [Op("symlink", (r.choice(("x", "../etc", "/")), path))]
        if way < 0.92:
            return [Op("mkfifo", (path, 0o600))]
        src = self.pick(model, ("f",))
        return [Op("link", (src, path))] if src else []
