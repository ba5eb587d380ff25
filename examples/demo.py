#!/usr/bin/env python3
"""``make demo``: two image layers, one container's writes, and what each layer holds.

Builds a base layer and an app layer (which deletes a base file with a
whiteout) under examples/demo-run/, mounts them with an empty upper, writes and
deletes through the mount, then shows the merged view and the upper's changes
in the kernel overlay format, and unmounts.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN = HERE / "demo-run"
UNIONFS = [sys.executable, "-m", "unionfs"]


def build_layers() -> dict[str, Path]:
    if RUN.exists():
        subprocess.run(
            ["umount", "-l", os.fspath(RUN / "merged")], capture_output=True, check=False
        )
        shutil.rmtree(RUN)
    d = {n: RUN / n for n in ("base", "app", "upper", "work", "merged")}
    for p in d.values():
        p.mkdir(parents=True)
    base, app = d["base"], d["app"]
    (base / "etc").mkdir()
    (base / "etc" / "os-release").write_text('NAME="Demo Linux"\n')
    (base / "etc" / "motd").write_text("Welcome to the base layer.\n")
    (base / "bin").mkdir()
    (base / "bin" / "hello").write_text("#!/bin/sh\necho hello from the base layer\n")
    os.chmod(base / "bin" / "hello", 0o755)
    (base / "tmp-cache").mkdir()
    (base / "tmp-cache" / "stale").write_text("old cache\n")
    (app / "etc").mkdir()
    (app / "etc" / "app.conf").write_text("port = 8080\n")
    (app / "app").mkdir()
    (app / "app" / "main.py").write_text("print('app layer')\n")
    os.mknod(app / "etc" / "motd", stat.S_IFCHR, 0)  # the app layer deleted motd: a whiteout
    (app / "tmp-cache").mkdir()
    os.setxattr(app / "tmp-cache", "trusted.overlay.opaque", b"y")  # and emptied tmp-cache
    return d


def show(title: str, root: Path) -> None:
    print(f"\n== {title} ({root.relative_to(HERE.parent)})")
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = path.relative_to(root)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            note = "  <- whiteout (char 0/0)"
        elif path.is_dir() and not path.is_symlink():
            try:
                opaque = os.getxattr(path, "trusted.overlay.opaque") == b"y"
            except OSError:
                opaque = False
            note = "/  <- opaque" if opaque else "/"
        else:
            note = f"  ({st.st_size} bytes)"
        print(f"   {rel}{note}")


def main() -> int:
    d = build_layers()
    show("base layer", d["base"])
    show("app layer", d["app"])
    opts = f"lowerdir={d['app']}:{d['base']},upperdir={d['upper']},workdir={d['work']}"
    print(f"\n$ unionfs -o {opts} {d['merged']}")
    subprocess.run(
        [*UNIONFS, "-o", opts, os.fspath(d["merged"])],
        check=True,
        env=dict(os.environ, PYTHONPATH=os.fspath(HERE.parent)),
    )
    m = d["merged"]
    try:
        show("merged view", m)
        print("\n$ echo 'Have a nice day.' >> merged/etc/os-release   # copy-up")
        with open(m / "etc" / "os-release", "a") as f:
            f.write("Have a nice day.\n")
        print("$ rm merged/bin/hello                            # leaves a whiteout")
        (m / "bin" / "hello").unlink()
        print("$ mkdir merged/data && echo 42 > merged/data/answer")
        (m / "data").mkdir()
        (m / "data" / "answer").write_text("42\n")
        show("merged view after the changes", m)
        print("\n$ cat merged/etc/os-release")
        print((m / "etc" / "os-release").read_text(), end="")
    finally:
        subprocess.run(["fusermount3", "-u", os.fspath(m)], check=False)
        for _ in range(100):
            if os.fspath(m) not in Path("/proc/self/mounts").read_text():
                break
            time.sleep(0.05)
    show("upper layer: everything the container changed", d["upper"])
    print(
        "\nUnmounted. The upper above mounts as-is with the kernel overlay "
        "(mount -t overlay ... -o lowerdir=app:base,upperdir=upper,workdir=...)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
