"""Images as files: an OCI image layout directory, an OCI archive, a docker archive.

``open_image(REF)`` reads any of them into an ``Image``: the manifest and config,
each checked against the digest that names it, and one ``LayerRef`` per layer
with the two digests its blob must match (the manifest's blob digest and the
config's diff_id). Nothing is extracted to read an archive: its members are
read in place, by name. ``append_layer`` writes a new image into a layout the
way ``docker commit`` does (new config, new manifest, a tag in ``index.json``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import posixpath
import re
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from unionfs.image import tarreader
from unionfs.image.digest import Digest, ImageError, hash_file
from unionfs.image.unpack import os_reason
from unionfs.overlay.syscalls import open_beneath

OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
REF_NAME = "org.opencontainers.image.ref.name"

MAX_JSON = 8 << 20  # an index, manifest or config larger than this is not an image
MAX_NESTING = 4  # indexes inside indexes


@dataclass
class LayerRef:
    """One layer of an image, bottom first, and how to read its blob."""

    index: int
    diff_id: Digest  # sha256 of the uncompressed tar, from the config
    digest: Digest | None  # of the blob as stored; None when the source names none
    size: int  # of the blob, -1 when unknown
    media_type: str
    created_by: str
    open: Callable[[], BinaryIO] = field(repr=False)


@dataclass
class Image:
    name: str  # as the user gave it, for messages
    config: dict[str, Any]
    config_digest: Digest
    manifest: dict[str, Any] | None  # None for a docker archive
    layers: list[LayerRef]
    store: _Store | None = field(default=None, repr=False)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- blob stores: a directory or an archive, read by relative path --------------------


class _Store:
    name: str

    def open(self, path: str) -> BinaryIO:
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def size(self, path: str) -> int:
        raise NotImplementedError

    def read_json(self, path: str, what: str, digest: Digest | None = None) -> Any:
        with self.open(path) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise ImageError(f"{self.name}: {what} is larger than {MAX_JSON} bytes")
        if digest is not None:
            got = digest.hasher()
            got.update(data)
            if got.hexdigest() != digest.hex:
                raise ImageError(
                    f"{self.name}: {what} {digest.short}: digest mismatch "
                    f"(content is {digest.algorithm}:{got.hexdigest()[:12]})"
                )
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(f"{self.name}: {what} is not valid JSON: {e}") from None

    def close(self) -> None:
        pass


class _DirStore(_Store):
    """An OCI layout directory; its files are opened without following symlinks."""

    def __init__(self, path: str, name: str) -> None:
        self.name = name
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def _fd(self, path: str) -> int:
        try:
            return open_beneath(self.fd, path.encode(), os.O_RDONLY)
        except OSError as e:
            raise ImageError(f"{self.name}: {path}: {os_reason(e)}") from None

    def open(self, path: str) -> BinaryIO:
        fd = self._fd(path)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ImageError(f"{self.name}: {path}: not a regular file")
        return os.fdopen(fd, "rb")

    def exists(self, path: str) -> bool:
        try:
            os.close(open_beneath(self.fd, path.encode(), os.O_PATH))
        except OSError:
            return False
        return True

    def size(self, path: str) -> int:
        fd = self._fd(path)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def close(self) -> None:
        os.close(self.fd)


class _TarStore(_Store):
    """An archive read in place: members found by normalized name, symlinks between
    members followed inside the archive (old docker archives link shared layers)."""

    def __init__(self, path: str, name: str) -> None:
        self.name = name
        try:
            self.tar = tarreader.open_archive(path)  # kept open, closed by close()
        except OSError as e:
            raise ImageError(f"{name}: {os_reason(e)}") from None
        except tarreader.TarFormatError as e:
            if _ends_early(e):
                raise ImageError(
                    f"{name}: the archive is truncated (it ends inside its last member)"
                ) from None
            raise ImageError(f"{name}: not an uncompressed tar archive: {e}") from None
        self.members: dict[str, tarreader.Entry] = {}
        for m in self.tar.getmembers():
            self.members[_norm(m.name)] = m  # the last of duplicates wins, as tar does

    def _member(self, path: str) -> tarreader.Entry:
        name = _norm(path)
        for _ in range(8):
            m = self.members.get(name)
            if m is None:
                raise ImageError(f"{self.name}: no {path} in the archive")
            if m.issym():
                name = _norm(posixpath.join(posixpath.dirname(name), m.linkname))
                continue
            if m.islnk():
                name = _norm(m.linkname)
                continue
            if not m.isreg():
                raise ImageError(f"{self.name}: {path}: not a regular file in the archive")
            if m.sparse is not None:
                raise ImageError(f"{self.name}: {path}: a sparse file in the archive")
            return m
        raise ImageError(f"{self.name}: {path}: too many symlinks in the archive")

    def open(self, path: str) -> BinaryIO:
        return self.tar.extractfile(self._member(path))

    def exists(self, path: str) -> bool:
        return _norm(path) in self.members

    def size(self, path: str) -> int:
        return self._member(path).size

    def close(self) -> None:
        self.tar.close()


def _ends_early(e: tarreader.TarFormatError) -> bool:
    """Whether the tar reader's error is the file ending where more must follow (in a
    member's data, in a header, in a chain of extended headers), not bad content."""
    text = str(e)
    return (
        isinstance(e, tarreader.Truncated)
        or text == "truncated header"
        or text.startswith("the archive ends inside")
        or text.endswith("(empty header)")
    )


