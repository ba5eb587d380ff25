#!/usr/bin/env python3
"""Image tools benchmark: layer unpack throughput and cached-image mount latency.

Usage (as root, from the repo; ``make bench`` runs it after the main bench)::

    .venv/bin/python tests/bench/images.py [--quick] [--reps N]

* Unpack: one real layer (the machine's Python standard library, dist-packages
  and Perl modules: thousands of real files; ``--quick``: the standard library
  only), uncompressed and gzip-compressed, unpacked by ``tar -x``, by
  ``umoci unpack`` (from an OCI layout holding just that layer) and by
  ``unionfs layer import`` (which also hashes the blob and the tar for both
  digests); ``unionfs layer import --sync``, which flushes the data to disk
  before the directory gets its name, against ``tar -x`` + ``sync -f``.
  Target: ``unionfs layer import`` at most 1.5x ``tar -x``.
* Mount latency: ``unionfs image mount`` of an image whose layers are all in the
  cache (command start to mount ready, daemon mode), against the plain
  ``unionfs -o lowerdir=...`` mount of the same cached directories.

Trials are interleaved (the order rotates each repetition) and each unpacks
into a new directory on the same filesystem, all kept until the last trial (so
no tool writes where many files were just deleted); medians are reported with
the min–max spread, and for each tool the median of its pairwise ratios to the
``tar`` run of the same repetition (less sensitive to the machine's load, which
changes from one repetition to the next). Results go to ``bench-results/<stamp>-images.md``.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, os.fspath(REPO))

from tests.image.builders import Layer, gz, write_oci_layout  # noqa: E402

PY = os.fspath(REPO / ".venv" / "bin" / "python")
UNIONFS = [PY, "-m", "unionfs"]
SOURCES_FULL = ["/usr/lib/python3.11", "/usr/lib/python3/dist-packages", "/usr/share/perl"]
SOURCES_QUICK = ["/usr/lib/python3.11"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_tools() -> None:
    missing = [t for t in ("umoci",) if shutil.which(t) is None]
    if missing:
        log(f"installing with apt-get: {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False, env=env)


def build_layer(root: Path, sources: list[str]) -> tuple[Path, Path, int, int]:
    """The layer as an uncompressed tar and gzipped; its file count and data size."""
    tar = root / "layer.tar"
    tgz = root / "layer.tar.gz"
    if not tar.exists():
        tmp = root / "layer.tar.tmp"
        subprocess.run(
            ["tar", "--numeric-owner", "--sort=name", "-cf", os.fspath(tmp),
             *[s.lstrip("/") for s in sources if os.path.isdir(s)]],
            check=True, cwd="/",
        )  # fmt: skip
        tmp.rename(tar)
        tgz.write_bytes(gz(tar.read_bytes()))
    listing = subprocess.run(
        ["tar", "-tvf", os.fspath(tar)], capture_output=True, text=True, check=True
    )
    files = 0
    size = 0
    for line in listing.stdout.splitlines():
        if line.startswith("-"):
            files += 1
            size += int(line.split()[2])
    return tar, tgz, files, size


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(*args: str) -> None:
    res = subprocess.run(list(args), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")


def fresh(path: Path) -> Path:
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", os.fspath(path)], check=True)
    return path


def unpack_trials(root: Path, tar: Path, tgz: Path, reps: int) -> dict[str, list[float]]:
    layouts = {}
    for kind, blob in (("tar", tar), ("gz", tgz)):
        layout = root / f"layout-{kind}"
        if not layout.exists():
            layer = Layer(tar.read_bytes(), "gzip" if kind == "gz" else "none")
            assert layer.blob == blob.read_bytes()
            write_oci_layout(layout, [layer], tag="bench")
        layouts[kind] = layout
    outs = root / "out"
    fresh(outs)
    trials: dict[str, Callable[[Path], None]] = {
        "tar -x (uncompressed)": lambda out: run(
            "tar", "-xf", os.fspath(tar), "-C", os.fspath(mk(out))
        ),
        "tar -x + sync -f (uncompressed)": lambda out: tar_and_sync(tar, out),
        "umoci unpack (uncompressed)": lambda out: run(
            "umoci", "unpack", "--image", f"{layouts['tar']}:bench", os.fspath(out)
        ),
        "unionfs layer import (uncompressed)": lambda out: run(
            *UNIONFS, "layer", "import", os.fspath(tar), os.fspath(out)
        ),
        "unionfs layer import --sync (uncompressed)": lambda out: run(
            *UNIONFS, "layer", "import", "--sync", os.fspath(tar), os.fspath(out)
        ),
        "tar -xz (gzip)": lambda out: run("tar", "-xzf", os.fspath(tgz), "-C", os.fspath(mk(out))),
        "umoci unpack (gzip)": lambda out: run(
            "umoci", "unpack", "--image", f"{layouts['gz']}:bench", os.fspath(out)
        ),
        "unionfs layer import (gzip)": lambda out: run(
            *UNIONFS, "layer", "import", os.fspath(tgz), os.fspath(out)
        ),
    }
    names = list(trials)
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for i, name in enumerate(order):
                # A new directory each trial, every tree kept until the end: on ext4,
                # files made where many were just deleted cost each tool far more
                # (the allocator skips recently freed inodes), whatever it is.
                out = outs / f"{rep}-{i}"
                times[name].append(timed(functools.partial(trials[name], out)))
            log(
                f"unpack repetition {rep + 1}/{reps}: "
                + ", ".join(f"{n}={times[n][-1]:.2f}s" for n in names)
            )
    finally:
        fresh(outs)
    return times


def baseline(name: str) -> str:
    """The trial a row is compared with: tar doing the same work (decompressing,
    and for ``--sync`` flushing too)."""
    if "gzip" in name:
        return "tar -xz (gzip)"
    if "--sync" in name:
        return "tar -x + sync -f (uncompressed)"
    return "tar -x (uncompressed)"


def tar_and_sync(tar: Path, out: Path) -> None:
    run("tar", "-xf", os.fspath(tar), "-C", os.fspath(mk(out)))
    run("sync", "-f", os.fspath(out))


def mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def mount_trials(root: Path, tgz: Path, reps: int) -> dict[str, list[float]]:
    layout = root / "layout-gz"
    cache = root / "cache"
    mnt = mk(root / "mnt")
    run(
        *UNIONFS,
        "image",
        "mount",
        "--print-kernel-mount",
        "--cache",
        os.fspath(cache),
        os.fspath(layout),
        os.fspath(mnt),
    )
    lowers = ":".join(os.fspath(p) for p in sorted((cache / "layers/sha256").iterdir()))

    def image_mount() -> None:
        run(
            *UNIONFS,
            "image",
            "mount",
            "--cache",
            os.fspath(cache),
            f"{layout}:bench",
            os.fspath(mnt),
        )

    def plain_mount() -> None:
        run(*UNIONFS, "-o", f"lowerdir={lowers}", os.fspath(mnt))

    trials = {
        "unionfs image mount (cached)": image_mount,
        "unionfs -o lowerdir= (same dirs)": plain_mount,
    }
    times: dict[str, list[float]] = {n: [] for n in trials}
    for rep in range(reps):
        for name, fn in list(trials.items())[rep % 2 :] + list(trials.items())[: rep % 2]:
            try:
                times[name].append(timed(fn))
            finally:
                subprocess.run(
                    ["fusermount3", "-u", os.fspath(mnt)], capture_output=True, check=False
                )
                time.sleep(0.2)  # let the daemon exit before the next mount
    return times


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the image bench needs root (owners, device nodes, mounts)")
    reps = args.reps or (3 if args.quick else 5)
    ensure_tools()
    root = mk(REPO / ".bench-cache" / ("images-quick" if args.quick else "images"))
    tar, tgz, files, size = build_layer(root, SOURCES_QUICK if args.quick else SOURCES_FULL)
    log(
        f"layer: {files} files, {size / (1 << 20):.0f} MiB of data, tar {tar.stat().st_size >> 20} MiB, gzip {tgz.stat().st_size >> 20} MiB"
    )
    unpack = unpack_trials(root, tar, tgz, reps)
    mounts = mount_trials(root, tgz, max(reps, 5))
    med = {n: statistics.median(v) for n, v in unpack.items()}
    lines = [
        f"Image tools benchmark ({'quick' if args.quick else 'full'}), {reps} repetitions, "
        f"{os.uname().release} kernel, {os.cpu_count()} CPUs. Layer: {files} files, "
        f"{size / (1 << 20):.0f} MiB of data ({tar.stat().st_size >> 20} MiB tar, "
        f"{tgz.stat().st_size >> 20} MiB gzip).",
        "",
        "| unpack | time, median (min–max) | MiB/s of data | against | ratio of medians "
        "| pairwise, median (min–max) |",
        "|---|---|---|---|---|---|",
    ]
    for name, values in unpack.items():
        base_name = baseline(name)
        # Each repetition's time over the tar run of the same repetition: what the
        # machine's load at that moment did to both cancels out, mostly.
        pairs = [v / b for v, b in zip(values, unpack[base_name], strict=True)]
        lines.append(
            f"| {name} | {cell(values)} | {size / (1 << 20) / med[name]:.0f} "
            f"| {base_name.split(' (')[0]} | {med[name] / med[base_name]:.2f}x "
            f"| {statistics.median(pairs):.2f}x ({min(pairs):.2f}–{max(pairs):.2f}) |"
        )
    goal = statistics.median(
        v / b
        for v, b in zip(
            unpack["unionfs layer import (uncompressed)"],
            unpack["tar -x (uncompressed)"],
            strict=True,
        )
    )
    lines += [
        "",
        f"Goal: `unionfs layer import` at most 1.5x `tar -x` (uncompressed, pairwise median): "
        f"{goal:.2f}x, {'met' if goal <= 1.5 else 'missed'}.",
        "",
        "| mount of a cached image | command start to mount ready, median (min–max) |",
        "|---|---|",
    ]
    for name, values in mounts.items():
        lines.append(f"| {name} | {cell(values)} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y%m%dT%H%M%S')}-images.md"
    path.write_text(text + "\n")
    log(f"summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
