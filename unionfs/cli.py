"""``unionfs [-f] [-d] -o lowerdir=...,upperdir=...,workdir=... [SOURCE] MOUNTPOINT``.

A drop-in for fuse-overlayfs's command line. Without ``-f`` the command
returns only once the mount is ready, with the daemon in the background and
the caller's stdout/stderr closed (container engines wait for those pipes).

``unionfs COMMAND ...`` runs one of the tools in ``SUBCOMMANDS`` instead; each
is a module with ``main(argv) -> int``, imported only when asked for, so the
plain mount pays nothing for them.
"""

from __future__ import annotations

import os
import sys

from unionfs import __version__, lazylog, startup
from unionfs.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import logging
    from collections.abc import Callable

    from unionfs.fuse.mount import Setup

PROG = "unionfs"
USAGE = (
    "unionfs [-f] [-d] -o lowerdir=TOP:...:BOTTOM[,upperdir=UPPER,workdir=WORK] [SOURCE] MOUNTPOINT"
)


EPILOG = """\
Unmount with: fusermount3 -u MOUNTPOINT (or umount). Every option is described
in README.md.

Other commands (unionfs COMMAND --help for each):
  image      mount, unpack or list the layers of an OCI image
  layer      unpack a layer tar into a kernel-format layer directory
  diff       list what an upper directory changes (A/C/D)
  commit     write an upper directory as an OCI layer, or as a new image
  explain    say why a path looks as it does, or what an operation would do
  trace      show a mount's overlay decisions (-o trace=FILE, or live)
  check      lint layer directories
  convert    rewrite a layer's whiteouts in the kernel's or the OCI format"""


class MountArgs:
    """The plain mount command line, parsed."""

    def __init__(self, options: list[str], foreground: bool, debug: bool, paths: list[str]):
        self.options = options  # each -o's value, in order
        self.foreground = foreground
        self.debug = debug
        self.paths = paths  # [SOURCE] MOUNTPOINT


def parse_mount_args(argv: list[str]) -> MountArgs:
    """The mount command line, as ``_parser`` reads it. The forms container engines
    and mount(8) write (``-o X``, ``-oX``, ``-f``, ``-d``, paths) are read here;
    anything else (help, version, a mistake) goes to argparse, which costs
    milliseconds of every mount's start-up to import."""
    return _quick_parse(argv) or _from_namespace(_parser().parse_intermixed_args(argv))


def _quick_parse(argv: list[str]) -> MountArgs | None:
    """The common forms only; None for anything else (``parse_mount_args``)."""
    args = MountArgs([], False, False, [])
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            value = next(it, None)
            if value is None or value.startswith("-"):
                return None
            args.options.append(value)
        elif arg.startswith("-o="):
            args.options.append(arg[3:])  # as argparse reads it
        elif arg.startswith("-o") and len(arg) > 2:
            args.options.append(arg[2:])
        elif arg == "-f":
            args.foreground = True
        elif arg in ("-d", "--debug"):
            args.debug = True
        elif arg.startswith("-") or not arg:
            return None
        else:
            args.paths.append(arg)
    return args if args.paths else None


def _from_namespace(ns: argparse.Namespace) -> MountArgs:
    return MountArgs(ns.options, ns.foreground, ns.debug, ns.paths)


def _parser() -> argparse.ArgumentParser:
    import argparse

    class Version(argparse.Action):
        """-V: the versions are looked up only when asked for (importlib.metadata reads
        every installed package's metadata: tens of ms on every mount otherwise)."""

        def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
            print(f"unionfs version {__version__}\n{_fuse_versions()}")
            parser.exit()

    p = argparse.ArgumentParser(
        prog=PROG,
        usage=USAGE,
        description="Mount read-only lower directories under a writable upper directory, "
        "with the semantics and on-disk format of the Linux kernel overlayfs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="comma-separated mount options (may be given more than once)",
    )
    p.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    p.add_argument(
        "-d", "--debug", action="store_true", help="log every request to stderr (implies -f)"
    )
    p.add_argument("-V", "--version", action=Version, nargs=0, help="print the version and exit")
    p.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    return p


def _fuse_versions() -> str:
    try:
        from importlib.metadata import version

        return f"pyfuse3 version {version('pyfuse3')}"
    except Exception:
        return "pyfuse3 version unknown"


