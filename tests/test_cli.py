"""The command line: option parsing, refusals, daemon mode, and stopping the daemon."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.mounting import REPO, mount_type, start_unionfs, unionfs_command
from tests.test_merge import write
from unionfs import cli
from unionfs.errors import UsageError
from unionfs.options import parse_options, split_options
from unionfs.overlay.idmap import IdMap


def run(
    *args: str, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    return subprocess.run(
        [*unionfs_command(), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# -- option strings -------------------------------------------------------------


def test_empty_options_and_trailing_commas_are_ignored() -> None:
    o = parse_options(["lowerdir=/a:/b,,upperdir=/u,workdir=/w,,volatile,"])
    assert (o.lowers, o.upper, o.work, o.fsync) == (["/a", "/b"], "/u", "/w", False)


@pytest.mark.parametrize(
    "given, fsync, sync_copy_up",
    [
        ("", True, 0),  # fuse-overlayfs's default: copy-ups are not synced
        ("fsync=auto", True, 1),  # the kernel's default: the copied data is
        ("fsync=strict", True, 2),  # and every copy-up of a file or directory
        ("fsync=volatile", False, 0),
        ("fsync=strict,volatile", False, 0),  # later options win
        ("fsync=0,fsync=auto", True, 1),
        ("fsync=strict,fsync=1", True, 0),
    ],
)
def test_fsync_takes_fuse_overlayfs_and_kernel_values(
    given: str, fsync: bool, sync_copy_up: int
) -> None:
    o = parse_options([f"lowerdir=/a,{given}"])
    assert (o.fsync, o.sync_copy_up) == (fsync, sync_copy_up)


def test_escaped_colons_and_commas_stay_in_paths() -> None:
    o = parse_options([r"lowerdir=/a\:b:/c\,d,upperdir=/u\,1,workdir=/w"])
    assert o.lowers == ["/a:b", "/c,d"]
    assert o.upper == "/u,1"


def test_a_quoted_value_may_hold_commas() -> None:
    assert split_options('lowerdir=/a,context="system_u:object_r:x:s0:c1,c2",ro') == [
        "lowerdir=/a",
        "context=system_u:object_r:x:s0:c1,c2",
        "ro",
    ]


def test_podman_id_mappings_parse() -> None:
    o = parse_options(["lowerdir=/a,uidmapping=:0:100000:65536,gidmapping=0:1:1:1:100000:10"])
    assert o.uid_map == [IdMap(0, 100000, 65536)]
    assert o.gid_map == [IdMap(0, 1, 1), IdMap(1, 100000, 10)]


@pytest.mark.parametrize(
    "bad",
    [
        "lowerdir=/a,bogus",
        "lowerdir=/a,fsync=maybe",
        "lowerdir=",
        "lowerdir=/a,uidmapping=1:2",
        "lowerdir=/a::/b",
        "lowerdir=/a,timeout=nan",
        "lowerdir=/a,timeout=inf",
        "lowerdir=/a,timeout=1e10",
        "lowerdir=/a,squash_to_gid=4294967295",  # (gid_t)-1: no one
        "lowerdir=/a,squash_to_uid=99999999999",
        "lowerdir=/a,uidmapping=0:4294967295:1",
        "lowerdir=/a,gidmapping=4294967290:0:10",
        "lowerdir=/a,uidmapping=0:0:0",  # a range of no ids
    ],
)
def test_bad_options_are_clear_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_options([bad])


@pytest.mark.parametrize(
    "flag",
    ["ro", "volatile", "static_nlink", "squash_to_root", "noacl", "userxattr", "nodev", "rw"],
)
@pytest.mark.parametrize("value", ["0", "1", ""])
def test_a_flag_given_a_value_is_refused(flag: str, value: str) -> None:
    """ro=0 is not "not read-only": a flag with any value is an error, never the flag."""
    with pytest.raises(UsageError, match=f"option {flag} takes no value: {flag}={value}$"):
        parse_options([f"lowerdir=/a,{flag}={value}"])


def test_the_largest_ids_are_accepted() -> None:
    o = parse_options(["lowerdir=/a,squash_to_uid=4294967294,uidmapping=0:4294967294:1"])
    assert o.squash_uid == 4294967294
    assert o.uid_map == [IdMap(0, 4294967294, 1)]


# -- refusals: one line, non-zero, nothing mounted ------------------------------------


def _refusal_cases(stack: Stack, tmp_path: Path) -> dict[str, tuple[str, str]]:
    l1, u, w, m = stack.lowers[0], stack.upper, stack.work, stack.mnt
    afile = tmp_path / "file"
    write(afile)
    (l1 / "inner").mkdir()
    (m / "sub").mkdir()
    return {
        "missing lower": (f"lowerdir={tmp_path}/nope", os.fspath(m)),
        "lower not a dir": (f"lowerdir={afile}", os.fspath(m)),
        "no lowerdir": (f"upperdir={u},workdir={w}", os.fspath(m)),
        "upper without work": (f"lowerdir={l1},upperdir={u}", os.fspath(m)),
        "work without upper": (f"lowerdir={l1},workdir={w}", os.fspath(m)),
        "upper inside lower": (f"lowerdir={l1},upperdir={l1}/inner,workdir={w}", os.fspath(m)),
        "lower inside upper": (f"lowerdir={u}/..,upperdir={u},workdir={w}", os.fspath(m)),
        "mountpoint inside lower": (f"lowerdir={l1},upperdir={u},workdir={w}", f"{l1}/inner"),
        "lower inside mountpoint": (f"lowerdir={m}/sub,upperdir={u},workdir={w}", os.fspath(m)),
        "mountpoint inside workdir": (f"lowerdir={l1},upperdir={u},workdir={w}", f"{w}"),
        "missing mountpoint": (f"lowerdir={l1},upperdir={u},workdir={w}", f"{tmp_path}/none"),
        "unknown option": (f"lowerdir={l1},frobnicate", os.fspath(m)),
        "upper is work": (f"lowerdir={l1},upperdir={u},workdir={u}", os.fspath(m)),
    }


def test_every_bad_setup_is_refused_with_one_line(stack: Stack, tmp_path: Path) -> None:
    before = sorted(os.listdir(stack.upper)), sorted(os.listdir(stack.work))
    for case, (opts, mnt) in _refusal_cases(stack, tmp_path).items():
        r = run("-o", opts, mnt)
        assert r.returncode != 0, case
        assert r.stderr.startswith("unionfs: ") and r.stderr.count("\n") == 1, (case, r.stderr)
        assert mount_type(mnt) is None, case
    assert (sorted(os.listdir(stack.upper)), sorted(os.listdir(stack.work))) == before


def test_an_unusable_dev_fuse_is_refused(stack: Stack) -> None:
    """Run with /dev/fuse hidden (a private mount namespace with an empty /dev/fuse)."""
    script = (
        "mount --bind /dev/null /dev/fuse 2>/dev/null || exit 77; "
        f"exec {' '.join(unionfs_command())} -o lowerdir={stack.lowers[0]} {stack.mnt}"
    )
    r = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.fspath(REPO)),
        timeout=30,
    )
    assert r.returncode not in (0, 77), r.stderr
    assert "/dev/fuse" in r.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["-o", "lowerdir=/l", "/m"],
        ["-o", "lowerdir=/l,upperdir=/u,workdir=/w", "-f", "/m"],
        ["src", "/m", "-o", "rw,lowerdir=/l"],  # mount.fuse3's order
        ["-olowerdir=/l", "-o", "ro", "-d", "/m"],
        ["-o=lowerdir=/l", "-o==x", "/m"],
        ["--debug", "/m", "-o", "x=-y"],  # a value may hold a dash after the start
        ["-f", "-f", "-o", "", "a b", "/m"],
    ],
)
def test_the_quick_mount_parse_reads_what_argparse_reads(argv: list[str]) -> None:
    """The forms the mount command reads without argparse give what argparse gives."""
    quick = cli._quick_parse(argv)
    assert quick is not None
    full = cli._from_namespace(cli._parser().parse_intermixed_args(argv))
    assert vars(quick) == vars(full)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["-o", "lowerdir=/l"],  # no mountpoint
        ["-o"],
        ["-o", "-f", "/m"],  # argparse: -o needs a value
        ["-fd", "/m"],
        ["-h"],
        ["--version"],
        ["--", "/m"],
        ["-x", "/m"],
        ["", "/m"],
    ],
)
def test_every_other_command_line_goes_to_argparse(argv: list[str]) -> None:
    assert cli._quick_parse(argv) is None


def test_a_lazy_logger_imports_logging_at_first_use() -> None:
    """``unionfs.lazylog``: no ``logging`` until a logger is used; the hook runs once,
    first; then records reach the real logger's handlers."""
    code = """
import sys
from unionfs import lazylog
calls = []
lazylog.before_first_use(lambda: calls.append("logging" in sys.modules))
log = lazylog.get("unionfs.test")
assert "logging" not in sys.modules
import logging
got = []
class H(logging.Handler):
    def emit(self, record):
        got.append(record.getMessage())
logging.getLogger("unionfs.test").addHandler(H())
log.warning("one %d", 1)
log.warning("two")
assert calls == [True], calls
assert got == ["one 1", "two"], got
assert log.warning == logging.getLogger("unionfs.test").warning
print("ok")
"""
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.fspath(REPO)),
        timeout=60,
    )
    assert r.stdout.strip() == "ok", r.stderr


