"""OPEN of lower files for reading answered in C (``csrc/opens.c``): the same files,
the same errors and the same copy-up semantics as the daemon's own opens, the
kernel overlay as the oracle."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Mounted, Stack
from tests.features import hook_enabled, passthrough_expected
from tests.mounting import start_unionfs, unionfs_command
from tests.test_merge import write
from tests.test_namespace import let_others_in
from tests.test_reads import _evict, watched
from tests.twins import twins
from unionfs.fuse.hook import PYTHON_CREATES_ENV

# What one open of each kind does (the second open of a file is the one the hook answers).
Scenario = Callable[[Path], list[object]]


# The unmount log's count of the requests csrc/opens.c answered, by kind.
_IN_C = re.compile(
    r"opens answered in C: (?P<opens>\d+), getattrs: (?P<getattrs>\d+), "
    r"setattrs: (?P<setattrs>\d+), lookups of missing names: (?P<lookups>\d+), "
    r"creates: (?P<creates>\d+)"
)


def _answered_in_c(log: str, how: str, **at_least: int) -> None:
    """Each *kind* (a keyword of ``_in_c``) answered in C at least that many times by a
    daemon whose requests were not watched (*how* "plain"); none by one that logged or
    traced them, or that made every request go to Python; no count at all without the
    hook."""
    counts = {kind: _in_c(log, kind) for kind in at_least}
    if not hook_enabled():
        assert set(counts.values()) == {None}, counts
    elif how == "plain":
        for kind, least in at_least.items():
            found = counts[kind]
            assert found is not None and found >= least, (kind, found)
    else:
        assert set(counts.values()) == {0}, counts


def _in_c(log: str, kind: str) -> int | None:
    """How many requests of *kind* (opens, getattrs, setattrs, lookups of missing names, creates)
    the hook answered; None when the daemon logged no such count (no hook)."""
    found = _IN_C.search(log)
    return int(found.group(kind)) if found else None


@contextlib.contextmanager
def _fd(path: Path, flags: int = os.O_RDONLY) -> Iterator[int]:
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def _arm(path: Path) -> None:
    """Open and close *path* once: the daemon answers that open, and arms the inode."""
    os.close(os.open(path, os.O_RDONLY))


@pytest.mark.parametrize("how", ["plain", "debug", "traced"])
def test_read_only_opens_of_lower_files_are_answered_in_c_unless_requests_are_watched(
    stack: Stack, mounted: Mounted, tmp_path: Path, how: str
) -> None:
    write(stack.lowers[1] / "f", b"lower data")
    um = mounted(**watched(how, tmp_path))
    for _ in range(20):
        with open(stack.mnt / "f", "rb") as f:
            assert f.read() == b"lower data"
        _evict(stack.mnt / "f")  # the next read asks the daemon, then the kernel asks getattr
        assert os.stat(stack.mnt / "f").st_size == 10
    assert um.unmount() == 0
    # All but the first, and the odd retry.
    _answered_in_c(um.log(), how, opens=15, getattrs=15)


def _in_runs(log: str) -> tuple[int, int] | None:
    """(requests read in runs of C answers, those waited for), from the unmount log."""
    found = re.search(r"requests read in runs of C answers: (\d+), waited for: (\d+)", log)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _lingered(log: str) -> int | None:
    runs = _in_runs(log)
    return runs[1] if runs else None


@pytest.mark.parametrize("linger_us", ["100000", "0"])
def test_a_run_of_c_answers_waits_for_the_next_request(
    stack: Stack, mounted: Mounted, linger_us: str
) -> None:
    """After a request answered in C the hook waits a little for the next one
    (csrc/requests.c): a program's opens and closes of files read before come
    microseconds apart. UNIONFS_LINGER_US=0 turns the wait off (here, the wait is long
    enough never to run out)."""
    write(stack.lowers[1] / "f", b"lower data")
    um = mounted(env={"UNIONFS_LINGER_US": linger_us})
    for _ in range(200):
        with open(stack.mnt / "f", "rb") as f:
            assert f.read() == b"lower data"
    assert um.unmount() == 0
    waited, counts = _lingered(um.log()), re.search(r"requests: .*", um.log())
    if not hook_enabled():
        assert waited is None
    elif linger_us == "0":
        assert waited == 0, counts
    else:
        assert waited is not None and waited >= 50, (waited, counts)


def _after_python(log: str) -> tuple[int, int] | None:
    """How many requests the request loop waited for after a Python answer, and how many
    it found queued already when it came to wait."""
    waited = re.search(r"waited for after a Python answer: (\d+)", log)
    queued = re.search(r"found queued when the request loop came to wait: (\d+)", log)
    return (int(waited.group(1)), int(queued.group(1))) if waited and queued else None


@pytest.mark.parametrize("linger_us", ["100000", "0"])
def test_the_request_loop_waits_for_the_next_request_after_a_python_answer(
    stack: Stack, mounted: Mounted, linger_us: str
) -> None:
    """After a request answered in Python (statfs is one) the request loop reads the
    next one without parking in trio (unionfs/fuse/loop.py): at once when it is queued
    already, and otherwise after waiting a little for it, with the same wait as runs of
    C answers; UNIONFS_LINGER_US=0 turns the wait off. Which of the two a request gets
    depends on the machine's load (on a busy one the program's next request is mostly
    there already), so the count is of both: trio gets its turn at the 32nd request in
    a row (and after 20 ms of waiting), a few times here."""
    um = mounted(env={"UNIONFS_LINGER_US": linger_us})
    for _ in range(200):
        os.statvfs(stack.mnt)
    assert um.unmount() == 0
    read_on, counts = _after_python(um.log()), re.search(r"requests: .*", um.log())
    if not hook_enabled():
        assert read_on is None
    elif linger_us == "0":
        assert read_on is not None and read_on[0] == 0, (read_on, counts)
    else:
        assert counts is not None and "statfs=" in counts.group(0), counts
        assert read_on is not None and sum(read_on) >= 150, (read_on, counts)


def test_a_run_of_c_answers_goes_on_past_what_libfuse_answers_itself(
    stack: Stack, mounted: Mounted
) -> None:
    """Asking whether a file is a terminal is an IOCTL, which libfuse answers ENOSYS by
    itself: a run goes on past it, so nearly every one is read by a run (with the run
    stopping at each, none would be: nothing else comes between them)."""
    write(stack.lowers[1] / "f", b"lower data")
    um = mounted(env={"UNIONFS_LINGER_US": "100000"})  # the wait never runs out here
    with _fd(stack.mnt / "f") as fd:
        for _ in range(200):
            assert not os.isatty(fd)
    assert um.unmount() == 0
    runs, counts = _in_runs(um.log()), re.search(r"requests: .*", um.log())
    if not hook_enabled():
        assert runs is None
    else:
        assert counts is not None and "ioctl=200" in counts.group(0), counts
        assert runs is not None and runs[0] >= 150, (runs, counts)


def test_the_opens_that_run_a_program_are_answered_in_c(stack: Stack, mounted: Mounted) -> None:
    """An exec opens its binary with a flag of the kernel's own, which openat2 refuses;
    the hook leaves it out, as open(2) ignores it."""
    (stack.lowers[1] / "bin").mkdir()
    shutil.copy2("/bin/true", stack.lowers[1] / "bin/true")
    um = mounted()
    for _ in range(10):
        subprocess.run([stack.mnt / "bin/true"], check=True, timeout=30)
    assert um.unmount() == 0
    served = _in_c(um.log(), "opens")
    if hook_enabled():
        assert served is not None and served >= 8
    else:
        assert served is None


def _follow_copy_up(mnt: Path) -> list[object]:
    """A file opened for reading (by the hook) before a copy-up reads the upper copy."""
    _arm(mnt / "f")
    with _fd(mnt / "f") as before:
        with open(mnt / "f", "ab") as w:  # copies f up
            w.write(b"+appended")
        seen = [os.pread(before, 100, 0)]
        os.fchmod(before, 0o600)  # reaches the upper copy, never the lower file
    return [*seen, oct(os.stat(mnt / "f").st_mode)]


def _open_after_unlink(mnt: Path) -> list[object]:
    """An open through /proc of a file whose name is gone, and one of a new file there."""
    _arm(mnt / "f")
    out: list[object] = []
    with _fd(mnt / "f") as fd:
        os.unlink(mnt / "f")
        try:
            with _fd(Path(f"/proc/self/fd/{fd}")) as again:
                out.append(os.pread(again, 100, 0))
        except OSError as e:
            out.append(errno.errorcode[e.errno or 0])
        write(mnt / "f", b"a new f")
        with _fd(mnt / "f") as new:
            out.append(os.pread(new, 100, 0))
        out.append(os.pread(fd, 100, 0))
    return out


def _replaced_by_rename(mnt: Path) -> list[object]:
    """A lower file renamed over, then opened again: the new one."""
    _arm(mnt / "f")
    _arm(mnt / "g")
    os.rename(mnt / "g", mnt / "f")
    with _fd(mnt / "f") as fd:
        return [os.pread(fd, 100, 0), sorted(os.listdir(mnt))]


def _chmod_then_open(mnt: Path) -> list[object]:
    """A metadata change (a copy-up) between opens: the next open reads the upper copy."""
    _arm(mnt / "f")
    os.chmod(mnt / "f", 0o640)
    with open(mnt / "f", "ab") as w:
        w.write(b"!")
    with _fd(mnt / "f") as fd:
        return [os.pread(fd, 100, 0), oct(os.fstat(fd).st_mode)]


def _attributes(mnt: Path) -> list[object]:
    """A stat after a read (which makes the kernel ask again), before and after a
    copy-up: the same fields as the kernel's, inode numbers by what they stand for."""
    out: list[object] = []
    for _ in range(2):
        _arm(mnt / "f")
        with open(mnt / "f", "rb") as f:
            f.read()
        _evict(mnt / "f")
        st = os.stat(mnt / "f")
        lower = os.stat(mnt.parent / "l0" / "f")  # the twin's own (twins.py lays them out so)
        times = (st.st_mtime_ns == lower.st_mtime_ns, st.st_atime_ns == lower.st_atime_ns)
        out.append((oct(st.st_mode), st.st_nlink, st.st_uid, st.st_size, st.st_blocks, times))
        os.chmod(mnt / "f", 0o600)  # copy-up: the next stat is the upper copy's
    return out


