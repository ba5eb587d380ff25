"""Layer tars and images made from Python, for tests that need no container engine.

``Tar`` writes tar entries by hand (hostile ones too: absolute names, ``..``,
links out of the layer), ``write_oci_layout`` / ``write_oci_archive`` /
``write_docker_archive`` wrap layer blobs into the three image formats.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Tar:
    """An in-memory tar, entries added in order."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self.buf = io.BytesIO()
        self.tf = tarfile.open(fileobj=self.buf, mode="w", format=fmt)

    def _info(self, name: str, type_: bytes, mode: int, **kw: object) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = type_
        ti.mode = mode
        ti.mtime = int(kw.pop("mtime", 1_600_000_000))  # type: ignore[call-overload]
        ti.uid = int(kw.pop("uid", 0))  # type: ignore[call-overload]
        ti.gid = int(kw.pop("gid", 0))  # type: ignore[call-overload]
        xattrs: Any = kw.pop("xattrs", None)
        if xattrs:
            ti.pax_headers = {
                "SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
            }
        for k, v in kw.items():
            setattr(ti, k, v)
        return ti

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, **kw: object) -> Tar:
        ti = self._info(name, tarfile.REGTYPE, mode, **kw)
        ti.size = len(data)
        self.tf.addfile(ti, io.BytesIO(data))
        return self

    def dir(self, name: str, mode: int = 0o755, **kw: object) -> Tar:
        self.tf.addfile(self._info(name, tarfile.DIRTYPE, mode, **kw))
        return self

    def symlink(self, name: str, target: str, **kw: object) -> Tar:
        self.tf.addfile(self._info(name, tarfile.SYMTYPE, 0o777, linkname=target, **kw))
        return self

    def hardlink(self, name: str, target: str, **kw: object) -> Tar:
        self.tf.addfile(self._info(name, tarfile.LNKTYPE, 0o644, linkname=target, **kw))
        return self

    def device(self, name: str, kind: bytes, major: int, minor: int, mode: int = 0o600) -> Tar:
        self.tf.addfile(self._info(name, kind, mode, devmajor=major, devminor=minor))
        return self

    def fifo(self, name: str, mode: int = 0o644) -> Tar:
        self.tf.addfile(self._info(name, tarfile.FIFOTYPE, mode))
        return self

    def raw(self, name: str, type_: bytes, data: bytes = b"") -> Tar:
        ti = self._info(name, type_, 0o644)
        ti.size = len(data)
        self.tf.addfile(ti, io.BytesIO(data) if data else None)
        return self

    def whiteout(self, name: str) -> Tar:
        d, _, base = name.rpartition("/")
        return self.file(f"{d}/.wh.{base}" if d else f".wh.{base}")

    def opaque(self, dirname: str) -> Tar:
        return self.file(f"{dirname}/.wh..wh..opq")

    def bytes(self) -> bytes:
        self.tf.close()
        return self.buf.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


@dataclass
class Layer:
    tar: bytes  # uncompressed
    compression: str = "gzip"  # gzip | zstd | none
    created_by: str = ""
    blob_override: bytes | None = None  # stored instead of the real blob (corruption tests)

    @property
    def blob(self) -> bytes:
        if self.compression == "gzip":
            return gz(self.tar)
        if self.compression == "zstd":
            return zstd(self.tar)
        return self.tar

    @property
    def media_type(self) -> str:
        base = "application/vnd.oci.image.layer.v1.tar"
        return {"gzip": base + "+gzip", "zstd": base + "+zstd", "none": base}[self.compression]


@dataclass
class Built:
    """What a builder wrote: digests to check results against."""

    path: Path
    manifest_digest: str = ""
    config_digest: str = ""
    layer_digests: list[str] = field(default_factory=list)
    diff_ids: list[str] = field(default_factory=list)


def config_for(layers: Sequence[Layer], diff_ids: Sequence[str] | None = None) -> dict[str, object]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {
            "type": "layers",
            "diff_ids": list(diff_ids) if diff_ids is not None else [sha256(x.tar) for x in layers],
        },
        "history": [{"created_by": x.created_by or f"layer {i + 1}"} for i, x in enumerate(layers)],
    }


def _put_blob(blobs: Path, data: bytes) -> str:
    d = sha256(data)
    (blobs / d.split(":")[1]).write_bytes(data)
    return d