def test_what_the_daemon_logs_before_ready_reaches_syslog_once_connected() -> None:
    """Records logged before the mount is ready, through a lazy logger or through
    ``logging`` itself once the daemon loads its libraries (``lazylog.load``), are held
    and handed to the syslog handler when it connects (a stand-in handler here: the
    machine may have no /dev/log)."""
    code = """
import os, sys
from unionfs import cli, lazylog
connect = cli._log_to_syslog()
assert "logging" not in sys.modules
lazylog.get("unionfs.fuse.mount").info("lazy, before ready")
lazylog.load()
import logging, logging.handlers
got = []
class Capture(logging.Handler):
    def emit(self, record):
        got.append(record.getMessage())
logging.getLogger("unionfs.fuse.privileges").warning("plain, before ready")
logging.handlers.SysLogHandler = lambda address: Capture()
exists = os.path.exists
os.path.exists = lambda p: p == "/dev/log" or exists(p)
connect()
logging.getLogger("unionfs.fuse.operations").info("after ready")
print(got)
"""
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.fspath(REPO)),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(["lazy, before ready", "plain, before ready", "after ready"])
    assert r.stderr == ""  # nothing went to the caller's stderr instead


def test_version_and_help() -> None:
    v = run("--version")
    assert v.returncode == 0 and v.stdout.startswith("unionfs version ")
    h = run("-h")
    assert h.returncode == 0 and "lowerdir" in h.stdout
    # Every other command is named in the help, and each such name is a command.
    listed = h.stdout.split("Other commands", 1)[1].splitlines()[1:]
    named = {line.split()[0] for line in listed if line.startswith("  ")}
    assert named == set(cli.SUBCOMMANDS)
    for name in sorted(named):
        sub = run(name, "--help")
        assert sub.returncode == 0 and sub.stdout.startswith(f"usage: unionfs {name}"), name


