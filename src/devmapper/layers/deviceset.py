"""Docker's DeviceSet: one thin pool, a base device with a filesystem, and a thin snapshot per layer.

Theory of operation
-------------------
The driver home is ``<root>/devicemapper`` laid out as Docker laid it out (``dockermeta``): sparse
``devicemapper/data`` and ``devicemapper/metadata`` files under a pool named
``docker-MAJ:MIN-INODE-pool``, one JSON file per thin device in ``metadata/``, and mount points under
``mnt/<id>``.  The pool and thin devices live in the userspace device-mapper (``dm.Dm``), exactly
where Docker's lived in the kernel, so activation, deferred removal and busy devices behave the same.

Every pool change is wrapped in Docker's one-slot intent log (``transaction-metadata``): open
(``TransactionID + 1``, the device hash and id), send ``create_thin``/``create_snap``/``delete``,
write or remove the device's file, close with ``set_transaction_id old new`` and make the pool
commit (a status without ``noflush`` commits, as the kernel's does).  At open a pending transaction
whose id is above the pool's is rolled back: ``delete <id>`` (ENODATA is fine) and the device file is
removed.  ``reconcile`` goes further than Docker ever did: it compares every thin id in the pool's
metadata with the device files both ways.

One process at a time owns a home (``<home>/.lock``, flock) -- Docker's global DeviceSet mutex made
cross-process, since our CLI commands are separate processes.  Mount reference counts outlive a
command (``mount-refs.json``), so ``mount`` twice then ``unmount`` once leaves the device mounted.
A read-only open (rescue of an old Docker directory) takes no lock, writes nothing, and activates
devices read-only over a read-only pool.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from devmapper.blockdev.file import FileBlockDevice
from devmapper.control.files import replace_file
from devmapper.errors import DevmapperError
from devmapper.layers import fs
from devmapper.layers.dm import Dm, DmError
from devmapper.layers.dockermeta import (
    DeviceSetRecord,
    DevInfo,
    IdAllocator,
    MetadataDir,
    TransactionRecord,
    device_name,
    device_prefix,
    pool_name,
)
from devmapper.layers.options import DmOptions, human_size
from devmapper.thin import ls

log = logging.getLogger(__name__)

__all__ = ["DeviceSet", "DeviceSetError", "PoolUsage", "Reconciliation"]

SECTOR = 512
LOW_WATER_BLOCKS = 32768  # what Docker always passed
METADATA_BLOCK = 4096
LOCK_WAIT = 60.0
REFS_FILE = "mount-refs.json"
CONFIG_FILE = "pool-config.json"


class DeviceSetError(DevmapperError):
    """A layer-store device operation failed; the message says which device and why."""


class BusyError(DeviceSetError):
    """The device is open (mounted or held); deferred deletion was not possible."""


@dataclass(frozen=True)
class PoolUsage:
    transaction_id: int
    used_meta: int
    total_meta: int
    used_data: int
    total_data: int
    mode: str  # rw | ro | out_of_data_space | Fail
    needs_check: bool
    error_if_no_space: bool
    block_size: int  # bytes


@dataclass(frozen=True)
class Reconciliation:
    orphan_ids: list[int]  # thin ids in the pool that no device file names
    dangling: list[str]  # device files whose id the pool does not have
    deleted: list[str]  # device files marked deleted (pending deferred deletion)
    fixed: bool

    @property
    def clean(self) -> bool:
        return not self.orphan_ids and not self.dangling


def parse_pool_status(params: str, block_size: int) -> PoolUsage:
    words = params.split()
    if not words or words[0] == "Fail":
        return PoolUsage(0, 0, 0, 0, 0, "Fail", True, False, block_size)
    um, tm = words[1].split("/")
    ud, td = words[2].split("/")
    return PoolUsage(int(words[0]), int(um), int(tm), int(ud), int(td), words[4], "needs_check" in words[7:8],
                     "error_if_no_space" in words, block_size)


class DeviceSet:
    def __init__(self, root: Path, dm: Dm, options: DmOptions, *, read_only: bool = False,
                 mnt_run: Path | None = None) -> None:
        self.root = root
        self.home = root / "devicemapper"
        self.loop_dir = self.home / "devicemapper"
        self.mnt = self.home / "mnt"
        self.dm = dm
        self.options = options
        self.read_only = read_only
        self.meta = MetadataDir(self.home, read_only=read_only)
        self.devices: dict[str, DevInfo] = {}
        self.transaction_id = 0
        self.allocator = IdAllocator(())
        self.prefix = ""
        self.pool = ""
        self.block_size = options.blocksize
        self.base_fs = options.fs
        self.base_uuid = ""
        self._lock_fd: int | None = None
        self._opened = False
        self._mutex = threading.RLock()
        self._refs: dict[str, int] = {}
        self._owns_pool = False
        self._scratch = mnt_run  # where temporary mounts go (grow)

    # -- open and close --------------------------------------------------------------------------

    def open(self, *, create: bool = True) -> None:
        """Docker's ``initDevmapper``: files, pool, device records, pending transaction, base device."""
        if self.read_only:
            if not (self.home / "metadata").is_dir():
                raise DeviceSetError(f"{self.home}: not a Docker devicemapper directory (no metadata/)")
        else:
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self.home / "metadata").mkdir(mode=0o700, exist_ok=True)
            self._take_lock()
        try:
            self.prefix = device_prefix(self.home)
            self.pool = self.options.thinpooldev or pool_name(self.prefix)
            fresh = self._setup_pool(create)
            self._load_config()
            self.meta_load(fresh)
            if not self.read_only:
                self._refs = self._load_refs()
                if create:
                    self._setup_base()
                self.process_deleted()
        except BaseException:
            self._release_lock()
            raise
        self._opened = True

    def close(self) -> None:
        """Save ``deviceset-metadata`` (as Docker's Shutdown does) and release the home."""
        if not self.read_only and self._opened:
            self._save_deviceset()
        self._opened = False
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> DeviceSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_lock(self) -> None:
        fd = os.open(self.home / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise DeviceSetError(f"{self.home} is in use by another devmapper process") from None
                time.sleep(0.05)
        self._lock_fd = fd

    # -- the pool --------------------------------------------------------------------------------

    @property
    def data_file(self) -> Path:
        return self.loop_dir / "data"

    @property
    def metadata_file(self) -> Path:
        return self.loop_dir / "metadata"

    @property
    def data_path(self) -> Path:
        """The pool's data device: ``dm.datadev`` or the sparse ``devicemapper/data`` file."""
        return Path(self.options.datadev) if self.options.datadev else self.data_file

    @property
    def metadata_path(self) -> Path:
        """The pool's metadata device: ``dm.metadatadev`` or the sparse ``devicemapper/metadata`` file."""
        return Path(self.options.metadatadev) if self.options.metadatadev else self.metadata_file

    def _setup_pool(self, create: bool) -> bool:
        """Make sure the pool is active; True when its metadata was just created (nothing to load)."""
        info = self.dm.info(self.pool)
        if info is not None:
            table = self.dm.table(self.pool)
            if not table or table[0][2] != "thin-pool":
                raise DeviceSetError(f"Device {self.pool} is not a thin pool")
            self.block_size = int(table[0][3].split()[2]) * SECTOR
            self._owns_pool = self.options.thinpooldev is None
            return False
        if self.options.thinpooldev:
            raise DeviceSetError(f"Device {self.pool} does not exist (dm.thinpooldev)")
        fresh = False
        if self.read_only or not create:
            for path in (self.data_path, self.metadata_path):
                if not path.exists():
                    raise DeviceSetError(f"loopback file not found: {path}")
        else:
            self.loop_dir.mkdir(mode=0o700, exist_ok=True)
            fresh = self._ensure_file(self.metadata_path, self.options.loopmetadatasize, self.options.metadatadev)
            self._ensure_file(self.data_path, self.options.loopdatasize, self.options.datadev)
        self._create_pool()
        self._owns_pool = True
        return fresh

    def _ensure_file(self, path: Path, size: int, given: str | None) -> bool:
        """Docker's ensureImage: create the sparse file, or grow it (never shrink).  True if created."""
        if given:
            if not path.exists():
                raise DeviceSetError(f"{path}: no such device (dm.datadev/dm.metadatadev)")
            return False
        if not path.exists():
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            return True
        current = path.stat().st_size
        if size > current:
            os.truncate(path, size)
        elif size < current:
            log.info("Can't shrink loopback file %s", path)
        return False

    def _pool_table(self) -> list[tuple[int, int, str, str]]:
        data_bytes = _size_of(self.data_path)
        block_sectors = self.block_size // SECTOR
        features = ["skip_block_zeroing", "read_only" if self.read_only else "error_if_no_space"]
        params = (f"{self.metadata_path.absolute()} {self.data_path.absolute()} {block_sectors} "
                  f"{LOW_WATER_BLOCKS} {len(features)} {' '.join(features)}")
        length = data_bytes // self.block_size * block_sectors
        return [(0, length, "thin-pool", params)]

    def _create_pool(self) -> None:
        try:
            self.dm.create(self.pool, self._pool_table(), read_only=self.read_only)
        except DmError as e:
            raise DeviceSetError(f"cannot create thin pool {self.pool}: {e}") from e
        if not self.read_only and self.options.thinp_autoextend_threshold < 100 and not self.options.datadev:
            self.dm.message(self.pool, f"@autoextend {self.options.thinp_autoextend_threshold} "
                                       f"{self.options.thinp_autoextend_percent}")

    def pool_usage(self) -> PoolUsage:
        return parse_pool_status(self.dm.status(self.pool), self.block_size)

    def _commit_pool(self) -> None:
        self.dm.status(self.pool)  # a status without noflush commits the pool's metadata

    def commit(self) -> None:
        """Make everything written so far durable in the pool (mappings included)."""
        self._commit_pool()

    def _load_config(self) -> None:
        """Pool parameters recorded at creation, checked at every open (moby#6939)."""
        path = self.home / CONFIG_FILE
        try:
            recorded = json.loads(path.read_text())
        except FileNotFoundError:
            recorded = None
        except (OSError, ValueError) as e:
            raise DeviceSetError(f"{path}: unreadable ({e})") from e
        if recorded is None:
            if not self.read_only:
                _write_json(path, {"block_size": self.block_size, "pool": self.pool})
            return
        if recorded.get("block_size") != self.block_size:
            raise DeviceSetError(
                f"pool {self.pool} was created with {human_size(recorded.get('block_size', 0))} blocks, "
                f"not {human_size(self.block_size)} (dm.blocksize cannot change)")

    # -- device records and transactions ---------------------------------------------------------

    def meta_load(self, fresh: bool) -> None:
        """Docker's initMetaData: device files, the id bitmap and the pending transaction."""
        if not self.read_only:
            self.meta.cleanup_temp()
        self.devices = {} if fresh else self.meta.load_all()
        usage = self.pool_usage()
        self.transaction_id = usage.transaction_id
        record = self.meta.deviceset()
        hint = record.next_device_id if record else 0
        if record is not None:
            self.base_uuid = record.base_device_uuid
            self.base_fs = record.base_device_filesystem or self.base_fs
        self.allocator = IdAllocator((d.device_id for d in self.devices.values()), hint)
        if not self.read_only:
            self._process_pending_transaction()

    def _process_pending_transaction(self) -> None:
        tx = self.meta.transaction()
        if tx is None:
            return
        if tx.open_transaction_id < self.transaction_id:
            log.error("transaction-metadata id %d is older than the pool's %d", tx.open_transaction_id,
                      self.transaction_id)
            return
        if tx.open_transaction_id == self.transaction_id:
            return
        log.info("rolling back transaction %d (device %r, id %d)", tx.open_transaction_id, tx.device_hash,
                 tx.device_id)
        try:
            self.dm.message(self.pool, f"delete {tx.device_id}")
        except DmError as e:
            if e.errno_name != "ENODATA":
                log.error("rollback: delete %d: %s", tx.device_id, e)
        self.meta.remove(tx.device_hash)
        self.devices.pop(tx.device_hash, None)
        self.allocator.release(tx.device_id)
        self.meta.remove_transaction()
        self._commit_pool()

    def _open_transaction(self, hash_: str, device_id: int) -> TransactionRecord:
        tx = TransactionRecord(self.transaction_id + 1, hash_, device_id)
        self.meta.save_transaction(tx)
        return tx

    def _close_transaction(self, tx: TransactionRecord) -> None:
        if tx.open_transaction_id != self.transaction_id:
            self.dm.message(self.pool, f"set_transaction_id {self.transaction_id} {tx.open_transaction_id}")
            self.transaction_id = tx.open_transaction_id
        self._commit_pool()

    def _save_deviceset(self) -> None:
        self.meta.save_deviceset(DeviceSetRecord(self.allocator.next_hint, self.base_uuid, self.base_fs))

    def _register(self, hash_: str, device_id: int, size: int, tx: TransactionRecord) -> DevInfo:
        info = DevInfo(hash=hash_, device_id=device_id, size=size, transaction_id=tx.open_transaction_id,
                       initialized=False, deleted=False, extra={})
        self.meta.save(info)
        self.devices[hash_] = info
        return info

    def _pool_create(self, hash_: str, verb: str, origin: int | None, size: int) -> DevInfo:
        """Allocate an id and run ``create_thin``/``create_snap`` inside a transaction (EEXIST: next id)."""
        while True:
            device_id = self.allocator.allocate()
            tx = self._open_transaction(hash_, device_id)
            text = f"{verb} {device_id}" + ("" if origin is None else f" {origin}")
            try:
                self.dm.message(self.pool, text)
            except DmError as e:
                if e.errno_name == "EEXIST":
                    log.warning("Device ID %d exists in pool but it is supposed to be unused", device_id)
                    continue  # the id stays marked used
                self.allocator.release(device_id)
                self.meta.remove_transaction()
                raise DeviceSetError(f"{verb} {device_id} on {self.pool}: {e}") from e
            try:
                info = self._register(hash_, device_id, size, tx)
                self._close_transaction(tx)
            except BaseException:
                with contextlib.suppress(DmError):
                    self.dm.message(self.pool, f"delete {device_id}")
                self.meta.remove(hash_)
                self.devices.pop(hash_, None)
                self.allocator.release(device_id)
                raise
            return info

    # -- the base device -------------------------------------------------------------------------

    def _setup_base(self) -> None:
        base = self.devices.get("")
        if base is not None and base.initialized and not base.deleted:
            if self.options.fs_given and self.options.fs != self.base_fs:
                log.warning("base device already has filesystem %s; ignoring dm.fs=%s", self.base_fs,
                            self.options.fs)
            if self.options.basesize_given:
                if self.options.basesize < base.size:
                    raise DeviceSetError(f"devmapper: Base device size cannot be smaller than "
                                         f"{human_size(base.size)}")
                if self.options.basesize > base.size:
                    self._grow_device(base, self.options.basesize)
            return
        if base is not None:
            log.info("base device is not initialized or marked deleted; recreating it")
            self.delete_device("", sync=True)
        if self.options.thinpooldev:
            usage = self.pool_usage()
            if usage.used_data:
                raise DeviceSetError(
                    f"Unable to take ownership of thin-pool ({self.pool}) that already has used data blocks")
            if usage.transaction_id:
                raise DeviceSetError(
                    f"Unable to take ownership of thin-pool ({self.pool}) with non-zero transaction ID")
        info = self._pool_create("", "create_thin", None, self.options.basesize)
        node = self.activate("")
        try:
            fs.mkfs(self.options.fs, node, list(self.options.mkfsarg))
            self.base_uuid = _blkid_uuid(node)
        finally:
            self.deactivate("", deferred=False)
        self.base_fs = self.options.fs
        info.initialized = True
        self.meta.save(info)
        self._save_deviceset()

    # -- activation ------------------------------------------------------------------------------

    def name_of(self, hash_: str) -> str:
        return device_name(self.prefix, hash_)

    def exists(self, hash_: str) -> bool:
        """Docker's Exists: the device is known, even when marked for deferred deletion."""
        return hash_ in self.devices

    def info(self, hash_: str) -> DevInfo:
        info = self.devices.get(hash_)
        if info is None:
            raise DeviceSetError(f"Unknown device {hash_ or 'base'}")
        return info

    def _thin_table(self, info: DevInfo) -> list[tuple[int, int, str, str]]:
        return [(0, info.size // SECTOR, "thin", f"/dev/mapper/{self.pool} {info.device_id}")]

    def activate(self, hash_: str) -> str:
        """Activate the device if needed; its block device node (for mkfs and mount)."""
        info = self.info(hash_)
        name = self.name_of(hash_)
        current = self.dm.info(name)
        if current is not None and current.deferred_remove:
            self.dm.cancel_deferred_remove(name)
        if current is None:
            try:
                self.dm.create(name, self._thin_table(info), read_only=self.read_only)
            except DmError as e:
                raise DeviceSetError(f"cannot activate device {name}: {e}") from e
            current = self.dm.info(name)
        if current is None or current.node is None:
            raise DeviceSetError(f"device {name} has no block device node: run the devmapper daemon as root "
                                 "with device files and loop devices")
        return current.node

    def deactivate(self, hash_: str, *, deferred: bool | None = None) -> None:
        use_deferred = self.options.use_deferred_removal if deferred is None else deferred
        try:
            self.dm.remove(self.name_of(hash_), deferred=use_deferred)
        except DmError as e:
            raise DeviceSetError(f"cannot deactivate {self.name_of(hash_)}: {e}") from e

    def is_active(self, hash_: str) -> bool:
        return self.dm.exists(self.name_of(hash_))

    # -- create and delete -----------------------------------------------------------------------

    def check_free_space(self) -> None:
        """``dm.min_free_space``: refuse a new device below the floor, for data and metadata alike."""
        pct = self.options.min_free_space
        if pct == 0:
            return
        u = self.pool_usage()
        for kind, used, total, advice in (("data", u.used_data, u.total_data, "free space"),
                                          ("metadata", u.used_meta, u.total_meta, "free metadata space")):
            minimum = max(total * pct // 100, 1)
            if total - used < minimum:
                raise DeviceSetError(
                    f"Thin Pool has {total - used} free {kind} blocks which is less than minimum required "
                    f"{minimum} free {kind} blocks. Create more {advice} in thin pool or use dm.min_free_space "
                    "option to change behavior")

    def add_device(self, hash_: str, base_hash: str, size: int | None = None) -> DevInfo:
        """Docker's AddDevice: a snapshot of ``base_hash`` ("" = the base device), optionally bigger."""
        with self._mutex:
            self._writable()
            parent = self.devices.get(base_hash)
            if parent is None:
                raise DeviceSetError(f"Unknown device {base_hash or 'base'}")
            if parent.deleted:
                raise DeviceSetError(f"Base device {base_hash} has been marked for deferred deletion")
            existing = self.devices.get(hash_)
            if existing is not None:
                raise DeviceSetError(f"device {hash_} already exists. Deleted={str(existing.deleted).lower()}")
            wanted = parent.size if size is None else size
            if wanted < parent.size:
                raise DeviceSetError(f"Container size cannot be smaller than {human_size(parent.size)}")
            self.check_free_space()
            info = self._snapshot(hash_, parent)
        if wanted > parent.size:
            self._grow_device(info, wanted)
        return info

    def _snapshot(self, hash_: str, parent: DevInfo) -> DevInfo:
        name = self.name_of(parent.hash)
        current = self.dm.info(name)
        redeactivate = current is not None and current.deferred_remove
        if redeactivate:
            self.dm.cancel_deferred_remove(name)
        suspended = False
        if current is not None and not current.suspended:
            self.dm.suspend(name)
            suspended = True
        try:
            return self._pool_create(hash_, "create_snap", parent.device_id, parent.size)
        finally:
            if suspended:
                self.dm.resume(name)
            if redeactivate:
                with contextlib.suppress(DmError):
                    self.dm.remove(name, deferred=True)

    def _grow_device(self, info: DevInfo, size: int) -> None:
        """Record the bigger size, then grow the filesystem through a temporary mount (Docker's way)."""
        info.size = size
        self.meta.save(info)
        name = self.name_of(info.hash)
        if self.dm.exists(name):
            self.dm.reload(name, self._thin_table(info))
        node = self.activate(info.hash)
        with self._scratch_dir() as where:
            try:
                fs.grow(self.base_fs, node, where, fs.mount_options(self.base_fs, self.mountopts()))
            finally:
                if fs.is_mountpoint(where):
                    fs.umount(where)
        if self._refs.get(info.hash, 0) == 0:
            self.deactivate(info.hash, deferred=False)

    @contextlib.contextmanager
    def _scratch_dir(self) -> Iterator[Path]:
        parent = self._scratch or self.home
        where = Path(tempfile.mkdtemp(prefix=".grow-", dir=parent))
        try:
            yield where
        finally:
            with contextlib.suppress(OSError):
                where.rmdir()

    def grow_device(self, hash_: str, size: int) -> None:
        """Grow a device and its filesystem (a bigger table, then resize2fs/xfs_growfs).

        A mounted device is grown online; where the kernel refuses an online ext4 resize (no
        CAP_SYS_RESOURCE) the error says to unmount and grow again, which resizes offline.  The same
        size twice is allowed: it finishes a filesystem grow that an earlier attempt could not do.
        """
        with self._mutex:
            self._writable()
            info = self.info(hash_)
            if size < info.size:
                raise DeviceSetError(f"cannot shrink {self.name_of(hash_)} from {human_size(info.size)} "
                                     f"to {human_size(size)}")
            if self._refs.get(hash_, 0) == 0:
                self._grow_device(info, size)
                return
            info.size = size
            self.meta.save(info)
            self.dm.reload(self.name_of(hash_), self._thin_table(info))
            try:
                fs.grow(self.base_fs, self.activate(hash_), self.mount_point(hash_), [])
            except fs.FsError as e:
                raise DeviceSetError(f"the device is now {human_size(size)} but its mounted filesystem could not "
                                     f"be grown online ({e}); unmount it and grow again") from e

    def delete_device(self, hash_: str, *, sync: bool = False) -> bool:
        """Docker's DeleteDevice: discard, deactivate, ``delete``.  False when deferred (busy)."""
        with self._mutex:
            self._writable()
            info = self.devices.get(hash_)
            if info is None:
                return True
            name = self.name_of(hash_)
            deferred_ok = self.options.use_deferred_deletion and not sync
            if self.options.blkdiscard:
                self._discard(info)
            both = self.options.use_deferred_removal and self.options.use_deferred_deletion
            with contextlib.suppress(DmError):
                self.dm.remove(name, deferred=both and not sync, retries=0 if deferred_ok else 200)
            return self._delete_transaction(info, deferred_ok)

    def _discard(self, info: DevInfo) -> None:
        """Return the device's blocks to the data file (``dm.blkdiscard``), if nobody has it open."""
        name = self.name_of(info.hash)
        current = self.dm.info(name)
        if current is not None and current.open_count > 0:
            return
        try:
            if current is None:
                self.dm.create(name, self._thin_table(info))
            self.dm.discard(name, 0, info.size)
        except DmError as e:
            log.warning("%s: discard before delete failed: %s", name, e)

    def _delete_transaction(self, info: DevInfo, deferred_ok: bool) -> bool:
        tx = self._open_transaction(info.hash, info.device_id)
        try:
            try:
                self.dm.message(self.pool, f"delete {info.device_id}")
            except DmError as e:
                if e.errno_name == "EBUSY" and deferred_ok:
                    if not info.deleted:
                        info.deleted = True
                        self.meta.save(info)
                    return False
                if e.errno_name != "ENODATA":
                    raise BusyError(f"failed to remove device {info.hash or 'base'}: "
                                    f"{'Device is Busy' if e.errno_name == 'EBUSY' else e}") from e
            self.meta.remove(info.hash)
            self.devices.pop(info.hash, None)
            self.allocator.release(info.device_id)
            return True
        finally:
            self._close_transaction(tx)

    def process_deleted(self) -> int:
        """One pass of Docker's deferred-deletion worker; how many devices are still pending."""
        pending = 0
        for info in [d for d in self.devices.values() if d.deleted]:
            try:
                if not self.delete_device(info.hash):
                    pending += 1
            except DeviceSetError as e:
                log.warning("deferred deletion of %s: %s", info.hash, e)
                pending += 1
        return pending

    @property
    def deleted_count(self) -> int:
        return sum(1 for d in self.devices.values() if d.deleted)

    def _writable(self) -> None:
        if self.read_only:
            raise DeviceSetError(f"{self.home} is open read-only")

    # -- mount and unmount (Get / Put) -----------------------------------------------------------

    def mountopts(self) -> list[str]:
        return [o for opt in self.options.mountopt for o in opt.split(",") if o]

    def mount_point(self, hash_: str) -> Path:
        """``mnt/<id>`` (``mnt/base`` for the base device, which Docker itself never mounted)."""
        return self.mnt / (hash_ or "base")

    def mount(self, hash_: str) -> Path:
        """Docker's Get: mount ``mnt/<id>`` (reference-counted); the device's ``rootfs`` directory."""
        with self._mutex:
            where = self.mount_point(hash_)
            rootfs = where / "rootfs"
            if self._refs.get(hash_, 0) > 0 and fs.is_mountpoint(where):
                self._refs[hash_] += 1
                self._save_refs()
                return rootfs
            info = self.info(hash_)
            if info.deleted:
                raise DeviceSetError(f"device {hash_} is marked for deferred deletion")
            self.mnt.mkdir(mode=0o755, exist_ok=True)
            where.mkdir(mode=0o755, exist_ok=True)
            node = self.activate(hash_)
            kind = fs.probe(node) or self.base_fs
            try:
                fs.mount(node, where, kind, fs.mount_options(kind, self.mountopts(), self.read_only))
            except fs.FsError:
                self._quiet_deactivate(hash_)
                raise
            if kind == "xfs" and self.options.xfs_nospace_max_retries is not None:
                self._xfs_nospace(node, where, hash_)
            if not self.read_only:
                try:
                    if not rootfs.exists():
                        rootfs.mkdir(mode=0o755)
                    id_file = where / "id"
                    if not id_file.exists():
                        _write_private(id_file, hash_)
                except OSError:
                    fs.umount(where, lazy=True)
                    self._quiet_deactivate(hash_)
                    raise
            self._refs[hash_] = 1
            self._save_refs()
            return rootfs

    def _xfs_nospace(self, node: str, where: Path, hash_: str) -> None:
        """``dm.xfs_nospace_max_retries``: let xfs give up on ENOSPC instead of retrying forever."""
        knob = Path("/sys/fs/xfs") / Path(os.path.realpath(node)).name / "error/metadata/ENOSPC/max_retries"
        try:
            knob.write_text(f"{self.options.xfs_nospace_max_retries}\n")
        except OSError as e:
            fs.umount(where, lazy=True)
            self._quiet_deactivate(hash_)
            raise DeviceSetError(f"cannot set {knob}: {e.strerror}") from e

    def unmount(self, hash_: str, *, force: bool = False) -> bool:
        """Docker's Put: drop one reference; at zero unmount (lazily) and deactivate.  True if unmounted."""
        with self._mutex:
            count = self._refs.get(hash_, 0)
            if count > 1 and not force:
                self._refs[hash_] = count - 1
                self._save_refs()
                return False
            where = self.mount_point(hash_)
            if fs.is_mountpoint(where):
                fs.umount(where, lazy=True)
            with contextlib.suppress(OSError):
                where.rmdir()
            self._refs.pop(hash_, None)
            self._save_refs()
            self._quiet_deactivate(hash_)
            return True

    def mounted(self, hash_: str) -> int:
        return self._refs.get(hash_, 0)

    def _quiet_deactivate(self, hash_: str) -> None:
        try:
            self.deactivate(hash_)
        except DeviceSetError as e:
            log.warning("%s", e)

    def _load_refs(self) -> dict[str, int]:
        try:
            raw = json.loads((self.home / REFS_FILE).read_text())
        except (OSError, ValueError):
            raw = {}
        refs = {k: v for k, v in raw.items() if isinstance(v, int) and v > 0 and fs.is_mountpoint(self.mnt / k)}
        # Mounts a killed process left without a record: unmount them (Docker unmounts all at shutdown).
        if self.mnt.is_dir():
            for point in fs.mounts_under(self.mnt):
                rel = point.relative_to(self.mnt)
                if len(rel.parts) == 1 and rel.parts[0] not in refs:
                    log.info("unmounting %s left mounted by an earlier run", point)
                    with contextlib.suppress(fs.FsError):
                        fs.umount(point, lazy=True)
                    with contextlib.suppress(OSError):
                        point.rmdir()
        return refs

    def _save_refs(self) -> None:
        _write_json(self.home / REFS_FILE, self._refs)

    # -- usage, reconcile ------------------------------------------------------------------------

    def usage(self) -> dict[int, ls.DeviceUsage]:
        """Per thin id: mapped, exclusive and shared blocks, from a metadata snapshot of the live pool."""
        held = False
        if not self.read_only:
            try:
                self.dm.message(self.pool, "reserve_metadata_snap")
                held = True
            except DmError as e:
                log.debug("reserve_metadata_snap: %s", e)
        try:
            dev = FileBlockDevice(str(self.metadata_path), read_only=True)
            try:
                _bs, rows = ls.usage(dev, metadata_snap=held)
            finally:
                dev.close()
        finally:
            if held:
                with contextlib.suppress(DmError):
                    self.dm.message(self.pool, "release_metadata_snap")
        return {u.dev_id: u for u in rows}

    def pool_ids(self) -> set[int]:
        return set(self.usage())

    def reconcile(self, *, fix: bool = False) -> Reconciliation:
        """Thin ids in the pool against device files, both ways; ``fix`` deletes orphans and drops dangling files."""
        with self._mutex:
            in_pool = self.pool_ids()
            known = {d.device_id: h for h, d in self.devices.items()}
            orphans = sorted(i for i in in_pool if i not in known)
            dangling = sorted(h for h, d in self.devices.items() if d.device_id not in in_pool)
            deleted = sorted(h for h, d in self.devices.items() if d.deleted)
            if fix and (orphans or dangling):
                self._writable()
                for device_id in orphans:
                    tx = self._open_transaction("", device_id)
                    try:
                        self.dm.message(self.pool, f"delete {device_id}")
                    finally:
                        self._close_transaction(tx)
                for h in dangling:
                    self.meta.remove(h)
                    info = self.devices.pop(h)
                    self.allocator.release(info.device_id)
            return Reconciliation(orphans, dangling, deleted, fix and bool(orphans or dangling))

    # -- teardown --------------------------------------------------------------------------------

    def shutdown(self, *, remove_pool: bool = True) -> None:
        """Docker's Shutdown: unmount everything, deactivate the devices and (if ours) the pool."""
        with self._mutex:
            for hash_ in list(self._refs):
                self.unmount(hash_, force=True)
            for hash_ in list(self.devices):
                if self.is_active(hash_):
                    with contextlib.suppress(DmError):
                        self.dm.remove(self.name_of(hash_), deferred=False, retries=0)
            if remove_pool and self._owns_pool:
                with contextlib.suppress(DmError):
                    self.dm.remove(self.pool, deferred=False, retries=20)


def _size_of(path: Path) -> int:
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def _blkid_uuid(node: str) -> str:
    proc = subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value", node], capture_output=True, text=True,
                          check=False)
    return proc.stdout.strip()


def _write_json(path: Path, value: object) -> None:
    replace_file(path, json.dumps(value).encode())


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)

