"""The thin pool: a metadata device and a data device run as the kernel's ``thin-pool`` target.

Theory of operation
-------------------
``Pool`` owns a ``PoolMetadata`` and the data device, and implements what ``dm-thin.c`` does around
them: modes, messages, commits, space management, resize, status.  The per-block I/O logic lives in
``volume.py`` (``ThinVolume``), which calls the small engine interface at the end of this class.

Modes (``PoolMode``, the kernel's ``set_pool_mode``):

* ``WRITE`` -- normal.
* ``OUT_OF_DATA_SPACE`` -- an allocation found no free block even after a commit.  Writes that need a
  new block wait (``queue_if_no_space``) until a commit finds free blocks again (discard, delete,
  growth) or until ``no_space_timeout`` seconds (60, 0 = forever) have passed since the pool entered
  the mode; then they, and all later ones, fail with ``OutOfDataSpaceError`` and the status says
  ``error_if_no_space``.  With the ``error_if_no_space`` feature they fail at once.  Reads, writes to
  unshared mapped blocks, discards and messages still work.
* ``OUT_OF_METADATA_SPACE`` -- reported free metadata (free minus the reserve, see ``status.py``)
  reached 0 at a commit.  Behaves as ``READ_ONLY`` until the metadata device grows.
* ``READ_ONLY`` -- the ``read_only`` feature, NEEDS_CHECK in the superblock, or a failed metadata
  operation (the transaction is aborted, NEEDS_CHECK set).  No new mappings: writes that need one
  fail with ``PoolIOError`` (EIO), discards succeed without effect, messages fail with EOPNOTSUPP.
* ``FAIL`` -- aborting or setting NEEDS_CHECK failed.  All I/O fails; only ``close`` works.

Commits (``commit``) hold the commit gate exclusively (``locks.py``), flush the data device, then
commit the metadata: a mapping is never durable before its data.  Discard passdown for blocks freed
in the transaction happens right after that, still under the gate (``queue_passdown``): never while
the committed metadata may map them, never after they could have been reallocated.  They happen on flush/FUA of a
device changed in this transaction, at most ``commit_period`` (1 s) after the first change, after
every successful message, on resize, on ``status`` (unless ``noflush``) and on ``close``.

Use::

    with Pool.open("meta.img", "data.img", data_block_size=128, low_water_mark=64) as pool:
        pool.message("create_thin 0")
        with pool.open_thin(0, size_sectors=2 << 20) as vol:  # 1 GiB, whatever the pool holds
            vol.write(0, b"hello", fua=True)
        print(pool.status_line())  # 0 <len> thin-pool 1 .../... 1/... - rw discard_passdown ...

Locks: the gate; per-block locks; ``_md_lock`` serialising metadata *changes* with mode decisions
(lookups go straight to ``PoolMetadata``, which has its own lock); ``_state`` (mode, waiters, open
volumes).  Order: gate, block locks, ``_md_lock``, ``_state``, ``PoolMetadata``'s lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from devmapper.blockdev.base import BlockDevice
from devmapper.blockdev.file import FileBlockDevice
from devmapper.errors import DeviceError, DevmapperError, NoSpaceError, PoolFailedError
from devmapper.thin.background import EventDispatcher, PeriodicCommitter, PoolEvent
from devmapper.thin.data_device import DataDevice
from devmapper.thin.locks import BlockLocks, CommitGate
from devmapper.thin.messages import (
    CreateSnap,
    CreateThin,
    Delete,
    ReserveMetadataSnap,
    SetTransactionId,
    parse_message,
    split_message,
)
from devmapper.thin.metadata import PoolMetadata, metadata_blocks_of
from devmapper.thin.status import (
    PoolFeatures,
    PoolMode,
    PoolStatus,
    PoolTable,
    metadata_low_water_mark,
    metadata_reserve,
    target_line,
)
from devmapper.thin.volume import OutOfDataSpaceError, PoolIOError, ThinVolume, runs
from devmapper.units import METADATA_BLOCK_SIZE, SECTOR_SIZE

log = logging.getLogger(__name__)

__all__ = ["OutOfDataSpaceError", "Pool", "PoolEvent", "PoolFeatures", "PoolIOError", "PoolMode"]

DeviceArg = BlockDevice | str | os.PathLike[str]
EventCallback = Callable[["Pool", PoolEvent], None]
R = TypeVar("R")

NO_SPACE_TIMEOUT = 60.0  # seconds (module parameter no_space_timeout)
COMMIT_PERIOD = 1.0  # seconds (COMMIT_PERIOD = HZ)


def _as_device(dev: DeviceArg, read_only: bool) -> BlockDevice:
    if isinstance(dev, (str, os.PathLike)):
        return FileBlockDevice(dev, read_only=read_only)
    return dev


def _name_of(dev: DeviceArg, default: str) -> str:
    if isinstance(dev, (str, os.PathLike)):
        return os.fspath(dev)
    return str(getattr(dev, "path", default))


def _is_unformatted(dev: BlockDevice) -> bool:
    """The kernel formats metadata whose first 4 KiB are all zero (``__superblock_all_zeroes``)."""
    return dev.size() >= METADATA_BLOCK_SIZE and not any(dev.read(0, METADATA_BLOCK_SIZE))


def _open_metadata(meta: BlockDevice, data: BlockDevice, table: PoolTable) -> PoolMetadata:
    nr_data = data.size() // (table.data_block_size * SECTOR_SIZE)
    if _is_unformatted(meta):
        if table.features.read_only:
            raise DeviceError("cannot format metadata of a read-only pool", "EPERM")
        return PoolMetadata.format(meta, table.data_block_size, nr_data_blocks=nr_data)
    md = PoolMetadata.open(meta, read_only=table.features.read_only, data_block_size=table.data_block_size)
    if nr_data < md.nr_data_blocks():
        md.dev.close()
        raise DeviceError(f"pool target ({nr_data} blocks) too small: expected {md.nr_data_blocks()}", "EINVAL")
    return md


class Pool:
    """A running thin pool.  Create with ``Pool.open``; use as a context manager or call ``close``."""

    def __init__(
        self,
        md: PoolMetadata,
        metadata_dev: BlockDevice,
        data_dev: BlockDevice,
        table: PoolTable,
        *,
        name: str = "pool",
        no_space_timeout: float = NO_SPACE_TIMEOUT,
        commit_period: float = COMMIT_PERIOD,
        event_callback: EventCallback | None = None,
    ) -> None:
        self.md = md
        self.metadata_dev = metadata_dev
        self.data = DataDevice(data_dev)
        self.params = table
        self.name = name
        self.no_space_timeout = no_space_timeout
        self.block_sectors = table.data_block_size
        self.block_bytes = table.data_block_size * SECTOR_SIZE
        self.zero_new_blocks = not table.features.skip_block_zeroing
        self.gate = CommitGate()
        self.locks = BlockLocks()
        self._md_lock = threading.Lock()
        self._state = threading.Condition(threading.Lock())
        self._mode = PoolMode.WRITE
        self._error_if_no_space = table.features.error_if_no_space
        self._oods_since = 0.0
        self._closing = False
        self._open_thins: dict[int, int] = {}
        self._changed: set[int] = set()
        self._passdown: list[tuple[int, int]] = []  # data block runs to punch at the next commit
        self._low_water_triggered = False
        self._meta_below_threshold = False
        self._meta_free_at_commit = md.nr_free_metadata_blocks()
        self._meta_threshold = metadata_low_water_mark(metadata_blocks_of(metadata_dev))
        self._events = EventDispatcher(None if event_callback is None else (lambda e: event_callback(self, e)), name)
        self._committer = PeriodicCommitter(self._periodic_commit, commit_period, name)
        if table.features.read_only or md.needs_check:
            self._mode = PoolMode.READ_ONLY  # NEEDS_CHECK: never WRITE until repaired

    @classmethod
    def open(
        cls,
        metadata: DeviceArg,
        data: DeviceArg,
        data_block_size: int = 128,
        low_water_mark: int = 0,
        features: PoolFeatures | None = None,
        *,
        metadata_name: str | None = None,
        data_name: str | None = None,
        name: str = "pool",
        no_space_timeout: float = NO_SPACE_TIMEOUT,
        commit_period: float = COMMIT_PERIOD,
        event_callback: EventCallback | None = None,
    ) -> Pool:
        """Open (formatting all-zero metadata) a pool, as loading and resuming a thin-pool table does.

        Devices may be ``BlockDevice`` objects or paths (opened as ``FileBlockDevice``); the names
        only appear in ``table()``.  A data device bigger than the pool's data space map grows it.
        """
        features = features or PoolFeatures()
        table = PoolTable(
            metadata_name or _name_of(metadata, "metadata"), data_name or _name_of(data, "data"),
            data_block_size, low_water_mark, features,
        )
        meta_dev = _as_device(metadata, read_only=features.read_only)
        try:
            data_dev = _as_device(data, read_only=False)
        except DevmapperError:
            meta_dev.close()
            raise
        try:
            md = _open_metadata(meta_dev, data_dev, table)
        except BaseException:
            meta_dev.close()
            data_dev.close()
            raise
        pool = cls(
            md, meta_dev, data_dev, table, name=name, no_space_timeout=no_space_timeout,
            commit_period=commit_period, event_callback=event_callback,
        )
        try:
            pool._startup_resize()
        except BaseException:
            pool.close()
            raise
        return pool

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Commit (unless read-only or failed) and release both devices.  Waiting writers fail."""
        with self._state:
            if self._closing:
                return
            self._closing = True
            self._state.notify_all()
        self._committer.stop()
        try:
            if self._mode < PoolMode.OUT_OF_METADATA_SPACE:
                with self.gate.exclusive():
                    self._commit_exclusive()
        finally:
            try:
                self.md.close()
            finally:
                self.data.close()
                self._events.stop()

    # -- properties ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def mode(self) -> PoolMode:
        return self._mode

    @property
    def features(self) -> PoolFeatures:
        return self.params.features

    @property
    def discard_enabled(self) -> bool:
        return not self.params.features.ignore_discard

    @property
    def discard_passdown(self) -> bool:
        """Passdown as in effect: requested, and the data device can deallocate."""
        return not self.params.features.no_discard_passdown and self.data.can_punch

    @property
    def nr_data_blocks(self) -> int:
        return self.md.nr_data_blocks()

    @property
    def length_sectors(self) -> int:
        """The pool target's length: the data device in sectors."""
        return self.data.size() // SECTOR_SIZE

    @property
    def metadata_low_water_mark(self) -> int:
        """min(1024, metadata device blocks / 4); recomputed when the pool resumes."""
        return self._meta_threshold

    # -- messages --------------------------------------------------------------------------------

    def message(self, text: str) -> None:
        """A pool message with the kernel's syntax (``pool_message``); errors carry errno_name."""
        argv = split_message(text)
        self._check_messages_allowed()
        cmd = parse_message(argv)
        if isinstance(cmd, CreateThin):
            self.create_thin(cmd.dev_id)
        elif isinstance(cmd, CreateSnap):
            self.create_snap(cmd.dev_id, cmd.origin_id)
        elif isinstance(cmd, Delete):
            self.delete(cmd.dev_id)
        elif isinstance(cmd, SetTransactionId):
            self.set_transaction_id(cmd.current, cmd.new)
        elif isinstance(cmd, ReserveMetadataSnap):
            self.reserve_metadata_snap()
        else:
            self.release_metadata_snap()

    def create_thin(self, dev: int) -> None:
        """A new empty thin device (EEXIST if the id is taken)."""
        self._run_message(lambda: self.md.create_thin(dev))

    def create_snap(self, dev: int, origin: int) -> None:
        """A snapshot of origin.  In-flight writes to the origin finish first (the gate quiesces it)."""
        self._run_message(lambda: self.md.create_snap(dev, origin))

    def delete(self, dev: int) -> None:
        """Delete a thin device and free its unshared blocks (EBUSY while a volume has it open)."""

        def op() -> None:
            with self._state:  # held across the delete so open_thin cannot slip in between
                if self._open_thins.get(dev):
                    raise DeviceError(f"thin device {dev} is open", "EBUSY")
                self.md.delete(dev)

        self._run_message(op)

    def set_transaction_id(self, current: int, new: int) -> None:
        self._run_message(lambda: self.md.set_transaction_id(current, new))

    def reserve_metadata_snap(self) -> int:
        """Take the metadata snapshot (held root); returns its block (EBUSY if one exists)."""
        return self._run_message(self.md.reserve_metadata_snap)

    def release_metadata_snap(self) -> None:
        self._run_message(self.md.release_metadata_snap)

    def _check_messages_allowed(self) -> None:
        if self._closing:
            raise DeviceError("pool is closed", "ENODEV")
        if self._mode >= PoolMode.OUT_OF_METADATA_SPACE:
            raise DeviceError("unable to service pool target messages in READ_ONLY or FAIL mode", "EOPNOTSUPP")

    def _run_message(self, op: Callable[[], R]) -> R:
        """Gate held: commit pending I/O, run op, commit -- so a failing op can be aborted alone."""
        with self.gate.exclusive():
            self._check_messages_allowed()
            self._commit_exclusive()
            with self._md_lock:
                result = self._message_op_locked(op)
            self._commit_exclusive()
            return result

    def _message_op_locked(self, op: Callable[[], R]) -> R:
        try:
            return op()
        except DeviceError:
            raise
        except NoSpaceError as e:
            self._abort_locked(e)
            self._check_for_metadata_space_locked()
            raise DeviceError(f"out of {e.what} space", "ENOSPC") from e
        except (DevmapperError, OSError) as e:
            self._metadata_operation_failed_locked("message", e)
            raise DeviceError(f"metadata operation failed: {e}", "EIO") from e

    # -- volumes ---------------------------------------------------------------------------------

    def open_thin(
        self,
        dev_id: int,
        size_sectors: int,
        origin: DeviceArg | None = None,
        *,
        pool_dev: str | None = None,
        origin_dev: str | None = None,
    ) -> ThinVolume:
        """Activate thin device dev_id as a volume of size_sectors (any size: overprovisioning).

        ``origin`` is an optional external origin, opened read-only; unprovisioned blocks read from
        it.  ``pool_dev``/``origin_dev`` name the devices in the thin's table line.
        """
        if self._closing:
            raise DeviceError("pool is closed", "ENODEV")
        if self._mode is PoolMode.FAIL:
            raise DeviceError("Couldn't open thin device, Pool is in fail mode", "EINVAL")
        origin_data = None if origin is None else DataDevice(_as_device(origin, read_only=True))
        with self._state:
            if not self.md.device_exists(dev_id):
                if origin_data is not None:
                    origin_data.close()
                raise DeviceError(f"thin device {dev_id} does not exist", "ENODATA")
            self._open_thins[dev_id] = self._open_thins.get(dev_id, 0) + 1
        names = (pool_dev or self.name, None if origin is None else origin_dev or _name_of(origin, "origin"))
        return ThinVolume(self, dev_id, size_sectors, origin_data, names[0], names[1])

    def close_thin(self, dev_id: int) -> None:
        """Called by ``ThinVolume.close``."""
        with self._state:
            left = self._open_thins.get(dev_id, 0) - 1
            if left > 0:
                self._open_thins[dev_id] = left
            else:
                self._open_thins.pop(dev_id, None)

    def open_thin_ids(self) -> list[int]:
        with self._state:
            return sorted(self._open_thins)

    # -- commit ----------------------------------------------------------------------------------

    def commit(self) -> None:
        """Flush the data device, then commit the metadata (nothing is written if nothing changed).

        The data device is flushed twice: first while I/O goes on (that writes back most dirty data),
        then with the gate held, so only what was written in between stalls the pool.
        """
        self._check_open()
        if self._mode < PoolMode.OUT_OF_METADATA_SPACE:
            try:
                self.data.flush()
            except DevmapperError:
                pass  # the flush under the gate reports it
        with self.gate.exclusive():
            self._commit_exclusive()

    def _periodic_commit(self) -> None:
        if not self._closing and self._mode < PoolMode.OUT_OF_METADATA_SPACE:
            self.commit()

    def _commit_exclusive(self) -> None:
        with self._md_lock:
            if self._mode is PoolMode.FAIL:
                raise PoolFailedError("pool has failed")
            if self._mode >= PoolMode.OUT_OF_METADATA_SPACE:
                self.data.flush()
                return
            try:
                self.data.flush()
                self.md.commit()
            except (DevmapperError, OSError) as e:
                self._metadata_operation_failed_locked("commit", e)
                raise PoolIOError(f"commit failed: {e}") from e
            self._changed.clear()
            self._committer.clean()
            self._meta_free_at_commit = self.md.nr_free_metadata_blocks()
            self._pass_down_locked()
            self._check_for_metadata_space_locked()
            self._check_for_data_space_locked()

    def queue_passdown(self, blocks: list[int]) -> None:
        """Data blocks a discard freed; the next commit punches them (see ``volume.py``)."""
        if blocks:
            with self._md_lock:
                self._passdown.extend(runs(sorted(blocks)))

    def _pass_down_locked(self) -> None:
        """Punch the queued blocks: the commit just made their unmapping durable, and the gate keeps
        them from being reallocated until it is released.  Failures only cost space (logged)."""
        queued, self._passdown = self._passdown, []
        for lo, hi in queued:
            free = [b for b in range(lo, hi) if not self.md.data_block_count(b)]
            for b0, b1 in runs(free):
                try:
                    if not self.data.punch(b0 * self.block_bytes, (b1 - b0) * self.block_bytes):
                        return
                except DevmapperError as e:
                    log.warning("%s: discard passdown failed: %s", self.name, e)
                    return

    def _check_open(self) -> None:
        if self._closing:
            raise PoolIOError("pool is closed")

    # -- modes -----------------------------------------------------------------------------------

    def _set_mode_locked(self, new: PoolMode) -> None:
        """``set_pool_mode``: NEEDS_CHECK keeps the pool out of WRITE; FAIL is final."""
        old = self._mode
        if new is PoolMode.WRITE and self.md.needs_check:
            new = old if old is not PoolMode.WRITE else PoolMode.READ_ONLY
        if old is PoolMode.FAIL:
            new = old
        if new is PoolMode.FAIL:
            self.md.fail()
        with self._state:
            if new is PoolMode.WRITE:
                self._error_if_no_space = self.params.features.error_if_no_space
            if new is PoolMode.OUT_OF_DATA_SPACE and old is not new:
                self._oods_since = time.monotonic()
            self._mode = new
            self._state.notify_all()
        if new is not old:
            log.info("%s: switching pool to %s mode", self.name, new.name.lower())
            self._events.post(PoolEvent.MODE_CHANGED)

    def _abort_locked(self, e: BaseException) -> bool:
        """Drop the open transaction; on failure latch FAIL and return False."""
        log.error("%s: aborting current metadata transaction (%s)", self.name, e)
        try:
            self.md.abort()
        except (DevmapperError, OSError):
            log.exception("%s: failed to abort metadata transaction", self.name)
            self._set_mode_locked(PoolMode.FAIL)
            return False
        self._changed.clear()
        self._passdown.clear()  # the unmappings were rolled back
        self._committer.clean()
        self._meta_free_at_commit = self.md.nr_free_metadata_blocks()
        return True

    def _metadata_operation_failed_locked(self, op: str, e: BaseException) -> None:
        """``metadata_operation_failed``: abort, set NEEDS_CHECK, go read-only (or fail)."""
        log.error("%s: metadata operation '%s' failed: %s", self.name, op, e)
        if not self._abort_locked(e):
            return
        try:
            self.md.set_needs_check()
        except (DevmapperError, OSError):
            log.exception("%s: failed to set 'needs_check' flag in metadata", self.name)
            self._set_mode_locked(PoolMode.FAIL)
            return
        self._set_mode_locked(PoolMode.READ_ONLY)

    def _free_metadata_locked(self) -> int:
        """Metadata blocks this transaction can still allocate (the kernel's ``sm_metadata_get_nr_free``:
        free at the last commit minus allocated since).  Blocks freed in the open transaction do not
        count: they cannot be reused before the commit.  Every block allocated since the commit is a
        dirty block of the transaction manager until the commit writes it (or, in transactions over
        ``max_dirty`` blocks, an early write-back does -- then this is optimistic)."""
        return min(self.md.nr_free_metadata_blocks(), self._meta_free_at_commit - self.md.tm.nr_dirty)

    def _reported_free_metadata_locked(self) -> int:
        """Free metadata as reported (``dm_pool_get_free_metadata_block_count``): less the reserve."""
        return max(0, self._free_metadata_locked() - metadata_reserve(self.md.nr_metadata_blocks()))

    def _check_for_metadata_space_locked(self) -> None:
        if self._mode < PoolMode.OUT_OF_METADATA_SPACE and not self._reported_free_metadata_locked():
            log.error("%s: no free metadata blocks", self.name)
            self._set_mode_locked(PoolMode.OUT_OF_METADATA_SPACE)

    def _check_for_data_space_locked(self) -> None:
        if self._mode is PoolMode.OUT_OF_DATA_SPACE and self.md.nr_free_data_blocks():
            self._set_mode_locked(PoolMode.WRITE)

    def _no_space_is_error(self) -> bool:
        """The no-space policy in effect; latches to error once no_space_timeout has expired."""
        with self._state:
            if self._error_if_no_space or self._mode is not PoolMode.OUT_OF_DATA_SPACE:
                return self._error_if_no_space
            if self.no_space_timeout > 0 and time.monotonic() >= self._oods_since + self.no_space_timeout:
                self._error_if_no_space = True
                self._state.notify_all()
                self._events.post(PoolEvent.NO_SPACE_TIMEOUT)
            return self._error_if_no_space

    # -- resize ----------------------------------------------------------------------------------

    def resize_data(self, new_size: int | None = None) -> None:
        """Grow the data device to new_size bytes (a file is truncated longer; None: it already grew)
        and let the pool use it, as reloading a bigger table and resuming does.  Never shrinks."""
        self._check_open()
        with self.gate.exclusive():
            self._grow_device(self.data.dev, new_size)
            self._resume_exclusive()

    def resize_metadata(self, new_size: int | None = None) -> None:
        """Grow the metadata device (and its space map) while in use; leaves out-of-metadata-space."""
        self._check_open()
        with self.gate.exclusive():
            self._grow_device(self.metadata_dev, new_size)
            self._resume_exclusive()

    def resume(self) -> None:
        """Pick up devices grown behind the pool's back and re-arm the low-water event (``pool_resume``)."""
        self._check_open()
        with self.gate.exclusive():
            self._resume_exclusive()

    def rebind(self, low_water_mark: int, features: PoolFeatures) -> None:
        """A reloaded thin-pool table took this pool over (``bind_control_target``): its low water mark
        and feature flags apply from now on.  Devices, block size, ``read_only`` and discard support
        stay as they are; the caller refuses tables that would change them (as ``pool_ctr`` does)."""
        with self._state:
            self.params = PoolTable(
                self.params.metadata_dev, self.params.data_dev, self.params.data_block_size, low_water_mark, features
            )
            self.zero_new_blocks = not features.skip_block_zeroing
            if self._mode is PoolMode.WRITE or features.error_if_no_space:
                self._error_if_no_space = features.error_if_no_space

    @staticmethod
    def _grow_device(dev: BlockDevice, new_size: int | None) -> None:
        if new_size is None or new_size == dev.size():
            return
        if new_size < dev.size():
            raise DeviceError(f"cannot shrink a pool device ({dev.size()} -> {new_size} bytes)", "EINVAL")
        dev.resize(new_size)

    def _startup_resize(self) -> None:
        if self._mode < PoolMode.READ_ONLY:
            with self.gate.exclusive():
                self._resume_exclusive()

    def _resume_exclusive(self) -> None:
        with self._md_lock:
            if self._mode is PoolMode.FAIL:
                raise PoolFailedError("pool has failed")
            grown = self._maybe_resize_data_locked()
            grown = self._maybe_resize_metadata_locked() or grown
            self._meta_threshold = metadata_low_water_mark(metadata_blocks_of(self.metadata_dev))
            with self._state:
                self._low_water_triggered = False
        if grown:
            self._commit_exclusive()

    def _maybe_resize_data_locked(self) -> bool:
        nr, cur = self.data.size() // self.block_bytes, self.md.nr_data_blocks()
        if nr < cur:
            raise DeviceError(f"pool target ({nr} blocks) too small: expected {cur}", "EINVAL")
        if nr == cur or self.md.read_only:
            return False
        if self.md.needs_check:
            log.error("%s: unable to grow the data device until repaired.", self.name)
            return False
        log.info("%s: growing the data device from %d to %d blocks", self.name, cur, nr)
        self._resize_locked(lambda: self.md.resize_data_dev(nr))
        return True

    def _maybe_resize_metadata_locked(self) -> bool:
        nr, cur = metadata_blocks_of(self.metadata_dev), self.md.nr_metadata_blocks()
        if nr < cur:
            raise DeviceError(f"metadata device ({nr} blocks) too small: expected {cur}", "EINVAL")
        if nr == cur or self.md.read_only:
            return False
        if self.md.needs_check:
            log.error("%s: unable to grow the metadata device until repaired.", self.name)
            return False
        log.info("%s: growing the metadata device from %d to %d blocks", self.name, cur, nr)
        if self._mode is PoolMode.OUT_OF_METADATA_SPACE:
            self._set_mode_locked(PoolMode.WRITE)
        self._resize_locked(lambda: self.md.resize_metadata_dev(nr))
        return True

    def _resize_locked(self, op: Callable[[], None]) -> None:
        try:
            op()
        except (DevmapperError, OSError) as e:
            self._metadata_operation_failed_locked("resize", e)
            raise PoolIOError(f"resize failed: {e}") from e
        self._committer.mark_dirty()

    # -- status ----------------------------------------------------------------------------------

    def status_info(self, noflush: bool = False) -> PoolStatus:
        """Every status field; commits first unless noflush (as ``pool_status`` does)."""
        if not noflush and not self._closing and self._mode < PoolMode.OUT_OF_METADATA_SPACE:
            try:
                self.commit()
            except DevmapperError:
                log.warning("%s: commit before status failed", self.name)
        if self._mode is PoolMode.FAIL:
            return PoolStatus(0, 0, 0, 0, 0, 0, PoolMode.FAIL, "", False, False, 0)
        with self._md_lock:
            return self._status_locked()

    def _status_locked(self) -> PoolStatus:
        md = self.md
        total_meta, total_data = md.nr_metadata_blocks(), md.nr_data_blocks()
        if not self.discard_enabled:
            discard = "ignore_discard"
        else:
            discard = "discard_passdown" if self.discard_passdown else "no_discard_passdown"
        return PoolStatus(
            transaction_id=md.trans_id,
            used_metadata_blocks=total_meta - self._reported_free_metadata_locked(),
            total_metadata_blocks=total_meta,
            used_data_blocks=total_data - md.nr_free_data_blocks(),
            total_data_blocks=total_data,
            held_root=md.held_root,
            mode=self._mode,
            discard=discard,
            error_if_no_space=self._no_space_is_error(),
            needs_check=md.needs_check,
            metadata_low_water_mark=self.metadata_low_water_mark,
        )

    def status(self, noflush: bool = False) -> str:
        """The status parameters, e.g. ``0 111/1024 0/10000 - rw discard_passdown queue_if_no_space - 256 ``."""
        return self.status_info(noflush).format()

    def status_line(self, noflush: bool = False) -> str:
        return target_line(0, self.length_sectors, "thin-pool", self.status(noflush))

    def table(self) -> str:
        """The table parameters: ``<meta dev> <data dev> <block size> <low water> <#features> ...``."""
        return self.params.format()

    def table_line(self) -> str:
        return target_line(0, self.length_sectors, "thin-pool", self.params.format())

    # -- engine interface for ThinVolume ---------------------------------------------------------

    def check_io(self) -> None:
        """Refuse I/O on a closed or failed pool."""
        if self._closing:
            raise PoolIOError("pool is closed")
        if self._mode is PoolMode.FAIL:
            raise PoolFailedError("pool has failed")

    def alloc_block(self) -> int | None:
        """A new data block (count 1) for a write, or None: call ``wait_for_space`` and retry.

        Raises ``PoolIOError``/``PoolFailedError`` in modes where nothing may be provisioned.
        """
        with self._md_lock:
            if self._mode is PoolMode.OUT_OF_DATA_SPACE:
                return None
            self._require_write_locked()
            free = self.md.nr_free_data_blocks()
            self._check_low_water_locked(free)
            if not free or not self._reported_free_metadata_locked():
                return None  # wait_for_space commits: that frees data blocks or enters read-only
            try:
                b = self.md.alloc_data_block()
            except NoSpaceError as e:
                if e.what == "data":
                    return None
                self._metadata_operation_failed_locked("alloc_data_block", e)
                raise PoolIOError(f"metadata operation failed: {e}") from e
            self._changed_locked(None)
            return b

    def release_block(self, b: int) -> None:
        """Give back a block from ``alloc_block`` that was never mapped (its data write failed)."""
        self.change(None, lambda: self.md.dec_data_block(b))

    def change(self, dev: int | None, op: Callable[[], R]) -> R:
        """Run a metadata change of the I/O path (insert, remove) under the pool's metadata lock."""
        with self._md_lock:
            self._require_write_locked()
            try:
                result = op()
            except (DevmapperError, OSError) as e:
                self._metadata_operation_failed_locked("mapping change", e)
                raise PoolIOError(f"metadata operation failed: {e}") from e
            self._changed_locked(dev)
            return result

    def _require_write_locked(self) -> None:
        if self._mode is PoolMode.FAIL:
            raise PoolFailedError("pool has failed")
        if self._mode >= PoolMode.OUT_OF_METADATA_SPACE:
            raise PoolIOError(f"pool is {self._mode.name.lower()}: cannot provision")
        if self._closing:
            raise PoolIOError("pool is closed")

    def _changed_locked(self, dev: int | None) -> None:
        if dev is not None:
            self._changed.add(dev)
        self._committer.mark_dirty()
        below = self._free_metadata_locked() <= self._meta_threshold
        if below and not self._meta_below_threshold:
            log.warning("%s: reached low water mark for metadata device: sending event.", self.name)
            self._events.post(PoolEvent.METADATA_LOW_WATER_MARK)
        self._meta_below_threshold = below

    def _check_low_water_locked(self, free: int) -> None:
        with self._state:
            if free > self.params.low_water_mark or self._low_water_triggered:
                return
            self._low_water_triggered = True
        log.warning("%s: reached low water mark for data device: sending event.", self.name)
        self._events.post(PoolEvent.LOW_WATER_MARK)

    def wait_for_space(self) -> None:
        """A writer found no free data block.  Returns when it should retry; raises
        ``OutOfDataSpaceError`` (error mode, timeout) or the mode's error.  Call with no locks held."""
        if self._mode is PoolMode.WRITE:
            # Blocks freed in this transaction become allocatable; a commit that leaves no
            # metadata to spare switches the pool to out-of-metadata-space (the retry then fails).
            self.commit()
            with self._md_lock:
                if self._mode is not PoolMode.WRITE or self.md.nr_free_data_blocks():
                    return
                self._set_mode_locked(PoolMode.OUT_OF_DATA_SPACE)
        self._wait_out_of_data_space()

    def _wait_out_of_data_space(self) -> None:
        while True:
            if self._no_space_is_error() and self._mode is PoolMode.OUT_OF_DATA_SPACE:
                raise OutOfDataSpaceError()
            with self._state:
                if self._closing:
                    raise PoolIOError("pool is closed")
                mode = self._mode
                if mode is PoolMode.OUT_OF_DATA_SPACE and not self._error_if_no_space:
                    timeout = None
                    if self.no_space_timeout > 0:
                        timeout = max(0.0, self._oods_since + self.no_space_timeout - time.monotonic())
                    self._state.wait(timeout)
                    continue
            if mode is PoolMode.WRITE:
                return
            if mode is PoolMode.FAIL:
                raise PoolFailedError("pool has failed")
            if mode is not PoolMode.OUT_OF_DATA_SPACE:
                raise PoolIOError(f"pool is {mode.name.lower()}: cannot provision")

    def changed_this_transaction(self, dev: int) -> bool:
        with self._md_lock:
            return dev in self._changed

    def flush_device(self, dev: int) -> None:
        """A flush (or FUA completion) on thin dev: commit if dev changed, else flush the data device."""
        self.check_io()
        if self.changed_this_transaction(dev) and self._mode < PoolMode.OUT_OF_METADATA_SPACE:
            self.commit()
        else:
            self.data.flush()