# -- running and stopping ---------------------------------------------------------


def _daemon_pid(marker: str) -> int | None:
    """The daemon whose command line has *marker* (our own child's child: not a Popen)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"unionfs" in b" ".join(cmd) and os.fsencode(marker) in cmd:
            return int(pid)
    return None


def _wait_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}") or " Z " in Path(f"/proc/{pid}/stat").read_text():
            return True
        time.sleep(0.05)
    return False


def test_daemon_mode_returns_when_ready_and_exits_on_unmount(stack: Stack, tmp_path: Path) -> None:
    """Relative, symlinked layer paths resolved against the caller's cwd; mount.fuse3's argv."""
    write(stack.lowers[0] / "hello", b"hi")
    os.symlink(stack.lowers[0], tmp_path / "l-link")
    r = run(
        "unionfs-source",
        "mnt",
        "-o",
        "rw,lowerdir=l-link:l2,upperdir=upper,workdir=work,dev,suid",
        cwd=tmp_path,
    )
    pid = _daemon_pid("unionfs-source")
    try:
        assert r.returncode == 0, r.stderr
        assert r.stdout == r.stderr == ""
        assert mount_type(stack.mnt) == "fuse.unionfs"  # ready when the command returned
        assert (stack.mnt / "hello").read_bytes() == b"hi"
        assert pid is not None
    finally:
        subprocess.run(["fusermount3", "-u", os.fspath(stack.mnt)], check=False)
    assert pid is not None and _wait_gone(pid)
    assert mount_type(stack.mnt) is None


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "--to", "kernel", ""],
        ["check", ""],
        ["diff", ""],
        ["commit", "", "-o", "x.tar"],
        ["commit", "up", "--lower", "", "-o", "x.tar"],
        ["commit", "up", "--lower=", "-o", "x.tar"],
        ["explain", "-o", "lowerdir=low", ""],
        ["trace", ""],
        ["layer", "import", "x.tar", ""],
        ["-o", "lowerdir=low", ""],
        ["-o", "", "mnt"],
    ],
)
def test_an_empty_argument_is_refused_never_read_as_here(tmp_path: Path, argv: list[str]) -> None:
    """An empty path (an unset variable in a script) is an error in one line, status 2;
    it was read as the current directory: `convert --to kernel ""` rewrote the markers
    of wherever it ran."""
    (tmp_path / "low").mkdir()
    (tmp_path / "up").mkdir()
    write(tmp_path / ".wh.gone", b"")  # what convert --to kernel would turn into a whiteout
    r = run(*argv, cwd=tmp_path)
    assert (r.returncode, r.stdout) == (2, ""), r
    assert r.stderr.count("\n") == 1 and "is empty" in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == [".wh.gone", "low", "up"]
    assert (tmp_path / ".wh.gone").is_file()


def test_an_empty_message_is_still_a_message(tmp_path: Path) -> None:
    (tmp_path / "up").mkdir()
    write(tmp_path / "up/f", b"1")
    r = run("commit", "up", "-o", "x.tar", "-m", "", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("lower", ["low::low", "low:", ":low"])
def test_an_empty_path_in_a_lower_list_is_refused(tmp_path: Path, lower: str) -> None:
    (tmp_path / "low").mkdir()
    (tmp_path / "up").mkdir()
    r = run("diff", "up", "--lower", lower, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr == (
        f"unionfs: --lower {lower!r}: an empty path in the list\n"
    ), r.stderr


def test_a_trace_file_in_a_directory_it_cannot_search_is_one_line(
    stack: Stack, tmp_path: Path
) -> None:
    """Without the capabilities that pass over modes, a trace file in a directory of mode
    000: one line (it was a PermissionError traceback), nothing mounted."""
    shut = tmp_path / "shut"
    shut.mkdir(mode=0o000)
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    r = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *unionfs_command(),
         "-o", f"lowerdir={stack.lowers[0]},trace={shut}/t", os.fspath(stack.mnt)],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert (r.returncode, r.stderr) == (1, f"unionfs: trace file {shut}/t: Permission denied\n")
    assert mount_type(stack.mnt) is None


def test_a_path_with_a_newline_is_one_line_in_an_error(tmp_path: Path) -> None:
    bad = os.fsdecode(os.fsencode(f"{tmp_path}/no\npe") + b"\xff")  # not UTF-8
    r = run("-o", f"lowerdir={bad}", os.fspath(tmp_path))
    assert (r.returncode, r.stderr) == (
        1,
        f"unionfs: lowerdir {tmp_path}/no\\npe\\xff: No such file or directory\n",
    )


def test_lower_layers_given_twice_or_nested_are_refused_as_by_the_kernel(
    stack: Stack, tmp_path: Path
) -> None:
    """The kernel refuses the same lower twice ("conflicting lowerdir path") and one
    inside another ("overlapping lowerdir path"); so does unionfs, in one line."""
    low = stack.lowers[0]
    (low / "sub").mkdir()
    (tmp_path / "link").symlink_to(low)
    cases = {
        f"{low}:{low}": f"lowerdir {low} is given twice",
        f"{low}:{tmp_path}/link": f"lowerdir {low} is given twice",
        f"{low}:{low}/sub": f"lowerdir {low}/sub is inside lowerdir {low}",
        f"{low}/sub:{low}": f"lowerdir {low}/sub is inside lowerdir {low}",
    }
    kmnt = tmp_path / "kmnt"
    kmnt.mkdir()
    for lowers, message in cases.items():
        r = run("-o", f"lowerdir={lowers}", os.fspath(stack.mnt))
        assert (r.returncode, r.stderr) == (1, f"unionfs: {message}\n"), lowers
        k = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowers}:{stack.lowers[1]}",
             os.fspath(kmnt)], capture_output=True, text=True, check=False,
        )  # fmt: skip
        if k.returncode == 0:
            subprocess.run(["umount", os.fspath(kmnt)], check=False)
        assert k.returncode != 0, lowers  # the kernel refuses each one too
    assert mount_type(stack.mnt) is None
    r = run("-o", f"lowerdir={low}:{stack.lowers[1]}", os.fspath(stack.mnt))
    assert r.returncode == 0, r.stderr
    subprocess.run(["fusermount3", "-u", os.fspath(stack.mnt)], check=True)


def test_a_remount_right_after_an_unmount_works(stack: Stack) -> None:
    """fusermount3 -u returns before the daemon has exited and let go of its upper; a
    mount of the same upper straight after (a container restarted) waits for that,
    instead of being refused as if the upper were in use."""
    opts = f"lowerdir={stack.lowers[0]},upperdir={stack.upper},workdir={stack.work}"
    try:
        for i in range(4):
            r = run("-o", opts, os.fspath(stack.mnt))
            assert r.returncode == 0, (i, r.stderr)
            if i % 2:  # the daemon serving; else still loading its libraries (slower to go)
                write(stack.mnt / f"f{i}", b"x")
            subprocess.run(["fusermount3", "-u", os.fspath(stack.mnt)], check=True)
    finally:
        if mount_type(stack.mnt) is not None:
            subprocess.run(["fusermount3", "-u", os.fspath(stack.mnt)], check=False)
    assert sorted(os.listdir(stack.upper)) == ["f1", "f3"]


def test_ctrl_c_while_the_daemon_starts_leaves_nothing_mounted(stack: Stack) -> None:
    """^C to the command while its daemon is mounting: the daemon stops too and takes
    its mount down, and the command says so in one line with status 130. The
    daemon's mount(2) is held back 3 s by strace, so the ^C lands while it mounts."""
    opts = f"lowerdir={stack.lowers[0]},upperdir={stack.upper},workdir={stack.work}"
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=mount",
         "-e", "inject=mount:delay_enter=3000000",
         *unionfs_command(), "-o", opts, os.fspath(stack.mnt)],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        command = daemon = None
        deadline = time.monotonic() + 20
        while daemon is None and time.monotonic() < deadline:
            time.sleep(0.01)
            command = _children(tracer.pid)[:1] or None
            if command:
                for pid in _children(command[0]):
                    with contextlib.suppress(OSError):  # 165: mount(2), held at its entry
                        if Path(f"/proc/{pid}/syscall").read_text().split()[0] == "165":
                            daemon = pid
        assert command is not None and daemon is not None, "the daemon never reached mount(2)"
        os.kill(command[0], signal.SIGINT)
        _, err = tracer.communicate(timeout=60)
        assert tracer.returncode == 130, err
        assert err == "unionfs: interrupted: nothing mounted\n"
        assert _wait_gone(daemon)
        assert mount_type(stack.mnt) is None
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        if mount_type(stack.mnt) is not None:
            subprocess.run(["umount", "-l", os.fspath(stack.mnt)], check=False)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


