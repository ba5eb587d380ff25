"""``unionfs image|layer|diff|commit ...``: the image tools' command lines.

Each command is a thin layer over the modules of this package; errors a user
can fix are one line on stderr (``ImageError``/``UsageError``), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import resource
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from unionfs import lazylog
from unionfs.errors import UsageError
from unionfs.image.digest import ImageError
from unionfs.image.unpack import Limits, os_reason
from unionfs.options import escape_path, human_size, split_options

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from typing import TextIO, TypeVar

    from unionfs.image.cache import LayerCache

    T = TypeVar("T")

PROG = "unionfs"


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    handlers: dict[str, Callable[[list[str]], int]] = {
        "image": _image,
        "layer": _layer,
        "diff": _diff,
        "commit": _commit,
    }
    _warnings_to_stderr()
    try:
        return handlers[command](rest)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as e:  # what no command worded itself
        print(f"{PROG}: {_os_message(e)}", file=sys.stderr)
        return 1
    finally:
        _stop_warnings()


def _os_message(e: OSError) -> str:
    if e.errno == errno.EMFILE:  # one open directory a level: a tree that deep
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return f"too many open files: a directory tree deeper than the open-file limit ({limit})?"
    name = os.fsdecode(e.filename) if e.filename is not None else ""
    if name and not name.startswith("/proc/self/fd/"):
        from unionfs.inspect.names import printable

        return f"{printable(name)}: {os_reason(e)}"
    return os_reason(e)


# What the image tools log is a warning for the user (a socket left out of a layer,
# setuid bits dropped): a line on stderr with the same prefix as an error. The
# handler is made when the first one is logged: ``logging`` costs start-up time.
_handlers: list[logging.Handler] = []


def _warnings_to_stderr() -> None:
    def install() -> None:
        import logging

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
        handler.setLevel(logging.WARNING)
        logging.getLogger("unionfs").addHandler(handler)
        _handlers.append(handler)

    lazylog.before_first_use(install)


def _stop_warnings() -> None:
    """Before a mount serves (it logs its own way) and when the command ends."""
    lazylog.before_first_use(None)
    if _handlers:
        import logging

        for handler in _handlers:
            logging.getLogger("unionfs").removeHandler(handler)
        _handlers.clear()


# -- shared options ------------------------------------------------------------------


_SIZE = re.compile(r"(\d+)(?:([KMGT])(?:i?B)?|B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``123``, ``123B``, ``64K``, ``10M``, ``2G``, ``1T`` (powers of 1024; ``KB`` and
    ``KiB`` are ``K``)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[(m.group(2) or "").upper()]
    return int(m.group(1)) << shift


def parse_count(text: str) -> int:
    """A whole number of at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return n


def _limit_options(p: argparse.ArgumentParser) -> None:
    d = Limits()
    p.add_argument(
        "--max-layer-size",
        type=parse_size,
        default=d.max_bytes,
        metavar="SIZE",
        help="refuse a layer whose files add up to more (default: 64G)",
    )
    p.add_argument(
        "--max-entries",
        type=parse_count,
        default=d.max_entries,
        metavar="N",
        help=f"refuse a layer with more entries (default: {d.max_entries})",
    )


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(args.max_layer_size, args.max_entries)


def _sync_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sync",
        action="store_true",
        help="flush the unpacked data to disk before the directory gets its name "
        "(like tar -x, the default leaves that to the kernel)",
    )


def _cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache",
        metavar="DIR",
        help="the layer cache (default: $XDG_CACHE_HOME/unionfs, /var/cache/unionfs as root)",
    )