def _norm(name: str) -> str:
    """A member name as a plain relative path (``./a//b/`` -> ``a/b``)."""
    return posixpath.normpath("/" + name).lstrip("/")


# -- references ---------------------------------------------------------------------


def split_ref(ref: str) -> tuple[str, str | None]:
    """``PATH`` or ``PATH:TAG``: the longest prefix that exists wins, so paths with
    colons work and tags with colons (``name:latest`` in a docker archive) too."""
    if os.path.lexists(ref):
        return ref, None
    pos = 0
    while (i := ref.find(":", pos)) >= 0:
        if os.path.lexists(ref[:i]):
            return ref[:i], ref[i + 1 :] or None
        pos = i + 1
    raise ImageError(f"{ref}: no such file or directory")


def open_image(ref: str) -> Image:
    path, tag = split_ref(ref)
    if os.path.isdir(path):
        store: _Store = _DirStore(path, ref)
    elif os.path.isfile(path):
        store = _TarStore(path, ref)
    else:
        raise ImageError(f"{ref}: neither a directory nor an archive")
    try:
        if store.exists("index.json"):
            image = _read_oci(store, ref, tag)
        elif store.exists("manifest.json"):
            image = _read_docker(store, ref, tag)
        else:
            image = None
    except BaseException:
        store.close()
        raise
    if image is not None:
        image.store = store
        return image
    store.close()
    if isinstance(store, _DirStore):
        raise ImageError(f"{ref}: not an OCI image layout (no index.json)")
    if not _ends_as_tar(path):
        raise ImageError(
            f"{ref}: neither an OCI archive nor a docker archive, and it lacks the end "
            "a tar archive has: truncated?"
        )
    raise ImageError(f"{ref}: neither an OCI archive nor a docker archive")


