"""``unionfs convert``: the live-mount guard, times kept, changes reported as they are made.

The kernel overlay is the oracle: a layer converted to the kernel format and mounted
by the kernel shows what unionfs shows over the original OCI-format layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import KernelMount, Stack
from tests.mounting import REPO, UnionMount, overlay_mounted, unionfs_command, unionfs_mounted
from tests.unit.conftest import is_whiteout, whiteout, write

USER = 1000  # an ordinary user (setpriv needs no account for it)


def run(*args: str | Path, user: int | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    cmd = [*unionfs_command(), "convert", *[os.fspath(a) for a in args]]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def times(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


def tree(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Every entry below *root*, and *root*, with what a merged view shows of it:
    type, mode, owner, size, device, target, and the mtime of directories too."""
    out: dict[bytes, tuple[object, ...]] = {}
    base = os.fsencode(root)

    def walk(rel: bytes) -> None:
        path = os.path.join(base, rel) if rel else base
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        target = os.readlink(path) if kind == stat.S_IFLNK else None
        size = None if kind == stat.S_IFDIR else st.st_size
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, st.st_rdev,
                    target, st.st_mtime_ns)  # fmt: skip
        if kind == stat.S_IFDIR:
            for name in sorted(os.listdir(path)):
                walk(os.path.join(rel, name) if rel else name)

    walk(b"")
    return out


def overlay(options: str, mnt: Path) -> contextlib.AbstractContextManager[Path]:
    """A kernel overlay mounted with exactly *options*; always unmounted."""
    mnt.mkdir(exist_ok=True)
    return overlay_mounted(options, mnt)


def _refused(directory: Path, message: str) -> None:
    res = run("--to", "kernel", directory)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr == f"unionfs convert: {directory} {message}: unmount it first\n"
    assert res.stdout == ""


# -- the live-mount guard ---------------------------------------------------------------


def test_a_directory_in_or_around_a_live_unionfs_mount_is_refused(
    stack: Stack, mounted: Callable[..., UnionMount]
) -> None:
    """Not only the layers themselves: a directory inside one (or inside the workdir,
    which holds the mount's own whiteouts), or one that holds them."""
    top = stack.lowers[0]
    write(top / "d" / ".wh.x", b"")
    um = mounted()
    live = f"the live mount at {um.mountpoint}"
    _refused(top / "d", f"is inside {top}, a layer of {live}")
    _refused(stack.upper, f"is the upper of {live}")
    _refused(stack.work, f"is the workdir of {live}")
    _refused(stack.work / "work", f"is inside {stack.work}, the workdir of {live}")
    _refused(stack.root, f"holds {stack.lowers[0]}, a layer of {live}")
    assert (top / "d" / ".wh.x").exists()
    assert not is_whiteout(stack.work / "work" / ".wh.#whiteout")
    # A dry run changes nothing: it may look.
    res = run("--to", "kernel", "--dry-run", top / "d")
    assert res.returncode == 0 and (top / "d" / ".wh.x").exists()


def test_a_directory_in_or_around_a_live_kernel_overlay_is_refused(
    tmp_path: Path, kernel: KernelMount
) -> None:
    """The kernel overlay's layers are in its mount options: with the backslash
    escapes of ``lowerdir=`` (a comma, a colon, a space in a name), the data-only
    layers after ``::``, and the ``lowerdir+``/``datadir+`` forms."""
    odd = tmp_path / "sp ace,c:o"
    lower2, upper, data = tmp_path / "l2", tmp_path / "up", tmp_path / "data"
    for d in (odd / "d", lower2, upper, data / "e"):
        d.mkdir(parents=True)
    write(odd / "d" / ".wh.x", b"")
    with kernel([odd, lower2], upper) as mnt:
        live = f"the live kernel overlay mount at {mnt}"
        _refused(odd, f"is a layer of {live}")
        _refused(odd / "d", f"is inside {odd}, a layer of {live}")
        _refused(upper, f"is the upper of {live}")
        _refused(tmp_path / "k-work" / "work", f"is inside {tmp_path / 'k-work'}, the workdir of {live}")  # fmt: skip
        _refused(tmp_path, f"holds {odd}, a layer of {live}")
    assert (odd / "d" / ".wh.x").exists()
    work = tmp_path / "w2"
    work.mkdir()
    with overlay(
        f"lowerdir={lower2}::{data},upperdir={upper},workdir={work}", tmp_path / "m2"
    ) as m:
        _refused(data / "e", f"is inside {data}, a layer of the live kernel overlay mount at {m}")
    work.rename(tmp_path / "w3")
    work = tmp_path / "w3"
    opts = f"lowerdir+={lower2},datadir+={data},upperdir={upper},workdir={work}"
    with overlay(opts, tmp_path / "m3") as m:
        _refused(data, f"is a layer of the live kernel overlay mount at {m}")
        _refused(lower2, f"is a layer of the live kernel overlay mount at {m}")


