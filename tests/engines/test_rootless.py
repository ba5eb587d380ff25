"""Rootless podman with unionfs as its mount_program, checked against the vfs driver.

An ordinary user with subordinate id ranges (``tests/user/setup-user.sh``;
``newuidmap``/``newgidmap`` from Debian's uidmap) runs podman with a private
storage.conf. podman then runs the mount program inside its user namespace, as
that namespace's root: ``trusted.*`` xattrs cannot be written there, so
unionfs keeps its markers in ``user.overlay.*``. The same workloads run on a
second rootless store with the ``vfs`` driver (plain copies, no overlay at
all), the reference the unionfs results are compared with.

The user cannot read the project's virtualenv when it lies under /root (a
pyenv Python), so unionfs and its runtime dependencies are copied into a
world-readable stage and run by the system's python3 (same minor version).
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.engines.conftest import (
    ARGV_SHAPES,
    BASE_IMAGE,
    REPO,
    Container,
    Store,
    _make_store,
    argv_shapes,
    fresh_dir,
    fuse_mounts_under,
    write_context,
)
from tests.engines.treeview import Snapshot, diff_snapshots, from_json
from tests.engines.workloads import (
    BUILT_EXPECTED,
    BUILT_SCRIPT,
    CONTAINERFILE,
    RUN_EXPECTED,
    RUN_SCRIPT,
)

USER = os.environ.get("UNIONFS_TEST_USER", "unionfs-test")
SYSTEM_PYTHON = Path("/usr/bin/python3")
TAG = "localhost/unionfs-test/rootless-built:latest"
COMMITTED = "localhost/unionfs-test/rootless-committed:latest"

# Changes a container makes before it is committed or mounted while stopped.
CHANGES = r"""
set -e
echo new > /new-file
rm /bin/vi /etc/group
rm -rf /root; mkdir /root; echo fresh > /root/only-this
mkdir -p /srv/a/b; echo deep > /srv/a/b/c; ln -s a/b/c /srv/link
chmod 0600 /etc/passwd
mv /bin/ls /bin/ls-moved
"""


def _subordinate_ids(user: str, path: str) -> int:
    """How many subordinate ids *user* has in /etc/subuid or /etc/subgid."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(int(f[2]) for f in (line.split(":") for line in lines) if f[0] == user)


@pytest.fixture(scope="module")
def rootless_user(engines_dir: Path) -> str:
    """The test user, made as ``make test-user`` makes it; fails if rootless podman cannot work."""
    for tool in ("newuidmap", "newgidmap", "runuser"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (bash tests/engines/install-deps.sh installs uidmap)")
    subprocess.run(["bash", str(REPO / "tests" / "user" / "setup-user.sh")], check=True)
    for path in ("/etc/subuid", "/etc/subgid"):
        if _subordinate_ids(USER, path) < 65536:
            pytest.fail(f"{USER} needs 65536 subordinate ids in {path}")
    # The user must reach its stores (and the base image) inside the session dir.
    engines_dir.chmod(0o711)
    return USER


def stage_unionfs(dest: Path) -> Path:
    """unionfs, its runtime dependencies and treeview.py where every user can read
    them; returns the launcher, a script run by the system's python3."""
    if not SYSTEM_PYTHON.exists():
        pytest.fail(f"{SYSTEM_PYTHON} is missing")
    version = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.fail(f"{SYSTEM_PYTHON} is {version}, the venv {sys.version_info[:2]}: "
                    "the compiled modules would not load")  # fmt: skip
    site = dest / "site"
    site.mkdir(parents=True)
    for dist in _runtime_distributions("unionfs"):
        for file in dist.files or ():
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue  # scripts outside site-packages, bytecode
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(str(dist.locate_file(file))), target)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "unionfs", site / "unionfs", ignore=ignore)
    shutil.copy2(REPO / "tests" / "engines" / "treeview.py", dest / "treeview.py")
    launcher = dest / "unionfs"
    launcher.write_text(
        f"#!{SYSTEM_PYTHON} -I\nimport sys\nsys.path.insert(0, {str(site)!r})\n"
        "from unionfs.cli import main\nsys.exit(main())\n"
    )
    launcher.chmod(0o755)
    subprocess.run(["chmod", "-R", "a+rX", str(dest)], check=True)
    return launcher


