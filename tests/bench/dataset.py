"""Build (once) and cache the layered data set every competitor is measured on.

Why a fixed, cached data set: the comparison is only fair if kernel overlayfs,
fuse-overlayfs, unionfs and the plain-copy baseline all see byte-identical
layers, and building a Debian rootfs takes tens of seconds we do not want to
pay (or to measure) on every run.

Layout of one cached data set (``.bench-cache/data-<name>/``)::

    lower0/   bottom layer: a debootstrap --variant=minbase rootfs (or a
              generated tree of similar shape) plus bench-big/{big.bin,fio.dat}
    lower1/   second layer: a copy of the Python stdlib, modified files,
              whiteouts (char dev 0/0) and one opaque directory
    plain/    a real copy of the merged tree (the native baseline)
    untar.tar the ~5k-file archive W6 extracts into the mount
    ready.json description + DATA_VERSION; its presence means "complete"

The mirror and suite for debootstrap are read from the apt sources already
configured on this machine and are never written to any output or log.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import random
import shutil
import stat
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Bump when the layout or the recipe changes so stale caches are rebuilt.
DATA_VERSION = 3

MiB = 1024 * 1024
BIG_DIR = "bench-big"


@dataclass(frozen=True)
class DataSpec:
    """Sizes of one data-set flavour (full run or --quick)."""

    name: str
    bottom: str  # "debootstrap" or "generated"
    generated_entries: int  # size of the generated bottom tree (fallback / quick)
    big_size: int  # W4/W5 file
    fio_size: int  # W8 file
    stdlib_max_files: int  # cap on files copied from the stdlib into layer 2
    modify_max: int
    whiteout_max: int
    untar_files: int  # W6 archive


FULL = DataSpec("full", "debootstrap", 15000, 1024 * MiB, 256 * MiB, 100000, 150, 600, 5000)
QUICK = DataSpec("quick", "generated", 2000, 64 * MiB, 32 * MiB, 600, 30, 100, 1000)


@dataclass
class Dataset:
    """Paths and facts of a built data set (what the workloads need to know)."""

    root: Path
    spec: DataSpec
    bottom: str  # what the bottom layer actually is: "debootstrap" or "generated"
    lower0: Path
    lower1: Path
    plain: Path
    tarball: Path
    big_rel: str
    fio_rel: str
    rmrf_rel: str  # large lower dir removed by W7
    has_rootfs: bool  # a real rootfs: chroot workloads (W9) are possible
    info: dict[str, object] = field(default_factory=dict)

    @property
    def lowers(self) -> list[Path]:
        """Lower dirs, topmost first (overlayfs ``lowerdir=`` order)."""
        return [self.lower1, self.lower0]


def cache_root(repo: Path) -> Path:
    return repo / ".bench-cache"


# --------------------------------------------------------------------------- #
# debootstrap


def apt_mirror_and_suite() -> tuple[str, str] | None:
    """The first Debian ``main`` source configured for apt: (URI, suite).

    Reads deb822 ``*.sources`` files and one-line ``sources.list`` files so the
    bench uses whatever mirror this machine is set up for, without naming one.
    """
    candidates: list[tuple[str, str]] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        for stanza in text.split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
            if fields.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in fields.get("types", "").split():
                continue
            if "main" not in fields.get("components", "").split():
                continue
            uris, suites = fields.get("uris", "").split(), fields.get("suites", "").split()
            for suite in suites:
                if "-" not in suite:  # skip -updates / -security / -backports
                    candidates.append((uris[0], suite))
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split("#", 1)[0].split()
            if len(parts) >= 4 and parts[0] == "deb":
                rest = [p for p in parts[1:] if not p.startswith("[")]
                if len(rest) >= 3 and "main" in rest[2:] and "-" not in rest[1]:
                    candidates.append((rest[0], rest[1]))
    for uri, suite in candidates:
        if "debian" in uri and "security" not in uri:
            return uri, suite
    return candidates[0] if candidates else None


def build_rootfs(cache: Path, log: Callable[[str], None]) -> Path | None:
    """A pristine minbase rootfs in ``cache/rootfs`` (built once), or None on failure."""
    done = cache / "rootfs"
    stamp = cache / "rootfs.ok"
    if stamp.exists() and done.is_dir():
        return done
    source = apt_mirror_and_suite()
    if source is None or shutil.which("debootstrap") is None:
        log("debootstrap: no apt source or no debootstrap binary; using a generated tree")
        return None
    mirror, suite = source
    partial = cache / "rootfs.partial"
    if partial.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", os.fspath(partial)], check=False)
    log(f"debootstrap --variant=minbase {suite} (from the configured apt mirror) ...")
    try:
        res = subprocess.run(
            ["debootstrap", "--variant=minbase", suite, os.fspath(partial), mirror],
            capture_output=True,
            timeout=900,
        )
        output = (res.stdout + res.stderr).decode(errors="replace").replace(mirror, "<mirror>")
        ok = res.returncode == 0
    except subprocess.TimeoutExpired:
        output, ok = "timed out", False
    (cache / "debootstrap.log").write_text(output)  # scrubbed of the mirror URL
    if not ok:
        log(f"debootstrap failed (see {cache / 'debootstrap.log'}); using a generated tree")
        return None
    if done.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", os.fspath(done)], check=False)
    partial.rename(done)
    stamp.write_text(suite + "\n")
    return done


# --------------------------------------------------------------------------- #
# generated trees


def _loguniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _write_random(path: Path, size: int, rng: random.Random) -> None:
    # randbytes is deterministic per seed; content only needs to be incompressible.
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, MiB)
            f.write(rng.randbytes(n))
            left -= n


def generate_bottom(root: Path, entries: int, seed: int = 1) -> None:
    """A rootfs-shaped tree of about *entries* entries (fallback when debootstrap fails).

    The directories are the ones the layer-2 recipe and the workloads touch
    (etc, usr/share/{doc,man,locale}, ...); sizes are log-uniform 64 B-128 KiB,
    which gives roughly the mean file size of a minbase rootfs.
    """
    rng = random.Random(seed)
    groups = [
        ("etc", 0.03),
        ("usr/bin", 0.05),
        ("usr/lib/x86_64-linux-gnu", 0.15),
        ("usr/share/doc", 0.12),
        ("usr/share/man", 0.15),
        ("usr/share/locale", 0.12),
        ("usr/share/zoneinfo", 0.18),
        ("usr/share/perl5", 0.10),
        ("var/lib/dpkg/info", 0.10),
    ]
    for top, frac in groups:
        n = max(8, int(entries * frac))
        per_dir = rng.randint(12, 40)
        made = 0
        d = 0
        while made < n:
            sub = root / top / f"d{d:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            made += 1
            for i in range(min(per_dir, n - made)):
                _write_random(sub / f"f{i:03d}", _loguniform(rng, 64, 128 * 1024), rng)
                made += 1
            d += 1
    (root / "bin").mkdir(exist_ok=True)
    os.symlink("usr/bin", root / "sbin")


def copy_tree_limited(src: Path, dst: Path, max_files: int) -> int:
    """Copy regular files/dirs/symlinks of *src* (sorted walk, no caches or
    site-packages) until *max_files* files were copied; returns that count."""
    copied = 0
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("__pycache__", "site-packages", "dist-packages")
        )
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        shutil.copystat(dirpath, dst / rel)
        for name in sorted(filenames):
            if copied >= max_files:
                return copied
            s = Path(dirpath) / name
            if s.is_symlink():
                os.symlink(os.readlink(s), dst / rel / name)
            elif s.is_file():
                shutil.copy2(s, dst / rel / name)
            else:
                continue
            copied += 1
    return copied


def _mkdirs_like(lower0: Path, lower1: Path, rel: Path) -> None:
    """Create parent dirs of *rel* in lower1 with the modes/owners of lower0's."""
    parts = rel.parts[:-1]
    for i in range(1, len(parts) + 1):
        sub = Path(*parts[:i])
        target = lower1 / sub
        if not target.exists():
            target.mkdir()
            st = os.lstat(lower0 / sub)
            os.chmod(target, stat.S_IMODE(st.st_mode))
            os.chown(target, st.st_uid, st.st_gid)