def _ends_as_tar(path: str) -> bool:
    """Whether the file ends with the two zero blocks every tar writer puts last."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < 1024:
                return False
            f.seek(size - 1024)
            return not f.read(1024).strip(b"\0")
    except OSError:
        return True  # nothing more to say


def _blob_path(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


@dataclass
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: dict[str, str]
    platform: dict[str, Any]
    raw: dict[str, Any]

    @classmethod
    def parse(cls, raw: object, what: str) -> Descriptor:
        if not isinstance(raw, dict):
            raise ImageError(f"{what}: not a descriptor")
        size = raw.get("size")
        if not isinstance(size, int) or size < 0:
            raise ImageError(f"{what}: descriptor without a valid size")
        ann = raw.get("annotations") or {}
        plat = raw.get("platform") or {}
        if not isinstance(ann, dict) or not isinstance(plat, dict):
            raise ImageError(f"{what}: malformed descriptor")
        return cls(
            str(raw.get("mediaType", "")),
            Digest.parse(raw.get("digest"), what),
            size,
            ann,
            plat,
            raw,
        )


def _read_verified_json(store: _Store, desc: Descriptor, what: str) -> Any:
    path = _blob_path(desc.digest)
    size = store.size(path)
    if size != desc.size:
        raise ImageError(
            f"{store.name}: {what} {desc.digest.short}: size {size}, the descriptor says {desc.size}"
        )
    return store.read_json(path, what, desc.digest)


def tag_matches(name: str, wanted: str) -> bool:
    """Whether a stored name (``localhost/app:latest``, ``latest``) is what the user
    asked for (``app``, ``app:latest``, ``latest``, or the full name)."""
    if name == wanted:
        return True
    for full in (name, name.split("/", 1)[-1] if name.startswith("localhost/") else name):
        if full == wanted or full == wanted + ":latest":
            return True
    return False


def _choose(descs: list[Descriptor], tag: str | None, name: str) -> Descriptor:
    tags = [d.annotations.get(REF_NAME, "") for d in descs]
    if tag is not None:
        found = [d for d in descs if tag_matches(d.annotations.get(REF_NAME, ""), tag)]
        if not found:
            have = ", ".join(t for t in tags if t) or "none"
            raise ImageError(f"{name}: no image tagged {tag!r} (tags: {have})")
        return found[-1]
    if len(descs) == 1:
        return descs[0]
    if not descs:
        raise ImageError(f"{name}: the image index lists no images")
    have = ", ".join(t for t in tags if t) or "untagged"
    raise ImageError(f"{name}: holds {len(descs)} images; name one as {name}:TAG ({have})")


def _host_platform() -> tuple[str, str]:
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )
    return "linux", arch


def _choose_platform(descs: list[Descriptor], name: str) -> Descriptor:
    if len(descs) == 1:
        return descs[0]
    want_os, want_arch = _host_platform()
    for d in descs:
        if d.platform.get("os") == want_os and d.platform.get("architecture") == want_arch:
            return d
    raise ImageError(f"{name}: no image for {want_os}/{want_arch} in the index")


def _read_oci(store: _Store, name: str, tag: str | None) -> Image:
    index = store.read_json("index.json", "index.json")
    descs = _descriptors(index, "index.json")
    desc = _choose(descs, tag, name)
    for _ in range(MAX_NESTING):
        if desc.media_type not in (OCI_INDEX, DOCKER_LIST):
            break
        nested = _read_verified_json(store, desc, "image index")
        desc = _choose_platform(_descriptors(nested, "image index"), name)
    manifest = _read_verified_json(store, desc, "manifest")
    if not isinstance(manifest, dict):
        raise ImageError(f"{name}: manifest {desc.digest.short} is not an object")
    config_desc = Descriptor.parse(manifest.get("config"), f"{name}: manifest config")
    config = _read_verified_json(store, config_desc, "config")
    diff_ids = _diff_ids(config, name)
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageError(f"{name}: manifest {desc.digest.short} has no layer list")
    if len(raw_layers) != len(diff_ids):
        raise ImageError(
            f"{name}: the manifest lists {len(raw_layers)} layers, the config {len(diff_ids)} diff_ids"
        )
    created = _created_by(config, len(diff_ids))
    layers = []
    for i, raw in enumerate(raw_layers):
        d = Descriptor.parse(raw, f"{name}: layer {i + 1}")
        if d.media_type in (OCI_MANIFEST, OCI_INDEX, OCI_CONFIG):
            raise ImageError(f"{name}: layer {i + 1} has media type {d.media_type}")
        path = _blob_path(d.digest)
        layers.append(
            LayerRef(
                i,
                diff_ids[i],
                d.digest,
                d.size,
                d.media_type,
                created[i],
                _opener(store, path),
            )
        )
    return Image(name, config, config_desc.digest, manifest, layers)


def _opener(store: _Store, path: str) -> Callable[[], BinaryIO]:
    return lambda: store.open(path)


def _descriptors(index: object, what: str) -> list[Descriptor]:
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ImageError(f"{what}: no manifest list")
    return [
        Descriptor.parse(d, f"{what}: manifest {i + 1}") for i, d in enumerate(index["manifests"])
    ]


def _diff_ids(config: object, name: str) -> list[Digest]:
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        raise ImageError(f"{name}: the config has no rootfs.diff_ids")
    return [Digest.parse(d, f"{name}: diff_id {i + 1}") for i, d in enumerate(ids)]


def _created_by(config: dict[str, Any], count: int) -> list[str]:
    """The history's ``created_by`` of each layer (entries marked empty_layer made none)."""
    out = []
    history = config.get("history")
    if isinstance(history, list):
        for h in history:
            if isinstance(h, dict) and not h.get("empty_layer"):
                out.append(str(h.get("created_by", "")))
    out = out[:count]
    return out + [""] * (count - len(out))