def _runtime_distributions(name: str) -> list[metadata.Distribution]:
    """*name*'s installed dependencies, recursively (not *name* itself: it is editable)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [name]
    while todo:
        for spec in metadata.distribution(todo.pop()).requires or ():
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            key = req.name.lower()
            if key not in found:
                found[key] = metadata.distribution(req.name)
                todo.append(req.name)
    return list(found.values())


@pytest.fixture(scope="module")
def stage(engines_dir: Path) -> Path:
    return stage_unionfs(fresh_dir(engines_dir, "rootless-stage")).parent


@pytest.fixture(scope="module")
def rl_fuse(rootless_user: str, stage: Path, engines_dir: Path, base_tar: Path) -> Iterator[Store]:
    # No mountopt: the program gets exactly what rootless podman sends by default.
    store = _make_store(
        fresh_dir(engines_dir, "rl-fuse"), "rootless-unionfs", base_tar, stage / "unionfs", None,
        user=rootless_user,
    )  # fmt: skip
    try:
        yield store
    finally:
        ARGV_SHAPES.extend(f"[rootless] {shape}" for shape in argv_shapes(store))
        problems = store.cleanup()
        assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def rl_vfs(rootless_user: str, engines_dir: Path, base_tar: Path) -> Iterator[Store]:
    store = _make_store(
        fresh_dir(engines_dir, "rl-vfs"), "rootless-vfs", base_tar, None, None,
        user=rootless_user, driver="vfs",
    )  # fmt: skip
    try:
        yield store
    finally:
        problems = store.cleanup()
        assert not problems, "\n".join(problems)


def mounted_tree(store: Store, stage: Path, mount: str, what: str) -> Snapshot:
    """The tree of an image (``image mount``) or a container (``mount``) as the
    user namespace sees it: rootless podman mounts only inside ``podman unshare``."""
    unmount = mount.replace("mount", "umount")
    treeview = f"{SYSTEM_PYTHON} -I {stage / 'treeview.py'}"
    script = f'set -e; m=$(podman {mount} "$1"); {treeview} "$m"; podman {unmount} "$1" >/dev/null'
    res = store.podman("unshare", "sh", "-c", script, "sh", what)
    return from_json(res.stdout)[0]


def test_run(rl_fuse: Store) -> None:
    """`podman run`: writes, deletes, renames; the markers in the upper are the
    kernel's format with `userxattr` (whiteouts 0/0, `user.overlay.opaque`)."""
    name = "rootless-run"
    try:
        ctr = rl_fuse.create(name, BASE_IMAGE, "sh", "-c", RUN_SCRIPT)
        res = rl_fuse.podman("start", "-a", name)
        assert res.stdout.split("\n") == RUN_EXPECTED, res.stdout + res.stderr
        _check_mount_call(rl_fuse, ctr)
        upper = Path(ctr.upper)
        whiteout = os.lstat(upper / "bin" / "ls")
        assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
        # `rm -rf /root; mkdir /root` made an opaque directory.
        names = os.listxattr(upper / "root")
        assert os.getxattr(upper / "root", "user.overlay.opaque") == b"y", names
        assert not [n for n in names if n.startswith("trusted.")], names
        # The next container starts from the pristine image again.
        res = rl_fuse.podman("run", "--rm", BASE_IMAGE, "sh", "-c", "test -e /bin/ls && echo ok")
        assert res.stdout == "ok\n"
    finally:
        rl_fuse.podman("rm", "-f", "-t", "0", name, check=False)


def _check_mount_call(store: Store, ctr: Container) -> None:
    """The argv rootless podman 4.3 passes: `-o lowerdir=...,upperdir=...,workdir=...`
    (with no mountopt an empty field follows) and the merged dir; no id mapping,
    since the whole mount lives in podman's user namespace."""
    calls = store.mounts_of(ctr)
    assert calls, store.describe_calls(0)
    call = calls[0]
    keys = [opt.partition("=")[0] for opt in call.options.split(",")]
    assert keys[:3] == ["lowerdir", "upperdir", "workdir"], call.describe()
    assert set(keys[3:]) <= {"", "volatile"}, call.describe()
    assert call.option("workdir") == str(Path(ctr.layer_dir) / "work")
    assert call.cwd == str(store.graphroot / "overlay"), call.describe()
    print(f"rootless mount call: {call.describe()}")


@pytest.fixture(scope="module")
def rootless_built(rl_fuse: Store, rl_vfs: Store, engines_dir: Path) -> None:
    ctx = write_context(fresh_dir(engines_dir, "rootless-context"), CONTAINERFILE)
    subprocess.run(["chmod", "-R", "a+rX", str(ctx)], check=True)
    for store in (rl_fuse, rl_vfs):
        store.podman("build", "--network", "none", "-t", TAG, "-f", "Containerfile", str(ctx))


