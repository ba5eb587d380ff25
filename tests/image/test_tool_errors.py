"""The image tools where things go wrong: every refusal is one line on stderr (never a
traceback), nothing is replaced that is not a regular file, a failure leaves
nothing this run made, and edge cases (an image without layers, a kernel upper
with redirects, a live mount) are handled the one documented way."""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import os
import pty
import shlex
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.image.builders import Layer, Tar, write_oci_archive, write_oci_layout
from tests.image.test_diff import naive_diff
from tests.image.test_layout import run
from tests.image.test_unpack import unpack
from tests.mounting import REPO, mount_type, overlay_options, unionfs_command, unionfs_mounted
from unionfs.image import writer
from unionfs.image.diff import changes


def one_line(res: subprocess.CompletedProcess[str], *wanted: str) -> str:
    """The single error line of a failed command, checked to hold each of *wanted*."""
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert res.stderr.startswith("unionfs: ") and res.stderr.count("\n") == 1, res.stderr
    for text in wanted:
        assert text in res.stderr, res.stderr
    return res.stderr


def make_rootfs(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin/sh").write_bytes(b"#!shell\n")
    (root / "greeting").write_text("hello\n")
    return root


def identity(path: Path) -> tuple[int, int, int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino, st.st_mode, st.st_size


def layer_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getnames()


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.fspath(REPO))


@contextlib.contextmanager
def kernel_mounted(
    lowers: Sequence[Path], mnt: Path, upper: Path | None, work: Path | None, extra: str = ""
) -> Iterator[Path]:
    """The kernel overlay with extra options (redirect_dir=on...), always unmounted."""
    opts = overlay_options(lowers, upper, work) + (f",{extra}" if extra else "")
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", mnt], check=False).returncode != 0:
            subprocess.run(["umount", "-l", mnt], check=False)


# -- commit -o: only a regular file is ever replaced ---------------------------------


def test_commit_refuses_to_replace_what_is_not_a_regular_file(tmp_path: Path) -> None:
    """A directory, a device, a fifo, a socket, a symlink to a device or to nothing:
    each refused in one line and left exactly as it was (``-o /dev/null`` once
    made /dev/null a plain file; a directory gave a traceback)."""
    rootfs = make_rootfs(tmp_path / "rootfs")
    out = tmp_path / "out"
    out.mkdir()
    (out / "dir").mkdir()
    (out / "dir/keep").write_text("k")
    os.mknod(out / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(out / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fspath(out / "sock"))
    (out / "to-null").symlink_to("null")
    (out / "dangling").symlink_to("nothing-here")
    cases = {
        "dir": "a directory, not a regular file",
        "null": "a character device, not a regular file",
        "fifo": "a fifo, not a regular file",
        "sock": "a socket, not a regular file",
        "to-null": "a symlink to a character device",
        "dangling": "a symlink to nothing",
    }
    try:
        before = {name: identity(out / name) for name in os.listdir(out)}
        for name, why in cases.items():
            res = run(
                "commit", os.fspath(rootfs), "-o", os.fspath(out / name), "--compression", "none"
            )
            one_line(res, f"{out / name}: {why}")
        assert {name: identity(out / name) for name in os.listdir(out)} == before  # no temp left
        assert os.readlink(out / "to-null") == "null"
        assert (out / "dir/keep").read_text() == "k"
    finally:
        sock.close()


def test_commit_through_a_symlink_replaces_the_file_it_leads_to(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    (tmp_path / "store").mkdir()
    (tmp_path / "store/real.tar").write_text("old")
    (tmp_path / "link.tar").symlink_to("store/real.tar")
    res = run("commit", os.fspath(rootfs), "-o", os.fspath(tmp_path / "link.tar"))
    assert res.returncode == 0, res.stderr
    assert os.readlink(tmp_path / "link.tar") == "store/real.tar"  # the symlink stays
    assert "greeting" in layer_names((tmp_path / "store/real.tar").read_bytes())


def test_the_temporary_file_is_beside_the_file_it_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    (tmp_path / "store").mkdir()
    (tmp_path / "store/real.tar").write_text("old")
    (tmp_path / "link.tar").symlink_to("store/real.tar")
    dirs: list[str] = []
    mkstemp = tempfile.mkstemp

    def spy(
        suffix: str | None = None, prefix: str | None = None, dir: str | None = None
    ) -> tuple[int, str]:  # noqa: A002 - mkstemp's own name
        dirs.append(os.fspath(dir or ""))
        return mkstemp(suffix, prefix, dir)

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    writer.write_layer(rootfs, tmp_path / "link.tar")
    assert dirs == [os.fspath(tmp_path / "store")]
    assert sorted(os.listdir(tmp_path / "store")) == ["real.tar"]


def test_commit_to_stdout(tmp_path: Path) -> None:
    """``-o -`` writes the layer to stdout (the digests to stderr), never a file named -."""
    rootfs = make_rootfs(tmp_path / "rootfs")
    cmd = [*unionfs_command(), "commit", os.fspath(rootfs), "-o", "-"]
    res = subprocess.run(cmd, capture_output=True, env=env(), cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert layer_names(res.stdout) == ["bin", "bin/sh", "greeting"]
    assert res.stderr.decode().startswith("diff_id  sha256:")
    assert not (tmp_path / "-").exists()
    res = subprocess.run(
        [*cmd, "--compression", "gzip", "--json"], capture_output=True, env=env(), timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert layer_names(gzip.decompress(res.stdout)) == ["bin", "bin/sh", "greeting"]
    assert "file" not in json.loads(res.stderr) and "digest" in json.loads(res.stderr)
    # With --image too: the layer goes into the layout and to stdout.
    res = subprocess.run(
        [*cmd, "--image", os.fspath(tmp_path / "img"), "--tag", "v1"],
        capture_output=True,
        env=env(),
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert layer_names(res.stdout) == ["bin", "bin/sh", "greeting"]
    assert "manifest sha256:" in res.stderr.decode()


def test_commit_to_stdout_refuses_a_terminal(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    master, slave = pty.openpty()
    try:
        res = subprocess.run(
            [*unionfs_command(), "commit", os.fspath(rootfs), "-o", "-"],
            stdout=slave,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
            cwd=tmp_path,
            timeout=60,
        )
    finally:
        os.close(slave)
        os.close(master)
    assert (res.returncode, res.stderr) == (
        1,
        "unionfs: -o -: stdout is a terminal: send it to a file or a pipe\n",
    )
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_a_failed_commit_says_one_line(tmp_path: Path, compression: str) -> None:
    """The error alone: no 'Exception ignored' from the tar writer's clean-up, no
    temporary file."""
    upper = make_rootfs(tmp_path / "upper")
    (upper / "zz").mkdir()
    os.setxattr(upper / "zz", "trusted.overlay.redirect", b"/elsewhere")
    res = run("commit", os.fspath(upper), "-o", os.fspath(tmp_path / "l.tar"), "--compression", compression)  # fmt: skip
    one_line(res, "zz: has trusted.overlay.redirect")
    assert sorted(os.listdir(tmp_path)) == ["upper"]
    # To stdout: what was written stays, but never ends as a complete archive would.
    streamed = subprocess.run(
        [*unionfs_command(), "commit", os.fspath(upper), "-o", "-", "--compression", compression],
        capture_output=True,
        env=env(),
        timeout=60,
    )
    assert streamed.returncode == 1
    assert streamed.stderr.decode().endswith(
        "its data is in the lower layers; give them with --lower\n"
    )
    assert streamed.stderr.count(b"\n") == 1
    if compression == "none":
        assert not streamed.stdout.endswith(bytes(1024))  # no end-of-archive blocks


def test_a_full_disk_is_one_line(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    (rootfs / "big").write_bytes(os.urandom(256 << 10))
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", small], check=True)
    try:
        res = run("commit", os.fspath(rootfs), "-o", os.fspath(small / "l.tar"))
        one_line(res, f"{small}/l.tar: writing the layer: no space left on device")
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", small], check=True)


def test_a_full_disk_under_a_new_layout_or_the_temporary_layer_is_one_line(
    tmp_path: Path,
) -> None:
    """commit --image into a new layout on a full disk: one line, and neither the
    part-copied blob nor the layout it started is left (both were, after a
    traceback). With the temporary directory full, one line too (the buffer's rest
    failed a second time over the first error)."""
    rootfs = make_rootfs(tmp_path / "rootfs")
    (rootfs / "big").write_bytes(os.urandom(256 << 10))
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", small], check=True)
    try:
        res = run("commit", os.fspath(rootfs), "--image", os.fspath(small / "img"), "--tag", "v1")
        one_line(res, "no space left on device")
        assert f"{small}/img: adding blob sha256:" in res.stderr, res.stderr
        assert os.listdir(small) == []
        env = dict(os.environ, PYTHONPATH=os.fspath(REPO), TMPDIR=os.fspath(small))
        res = subprocess.run(
            [*unionfs_command(), "commit", os.fspath(rootfs), "--image", os.fspath(tmp_path / "i2"),
             "--tag", "v1"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        one_line(res, "layer.tar: writing the layer: no space left on device")
        assert os.listdir(small) == [] and not (tmp_path / "i2").exists()
    finally:
        subprocess.run(["umount", small], check=True)


@pytest.mark.parametrize("epoch", ["-5", "99999999999999999999", "253402300800", "x"])
def test_a_source_date_epoch_outside_0_to_9999_is_one_line(tmp_path: Path, epoch: str) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    for argv, env in (
        (["--source-date-epoch", epoch], {}),
        ([], {"SOURCE_DATE_EPOCH": epoch}),
    ):
        res = subprocess.run(
            [*unionfs_command(), "commit", os.fspath(rootfs), "--image", os.fspath(tmp_path / "i"),
             "--tag", "v1", *argv],
            capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=os.fspath(REPO), **env),
        )  # fmt: skip
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert "seconds" in res.stderr and not (tmp_path / "i").exists()


def test_layer_file_names_say_the_compression(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    out = tmp_path / "out"
    out.mkdir()
    for name, what in (("l.tar.xz", "xz"), ("l.tar.bz2", "bzip2"), ("l.tar.lz4", "lz4")):
        one_line(
            run("commit", os.fspath(rootfs), "-o", os.fspath(out / name)), f"a name for {what} data"
        )
    for name in ("l.bin", "layer"):
        one_line(
            run("commit", os.fspath(rootfs), "-o", os.fspath(out / name)),
            "the name does not say the compression",
        )
    assert os.listdir(out) == []
    magic = {"l.tar": b"bin/", "l.tgz": b"\x1f\x8b", "l.tar.gz": b"\x1f\x8b", "l.tar.zst": b"\x28\xb5\x2f\xfd"}  # fmt: skip
    for name, start in magic.items():
        res = run("commit", os.fspath(rootfs), "-o", os.fspath(out / name))
        assert res.returncode == 0, res.stderr
        assert (out / name).read_bytes().startswith(start), name
    res = run("commit", os.fspath(rootfs), "-o", os.fspath(out / "l.bin"), "--compression", "none")
    assert res.returncode == 0, res.stderr
    assert layer_names((out / "l.bin").read_bytes()) == ["bin", "bin/sh", "greeting"]


# -- commit --image: tags, locking, messages -----------------------------------------


def test_parallel_commits_into_one_layout_keep_every_tag(tmp_path: Path) -> None:
    base = write_oci_layout(tmp_path / "img", [Layer(Tar().file("base", b"b").bytes())], tag="base")
    uppers = []
    for i in range(6):
        u = tmp_path / f"u{i}"
        u.mkdir()
        (u / f"file{i}").write_text(str(i))
        uppers.append(u)
    tags = []
    for rnd in range(4):
        procs = []
        for i, u in enumerate(uppers):
            tag = f"r{rnd}-{i}"
            tags.append(tag)
            procs.append(
                subprocess.Popen(
                    [
                        *unionfs_command(),
                        "commit",
                        os.fspath(u),
                        "--image",
                        f"{base.path}:base",
                        "--tag",
                        tag,
                        "--message",
                        tag,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=env(),
                )  # fmt: skip
            )
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
    index = json.loads((base.path / "index.json").read_text())
    names = [d["annotations"]["org.opencontainers.image.ref.name"] for d in index["manifests"]]
    assert sorted(names) == sorted(["base", *tags])


def test_a_commit_waits_for_the_layout_lock(tmp_path: Path) -> None:
    """Another writer holding the layout (its flock) keeps a commit from its index.json."""
    base = write_oci_layout(tmp_path / "img", [Layer(Tar().file("base", b"b").bytes())], tag="base")
    upper = make_rootfs(tmp_path / "upper")
    fd = os.open(base.path, os.O_RDONLY | os.O_DIRECTORY)
    proc = None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [*unionfs_command(), "commit", os.fspath(upper), "--image", f"{base.path}:base", "--tag", "next"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(),
        )  # fmt: skip
        time.sleep(2)
        assert proc.poll() is None  # waiting for the lock
        assert "next" not in (base.path / "index.json").read_text()
    finally:
        os.close(fd)  # the lock goes with it
        if proc is not None:
            _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert '"next"' in (base.path / "index.json").read_text()


@pytest.mark.parametrize("tag", ["", "a b/../c", "-v1", "v1-", "a//b", "a/", "a---b", "ä", "x y"])
def test_tags_that_are_not_oci_reference_names_are_refused(tmp_path: Path, tag: str) -> None:
    base = write_oci_layout(tmp_path / "img", [Layer(Tar().file("base", b"b").bytes())], tag="base")
    index = (base.path / "index.json").read_bytes()
    blobs = sorted(os.listdir(base.path / "blobs/sha256"))
    upper = make_rootfs(tmp_path / "upper")
    res = run("commit", os.fspath(upper), "--image", f"{base.path}:base", f"--tag={tag}")
    if tag:
        one_line(res, f"tag {tag!r}: not a valid OCI reference name")
    else:  # refused before: an empty argument
        assert (res.returncode, res.stderr) == (
            2,
            "unionfs: --tag: the value is empty: a path or value was left out\n",
        )
    assert (base.path / "index.json").read_bytes() == index
    assert sorted(os.listdir(base.path / "blobs/sha256")) == blobs


def test_oci_reference_names_are_accepted(tmp_path: Path) -> None:
    upper = make_rootfs(tmp_path / "upper")
    tags = ["v1", "localhost/app:latest", "a--b", "1.0+build@x", "A_b.c-d", "r/e/p:o"]
    for i, tag in enumerate(tags):
        layout = os.fspath(tmp_path / "img") + (":v1" if i else "")
        res = run("commit", os.fspath(upper), "--image", layout, "--tag", tag)
        assert res.returncode == 0, (tag, res.stderr)
    index = json.loads((tmp_path / "img/index.json").read_text())
    names = [d["annotations"]["org.opencontainers.image.ref.name"] for d in index["manifests"]]
    assert names == tags


def test_commit_image_messages(tmp_path: Path) -> None:
    upper = make_rootfs(tmp_path / "upper")
    archive = write_oci_archive(tmp_path / "img.tar", [Layer(Tar().file("a", b"1").bytes())])
    before = archive.path.read_bytes()
    res = run("commit", os.fspath(upper), "--image", os.fspath(archive.path), "--tag", "x")
    one_line(res, f"{archive.path}: not a directory: --image adds to an OCI image layout directory")
    assert archive.path.read_bytes() == before
    res = run("commit", os.fspath(upper), "--image", f"{tmp_path}/newdir:base", "--tag", "x")
    one_line(
        res,
        f"{tmp_path}/newdir:base: no OCI image layout {tmp_path}/newdir to take the image base from",
    )
    assert not (tmp_path / "newdir").exists()


# -- images without layers -----------------------------------------------------------


def test_an_image_without_layers(tmp_path: Path) -> None:
    """Listing shows no rows; mount, unpack and diff --image refuse it in one line;
    commit --image puts a first layer on it."""
    zero = write_oci_layout(tmp_path / "img", [], tag="empty")
    ref = f"{zero.path}:empty"
    cache = os.fspath(tmp_path / "cache")
    res = run("image", "layers", ref, "--cache", cache)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "LAYER  DIGEST  SIZE  ADDED  CHANGED  DELETED  HIDDEN  CREATED BY"
    ]
    res = run("image", "layers", ref, "--cache", cache, "--json")
    assert (res.returncode, json.loads(res.stdout)) == (0, [])
    one_line(
        run("image", "unpack", ref, os.fspath(tmp_path / "out")), f"{ref}: the image has no layers"
    )
    assert not (tmp_path / "out").exists()
    (tmp_path / "mnt").mkdir()
    one_line(
        run("image", "mount", ref, os.fspath(tmp_path / "mnt"), "--cache", cache),
        f"{ref}: the image has no layers",
    )
    upper = make_rootfs(tmp_path / "upper")
    one_line(
        run("diff", os.fspath(upper), "--image", ref, "--cache", cache),
        f"{ref}: the image has no layers",
    )
    res = run("commit", os.fspath(upper), "--image", ref, "--tag", "one")
    assert res.returncode == 0, res.stderr
    res = run("image", "layers", f"{zero.path}:one", "--cache", cache, "--json")
    assert [row["added"] for row in json.loads(res.stdout)] == [3]


# -- image unpack: a failure leaves nothing it made ----------------------------------


def corrupt_second_layer(path: Path) -> str:
    layers = [Layer(Tar().dir("a").file("a/x", b"x").bytes()), Layer(Tar().file("b", b"y" * 4000).bytes())]  # fmt: skip
    built = write_oci_layout(path, layers)
    blob = path / "blobs/sha256" / built.layer_digests[1].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    return os.fspath(path)


def test_a_failed_unpack_leaves_nothing_behind(tmp_path: Path) -> None:
    image = corrupt_second_layer(tmp_path / "img")
    dest = tmp_path / "new/deeper/out"
    first = one_line(run("image", "unpack", image, os.fspath(dest)), "layer 2/2")
    assert not (tmp_path / "new").exists()  # the directories it made go too
    assert run("image", "unpack", image, os.fspath(dest)).stderr == first  # the same error again
    (tmp_path / "empty").mkdir()
    one_line(run("image", "unpack", image, os.fspath(tmp_path / "empty")), "layer 2/2")
    assert os.listdir(tmp_path / "empty") == []  # it was there before: it stays, empty


def test_unpack_destination_messages(tmp_path: Path) -> None:
    built = write_oci_layout(tmp_path / "img", [Layer(Tar().file("a", b"1").bytes())])
    (tmp_path / "file").write_text("f")
    one_line(
        run("image", "unpack", os.fspath(built.path), os.fspath(tmp_path / "file")),
        f"{tmp_path}/file: exists and is not a directory",
    )
    one_line(
        run("layer", "import", os.fspath(tmp_path / "missing.tar"), os.fspath(tmp_path / "d")),
        f"{tmp_path}/missing.tar: no such file or directory",
    )


# -- messages ------------------------------------------------------------------------


def test_a_truncated_archive_says_so(tmp_path: Path) -> None:
    built = write_oci_archive(tmp_path / "img.tar", [Layer(Tar().file("a", b"x" * 3000).bytes())])
    data = built.path.read_bytes()
    for cut in (100, 1100, 2600, 4000, 9216):  # in headers, in data, at a member's end
        trunc = tmp_path / f"cut{cut}.tar"
        trunc.write_bytes(data[:cut])
        why = (
            "neither an OCI archive nor a docker archive, and it lacks the end a tar archive "
            "has: truncated?"
            if cut == 9216
            else "the archive is truncated (it ends inside its last member)"
        )
        res = run("image", "unpack", os.fspath(trunc), os.fspath(tmp_path / "out"))
        assert (res.returncode, res.stderr) == (1, f"unionfs: {trunc}: {why}\n")


def test_diff_of_a_missing_upper(tmp_path: Path) -> None:
    one_line(run("diff", os.fspath(tmp_path / "nonexist")), f"{tmp_path}/nonexist: no such file or directory")  # fmt: skip
    (tmp_path / "file").write_text("f")
    one_line(run("diff", os.fspath(tmp_path / "file")), f"{tmp_path}/file: not a directory")


def test_a_socket_left_out_is_a_prefixed_warning(tmp_path: Path) -> None:
    upper = make_rootfs(tmp_path / "upper")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fspath(upper / "sock"))
    try:
        res = run("commit", os.fspath(upper), "-o", os.fspath(tmp_path / "l.tar"))
    finally:
        sock.close()
    assert res.returncode == 0
    assert res.stderr == "unionfs: sock: a socket cannot go in a layer: left out\n"


# -- options -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_max_entries_is_checked_when_parsed(tmp_path: Path, value: str) -> None:
    built = write_oci_layout(tmp_path / "img", [Layer(Tar().file("a", b"1").bytes())])
    res = run("image", "unpack", os.fspath(built.path), os.fspath(tmp_path / "out"), "--max-entries", value)  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.startswith("unionfs: argument --max-entries: ") and res.stderr.endswith(
        " (see unionfs image unpack --help)\n"
    ), res.stderr
    assert not (tmp_path / "out").exists()


def test_subcommands_report_their_own_usage_and_help(tmp_path: Path) -> None:
    res = run("image", "unpack", "IMG", "DIR", "--json")
    assert res.returncode == 2
    assert res.stderr == (
        "unionfs: unrecognized arguments: --json (see unionfs image unpack --help)\n"
    )
    res = run("layer", "import", "L", "D", "--bogus")
    assert res.returncode == 2
    assert res.stderr == (
        "unionfs: unrecognized arguments: --bogus (see unionfs layer import --help)\n"
    )
    res = run("commit", "up", "-o", "x.bin", "--compression", "bogus")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "invalid choice: 'bogus'" in res.stderr and "(see unionfs commit --help)" in res.stderr
    help_mount = run("image", "mount", "--help").stdout
    assert "-o OPTIONS mount options, as for a plain mount" in " ".join(help_mount.split())
    help_import = run("layer", "import", "--help").stdout
    assert "--json print the diff_id" in " ".join(help_import.split())


def test_print_kernel_mount_keeps_the_kernel_options(tmp_path: Path) -> None:
    built = write_oci_layout(tmp_path / "img", [Layer(Tar().file("a", b"1").bytes())])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run(
        "image", "mount", os.fspath(built.path), os.fspath(mnt), "--cache", os.fspath(tmp_path / "cache"),
        "--print-kernel-mount", "-o", "ro,xino=on,fsync=strict", "-o", "timeout=5,allow_other",
        "-o", "fsync=0",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stderr == (
        "unionfs: -o timeout=5: no kernel overlay equivalent: left out of the printed command\n"
        "unionfs: -o fsync=0: no kernel overlay equivalent (the kernel's is volatile): left "
        "out of the printed command\n"
    )
    cmd = shlex.split(res.stdout)
    assert cmd[5].endswith(",ro,xino=on,fsync=strict")
    subprocess.run(cmd, check=True)
    try:
        assert mount_type(mnt) == "overlay"
        assert os.statvfs(mnt).f_flag & os.ST_RDONLY
    finally:
        subprocess.run(["umount", mnt], check=True)


# -- diff ----------------------------------------------------------------------------


def test_diff_without_lowers_lists_every_whiteout(tmp_path: Path) -> None:
    """Nothing below is known: every entry is A and every whiteout D, nested ones
    too, in the kernel's format and in the OCI one alike."""
    kernel = tmp_path / "kernel"
    unpack(Tar().dir("bin").file("bin/sh", b"s").whiteout("bin/cat").whiteout("greeting").bytes(), kernel)  # fmt: skip
    assert os.lstat(kernel / "bin/cat").st_rdev == 0  # a kernel whiteout
    oci = tmp_path / "oci"
    (oci / "bin").mkdir(parents=True)
    (oci / "bin/sh").write_bytes(b"s")
    (oci / "bin/.wh.cat").write_bytes(b"")
    (oci / ".wh.greeting").write_bytes(b"")
    expected = ["A /bin", "D /bin/cat", "A /bin/sh", "D /greeting"]
    for upper in (kernel, oci):
        assert [c.line().decode() for c in changes(upper, [])] == expected
        res = run("diff", os.fspath(upper))
        assert (res.returncode, res.stdout.splitlines()) == (0, expected)


@pytest.mark.parametrize("mode", ["redirect_dir=on", "metacopy=on"])
def test_diff_follows_a_directory_the_kernel_moved(tmp_path: Path, mode: str) -> None:
    """``mv bin sbin`` on a kernel overlay with redirect_dir=on leaves an upper ``sbin``
    that only redirects to the lower ``bin``: everything in it is added."""
    base = Tar().dir("bin").file("bin/busybox", b"bb" * 100).symlink("bin/sh", "busybox")
    base.dir("bin/sub").file("bin/sub/f", b"f").dir("etc").file("etc/passwd", b"root")
    unpack(base.bytes(), tmp_path / "base")
    unpack(Tar().dir("etc").file("etc/motd", b"hi").bytes(), tmp_path / "top")
    lowers = [tmp_path / "top", tmp_path / "base"]
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    with kernel_mounted(lowers, tmp_path / "m", upper, work, mode) as m:
        os.rename(m / "bin", m / "sbin")
        (m / "new").mkdir()
        os.rename(m / "etc", m / "new/etc")  # an absolute redirect, below an added directory
        os.chmod(m / "sbin/busybox", 0o700)  # with metacopy=on: a metadata-only copy
    redirects = [p for p in ("sbin", "new/etc") if "trusted.overlay.redirect" in os.listxattr(upper / p)]  # fmt: skip
    assert redirects == ["sbin", "new/etc"]
    expected: list[str] = []
    with kernel_mounted(lowers, tmp_path / "old", None, None) as old:
        with kernel_mounted(lowers, tmp_path / "new", upper, tmp_path / "work", mode) as new:
            expected = naive_diff(old, new)
    got = [c.line().decode() for c in changes(upper, lowers)]
    assert got == expected
    for line in ("D /bin", "A /sbin", "A /sbin/busybox", "A /sbin/sh", "A /sbin/sub/f", "A /new/etc/motd", "A /new/etc/passwd"):  # fmt: skip
        assert line in got
    one_line(run("diff", os.fspath(upper)), "new/etc: has a redirect", "--lower or --image")


# -- live mounts ---------------------------------------------------------------------


def test_commit_of_a_live_kernel_overlay(tmp_path: Path) -> None:
    """Its mount point is refused (unless --whole-tree); its upper gives a warning."""
    unpack(Tar().dir("etc").file("etc/passwd", b"root").bytes(), tmp_path / "lower")
    lower2 = tmp_path / "lower2"
    lower2.mkdir()
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    out = os.fspath(tmp_path / "l.tar")
    with kernel_mounted([tmp_path / "lower", lower2], tmp_path / "m", upper, work) as m:
        (m / "new").write_text("n")
        one_line(run("commit", os.fspath(m), "-o", out), f"{m}: the mount point of a live overlay mount", "--whole-tree")  # fmt: skip
        assert not os.path.exists(out)
        res = run("commit", os.fspath(m), "-o", out, "--whole-tree")
        assert (res.returncode, res.stderr) == (0, "")
        assert layer_names(Path(out).read_bytes()) == ["etc", "etc/passwd", "new"]
        res = run("commit", os.fspath(upper), "-o", out)
        assert res.returncode == 0
        assert res.stderr == (
            f"unionfs: warning: {upper} is the upper layer of the live mount at {m}: what "
            "changes while it is committed may be caught half-way; unmount it first\n"
        )
        # diff too: it listed everything the mount shows as added.
        res = run("diff", os.fspath(m))
        assert (res.returncode, res.stdout) == (1, ""), res
        assert res.stderr == (
            f"unionfs: {m}: the mount point of a live overlay mount: a merged tree, not an "
            "upper directory; diff its upper directory\n"
        )
        res = run("diff", os.fspath(upper))
        assert (res.returncode, res.stdout) == (0, "A /new\n"), res
        assert res.stderr == (
            f"unionfs: warning: {upper} is the upper layer of the live mount at {m}: what "
            "changes while it is read may be caught half-way; unmount it first\n"
        )
    res = run("commit", os.fspath(upper), "-o", out)
    assert (res.returncode, res.stderr) == (0, "")


def test_commit_of_a_live_unionfs_mount(tmp_path: Path) -> None:
    unpack(Tar().dir("etc").file("etc/passwd", b"root").bytes(), tmp_path / "lower")
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    out = os.fspath(tmp_path / "l.tar")
    with unionfs_mounted([tmp_path / "lower"], mnt, upper, work):
        one_line(run("commit", os.fspath(mnt), "-o", out), "a live fuse.unionfs mount")
        res = run("commit", os.fspath(upper), "-o", out)
        assert res.returncode == 0
        assert f"is the upper layer of the live mount at {mnt}" in res.stderr


# -- deep trees ---------------------------------------------------------------------


@pytest.fixture
def deep_dirs(tmp_path: Path) -> Iterator[Path]:
    """*tmp_path*, emptied with rm -rf at the end: shutil.rmtree (pytest's clean-up of
    old temporary directories) recurses once a level, and fails on trees this deep."""
    try:
        yield tmp_path
    finally:
        for entry in tmp_path.iterdir():
            subprocess.run(["rm", "-rf", "--", os.fspath(entry)], check=True)


def _deep(root: Path, levels: int) -> None:
    """*root*/d/d/.../d/leaf, *levels* directories below *root* (made through fds: the
    path is longer than PATH_MAX)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(leaf, b"deep")
        os.close(leaf)
    finally:
        os.close(fd)


def test_trees_thousands_of_levels_deep_are_walked(deep_dirs: Path) -> None:
    tmp_path = deep_dirs
    """3,000 levels (a layer's tar paths have no length limit): diff, commit, convert and
    check walk them; they stopped with a RecursionError traceback past about 1,000. And
    an image with such a layer lists its layers."""
    up = tmp_path / "up"
    _deep(up, 3000)
    deepest = "/".join(["d"] * 3000)
    res = run("diff", os.fspath(up))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[-1] == f"A /{deepest}/leaf"
    out = tmp_path / "deep.tar"
    res = run("commit", os.fspath(up), "-o", os.fspath(out))
    assert res.returncode == 0, res.stderr[-2000:]
    with tarfile.open(out) as tf:
        member = tf.extractfile(f"{deepest}/leaf")
        assert member is not None and member.read() == b"deep"
    for argv in (["convert", "--to", "kernel", "--dry-run"], ["check"]):
        res = run(*argv, os.fspath(up))
        assert res.returncode == 0, (argv, res.stderr[-2000:])
    # The unpacker takes paths up to PATH_MAX (4,096 bytes): 1,500 levels.
    layer = tmp_path / "layer"
    _deep(layer, 1500)
    res = run("commit", os.fspath(layer), "-o", os.fspath(tmp_path / "layer.tar"))
    assert res.returncode == 0, res.stderr[-2000:]
    built = write_oci_layout(
        tmp_path / "img", [Layer((tmp_path / "layer.tar").read_bytes(), "none")]
    )
    res = run("image", "layers", os.fspath(built.path), "--cache", os.fspath(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1,501" in res.stdout or "1501" in res.stdout, res.stdout


def test_a_tree_deeper_than_the_open_file_limit_is_one_line(deep_dirs: Path) -> None:
    tmp_path = deep_dirs
    """One open directory a level: with 300 files allowed, 400 levels end in one line."""
    up = tmp_path / "up"
    _deep(up, 400)
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    res = subprocess.run(
        ["prlimit", "--nofile=300", *unionfs_command(), "diff", os.fspath(up)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1 and res.stderr == (
        "unionfs: too many open files: a directory tree deeper than the open-file limit (300)?\n"
    ), res.stderr[-2000:]


def test_a_tree_deeper_than_the_recursion_limit_is_one_line(deep_dirs: Path) -> None:
    tmp_path = deep_dirs
    """Past the tools' recursion limit (lowered here to 300, for a 400-level tree), one
    line, not a traceback."""
    up = tmp_path / "up"
    _deep(up, 400)
    script = (
        "import sys; import unionfs.cli as c; c.TOOL_RECURSION = 300; "
        "sys.setrecursionlimit(300); sys.exit(c.main(sys.argv[1:]))"
    )
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    res = subprocess.run(
        [sys.executable, "-c", script, "diff", os.fspath(up)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1 and res.stderr == (
        "unionfs: a directory tree too deep to walk (over 150 levels)\n"
    ), res.stderr[-2000:]


def test_image_mount_checks_its_mountpoint_before_unpacking(tmp_path: Path) -> None:
    """A missing mountpoint (or upper) is refused before a layer is unpacked: it was
    refused only after every layer had gone into the cache."""
    built = write_oci_layout(tmp_path / "img", [Layer(Tar().file("a", b"1").bytes())])
    cache = tmp_path / "cache"
    for extra in ([], ["--upper", os.fspath(tmp_path / "nope"), "--work", os.fspath(tmp_path)]):
        mnt = tmp_path / ("none" if not extra else "mnt")
        if extra:
            mnt.mkdir(exist_ok=True)
        res = run("image", "mount", os.fspath(built.path), os.fspath(mnt), "--cache", os.fspath(cache), *extra)  # fmt: skip
        one_line(res, "No such file or directory")
        assert not cache.exists() or not any((cache / "layers").glob("*/*")), list(cache.rglob("*"))


def test_an_upper_that_overlaps_a_lower_or_holds_the_layout_is_refused(tmp_path: Path) -> None:
    """diff/commit of an upper against itself (or a layer around it) compared a tree with
    itself; a layout inside the upper went into the next commit of it."""
    up = make_rootfs(tmp_path / "up")
    low = tmp_path / "low"
    low.mkdir()
    for argv in (
        ["diff", os.fspath(up), "--lower", os.fspath(up)],
        ["diff", os.fspath(up), "--lower", os.fspath(tmp_path)],
        ["commit", os.fspath(up), "--lower", f"{low}:{up / 'bin'}", "-o", os.fspath(tmp_path / "x.tar")],
    ):  # fmt: skip
        one_line(run(*argv), f"the upper {up} and the lower layer ", " overlap")
    for layout in (up / "img", up, tmp_path / "link"):
        if layout.name == "link":
            layout.symlink_to(up / "img")
        res = run("commit", os.fspath(up), "--image", os.fspath(layout), "--tag", "v1")
        one_line(res, f"--image {layout}: inside the upper", "next layer committed from it")
    assert not (up / "img").exists() and not (tmp_path / "x.tar").exists()
    res = run("commit", os.fspath(up), "--image", os.fspath(tmp_path / "img"), "--tag", "v1")
    assert res.returncode == 0, res.stderr
