"""Read container images from ``docker save`` archives and OCI image layouts, without extracting them.

Theory of operation
-------------------
An image is a *config* blob (JSON; its sha256 is the image id) and an ordered list of *layers*, each a
tar stream, possibly compressed.  The config's ``rootfs.diff_ids`` name the sha256 of every layer's
**uncompressed** tar; chaining them gives the layer chain ids (:func:`chain_id`), which is how the layer
database names layers.

Three kinds of container hold these blobs, all read through one small member store:

* a ``docker save`` tarball: ``manifest.json`` lists, per image, ``Config`` (the config member),
  ``RepoTags`` and ``Layers`` (members).  Before Docker 25 layers are ``<v1 id>/layer.tar`` (a repeated
  layer may be a symlink to another one's ``layer.tar``); Docker 25 and later write an OCI-style archive
  whose members are ``blobs/sha256/<hex>`` and which carries ``index.json`` and ``oci-layout`` as well;
  ``manifest.json`` wins when both are present because it has the tags;
* an OCI image layout directory: ``oci-layout``, ``index.json`` -> manifest(s) -> config + layers,
  possibly through nested image indexes (multi-platform images: every platform is listed, with the
  index's name); tags come from the annotation ``io.containerd.image.name`` (a full reference) or
  ``org.opencontainers.image.ref.name`` when that is a full reference too (a bare tag such as ``latest``
  is passed on as ``ImageSource.ref_name`` only);
* the same OCI layout packed into a tar.

Only named members are ever read: names that come from JSON are checked (no ``..``, not absolute) and
looked up in the tar's member table (random access with ``tarfile.extractfile``) or under the layout
directory (symlinks may not lead out of it).  Nothing is written to disk.

Trust: every JSON blob addressed by digest (OCI manifests, indexes, configs; the config of a docker save
archive when its member name carries the digest) is checked against its size and sha256 before it is
parsed.  Layer streams are checked while they are read: :class:`DigestReader` hashes the decompressed
bytes (the diff id) and, when the archive names the stored blob by digest, the stored bytes too.
Compression is recognised by magic number (gzip, bzip2, xz; zstd is refused), as ``docker load`` does;
the declared media type is informational except that zstd, unknown, and missing foreign layers are
refused.  Memory stays bounded: JSON documents are capped at :data:`MAX_JSON_BYTES` and layers are
streamed in :data:`CHUNK_BYTES` pieces.

An :class:`ArchiveHandle` owns the open archive; the :class:`LayerSource` objects it hands out read from it
and must not be used after it is closed.  Nothing here is thread-safe: streams of one archive share its
file offset, so read them from one thread.
"""

from __future__ import annotations

import bz2
import contextlib
import functools
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import posixpath
import re
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Protocol

from devmapper.errors import DevmapperError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

#: Largest JSON document (manifest, index, config) read into memory; real configs are well under 1 MiB.
MAX_JSON_BYTES = 32 * 1024 * 1024
#: Piece size for streaming layers.
CHUNK_BYTES = 1024 * 1024
#: Nesting limit for image indexes (a multi-platform index inside the layout's index.json is depth 1).
MAX_INDEX_DEPTH = 4
#: Symlink/hard-link hops followed when a docker save member is a link to another member.
MAX_LINK_HOPS = 8

DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

_READABLE_LAYER_TYPES = frozenset({DOCKER_LAYER_TAR, DOCKER_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_GZIP})
_FOREIGN_LAYER_TYPES = frozenset(
    {DOCKER_LAYER_FOREIGN, OCI_LAYER_NONDISTRIBUTABLE, OCI_LAYER_NONDISTRIBUTABLE + "+gzip"}
)
_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
_INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
_CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_BLOB_MEMBER = re.compile(r"blobs/sha256/([0-9a-f]{64})")
_LEGACY_CONFIG_MEMBER = re.compile(r"([0-9a-f]{64})\.json")

