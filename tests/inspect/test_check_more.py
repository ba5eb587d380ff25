"""``unionfs check`` on uppers the kernel overlay wrote, on layers it cannot read all of,
and for each target: the kernel overlay, mounted over the same layers, is the oracle
for what is shown."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.mounting import REPO, kernel_overlay, unionfs_command
from tests.unit.conftest import NS, opaque, whiteout, write

# A lower file holds its own name, so the file the mount shows says which it is.
Files = set[tuple[int, str]]  # (layer index as check numbers it, path in the layer)


def run(*args: str | Path, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    return subprocess.run(
        [*prefix, *unionfs_command(), "check", *[os.fspath(a) for a in args]],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def check(*args: str | Path, prefix: Sequence[str] = ()) -> tuple[int, list[dict[str, Any]]]:
    res = run(*args, "--json", prefix=prefix)
    assert res.returncode in (0, 1, 2), res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, [json.loads(line) for line in res.stdout.splitlines()]


def found(lines: list[dict[str, Any]], code: str | None = None) -> list[dict[str, Any]]:
    return [f for f in lines if "code" in f and (code is None or f["code"] == code)]


def hidden(lines: list[dict[str, Any]]) -> dict[tuple[int, str], str]:
    return {(f["layer"], f["relpath"]): f["message"] for f in found(lines, "hidden-file")}


def kernel(
    lowers: Sequence[Path],
    mnt: Path,
    upper: Path | None = None,
    work: Path | None = None,
    options: str = "",
) -> contextlib.AbstractContextManager[Path]:
    """The kernel's overlayfs over *lowers*, with *options*; always unmounted."""
    mnt.mkdir(exist_ok=True)
    return kernel_overlay(lowers, mnt, upper, work, options)


def fill(layer: Path, index: int, paths: Sequence[str]) -> None:
    """Regular files at *paths* of *layer*, each holding its own identity."""
    for p in paths:
        write(layer / p, f"{index}:{p}".encode())


def lower_files(lowers: Sequence[Path], first: int) -> Files:
    """Every regular file of the lowers (numbered from *first*), markers left out."""
    out: Files = set()
    for i, layer in enumerate(lowers, first):
        for dirpath, _, names in os.walk(layer):
            for name in names:
                path = Path(dirpath) / name
                if not name.startswith(".wh.") and stat.S_ISREG(path.lstat().st_mode):
                    out.add((i, os.fspath(path.relative_to(layer))))
    return out


def shown_lower_files(mnt: Path, upper: Path | None) -> Files:
    """The lower files the mount at *mnt* shows: what is not the upper's (the upper
    holds each of its entries at its path in the mount) says which file it is."""
    out: Files = set()
    for dirpath, _, names in os.walk(mnt):
        for name in names:
            path = Path(dirpath) / name
            rel = path.relative_to(mnt)
            if name.startswith(".wh.") or not stat.S_ISREG(path.lstat().st_mode):
                continue  # an OCI marker the kernel shows as a file
            if upper is not None and (upper / rel).is_file() and not (upper / rel).is_symlink():
                continue
            index, _, where = path.read_text().partition(":")
            out.add((int(index), where))
    return out


# -- A: redirects followed ------------------------------------------------------------


def test_files_under_a_renamed_directory_are_shown(tmp_path: Path) -> None:
    """A directory renamed with redirect_dir=on: what it holds in the lower layers shows
    at its new name, as the kernel shows it; what is hidden there is explained at the
    new name, by what really hides it."""
    h = tmp_path / "h"
    app, base, upper, work, mnt = (h / n for n in ("app", "base", "upper", "work", "u"))
    for d in (app, base, upper, work, mnt):
        d.mkdir(parents=True)
    fill(base, 2, ["olddir/sub/f", "olddir/sub/gone", "olddir/sub/hid", "olddir/cut/c"])
    fill(app, 1, ["olddir/af"])
    whiteout(app / "olddir/sub/hid")  # the lower layers themselves hide this one
    with kernel([app, base], mnt, upper, work, "redirect_dir=on") as u:
        os.rename(u / "olddir", u / "moved")
        (u / "moved/sub/gone").unlink()
        for child in (u / "moved/cut").iterdir():
            child.unlink()
        (u / "moved/cut").rmdir()
        assert sorted(os.listdir(u / "moved")) == ["af", "sub"]
        shown = shown_lower_files(u, upper)
    assert {(1, "olddir/af"), (2, "olddir/sub/f")} <= shown
    expected = lower_files([app, base], 1) - shown
    assert expected == {(2, "olddir/sub/gone"), (2, "olddir/sub/hid"), (2, "olddir/cut/c")}

    status, lines = check(
        app, base, "--upper", upper, "--work", work, "--redirect-dir", "on", "--all"
    )
    assert status == 0, lines
    why = hidden(lines)
    assert set(why) == expected
    assert why[(2, "olddir/sub/gone")].startswith(
        "17 bytes stored, never shown: hidden by a whiteout in the upper"
    )
    assert why[(2, "olddir/sub/gone")].endswith(", at moved/sub/gone in the merged view")
    assert "hidden by a whiteout in layer 1" in why[(2, "olddir/sub/hid")]
    assert why[(2, "olddir/sub/hid")].endswith(", at moved/sub/hid in the merged view")
    assert "cut off at moved/cut: hidden by a whiteout in the upper" in why[(2, "olddir/cut/c")]
    assert not [f for f in lines if "cut off at olddir" in f.get("message", "")]
    assert lines[-1]["wasted_files"] == 3
    assert not [f for f in found(lines) if f["severity"] != "info"], lines