# -- times -----------------------------------------------------------------------------


def _oci_layer(top: Path, bottom: Path) -> None:
    """An OCI-format layer *top* over *bottom*, every directory with an old mtime."""
    for name in ("gone", "alsogone", "kept"):
        write(bottom / name, name.encode())
    write(bottom / "d" / "hidden", b"h")
    write(bottom / "r" / "old", b"o")
    write(bottom / "s" / "t" / "deep", b"d")
    write(top / ".wh.gone", b"")
    write(top / ".wh.nothing", b"")  # hides nothing below
    write(top / "kept", b"mine")
    write(top / ".wh.kept", b"")  # a name the layer has itself
    write(top / "d" / ".wh..wh..opq", b"")
    write(top / "d" / "new", b"n")
    write(top / "r" / "fresh", b"f")  # merges with the one below
    write(top / "s" / "t" / ".wh.deep", b"")
    write(top / "s" / ".wh.alsogone", b"")
    for i, d in enumerate((top / "s" / "t", top / "s", top / "r", top / "d", top)):
        os.utime(d, (1_500_000_000 + i, 1_577_836_800 + i))


def test_the_converted_layer_shows_the_same_tree_times_included(
    stack: Stack, kernel: KernelMount
) -> None:
    """Converted to the kernel format and mounted by the kernel, the layer shows what
    unionfs shows over the OCI original, directory mtimes included; converted back,
    unionfs shows it again. Each directory keeps its access time too."""
    top, bottom = stack.lowers
    _oci_layer(top, bottom)
    dirs = [top, top / "d", top / "r", top / "s", top / "s" / "t"]
    with unionfs_mounted(stack.lowers, stack.mnt) as um:
        want = tree(um.mountpoint)
    assert b"gone" not in want and want[b"d"][7] == (1_577_836_800 + 3) * 10**9
    before = {d: times(d)[:2] for d in dirs}  # (reading through the mount sets atimes)
    res = run("--to", "kernel", top)
    assert res.returncode == 0, res.stdout + res.stderr
    assert is_whiteout(top / "gone") and not (top / ".wh.gone").exists()
    assert {d: times(d)[:2] for d in dirs} == before
    with kernel([top, bottom]) as mnt:
        assert tree(mnt) == want
    before = {d: times(d)[:2] for d in dirs}
    res = run("--to", "oci", top)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (top / ".wh.gone").exists()
    assert {d: times(d)[:2] for d in dirs} == before
    with unionfs_mounted(stack.lowers, stack.mnt) as um:
        assert tree(um.mountpoint) == want


def test_a_dry_run_changes_nothing_not_even_access_times(tmp_path: Path) -> None:
    """An access time older than the mtime is one that reading the directory would
    update (relatime): a dry run reads without touching it."""
    layer = tmp_path / "layer"
    write(layer / ".wh.a", b"")
    write(layer / "d" / ".wh..wh..opq", b"")
    whiteout(layer / "d" / "b")
    write(layer / "e" / "f", b"x")
    dirs = [layer, layer / "d", layer / "e"]
    for d in dirs:
        os.utime(d, (1_500_000_000, 1_577_836_800))
    before = {d: times(d) for d in dirs}
    for to, lines in (("kernel", 3), ("oci", 2)):
        res = run("--to", to, "--dry-run", layer)
        assert res.returncode == 0, res.stderr
        assert len(res.stdout.splitlines()) == lines
        assert {d: times(d) for d in dirs} == before
    assert (layer / ".wh.a").exists() and is_whiteout(layer / "d" / "b")


# -- what is printed ---------------------------------------------------------------------


def _traversable(path: Path) -> None:
    """Let another user reach *path* (pytest makes its directories 0700)."""
    for p in [path, *path.parents]:
        os.chmod(p, stat.S_IMODE(os.stat(p).st_mode) | 0o111)