def _read_only_flags(mnt: Path) -> list[object]:
    """Opens the hook must leave alone or answer the same: O_TRUNC on a read-only open,
    O_NOATIME, O_DIRECTORY on a file, a write open."""
    _arm(mnt / "f")
    out: list[object] = []
    for flags in (
        os.O_RDONLY | os.O_NOATIME,
        os.O_RDONLY | os.O_DIRECTORY,
        os.O_RDONLY | os.O_NOFOLLOW,
        os.O_RDONLY | os.O_TRUNC,
        os.O_WRONLY,
    ):
        try:
            with _fd(mnt / "f", flags) as fd:
                out.append(os.fstat(fd).st_size)
        except OSError as e:
            out.append(errno.errorcode[e.errno or 0])
    return out


SCENARIOS: dict[str, Scenario] = {
    "follow-copy-up": _follow_copy_up,
    "open-after-unlink": _open_after_unlink,
    "replaced-by-rename": _replaced_by_rename,
    "chmod-then-open": _chmod_then_open,
    "read-only-flags": _read_only_flags,
    "attributes": _attributes,
}


def _fill(lowers: list[Path]) -> None:
    write(lowers[0] / "f", b"lower f")
    write(lowers[0] / "g", b"lower g")
    os.chmod(lowers[0] / "f", 0o644)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_opens_answered_in_c_behave_as_on_the_kernel_overlay(tmp_path: Path, name: str) -> None:
    u, k = twins(tmp_path, _fill)
    results = {}
    for twin in (u, k):
        with twin.mount() as mnt:
            results[twin.kind] = SCENARIOS[name](mnt)
    assert results["unionfs"] == results["kernel"]