def _read_docker(store: _Store, name: str, tag: str | None) -> Image:
    entries = store.read_json("manifest.json", "manifest.json")
    if (
        not isinstance(entries, list)
        or not entries
        or not all(isinstance(e, dict) for e in entries)
    ):
        raise ImageError(f"{name}: manifest.json lists no images")
    if tag is not None:
        found = [
            e for e in entries if any(tag_matches(str(t), tag) for t in e.get("RepoTags") or [])
        ]
        if not found:
            have = ", ".join(str(t) for e in entries for t in e.get("RepoTags") or []) or "none"
            raise ImageError(f"{name}: no image tagged {tag!r} (tags: {have})")
        entry = found[0]
    elif len(entries) == 1:
        entry = entries[0]
    else:
        raise ImageError(f"{name}: holds {len(entries)} images; name one as {name}:TAG")
    config_path = entry.get("Config")
    layer_paths = entry.get("Layers")
    if not isinstance(config_path, str) or not isinstance(layer_paths, list):
        raise ImageError(f"{name}: manifest.json entry without Config or Layers")
    config_digest = _named_digest(config_path)
    config = store.read_json(config_path, "config", config_digest)
    if config_digest is None:
        with store.open(config_path) as f:
            config_digest = hash_file(f)
    diff_ids = _diff_ids(config, name)
    if len(layer_paths) != len(diff_ids):
        raise ImageError(
            f"{name}: manifest.json lists {len(layer_paths)} layers, the config {len(diff_ids)} diff_ids"
        )
    created = _created_by(config, len(diff_ids))
    layers = []
    for i, path in enumerate(layer_paths):
        if not isinstance(path, str):
            raise ImageError(f"{name}: layer {i + 1}: not a path")
        layers.append(
            LayerRef(
                i,
                diff_ids[i],
                _named_digest(path),
                store.size(path),
                DOCKER_LAYER,
                created[i],
                _opener(store, path),
            )
        )
    return Image(name, config, config_digest, None, layers)


def _named_digest(path: str) -> Digest | None:
    """The digest a content-addressed member name states (``HEX.tar``, ``HEX.json``,
    ``blobs/sha256/HEX``); None for names that state none (``ID/layer.tar``)."""
    parts = _norm(path).split("/")
    base = parts[-1]
    if len(parts) == 3 and parts[0] == "blobs":
        return Digest.parse(f"{parts[1]}:{base}", path)
    stem, dot, ext = base.partition(".")
    if dot and ext in ("tar", "json", "tar.gz") and len(stem) == 64:
        try:
            return Digest.parse(f"sha256:{stem}", path)
        except ImageError:
            return None
    return None


# -- writing into a layout ------------------------------------------------------------

# The OCI image spec's grammar of ``org.opencontainers.image.ref.name`` (annotations.md):
#   ref       ::= component ("/" component)*
#   component ::= alphanum (separator alphanum)*
#   alphanum  ::= [A-Za-z0-9]+
#   separator ::= [-._:@+] | "--"
_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_REF_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")


def check_ref_name(name: str) -> None:
    """Refuse a tag that is not a valid ``org.opencontainers.image.ref.name``."""
    if not _REF_NAME.fullmatch(name):
        raise ImageError(
            f"tag {name!r}: not a valid OCI reference name (letters and digits, separated "
            "by one of - . _ : @ + or --, in components separated by /)"
        )


def write_json_atomic(dirfd: int, name: str, obj: object) -> None:
    data = json.dumps(obj, indent=None, separators=(",", ":")).encode()
    _write_atomic(dirfd, name, data)