def test_a_failure_leaves_the_changes_made_and_says_what_failed(tmp_path: Path) -> None:
    """An ordinary user may make whiteouts (character devices 0/0) but not trusted.*
    xattrs: the run stops at the opaque directory, having listed what it changed, and
    says which path and what step failed, and that --userxattr would do."""
    layer = tmp_path / "layer"
    for rel in (".wh.a", ".wh.b", "d/.wh..wh..opq"):
        write(layer / rel, b"")
    for p in (layer, layer / "d", *layer.rglob(".wh.*")):
        os.chown(p, USER, USER, follow_symlinks=False)
    _traversable(layer)
    res = run("--to", "kernel", layer, user=USER)
    assert res.returncode == 2
    assert res.stdout.splitlines() == [
        f"{layer}/a: whiteout: .wh.a -> character device 0/0",
        f"{layer}/b: whiteout: .wh.b -> character device 0/0",
        "stopped by an error: changed 2 markers to the kernel format; 0 left as they are",
    ]
    assert res.stderr == (
        f"unionfs convert: {layer}/d: cannot set trusted.overlay.opaque: Operation not "
        "permitted (only root, with CAP_SYS_ADMIN, may write trusted.* xattrs; --userxattr "
        "writes user.overlay.* instead, for a stack mounted with userxattr)\n"
    )
    assert is_whiteout(layer / "a") and (layer / "d" / ".wh..wh..opq").exists()
    res = run("--to", "kernel", "--userxattr", "--json", layer, user=USER)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert lines == [
        {
            "path": f"{layer}/d",
            "relpath": "d",
            "action": "opaque: .wh..wh..opq -> user.overlay.opaque",
            "ok": True,
        },  # fmt: skip
        {
            "summary": "changed 1 markers to the kernel format; 0 left as they are",
            "changed": 1,
            "left": 0,
            "complete": True,
        },  # fmt: skip
    ]
    assert os.getxattr(layer / "d", "user.overlay.opaque") == b"y"


def test_ctrl_c_stops_between_entries_and_the_json_log_says_exactly_what_was_done(
    tmp_path: Path,
) -> None:
    """The output pipe is left full, so the run is surely in the middle when Ctrl-C
    comes: every line is still one JSON object, the last one says the run stopped,
    and the changes listed are exactly the ones made."""
    layer = tmp_path / "layer"
    layer.mkdir()
    count = 1_500  # some 300 kB of output: more than a pipe holds (64 kB)
    for i in range(count):
        (layer / f".wh.f{i:05}").touch()
    os.utime(layer, (1_500_000_000, 1_577_836_800))
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    proc = subprocess.Popen(
        [*unionfs_command(), "convert", "--to", "kernel", "--json", os.fspath(layer)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        bufsize=0,  # unbuffered: communicate() reads on from the exact byte readline() stops at
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        time.sleep(0.5)  # it fills the pipe and waits
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    lines = [json.loads(line) for line in (first + rest).splitlines()]
    *changes, summary = lines
    assert summary["complete"] is False and summary["stopped"] == "interrupted"
    assert 0 < summary["changed"] == len(changes) < count
    names = sorted(os.listdir(layer))
    devices = [n for n in names if not n.startswith(".wh.")]
    assert [c["relpath"] for c in changes] == devices
    assert all(is_whiteout(layer / n) for n in devices)
    assert len(names) == count
    assert os.stat(layer).st_mtime_ns == 1_577_836_800 * 10**9


def test_names_are_printed_one_line_each_and_paths_in_full(tmp_path: Path) -> None:
    """A newline, an escape sequence, a byte that is not UTF-8: shown escaped, in the
    text and the JSON output, each with the layer's full path."""
    layer = tmp_path / "layer"
    layer.mkdir()
    broot = os.fsencode(layer)
    for name in (b"a\nb", b"\x1b[31mred", b"\xff"):
        os.close(os.open(broot + b"/.wh." + name, os.O_CREAT | os.O_WRONLY, 0o644))
    res = run("--to", "kernel", "--dry-run", layer)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        f"{layer}/\\x1b[31mred: whiteout: .wh.\\x1b[31mred -> character device 0/0",
        f"{layer}/a\\nb: whiteout: .wh.a\\nb -> character device 0/0",
        f"{layer}/\\xff: whiteout: .wh.\\xff -> character device 0/0",
        "would change 3 markers to the kernel format; 0 left as they are",
    ]
    res = run("--to", "kernel", "--json", layer)
    assert res.returncode == 0, res.stderr
    *changes, _ = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(c["path"], c["relpath"]) for c in changes] == [
        (f"{layer}/\\x1b[31mred", "\\x1b[31mred"),
        (f"{layer}/a\\nb", "a\\nb"),
        (f"{layer}/\\xff", "\\xff"),
    ]
    assert changes[2]["action"] == "whiteout: .wh.\\xff -> character device 0/0"