_GZIP_MAGIC = b"\x1f\x8b"
_BZIP2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ImageFormatError(DevmapperError):
    """An image archive is malformed, unsupported, or does not match its own digests."""


class InvalidReferenceError(DevmapperError):
    """An image reference (``name[:tag][@digest]``) does not follow Docker's reference grammar."""


# -- digests and chain ids -------------------------------------------------------------------------


def is_digest(value: object) -> bool:
    """Return whether ``value`` is a ``sha256:<64 lowercase hex>`` string."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def _check_digest(value: object, what: str) -> str:
    """Return ``value`` if it is a sha256 digest string, else raise ImageFormatError naming ``what``."""
    if is_digest(value):
        assert isinstance(value, str)
        return value
    if isinstance(value, str) and ":" in value and not value.startswith("sha256:"):
        raise ImageFormatError(f"{what}: unsupported digest algorithm in {value!r} (only sha256 is supported)")
    raise ImageFormatError(f"{what}: invalid digest {value!r} (expected 'sha256:' and 64 lowercase hex digits)")


def chain_id(parent_chain: str | None, diff_id: str) -> str:
    """Return the ChainID of a layer: its diff id for a base layer, else sha256("<parent chain> <diff id>").

    This is the OCI image-spec rule Docker's layer store uses to name ``layerdb/sha256/<chain hex>``.
    """
    _check_digest(diff_id, "diff id")
    if parent_chain is None:
        return diff_id
    _check_digest(parent_chain, "parent chain id")
    return "sha256:" + hashlib.sha256(f"{parent_chain} {diff_id}".encode("ascii")).hexdigest()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """Return the chain id of every prefix of ``diff_ids``."""
    out: list[str] = []
    parent: str | None = None
    for diff_id in diff_ids:
        parent = chain_id(parent, diff_id)
        out.append(parent)
    return out


def config_diff_ids(config: bytes, what: str = "image config") -> list[str]:
    """Parse an image config and return its ``rootfs.diff_ids`` (checked to be sha256 digests)."""
    try:
        doc = json.loads(config)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageFormatError(f"{what}: invalid JSON: {exc}") from exc
    return _diff_ids_of(doc, what)


def _diff_ids_of(doc: object, what: str) -> list[str]:
    if not isinstance(doc, dict):
        raise ImageFormatError(f"{what}: expected a JSON object")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict):
        raise ImageFormatError(f"{what}: missing 'rootfs'")
    if rootfs.get("type") != "layers":
        raise ImageFormatError(f"{what}: rootfs.type is {rootfs.get('type')!r}, expected 'layers'")
    diff_ids = rootfs.get("diff_ids", [])
    if not isinstance(diff_ids, list):
        raise ImageFormatError(f"{what}: rootfs.diff_ids is not a list")
    return [_check_digest(d, f"{what}: rootfs.diff_ids[{i}]") for i, d in enumerate(diff_ids)]


# -- references ------------------------------------------------------------------------------------

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_PATH_RE = re.compile(rf"{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*")
_DOMAIN_RE = re.compile(_DOMAIN)
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_REF_DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_MAX_NAME_LEN = 255
DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"


def familiar_reference(ref: str) -> tuple[str, str]:
    """Return ``(repository, reference)`` the way Docker's reference store keys ``repositories.json``.

    ``docker.io/library/busybox`` and ``busybox`` both give ``("busybox", "busybox:latest")``: the default
    registry and ``library/`` are dropped, a missing tag becomes ``latest``, and a reference with both a
    tag and a digest keeps only the digest.  Other registries and tags are kept as given.  Anything that
    is not a valid reference (upper case in the path, ``..``, absolute paths, backslashes, bad tags)
    raises InvalidReferenceError.
    """
    if not isinstance(ref, str) or not ref:
        raise InvalidReferenceError(f"invalid reference {ref!r}: empty")
    name, digest = ref, None
    if "@" in ref:
        name, digest = ref.split("@", 1)
        if _REF_DIGEST_RE.fullmatch(digest) is None:
            raise InvalidReferenceError(f"invalid reference {ref!r}: bad digest {digest!r}")
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if _TAG_RE.fullmatch(tag) is None:
            raise InvalidReferenceError(f"invalid reference {ref!r}: bad tag {tag!r}")
    domain, path = _split_domain(name, ref)
    if len(name) > _MAX_NAME_LEN:
        raise InvalidReferenceError(f"invalid reference {ref!r}: name longer than {_MAX_NAME_LEN} characters")
    if _PATH_RE.fullmatch(path) is None:
        raise InvalidReferenceError(
            f"invalid reference {ref!r}: repository path {path!r} must be lowercase components "
            "of [a-z0-9] joined by '.', '_', '__' or '-', separated by '/'"
        )
    if domain == DEFAULT_DOMAIN:
        repository = path.removeprefix("library/") if path.count("/") == 1 else path
    else:
        repository = f"{domain}/{path}"
    if repository == "sha256":
        raise InvalidReferenceError(f"invalid reference {ref!r}: 'sha256' is ambiguous as a repository name")
    if digest is not None:
        return repository, f"{repository}@{digest}"
    return repository, f"{repository}:{tag or DEFAULT_TAG}"


def _split_domain(name: str, ref: str) -> tuple[str, str]:
    """Split ``name`` into (registry domain, repository path) as Docker's splitDockerDomain does."""
    first, sep, rest = name.partition("/")
    if sep and (any(c in first for c in ".:") or first == "localhost" or first.lower() != first):
        if _DOMAIN_RE.fullmatch(first) is None:
            raise InvalidReferenceError(f"invalid reference {ref!r}: bad registry {first!r}")
        domain, path = first, rest
    else:
        domain, path = DEFAULT_DOMAIN, name
    if domain == "index.docker.io":
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = "library/" + path
    return domain, path


