"""FUSE passthrough (``-o passthrough=auto|on|off``) and KILLPRIV_V2, on real mounts.

Whether the daemon served a read or write is read from its ``-d`` request log:
with passthrough the kernel reads and writes the backing file itself and the
daemon sees no READ or WRITE. With libfuse 3.17 (``make install``) these tests
demand passthrough; with the system's libfuse 3.14 (``LIBFUSE=system``) they
demand the fallback: everything served by the daemon, ``passthrough=on``
refused with one line (see ``tests/features.py``). A build that fell back when
3.17 was asked for fails here.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Mounted, Stack
from tests.features import hook_enabled, libfuse317_expected, libfuse317_installed, libfuse_wanted
from tests.mounting import UnionMount, kernel_overlay, start_unionfs, unionfs_command
from tests.test_merge import write

EXPECTED = libfuse317_expected()


def _requests(um: UnionMount, name: str) -> int:
    return len(re.findall(rf"DEBUG: {name}\(", um.log()))


def test_the_install_has_the_libfuse_it_asked_for() -> None:
    info_path = Path(sys.prefix) / "libfuse.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if libfuse_wanted() == "3.17":
            assert info["libfuse"].startswith("3.1") and info["libfuse"] >= "3.17", (
                f"libfuse 3.17 was asked for, the install fell back: {info}"
            )


def test_the_hook_and_pyfuse3_link_one_libfuse() -> None:
    from unionfs.fuse import hook

    assert hook._libfuse_mismatch() == ""
    wanted = "libfuse3.so.4" if libfuse317_installed() else "libfuse3.so.3"
    assert hook._libfuse_soname(pyfuse3_path()) == wanted


def pyfuse3_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("pyfuse3")
    assert spec is not None and spec.origin is not None
    return spec.origin


def test_upper_files_are_read_and_written_by_the_kernel(stack: Stack, mounted: Mounted) -> None:
    um = mounted(args=["-d"])
    data = os.urandom(1 << 20)
    with open(stack.mnt / "new", "wb") as f:
        for i in range(0, len(data), 4096):
            f.write(data[i : i + 4096])
    assert (stack.mnt / "new").read_bytes() == data
    assert (stack.upper / "new").read_bytes() == data
    writes, reads = _requests(um, "write"), _requests(um, "read")
    if EXPECTED:
        assert "killpriv_v2 on, passthrough on" in um.log()
        assert (writes, reads) == (0, 0)
    else:
        assert writes >= 1 and reads >= 1


def test_a_lower_file_open_read_only_follows_a_copy_up(stack: Stack, mounted: Mounted) -> None:
    """The kernel overlay's rule, kept by default: served by the daemon, the reader
    sees the upper copy's new data; once it is closed, opens pass through."""
    write(stack.lowers[1] / "f", b"lower")
    um = mounted(args=["-d"], extra_options="passthrough=auto")
    with open(stack.mnt / "f", "rb", buffering=0) as reader:
        assert reader.read() == b"lower"
        with open(stack.mnt / "f", "ab") as w:  # copy-up, and an open that must not fail
            w.write(b"+upper")
        assert os.pread(reader.fileno(), 100, 0) == b"lower+upper"
    served = _requests(um, "read")
    assert served >= 2
    assert (stack.mnt / "f").read_bytes() == b"lower+upper"
    if EXPECTED:
        assert _requests(um, "read") == served


def test_a_read_only_mount_passes_lower_files_through(stack: Stack, mounted: Mounted) -> None:
    write(stack.lowers[1] / "f", b"x" * 100_000)
    um = mounted(readonly=True, args=["-d"])
    assert (stack.mnt / "f").read_bytes() == b"x" * 100_000
    assert _requests(um, "read") == (0 if EXPECTED else 1)


def _capability_probes(um: UnionMount, path: Path, times: int) -> int:
    """Ask *times* for *path*'s security.capability (there is none: ENODATA each
    time); how many of the questions reached the Python side (its -d log)."""
    for _ in range(times):
        with pytest.raises(OSError) as e:
            os.getxattr(path, "security.capability")
        assert e.value.errno == errno.ENODATA
    return len(re.findall(r"DEBUG: getxattr\(\d+, b'security.capability'", um.log()))