def test_a_refused_redirect_hides_what_is_below_it(tmp_path: Path) -> None:
    """With redirect_dir=nofollow the lookup of a redirected directory fails (EPERM), in
    the kernel as in unionfs: what it would show is hidden, and check says so."""
    base, upper = tmp_path / "base", tmp_path / "upper"
    fill(base, 1, ["olddir/f"])
    (upper / "moved").mkdir(parents=True)
    os.setxattr(upper / "moved", NS.redirect, b"olddir")
    whiteout(upper / "olddir")
    _, lines = check(base, "--upper", upper, "--redirect-dir", "on")
    assert hidden(lines) == {}
    status, lines = check(base, "--upper", upper, "--redirect-dir", "nofollow")
    assert status == 1
    assert ("redirect-not-followed", "moved") in {(f["code"], f["relpath"]) for f in found(lines)}
    assert hidden(lines) == {
        (1, "olddir/f"): "10 bytes stored, never shown: cut off at olddir: hidden by a "
        "whiteout in the upper (kernel format: a character device 0/0)"
    }


# -- B: what cannot be read --------------------------------------------------------------

# Root without any capability: the permission bits apply to it as to its files' owner.
NO_CAPS = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")


def test_an_unreadable_directory_is_a_finding_and_the_rest_is_checked(tmp_path: Path) -> None:
    base, top = tmp_path / "base", tmp_path / "top"
    write(base / "sec/big", b"x\n")
    os.setxattr(base / "sec/big", b"user.fuseoverlayfs.override_stat", b"0:0:04755")
    write(base / "open/f", b"y\n")
    os.setxattr(base / "open/f", b"user.fuseoverlayfs.override_stat", b"0:0:0755")
    whiteout(top / "x")
    whiteout(top / "s/y")  # looked for below in a directory that cannot be searched
    write(base / "s/y")
    os.chmod(base / "sec", 0)
    os.chmod(base / "s", 0o600)
    try:
        res = run(top, base, prefix=NO_CAPS)
        status, lines = check(top, base, prefix=NO_CAPS)
    finally:
        os.chmod(base / "sec", 0o755)
        os.chmod(base / "s", 0o755)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "unionfs check: the check is incomplete: 2 could not be read (see the unreadable findings)"
    )
    assert res.stdout.splitlines()[-1].endswith("; 2 not checked (could not be read)")
    assert (
        f"{base}/sec: warning [unreadable] could not read this directory of layer 1: "
        "Permission denied; not checked, nor anything below it"
    ) in res.stdout.splitlines()
    assert status == 2
    assert {(f["code"], f["severity"], f["relpath"]) for f in found(lines)} == {
        ("unreadable", "warning", "sec"),
        ("unreadable", "warning", "s"),
        ("foreign-xattr", "error", "open/f"),  # the run went on with the rest
        ("orphan-whiteout", "warning", "x"),
    }
    assert lines[-1]["unreadable"] == 2 and lines[-1]["errors"] == 1
    # Readable again, everything is checked.
    status, lines = check(top, base, prefix=NO_CAPS)
    assert status == 1 and not found(lines, "unreadable")
    assert ("foreign-xattr", "sec/big") in {(f["code"], f["relpath"]) for f in found(lines)}


def test_an_unreadable_layer_root_and_workdir(tmp_path: Path) -> None:
    base, upper, work = tmp_path / "base", tmp_path / "upper", tmp_path / "work"
    write(base / "d/f")
    upper.mkdir()
    (work / "work").mkdir(parents=True)
    os.chmod(base, 0)
    os.chmod(work / "work", 0)
    try:
        status, lines = check(base, "--upper", upper, "--work", work, prefix=NO_CAPS)
    finally:
        os.chmod(base, 0o755)
        os.chmod(work / "work", 0o755)
    assert status == 2
    unread = {(f["layer"], f["path"]) for f in found(lines, "unreadable")}
    assert unread == {(1, os.fspath(base)), (0, os.fspath(work / "work"))}