# -- layer streams ---------------------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """Raw reader that hashes and counts every byte it passes on (the stored, maybe compressed, blob)."""

    def __init__(self, inner: IO[bytes]) -> None:
        super().__init__()
        self._inner = inner
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._inner.read(len(view))
        n = len(data)
        view[:n] = data
        self.sha256.update(data)
        self.nbytes += n
        return n

    def drain(self) -> None:
        """Read (and hash) the rest of the inner stream."""
        while data := self._inner.read(CHUNK_BYTES):
            self.sha256.update(data)
            self.nbytes += len(data)


class DigestReader(io.RawIOBase):
    """A layer's decompressed tar stream that hashes what it hands out.

    ``read``/``readinto`` behave as on any raw binary stream; ``bytes_read`` counts decompressed bytes.
    :meth:`verify` reads whatever the caller left unread (a tar reader usually stops at the end-of-archive
    blocks, before the record padding), then compares the sha256 of the whole stream with the layer's diff
    id and, when the archive named the stored blob by digest, the stored bytes with that digest.  Only a
    verified stream may be trusted: callers apply the layer, then call ``verify()`` before committing it.
    Decompression errors surface as ImageFormatError.
    """

    def __init__(
        self,
        stream: io.BufferedIOBase,
        *,
        diff_id: str,
        blob_digest: str | None = None,
        raw: _HashingReader | None = None,
    ) -> None:
        super().__init__()
        self._stream = stream
        self._raw = raw
        self._sha256 = hashlib.sha256()
        self.diff_id = diff_id
        self.blob_digest = blob_digest
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        try:
            n = self._stream.readinto(buffer)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise ImageFormatError(f"layer {self.diff_id}: cannot read layer stream: {exc}") from exc
        if n:
            self._sha256.update(memoryview(buffer).cast("B")[:n])
            self.bytes_read += n
        return n or 0

    def verify(self) -> None:
        """Read to EOF and raise ImageFormatError unless the stream matches its digests."""
        chunk = bytearray(CHUNK_BYTES)
        while self.readinto(chunk):
            pass
        got = "sha256:" + self._sha256.hexdigest()
        if got != self.diff_id:
            raise ImageFormatError(
                f"layer {self.diff_id} digest mismatch: its uncompressed content ({self.bytes_read} bytes) "
                f"hashes to {got}"
            )
        if self._raw is not None and self.blob_digest is not None:
            self._raw.drain()
            got = "sha256:" + self._raw.sha256.hexdigest()
            if got != self.blob_digest:
                raise ImageFormatError(
                    f"layer blob {self.blob_digest} digest mismatch: the stored blob hashes to {got}"
                )

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError, EOFError, zlib.error, lzma.LZMAError):
                self._stream.close()
        super().close()


