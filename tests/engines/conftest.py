"""Fixtures that drive real podman/buildah with unionfs as containers-storage's mount_program.

Everything lives in one private temporary directory per session: storage.conf,
containers.conf, graphroots, runroots, tmp dirs, lock files and the CNI config
dir, so the machine's own container storage is never read or touched and a
machine that never ran podman behaves like one that did.  No test needs the
network or a registry: the base image is a static busybox imported from a tar.
The stores:

* ``fuse_store``: overlay driver with ``mount_program`` = a logging wrapper that
  records how podman invokes the program, then execs the real unionfs;
* ``native_store``: the same overlay driver without a mount program, i.e. the
  kernel's overlayfs.  It is the reference the unionfs results are compared to;
* in ``test_rootless.py``, the same for an ordinary user, against ``vfs``.

Tests find their own mount-program runs in the wrapper's log by content (the
merged dir of a container they created), never by time.  Teardown removes every
container and image, runs ``podman system reset`` for each private config,
lazily unmounts whatever is still mounted under the temp dir and fails loudly
if anything had been left behind.

Environment knobs:

* ``UNIONFS_ENGINE_MOUNT_PROGRAM``: the mount program under test (default: the
  project's ``.venv/bin/unionfs``); set it to ``/usr/bin/fuse-overlayfs`` to
  check the harness itself against the reference implementation.
* ``UNIONFS_ENGINE_KEEP=1``: keep the temp dir (logs, argv records) afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import lazy_unmount

# tests/engines has no __init__.py, so pytest imports this file as plain
# ``conftest``; the test modules import helpers as ``tests.engines.conftest``.
# Register this instance under that name too, so both share one module (and
# one ARGV_SHAPES list) instead of loading the file twice.
sys.modules.setdefault("tests.engines.conftest", sys.modules[__name__])

REPO = Path(__file__).resolve().parents[2]
MOUNT_PROGRAM = Path(
    os.environ.get("UNIONFS_ENGINE_MOUNT_PROGRAM", str(REPO / ".venv" / "bin" / "unionfs"))
)
REQUIRED_TOOLS = ("podman", "buildah", "runc", "conmon", "fusermount3")
BUSYBOX = Path("/bin/busybox")
BASE_IMAGE = "localhost/unionfs-test/busybox:latest"

# Every podman call gets a deadline so a hung mount (e.g. a daemon that keeps
# podman's stderr pipe open) fails the test instead of the whole run.
PODMAN_TIMEOUT = 180
# How long a mount daemon may take to exit once its mount is gone before it
# counts as hung: generous, as a loaded machine is slow, never a time window.
DAEMON_EXIT_SECONDS = 60


def _missing_tools() -> list[str]:
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if not BUSYBOX.is_file() or not _is_static(BUSYBOX):
        missing.append("busybox-static (/bin/busybox, statically linked)")
    return missing


def _is_static(path: Path) -> bool:
    """True if the ELF file has no PT_INTERP program header (no dynamic loader)."""
    try:
        data = path.read_bytes()[:4096]
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit ELF only; enough here
        return False
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def fuse_mounts_under(
    root: Path, all_types: bool = False, mountinfo: str = "/proc/self/mountinfo"
) -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every FUSE or overlay mount below *root*.

    With *all_types*, every mount: containers-storage also makes bind mounts
    (``graphroot/overlay`` onto itself, id-mapped lowers), which must go too.
    *mountinfo* may name another process's table (rootless podman mounts in
    its own mount namespace).
    """
    found = []
    prefix = os.path.realpath(root) + "/"
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4].encode().decode("unicode_escape")
            fstype = fields[sep + 1]
            if point.startswith(prefix) and (
                all_types or fstype.startswith("fuse") or fstype == "overlay"
            ):
                found.append((point, fstype))
    return found