def _regular_files(base: Path, under: str) -> list[Path]:
    out: list[Path] = []
    top = base / under
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out.append(p.relative_to(base))
    return out


def build_layer2(lower0: Path, lower1: Path, spec: DataSpec) -> dict[str, object]:
    """The second layer: stdlib copy, modified files, whiteouts, an opaque dir."""
    info: dict[str, object] = {}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pyrel = f"usr/lib/python{sys.version_info.major}.{sys.version_info.minor}"
    lower1.mkdir(parents=True)
    for top in ("usr", "usr/lib"):
        if (lower0 / top).is_dir():
            _mkdirs_like(lower0, lower1, Path(top) / "x")
    info["stdlib_files"] = copy_tree_limited(stdlib, lower1 / pyrel, spec.stdlib_max_files)
    info["rmrf_rel"] = pyrel

    # Modified files: every 4th regular file of etc/ and usr/share/doc/.
    mods = (_regular_files(lower0, "etc") + _regular_files(lower0, "usr/share/doc"))[::4]
    mods = mods[: spec.modify_max]
    for rel in mods:
        _mkdirs_like(lower0, lower1, rel)
        data = (lower0 / rel).read_bytes() + b"\n# modified by layer 2\n"
        (lower1 / rel).write_bytes(data)
        shutil.copystat(lower0 / rel, lower1 / rel)
    info["modified"] = len(mods)

    # Whiteouts (char device 0/0): every 2nd regular file of usr/share/man/.
    wh = _regular_files(lower0, "usr/share/man")[::2][: spec.whiteout_max]
    for rel in wh:
        _mkdirs_like(lower0, lower1, rel)
        os.mknod(lower1 / rel, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    info["whiteouts"] = len(wh)

    # An opaque directory: usr/share/locale is replaced by two new files.
    opaque = Path("usr/share/locale")
    if (lower0 / opaque).is_dir():
        _mkdirs_like(lower0, lower1, opaque)
        (lower1 / opaque).mkdir()
        shutil.copystat(lower0 / opaque, lower1 / opaque)
        os.setxattr(lower1 / opaque, "trusted.overlay.opaque", b"y")
        (lower1 / opaque / "README").write_text("layer 2 replaced this directory\n")
        (lower1 / opaque / "locale.alias").write_text("C.UTF-8 C.UTF-8\n")
        info["opaque_dir"] = str(opaque)
    return info


def build_tarball(path: Path, files: int, seed: int = 7) -> None:
    """An archive of *files* small files in dirs of 50 (W6 untar source)."""
    rng = random.Random(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(files):
            data = rng.randbytes(_loguniform(rng, 64, 16 * 1024))
            ti = tarfile.TarInfo(f"pkg/d{i // 50:03d}/file{i:05d}.dat")
            ti.size = len(data)
            ti.mode = 0o644
            ti.mtime = 1_700_000_000
            tar.addfile(ti, io.BytesIO(data))


def count_entries(root: Path) -> int:
    n = 0
    for _dirpath, dirnames, filenames in os.walk(root):
        n += len(dirnames) + len(filenames)
    return n


def _materialize_plain(lowers: list[Path], plain: Path, scratch: Path) -> None:
    """Copy the merged view to *plain* through a read-only kernel overlay, so the
    baseline is exactly what a correct union shows (whiteouts/opaque applied)."""
    mnt = scratch / "merge-mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    opts = "lowerdir=" + ":".join(os.fspath(p) for p in lowers)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, os.fspath(mnt)], check=True)
    try:
        plain.mkdir()
        subprocess.run(["cp", "-a", f"{mnt}/.", os.fspath(plain)], check=True)
    finally:
        if subprocess.run(["umount", os.fspath(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", os.fspath(mnt)], check=False)


def build_dataset(repo: Path, spec: DataSpec, bottom: str, log: Callable[[str], None]) -> Dataset:
    """Return the cached data set for *spec*, building it first if needed.

    *bottom* is "auto" (debootstrap for the full spec, generated for quick),
    "debootstrap" or "generated". debootstrap failure falls back to generated.
    """
    cache = cache_root(repo)
    cache.mkdir(parents=True, exist_ok=True)
    want = spec.bottom if bottom == "auto" else bottom
    rootfs = build_rootfs(cache, log) if want == "debootstrap" else None
    actual = "debootstrap" if rootfs is not None else "generated"
    root = cache / f"data-{spec.name}-{actual}"
    ready = root / "ready.json"
    if ready.exists():
        meta = json.loads(ready.read_text())
        if meta.get("version") == DATA_VERSION:
            return _dataset_from(root, spec, meta)
    if root.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", os.fspath(root)], check=True)
    log(f"building data set {root.name} (once; cached afterwards) ...")
    root.mkdir(parents=True)
    lower0, lower1 = root / "lower0", root / "lower1"
    if rootfs is not None:
        # Hard links: the cached rootfs and lower0 are both read-only inputs.
        subprocess.run(["cp", "-al", os.fspath(rootfs), os.fspath(lower0)], check=True)
    else:
        lower0.mkdir()
        generate_bottom(lower0, spec.generated_entries)
    big = lower0 / BIG_DIR
    big.mkdir()
    rng = random.Random(42)
    _write_random(big / "big.bin", spec.big_size, rng)
    _write_random(big / "fio.dat", spec.fio_size, rng)
    info = build_layer2(lower0, lower1, spec)
    build_tarball(root / "untar.tar", spec.untar_files)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _materialize_plain([lower1, lower0], root / "plain", Path(tmp))
    info.update(
        bottom=actual,
        lower0_entries=count_entries(lower0),
        lower1_entries=count_entries(lower1),
        merged_entries=count_entries(root / "plain"),
        big_size=spec.big_size,
        fio_size=spec.fio_size,
        untar_files=spec.untar_files,
    )
    meta = {"version": DATA_VERSION, "spec": asdict(spec), "info": info}
    ready.write_text(json.dumps(meta, indent=1))
    return _dataset_from(root, spec, meta)


def _dataset_from(root: Path, spec: DataSpec, meta: dict[str, Any]) -> Dataset:
    info = dict(meta["info"])
    bottom = str(info["bottom"])
    return Dataset(
        root=root,
        spec=spec,
        bottom=bottom,
        lower0=root / "lower0",
        lower1=root / "lower1",
        plain=root / "plain",
        tarball=root / "untar.tar",
        big_rel=f"{BIG_DIR}/big.bin",
        fio_rel=f"{BIG_DIR}/fio.dat",
        rmrf_rel=str(info["rmrf_rel"]),
        has_rootfs=bottom == "debootstrap" and (root / "plain/usr/bin/dpkg").exists(),
        info=info,
    )