def test_a_capability_found_absent_is_seen_once_set(stack: Stack, mounted: Mounted) -> None:
    """The daemon (and the C hook, csrc/caps.c) remember that a file has no
    security.capability, so the kernel's many questions cost one answer from the file;
    a capability set through the mount is seen at once."""
    from tests.test_safety import CAPABILITY

    write(stack.lowers[1] / "prog", b"#!/bin/sh\n")
    um = mounted(args=["-d"])
    asked = _capability_probes(um, stack.mnt / "prog", times=3)
    assert asked == (1 if hook_enabled() else 3)
    os.setxattr(stack.mnt / "prog", "security.capability", CAPABILITY)
    assert os.getxattr(stack.mnt / "prog", "security.capability") == CAPABILITY
    os.rename(stack.mnt / "prog", stack.mnt / "moved")
    assert os.getxattr(stack.mnt / "moved", "security.capability") == CAPABILITY


def test_a_file_created_through_the_mount_is_known_to_have_no_capability(
    stack: Stack, mounted: Mounted
) -> None:
    """A new file has no security.capability: no question about it reaches the Python
    side with the C hook (untar: one probe per file for chown, one for its first write),
    and a capability set afterwards is seen at once."""
    from tests.test_safety import CAPABILITY

    um = mounted(args=["-d"])
    fd = os.open(stack.mnt / "new", os.O_CREAT | os.O_WRONLY, 0o755)
    os.close(fd)
    asked = _capability_probes(um, stack.mnt / "new", times=3)
    assert asked == (0 if hook_enabled() else 3)
    os.setxattr(stack.mnt / "new", "security.capability", CAPABILITY)
    assert os.getxattr(stack.mnt / "new", "security.capability") == CAPABILITY


def test_passthrough_off_serves_everything(stack: Stack, mounted: Mounted) -> None:
    um = mounted(extra_options="passthrough=off", args=["-d"])
    (stack.mnt / "new").write_bytes(b"data")
    assert (stack.mnt / "new").read_bytes() == b"data"
    assert _requests(um, "write") == 1 and _requests(um, "read") == 1


