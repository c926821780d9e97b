"""Docker's image and layer database (``<docker root>/image/devicemapper/``), read and written in its own layout.

Theory of operation
-------------------
Docker keeps, per graph driver, three stores next to each other; we reproduce their file names and contents
(moby ``layer/filestore.go``, ``image/fs.go``, ``reference/store.go``) so that a Docker root opens here and
ours opens in Docker::

    layerdb/sha256/<chain hex>/     diff ("sha256:..."), size (decimal), cache-id (graph driver id, 64 hex),
                                    parent (chain id; absent for a base layer), maybe tar-split.json.gz
    layerdb/mounts/<container id>/  mount-id, init-id ("<mount id>-init"), parent (chain id of the image top)
    layerdb/tmp/write-set-<x>/      a layer registration in progress
    imagedb/content/sha256/<hex>    an image config; its sha256 is the image id
    imagedb/metadata/sha256/<hex>/  parent, lastUpdated (both optional)
    repositories.json               {"Repositories": {"busybox": {"busybox:latest": "sha256:<image id>"}}}

Files hold bare values without a trailing newline, as Docker writes them (readers strip whitespace).

Crash safety.  A layer is registered in two steps around the graph driver's work: :meth:`ImageDb.begin_layer`
creates ``tmp/write-set-<cache id>/cache-id`` *before* the driver device exists, and
:meth:`ImageDb.commit_layer` fills in the other files and renames the directory to ``sha256/<chain hex>``.
So after a crash every driver device either belongs to a committed layer or is named by a write-set that
:meth:`ImageDb.incomplete` lists, and nothing leaks.  Every file is fsynced before the rename that publishes
it and the directories involved are fsynced after it.  Single files (image configs, metadata,
``repositories.json``) are replaced atomically through a temporary file in the same directory.  Removal
renames a record out of the way (into ``tmp/``) first, so a crash never leaves half a record in place;
leftovers in ``tmp/`` other than write-sets are swept when the database is opened writable.

Ids are validated before they become path components: chain, diff and image ids are ``sha256:<64 hex>``,
cache, mount and container ids 64 lowercase hex, and references follow Docker's grammar, so no record path can
leave the root.  A read-only database raises ReadOnlyError on every write and creates nothing.

Not thread-safe and not locked: one owner (the layer store) serialises access.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from devmapper.control.files import fsync_dir, replace_file, write_fsynced
from devmapper.errors import DevmapperError, ReadOnlyError
from devmapper.layers.image import chain_id, config_diff_ids, familiar_reference, is_digest

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_INIT_ID = re.compile(r"[0-9a-f]{64}(?:-init)?")

WRITE_SET_PREFIX = "write-set-"
_MOUNT_SET_PREFIX = "mount-set-"
_REMOVING_PREFIX = ".removing-"
_TMP_MARK = ".tmp-"

# File names, exactly as Docker spells them.
DIFF_FILE = "diff"
SIZE_FILE = "size"
CACHE_ID_FILE = "cache-id"
PARENT_FILE = "parent"
MOUNT_ID_FILE = "mount-id"
INIT_ID_FILE = "init-id"
LAST_UPDATED_FILE = "lastUpdated"
REPOSITORIES_FILE = "repositories.json"


class ImageDbError(DevmapperError):
    """The image/layer database is inconsistent, or a request would make it so."""


class InvalidIdError(ImageDbError):
    """An id is not of the form its kind requires (so it cannot name a record)."""


@dataclass(frozen=True)
class LayerRecord:
    """A committed layer: ``layerdb/sha256/<chain hex>/``."""

    chain_id: str
    diff_id: str
    parent: str | None
    cache_id: str
    size: int


@dataclass(frozen=True)
class MountRecord:
    """A container's read-write layer: ``layerdb/mounts/<container id>/``."""

    container_id: str
    mount_id: str
    init_id: str | None
    parent: str | None