def _compression_of(magic: bytes) -> str:
    """Name the compression of a layer blob from its first bytes: gzip, bzip2, xz, zstd or tar."""
    if magic.startswith(_GZIP_MAGIC):
        return "gzip"
    if magic.startswith(_BZIP2_MAGIC):
        return "bzip2"
    if magic.startswith(_XZ_MAGIC):
        return "xz"
    if magic.startswith(_ZSTD_MAGIC):
        return "zstd"
    return "tar"


def _no_opener() -> IO[bytes]:
    raise ImageFormatError("layer has no stored blob")


@dataclass(frozen=True)
class LayerSource:
    """One layer of an image: its diff id, declared media type, stored size, and a way to stream it."""

    diff_id: str
    media_type: str
    size: int | None
    blob_digest: str | None = None  # digest of the stored (maybe compressed) blob, when the archive names it
    _opener: Callable[[], IO[bytes]] = field(default=_no_opener, repr=False, compare=False)

    @contextlib.contextmanager
    def open(self) -> Iterator[DigestReader]:
        """Yield the decompressed tar stream of this layer (call ``verify()`` on it after use).

        Compression is detected from the magic number; zstd raises ImageFormatError.  The stream is closed
        on exit; the archive that produced this source must still be open.
        """
        inner = self._opener()
        try:
            hashing = _HashingReader(inner)
            buffered = io.BufferedReader(hashing, CHUNK_BYTES)
            kind = _compression_of(buffered.peek(6)[:6])
            stream: io.BufferedIOBase
            if kind == "zstd":
                raise ImageFormatError(f"layer {self.diff_id}: zstd layers are not supported")
            if kind == "gzip":
                stream = gzip.GzipFile(fileobj=buffered, mode="rb")
            elif kind == "bzip2":
                stream = bz2.BZ2File(buffered)
            elif kind == "xz":
                stream = lzma.LZMAFile(buffered)  # noqa: SIM115 (closed by DigestReader)
            else:
                stream = buffered
            # An uncompressed blob named by its diff id is checked by the diff id alone.
            check_blob = self.blob_digest is not None and (kind != "tar" or self.blob_digest != self.diff_id)
            reader = DigestReader(
                stream, diff_id=self.diff_id, blob_digest=self.blob_digest, raw=hashing if check_blob else None
            )
            try:
                yield reader
            finally:
                reader.close()
        finally:
            inner.close()


@dataclass(frozen=True)
class ImageSource:
    """One image of an archive: its config bytes and id, tags, and layers (base first)."""

    config: bytes
    image_id: str
    repo_tags: list[str]
    layers: list[LayerSource]
    ref_name: str | None = None  # an OCI layout's org.opencontainers.image.ref.name annotation, as written

    def diff_ids(self) -> list[str]:
        """Return the diff ids of the layers, base first."""
        return [layer.diff_id for layer in self.layers]

    def chain_ids(self) -> list[str]:
        """Return the chain id of every layer, base first (the last one names the image's top layer)."""
        return chain_ids(self.diff_ids())


# -- member stores ---------------------------------------------------------------------------------