def write_oci_layout(
    path: Path,
    layers: Sequence[Layer],
    tag: str | None = "latest",
    config: dict[str, object] | None = None,
    extra_tags: Sequence[str] = (),
) -> Built:
    """An OCI image layout directory with one image (tagged *tag* and *extra_tags*)."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    built = Built(path)
    descs = []
    for layer in layers:
        real = layer.blob
        d = sha256(real)
        stored = layer.blob_override if layer.blob_override is not None else real
        (blobs / d.split(":")[1]).write_bytes(stored)
        descs.append({"mediaType": layer.media_type, "digest": d, "size": len(real)})
        built.layer_digests.append(d)
        built.diff_ids.append(sha256(layer.tar))
    cfg = json.dumps(config or config_for(layers)).encode()
    built.config_digest = _put_blob(blobs, cfg)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": built.config_digest,
            "size": len(cfg),
        },
        "layers": descs,
    }
    mbytes = json.dumps(manifest).encode()
    built.manifest_digest = _put_blob(blobs, mbytes)
    index_path = path / "index.json"
    index: Any = (
        json.loads(index_path.read_text())
        if index_path.exists()
        else {"schemaVersion": 2, "manifests": []}
    )
    for t in [tag, *extra_tags]:
        desc: dict[str, object] = {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": built.manifest_digest,
            "size": len(mbytes),
        }
        if t is not None:
            desc["annotations"] = {"org.opencontainers.image.ref.name": t}
        index["manifests"].append(desc)
    index_path.write_text(json.dumps(index))
    return built


def tar_directory(src: Path, dest: Path) -> None:
    """An uncompressed archive of the directory *src* (member names relative to it)."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(os.listdir(src)):
            tf.add(src / name, arcname=name)


def write_oci_archive(path: Path, layers: Sequence[Layer], tag: str | None = "latest") -> Built:
    layout = path.with_name(path.name + ".layout")
    built = write_oci_layout(layout, layers, tag)
    tar_directory(layout, path)
    built.path = path
    return built


def write_docker_archive(
    path: Path, layers: Sequence[Layer], tags: Sequence[str] = ("localhost/test:latest",)
) -> Built:
    """A docker-archive as docker/podman save write it: HEX.json config, HEX.tar layers."""
    built = Built(path)
    with tarfile.open(path, "w") as tf:

        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

        names = []
        for layer in layers:
            d = sha256(layer.tar)
            name = d.split(":")[1] + ".tar"
            add(name, layer.tar if layer.blob_override is None else layer.blob_override)
            names.append(name)
            built.layer_digests.append(d)
            built.diff_ids.append(d)
        cfg = json.dumps(config_for(layers)).encode()
        built.config_digest = sha256(cfg)
        add(built.config_digest.split(":")[1] + ".json", cfg)
        manifest = [
            {
                "Config": built.config_digest.split(":")[1] + ".json",
                "RepoTags": list(tags),
                "Layers": names,
            }
        ]
        add("manifest.json", json.dumps(manifest).encode())
    return built


# -- raw tar blocks: headers no tar writer would make ----------------------------------

END = bytes(1024)  # the end-of-archive marker


def padded(data: bytes) -> bytes:
    """*data* padded with zeros to a whole number of 512-byte blocks."""
    return data + bytes(-len(data) % 512)


def raw_header(
    name: bytes,
    size: int = 0,
    type_: bytes = b"0",
    *,
    size_field: bytes | None = None,
    mode: int = 0o644,
) -> bytes:
    """One ustar header block with a valid checksum; *size_field* replaces the
    encoded size (a base-256 negative number, say)."""
    b = bytearray(512)
    b[0 : len(name)] = name
    b[100:108] = b"%07o\0" % mode
    b[108:116] = b"0000000\0"
    b[116:124] = b"0000000\0"
    b[124:136] = size_field if size_field is not None else b"%011o\0" % size
    b[136:148] = b"00000001750\0"
    b[156:157] = type_
    b[257:265] = b"ustar\x0000"
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def raw_file(name: bytes, data: bytes = b"") -> bytes:
    return raw_header(name, len(data)) + padded(data)


def pax_record(key: bytes, value: bytes) -> bytes:
    """``LENGTH KEY=VALUE\\n``, LENGTH counting itself."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def pax_header(body: bytes, type_: bytes = b"x") -> bytes:
    """A PAX extended (``x``) or global (``g``) header whose data is *body*, as is."""
    return raw_header(b"././@PaxHeader", len(body), type_) + padded(body)