def _fill_dirs(lowers: list[Path]) -> None:
    for d in ("merged", "opaque"):
        for lower in lowers:
            (lower / d).mkdir()
    write(lowers[0] / "merged/a", b"a")
    write(lowers[1] / "merged/b", b"b")
    (lowers[1] / "lower-only/sub").mkdir(parents=True)
    write(lowers[0] / "opaque/x", b"x")
    os.setxattr(lowers[0] / "opaque", "trusted.overlay.opaque", b"y")
    write(lowers[1] / "opaque/hidden", b"h")


def _dir_attributes(mnt: Path) -> list[object]:
    """stat of a directory after a listing (the kernel then asks GETATTR again), before
    and after a file made in it copies it up, and of a new directory: the kernel's
    fields, times checked against the real directory the twin's own layers hold."""
    base = mnt.parent

    def real(rel: str) -> os.stat_result:
        for layer in ("upper", "l0", "l1"):
            with contextlib.suppress(FileNotFoundError):
                return os.stat(base / layer / rel)
        raise FileNotFoundError(rel)

    out: list[object] = []
    os.makedirs(mnt / "new/sub/deeper")
    for round_ in range(2):
        for rel in ("merged", "lower-only", "opaque", "new/sub", "merged/../lower-only/sub"):
            sts = []
            for _ in range(2):
                os.listdir(mnt / rel)
                sts.append(os.stat(mnt / rel))
            st, top = sts[-1], real(os.path.normpath(rel))
            out.append((
                rel, round_, oct(st.st_mode), st.st_nlink, st.st_uid, st.st_size,
                st.st_mtime_ns == top.st_mtime_ns, st.st_ctime_ns == top.st_ctime_ns,
                sts[0].st_ino == st.st_ino == os.lstat(mnt / rel).st_ino,
            ))  # fmt: skip
            with _fd(mnt / rel, os.O_RDONLY | os.O_DIRECTORY) as fd:
                write(mnt / rel / f"made-{round_}", b"new")  # a copy-up the first time
                after, top = os.fstat(fd), real(os.path.normpath(rel))  # no lookup between
                out.append((after.st_nlink, after.st_mtime_ns == top.st_mtime_ns))
    with _fd(mnt / "new/sub", os.O_RDONLY | os.O_DIRECTORY) as fd:  # an ancestor renamed
        os.listdir(mnt / "new/sub")
        os.stat(mnt / "new/sub")
        os.rename(mnt / "new", mnt / "moved")
        os.listdir(mnt / "moved/sub")
        st, after, top = os.stat(mnt / "moved/sub"), os.fstat(fd), real("moved/sub")
        out.append((st.st_nlink, st.st_mtime_ns == top.st_mtime_ns, after.st_ino == st.st_ino))
    return out


def test_directory_attributes_answered_in_c_are_the_kernel_overlays(tmp_path: Path) -> None:
    u, k = twins(tmp_path, _fill_dirs, n_lowers=2)
    results = {}
    for twin in (u, k):
        with twin.mount() as mnt:
            results[twin.kind] = _dir_attributes(mnt)
    assert results["unionfs"] == results["kernel"]