# -- C: what the kernel writes is no cause for alarm ------------------------------------


def test_an_upper_the_kernel_wrote_passes(tmp_path: Path) -> None:
    """Ordinary changes through the kernel overlay with redirect_dir=on (directories
    made in merged ones, which it marks opaque; removals; renames with redirects), a
    clean unmount: no warning, no error, and as info only the redirects and the lower
    files the kernel does not show."""
    base, upper, work, mnt = (tmp_path / n for n in ("base", "upper", "work", "k"))
    fill(base, 1, ["d/f", "d/g", "d/sub/s", "e/h", "e/i", "m/n"])
    for d in (upper, work):
        d.mkdir()
    with kernel([base], mnt, upper, work, "redirect_dir=on") as k:
        (k / "fresh").mkdir()
        (k / "d/fresh2").mkdir()
        (k / "fresh/inner").mkdir()
        (k / "d/f").unlink()
        os.rename(k / "e", k / "e2")
        (k / "e2/h").unlink()
        os.rename(k / "d/g", k / "d/g2")
        (k / "d/sub/s").unlink()
        (k / "d/sub").rmdir()
        (k / "d/sub").mkdir()
        os.rename(k / "m", k / "fresh/m")
        (k / "fresh/m/n").write_text("changed")
        shown = shown_lower_files(k, upper)
    assert os.getxattr(upper / "fresh", NS.opaque) == b"y"  # what the kernel does
    left = os.listdir(work / "work")
    assert len(left) == 1 and left[0].startswith("#") and left[0] != "#whiteout", left
    status, lines = check(base, "--upper", upper, "--work", work, "--redirect-dir", "on", "--all")
    assert status == 0
    assert not [f for f in found(lines) if f["severity"] != "info"], lines
    assert {f["code"] for f in found(lines)} <= {"redirect", "hidden-file"}, lines
    assert set(hidden(lines)) == lower_files([base], 1) - shown
    assert {(1, "d/f"), (1, "e/h"), (1, "d/sub/s"), (1, "m/n")} <= set(hidden(lines))
    assert (1, "e/i") not in hidden(lines)


def test_opaque_directories_that_hide_nothing(tmp_path: Path) -> None:
    """In the upper an opaque directory no lower layer has is the overlay's own doing:
    nothing is reported; in a lower layer it is worth an info line, not a warning."""
    top, mid, bottom = tmp_path / "top", tmp_path / "mid", tmp_path / "bottom"
    upper = tmp_path / "upper"
    write(bottom / "f")
    opaque(upper / "new")
    opaque(top / "alsonew")
    write(mid / "oci/.wh..wh..opq", b"")
    status, lines = check(top, mid, bottom, "--upper", upper)
    assert status == 0
    assert {(f["code"], f["severity"], f["layer"], f["relpath"]) for f in found(lines)} == {
        ("orphan-opaque", "info", 1, "alsonew"),
        ("orphan-opaque", "info", 2, "oci/.wh..wh..opq"),
    }
    assert "it hides nothing (harmless: the kernel overlay marks" in found(lines)[0]["message"]


def test_leftovers_in_the_workdir_are_still_reported(tmp_path: Path) -> None:
    upper, work, base = tmp_path / "upper", tmp_path / "work", tmp_path / "base"
    for d in (upper, work / "work", base):
        d.mkdir(parents=True)
    whiteout(work / "work" / "#1f")  # the kernel's own shared whiteout
    whiteout(work / "work" / "#whiteout")  # unionfs's
    _, lines = check(base, "--upper", upper, "--work", work)
    assert not found(lines, "workdir-leftovers")
    write(work / "work" / "#20", b"half a copy-up")
    (work / "work" / "#21").mkdir()
    _, lines = check(base, "--upper", upper, "--work", work)
    assert [f["message"] for f in found(lines, "workdir-leftovers")] == [
        "2 entries left in work/ by an interrupted change: removed at the next mount"
    ]


# -- D: hard links ------------------------------------------------------------------------


def test_a_lower_file_linked_into_the_upper_is_not_hidden(tmp_path: Path) -> None:
    base, upper = tmp_path / "base", tmp_path / "upper"
    write(base / "hl", b"abc")
    write(base / "d/other", b"12345")
    upper.mkdir()
    os.link(base / "hl", upper / "hl")
    write(upper / "d/other", b"new")
    status, lines = check(base, "--upper", upper)
    assert status == 1  # the shared inode itself is an error
    assert {f["relpath"] for f in found(lines, "cross-layer-hardlink")} == {"hl"}
    assert set(hidden(lines)) == {(1, "d/other")}
    assert lines[-1]["wasted_bytes"] == 5