def _cache(args: argparse.Namespace) -> LayerCache:
    from unionfs.image.cache import LayerCache, default_cache_dir

    root = Path(os.path.abspath(args.cache)) if args.cache else default_cache_dir()
    return LayerCache(root, _limits(args))


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, as every other error (status 2, as argparse's)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)", exit_code=2)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=f"{PROG} {prog}", description=description)


def _print_json(obj: object, out: TextIO | None = None) -> None:
    import json

    stream = sys.stdout if out is None else out
    json.dump(obj, stream, indent=2)
    stream.write("\n")


def _parse_sub(
    p: argparse.ArgumentParser, subs: dict[str, argparse.ArgumentParser], argv: list[str]
) -> argparse.Namespace:
    """Parse a command with subcommands: an argument the subcommand does not know is
    reported with the subcommand's usage (argparse gives the parent's)."""
    args, extra = p.parse_known_args(argv)
    if extra:
        subs[args.action].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _check_dest(given: str, dest: Path) -> None:
    """A directory to unpack into: absent or empty."""
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ImageError(f"{given}: {os_reason(e)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{given}: exists and is not a directory")
    if any(dest.iterdir()):
        raise ImageError(f"{given}: exists and is not an empty directory")


def _no_layers(image: str) -> ImageError:
    return ImageError(f"{image}: the image has no layers")


# -- unionfs image ... ---------------------------------------------------------------


def _image(argv: list[str]) -> int:
    p = _parser("image", "Mount, unpack or inspect an OCI image.")
    sub = p.add_subparsers(dest="action", metavar="{mount,unpack,layers}", required=True)

    m = sub.add_parser(
        "mount",
        help="mount an image (read-only, or writable with --upper/--work)",
        description="Mount IMAGE at MNT: its layers, unpacked once into the layer cache, "
        "are the lower layers. IMAGE is an OCI layout directory (DIR or DIR:TAG), "
        "an OCI archive or a docker archive.",
    )
    m.add_argument("image", metavar="IMAGE")
    m.add_argument("mountpoint", metavar="MNT")
    m.add_argument("--upper", metavar="DIR", help="a writable container layer")
    m.add_argument("--work", metavar="DIR", help="the workdir that goes with --upper")
    _cache_option(m)
    m.add_argument(
        "--print-kernel-mount",
        action="store_true",
        help="print the equivalent mount -t overlay command instead of mounting",
    )
    m.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="mount options, as for a plain mount (lowerdir, upperdir and workdir excepted); "
        "with --print-kernel-mount the ones the kernel overlay knows go in its command",
    )
    m.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    m.add_argument("-d", "--debug", action="store_true", help="log every request (implies -f)")
    _limit_options(m)

    u = sub.add_parser(
        "unpack",
        help="unpack an image's layers into kernel-format layer directories",
        description="Unpack every layer of IMAGE into DIR/001, DIR/002, ... (bottom first) "
        "and print the lowerdir= value that stacks them.",
    )
    u.add_argument("image", metavar="IMAGE")
    u.add_argument("dest", metavar="DIR")
    _sync_option(u)
    _limit_options(u)

    la = sub.add_parser(
        "layers",
        help="one row per layer: digest, size, history, files added/changed/deleted, "
        "bytes hidden by higher layers",
    )
    la.add_argument("image", metavar="IMAGE")
    la.add_argument("--json", action="store_true", help="the same data as JSON")
    _cache_option(la)
    _limit_options(la)

    args = _parse_sub(p, {"mount": m, "unpack": u, "layers": la}, argv)
    if args.action == "mount":
        return _image_mount(args)
    if args.action == "unpack":
        return _image_unpack(args)
    return _image_layers(args)