def mount_options(mountpoint: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(per-mount options, superblock options) of the mount at *mountpoint*."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4].encode().decode("unicode_escape") == target:
                found = (fields[5], fields[sep + 3])
    return found


def processes_mentioning(text: str) -> dict[int, list[str]]:
    """PID -> argv of every process whose command line contains *text*."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in raw:
            found[int(entry)] = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    return found


def mount_daemons(graphroot: Path) -> dict[int, list[str]]:
    """Processes that look like mount-program daemons serving this graphroot.

    conmon also mentions the graphroot (``overlay-containers/...``), so require
    the ``lowerdir=`` option that only the mount program gets on its command line.
    """
    return {
        pid: argv
        for pid, argv in processes_mentioning(f"{graphroot}/overlay/").items()
        if any("lowerdir=" in a for a in argv)
    }


# A mount-program wrapper: logs argv, cwd, open fds (as inherited from podman,
# before anything else is opened), the calling command line and, for a mount,
# the owner of each lower directory as one JSON line, then execs the real
# program so podman sees the real exit status, output and daemon.  Tests pick
# their own invocations out of the log by content (the mountpoint of their
# container), never by time: podman also runs the program for `--version`.
WRAPPER = """#!/usr/bin/python3 -I
import json, os, sys
fds = {}
for fd in sorted(int(n) for n in os.listdir("/proc/self/fd")):
    try:
        fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass  # the fd listdir itself used, already closed
try:
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
        caller = [a.decode(errors="replace") for a in f.read().split(b"\\0") if a]
except OSError:
    caller = []
lower_owners = {}
if len(sys.argv) == 4 and sys.argv[1] == "-o":
    for opt in sys.argv[2].split(","):
        if opt.startswith("lowerdir="):
            for lower in opt[len("lowerdir="):].split(":"):
                try:
                    st = os.stat(lower)
                    lower_owners[lower] = [st.st_uid, st.st_gid]
                except OSError as e:
                    lower_owners[lower] = str(e)
rec = {"argv": sys.argv[1:], "cwd": os.getcwd(), "fds": fds, "pid": os.getpid(),
       "caller": caller, "lower_owners": lower_owners}
with open(LOG, "a") as f:
    f.write(json.dumps(rec) + "\\n")
os.execv(PROGRAM, [PROGRAM] + sys.argv[1:])
"""


@dataclass(frozen=True)
class Invocation:
    """One run of the mount program (or of the fusermount3 stand-in), as logged."""

    argv: list[str]
    cwd: str
    fds: dict[str, str]
    caller: list[str]
    lower_owners: dict[str, object]

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Invocation:
        return cls(
            argv=[str(a) for a in rec["argv"]],
            cwd=str(rec["cwd"]),
            fds={str(k): str(v) for k, v in rec["fds"].items()},
            caller=[str(a) for a in rec.get("caller", [])],
            lower_owners=dict(rec.get("lower_owners", {})),
        )

    @property
    def is_mount(self) -> bool:
        """``-o OPTIONS MOUNTPOINT``, the only form containers-storage mounts with."""
        return len(self.argv) == 3 and self.argv[0] == "-o"

    @property
    def options(self) -> str:
        assert self.is_mount, self.argv
        return self.argv[1]

    @property
    def mountpoint(self) -> str:
        assert self.is_mount, self.argv
        return self.argv[2]

    def option(self, name: str) -> str | None:
        """The value of ``name=`` in the options (the last one given), or None."""
        found = None
        for opt in self.options.split(","):
            key, eq, value = opt.partition("=")
            if eq and key == name:
                found = value
        return found

    @property
    def lowerdirs(self) -> list[str]:
        value = self.option("lowerdir")
        return value.split(":") if value else []

    def describe(self) -> str:
        return f"  by {' '.join(self.caller[:4]) or '?'}: cwd={self.cwd} argv={self.argv}"


@dataclass(frozen=True)
class Container:
    """A created container and where containers-storage mounts its root."""

    name: str
    layer_dir: Path  # GRAPHROOT/overlay/<the container's layer id>

    @property
    def merged(self) -> str:
        return str(self.layer_dir / "merged")

    @property
    def upper(self) -> str:
        return str(self.layer_dir / "diff")


def write_wrapper(path: Path, log: Path, program: Path, prelude: str = "") -> Path:
    text = WRAPPER.replace("LOG", repr(str(log)), 1).replace("PROGRAM", repr(str(program)))
    if prelude:
        # Inserted just before the exec (e.g. to hold podman's stderr open).
        text = text.replace("os.execv(", prelude + "\nos.execv(", 1)
    path.write_text(text)
    path.chmod(0o755)
    return path


@dataclass
class Store:
    """One private containers-storage + libpod configuration and a podman runner.

    With *user*, podman runs rootless as that user (``runuser``), with nothing
    but ``env`` in its environment: HOME, XDG dirs and the config files all
    point inside *root*, so neither the user's nor the machine's own container
    storage is read or touched.
    """

    name: str
    root: Path
    mount_program: Path | None
    env: dict[str, str] = field(default_factory=dict)
    argv_log: Path | None = None
    user: str | None = None
    driver: str = "overlay"
    # Rootless: XDG_RUNTIME_DIR, which holds the runroot; see ``runroot``.
    runtime_dir: Path | None = None

    @property
    def graphroot(self) -> Path:
        return self.root / "graph"

    @property
    def runroot(self) -> Path:
        """podman refuses a ``--runroot`` longer than 50 characters, and passes one to
        the clean-up command conmon runs when a container exits: with a longer one
        that clean-up fails unseen and the container stays mounted. Rootless podman
        puts it in XDG_RUNTIME_DIR, which gets a short path of its own."""
        if self.runtime_dir is not None:
            return self.runtime_dir / "containers"
        return self.root / "run"

    @property
    def storage_conf(self) -> Path:
        return self.root / "storage.conf"

    @property
    def containers_conf(self) -> Path:
        return self.root / "containers.conf"

    def write_config(self, mountopt: str | None = "nodev") -> None:
        for d in ("graph", "run", "tmp", "net", "home"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        if self.user is not None and self.runtime_dir is None:
            self.runtime_dir = Path(tempfile.mkdtemp(prefix="unionfs-", dir="/tmp"))
        assert len(str(self.runroot)) <= 50, f"runroot {self.runroot} is too long for podman"
        lines = [
            "[storage]",
            f'driver = "{self.driver}"',
            f'graphroot = "{self.graphroot}"',
            f'runroot = "{self.runroot}"',
        ]
        if self.user is not None:
            lines.append(f'rootless_storage_path = "{self.graphroot}"')
        if self.driver == "overlay":
            lines += ["", "[storage.options.overlay]"]
            if mountopt is not None:
                # mountopt is prepended to the options podman hands the program.
                lines.append(f'mountopt = "{mountopt}"')
            if self.mount_program is not None:
                lines.append(f'mount_program = "{self.mount_program}"')
        self.storage_conf.write_text("\n".join(lines) + "\n")
        hard_nofile = _hard_limit("-n")
        hard_nproc = _hard_limit("-u")
        self.containers_conf.write_text(
            f"""[containers]
# podman (as root) would ask for 1048576; runc fails if that is above the hard limit.
default_ulimits = ["nofile={min(1024, hard_nofile)}:{min(1024, hard_nofile)}",
                   "nproc={min(4096, hard_nproc)}:{min(4096, hard_nproc)}"]
netns = "none"

[network]
# Keep podman system reset away from the machine's /etc/cni/net.d.
network_config_dir = "{self.root / "net"}"

[engine]
# crun refuses this machine's cgroup layout; runc works with cgroupfs.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
# File locks in tmp_dir, not the machine-wide /dev/shm/libpod_lock.
lock_type = "file"
tmp_dir = "{self.root / "tmp"}"
volume_path = "{self.root / "graph" / "volumes"}"
"""
        )
        (self.root / "registries.conf").write_text("unqualified-search-registries = []\n")
        self.env = {
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
            "CONTAINERS_CONF": str(self.containers_conf),
            # No registries are reachable; make sure nothing tries one.
            "CONTAINERS_REGISTRIES_CONF": str(self.root / "registries.conf"),
            # podman and buildah put temporary copies of images in TMPDIR
            # (default /var/tmp): keep those private too.
            "TMPDIR": str(self.root / "tmp"),
        }
        if self.user is None:
            self.env = {**os.environ, **self.env}
        else:
            home = self.root / "home"
            self.env |= {
                "HOME": str(home),
                "XDG_CONFIG_HOME": str(home / ".config"),
                "XDG_DATA_HOME": str(home / ".local" / "share"),
                "XDG_RUNTIME_DIR": str(self.runtime_dir),
                "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                "LANG": "C.UTF-8",
            }

    def command(self, *args: str) -> list[str]:
        """The command line that runs ``podman ARGS`` for this store."""
        if self.user is None:
            return ["podman", *args]
        env = [f"{k}={v}" for k, v in self.env.items()]
        return ["runuser", "-u", self.user, "--", "env", "-i", *env, "podman", *args]

    def podman(
        self,
        *args: str,
        check: bool = True,
        timeout: float = PODMAN_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = self.command(*args)
        mark = len(self.invocations())
        try:
            res = subprocess.run(
                cmd,
                env=self.env if self.user is None else None,
                capture_output=True,
                text=True,
                timeout=timeout,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                cwd=self.root,
            )
        except subprocess.TimeoutExpired as e:
            raise AssertionError(
                f"[{self.name}] podman {' '.join(args)} did not finish within {timeout}s\n"
                f"stdout: {e.stdout!r}\nstderr: {e.stderr!r}\n{self.describe_calls(mark)}"
            ) from None
        if check and res.returncode != 0:
            raise AssertionError(
                f"[{self.name}] podman {' '.join(args)} exited {res.returncode}\n"
                f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}\n{self.describe_calls(mark)}"
            )
        return res

    def invocations(self) -> list[Invocation]:
        """Every recorded mount-program invocation, oldest first."""
        return _read_log(self.argv_log)

    def unmount_calls(self) -> list[Invocation]:
        """`fusermount3` runs by podman, recorded by the PATH stand-in."""
        return _read_log(self.root / "fusermount3.jsonl")

    def describe_calls(self, first: int) -> str:
        calls = self.invocations()[first:]
        if not calls:
            return "(no mount program invocations recorded)"
        return "mount program invocations:\n" + "\n".join(c.describe() for c in calls)

    def create(self, name: str, *args: str) -> Container:
        """`podman create --name NAME ARGS...`; the container's layer is known from then on,
        so its mounts can be told apart from every other run of the program."""
        assert self.driver == "overlay", "only the overlay driver has a merged dir"
        self.podman("create", "--name", name, *args)
        upper = self.podman("inspect", "-f", "{{.GraphDriver.Data.UpperDir}}", name).stdout
        layer_dir = Path(upper.strip()).parent
        assert layer_dir.parent == self.graphroot / "overlay", upper
        return Container(name=name, layer_dir=layer_dir)

    def mounts_of(self, container: Container) -> list[Invocation]:
        """The mount program's runs that mounted *container*'s root, oldest first."""
        calls = [c for c in self.invocations() if c.is_mount and c.mountpoint == container.merged]
        for call in calls:
            assert call.option("upperdir") == container.upper, call.describe()
        return calls

    def unmounts_of(self, container: Container) -> list[Invocation]:
        return [c for c in self.unmount_calls() if c.argv[-1:] == [container.merged]]

    def pause_pid(self) -> int | None:
        """Rootless podman's pause process, which holds its user and mount namespaces
        and outlives every podman command (started by this store, so ours to stop)."""
        try:
            pid = int((self.root / "tmp" / "pause.pid").read_text())
            is_podman = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"podman"
        except (OSError, ValueError):
            return None
        return pid if is_podman and alive(pid) else None

    def cleanup(self) -> list[str]:
        """Remove everything this store made; return a description of any leftovers."""
        problems = []
        pause = self.pause_pid()
        umount: tuple[str, ...] = ("image", "umount", "-a", "-f")
        if self.user is not None:
            umount = ("unshare", "podman", *umount)  # rootless mounts need the namespace
        for args in (("rm", "-af", "-t", "0"), umount, ("rmi", "-af"), ("system", "reset", "-f")):
            res = self.podman(*args, check=False, timeout=120)
            if res.returncode != 0:
                problems.append(f"podman {' '.join(args)} exited {res.returncode}: {res.stderr}")
        if self.user is None:
            leftovers = fuse_mounts_under(self.root, all_types=True)
            if leftovers:
                problems.append(f"still mounted after podman system reset: {leftovers}")
                for point, _ in reversed(leftovers):
                    lazy_unmount(point)
        elif pause is not None and alive(pause):
            leftovers = fuse_mounts_under(self.root, True, f"/proc/{pause}/mountinfo")
            if leftovers:
                problems.append(f"still mounted after podman system reset: {leftovers}")
        # A daemon whose mount is gone must have exited; anything left was
        # started (through podman) by this test run, so stop it by PID.
        deadline = time.monotonic() + DAEMON_EXIT_SECONDS
        daemons = mount_daemons(self.graphroot)
        while daemons and time.monotonic() < deadline:
            time.sleep(0.2)
            daemons = mount_daemons(self.graphroot)
        if daemons:
            problems.append(f"mount daemons still running after unmount: {daemons}")
            for pid in daemons:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if pause is not None and alive(pause):
            # Not a leftover of the tests: podman keeps it until told otherwise.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pause, signal.SIGKILL)
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return problems


def alive(pid: int) -> bool:
    """Whether process *pid* exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _hard_limit(flag: str) -> int:
    import resource

    res = {"-n": resource.RLIMIT_NOFILE, "-u": resource.RLIMIT_NPROC}[flag]
    hard = resource.getrlimit(res)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def make_base_rootfs(dest: Path) -> None:
    """A minimal root: static busybox, one symlink per applet, passwd/group, tmp."""
    for d in ("bin", "etc", "tmp", "root", "proc", "sys", "dev", "run", "home"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    (dest / "root").chmod(0o700)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (dest / "bin" / applet).symlink_to("busybox")
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")


def make_tar(src: Path, dest: Path) -> None:
    def reset_owner(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        return ti

    with tarfile.open(dest, "w") as tf:
        for entry in sorted(src.iterdir()):
            tf.add(entry, arcname=entry.name, filter=reset_owner)


@pytest.fixture(scope="session")
def engines_dir() -> Iterator[Path]:
    """The session's private temp dir; skip everything if the engines are missing."""
    missing = _missing_tools()
    if missing:
        pytest.skip(
            "container engines not installed (run `bash tests/engines/install-deps.sh`): "
            + ", ".join(missing)
        )
    if os.geteuid() != 0:
        pytest.skip("the engine tests drive rootful podman and need root")
    # Under /tmp whatever TMPDIR says: podman limits the runroot path (Store.runroot).
    with scratch_dir("unionfs-engines-", "UNIONFS_ENGINE_KEEP", "engine", parent="/tmp") as d:
        yield d


@contextlib.contextmanager
def scratch_dir(prefix: str, keep_env: str, what: str, parent: str | None = None) -> Iterator[Path]:
    """A fresh directory for a module's engine runs; afterwards whatever is still mounted
    below it is detached (and fails the run), and it is removed unless *keep_env* is 1."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield d
    finally:
        leftovers = fuse_mounts_under(d, all_types=True)
        for point, _ in reversed(leftovers):
            lazy_unmount(point)
        if os.environ.get(keep_env) != "1" and not fuse_mounts_under(d, True):
            shutil.rmtree(d, ignore_errors=True)
        else:
            print(f"\n{what} test files kept in {d}", file=sys.stderr)
        assert not leftovers, f"mounts left under {d}: {leftovers}"


def fresh_dir(engines_dir: Path, name: str) -> Path:
    """A new directory in the session dir: a fixture set up again (its module's
    tests interleaved with others) must not find what its last run left."""
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=engines_dir))


@pytest.fixture(scope="session")
def base_tar(engines_dir: Path) -> Path:
    rootfs = engines_dir / "base-rootfs"
    make_base_rootfs(rootfs)
    tar = engines_dir / "base.tar"
    make_tar(rootfs, tar)
    return tar


@pytest.fixture(scope="session")
def mount_program() -> Path:
    """The program under test; a broken one is a failure, not a skip."""
    if not os.access(MOUNT_PROGRAM, os.X_OK):
        pytest.fail(f"mount program {MOUNT_PROGRAM} is not executable")
    res = subprocess.run(
        [str(MOUNT_PROGRAM), "--version"], capture_output=True, text=True, timeout=60
    )
    if res.returncode != 0:
        pytest.fail(f"{MOUNT_PROGRAM} --version exited {res.returncode}: {res.stderr}")
    return MOUNT_PROGRAM


def _make_store(
    root: Path,
    name: str,
    base_tar: Path,
    program: Path | None,
    mountopt: str | None,
    user: str | None = None,
    driver: str = "overlay",
) -> Store:
    root.mkdir(parents=True, exist_ok=True)
    store = Store(name=name, root=root, mount_program=None, user=user, driver=driver)
    if program is not None:
        store.argv_log = root / "mount-program-argv.jsonl"
        store.mount_program = write_wrapper(root / "mount-program", store.argv_log, program)
    store.write_config(mountopt=mountopt)
    if program is not None:
        # containers-storage unmounts FUSE mounts by running `fusermount3 -u`
        # from PATH: a logging stand-in first in podman's PATH records that.
        shim_dir = root / "bin"
        shim_dir.mkdir()
        real = shutil.which("fusermount3") or "/usr/bin/fusermount3"
        write_wrapper(shim_dir / "fusermount3", root / "fusermount3.jsonl", Path(real))
        store.env["PATH"] = f"{shim_dir}:{store.env.get('PATH', '/usr/bin:/bin')}"
    if user is not None:
        assert store.runtime_dir is not None
        for path in (root, store.runtime_dir):
            subprocess.run(["chown", "-R", f"{user}:", str(path)], check=True)
    store.podman("import", str(base_tar), BASE_IMAGE)
    return store


@pytest.fixture(scope="session")
def fuse_store(engines_dir: Path, base_tar: Path, mount_program: Path) -> Iterator[Store]:
    # allow_other lets processes other than root (a `su someuser` build step,
    # `podman run --user`) into the mount; fuse-overlayfs turns it on by itself
    # when run as root, here it is asked for explicitly.
    store = _make_store(
        engines_dir / "fuse", "unionfs", base_tar, mount_program, "nodev,allow_other"
    )
    try:
        yield store
    finally:
        ARGV_SHAPES.extend(argv_shapes(store))
        problems = store.cleanup()
        assert not problems, "\n".join(problems)


@pytest.fixture(scope="session")
def native_store(engines_dir: Path, base_tar: Path) -> Iterator[Store]:
    store = _make_store(engines_dir / "native", "kernel-overlay", base_tar, None, "nodev")
    try:
        yield store
    finally:
        problems = store.cleanup()
        assert not problems, "\n".join(problems)


# Distinct shapes of the mount program's command lines seen in this session,
# printed in the terminal summary (the option parser must accept all of them).
ARGV_SHAPES: list[str] = []


def argv_shapes(store: Store) -> list[str]:
    """The store's recorded invocations with paths and ids abstracted away."""
    shapes: dict[str, int] = {}
    overlay = f"{store.graphroot}/overlay"
    for call in store.invocations():
        text = " ".join(call.argv)
        text = text.replace(overlay, "<G>")
        text = re.sub(r"[0-9a-f]{64}", "<id>", text)
        text = re.sub(r"/l/[A-Z0-9]{26}", "/l/<link>", text)
        text = re.sub(r"(<G>/l/<link>:)+", "<G>/l/<link>:...:", text)
        cwd = call.cwd.replace(overlay, "<G>").replace(str(store.root), "<T>")
        fds = ",".join(f"{fd}={target}" for fd, target in sorted(
            call.fds.items(), key=lambda kv: int(kv[0])))  # fmt: skip
        fds = re.sub(r"pipe:\[\d+\]", "pipe", fds)
        key = f"cwd={cwd} fds[{fds}]\n      argv: {text}"
        if not call.is_mount:
            key += f"  (run by: {' '.join(call.caller[:3])})"
        shapes[key] = shapes.get(key, 0) + 1
    unmounts: dict[str, int] = {}
    for call in store.unmount_calls():
        text = " ".join(call.argv).replace(overlay, "<G>")
        text = "fusermount3 " + re.sub(r"[0-9a-f]{64}", "<id>", text)
        unmounts[text] = unmounts.get(text, 0) + 1
    return [f"{n}x {k}" for k, n in (shapes | unmounts).items()]


def _read_log(log: Path | None) -> list[Invocation]:
    if log is None or not log.exists():
        return []
    return [
        Invocation.from_record(json.loads(line)) for line in log.read_text().splitlines() if line
    ]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if ARGV_SHAPES:
        terminalreporter.write_sep(
            "-", "mount_program invocations by podman (<G> = graphroot/overlay)"
        )
        for line in ARGV_SHAPES:
            terminalreporter.write_line(line)
    report = os.environ.get("UNIONFS_ENGINE_ARGV_REPORT")
    if report and ARGV_SHAPES:
        Path(report).write_text("\n".join(ARGV_SHAPES) + "\n")


def write_context(dest: Path, containerfile: str, files: Sequence[tuple[str, bytes]] = ()) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "Containerfile").write_text(containerfile)
    for name, data in files:
        (dest / name).write_bytes(data)
    return dest