@pytest.mark.parametrize("how", ["plain", "debug"])
def test_getattr_of_directories_listed_before_is_answered_in_c(
    stack: Stack, mounted: Mounted, tmp_path: Path, how: str
) -> None:
    """A walk's second pass asks GETATTR of every directory (listing one may move its
    atime); the hook answers those of directories whose attributes the daemon gave."""
    for i in range(20):
        (stack.lowers[i % 2] / f"d{i}").mkdir()
        write(stack.lowers[i % 2] / f"d{i}/f", b"x")
    um = mounted(**watched(how, tmp_path))
    for _ in range(2):
        for i in range(20):
            os.listdir(stack.mnt / f"d{i}")
            assert os.stat(stack.mnt / f"d{i}").st_nlink == 2
    assert um.unmount() == 0
    _answered_in_c(um.log(), how, getattrs=15)


def test_a_cold_read_of_a_file_opened_in_c_is_exact(stack: Stack, mounted: Mounted) -> None:
    """The READ that needs the disk goes to the daemon, which takes the handle over."""
    data = os.urandom(4 << 20)
    write(stack.lowers[1] / "big", data)
    mounted()
    _arm(stack.mnt / "big")
    with open(stack.mnt / "big", "rb", buffering=0) as f:
        _evict(stack.lowers[1] / "big")
        assert f.read() == data


def _fill_upper(lowers: list[Path]) -> None:
    write(lowers[0] / "lower", b"lower file")
    os.chmod(lowers[0] / "lower", 0o644)
    (lowers[1] / "merged").mkdir()
    write(lowers[1] / "merged/m", b"m")
    write(lowers[0] / "suid", b"s")
    os.chmod(lowers[0] / "suid", 0o6755)
    write(lowers[1] / "merged/unseen", b"u")
    (lowers[0] / "opaque").mkdir()
    write(lowers[0] / "opaque/hidden", b"h")


