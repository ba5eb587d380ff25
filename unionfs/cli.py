"""``unionfs [-f] [-d] -o lowerdir=...,upperdir=...,workdir=... [SOURCE] MOUNTPOINT``.

A drop-in for fuse-overlayfs's command line. Without ``-f`` the command
returns only once the mount is ready, with the daemon in the background and
the caller's stdout/stderr closed (container engines wait for those pipes).

``unionfs COMMAND ...`` runs one of the tools in ``SUBCOMMANDS`` instead; each
is a module with ``main(argv) -> int``, imported only when asked for, so the
plain mount pays nothing for them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from unionfs import __version__, startup
from unionfs.errors import UsageError
from unionfs.fuse.mount import Setup, check_setup, serve
from unionfs.options import parse_options

PROG = "unionfs"
USAGE = (
    "unionfs [-f] [-d] -o lowerdir=TOP:...:BOTTOM[,upperdir=UPPER,workdir=WORK] [SOURCE] MOUNTPOINT"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        usage=USAGE,
        description="Mount read-only lower directories under a writable upper directory, "
        "with the semantics and on-disk format of the Linux kernel overlayfs.",
        epilog="Unmount with: fusermount3 -u MOUNTPOINT (or umount). "
        "Every option is described in README.md.",
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
    p.add_argument("-V", "--version", action=_Version, nargs=0, help="print the version and exit")
    p.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    return p


class _Version(argparse.Action):
    """-V: the versions are looked up only when asked for (importlib.metadata reads
    every installed package's metadata: tens of ms on every mount otherwise)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"unionfs version {__version__}\n{_fuse_versions()}")
        parser.exit()


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
    startup.mark("imports")
    if argv is None:
        argv = sys.argv[1:]
    module = _subcommand(argv)
    if module is not None:
        import importlib

        run: Callable[[list[str]], int] = importlib.import_module(module).main
        return run(argv)
    args = _parser().parse_intermixed_args(argv)
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
        _log_to_stderr(logging.DEBUG if debug else logging.INFO)
        return _serve(setup, lambda: None, timeout, debug=debug)
    return _daemonize(setup, timeout)


def _log_to_stderr(level: int) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )


def _serve(
    setup: Setup, ready: Callable[[], None], timeout: float | None, debug: bool = False
) -> int:
    try:
        return serve(setup, ready, timeout, debug)
    except UsageError as e:
        logging.getLogger(PROG).error("%s", e)
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
        with os.fdopen(rfd, "rb") as r:
            answer = r.read()
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

    def ready() -> None:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.write(wfd, b"ok")
        os.close(wfd)
        connect_log()

    code = 1
    try:
        code = serve(setup, ready, timeout)
    except UsageError as e:
        _tell(wfd, str(e))
    except BaseException as e:  # pragma: no cover - reported to the waiting parent
        logging.getLogger(PROG).exception("daemon failed")
        _tell(wfd, f"daemon failed: {e}")
    finally:
        connect_log()  # what was logged before a failure, too
        os._exit(code)


def _tell(wfd: int, message: str) -> None:
    try:
        os.write(wfd, message.encode(errors="replace"))
        os.close(wfd)
    except OSError:
        pass  # already reported ready; the log has it


class _Held(logging.Handler):
    """Log records kept until the daemon's syslog handler is set up."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _log_to_syslog() -> Callable[[], None]:
    """Send the daemon's log to syslog, from when the returned function is called (once
    the mount is ready: the handler's module costs start-up time); records logged
    before then are kept and sent then."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    held = _Held()
    root.addHandler(held)

    def connect() -> None:
        if held not in root.handlers:
            return  # connected already
        import logging.handlers

        if os.path.exists("/dev/log"):
            handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
            handler.setFormatter(
                logging.Formatter("unionfs[%(process)d]: %(levelname)s %(message)s")
            )
        else:
            handler = logging.NullHandler()
        root.removeHandler(held)
        root.addHandler(handler)
        for record in held.records:
            handler.handle(record)

    return connect
