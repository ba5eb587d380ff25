"""The command lines of ``unionfs explain``, ``trace``, ``check`` and ``convert``.

Exit status: 0 done; 1 ``check`` found something that changes the merged view
unexpectedly (``convert``: something could not be converted); 2 a bad command
line or unusable layers, with one line on stderr (``check``: a part of the layers
could not be read, so the check is incomplete).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from unionfs.errors import UsageError
from unionfs.options import REDIRECT_MODES

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def _explain_parser() -> argparse.ArgumentParser:
    from unionfs.inspect.predict import OPS

    p = _Parser(
        prog="unionfs explain",
        description="Why a path in the merged view looks the way it does: what each layer "
        "holds there, which layer provides it and by which rule, what the mount shows; "
        "with --op, what a change would do and why it would fail.",
    )
    p.add_argument(
        "path",
        metavar="PATH",
        help="a path in a live unionfs mount, or with -o a path inside the merged view",
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="the layers, as for a mount: lowerdir=TOP:...:BOTTOM[,upperdir=U][,ro]",
    )
    p.add_argument("--op", choices=OPS, help="predict this change of PATH")
    p.add_argument("--to", metavar="DEST", help="the new name, for --op rename and link")
    p.add_argument("--noreplace", action="store_true", help="rename with RENAME_NOREPLACE")
    p.add_argument("--exchange", action="store_true", help="rename with RENAME_EXCHANGE")
    p.add_argument("--xattr", metavar="NAME", help="the xattr name, for --op setxattr")
    p.add_argument("--size", type=int, help="the new size, for --op truncate (default 0)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return p


def _explain_usage(args: argparse.Namespace) -> None:
    """The options that go with one --op only, or that one --op needs."""
    from unionfs.inspect.predict import NEEDS_TO

    if args.op in NEEDS_TO and args.to is None:
        raise UsageError(f"--op {args.op} needs --to DEST")
    if args.to is not None and args.op not in NEEDS_TO:
        raise UsageError("--to goes with --op rename or --op link")
    if args.op == "setxattr" and args.xattr is None:
        raise UsageError("--op setxattr needs --xattr NAME")
    if args.xattr is not None and args.op != "setxattr":
        raise UsageError("--xattr goes with --op setxattr")
    if args.size is not None and args.op != "truncate":
        raise UsageError("--size goes with --op truncate")
    if (args.noreplace or args.exchange) and args.op != "rename":
        raise UsageError("--noreplace and --exchange go with --op rename")


def explain_main(argv: list[str]) -> int:
    from unionfs.inspect import stack as stacks
    from unionfs.inspect.explain import AboveRoot, explain, mount_shows
    from unionfs.inspect.names import brief
    from unionfs.inspect.predict import predict, rename_flags
    from unionfs.inspect.render import as_json, render

    args = _explain_parser().parse_args(argv)
    _explain_usage(args)
    for given in (args.path, args.to):
        if given is not None:
            stacks.check_length(given)
    if args.options:
        stack = stacks.from_options(args.options)
        rel = stacks.relative(args.path)
        to = stacks.relative(args.to) if args.to is not None else None
    else:
        stack, rel = stacks.from_live_path(args.path)
        to = None
        if args.to is not None:
            mount_to, to = stacks.from_live_path(args.to)
            if (
                mount_to.live is None
                or stack.live is None
                or mount_to.live.device != stack.live.device
            ):
                raise UsageError(f"{brief(args.to)}: not in the same mount as {brief(args.path)}")
    union = stack.open()
    try:
        try:
            exp = explain(union, rel, stack)
        except AboveRoot:
            if stack.live is None:
                raise
            raise UsageError(
                f"{brief(args.path)}: climbs above the root of the mount at "
                f"{brief(stack.live.mountpoint)}, out of it"
            ) from None
        if stack.live is not None:
            exp.mount = stack.live.mountpoint
            exp.mount_shows = mount_shows(stack.live.mountpoint, rel)
        if args.op is not None:
            if not exp.path and exp.visible:
                raise UsageError("--op needs a path below the root")
            flags = rename_flags(args.noreplace, args.exchange)
            live = os.fsencode(stack.live.mountpoint) if stack.live is not None else None
            xattr = os.fsencode(args.xattr) if args.xattr is not None else b""
            size = args.size if args.size is not None else 0
            pred = predict(union, args.op, rel, to, flags, xattr, size, live)
            exp.prediction = pred.as_json()
    except OSError as e:
        # A layer's own failure (EIO, EACCES, ...): one short line, whatever the name.
        where = f"{brief(os.fsencode(e.filename))}: " if e.filename else ""
        raise UsageError(f"{where}{e.strerror or e}") from None
    finally:
        union.close()
    if args.json:
        print(json.dumps(as_json(exp), indent=1))
    else:
        print(render(exp))
    return 0


def _trace_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="unionfs trace",
        description="Show a mount's overlay decisions (copy-ups, whiteouts, refusals, ...): "
        "from its -o trace= file, or live with --follow.",
    )
    p.add_argument("source", metavar="MNT|FILE", help="a live unionfs mount, or a trace file")
    p.add_argument(
        "-f", "--follow", action="store_true", help="keep showing new events as they happen"
    )
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="the raw JSON lines")
    shown.add_argument(
        "--summary", action="store_true", help="totals: events by kind, copy-up bytes by reason"
    )
    return p


def trace_main(argv: list[str]) -> int:
    from unionfs.inspect.trace import run

    args = _trace_parser().parse_args(argv)
    if args.summary and args.follow:
        raise UsageError("--summary reads what is recorded; it cannot --follow")
    return run(args.source, follow=args.follow, raw=args.json, summary=args.summary)


def _check_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="unionfs check",
        description="Lint layer directories: one line per finding, with the path and what "
        "the kernel or an OCI runtime would do. Exit 1 when something would change the "
        "merged view unexpectedly; 2 when a part of the layers could not be read (the check "
        "is incomplete).",
    )
    p.add_argument("layers", nargs="+", metavar="LAYER", help="lower layers, topmost first")
    p.add_argument("--upper", metavar="U", help="the upper directory")
    p.add_argument("--work", metavar="W", help="the workdir that goes with --upper")
    p.add_argument(
        "--for",
        dest="target",
        choices=("unionfs", "kernel", "oci"),
        default="unionfs",
        help="what will read the layers: unionfs (the default: both marker formats in "
        "lowers), the kernel overlay (kernel format only) or an OCI runtime (tar layers: "
        "OCI format only)",
    )
    p.add_argument(
        "--userxattr", action="store_true", help="the stack keeps markers in user.overlay.*"
    )
    p.add_argument(
        "--redirect-dir",
        choices=("on", "follow", "nofollow", "off"),
        default="follow",
        help="the redirect_dir mode the stack is mounted with (off and on follow redirects too)",
    )
    p.add_argument("--metacopy", action="store_true", help="the stack is mounted with metacopy=on")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--all", action="store_true", help="list every hidden file, not only the largest"
    )
    return p


def check_main(argv: list[str]) -> int:
    from unionfs.inspect.check import run

    args = _check_parser().parse_args(argv)
    return run(
        args.layers,
        upper=args.upper,
        work=args.work,
        target=args.target,
        userxattr=args.userxattr,
        as_json=args.json,
        show_all=args.all,
        redirect=REDIRECT_MODES[args.redirect_dir],
        metacopy=args.metacopy,
    )


def _convert_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="unionfs convert",
        description="Rewrite a layer's whiteouts and opaque markers in the other format, "
        "in place, one entry at a time (each entry atomically).",
    )
    p.add_argument("--to", required=True, choices=("kernel", "oci"), help="the format to write")
    p.add_argument("dir", metavar="DIR", help="the layer directory")
    p.add_argument("--dry-run", action="store_true", help="say what would change; change nothing")
    p.add_argument(
        "--userxattr", action="store_true", help="opaque markers in user.overlay.* (not trusted.*)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line: each change as it is made, then the summary",
    )
    p.add_argument(
        "--ignore-mount",
        action="append",
        default=[],
        metavar="MNT",
        help="go ahead although the live unionfs mount at MNT publishes no state this command "
        "can read (you vouch that it uses nothing in or around DIR); may be given again",
    )
    return p


def convert_main(argv: list[str]) -> int:
    from unionfs.inspect.convert import run

    args = _convert_parser().parse_args(argv)
    return run(
        args.dir,
        args.to,
        dry_run=args.dry_run,
        as_json=args.json,
        userxattr=args.userxattr,
        ignore_mounts=args.ignore_mount,
    )


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "explain": explain_main,
    "trace": trace_main,
    "check": check_main,
    "convert": convert_main,
}


def main(argv: list[str]) -> int:
    """``argv`` starts with the command word (``explain``, ``trace``, ...)."""
    command, rest = argv[0], argv[1:]
    try:
        return COMMANDS[command](rest)
    except BrokenPipeError:
        # The reader went away (``| head``): not an error; keep Python from complaining.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UsageError as e:
        print(f"unionfs {command}: {e}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as e:
        from unionfs.inspect.names import brief

        where = f"{brief(e.filename)}: " if e.filename else ""
        print(f"unionfs {command}: {where}{e.strerror or e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130
