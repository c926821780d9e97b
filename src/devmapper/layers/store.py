"""Images and containers on the device set: the graph driver plus the bits of Docker's layer store we need.

Theory of operation
-------------------
``DeviceSet`` (Docker's DeviceSet) owns the pool and one thin device per layer; ``ImageDb`` keeps
Docker's ``image/devicemapper`` records (layer chain ids -> driver cache ids, image configs, tags,
container mounts).  This module ties them together with Docker's operations:

* **import**: each layer of a ``docker save``/OCI archive becomes ``snap(parent layer)`` with the
  layer's tar applied (``archive.apply_layer``: whiteouts, ownership, xattrs, refusing anything that
  would leave the root).  Layers already present (same chain id) are shared, not imported again.
* **containers**: ``<id>-init`` is a snapshot of the image's top layer that receives the daemon's init
  files (``/etc/hosts``, ``/.dockerenv`` ...), the container device a snapshot of that.  Diff and commit
  compare the container with its ``-init`` layer, so init files never leak into images.
* **crash safety**: before a driver device is created for a layer or container, its id is recorded
  as an intent (``layerdb/tmp/write-set-<id>``); the intent goes when the layer or container record
  is committed.  ``open`` deletes the devices of intents left by a killed process, so an interrupted
  import leaves nothing behind; ``reconcile`` checks the three levels (pool, device files, layer and
  container records) against each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from devmapper.errors import DevmapperError
from devmapper.layers import fs
from devmapper.layers.archive import apply_layer
from devmapper.layers.changes import write_changes_tar, write_tree_tar
from devmapper.layers.deviceset import DeviceSet, Reconciliation
from devmapper.layers.dm import Dm
from devmapper.layers.image import chain_id, open_image_archive
from devmapper.layers.imagedb import ImageDb, LayerRecord, MountRecord
from devmapper.layers.options import DmOptions

log = logging.getLogger(__name__)

__all__ = ["ContainerInfo", "ImageInfo", "LayerStore", "LayerStoreError", "StoreReport"]

Progress = Callable[[str, int, int], None]  # (what, done, total)

INIT_DIRS = ("dev", "dev/pts", "dev/shm", "proc", "sys", "etc")
INIT_FILES = (".dockerenv", "etc/resolv.conf", "etc/hosts", "etc/hostname", "dev/console")


class LayerStoreError(DevmapperError):
    """An image or container operation failed; nothing was left half-done."""


@dataclass(frozen=True)
class ImageInfo:
    image_id: str
    tags: list[str]
    layers: list[str]  # chain ids, bottom first
    top_cache_id: str | None


@dataclass(frozen=True)
class ContainerInfo:
    container_id: str
    image_id: str | None
    mount_id: str
    init_id: str | None
    size: int
    mounted: int


@dataclass
class StoreReport:
    """``reconcile``: what does not line up between the pool, the device files and the records."""

    devices: Reconciliation
    unreferenced: list[str] = field(default_factory=list)  # device files no layer/container/base uses
    missing: list[str] = field(default_factory=list)  # layer/container records whose device is gone
    incomplete: list[str] = field(default_factory=list)  # intents left by a killed process

    @property
    def clean(self) -> bool:
        return self.devices.clean and not self.unreferenced and not self.missing and not self.incomplete


def _new_id() -> str:
    return secrets.token_hex(32)


class LayerStore:
    def __init__(self, root: Path, dm: Dm, options: DmOptions | None = None, *, read_only: bool = False) -> None:
        self.root = root
        self.options = options or DmOptions()
        self.read_only = read_only
        self.devices = DeviceSet(root, dm, self.options, read_only=read_only)
        self.db = ImageDb(root / "image" / "devicemapper", read_only=read_only)

    def open(self) -> LayerStore:
        self.devices.open(create=not self.read_only)
        if not self.read_only:
            try:
                self._recover()
            except BaseException:
                self.devices.close()
                raise
        return self

    def close(self) -> None:
        self.devices.close()

    def __enter__(self) -> LayerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recover(self) -> None:
        """Delete the devices of layers and containers a killed process did not finish."""
        for cache_id in self.db.incomplete():
            log.info("removing the device of an unfinished layer or container %s", cache_id)
            with contextlib.suppress(DevmapperError):
                self.devices.unmount(cache_id, force=True)
            self.devices.delete_device(cache_id, sync=True)
            self.db.abandon(cache_id)

    # -- images ----------------------------------------------------------------------------------

    def import_archive(self, path: Path, progress: Progress | None = None) -> list[str]:
        """Import every image of a ``docker save`` tarball or OCI layout; their image ids."""
        ids: list[str] = []
        with open_image_archive(path) as archive:
            for image in archive.images:
                parent: str | None = None
                for n, layer in enumerate(image.layers):
                    chain = chain_id(parent, layer.diff_id)
                    if self.db.layer(chain) is None:
                        with layer.open() as stream:
                            self._register_layer(chain, layer.diff_id, parent, cast(BinaryIO, stream))
                    parent = chain
                    if progress is not None:
                        progress("layer", n + 1, len(image.layers))
                image_id = self.db.put_image(image.config)
                for tag in image.repo_tags:
                    self.db.tag(tag, image_id)
                ids.append(image_id)
        return ids

    def _register_layer(self, chain: str, diff_id: str, parent: str | None, stream: BinaryIO) -> LayerRecord:
        parent_cache = ""
        if parent is not None:
            parent_rec = self.db.layer(parent)
            if parent_rec is None:
                raise LayerStoreError(f"parent layer {parent} is missing")
            parent_cache = parent_rec.cache_id
        cache_id = _new_id()
        self.db.begin_layer(cache_id)
        try:
            self.devices.add_device(cache_id, parent_cache)
            rootfs = self.devices.mount(cache_id)
            try:
                stats = apply_layer(rootfs, stream, allow_devices=False)
                verify = getattr(stream, "verify", None)
                if verify is not None:
                    verify()
                fs.syncfs(rootfs)  # the layer is on the device before its record says it exists
            finally:
                self.devices.unmount(cache_id)
            self.devices.commit()
            record = LayerRecord(chain, diff_id, parent, cache_id, stats.content_bytes)
            self.db.commit_layer(record)
        except BaseException:
            self._undo(cache_id)
            raise
        return record

    def _undo(self, cache_id: str) -> None:
        try:
            with contextlib.suppress(DevmapperError):
                self.devices.unmount(cache_id, force=True)
            self.devices.delete_device(cache_id, sync=True)
            self.db.abandon(cache_id)
        except DevmapperError as e:
            log.error("cleaning up %s: %s (left for the next open)", cache_id, e)

    def resolve_image(self, ref: str) -> str:
        """An image id from a tag, a full id (with or without ``sha256:``) or a unique id prefix."""
        tags = self.db.tags()
        if ref in tags:
            return tags[ref]
        if ":" not in ref and f"{ref}:latest" in tags:
            return tags[f"{ref}:latest"]
        bare = ref.removeprefix("sha256:")
        found = [i for i in self.db.images() if i.removeprefix("sha256:").startswith(bare)] if len(bare) >= 4 else []
        if len(found) == 1:
            return found[0]
        raise LayerStoreError(f"No such image: {ref}" if not found else f"ambiguous image id prefix {ref}")

    def image(self, image_id: str) -> ImageInfo:
        config = self.db.image_config(image_id)
        if config is None:
            raise LayerStoreError(f"No such image: {image_id}")
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
        chains: list[str] = []
        parent: str | None = None
        for d in diff_ids:
            parent = chain_id(parent, d)
            chains.append(parent)
        top = self.db.layer(chains[-1]) if chains else None
        tags = sorted(t for t, i in self.db.tags().items() if i == image_id)
        return ImageInfo(image_id, tags, chains, None if top is None else top.cache_id)

    def images(self) -> list[ImageInfo]:
        return [self.image(i) for i in sorted(self.db.images())]

    def remove_image(self, ref: str, *, force: bool = False) -> list[str]:
        """Untag (or remove) an image and drop layers nothing else uses; the removed cache ids."""
        image_id = self.resolve_image(ref)
        tags = self.db.tags()
        named = ref if ref in tags else f"{ref}:latest" if f"{ref}:latest" in tags else None
        if named is not None and any(i == image_id and t != named for t, i in tags.items()):
            self.db.untag(named)  # other names keep the image
            return []
        users = [c.container_id for c in self.containers() if c.image_id == image_id]
        if users and not force:
            raise LayerStoreError(f"conflict: unable to remove image {image_id[:19]}: image is being used by "
                                  f"container(s) {', '.join(u[:12] for u in users)}")
        for tag in [t for t, i in self.db.tags().items() if i == image_id]:
            self.db.untag(tag)
        info = self.image(image_id)
        self.db.remove_image(image_id)
        return self._release_layers(list(reversed(info.layers)))

    def _release_layers(self, chains: list[str]) -> list[str]:
        """Delete layers (top first) that no image, container or child layer still uses."""
        used = set()
        for other in self.db.images():
            used.update(self.image(other).layers)
        used.update(m.parent for m in self.db.mounts() if m.parent is not None)
        removed: list[str] = []
        for chain in chains:
            rec = self.db.layer(chain)
            if rec is None or chain in used or self.db.children(chain):
                break
            self.devices.delete_device(rec.cache_id)
            self.db.remove_layer(chain)
            removed.append(rec.cache_id)
        return removed

    # -- containers ------------------------------------------------------------------------------

    def create_container(self, image_ref: str, *, container_id: str | None = None, size: int | None = None,
                         hostname: str | None = None) -> str:
        image_id = self.resolve_image(image_ref)
        info = self.image(image_id)
        if info.top_cache_id is None:
            raise LayerStoreError(f"image {image_id} has no layers in this store")
        cid = container_id or _new_id()
        if self.db.mount(cid) is not None:
            raise LayerStoreError(f"container {cid} already exists")
        mount_id = _new_id()
        init_id = f"{mount_id}-init"
        self.db.begin_layer(mount_id)
        try:
            self.devices.add_device(init_id, info.top_cache_id, size)
            self._write_init_layer(init_id, hostname or cid[:12])
            self.devices.add_device(mount_id, init_id)
            self.db.put_mount(MountRecord(cid, mount_id, init_id, info.layers[-1]))
            self.db.abandon(mount_id)
        except BaseException:
            for dev in (mount_id, init_id):
                with contextlib.suppress(DevmapperError):
                    self.devices.delete_device(dev, sync=True)
            self.db.abandon(mount_id)
            raise
        return cid

    def _write_init_layer(self, init_id: str, hostname: str) -> None:
        """Docker's setupInitLayer: mount points and empty placeholder files the runtime bind-mounts over."""
        rootfs = self.devices.mount(init_id)
        try:
            for d in INIT_DIRS:
                p = rootfs / d
                if not p.is_dir() and not p.is_symlink():
                    p.mkdir(mode=0o755)
            for f in INIT_FILES:
                p = rootfs / f
                if not p.exists() and not p.is_symlink():
                    p.touch(mode=0o755 if f == ".dockerenv" else 0o644)
            (rootfs / "etc/hostname").write_text(hostname + "\n")
            mtab = rootfs / "etc/mtab"
            if not mtab.exists() and not mtab.is_symlink():
                mtab.symlink_to("/proc/mounts")
            fs.syncfs(rootfs)
        finally:
            self.devices.unmount(init_id)

    def _images_by_top_layer(self) -> dict[str, str]:
        """Chain id of each image's top layer -> image id (what a container's ``parent`` names)."""
        by_top: dict[str, str] = {}
        for info in self.images():
            if info.layers:
                by_top.setdefault(info.layers[-1], info.image_id)
        return by_top

    def container(self, cid: str, by_top: dict[str, str] | None = None) -> ContainerInfo:
        rec = self._mount_record(cid)
        by_top = self._images_by_top_layer() if by_top is None else by_top
        image_id = None if rec.parent is None else by_top.get(rec.parent)
        return ContainerInfo(rec.container_id, image_id, rec.mount_id, rec.init_id,
                             self.devices.info(rec.mount_id).size, self.devices.mounted(rec.mount_id))

    def _mount_record(self, cid: str) -> MountRecord:
        full = len(cid) == 64 and all(c in "0123456789abcdef" for c in cid)
        rec = self.db.mount(cid) if full else None
        if rec is None:
            matches = [m for m in self.db.mounts() if m.container_id.startswith(cid)] if len(cid) >= 4 else []
            if len(matches) != 1:
                raise LayerStoreError(f"No such container: {cid}")
            rec = matches[0]
        return rec

    def containers(self) -> list[ContainerInfo]:
        by_top = self._images_by_top_layer()
        return [self.container(m.container_id, by_top) for m in sorted(self.db.mounts(), key=lambda m: m.container_id)]

    def mount_container(self, cid: str) -> Path:
        return self.devices.mount(self._mount_record(cid).mount_id)

    def unmount_container(self, cid: str) -> bool:
        return self.devices.unmount(self._mount_record(cid).mount_id)

    @contextlib.contextmanager
    def _mounted(self, hash_: str) -> Iterator[Path]:
        rootfs = self.devices.mount(hash_)
        try:
            yield rootfs
        finally:
            self.devices.unmount(hash_)

    def diff_container(self, cid: str, out: BinaryIO) -> int:
        """The container's changes against its image (its ``-init`` layer) as a tar with whiteouts."""
        rec = self._mount_record(cid)
        base = rec.init_id or self._layer_cache(rec.parent)
        with self._mounted(rec.mount_id) as new:
            if base is None:
                return write_changes_tar(None, new, out)
            with self._mounted(base) as old:
                return write_changes_tar(old, new, out)

    def _layer_cache(self, chain: str | None) -> str | None:
        layer = None if chain is None else self.db.layer(chain)
        return None if layer is None else layer.cache_id

    def export_container(self, cid: str, out: BinaryIO) -> int:
        """``docker export``: the container's whole root filesystem as a tar."""
        with self._mounted(self._mount_record(cid).mount_id) as rootfs:
            return write_tree_tar(rootfs, out)

    def export_device(self, hash_: str, out: BinaryIO) -> int:
        """Any device's ``rootfs`` as a tar (rescue of an old Docker directory works read-only)."""
        with self._mounted(hash_) as rootfs:
            if not rootfs.is_dir():  # never used as a layer (the base device): an empty tree
                with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT):
                    pass
                return 0
            return write_tree_tar(rootfs, out)

    def commit_container(self, cid: str, tag: str | None = None) -> str:
        """``docker commit``: the container's diff becomes a new layer on its image; the new image id."""
        rec = self._mount_record(cid)
        info = self.container(rec.container_id)
        if info.image_id is None:
            raise LayerStoreError(f"container {cid}: its image is gone")
        config = json.loads(self.db.image_config(info.image_id) or b"{}")
        with tempfile.TemporaryFile(dir=self.devices.home) as tmp:
            self.diff_container(rec.container_id, tmp)
            tmp.seek(0)
            digest = hashlib.sha256()
            for chunk in iter(lambda: tmp.read(1 << 20), b""):
                digest.update(chunk)
            diff_id = f"sha256:{digest.hexdigest()}"
            chain = chain_id(rec.parent, diff_id)
            if self.db.layer(chain) is None:
                tmp.seek(0)
                self._register_layer(chain, diff_id, rec.parent, cast(BinaryIO, tmp))
        config["rootfs"]["diff_ids"].append(diff_id)
        config.setdefault("history", []).append({"created_by": f"devmapper layers commit {rec.container_id[:12]}"})
        config.pop("id", None)
        image_id = self.db.put_image(json.dumps(config, separators=(",", ":")).encode())
        if tag:
            self.db.tag(tag, image_id)
        return image_id

    def grow_container(self, cid: str, size: int) -> None:
        self.devices.grow_device(self._mount_record(cid).mount_id, size)

    def remove_container(self, cid: str) -> None:
        rec = self._mount_record(cid)
        for dev in (rec.mount_id, rec.init_id):
            if dev is None:
                continue
            if self.devices.mounted(dev):
                self.devices.unmount(dev, force=True)
            self.devices.delete_device(dev)
        self.db.remove_mount(rec.container_id)

    # -- health ----------------------------------------------------------------------------------

    def reconcile(self, *, fix: bool = False) -> StoreReport:
        report = StoreReport(self.devices.reconcile(fix=fix))
        referenced = {""}
        for layer in self.db.layers():
            referenced.add(layer.cache_id)
        for m in self.db.mounts():
            referenced.update(h for h in (m.mount_id, m.init_id) if h is not None)
        report.incomplete = sorted(self.db.incomplete())
        known = set(self.devices.devices)
        report.unreferenced = sorted(h for h in known - referenced if h not in report.incomplete)
        report.missing = sorted(h for h in referenced - known if h)
        if fix and not self.read_only:
            for h in report.unreferenced:
                self.devices.delete_device(h, sync=True)
            self._recover()
        return report