def _image_unpack(args: argparse.Namespace) -> int:
    from unionfs.image.cache import layer_label, unpack_layer
    from unionfs.image.layout import LayerRef, open_image
    from unionfs.image.progress import Progress

    dest = Path(os.path.abspath(args.dest))
    _check_dest(args.dest, dest)
    progress = Progress()
    with open_image(args.image) as image:
        if not image.layers:
            raise _no_layers(args.image)
        n = len(image.layers)
        dirs: list[Path] = []
        made = _make_dirs(dest)
        try:
            for layer in image.layers:
                final = dest / f"{layer.index + 1:03d}"

                def unpack(fd: int, layer: LayerRef = layer) -> object:
                    return unpack_layer(layer, fd, layer_label(layer, n), _limits(args), progress)

                _unpack_atomically(final, unpack, args.sync)
                dirs.append(final)
        except BaseException:
            # What this run made goes (the layers it unpacked, the directories it made),
            # so that running it again works; what was there before stays.
            from unionfs.image.cache import discard_tree

            for d in dirs:
                discard_tree(d)
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            raise
    print("lowerdir=" + ":".join(escape_path(os.fspath(d)) for d in reversed(dirs)))
    return 0


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p`` *path*; returns the directories it made, top first."""
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    made = []
    try:
        for d in reversed(missing):
            os.mkdir(d)
            made.append(d)
    except OSError as e:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise ImageError(f"{path}: {os_reason(e)}") from None
    return made


def _unpack_atomically(final: Path, unpack: Callable[[int], T], sync: bool) -> T:
    """Unpack into a temporary sibling of *final* (which may be an empty directory),
    then rename it into place; with *sync*, once its data is on disk."""
    from unionfs.image.cache import unpack_into

    result, published = unpack_into(final, final.parent, f".{final.name}.", unpack, True, sync)
    if not published:
        raise ImageError(f"{final}: made by someone else while unpacking")
    return result


def _image_mount(args: argparse.Namespace) -> int:
    """The image's cached layers as the lower layers of a plain unionfs mount: the
    same checks, the same daemon, the same code as ``unionfs -o lowerdir=...``."""
    from unionfs.cli import run_mount
    from unionfs.fuse.mount import check_setup
    from unionfs.options import parse_options

    if (args.upper is None) != (args.work is None):
        given, missing = ("--upper", "--work") if args.work is None else ("--work", "--upper")
        raise UsageError(f"{given} needs {missing} too")
    opts = parse_options(args.options)
    if opts.lowers or opts.upper or opts.work:
        raise UsageError("-o: the image gives the lower layers, --upper/--work the upper")
    if not args.print_kernel_mount:
        # Before the layers are unpacked (minutes, for a big image), not after.
        from unionfs.fuse.mount import resolve_dir

        resolve_dir("mountpoint", args.mountpoint)
        for kind, given in (("upperdir", args.upper), ("workdir", args.work)):
            if given is not None:
                resolve_dir(kind, given)
    lowers = [os.fspath(d) for d in reversed(_cached_layers(args))]
    if args.print_kernel_mount:
        print(_kernel_mount(args, lowers))
        return 0
    _stop_warnings()  # the mount logs its own way from here on
    opts.lowers, opts.upper, opts.work = lowers, args.upper, args.work
    setup = check_setup(opts, args.mountpoint, repeated_lowers=True)
    return run_mount(setup, opts.timeout, foreground=args.foreground, debug=args.debug)


def _cached_layers(args: argparse.Namespace) -> list[Path]:
    """Every layer of the image in the cache (unpacked first when missing), bottom first."""
    from unionfs.image.layout import open_image
    from unionfs.image.progress import Progress

    cache = _cache(args)
    progress = Progress()
    with open_image(args.image) as image:
        if not image.layers:
            raise _no_layers(args.image)
        return [cache.ensure(layer, len(image.layers), progress) for layer in image.layers]


def _kernel_mount(args: argparse.Namespace, lowers: list[str]) -> str:
    """The ``mount -t overlay`` command that mounts the same stack with the kernel."""
    import shlex

    if args.upper is None and len(lowers) == 1:
        # The kernel wants two lowers for a read-only overlay; an empty one adds nothing.
        lowers = [*lowers, os.fspath(_cache(args).empty_dir())]
    opts = "lowerdir=" + ":".join(escape_path(p) for p in lowers)
    if args.upper is not None:
        opts += f",upperdir={escape_path(os.path.abspath(args.upper))}"
        opts += f",workdir={escape_path(os.path.abspath(args.work))}"
    given = _kernel_options(args.options)
    if os.geteuid() != 0 and "userxattr" not in given:
        given.append("userxattr")  # unpacked without root: opaque markers are user.overlay.*
    opts = ",".join([opts, *given])
    return shlex.join(
        ["mount", "-t", "overlay", "overlay", "-o", opts, os.path.abspath(args.mountpoint)]
    )


# -o options the kernel takes for an overlay mount: its own, and those of every mount.
_KERNEL_OPTIONS = {
    *("ro", "rw", "redirect_dir", "index", "uuid", "nfs_export", "xino", "metacopy"),
    *("volatile", "userxattr", "dev", "nodev", "suid", "nosuid", "exec", "noexec"),
    *("atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime"),
    *("diratime", "nodiratime", "lazytime", "nolazytime", "sync", "async", "dirsync"),
    *("silent", "loud", "context", "fscontext", "defcontext", "rootcontext"),
}
# And those with nothing to say to it: no-ops for unionfs too (unionfs.options.NO_OPS),
# and what a kernel mount always does (other users see it, the permissions are checked).
_NOTHING = {
    *("defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail"),
    *("allow_other", "default_permissions"),
}


def _kernel_options(strings: list[str]) -> list[str]:
    """The ``-o`` options that go into the kernel's command as they are; each one with
    no kernel equivalent is left out with a warning, none silently."""
    out: list[str] = []
    for text in strings:
        for item in split_options(text):
            key, _, value = item.partition("=")
            if key in _KERNEL_OPTIONS or key.startswith("x-"):
                out.append(item)
            elif key == "fsync" and value in ("auto", "strict", "volatile"):
                out.append(item)  # the kernel's own spelling (its fsync=0 is not)
            elif key in _NOTHING:
                continue
            else:
                hint = ""
                if key == "fsync" and value in ("0", "false", "no", "off"):
                    hint = " (the kernel's is volatile)"
                print(
                    f"{PROG}: -o {item}: no kernel overlay equivalent{hint}: "
                    "left out of the printed command",
                    file=sys.stderr,
                )
    return out


def _image_layers(args: argparse.Namespace) -> int:
    from unionfs.image.layout import open_image
    from unionfs.image.progress import Progress
    from unionfs.image.stats import layer_stats

    cache = _cache(args)
    progress = Progress()
    with open_image(args.image) as image:
        layers = image.layers
        dirs = [cache.ensure(layer, len(layers), progress) for layer in layers]
    stats = layer_stats(dirs) if dirs else []  # an image with no layers lists none
    rows = [
        {
            "index": layer.index + 1,
            "digest": str(layer.digest) if layer.digest else None,
            "diff_id": str(layer.diff_id),
            "size": layer.size,
            "media_type": layer.media_type,
            "created_by": layer.created_by,
            "added": s.added,
            "changed": s.changed,
            "deleted": s.deleted,
            "hidden_bytes": s.hidden_bytes,
        }
        for layer, s in zip(layers, stats, strict=True)
    ]
    if args.json:
        _print_json(rows)
        return 0
    head = ("LAYER", "DIGEST", "SIZE", "ADDED", "CHANGED", "DELETED", "HIDDEN", "CREATED BY")
    table = [head]
    for r, layer in zip(rows, layers, strict=True):
        table.append(
            (
                str(r["index"]),
                (layer.digest or layer.diff_id).short,
                _human(layer.size),
                str(r["added"]),
                str(r["changed"]),
                str(r["deleted"]),
                _human(int(str(r["hidden_bytes"]))),
                " ".join(layer.created_by.split())[:60],
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    for row in table:
        cells = [
            c.rjust(w) if 2 <= i <= 6 else c.ljust(w)
            for i, (c, w) in enumerate(zip(row[:-1], widths, strict=True))
        ]
        print("  ".join([*cells, row[-1]]).rstrip())
    return 0


def _human(n: int) -> str:
    return "?" if n < 0 else human_size(n)  # a size below 0: not known


# -- unionfs layer import ------------------------------------------------------------


def _layer(argv: list[str]) -> int:
    p = _parser("layer", "Layer tarballs.")
    sub = p.add_subparsers(dest="action", metavar="{import}", required=True)
    i = sub.add_parser(
        "import",
        help="unpack a layer tar into a kernel-format layer directory",
        description="Unpack LAYER (a tar, gzip or zstd compressed or not) into DIR, "
        "OCI whiteouts converted to the kernel's format; print its diff_id and digest.",
    )
    i.add_argument("layer", metavar="LAYER")
    i.add_argument("dest", metavar="DIR")
    i.add_argument(
        "--json", action="store_true", help="print the diff_id, digest, size and entries as JSON"
    )
    _sync_option(i)
    _limit_options(i)
    args = _parse_sub(p, {"import": i}, argv)
    return _layer_import(args)


def _layer_import(args: argparse.Namespace) -> int:
    from unionfs.image.cache import unpack_blob
    from unionfs.image.progress import Progress

    dest = Path(os.path.abspath(args.dest))
    _check_dest(args.dest, dest)
    if not dest.parent.is_dir():
        raise ImageError(f"{args.dest}: no such parent directory")
    try:
        f = open(args.layer, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ImageError(f"{args.layer}: {os_reason(e)}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        label = os.path.basename(args.layer)
        got = _unpack_atomically(
            dest,
            lambda fd: unpack_blob(f, fd, label, _limits(args), Progress(), size),
            args.sync,
        )
    if args.json:
        _print_json(
            {
                "diff_id": str(got.diff_id),
                "digest": str(got.digest),
                "size": got.size,
                "entries": got.entries,
            }
        )
    else:
        print(f"diff_id {got.diff_id}")
        print(f"digest  {got.digest}")
    return 0


# -- unionfs diff / commit -----------------------------------------------------------


def _lowers(values: list[str]) -> list[Path]:
    """``--lower`` values, each a colon-separated list (top first, ``\\:`` escapes a colon)."""
    from unionfs.options import split_path_list

    out = []
    for value in values:
        for p in split_path_list(value):
            if p == "":
                raise ImageError(f"--lower {value!r}: an empty path in the list")
            out.append(_directory(p, "lower layer "))
    return out


def _upper(value: str) -> Path:
    return _directory(value)


def _directory(value: str, what: str = "") -> Path:
    path = Path(os.path.abspath(value))
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"{what}{value}: {os_reason(e)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what}{value}: not a directory")
    return path


def _diff(argv: list[str]) -> int:
    p = _parser(
        "diff",
        "List what an upper directory changes, in docker diff's format: A (added), "
        "C (changed), D (deleted). The upper may be in the kernel's or the OCI format.",
    )
    p.add_argument("upper", metavar="UPPER")
    p.add_argument(
        "--lower",
        action="append",
        default=[],
        metavar="L1:L2...",
        help="the lower layers, top first: tells C from A, and lists what an opaque "
        "directory hides as D",
    )
    p.add_argument(
        "--image",
        metavar="IMAGE",
        help="take the lower layers from this image (its cached layers) instead of --lower",
    )
    _cache_option(p)
    _limit_options(p)
    p.add_argument("--json", action="store_true", help="a JSON list of {kind, path}")
    args = p.parse_args(argv)
    from unionfs.image.diff import changes

    if args.image is not None and args.lower:
        raise UsageError("--image and --lower: give one of them")
    upper = _upper(args.upper)
    _check_not_live(args.upper, upper, False, "diff")
    lowers = _lowers(args.lower) if args.image is None else _cached_layers(args)[::-1]
    _check_lowers_apart(upper, lowers)
    found = changes(upper, lowers)
    if args.json:
        _print_json([c.as_json() for c in found])
    else:
        out = sys.stdout.buffer
        for c in found:
            out.write(c.line() + b"\n")
        out.flush()
    return 0


def _commit(argv: list[str]) -> int:
    p = _parser(
        "commit",
        "Write an upper directory as an OCI layer tar (reproducibly), print its diff_id "
        "and digest, and optionally add it to an OCI image layout as a new image.",
    )
    p.add_argument("upper", metavar="UPPER")
    p.add_argument("--lower", action="append", default=[], metavar="L1:L2...",
                   help="the lower layers, top first: markers that hide nothing there are left out, "
                   "and what a kernel upper (redirect_dir, metacopy) keeps there is taken")  # fmt: skip
    p.add_argument("-o", "--output", metavar="LAYER.tar[.gz|.zst]",
                   help="the layer file; its name sets the compression (.tar, .tar.gz or "
                   ".tar.zst; another name needs --compression); - writes the layer to "
                   "stdout (uncompressed unless --compression) and the digests to stderr")  # fmt: skip
    p.add_argument("--compression", choices=("gzip", "zstd", "none"),
                   help="override the compression the file name asks for")  # fmt: skip
    p.add_argument("--source-date-epoch", type=_epoch, metavar="SECONDS",
                   default=_env_epoch(),
                   help="clamp mtimes (and date the image) to this time "
                   "(default: $SOURCE_DATE_EPOCH)")  # fmt: skip
    p.add_argument("--image", metavar="DIR[:BASE]",
                   help="an OCI image layout to add the layer to, on top of its image BASE "
                   "(or its only image; a new layout starts from scratch)")  # fmt: skip
    p.add_argument("--tag", metavar="NEW", help="the new image's tag in the layout")
    p.add_argument("--message", "-m", default="", help="the history entry's comment")
    p.add_argument("--whole-tree", action="store_true",
                   help="UPPER is a live overlay mount: commit everything it shows as one "
                   "layer (refused without this)")  # fmt: skip
    _cache_option(p)
    _limit_options(p)
    p.add_argument("--json", action="store_true", help="the result as JSON")
    args = p.parse_args(argv)
    if (args.image is None) != (args.tag is None):
        raise UsageError("--image and --tag go together")
    if args.output is None and args.image is None:
        raise UsageError("nowhere to write the layer: give -o LAYER.tar or --image DIR --tag NEW")
    from unionfs.image.writer import (
        NeedsLowers,
        compression_for,
        output_target,
        write_layer,
        write_layer_to,
    )

    if args.tag is not None:
        from unionfs.image.layout import check_ref_name

        check_ref_name(args.tag)
    to_stdout = args.output == "-"
    output: Path | None = None
    if to_stdout:
        if os.isatty(1):
            raise UsageError("-o -: stdout is a terminal: send it to a file or a pipe")
        compression = args.compression or "none"
    elif args.output is not None:
        if args.output.endswith("/"):
            raise UsageError(
                f"{args.output}: names a directory: give a file name (or - for stdout)"
            )
        output = Path(os.path.abspath(args.output))
        if not output.parent.is_dir():
            raise UsageError(f"{args.output}: no such directory")
        output_target(Path(args.output))  # refused now, not after the work
        compression = args.compression or compression_for(args.output)
    else:
        compression = args.compression or "gzip"
    upper = _upper(args.upper)
    lowers = _lowers(args.lower)
    _check_lowers_apart(upper, lowers)
    if args.image is not None:
        given = args.image
        if not os.path.lexists(given) and ":" in given:
            given = given.rpartition(":")[0]  # DIR:BASE
        layout = Path(os.path.realpath(given))
        real = Path(os.path.realpath(upper))
        if layout == real or real in layout.parents:
            raise UsageError(
                f"--image {args.image}: inside the upper {upper}, it would be part of the "
                "next layer committed from it"
            )
    _check_not_live(args.upper, upper, args.whole_tree)
    info = sys.stderr if to_stdout else sys.stdout  # stdout is the layer's with -o -
    tmpdir = None
    try:
        if to_stdout and args.image is None:
            written = write_layer_to(upper, 1, lowers, compression, args.source_date_epoch)
        else:
            if output is None:
                import tempfile

                tmpdir = tempfile.mkdtemp(prefix="unionfs-commit.")
                output = Path(tmpdir) / "layer.tar"
            try:
                written = write_layer(upper, output, lowers, compression, args.source_date_epoch)
            except NeedsLowers:
                # A container layer on the image BASE: its layers are the lowers (a
                # failed layer leaves nothing behind, so it is simply written again).
                base = [] if lowers or args.image is None else _base_layers(args)
                if not base:
                    raise
                written = write_layer(upper, output, base, compression, args.source_date_epoch)
        result: dict[str, object] = {
            "diff_id": str(written.diff_id),
            "digest": str(written.digest),
            "size": written.size,
        }
        if output is not None and tmpdir is None:
            result["file"] = os.fspath(output)
        if args.image is not None:
            from unionfs.image.layout import append_layer, rfc3339

            assert output is not None
            manifest = append_layer(
                args.image,
                os.fspath(output),
                written.diff_id,
                written.digest,
                written.size,
                written.compression,
                args.tag,
                args.message,
                rfc3339(args.source_date_epoch),
            )
            result["manifest"] = str(manifest)
            result["tag"] = args.tag
            if to_stdout:
                _copy_to_stdout(output)
    finally:
        if tmpdir is not None:
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)
    if args.json:
        _print_json(result, info)
    else:
        for key in ("diff_id", "digest", "manifest"):
            if key in result:
                print(f"{key:8} {result[key]}", file=info)
    return 0


def _base_layers(args: argparse.Namespace) -> list[Path]:
    """The layers of ``--image DIR[:BASE]``'s base image, top first, from the layer
    cache (unpacked first when missing); none when the layout has no such image yet."""
    from unionfs.image.layout import open_image

    try:
        with open_image(args.image) as image:
            if not image.layers:
                return []
    except ImageError:
        return []  # a new layout, or no image to take: the caller's error stands
    return _cached_layers(args)[::-1]


def _copy_to_stdout(path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            view = memoryview(chunk)
            while view:
                view = view[os.write(1, view) :]


# Filesystems whose mounts show a merged tree: committing one commits all it shows.
_MERGED_TYPES = ("overlay", "fuse.unionfs", "fuse.fuse-overlayfs", "aufs")


def _check_lowers_apart(upper: Path, lowers: list[Path]) -> None:
    """An upper that is one of its lowers, or inside one or around one, compares a
    tree with itself: refused, as the mount refuses such layers."""
    real = Path(os.path.realpath(upper))
    for lower in lowers:
        low = Path(os.path.realpath(lower))
        if low == real or low in real.parents or real in low.parents:
            raise UsageError(f"the upper {upper} and the lower layer {lower} overlap")


def _check_not_live(given: str, upper: Path, whole_tree: bool, command: str = "commit") -> None:
    """Refuse an UPPER that is a live overlay's mount point (unless *whole_tree*), and
    warn about one that is the upper layer of a live mount (it may change meanwhile).
    Only what this mount namespace shows is known; a check that fails says nothing."""
    try:
        mounts = _mountinfo()
        real = os.fsencode(os.path.realpath(upper))
        here = [m for m in mounts if m[0] == real]
        if here and here[-1][2] in _MERGED_TYPES and not whole_tree:
            whole = (
                ", or give --whole-tree to commit everything it shows as one layer"
                if command == "commit"
                else ""
            )
            raise UsageError(
                f"{given}: the mount point of a live {here[-1][2]} mount: a merged tree, not "
                f"an upper directory; {command} its upper directory{whole}"
            )
        for where in _mounts_with_upper(upper, mounts):
            done = "committed" if command == "commit" else "read"
            print(
                f"{PROG}: warning: {given} is the upper layer of the live mount at "
                f"{os.fsdecode(where)}: what changes while it is {done} may be caught "
                "half-way; unmount it first",
                file=sys.stderr,
            )
    except (OSError, ValueError):
        return


def _mountinfo() -> list[tuple[bytes, str, str, list[bytes]]]:
    """Each mount of /proc/self/mountinfo: mount point, device, type, super options."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            options = fields[sep + 3].split(b",") if len(fields) > sep + 3 else []
            out.append(
                (_unescape(fields[4]), fields[2].decode(), fields[sep + 1].decode(), options)
            )
    return out