@pytest.mark.parametrize("how", ["fusermount3", "umount", "SIGTERM", "SIGINT"])
def test_stopping_unmounts_cleanly_with_status_0(stack: Stack, how: str) -> None:
    um = start_unionfs(stack.lowers, stack.mnt, stack.upper, stack.work)
    try:
        write(stack.mnt / "f", b"kept")
        if how in ("fusermount3", "umount"):
            cmd = ["fusermount3", "-u"] if how == "fusermount3" else ["umount"]
            subprocess.run([*cmd, os.fspath(stack.mnt)], check=True)
        else:
            os.kill(um.pid, getattr(signal, how))
        assert um.proc.wait(timeout=15) == 0
        assert mount_type(stack.mnt) is None
    finally:
        um.unmount()
    assert (stack.upper / "f").read_bytes() == b"kept"


def test_sigterm_after_parallel_load_stops_every_worker(stack: Stack) -> None:
    """Parallel requests leave several of pyfuse3's worker tasks waiting for the next one
    (unionfs/fuse/loop.py); a signal must end them all, not only the one on the device."""
    for i in range(200):
        write(stack.lowers[0] / f"f{i}", b"x" * 100)
    um = start_unionfs(stack.lowers, stack.mnt, stack.upper, stack.work)
    try:
        script = f"for f in {stack.mnt}/f*; do cat $f >/dev/null; done"
        readers = [subprocess.Popen(["sh", "-c", script]) for _ in range(6)]
        for r in readers:
            assert r.wait(timeout=120) == 0
        os.kill(um.pid, signal.SIGTERM)
        assert um.proc.wait(timeout=15) == 0
        assert mount_type(stack.mnt) is None
    finally:
        um.unmount()