def test_writes_need_no_capability_probe_under_killpriv_v2(stack: Stack, mounted: Mounted) -> None:
    """Without KILLPRIV_V2 the kernel asks for security.capability before every write."""
    um = mounted(extra_options="passthrough=off", args=["-d"])
    fd = os.open(stack.mnt / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for i in range(50):
            os.pwrite(fd, b"y" * 4096, i * 8192)
    finally:
        os.close(fd)
    assert _requests(um, "write") == 50
    # Counted as received (some are answered in C, unseen by the request log: csrc/caps.c).
    um.unmount()
    log = um.log()
    found = re.search(r"requests: (.*)", log)
    if found is not None:
        probes = int(dict(kv.split("=") for kv in found.group(1).split()).get("getxattr", 0))
    else:  # no C hook: every request reaches the Python side and its -d log
        assert not hook_enabled(), log[-2000:]
        probes = len(re.findall(r"DEBUG: getxattr\(\d+, b'security.capability'", log))
    if EXPECTED:
        assert probes <= 1  # once per file, not per write
    else:
        assert probes >= 50


@pytest.mark.skipif(not EXPECTED, reason="needs passthrough (libfuse 3.17)")
def test_passthrough_on_a_lower_file_truncates_once_its_reader_has_closed(
    stack: Stack, mounted: Mounted
) -> None:
    """The reader's RELEASE is answered in C and queued; the truncate's SETATTR takes
    the queue in before it asks whether a reader still holds the lower file."""
    for i in range(5):
        write(stack.lowers[1] / f"f{i}", b"lower")
    mounted(extra_options="passthrough=on")
    for i in range(5):
        with open(stack.mnt / f"f{i}", "rb") as reader:
            assert reader.read() == b"lower"
        os.truncate(stack.mnt / f"f{i}", 2)
        assert (stack.mnt / f"f{i}").read_bytes() == b"lo"


@pytest.mark.skipif(not EXPECTED, reason="needs passthrough (libfuse 3.17)")
def test_passthrough_on_passes_lower_files_through_and_refuses_their_writes_meanwhile(
    stack: Stack, mounted: Mounted
) -> None:
    write(stack.lowers[1] / "f", b"lower")
    um = mounted(extra_options="passthrough=on", args=["-d"])
    with open(stack.mnt / "f", "rb", buffering=0) as reader:
        assert reader.read() == b"lower"
        for attempt in (
            lambda: open(stack.mnt / "f", "ab"),
            lambda: os.truncate(stack.mnt / "f", 1),
        ):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.ETXTBSY
        os.chmod(stack.mnt / "f", 0o600)  # a copy-up, which changes no data
        assert os.pread(reader.fileno(), 100, 0) == b"lower"
    assert _requests(um, "read") == 0
    with open(stack.mnt / "f", "ab") as w:  # once the reader is closed
        w.write(b"+upper")
    assert (stack.upper / "f").read_bytes() == b"lower+upper"
    assert (stack.lowers[1] / "f").read_bytes() == b"lower"


def test_opens_of_one_file_in_every_order_all_succeed(stack: Stack, mounted: Mounted) -> None:
    """The kernel fails an open whose kind (passthrough or not, which backing file)
    conflicts with the inode's other open files; every order here must work."""
    write(stack.lowers[1] / "f", b"0123456789")
    mounted(extra_options="passthrough=auto")
    m = stack.mnt / "f"
    r1 = os.open(m, os.O_RDONLY)  # a lower file read-only: through the daemon
    w1 = os.open(m, os.O_WRONLY)  # copy-up; must join r1's kind
    r2 = os.open(m, os.O_RDONLY)
    os.pwrite(w1, b"ab", 0)
    assert os.pread(r1, 10, 0) == os.pread(r2, 10, 0) == b"ab23456789"
    for fd in (r1, w1, r2):
        os.close(fd)
    w2 = os.open(m, os.O_RDWR)  # upper, nothing open: passed through
    r3 = os.open(m, os.O_RDONLY)  # joins w2's backing file
    os.pwrite(w2, b"cd", 2)
    assert os.pread(r3, 10, 0) == b"abcd456789"
    os.close(w2)
    os.close(r3)
    assert (stack.upper / "f").read_bytes() == b"abcd456789"


def test_hard_links_share_one_backing_file(stack: Stack, mounted: Mounted) -> None:
    mounted()
    (stack.mnt / "a").write_bytes(b"0000")
    os.link(stack.mnt / "a", stack.mnt / "b")
    with open(stack.mnt / "a", "r+b", buffering=0) as a, open(stack.mnt / "b", "rb") as b:
        a.write(b"11")
        assert b.read() == b"1100"


def test_shared_mappings_and_reads_agree(stack: Stack, mounted: Mounted) -> None:
    mounted()
    (stack.mnt / "m").write_bytes(b"\0" * 8192)
    with open(stack.mnt / "m", "r+b") as f:
        mm = mmap.mmap(f.fileno(), 8192)
        mm[4096:4101] = b"hello"
        mm.flush()
        with open(stack.mnt / "m", "rb") as g:
            assert g.read()[4096:4101] == b"hello"
        mm.close()
    assert (stack.upper / "m").read_bytes()[4096:4101] == b"hello"


def test_data_written_through_passthrough_is_never_shown_stale(
    stack: Stack, mounted: Mounted
) -> None:
    """Pages an earlier open through the daemon cached are dropped when the file was
    written through passthrough since."""
    write(stack.lowers[1] / "f", b"A" * 8192)
    mounted(extra_options="passthrough=auto")
    m = stack.mnt / "f"
    r1 = os.open(m, os.O_RDONLY)  # lower: through the daemon and the page cache
    assert os.pread(r1, 8192, 0) == b"A" * 8192
    w1 = os.open(m, os.O_WRONLY)  # copy-up, served like r1
    os.close(w1)
    os.close(r1)
    with open(m, "r+b") as w:  # passed through now
        w.write(b"B" * 8192)
    r2 = os.open(m, os.O_RDONLY)
    try:
        assert os.pread(r2, 8192, 0) == b"B" * 8192
    finally:
        os.close(r2)


def _usage_error(tmp_path: Path, options: str) -> subprocess.CompletedProcess[str]:
    for n in ("l", "u", "w", "m"):
        (tmp_path / n).mkdir(exist_ok=True)
    return subprocess.run(
        [
            *unionfs_command(),
            "-o",
            f"lowerdir={tmp_path / 'l'},upperdir={tmp_path / 'u'},workdir={tmp_path / 'w'},"
            + options,
            os.fspath(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ("passthrough=sometimes", "passthrough: expected auto, on or off"),
        ("passthrough=on,writeback=1", "passthrough=on: not possible with writeback=1"),
    ],
)
def test_bad_passthrough_options_are_refused(tmp_path: Path, options: str, message: str) -> None:
    r = _usage_error(tmp_path, options)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_passthrough_on_is_refused_where_it_cannot_be_had(tmp_path: Path) -> None:
    r = _usage_error(tmp_path, "passthrough=on")
    if EXPECTED:
        assert r.returncode == 0, r.stderr
        subprocess.run(["fusermount3", "-u", os.fspath(tmp_path / "m")], check=True)
    else:
        assert r.returncode == 1
        assert "passthrough=on: FUSE passthrough is not available" in r.stderr, r.stderr


@pytest.mark.skipif(not EXPECTED, reason="needs passthrough (libfuse 3.17)")
def test_a_layer_on_an_overlay_keeps_the_mount_stackable_unless_on(
    stack: Stack, tmp_path: Path
) -> None:
    """A backing file on an overlay needs one more stacking level, after which nothing
    could stack over this mount: auto leaves passthrough off there, on takes it."""
    base = tmp_path / "base"
    for n in ("lower", "upper", "work", "mnt"):
        (base / n).mkdir(parents=True)
    with kernel_overlay([base / "lower"], base / "mnt", base / "upper", base / "work") as ovl:
        write(ovl / "f", b"on an overlay")
        for mode, served in (("auto", True), ("on", False)):
            um = start_unionfs(
                [ovl], stack.mnt, stack.upper, stack.work,
                extra_options=f"passthrough={mode}", args=["-d"],
            )  # fmt: skip
            try:
                assert (stack.mnt / "f").read_bytes() == b"on an overlay"
                (stack.mnt / mode).write_bytes(b"x" * 10000)
                assert (stack.mnt / mode).read_bytes() == b"x" * 10000
                assert (_requests(um, "write") > 0) == served
                assert (_requests(um, "read") > 0) == served
            finally:
                um.unmount()
            said = "passthrough off" if mode == "auto" else "nothing can stack over this mount"
            assert "is on a stacked filesystem" in um.log() and said in um.log()


def test_extents_and_fallocate_reach_a_passed_through_file(stack: Stack, mounted: Mounted) -> None:
    """lseek(SEEK_DATA/SEEK_HOLE) and fallocate of a file the kernel reads by itself still
    reach the real file (csrc/ops.c finds it by the handle's low half, under the backing id)."""
    um = mounted(args=["-d"])
    path = stack.mnt / "sparse"
    with open(path, "wb") as f:
        f.seek(1 << 20)
        f.write(b"x" * 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.read(fd, 1) == b"\0"
        if not hook_enabled():  # the documented fallback: data everywhere, no fallocate
            assert os.lseek(fd, 0, os.SEEK_DATA) == 0
            assert os.lseek(fd, 0, os.SEEK_HOLE) == (1 << 20) + 4096
            return
        assert os.lseek(fd, 0, os.SEEK_DATA) == 1 << 20
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        os.posix_fallocate(fd, 0, 4096)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
    finally:
        os.close(fd)
    with open(stack.upper / "sparse", "rb") as real:
        assert os.lseek(real.fileno(), 0, os.SEEK_DATA) == 0
    if EXPECTED:
        assert _requests(um, "read") == 0  # the kernel read it: passed through