# Subcommand -> the module that implements it (``main(argv)``).
SUBCOMMANDS: dict[str, str] = {
    "image": "unionfs.image.cli",
    "layer": "unionfs.image.cli",
    "diff": "unionfs.image.cli",
    "commit": "unionfs.image.cli",
    "explain": "unionfs.inspect.cli",
    "trace": "unionfs.inspect.cli",
    "check": "unionfs.inspect.cli",
    "convert": "unionfs.inspect.cli",
}


def _subcommand(argv: list[str]) -> str | None:
    """The module for ``unionfs COMMAND ...``, or None for the plain mount command line.

    mount(8) calls ``unionfs SOURCE MOUNTPOINT -o rw,...`` (or ``ro,...``) with any
    SOURCE, even one spelled like a command: that form is always a mount. The
    inspection tools take the layers as ``-o lowerdir=...`` too, so nothing
    else in the command line tells a mount from them.
    """
    if not argv or argv[0] not in SUBCOMMANDS:
        return None
    if _mount_helper_form(argv):
        return None
    return SUBCOMMANDS[argv[0]]


def _mount_helper_form(argv: list[str]) -> bool:
    """``SOURCE MOUNTPOINT -o OPTIONS``, OPTIONS starting with rw or ro, as mount.fuse3 writes it."""
    return (
        len(argv) == 4
        and argv[2] == "-o"
        and argv[3].split(",", 1)[0] in ("rw", "ro")
        and "lowerdir=" in argv[3]
    )


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # ^C before a command took it over (in its imports, say)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except RecursionError:
        print(f"{PROG}: a directory tree too deep to walk (over {TOOL_RECURSION // 2:,} levels)",
              file=sys.stderr)  # fmt: skip
        return 1


def _main(argv: list[str] | None) -> int:
    startup.mark("imports")
    if argv is None:
        argv = sys.argv[1:]
    empty = _empty_argument(argv)
    if empty is not None:
        # Never read as the current directory: `unionfs convert --to kernel "$UNSET"`
        # would rewrite wherever it runs.
        print(f"{PROG}: {empty}", file=sys.stderr)
        return 2
    module = _subcommand(argv)
    if module is not None:
        import importlib

        # The tools walk directory trees by recursion, one level a call; a layer may be
        # thousands of levels deep (a tar path has no length limit). Python's calls use
        # no C stack here, so the limit is only a count; past it, one line (below).
        sys.setrecursionlimit(max(sys.getrecursionlimit(), TOOL_RECURSION))

        run: Callable[[list[str]], int] = importlib.import_module(module).main
        return run(argv)
    args = parse_mount_args(argv)
    # Here, not at the top: the tools (image, explain, ...) need none of it.
    from unionfs.fuse.mount import check_setup
    from unionfs.options import parse_options

    try:
        if len(args.paths) > 2:
            raise UsageError(f"too many arguments: {' '.join(args.paths)}")
        mountpoint = args.paths[-1]  # mount.fuse3 passes SOURCE first; it means nothing here
        opts = parse_options(args.options)
        if "debug" in opts.ignored:
            args.debug = True
        setup = check_setup(opts, mountpoint)
        startup.mark("checks")
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code
    return run_mount(setup, opts.timeout, foreground=args.foreground, debug=args.debug)


def run_mount(
    setup: Setup, timeout: float | None, foreground: bool = False, debug: bool = False
) -> int:
    """Serve a checked set-up: in the foreground with ``foreground``/``debug``, else as a
    daemon, returning once the mount is ready (the other tools that mount call this too)."""
    if debug or foreground:
        import logging

        _log_to_stderr(logging.DEBUG if debug else logging.INFO)
        return _serve(setup, lambda: None, timeout, debug=debug)
    return _daemonize(setup, timeout)


def _log_to_stderr(level: int) -> None:
    import logging

    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )


def _serve(
    setup: Setup, ready: Callable[[], None], timeout: float | None, debug: bool = False
) -> int:
    try:
        from unionfs.fuse.mount import serve

        return serve(setup, ready, timeout, debug)
    except UsageError as e:
        lazylog.get(PROG).error("%s", e)
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code