def test_build_matches_vfs(
    rootless_built: None, rl_fuse: Store, rl_vfs: Store, stage: Path
) -> None:
    """A multi-step build (whiteouts, opaque dirs, renames, a `su` step) gives the
    same tree, file by file, with unionfs as with the vfs driver."""
    got = mounted_tree(rl_fuse, stage, "image mount", TAG)
    want = mounted_tree(rl_vfs, stage, "image mount", TAG)
    assert len(want) > 300  # busybox applets and the build's files
    diffs = diff_snapshots(got, want, "vfs")
    assert not diffs, f"{len(diffs)} differences:\n" + "\n".join(diffs)
    res = rl_fuse.podman("run", "--rm", TAG, "sh", "-c", BUILT_SCRIPT)
    assert res.stdout.split("\n") == BUILT_EXPECTED, res.stdout + res.stderr


def test_commit_matches_vfs(rl_fuse: Store, rl_vfs: Store, stage: Path) -> None:
    """`podman commit` of a changed container stores the same image on both drivers."""
    name = "rootless-commit"
    trees = []
    for store in (rl_fuse, rl_vfs):
        try:
            store.podman("create", "--name", name, BASE_IMAGE, "sh", "-c", CHANGES)
            store.podman("start", "-a", name)
            store.podman("commit", "-q", name, COMMITTED)
        finally:
            store.podman("rm", "-f", "-t", "0", name, check=False)
        trees.append(mounted_tree(store, stage, "image mount", COMMITTED))
    diffs = diff_snapshots(trees[0], trees[1], "vfs")
    assert not diffs, f"{len(diffs)} differences:\n" + "\n".join(diffs)
    script = "cat /new-file /root/only-this; ls -A /root; test ! -e /bin/vi && echo no-vi"
    res = rl_fuse.podman("run", "--rm", COMMITTED, "sh", "-c", script)
    assert res.stdout == "new\nfresh\nonly-this\nno-vi\n", res.stdout + res.stderr


def test_mount_of_a_stopped_container(rl_fuse: Store, rl_vfs: Store, stage: Path) -> None:
    """`podman mount` (inside `podman unshare`) of a stopped container shows its
    changes over the image, as with vfs; the program was called for it again."""
    name = "rootless-stopped"
    trees = []
    try:
        ctr = rl_fuse.create(name, BASE_IMAGE, "sh", "-c", CHANGES)
        rl_fuse.podman("start", "-a", name)
        # conmon unmounts a stopped container's root in the background: wait for
        # that, so that `podman mount` really mounts it again.
        _wait_unmounted(rl_fuse, ctr)
        rl_vfs.podman("create", "--name", name, BASE_IMAGE, "sh", "-c", CHANGES)
        rl_vfs.podman("start", "-a", name)
        for store in (rl_fuse, rl_vfs):
            trees.append(mounted_tree(store, stage, "mount", name))
    finally:
        for store in (rl_fuse, rl_vfs):
            store.podman("rm", "-f", "-t", "0", name, check=False)
    calls = rl_fuse.mounts_of(ctr)
    assert len(calls) == 2, rl_fuse.describe_calls(0)  # `start`, then `mount`
    for call in calls:
        assert call.caller[:1] == ["podman"], call.describe()
    assert trees[0]["new-file"][4] == trees[1]["new-file"][4]
    assert "bin/vi" not in trees[0] and "bin/ls-moved" in trees[0]
    diffs = diff_snapshots(trees[0], trees[1], "vfs")
    assert not diffs, f"{len(diffs)} differences:\n" + "\n".join(diffs)


def _wait_unmounted(store: Store, ctr: Container) -> None:
    pause = store.pause_pid()
    assert pause is not None, "no rootless pause process"
    mountinfo = f"/proc/{pause}/mountinfo"
    deadline = time.monotonic() + 60
    while (ctr.merged, "fuse.unionfs") in fuse_mounts_under(store.graphroot, False, mountinfo):
        assert time.monotonic() < deadline, (
            f"{ctr.merged} still mounted 60s after the stop; events:\n"
            + (store.root / "tmp" / "events" / "events.log").read_text()[-3000:]
            + f"\nunmounts: {store.unmounts_of(ctr)}"
        )
        time.sleep(0.1)


def test_mount_program_runs_as_the_user_in_a_user_namespace(rl_fuse: Store) -> None:
    """The daemon serving a rootless container is the user's process, in podman's
    user namespace, not root's."""
    name = "rootless-daemon"
    uid = pwd.getpwnam(rl_fuse.user or "").pw_uid
    try:
        ctr = rl_fuse.create(name, BASE_IMAGE, "sleep", "600")
        rl_fuse.podman("start", name)
        daemons = [
            pid
            for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if _cmdline(pid)[-1:] == [ctr.merged]
        ]
        assert len(daemons) == 1, daemons
        pid = daemons[0]
        status = Path(f"/proc/{pid}/status").read_text()
        real_uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
        assert int(real_uid) == uid, status
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    finally:
        rl_fuse.podman("rm", "-f", "-t", "0", name, check=False)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