# -- the root, and mounts inside the layer ------------------------------------------------

_CHROOT = """
import os, shutil, subprocess, sys
from unionfs.inspect import cli, convert  # all it needs, loaded before the chroot (argparse: shutil)
root = sys.argv[1]
subprocess.run(["mount", "-t", "proc", "proc", os.path.join(root, "proc")], check=True)
os.chroot(root)
os.chdir("/")
for to in ("kernel", "oci"):
    print("status", cli.main(["convert", "--to", to, "/"]), flush=True)
"""


def test_the_root_directory_is_converted(tmp_path: Path) -> None:
    """``/`` (here a layer as the root of a chroot, with /proc mounted in it, in a
    mount namespace of its own) is converted like any directory; the /proc mount is
    not descended into."""
    layer = tmp_path / "layer"
    write(layer / ".wh.x", b"")
    write(layer / "d" / ".wh..wh..opq", b"")
    (layer / "proc").mkdir()
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _CHROOT,
         os.fspath(layer)],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=os.fspath(REPO)),
    )  # fmt: skip
    assert res.stderr == ""
    mount_note = "/proc: not converted: a mount point: not descended into (the kernel overlay sees the directory under it); left as is"  # fmt: skip
    assert res.stdout.splitlines() == [
        "/x: whiteout: .wh.x -> character device 0/0",
        "/d: opaque: .wh..wh..opq -> trusted.overlay.opaque",
        mount_note,
        "changed 2 markers to the kernel format; 1 left as they are",
        "status 1",
        "/x: whiteout: character device 0/0 -> .wh.x",
        "/d: opaque: trusted.overlay.opaque -> .wh..wh..opq",
        mount_note,
        "changed 2 markers to the oci format; 1 left as they are",
        "status 1",
    ]
    assert (layer / ".wh.x").exists() and not (layer / "x").exists()


def test_a_mount_inside_the_layer_is_left_alone(tmp_path: Path, kernel: KernelMount) -> None:
    """The kernel overlay does not see a mount inside a layer (it sees the directory
    under it), so convert does not go into one either: it says so (exit status 1)."""
    layer, other, bottom = tmp_path / "layer", tmp_path / "other", tmp_path / "bottom"
    write(layer / "m" / "under", b"u")
    write(other / ".wh.y", b"")
    write(layer / ".wh.x", b"")
    bottom.mkdir()
    subprocess.run(["mount", "--bind", other, layer / "m"], check=True)
    try:
        res = run("--to", "kernel", layer)
        with kernel([layer, bottom]) as mnt:
            seen = sorted(os.listdir(mnt / "m"))
    finally:
        subprocess.run(["umount", layer / "m"], check=True)
    assert res.returncode == 1, res.stderr
    assert (
        res.stdout.splitlines()
        == [
            f"{layer}/x: whiteout: .wh.x -> character device 0/0",
            f"{layer}/m: not converted: a mount point: not descended into (the kernel overlay sees the directory under it); left as is",  # fmt: skip
            "changed 1 markers to the kernel format; 1 left as they are",
        ]
    )
    assert seen == ["under"]
    assert (other / ".wh.y").exists()


def test_a_reader_that_goes_away_ends_the_listing_not_the_conversion(tmp_path: Path) -> None:
    """``unionfs convert ... | head -1``: the changes are listed as they are made, and
    when the reader is gone the conversion still finishes (exit status 0)."""
    layer = tmp_path / "layer"
    layer.mkdir()
    count = 1_500  # more output than a pipe holds
    for i in range(count):
        (layer / f".wh.f{i:05}").touch()
    proc = subprocess.Popen(
        [*unionfs_command(), "convert", "--to", "kernel", os.fspath(layer)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=os.fspath(REPO)),
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert first == f"{layer}/f00000: whiteout: .wh.f00000 -> character device 0/0\n".encode()
    assert proc.returncode == 0, err
    assert sorted(os.listdir(layer)) == [f"f{i:05}" for i in range(count)]