def _safe_member_name(name: object, what: str) -> str:
    """Return ``name`` normalised (no leading ``./``) if it stays inside the archive, else raise."""
    if not isinstance(name, str) or not name:
        raise ImageFormatError(f"{what}: invalid member name {name!r}")
    if "\0" in name or "\\" in name or name.startswith("/"):
        raise ImageFormatError(f"{what}: unsafe member name {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ImageFormatError(f"{what}: unsafe member name {name!r}")
    return "/".join(parts)


class _Store(Protocol):
    label: str

    def size_of(self, name: str) -> int | None:
        """Size of the regular file a member name resolves to, None if there is none."""

    def open_member(self, name: str) -> IO[bytes]:
        """Open a member for reading; raise ImageFormatError if it is missing or not a file."""

    def close(self) -> None:
        """Release the archive."""


class _TarStore:
    """Members of a tar archive, read in place with ``tarfile`` random access."""

    def __init__(self, path: Path) -> None:
        self.label = str(path)
        try:
            # "r:*" also reads a compressed archive (docker save | gzip); random access then re-reads from
            # the start on every backwards seek, which is slow but correct.
            self._tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 (closed by close())
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise ImageFormatError(f"{path}: not a tar archive or OCI layout directory: {exc}") from exc
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            for member in self._tar.getmembers():
                try:
                    key = _safe_member_name(member.name, self.label)
                except ImageFormatError:
                    continue  # never looked up: names from JSON are checked the same way
                self._members[key] = member  # a later entry wins, as on extraction
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            self._tar.close()
            raise ImageFormatError(f"{path}: damaged tar archive: {exc}") from exc
        self._closed = False

    def _resolve(self, name: str) -> tarfile.TarInfo | None:
        for _ in range(MAX_LINK_HOPS + 1):
            member = self._members.get(name)
            if member is None:
                return None
            if member.isreg():
                return member
            if member.issym():
                if member.linkname.startswith("/"):
                    raise ImageFormatError(f"{self.label}: member {name!r} is an absolute symlink")
                target = posixpath.join(posixpath.dirname(name), member.linkname)
                name = _safe_member_name(posixpath.normpath(target), f"{self.label}: symlink {name!r}")
            elif member.islnk():
                name = _safe_member_name(member.linkname, f"{self.label}: hard link {name!r}")
            else:
                raise ImageFormatError(f"{self.label}: member {name!r} is not a regular file")
        raise ImageFormatError(f"{self.label}: too many links resolving member {name!r}")

    def size_of(self, name: str) -> int | None:
        member = self._resolve(name)
        return None if member is None else member.size

    def open_member(self, name: str) -> IO[bytes]:
        if self._closed:
            raise ValueError(f"{self.label}: image archive is closed")
        member = self._resolve(name)
        if member is None:
            raise ImageFormatError(f"{self.label}: missing member {name!r}")
        fileobj = self._tar.extractfile(member)
        if fileobj is None:
            raise ImageFormatError(f"{self.label}: member {name!r} is not a regular file")
        return fileobj

    def close(self) -> None:
        self._closed = True
        self._tar.close()


class _DirStore:
    """Files of an OCI layout directory; a symlink may not lead out of the directory."""

    def __init__(self, path: Path) -> None:
        self.label = str(path)
        self._root = Path(os.path.realpath(path))
        self._closed = False

    def _path(self, name: str) -> Path | None:
        path = Path(os.path.realpath(self._root / name))
        if path != self._root and self._root not in path.parents:
            raise ImageFormatError(f"{self.label}: {name!r} leads outside the layout directory")
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise ImageFormatError(f"{self.label}: {name!r} is not a regular file")
        return path

    def size_of(self, name: str) -> int | None:
        path = self._path(name)
        return None if path is None else path.stat().st_size

    def open_member(self, name: str) -> IO[bytes]:
        if self._closed:
            raise ValueError(f"{self.label}: image layout is closed")
        path = self._path(name)
        if path is None:
            raise ImageFormatError(f"{self.label}: missing {name!r}")
        return path.open("rb")

    def close(self) -> None:
        self._closed = True


def _read_blob(store: _Store, name: str, what: str, *, digest: str | None = None, size: int | None = None) -> bytes:
    """Read a small member whole, checking its size cap, declared size and digest."""
    with store.open_member(name) as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ImageFormatError(f"{what}: larger than {MAX_JSON_BYTES} bytes")
    if size is not None and len(data) != size:
        raise ImageFormatError(f"{what}: size mismatch: descriptor says {size} bytes, blob has {len(data)}")
    if digest is not None:
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != digest:
            raise ImageFormatError(f"{what} {digest} digest mismatch: the blob hashes to {got}")
    return data


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageFormatError(f"{what}: invalid JSON: {exc}") from exc


def _field(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = doc.get(key)
    if value is None:
        raise ImageFormatError(f"{what}: missing {key!r}")
    if not isinstance(value, kind):
        raise ImageFormatError(f"{what}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _check_layer_type(media_type: str, digest: str, present: bool) -> None:
    """Refuse layers we cannot read: zstd, unknown types, and foreign layers whose blob is absent."""
    if "zstd" in media_type:
        raise ImageFormatError(f"layer {digest}: zstd layers are not supported ({media_type})")
    if media_type in _FOREIGN_LAYER_TYPES:
        if not present:
            raise ImageFormatError(
                f"layer {digest}: foreign (non-distributable) layer of type {media_type} is not in the archive; "
                "foreign layers are not supported"
            )
        return
    if media_type not in _READABLE_LAYER_TYPES:
        raise ImageFormatError(f"layer {digest}: unsupported layer media type {media_type!r}")


# -- docker save ----------------------------------------------------------------------------------


def _docker_save_images(store: _Store) -> list[ImageSource]:
    doc = _parse_json(_read_blob(store, "manifest.json", "manifest.json"), "manifest.json")
    if not isinstance(doc, list):
        raise ImageFormatError("manifest.json: expected a list of images")
    images = []
    for i, entry in enumerate(doc):
        what = "manifest.json" if len(doc) == 1 else f"manifest.json[{i}]"
        if not isinstance(entry, dict):
            raise ImageFormatError(f"{what}: expected an object")
        images.append(_docker_save_image(store, entry, what))
    return images


def _digest_of_member(name: str) -> str | None:
    """The digest a member name carries (``blobs/sha256/<hex>`` or legacy ``<hex>.json``), if any."""
    match = _BLOB_MEMBER.fullmatch(name) or _LEGACY_CONFIG_MEMBER.fullmatch(name)
    return None if match is None else "sha256:" + match.group(1)


def _docker_save_image(store: _Store, entry: dict[str, Any], what: str) -> ImageSource:
    config_name = _safe_member_name(_field(entry, "Config", str, what), what)
    layer_names = _field(entry, "Layers", list, what)
    repo_tags = entry.get("RepoTags") or []
    if not isinstance(repo_tags, list) or not all(isinstance(t, str) for t in repo_tags):
        raise ImageFormatError(f"{what}: 'RepoTags' is not a list of strings")
    sources = entry.get("LayerSources") or {}
    if not isinstance(sources, dict):
        raise ImageFormatError(f"{what}: 'LayerSources' is not an object")
    if store.size_of(config_name) is None:
        raise ImageFormatError(f"{what}: config {config_name!r} is missing from the archive")
    config = _read_blob(store, config_name, config_name, digest=_digest_of_member(config_name))
    diff_ids = _diff_ids_of(_parse_json(config, config_name), config_name)
    if len(diff_ids) != len(layer_names):
        raise ImageFormatError(
            f"{config_name}: rootfs.diff_ids has {len(diff_ids)} entries but {what} lists {len(layer_names)} layers"
        )
    layers = []
    for diff_id, raw_name in zip(diff_ids, layer_names, strict=True):
        name = _safe_member_name(raw_name, f"{what}: Layers")
        size = store.size_of(name)
        media_type = DOCKER_LAYER_TAR
        declared = sources.get(diff_id)
        if isinstance(declared, dict) and isinstance(declared.get("mediaType"), str):
            media_type = declared["mediaType"]
        _check_layer_type(media_type, diff_id, size is not None)
        if size is None:
            raise ImageFormatError(f"{what}: layer {name!r} ({diff_id}) is missing from the archive")
        opener = functools.partial(store.open_member, name)
        layers.append(LayerSource(diff_id, media_type, size, _digest_of_member(name), opener))
    image_id = "sha256:" + hashlib.sha256(config).hexdigest()
    return ImageSource(config, image_id, list(repo_tags), layers)


# -- OCI image layout -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str]

    @property
    def member(self) -> str:
        return "blobs/sha256/" + self.digest.removeprefix("sha256:")


def _descriptor(doc: object, what: str) -> _Descriptor:
    if not isinstance(doc, dict):
        raise ImageFormatError(f"{what}: expected a descriptor object")
    media_type = _field(doc, "mediaType", str, what)
    digest = _check_digest(_field(doc, "digest", str, what), what)
    size = _field(doc, "size", int, what)
    if isinstance(size, bool) or size < 0:
        raise ImageFormatError(f"{what}: invalid size {size!r}")
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ImageFormatError(f"{what}: 'annotations' is not an object")
    return _Descriptor(media_type, digest, size, {k: v for k, v in annotations.items() if isinstance(v, str)})


@dataclass(frozen=True)
class _Naming:
    """What an index descriptor's annotations say about its image's name."""

    repo_tags: list[str]
    ref_name: str | None


def _naming(annotations: dict[str, str], what: str) -> _Naming | None:
    """Name an image from index annotations: the containerd name, else a full OCI ref name, as a tag.

    A bare OCI ref name (``latest``, as most OCI tools write it) names no repository, so it gives no tag
    and is only passed on as ``ref_name`` for the importer to combine with a repository of its choice.
    """
    ref_name = annotations.get(ANNOTATION_REF_NAME)
    name = annotations.get(ANNOTATION_CONTAINERD_NAME)
    if name is None and ref_name is not None and any(c in ref_name for c in ":/@"):
        name = ref_name
    if name is None:
        return None if ref_name is None else _Naming([], ref_name)
    try:
        return _Naming([familiar_reference(name)[1]], ref_name)
    except InvalidReferenceError as exc:
        raise ImageFormatError(f"{what}: {exc}") from exc


def _oci_images(store: _Store) -> list[ImageSource]:
    if store.size_of("oci-layout") is not None:
        layout = _parse_json(_read_blob(store, "oci-layout", "oci-layout"), "oci-layout")
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if not isinstance(version, str) or not version.startswith("1."):
            raise ImageFormatError(f"oci-layout: unsupported imageLayoutVersion {version!r}")
    index = _parse_json(_read_blob(store, "index.json", "index.json"), "index.json")
    images: list[ImageSource] = []
    _walk_index(store, index, "index.json", _Naming([], None), 0, images)
    if not images:
        raise ImageFormatError(f"{store.label}: index.json names no image manifests")
    return images


def _walk_index(store: _Store, index: object, what: str, naming: _Naming, depth: int, out: list[ImageSource]) -> None:
    if not isinstance(index, dict):
        raise ImageFormatError(f"{what}: expected an object")
    manifests = _field(index, "manifests", list, what)
    for i, raw in enumerate(manifests):
        where = f"{what}: manifests[{i}]"
        desc = _descriptor(raw, where)
        own = _naming(desc.annotations, where) or naming
        if desc.media_type in _MANIFEST_TYPES:
            if desc.annotations.get("vnd.docker.reference.type") == "attestation-manifest":
                continue  # build attestations ride along in buildkit indexes; they are not images
            manifest = _parse_json(_read_oci_blob(store, desc, "manifest"), f"manifest {desc.digest}")
            image = _oci_image(store, manifest, f"manifest {desc.digest}", own)
            if image is not None:
                out.append(image)
        elif desc.media_type in _INDEX_TYPES:
            if depth >= MAX_INDEX_DEPTH:
                raise ImageFormatError(f"{where}: image indexes nested deeper than {MAX_INDEX_DEPTH}")
            nested = _parse_json(_read_oci_blob(store, desc, "index"), f"index {desc.digest}")
            _walk_index(store, nested, f"index {desc.digest}", own, depth + 1, out)
        else:
            log.debug("%s: skipping %s of type %s", where, desc.digest, desc.media_type)


def _read_oci_blob(store: _Store, desc: _Descriptor, kind: str) -> bytes:
    if store.size_of(desc.member) is None:
        raise ImageFormatError(f"{kind} blob {desc.digest} is missing from {store.label}")
    return _read_blob(store, desc.member, f"{kind}", digest=desc.digest, size=desc.size)


def _oci_image(store: _Store, manifest: object, what: str, naming: _Naming) -> ImageSource | None:
    if not isinstance(manifest, dict):
        raise ImageFormatError(f"{what}: expected an object")
    config_desc = _descriptor(manifest.get("config"), f"{what}: config")
    if config_desc.media_type not in _CONFIG_TYPES:
        log.debug("%s: skipping an artifact with config type %s", what, config_desc.media_type)
        return None
    config = _read_oci_blob(store, config_desc, "config")
    diff_ids = _diff_ids_of(_parse_json(config, f"config {config_desc.digest}"), f"config {config_desc.digest}")
    layer_descs = [_descriptor(d, f"{what}: layers[{i}]") for i, d in enumerate(_field(manifest, "layers", list, what))]
    if len(diff_ids) != len(layer_descs):
        raise ImageFormatError(
            f"config {config_desc.digest}: rootfs.diff_ids has {len(diff_ids)} entries "
            f"but {what} lists {len(layer_descs)} layers"
        )
    layers = []
    for diff_id, desc in zip(diff_ids, layer_descs, strict=True):
        size = store.size_of(desc.member)
        _check_layer_type(desc.media_type, desc.digest, size is not None)
        if size is None:
            raise ImageFormatError(f"layer blob {desc.digest} is missing from {store.label}")
        if size != desc.size:
            raise ImageFormatError(
                f"layer blob {desc.digest}: size mismatch: descriptor says {desc.size}, blob has {size}"
            )
        opener = functools.partial(store.open_member, desc.member)
        layers.append(LayerSource(diff_id, desc.media_type, desc.size, desc.digest, opener))
    return ImageSource(config, config_desc.digest, list(naming.repo_tags), layers, naming.ref_name)


# -- entry point ----------------------------------------------------------------------------------


class ArchiveHandle:
    """An open image archive; ``images`` lists what it holds.  Close it (or use ``with``) when done."""

    def __init__(self, store: _Store, images: list[ImageSource]) -> None:
        self._store = store
        self.images = images

    @property
    def label(self) -> str:
        """The archive's path, for messages."""
        return self._store.label

    def close(self) -> None:
        """Close the archive; layer sources from it can no longer be opened."""
        self._store.close()

    def __enter__(self) -> ArchiveHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_image_archive(path: Path | str) -> ArchiveHandle:
    """Open a docker save tarball, an OCI layout directory, or an OCI layout tar, and parse its images.

    Reads and verifies the manifests and configs (not the layers) before returning; raises
    ImageFormatError, with the archive closed again, when anything is malformed or unsupported.
    """
    path = Path(path)
    store: _Store
    if path.is_dir():
        store = _DirStore(path)
    elif path.is_file():
        store = _TarStore(path)
    else:
        raise ImageFormatError(f"{path}: no such file or directory")
    try:
        if store.size_of("manifest.json") is not None:
            images = _docker_save_images(store)
        elif store.size_of("index.json") is not None:
            images = _oci_images(store)
        else:
            raise ImageFormatError(f"{path}: neither manifest.json (docker save) nor index.json (OCI layout) found")
    except BaseException:
        store.close()
        raise
    return ArchiveHandle(store, images)