def _write_atomic(dirfd: int, name: str, data: bytes) -> None:
    tmp = f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644, dir_fd=dirfd)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class LayoutWriter:
    """An OCI image layout directory opened for adding blobs and tags.

    Blobs are written under a temporary name and renamed to their digest, and
    ``index.json`` is replaced atomically, so a crash leaves the layout as it was
    or with unreferenced blobs, never with a reference to a missing blob. The
    writer holds an exclusive ``flock`` on the layout directory from the start
    (making a new layout) to ``close``: each replace of ``index.json`` is atomic,
    but reading it, adding a tag and writing it back is not, so two commits into
    one layout at once would otherwise lose one of the tags.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ImageError(
                f"{path}: not a directory: --image adds to an OCI image layout directory "
                f"(an archive can be copied into one first: skopeo copy oci-archive:{path} oci:DIR)"
            )
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise ImageError(f"{path}: {os_reason(e)}") from None
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageError(f"{path}: {os_reason(e)}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self._init()
        except BaseException:
            os.close(self.fd)
            raise

    def _init(self) -> None:
        """Make the directory a layout when it is empty (under the lock)."""
        path = self.path
        names = os.listdir(self.fd)
        if "oci-layout" not in names:
            if [n for n in names if not n.startswith(".")]:
                raise ImageError(f"{path}: not an OCI image layout and not empty")
            os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
            _write_atomic(
                self.fd, "oci-layout", canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})
            )
            write_json_atomic(self.fd, "index.json", {"schemaVersion": 2, "manifests": []})
        os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)

    def close(self) -> None:
        os.close(self.fd)  # the lock goes with it

    def has_blob(self, digest: Digest) -> bool:
        return os.path.exists(os.path.join(self.path, _blob_path(digest)))

    def add_blob_bytes(self, data: bytes) -> Digest:
        import hashlib

        digest = Digest("sha256", hashlib.sha256(data).hexdigest())
        if not self.has_blob(digest):
            fd, tmp = tempfile.mkstemp(dir=os.path.join(self.path, "blobs", "sha256"), prefix=".")
            try:
                os.write(fd, data)
                os.fsync(fd)
                os.close(fd)
                os.chmod(tmp, 0o644)
                os.rename(tmp, os.path.join(self.path, _blob_path(digest)))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        return digest

    def add_blob_file(self, src: str, digest: Digest) -> None:
        """Put the file *src* (whose digest the caller computed) in as a blob."""
        if self.has_blob(digest):
            return
        dst = os.path.join(self.path, _blob_path(digest))
        tmp = os.path.join(self.path, "blobs", "sha256", f".{digest.hex}.{os.getpid()}")
        try:
            try:
                os.link(src, tmp)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                import shutil

                shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o644)
            os.rename(tmp, dst)
        except OSError as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # a part copied before the disk filled up
            raise ImageError(f"{self.path}: adding blob {digest}: {os_reason(e)}") from None

    def read_index(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.path, "index.json"), "rb") as f:
                index = json.load(f)
        except OSError as e:
            raise ImageError(f"{self.path}: index.json: {os_reason(e)}") from None
        except ValueError as e:
            raise ImageError(f"{self.path}: index.json is not valid JSON: {e}") from None
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise ImageError(f"{self.path}: index.json has no manifest list")
        return index

    def tag(self, descriptor: dict[str, Any], tag: str) -> None:
        """Point *tag* at *descriptor* in index.json (any older image of that tag loses it)."""
        index = self.read_index()
        kept = [
            d
            for d in index["manifests"]
            if not (isinstance(d, dict) and (d.get("annotations") or {}).get(REF_NAME) == tag)
        ]
        desc = dict(descriptor)
        desc["annotations"] = {**(desc.get("annotations") or {}), REF_NAME: tag}
        index["manifests"] = [*kept, desc]
        write_json_atomic(self.fd, "index.json", index)


def new_config(
    base: dict[str, Any] | None, diff_id: Digest, created: str, message: str, created_by: str
) -> dict[str, Any]:
    """The config of *base* with one more layer: its diff_id and a history entry."""
    os_name, arch = _host_platform()
    config: dict[str, Any] = (
        json.loads(json.dumps(base))
        if base
        else {
            "architecture": arch,
            "os": os_name,
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": []},
            "history": [],
        }
    )
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["type"] = "layers"
    rootfs.setdefault("diff_ids", []).append(str(diff_id))
    entry: dict[str, Any] = {"created": created, "created_by": created_by}
    if message:
        entry["comment"] = message
    config.setdefault("history", []).append(entry)
    config["created"] = created
    return config


def rfc3339(epoch: float | None) -> str:
    t = time.time() if epoch is None else epoch
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def append_layer(
    layout: str,
    layer_file: str,
    diff_id: Digest,
    digest: Digest,
    size: int,
    compression: str,
    tag: str,
    message: str,
    created: str,
    created_by: str = "unionfs commit",
) -> Digest:
    """Add the layer in *layer_file* on top of an image of the layout *layout*
    (``DIR`` or ``DIR:BASE``; a new or empty layout starts from nothing) and tag
    the result *tag*: a new config (one more diff_id, one more history entry), a
    new manifest, the tag in index.json. Returns the new manifest's digest."""
    check_ref_name(tag)
    if os.path.lexists(layout) or ":" not in layout:
        path, base_tag = layout, None
    else:
        try:
            path, base_tag = split_ref(layout)
        except ImageError:
            d, _, t = layout.partition(":")
            raise ImageError(
                f"{layout}: no OCI image layout {d} to take the image {t} from "
                f"(--image {d} without :{t} starts a new layout from scratch)"
            ) from None
    made = not os.path.lexists(path)
    writer = LayoutWriter(path)
    try:
        return _append(writer, path, layout, base_tag, layer_file, diff_id, digest, size,
                       compression, tag, message, created, created_by)  # fmt: skip
    except BaseException:
        if made and not _tagged(writer):  # a layout this commit started, still unused
            import shutil

            shutil.rmtree(path, ignore_errors=True)  # (a full disk): nothing is left
        raise
    finally:
        writer.close()