def _check_digest(value: object, what: str) -> str:
    if not is_digest(value):
        raise InvalidIdError(f"invalid {what} {value!r}: expected 'sha256:' and 64 lowercase hex digits")
    assert isinstance(value, str)
    return value


def _check_hex(value: object, what: str) -> str:
    if not isinstance(value, str) or _HEX64.fullmatch(value) is None:
        raise InvalidIdError(f"invalid {what} {value!r}: expected 64 lowercase hex digits")
    return value


def _hex_of(digest: str) -> str:
    return digest.removeprefix("sha256:")


# -- durable file operations --------------------------------------------------------------------------


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    replace_file(path, data, mode, tmp_prefix=f".{path.name}{_TMP_MARK}")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageDbError(f"{path}: unreadable: {exc}") from exc


def _now_rfc3339() -> str:
    """The current UTC time as Go's RFC3339Nano prints it (fraction without trailing zeros)."""
    now = datetime.datetime.now(datetime.UTC)
    fraction = f"{now.microsecond:06d}".rstrip("0")
    return now.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


class ImageDb:
    """Docker's image, layer and reference stores under one ``image/<driver>`` directory."""

    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.root = Path(root)
        self.read_only = read_only
        self._layerdb = self.root / "layerdb"
        self._layers_dir = self._layerdb / "sha256"
        self._mounts_dir = self._layerdb / "mounts"
        self._tmp_dir = self._layerdb / "tmp"
        self._content_dir = self.root / "imagedb" / "content" / "sha256"
        self._metadata_dir = self.root / "imagedb" / "metadata" / "sha256"
        self._repositories = self.root / REPOSITORIES_FILE
        if not read_only:
            self._create_layout()
            self._sweep()

    # -- setup --------------------------------------------------------------------------------------

    def _create_layout(self) -> None:
        # Modes as Docker creates them: private stores, world-readable layer records.
        for path, mode in (
            (self.root, 0o700),
            (self._layerdb, 0o700),
            (self._layers_dir, 0o755),
            (self._mounts_dir, 0o755),
            (self._tmp_dir, 0o755),
            (self._content_dir.parent.parent, 0o700),
            (self._content_dir.parent, 0o700),
            (self._content_dir, 0o700),
            (self._metadata_dir.parent, 0o700),
            (self._metadata_dir, 0o700),
        ):
            path.mkdir(mode=mode, parents=True, exist_ok=True)
        if not self._repositories.exists():
            self._save_repositories({})

    def _sweep(self) -> None:
        """Delete what an interrupted removal, mount creation or file replacement left behind."""
        for entry in self._tmp_dir.iterdir():
            if entry.name.startswith((_REMOVING_PREFIX, _MOUNT_SET_PREFIX)):
                log.info("removing leftover %s", entry)
                shutil.rmtree(entry)
        for directory in (self.root, self._content_dir):
            for entry in directory.iterdir():
                if entry.name.startswith(".") and _TMP_MARK in entry.name:
                    log.info("removing leftover %s", entry)
                    entry.unlink()

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.root}: image database is open read-only")

    def _discard(self, path: Path) -> None:
        """Remove a record directory: rename it into tmp/ (atomic), fsync, then delete it."""
        doomed = self._tmp_dir / f"{_REMOVING_PREFIX}{path.name}-{secrets.token_hex(8)}"
        os.rename(path, doomed)
        fsync_dir(path.parent)
        fsync_dir(self._tmp_dir)
        shutil.rmtree(doomed)

    # -- layers -------------------------------------------------------------------------------------

    def _layer_dir(self, chain: str) -> Path:
        return self._layers_dir / _hex_of(_check_digest(chain, "chain id"))

    def layer(self, chain_id: str) -> LayerRecord | None:
        """Return the committed layer ``chain_id``, None if there is none; ImageDbError if it is damaged."""
        path = self._layer_dir(chain_id)
        if not path.is_dir():
            return None
        diff = _read_text(path / DIFF_FILE)
        size = _read_text(path / SIZE_FILE)
        cache_id = _read_text(path / CACHE_ID_FILE)
        parent = _read_text(path / PARENT_FILE)
        if diff is None or size is None or cache_id is None:
            raise ImageDbError(f"{path}: incomplete layer record (needs {DIFF_FILE}, {SIZE_FILE}, {CACHE_ID_FILE})")
        if not is_digest(diff):
            raise ImageDbError(f"{path / DIFF_FILE}: invalid diff id {diff!r}")
        if not size.isdigit():
            raise ImageDbError(f"{path / SIZE_FILE}: invalid size {size!r}")
        if _HEX64.fullmatch(cache_id) is None:
            raise ImageDbError(f"{path / CACHE_ID_FILE}: invalid cache id {cache_id!r}")
        if parent is not None and not is_digest(parent):
            raise ImageDbError(f"{path / PARENT_FILE}: invalid parent chain id {parent!r}")
        return LayerRecord(chain_id, diff, parent, cache_id, int(size))

    def layers(self) -> list[LayerRecord]:
        """Return every committed layer, by chain id."""
        if not self._layers_dir.is_dir():
            return []
        records = []
        for entry in sorted(self._layers_dir.iterdir()):
            if entry.is_dir() and _HEX64.fullmatch(entry.name):
                record = self.layer("sha256:" + entry.name)
                assert record is not None
                records.append(record)
        return records

    def children(self, chain_id: str) -> list[str]:
        """Return the chain ids of the layers whose parent is ``chain_id``."""
        _check_digest(chain_id, "chain id")
        return [record.chain_id for record in self.layers() if record.parent == chain_id]

    def _write_set(self, cache_id: str) -> Path:
        return self._tmp_dir / f"{WRITE_SET_PREFIX}{_check_hex(cache_id, 'cache id')}"

    def begin_layer(self, cache_id: str) -> Path:
        """Start registering a layer whose driver device will be ``cache_id``; return the write-set directory.

        Call before creating the device, so that a crash leaves a trace (:meth:`incomplete`).
        """
        self._check_writable()
        write_set = self._write_set(cache_id)
        try:
            write_set.mkdir(mode=0o700)
        except FileExistsError:
            raise ImageDbError(f"cache id {cache_id} already has a registration in progress ({write_set})") from None
        write_fsynced(write_set / CACHE_ID_FILE, cache_id.encode(), 0o644, exclusive=True)
        fsync_dir(write_set)
        fsync_dir(self._tmp_dir)
        return write_set

    def commit_layer(self, rec: LayerRecord) -> None:
        """Publish a layer record: fill its write-set (begun if need be) and rename it into ``sha256/``.

        The chain id must follow from the parent and diff id, the parent must be committed, and the chain id
        must not be registered yet.  On error the write-set stays, for :meth:`abandon`.
        """
        self._check_writable()
        self._check_layer_record(rec)
        final = self._layer_dir(rec.chain_id)
        if final.exists():
            raise ImageDbError(f"layer {rec.chain_id} is already registered")
        write_set = self._write_set(rec.cache_id)
        if not write_set.is_dir():
            self.begin_layer(rec.cache_id)
        elif _read_text(write_set / CACHE_ID_FILE) != rec.cache_id:
            raise ImageDbError(f"{write_set}: {CACHE_ID_FILE} does not hold {rec.cache_id}")
        write_fsynced(write_set / DIFF_FILE, rec.diff_id.encode(), 0o644)
        write_fsynced(write_set / SIZE_FILE, str(rec.size).encode(), 0o644)
        if rec.parent is not None:
            write_fsynced(write_set / PARENT_FILE, rec.parent.encode(), 0o644)
        fsync_dir(write_set)
        os.rename(write_set, final)
        fsync_dir(self._tmp_dir)
        fsync_dir(self._layers_dir)

    def _check_layer_record(self, rec: LayerRecord) -> None:
        _check_digest(rec.chain_id, "chain id")
        _check_digest(rec.diff_id, "diff id")
        _check_hex(rec.cache_id, "cache id")
        if rec.parent is not None:
            _check_digest(rec.parent, "parent chain id")
        if not isinstance(rec.size, int) or isinstance(rec.size, bool) or rec.size < 0:
            raise ImageDbError(f"layer {rec.chain_id}: invalid size {rec.size!r}")
        expected = chain_id(rec.parent, rec.diff_id)
        if rec.chain_id != expected:
            raise ImageDbError(
                f"layer {rec.chain_id}: chain id does not follow from parent {rec.parent} and diff id {rec.diff_id} "
                f"(expected {expected})"
            )
        if rec.parent is not None and self.layer(rec.parent) is None:
            raise ImageDbError(f"layer {rec.chain_id}: parent layer {rec.parent} is not registered")

    def _write_sets(self) -> dict[str, list[Path]]:
        """Map cache id -> write-set directories (ours are named by it; Docker's hold it in cache-id)."""
        found: dict[str, list[Path]] = {}
        if not self._tmp_dir.is_dir():
            return found
        for entry in sorted(self._tmp_dir.iterdir()):
            if not (entry.name.startswith(WRITE_SET_PREFIX) and entry.is_dir()):
                continue
            try:
                recorded = _read_text(entry / CACHE_ID_FILE)
            except ImageDbError:
                recorded = None
            suffix = entry.name.removeprefix(WRITE_SET_PREFIX)
            for candidate in (recorded, suffix):
                if candidate is not None and _HEX64.fullmatch(candidate):
                    found.setdefault(candidate, []).append(entry)
                    break
            else:
                log.warning("%s: write-set names no cache id; ignoring it", entry)
        return found

    def incomplete(self) -> list[str]:
        """Return the cache ids of layer registrations that were begun but neither committed nor abandoned."""
        return sorted(self._write_sets())

    def abandon(self, cache_id: str) -> None:
        """Drop the write-set(s) of ``cache_id`` (after its device is deleted); no-op if there is none."""
        self._check_writable()
        _check_hex(cache_id, "cache id")
        for write_set in self._write_sets().get(cache_id, []):
            shutil.rmtree(write_set)
        fsync_dir(self._tmp_dir)

    def remove_layer(self, chain_id: str) -> None:
        """Remove a layer record (not its device); refused while child layers or containers use it.

        No-op if the layer is not registered.
        """
        self._check_writable()
        path = self._layer_dir(chain_id)
        if not path.is_dir():
            return
        children = self.children(chain_id)
        if children:
            raise ImageDbError(f"layer {chain_id} is the parent of {len(children)} layer(s), e.g. {children[0]}")
        users = [m.container_id for m in self.mounts() if m.parent == chain_id]
        if users:
            raise ImageDbError(f"layer {chain_id} is the image of container(s) {', '.join(users)}")
        self._discard(path)

    # -- images -------------------------------------------------------------------------------------

    def _content(self, image_id: str) -> Path:
        return self._content_dir / _hex_of(_check_digest(image_id, "image id"))

    def _metadata(self, image_id: str) -> Path:
        return self._metadata_dir / _hex_of(_check_digest(image_id, "image id"))

    def put_image(self, config: bytes, *, parent: str | None = None) -> str:
        """Store an image config (must parse, with rootfs.diff_ids); return its id, ``sha256:<hex>``.

        Also records ``lastUpdated`` and, if given, the ``parent`` image id in the image's metadata.
        Storing the same config again is harmless.  ImageFormatError if the config is not an image config.
        """
        self._check_writable()
        config_diff_ids(config)
        image_id = "sha256:" + hashlib.sha256(config).hexdigest()
        if parent is not None:
            _check_digest(parent, "parent image id")
        _replace_file(self._content(image_id), config, 0o600)
        metadata = self._metadata(image_id)
        metadata.mkdir(mode=0o700, exist_ok=True)
        if parent is not None:
            _replace_file(metadata / PARENT_FILE, parent.encode(), 0o600)
        _replace_file(metadata / LAST_UPDATED_FILE, _now_rfc3339().encode(), 0o600)
        fsync_dir(self._metadata_dir)
        return image_id

    def image_config(self, image_id: str) -> bytes | None:
        """Return the config bytes of ``image_id``, None if unknown; ImageDbError if they do not match the id."""
        path = self._content(image_id)
        try:
            config = path.read_bytes()
        except FileNotFoundError:
            return None
        if "sha256:" + hashlib.sha256(config).hexdigest() != image_id:
            raise ImageDbError(f"{path}: content does not match image id {image_id}")
        return config

    def image_parent(self, image_id: str) -> str | None:
        """Return the parent image id recorded for ``image_id``, if any."""
        parent = _read_text(self._metadata(image_id) / PARENT_FILE)
        if parent is not None and not is_digest(parent):
            raise ImageDbError(f"{self._metadata(image_id) / PARENT_FILE}: invalid image id {parent!r}")
        return parent

    def images(self) -> list[str]:
        """Return the ids of all stored images, sorted."""
        if not self._content_dir.is_dir():
            return []
        return sorted("sha256:" + p.name for p in self._content_dir.iterdir() if _HEX64.fullmatch(p.name))

    def image_top_layer(self, image_id: str) -> str | None:
        """Return the chain id of the image's top layer; None for an unknown image or one without layers."""
        config = self.image_config(image_id)
        if config is None:
            return None
        top: str | None = None
        for diff_id in config_diff_ids(config, f"image {image_id}"):
            top = chain_id(top, diff_id)
        return top

    def remove_image(self, image_id: str) -> None:
        """Remove an image's config and metadata (not its layers); refused while tags point at it."""
        self._check_writable()
        content = self._content(image_id)
        refs = self.references(image_id)
        if refs:
            raise ImageDbError(f"image {image_id} is still tagged as {', '.join(refs)}")
        metadata = self._metadata(image_id)
        if metadata.is_dir():
            self._discard(metadata)
        with contextlib.suppress(FileNotFoundError):
            content.unlink()
            fsync_dir(self._content_dir)

    # -- references ---------------------------------------------------------------------------------

    def _load_repositories(self) -> dict[str, dict[str, str]]:
        try:
            raw = self._repositories.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ImageDbError(f"{self._repositories}: invalid JSON: {exc}") from exc
        repos = doc.get("Repositories") if isinstance(doc, dict) else None
        if repos is None:
            return {}
        if not isinstance(repos, dict) or not all(
            isinstance(refs, dict) and all(isinstance(k, str) and is_digest(v) for k, v in refs.items())
            for refs in repos.values()
        ):
            raise ImageDbError(f"{self._repositories}: 'Repositories' is not a map of name -> reference -> image id")
        return repos

    def _save_repositories(self, repos: dict[str, dict[str, str]]) -> None:
        data = json.dumps({"Repositories": repos}, separators=(",", ":"), sort_keys=True).encode()
        _replace_file(self._repositories, data, 0o600)

    def tag(self, ref: str, image_id: str) -> None:
        """Point ``ref`` (normalised as Docker stores it, e.g. ``busybox:latest``) at a stored image.

        An existing tag is moved.  InvalidReferenceError for a malformed reference.
        """
        self._check_writable()
        repository, key = familiar_reference(ref)
        if self.image_config(image_id) is None:
            raise ImageDbError(f"cannot tag {key}: image {image_id} is not stored")
        repos = self._load_repositories()
        repos.setdefault(repository, {})[key] = image_id
        self._save_repositories(repos)

    def untag(self, ref: str) -> str | None:
        """Remove ``ref``; return the image id it pointed at, or None if it did not exist."""
        self._check_writable()
        repository, key = familiar_reference(ref)
        repos = self._load_repositories()
        image_id = repos.get(repository, {}).pop(key, None)
        if image_id is None:
            return None
        if not repos[repository]:
            del repos[repository]
        self._save_repositories(repos)
        return image_id

    def tags(self) -> dict[str, str]:
        """Return every reference -> image id."""
        return {key: image_id for refs in self._load_repositories().values() for key, image_id in refs.items()}

    def references(self, image_id: str) -> list[str]:
        """Return the references pointing at ``image_id``, sorted."""
        _check_digest(image_id, "image id")
        return sorted(key for key, target in self.tags().items() if target == image_id)

    # -- containers (mounts) ------------------------------------------------------------------------

    def _mount_dir(self, container_id: str) -> Path:
        return self._mounts_dir / _check_hex(container_id, "container id")

    def put_mount(self, rec: MountRecord) -> None:
        """Record a container's read-write layer; its parent layer must be registered, the record new."""
        self._check_writable()
        final = self._mount_dir(rec.container_id)
        _check_hex(rec.mount_id, "mount id")
        if rec.init_id is not None and (not isinstance(rec.init_id, str) or _INIT_ID.fullmatch(rec.init_id) is None):
            raise InvalidIdError(f"invalid init id {rec.init_id!r}: expected 64 lowercase hex digits and '-init'")
        if rec.parent is not None:
            _check_digest(rec.parent, "parent chain id")
            if self.layer(rec.parent) is None:
                raise ImageDbError(f"container {rec.container_id}: parent layer {rec.parent} is not registered")
        if final.exists():
            raise ImageDbError(f"container {rec.container_id} already has a mount record")
        staging = self._tmp_dir / f"{_MOUNT_SET_PREFIX}{rec.container_id}-{secrets.token_hex(8)}"
        staging.mkdir(mode=0o755)
        try:
            write_fsynced(staging / MOUNT_ID_FILE, rec.mount_id.encode(), 0o644, exclusive=True)
            if rec.init_id is not None:
                write_fsynced(staging / INIT_ID_FILE, rec.init_id.encode(), 0o644, exclusive=True)
            if rec.parent is not None:
                write_fsynced(staging / PARENT_FILE, rec.parent.encode(), 0o644, exclusive=True)
            fsync_dir(staging)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(self._tmp_dir)
        fsync_dir(self._mounts_dir)

    def mount(self, container_id: str) -> MountRecord | None:
        """Return the mount record of ``container_id``, None if there is none; ImageDbError if damaged."""
        path = self._mount_dir(container_id)
        if not path.is_dir():
            return None
        mount_id = _read_text(path / MOUNT_ID_FILE)
        init_id = _read_text(path / INIT_ID_FILE)
        parent = _read_text(path / PARENT_FILE)
        if mount_id is None or _HEX64.fullmatch(mount_id) is None:
            raise ImageDbError(f"{path / MOUNT_ID_FILE}: missing or invalid mount id {mount_id!r}")
        if init_id is not None and _INIT_ID.fullmatch(init_id) is None:
            raise ImageDbError(f"{path / INIT_ID_FILE}: invalid init id {init_id!r}")
        if parent is not None and not is_digest(parent):
            raise ImageDbError(f"{path / PARENT_FILE}: invalid parent chain id {parent!r}")
        return MountRecord(container_id, mount_id, init_id, parent)

    def mounts(self) -> list[MountRecord]:
        """Return every container mount record, by container id."""
        if not self._mounts_dir.is_dir():
            return []
        records = []
        for entry in sorted(self._mounts_dir.iterdir()):
            if entry.is_dir() and _HEX64.fullmatch(entry.name):
                record = self.mount(entry.name)
                assert record is not None
                records.append(record)
        return records

    def remove_mount(self, container_id: str) -> None:
        """Remove a container's mount record (not its devices); no-op if there is none."""
        self._check_writable()
        path = self._mount_dir(container_id)
        if path.is_dir():
            self._discard(path)