def _upper_attributes(mnt: Path) -> list[object]:
    """chmod, chown and utimes of files and directories in the upper layer, the way an
    untar sets them (and the hook may answer), next to the cases it must leave to the
    daemon: a lower file (a copy-up), setuid bits a chown drops, a file unlinked or
    renamed while open, a chown by an ordinary user, a truncate. The lower layers are
    checked untouched."""
    base = mnt.parent

    def seen(rel: str, st: os.stat_result | None = None) -> tuple[object, ...]:
        st = st if st is not None else os.lstat(mnt / rel)
        top = os.lstat(base / "upper" / rel)
        return (rel, oct(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_nlink,
                st.st_atime_ns == top.st_atime_ns, st.st_mtime_ns == top.st_mtime_ns,
                st.st_ctime_ns == top.st_ctime_ns)  # fmt: skip

    out: list[object] = []
    lowers = _lower_states(base)
    os.makedirs(mnt / "new/dir")
    for i in range(3):  # the first round may go to the daemon, the next ones not
        rel = f"new/dir/f{i}"
        with _fd(mnt / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL) as fd:
            os.write(fd, b"data")
            os.fchown(fd, 1000 + i, 2000 + i)
            os.fchmod(fd, 0o640 | (0o4000 if i == 2 else 0))
            os.utime(fd, ns=(1_000_000_007 * i, 2_000_000_011 * i))
        os.utime(mnt / rel, ns=(5, 6))
        os.chmod(mnt / rel, 0o604)
        os.chown(mnt / rel, -1, 3000)
        os.utime(mnt / rel)  # now
        out.append(seen(rel))
        out.append(seen("new/dir"))
    os.utime(mnt / "new/dir", ns=(7, 8))  # directories, in the upper and merged
    os.chmod(mnt / "new/dir", 0o751)
    os.chown(mnt / "new", 10, 20)
    write(mnt / "merged/n", b"n")  # copies merged up
    os.chmod(mnt / "merged", 0o701)
    os.utime(mnt / "merged", ns=(9, 10))
    out += [seen("new/dir"), seen("new"), seen("merged")]
    for rel in ("merged/unseen", "merged/none", "new/dir/none", "new/none"):
        out.append((rel, os.path.lexists(mnt / rel)))  # names never looked up before
    shutil.rmtree(mnt / "opaque")
    os.mkdir(mnt / "opaque")  # over a whiteout: opaque
    os.stat(mnt / "opaque")
    out.append(os.path.lexists(mnt / "opaque/hidden"))
    _arm(mnt / "lower")  # armed for opens in the lower layer, not for SETATTR
    os.chmod(mnt / "lower", 0o600)  # a copy-up first: the lower file stays
    os.chmod(mnt / "lower", 0o640)
    out.append(seen("lower"))
    for mode in (0o6755, 0o2755, 0o2745):  # what a chown by root drops
        os.chmod(mnt / "suid", mode)
        os.chown(mnt / "suid", 5, 5)
        out.append(seen("suid"))
    with _fd(mnt / "new/dir/f0") as fd:  # unlinked while open: the open file
        os.unlink(mnt / "new/dir/f0")
        os.fchmod(fd, 0o611)
        os.utime(fd, ns=(11, 12))
        st = os.fstat(fd)
        out.append((oct(st.st_mode), st.st_nlink, st.st_atime_ns, st.st_mtime_ns))
    with _fd(mnt / "new/dir/f1") as fd:  # renamed while open
        os.rename(mnt / "new/dir/f1", mnt / "new/f1")
        os.fchmod(fd, 0o612)
        os.chmod(mnt / "new/f1", 0o613)
        out.append((oct(os.fstat(fd).st_mode), seen("new/f1")))
    os.chown(mnt / "new/dir/f2", 1000, 0)
    os.chmod(mnt / "new/dir/f2", 0o2745)  # setgid, of a group the owner is not in
    p = mnt.parent
    while p != p.parent:  # pytest makes its directories 0700
        os.chmod(p, stat.S_IMODE(os.stat(p).st_mode) | 0o111)
        p = p.parent
    as_user = subprocess.run(  # an ordinary user: its own file, its group, another
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", sys.executable, "-c",
         "import os, sys\n"
         "for g in (1000, 0):\n"
         "    try: os.chown(sys.argv[1], -1, g); print(oct(os.stat(sys.argv[1]).st_mode))\n"
         "    except OSError as e: print(e.errno)\n"
         "os.chmod(sys.argv[1], 0o2711); print('chmod')\n",
         os.fspath(mnt / "new/dir/f2")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    out += [as_user.stdout, seen("new/dir/f2")]
    os.truncate(mnt / "new/dir/f2", 2)
    out.append(seen("new/dir/f2"))
    out.append(lowers == _lower_states(base))
    return out


def _lower_states(base: Path) -> list[tuple[int, ...]]:
    return [
        (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns)
        for st in (os.lstat(base / p) for p in ("l0/lower", "l0/suid", "l1/merged"))
    ]


def _as_on_the_kernel(
    tmp_path: Path,
    fill: Callable[[list[Path]], None],
    scenario: Callable[[Path], list[object]],
    n_lowers: int = 1,
    **start: Any,
) -> str:
    """*scenario* on the kernel overlay, then on unionfs (started with *start*) over the
    same layers (*fill*): both must see the same. Returns unionfs's log."""
    u, k = twins(tmp_path, fill, n_lowers=n_lowers)
    with k.mount() as mnt:
        expected = scenario(mnt)
    um = start_unionfs(u.lowers, u.mnt, u.upper, u.work, **start)
    try:
        assert scenario(u.mnt) == expected
    finally:
        assert um.unmount() == 0
    return um.log()


def test_attributes_set_in_the_upper_layer_are_the_kernel_overlays(tmp_path: Path) -> None:
    """The kernel overlay as the oracle; and with the hook, the C answers were part of it."""
    log = _as_on_the_kernel(tmp_path, _fill_upper, _upper_attributes, n_lowers=2)
    setattrs, misses = _in_c(log, "setattrs"), _in_c(log, "lookups")
    if hook_enabled():
        assert setattrs is not None and setattrs >= 10, setattrs
        assert misses is not None and misses >= 3, misses


def _fill_for_creates(lowers: list[Path]) -> None:
    (lowers[0] / "merged").mkdir()
    (lowers[0] / "hiding").mkdir()
    write(lowers[0] / "merged/m", b"m")
    write(lowers[0] / "hiding/x", b"lower x")  # hidden below an opaque upper directory,
    upper = lowers[0].parent / "upper"  # which holds a whiteout of it too
    (upper / "hiding").mkdir()
    os.setxattr(upper / "hiding", "trusted.overlay.opaque", b"y")
    os.mknod(upper / "hiding/x", stat.S_IFCHR, 0)


def _new_files(mnt: Path) -> list[object]:
    """Files created in directories only in the upper layer (the hook may answer those
    CREATEs) next to the cases it must leave to the daemon: a setgid directory, a
    setuid mode, a name there as a whiteout, a name too long; and, in a merged
    directory and the root, creates that are the daemon's anyway. Owners, modes less
    the umask, data, and the upper file's own inode number as st_ino, also when a
    number freed by an unlink comes back."""
    upper = mnt.parent / "upper"

    def seen(rel: str) -> tuple[object, ...]:
        st = os.lstat(mnt / rel)
        return (rel, oct(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_nlink,
                st.st_ino == os.lstat(upper / rel).st_ino)  # fmt: skip

    def create(rel: str, mode: int = 0o666, flags: int = os.O_WRONLY) -> object:
        try:
            fd = os.open(mnt / rel, flags | os.O_CREAT | os.O_EXCL, mode)
        except OSError as e:
            return (rel, errno.errorcode.get(e.errno or 0))
        try:
            os.write(fd, rel.encode())
            if flags & os.O_ACCMODE == os.O_RDWR:  # read back through the same handle
                return (os.pread(fd, 100, 0), seen(rel))
        finally:
            os.close(fd)
        return seen(rel)

    out: list[object] = []
    os.makedirs(mnt / "new/sub")
    old = os.umask(0)
    try:
        for i, umask in enumerate((0o022, 0o077, 0o002, 0)):
            os.umask(umask)
            out.append(create(f"new/f{i}"))
            out.append(create(f"new/sub/r{i}", 0o640, os.O_RDWR))
    finally:
        os.umask(old)
    out.append(create("new/f0"))  # there already
    out.append(create("new/" + "n" * 256))
    out.append(create("new/suid", 0o4755))
    out.append(create("new/sticky", 0o1777))
    os.mkdir(mnt / "new/sgid")
    os.chown(mnt / "new/sgid", 0, 1234)
    os.chmod(mnt / "new/sgid", 0o2775)
    out.append(create("new/sgid/f"))
    out.append(create("hiding/x"))  # over the whiteout the opaque directory holds
    out.append((seen("hiding/x"), (mnt / "hiding/x").read_bytes()))
    out.append(create("merged/n"))  # a merged directory, and the root
    out.append(create("top"))
    os.mkdir(mnt / "new/reuse")  # numbers freed by an unlink, taken by the next file
    for i in range(20):
        out.append(create(f"new/reuse/f{i}"))
        if i % 3 == 0:
            with _fd(mnt / f"new/reuse/f{i}") as fd:  # still open: its number stays taken
                os.unlink(mnt / f"new/reuse/f{i}")
                out.append(create(f"new/reuse/g{i}"))
                out.append((os.read(fd, 100), os.fstat(fd).st_nlink))
        else:
            os.unlink(mnt / f"new/reuse/f{i}")
    out.append(sorted(os.listdir(mnt / "new/reuse")))
    os.chmod(mnt / "new", 0o777)
    p = mnt.parent
    while p != p.parent:  # pytest makes its directories 0700
        os.chmod(p, stat.S_IMODE(os.stat(p).st_mode) | 0o111)
        p = p.parent
    as_user = subprocess.run(  # an ordinary user, with its own umask
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", sys.executable, "-c",
         "import os, sys\n"
         "os.umask(0o027)\n"
         "os.close(os.open(sys.argv[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))\n",
         os.fspath(mnt / "new/mine")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    out += [as_user.stdout, seen("new/mine")]
    return out


@pytest.mark.parametrize("how", ["plain", "traced", "python"])
def test_creates_in_a_directory_only_in_the_upper_layer_are_the_kernel_overlays(
    tmp_path: Path, how: str
) -> None:
    """The kernel overlay as the oracle; with the hook (and nobody watching the
    requests), the C answers were part of it, and every one the daemon declined or
    could not take is made its own way. UNIONFS_PYTHON_CREATES=1 leaves them all to
    the daemon's Python side."""
    start = {"env": {PYTHON_CREATES_ENV: "1"}} if how == "python" else watched(how, tmp_path)
    log = _as_on_the_kernel(tmp_path, _fill_for_creates, _new_files, **start)
    # new/f*, new/sub/r*, new/reuse/f* and g*, new/mine: the rest is the daemon's.
    _answered_in_c(log, how, creates=30)


@pytest.mark.parametrize("how", ["plain", "debug"])
def test_an_untars_setattrs_and_directory_getattrs_are_answered_in_c(
    stack: Stack, mounted: Mounted, tmp_path: Path, how: str
) -> None:
    """tar -x as root looks up each name, creates the file and sets its owner, mode
    and times; the hook answers all but the CREATE: the LOOKUP in a directory only
    in the upper layer, the SETATTRs, and the GETATTRs of the directory."""
    src = tmp_path / "src"
    for i in range(40):
        (src / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        write(src / f"d{i % 4}" / f"f{i}", b"x" * i)
        os.chown(src / f"d{i % 4}" / f"f{i}", i, i)
    subprocess.run(["tar", "-cf", tmp_path / "t.tar", "-C", src, "."], check=True)
    um = mounted(**watched(how, tmp_path))
    subprocess.run(["tar", "-xf", tmp_path / "t.tar", "-C", stack.mnt], check=True)
    for i in range(40):
        st = os.stat(stack.mnt / f"d{i % 4}" / f"f{i}")
        assert (st.st_uid, st.st_size) == (i, i)
    assert um.unmount() == 0
    _answered_in_c(um.log(), how, setattrs=80, getattrs=30, lookups=30)


def test_a_file_the_hook_created_is_one_file_to_every_later_open(
    stack: Stack, mounted: Mounted
) -> None:
    """A file created in a directory only in the upper layer is made by the hook, which
    keeps its handle (csrc/opens.c), passed through where the daemon's are. Another open
    of it goes to the daemon, which must take that handle over first (the kernel fails
    an open passed through with a second backing file: EIO); a rename while one is open
    (a change: the daemon takes every handle) must leave it writing the same file."""
    um = mounted()
    (stack.mnt / "new").mkdir()
    w = os.open(stack.mnt / "new/f", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    os.pwrite(w, b"0123456789", 0)
    r = os.open(stack.mnt / "new/f", os.O_RDONLY)
    assert os.pread(r, 10, 0) == b"0123456789"
    os.pwrite(w, b"ab", 0)
    assert os.pread(r, 10, 0) == b"ab23456789"
    g = os.open(stack.mnt / "new/g", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.rename(stack.mnt / "new/g", stack.mnt / "new/h")
    os.write(g, b"moved")
    a = os.open(stack.mnt / "new/h", os.O_WRONLY | os.O_APPEND)
    os.write(a, b"+")
    for fd in (w, r, g, a):
        os.close(fd)
    assert (stack.upper / "new/f").read_bytes() == b"ab23456789"
    assert (stack.upper / "new/h").read_bytes() == b"moved+"
    assert um.unmount() == 0
    log = um.log()
    assert "Traceback" not in log and "two backing files" not in log, log
    creates = _in_c(log, "creates")
    if hook_enabled():
        assert creates == 2, creates


def _effective_caps(pid: int) -> set[str]:
    """The effective capabilities of each thread of *pid*."""
    caps = set()
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(FileNotFoundError):
            caps |= {line for line in status.read_text().splitlines() if line.startswith("CapEff")}
    return caps


@contextlib.contextmanager
def _strace(pid: int, out: Path, *args: str) -> Iterator[None]:
    """strace every thread of *pid* into *out* (with *args*) while the block runs."""
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-p", str(pid), "-o", str(out), *args])
    try:
        for _ in range(500):
            if _traced_by_strace(pid):
                break
            assert tracer.poll() is None, "strace ended"
            time.sleep(0.01)
        else:
            raise AssertionError("strace did not attach")
        yield
    finally:
        tracer.terminate()
        tracer.wait(timeout=30)


def _traced_by_strace(pid: int) -> bool:
    """Whether every thread of *pid* has a tracer."""
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(FileNotFoundError):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
            if int(fields["TracerPid"]) == 0:
                return False
    return True


def test_after_the_kernel_refuses_a_backing_file_creates_are_made_once(
    tmp_path: Path, stack: Stack, mounted: Mounted
) -> None:
    """When the kernel refuses to register a created file as a backing file (the
    daemon's ioctls fail: strace makes them), the hook undoes that file and the daemon
    makes it again its own way, and every later CREATE goes to the daemon at once:
    asking again would make each file twice (two inodes, two changes of the directory,
    an unlink between them)."""
    um = mounted()
    (stack.mnt / "new").mkdir()
    write(stack.mnt / "new/first", b"made in C")
    out = tmp_path / "strace.out"
    with _strace(um.pid, out, "-e", "trace=ioctl,unlinkat", "-e", "inject=ioctl:error=EPERM"):
        for i in range(5):
            write(stack.mnt / f"new/f{i}", f"file {i}".encode())
    for i in range(5):
        assert (stack.upper / f"new/f{i}").read_text() == f"file {i}"
    undone = [line for line in out.read_text().splitlines() if "unlinkat(" in line]
    assert um.unmount() == 0
    log = um.log()
    assert "Traceback" not in log, log
    creates = _in_c(log, "creates")
    if not hook_enabled():
        assert creates is None
        return
    if passthrough_expected():
        assert creates == 1, creates  # "first"
        assert len(undone) == 1, undone  # f0, made in C first, and undone
    else:  # no backing file to refuse: every one made in C, once
        assert creates == 6, creates
        assert undone == [], undone


@pytest.mark.parametrize("setuid", [True, False], ids=["capable", "without-setuid"])
def test_a_file_created_in_c_is_made_as_its_caller(
    tmp_path: Path, stack: Stack, mounted: Mounted, setuid: bool
) -> None:
    """The hook makes a file under the caller's fsuid and fsgid, as the kernel overlay
    does, not as the daemon and then chowned: a daemon killed in between would leave
    one of its own (root's) in the upper layer. It keeps its capabilities meanwhile:
    here the caller may write in the directory only through a supplementary group,
    which the daemon does not know. Every thread's fsuid is the daemon's again after.
    A daemon that may not take the caller's ids (no CAP_SETUID and CAP_SETGID) makes
    nothing in C: the daemon's Python side builds the file in the workdir."""
    command = None if setuid else ["setpriv", "--bounding-set=-setuid,-setgid", *unionfs_command()]
    um = mounted(command=command)
    (stack.mnt / "g").mkdir()  # only in the upper layer: the hook's creates
    os.chown(stack.mnt / "g", 0, 1001)
    os.chmod(stack.mnt / "g", 0o775)
    let_others_in(stack)
    os.stat(stack.mnt / "g")
    caps = _effective_caps(um.pid)
    out = tmp_path / "strace.out"
    with _strace(um.pid, out, "-e", "trace=setfsuid,setfsgid,openat,fchown,fchownat"):
        made = subprocess.run(
            ["setpriv", "--reuid=1000", "--regid=1000", "--groups=1001", "sh", "-c",
             "umask 022; for i in 0 1 2 3 4; do echo $i > f$i || exit 1; done"],
            cwd=stack.mnt / "g", capture_output=True, text=True, check=False,
        )  # fmt: skip
    assert made.returncode == 0, made.stderr
    for i in range(5):
        st = os.stat(stack.upper / f"g/f{i}")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o644)
    for status in Path(f"/proc/{um.pid}/task").glob("*/status"):
        with contextlib.suppress(FileNotFoundError):  # a worker thread that just ended
            ids = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
            assert ids["Uid"].split()[3] == "0" and ids["Gid"].split()[3] == "0", ids
    assert _effective_caps(um.pid) == caps
    trace = out.read_text().splitlines()
    assert um.unmount() == 0
    creates = _in_c(um.log(), "creates")
    if not hook_enabled():
        assert creates is None
        return
    if not setuid:
        assert creates == 0, (creates, um.log())
        assert not [line for line in trace if re.search(r'openat\(.*"f\d", .*O_CREAT', line)]
        return
    assert creates == 5, (creates, um.log())
    assert not [line for line in trace if "chown" in line], trace
    fsuid: dict[str, str] = {}  # thread -> the fsuid it last set (not asked: -1)
    made_as = []
    for line in trace:
        tid, call = line.split(None, 1)
        found = re.match(r"setfsuid\((\d+)\)", call)
        if found:
            fsuid[tid] = found.group(1)
        elif call.startswith("openat(") and "O_CREAT" in call and '"f' in call:
            made_as.append(fsuid.get(tid))
    assert made_as == ["1000"] * 5, trace


def _fill_one_layer_dirs(lowers: list[Path]) -> None:
    top, bottom = lowers
    for d in (bottom / "only-bottom", top / "only-top", top / "both", bottom / "both"):
        d.mkdir()
    for d in (bottom / "opq", top / "opq"):
        d.mkdir()
    write(bottom / "only-bottom/a", b"a")  # a directory in one lower layer only
    write(top / "only-top/c", b"c")
    write(top / "both/x", b"x")  # merged: a name in the bottom part must be found
    write(bottom / "both/y", b"y")
    write(bottom / "opq/hidden", b"h")  # opaque in the top: one layer's again
    write(top / "opq/shown", b"s")
    os.setxattr(top / "opq", "trusted.overlay.opaque", b"y")
    os.mknod(top / "only-top/gone", stat.S_IFCHR, 0)  # a whiteout of nothing below


def _one_layer_lookups(mnt: Path) -> list[object]:
    """Names looked up in directories that are in one layer only and in a merged one
    (the hook answers those that are missing: in the merged one, from every part); a
    name only the merged directory's lower part has; then a name made through the mount
    in each, which must be found at once."""

    def seen(rel: str) -> object:
        try:
            st = os.lstat(mnt / rel)
        except OSError as e:
            return (rel, errno.errorcode.get(e.errno or 0))
        return (rel, oct(st.st_mode), st.st_size)

    out: list[object] = []
    dirs = ("only-bottom", "only-top", "both", "opq")
    for d in dirs:
        os.stat(mnt / d)  # looked up, its attributes given: armed (no listing: it would
        # give the kernel its names, which it would then not look up)
        for i in range(10):
            out.append(seen(f"{d}/missing{i}"))
    out += [seen(p) for p in ("only-bottom/a", "only-top/c", "only-top/gone", "both/x")]
    out += [seen(p) for p in ("both/y", "opq/hidden", "opq/shown")]
    for d in dirs:
        out.append(seen(f"{d}/new"))  # missing: a negative entry the kernel keeps
        write(mnt / d / "new", d.encode())  # copies the directory up
        out.append(seen(f"{d}/new"))
        out.append(seen(f"{d}/missing0"))
    return out


def test_lookups_of_missing_names_in_a_directory_of_one_layer(tmp_path: Path) -> None:
    """A directory in one lower layer only (or opaque there) answers its missing names
    in C as an upper-only one does, and a merged one when none of its parts has the
    name. The kernel overlay as the oracle; with the hook, at least the 40 misses."""
    log = _as_on_the_kernel(tmp_path, _fill_one_layer_dirs, _one_layer_lookups, n_lowers=2)
    misses = _in_c(log, "lookups")
    if hook_enabled():
        assert misses is not None and misses >= 40, misses


def test_a_lower_file_looked_up_by_name_has_its_first_open_answered_in_c(
    stack: Stack, mounted: Mounted
) -> None:
    """Perl and Python look a module up by name, then open it once: the daemon's answer
    to the LOOKUP arms the file, so that one open is answered in C, the same file and
    data; a copy-up in between disarms it (the open then reads the upper copy)."""
    for i in range(20):
        write(stack.lowers[1] / f"m{i}.pm", b"module %d" % i)
    um = mounted()
    for i in range(20):
        os.stat(stack.mnt / f"m{i}.pm")  # a LOOKUP: the daemon's
        if i == 19:
            with open(stack.mnt / "m19.pm", "r+b") as f:  # copies it up
                f.write(b"changed")
        with open(stack.mnt / f"m{i}.pm", "rb") as f:
            assert f.read() == (b"changed19" if i == 19 else b"module %d" % i)
    assert um.unmount() == 0
    opens = _in_c(um.log(), "opens")
    if hook_enabled():
        assert opens is not None and opens >= 19, opens