def _tagged(writer: LayoutWriter) -> bool:
    """Whether the layout holds an image (under the writer's lock)."""
    try:
        return bool(writer.read_index()["manifests"])
    except ImageError:
        return False


def _append(
    writer: LayoutWriter,
    path: str,
    layout: str,
    base_tag: str | None,
    layer_file: str,
    diff_id: Digest,
    digest: Digest,
    size: int,
    compression: str,
    tag: str,
    message: str,
    created: str,
    created_by: str,
) -> Digest:
    base: Image | None = None
    if base_tag is not None or writer.read_index()["manifests"]:
        base = open_image(path if base_tag is None else f"{path}:{base_tag}")
        base.close()
    manifest_type = (base.manifest or {}).get("mediaType", OCI_MANIFEST) if base else OCI_MANIFEST
    docker = manifest_type == DOCKER_MANIFEST
    if docker and compression == "zstd":
        raise ImageError(f"{layout}: a docker manifest cannot hold a zstd layer")
    layer_type = DOCKER_LAYER if docker else OCI_LAYER
    if compression == "gzip":
        layer_type += ".gzip" if docker else "+gzip"
    elif compression == "zstd":
        layer_type += "+zstd"
    writer.add_blob_file(layer_file, digest)
    config = new_config(base.config if base else None, diff_id, created, message, created_by)
    config_bytes = canonical_json(config)
    config_digest = writer.add_blob_bytes(config_bytes)
    old = base.manifest if base and base.manifest else None
    manifest: dict[str, Any] = (
        json.loads(json.dumps(old))
        if old
        else {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
        }
    )
    manifest.pop("annotations", None)  # they described the base image
    config_type = (old or {}).get("config", {}).get("mediaType") or (
        DOCKER_CONFIG if docker else OCI_CONFIG
    )
    manifest["config"] = {
        "mediaType": config_type,
        "digest": str(config_digest),
        "size": len(config_bytes),
    }
    layer_desc = {"mediaType": layer_type, "digest": str(digest), "size": size}
    manifest["layers"] = [*(manifest.get("layers") or []), layer_desc]
    manifest_bytes = canonical_json(manifest)
    manifest_digest = writer.add_blob_bytes(manifest_bytes)
    writer.tag(
        {
            "mediaType": manifest.get("mediaType", OCI_MANIFEST),
            "digest": str(manifest_digest),
            "size": len(manifest_bytes),
        },
        tag,
    )
    return manifest_digest