def _unescape(field: bytes) -> bytes:
    """mountinfo writes a space, tab, newline, comma or backslash as ``\\ooo``."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def _mounts_with_upper(
    upper: Path, mounts: list[tuple[bytes, str, str, list[bytes]]]
) -> list[bytes]:
    """The mount points of the live kernel overlays and unionfs mounts whose upper
    layer is *upper*."""
    st = os.stat(upper)
    key = (st.st_dev, st.st_ino)

    def same(path: bytes | str | None) -> bool:
        try:
            other = os.stat(path) if path else None
        except OSError:
            return False
        return other is not None and (other.st_dev, other.st_ino) == key

    found = []
    for point, device, fstype, options in mounts:
        if fstype == "overlay":
            for opt in options:
                if opt.startswith(b"upperdir=") and same(_unescape(opt[9:])):
                    found.append(point)
        elif fstype == "fuse.unionfs":
            from unionfs.fuse import state

            live, _ = state.find_state(device)
            if live is not None and same(live.config.get("upper")):
                found.append(point)
    return found


# The latest time a tar header and an RFC 3339 date both hold: 9999-12-31T23:59:59Z.
MAX_EPOCH = 253402300799


def _env_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    return _epoch(value, f"SOURCE_DATE_EPOCH={value!r}")


def _epoch(value: str, what: str = "--source-date-epoch") -> int:
    """Seconds since 1970, for a reproducible date: 0 to the year 9999."""
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"{what}: not a number of seconds") from None
    if not 0 <= n <= MAX_EPOCH:
        raise UsageError(f"{what}: expected 0 to {MAX_EPOCH} seconds (the year 9999)")
    return n