def _daemonize(setup: Setup, timeout: float | None) -> int:
    """Fork; the parent waits for the child's word that the mount is ready.

    The child writes ``ok`` (or one line of error) to a pipe. Before saying
    ``ok`` it points its stdin/stdout/stderr at /dev/null, so nobody waiting
    on the caller's pipes is kept waiting by the daemon.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        setup.release()  # the child holds the locks through its own copies
        try:
            with os.fdopen(rfd, "rb") as r:
                answer = r.read()
        except KeyboardInterrupt:
            return _call_off(pid)
        if answer == b"ok":
            # Done: no interpreter teardown (tens of ms) between the mount and the caller.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        os.waitpid(pid, 0)
        msg = (
            answer.decode(errors="replace").strip()
            or "the daemon exited before the mount was ready"
        )
        print(f"{PROG}: {msg}", file=sys.stderr)
        return 1

    os.close(rfd)
    os.setsid()
    os.chdir("/")
    connect_log = _log_to_syslog()
    startup.mark("fork")

    told = False  # the parent has its answer and wfd is closed (its number may be reused)

    def ready() -> None:
        nonlocal told
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        told = True
        try:
            os.write(wfd, b"ok")
        finally:
            os.close(wfd)
        connect_log()

    code = 1
    try:
        from unionfs.fuse.mount import serve

        code = serve(setup, ready, timeout)
    except UsageError as e:
        lazylog.get(PROG).error("%s", e)
        if not told:
            _tell(wfd, str(e))
    except BaseException as e:  # pragma: no cover - reported to the waiting parent
        lazylog.get(PROG).exception("daemon failed")
        if not told:
            _tell(wfd, f"daemon failed: {e}")
    finally:
        connect_log()  # what was logged before a failure, too
        os._exit(code)


# How deep the tools' recursive walks may go (two calls a level at most).
TOOL_RECURSION = 40_000

# Options whose value may be empty: a commit's message.
EMPTY_ALLOWED = ("-m", "--message")


def _empty_argument(argv: list[str]) -> str | None:
    """What is wrong when an argument is empty (a path or value left out), or None.
    ``--opt=`` counts as empty too."""
    for i, arg in enumerate(argv):
        if arg == "" and not (i and argv[i - 1] in EMPTY_ALLOWED):
            return f"argument {i + 1} is empty: a path or value was left out"
        if arg.startswith("--") and arg.endswith("=") and arg[:-1] not in EMPTY_ALLOWED:
            return f"{arg[:-1]}: the value is empty: a path or value was left out"
    return None


def _call_off(pid: int) -> int:
    """^C while the daemon starts: stop it too, and wait until it is gone. A mount it
    made is undone (it holds SIGTERM until it can unmount), so the caller, told it
    failed, finds nothing mounted."""
    import contextlib
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    os.waitpid(pid, 0)
    print(f"{PROG}: interrupted: nothing mounted", file=sys.stderr)
    return 130


def _tell(wfd: int, message: str) -> None:
    try:
        os.write(wfd, message.encode(errors="replace"))
        os.close(wfd)
    except OSError:
        pass  # already reported ready; the log has it


def _log_to_syslog() -> Callable[[], None]:
    """Send the daemon's log to syslog, from when the returned function is called (once
    the mount is ready: ``logging`` and the handler's module cost start-up time). Records
    logged before then are kept and sent then."""
    held: list[logging.LogRecord] = []
    holder: list[logging.Handler] = []
    connected = False

    def hold() -> None:  # something logs before the mount is ready
        import logging

        class Held(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                held.append(record)

        root = logging.getLogger()
        root.setLevel(logging.INFO)
        holder.append(Held())
        root.addHandler(holder[0])

    lazylog.before_first_use(hold)

    def connect() -> None:
        nonlocal connected
        if connected:
            return
        connected = True
        lazylog.before_first_use(None)
        import logging
        import logging.handlers

        root = logging.getLogger()
        root.setLevel(logging.INFO)
        for h in holder:
            root.removeHandler(h)
        if os.path.exists("/dev/log"):
            handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
            handler.setFormatter(
                logging.Formatter("unionfs[%(process)d]: %(levelname)s %(message)s")
            )
        else:
            handler = logging.NullHandler()
        root.addHandler(handler)
        for record in held:
            handler.handle(record)

    return connect