# -- E: the target's rules ------------------------------------------------------------------


def test_hidden_files_follow_the_targets_reading(tmp_path: Path) -> None:
    top, mid, bot = tmp_path / "top", tmp_path / "mid", tmp_path / "bot"
    fill(bot, 2, ["x", "y", "d/z", "o/w"])
    write(top / ".wh.x", b"")  # an OCI whiteout: the kernel shows x
    whiteout(mid / "y")  # a kernel whiteout: an OCI runtime makes a device, hiding y too
    opaque(mid / "d")  # an opaque xattr: an OCI runtime merges d
    write(mid / "o/.wh..wh..opq", b"")  # an OCI opaque marker: the kernel merges o
    _, lines = check(top, mid, bot)
    assert set(hidden(lines)) == {(2, "x"), (2, "y"), (2, "d/z"), (2, "o/w")}

    with kernel([top, mid, bot], tmp_path / "k") as k:
        shown = shown_lower_files(k, None)
    status, lines = check("--for", "kernel", top, mid, bot)
    assert status == 1
    why = hidden(lines)
    assert set(why) == lower_files([top, mid, bot], 0) - shown == {(2, "y"), (2, "d/z")}
    assert not [m for m in why.values() if "OCI" in m]
    assert why[(2, "d/z")] == (
        "5 bytes stored, never shown: cut off at d: below layer 1's opaque directory"
    )

    _, lines = check("--for", "oci", top, mid, bot)
    why = hidden(lines)
    assert set(why) == {(2, "x"), (2, "y"), (2, "o/w")}
    assert why[(2, "y")] == (
        "3 bytes stored, never shown: hidden by layer 1's character device 0/0 (a kernel "
        "whiteout, which an OCI runtime unpacks as a device: it replaces the name below "
        "all the same)"
    )
    assert "whiteout .wh.x in layer 0" in why[(2, "x")]


# -- names ---------------------------------------------------------------------------------


def test_every_name_prints_as_one_line(tmp_path: Path) -> None:
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    odd = b"new\nline \x1b[31m \xff"
    top.mkdir()
    write(bottom / os.fsdecode(odd), b"data")
    whiteout(top / os.fsdecode(odd))
    whiteout(top / os.fsdecode(b"gone\n\xfe"))
    res = run(top, bottom)
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert len(lines) == 3, lines  # two findings and the summary
    assert "\x1b" not in res.stdout
    shown = "new\\nline \\x1b[31m \\xff"
    assert f"{bottom}/{shown}: info [hidden-file]" in lines[1]
    assert lines[0] == (
        f"{top}/gone\\n\\xfe: warning [orphan-whiteout] hides nothing: no layer below has "
        "gone\\n\\xfe"
    )
    _, found_json = check(top, bottom)
    assert {f["relpath"] for f in found(found_json)} == {"gone\\n\\xfe", shown}


def _deep(root: Path, depth: int) -> None:
    """*depth* nested directories ``d`` in *root*, a file at the bottom (made by fds:
    the path is longer than PATH_MAX)."""
    root.mkdir()
    cur = os.open(root, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=cur)
            nxt = os.open("d", os.O_RDONLY, dir_fd=cur)
            os.close(cur)
            cur = nxt
        fd = os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=cur)
        os.write(fd, b"deep")
        os.close(fd)
    finally:
        os.close(cur)


def _remove_deep(root: Path) -> None:
    """Remove what ``_deep`` made, from the bottom up (``shutil.rmtree``, and so
    pytest's clean-up of old temporary directories, recurses once a level)."""
    fds = [os.open(root, os.O_RDONLY)]
    try:
        while "d" in os.listdir(fds[-1]):
            fds.append(os.open("d", os.O_RDONLY, dir_fd=fds[-1]))
        with contextlib.suppress(FileNotFoundError):
            os.unlink("f", dir_fd=fds[-1])
        while len(fds) > 1:
            os.close(fds.pop())
            os.rmdir("d", dir_fd=fds[-1])
    finally:
        for fd in fds:
            os.close(fd)


def test_a_deep_layer_is_walked_without_recursion(tmp_path: Path) -> None:
    """Deeper than Python's recursion limit and than PATH_MAX: checked all the same."""
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    _deep(bottom, 2100)
    try:
        top.mkdir()
        status, lines = check(top, bottom)
        assert status == 0 and lines[-1]["wasted_files"] == 0
        whiteout(top / "d")
        status, lines = check(top, bottom)
        assert status == 0 and lines[-1]["wasted_files"] == 1
    finally:
        _remove_deep(bottom)