def test_the_package_runs_as_a_module_and_a_command() -> None:
    exe = REPO / ".venv" / "bin" / "unionfs"
    r = subprocess.run([os.fspath(exe), "--version"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "unionfs version" in r.stdout


def test_make_install_is_idempotent() -> None:
    r = subprocess.run(
        ["make", "-s", "install"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    q = subprocess.run(
        ["make", "-q", os.fspath(REPO / ".venv" / ".installed")], cwd=REPO, check=False
    )
    assert q.returncode == 0  # nothing left to do


def test_mount_t_fuse_unionfs_through_mount_fuse3(stack: Stack) -> None:
    """``make install-system`` puts the command where mount.fuse3 finds it (mount(8) resets PATH)."""
    link = Path("/usr/local/sbin/unionfs")
    existed = link.exists() or link.is_symlink()
    subprocess.run(["make", "-s", "install-system"], cwd=REPO, check=True, capture_output=True)
    try:
        write(stack.lowers[0] / "f", b"via mount(8)")
        opts = f"lowerdir={stack.lowers[0]}:{stack.lowers[1]},upperdir={stack.upper},workdir={stack.work}"
        r = subprocess.run(
            ["mount", "-t", "fuse.unionfs", "unionfs", os.fspath(stack.mnt), "-o", opts],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        try:
            assert (stack.mnt / "f").read_bytes() == b"via mount(8)"
        finally:
            subprocess.run(["umount", os.fspath(stack.mnt)], check=False)
        assert mount_type(stack.mnt) is None
    finally:
        if not existed:
            link.unlink()


def test_an_upper_on_a_read_only_filesystem_is_refused(stack: Stack, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", os.fspath(ro)], check=True)
    try:
        (ro / "upper").mkdir()
        (ro / "work").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", os.fspath(ro)], check=True)
        r = run(
            "-o",
            f"lowerdir={stack.lowers[0]},upperdir={ro}/upper,workdir={ro}/work",
            os.fspath(stack.mnt),
        )
        assert r.returncode != 0 and "read-only" in r.stderr and r.stderr.count("\n") == 1
        assert mount_type(stack.mnt) is None
    finally:
        subprocess.run(["umount", "-l", os.fspath(ro)], check=False)


def test_an_upper_on_an_overlay_is_refused_by_name(tmp_path: Path) -> None:
    """A container's root is a kernel overlay, which refuses whiteouts: an upper there
    is named in one line, and nothing is mounted. A lower there is fine."""
    from tests.mounting import kernel_overlay

    for d in ("l", "u", "w", "root", "mnt"):
        (tmp_path / d).mkdir()
    write(tmp_path / "l" / "f", b"x")
    with kernel_overlay([tmp_path / "l"], tmp_path / "root", tmp_path / "u", tmp_path / "w"):
        root = tmp_path / "root"
        for d in ("upper", "work", "lower"):
            (root / d).mkdir()
        r = run(
            "-o", f"lowerdir={root / 'lower'},upperdir={root / 'upper'},workdir={root / 'work'}",
            os.fspath(tmp_path / "mnt"),
        )  # fmt: skip
        assert r.returncode != 0
        assert r.stderr.strip().splitlines() == [
            f"unionfs: upperdir {root / 'upper'} is on an overlay filesystem, which refuses "
            "whiteouts (character devices 0/0): put upperdir and workdir on a tmpfs or a volume"
        ]
        assert not (tmp_path / "mnt").is_mount()
        # the same lower with an upper elsewhere mounts
        for d in ("u2", "w2"):
            (tmp_path / d).mkdir()
        up, wk = tmp_path / "u2", tmp_path / "w2"
        r = run(
            "-o", f"lowerdir={root / 'lower'},upperdir={up},workdir={wk}",
            os.fspath(tmp_path / "mnt"),
        )  # fmt: skip
        try:
            assert r.returncode == 0, r.stderr
            assert (tmp_path / "mnt").is_mount()
        finally:
            subprocess.run(["umount", os.fspath(tmp_path / "mnt")], check=False)
