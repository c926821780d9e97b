"""The thin pool: a metadata device and a data device run as the kernel's ``thin-pool`` target.

Theory of operation
-------------------
``Pool`` is what a loaded and resumed thin-pool table is: ``open`` binds (formatting all-zero
metadata) and grows to the devices' sizes; ``message`` runs the six pool messages, each followed by
a commit; ``open_thin`` activates thin devices as ``ThinVolume`` objects (``volume.py``), and
``delete`` refuses an open one; ``resize_*``/``resume`` grow the devices while in use; ``status`` and
``table`` print the kernel's lines (``status.py``); ``close`` commits.  Modes, commits, space
accounting and the services the I/O path calls live in the base class (``engine.py``).

Messages and resizes take the commit gate exclusively: in-flight I/O finishes first (so a snapshot
never sees a half-done write to its origin), pending changes are committed before the operation (so
a failing operation can be aborted alone) and the result is committed after it.

Use::

    with Pool.open("meta.img", "data.img", data_block_size=128, low_water_mark=64) as pool:
        pool.message("create_thin 0")
        with pool.open_thin(0, size_sectors=2 << 20) as vol:  # 1 GiB, whatever the pool holds
            vol.write(0, b"hello", fua=True)
        status = pool.status_line()  # 0 <len> thin-pool 0 .../... 1/... - rw discard_passdown ...
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from typing import TypeVar

from devmapper.blockdev.base import BlockDevice
from devmapper.blockdev.file import FileBlockDevice
from devmapper.errors import DeviceError, DevmapperError, NoSpaceError, PoolFailedError
from devmapper.thin.background import PoolEvent
from devmapper.thin.data_device import DataDevice
from devmapper.thin.engine import PoolEngine
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
    target_line,
)
from devmapper.thin.volume import OutOfDataSpaceError, PoolIOError, ThinVolume
from devmapper.units import METADATA_BLOCK_SIZE, SECTOR_SIZE

log = logging.getLogger(__name__)

__all__ = ["OutOfDataSpaceError", "Pool", "PoolEvent", "PoolFeatures", "PoolIOError", "PoolMode"]

DeviceArg = BlockDevice | str | os.PathLike[str]
EventCallback = Callable[["Pool", PoolEvent], None]
R = TypeVar("R")

NO_SPACE_TIMEOUT = 60.0  # seconds (module parameter no_space_timeout)
COMMIT_PERIOD = 1.0  # seconds (COMMIT_PERIOD = HZ)
_CHANGE_MARKS = itertools.count(1)  # unique marks for Pool.note_change (0: never changed)


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


class Pool(PoolEngine):
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
        on_event = None if event_callback is None else (lambda e: event_callback(self, e))
        super().__init__(
            md, metadata_dev, data_dev, table, name=name, no_space_timeout=no_space_timeout,
            commit_period=commit_period, on_event=on_event,
        )
        self._open_thins: dict[int, int] = {}
        self._change_marks: dict[int, int] = {}  # thin id -> mark of its last change (see note_change)

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
    def features(self) -> PoolFeatures:
        return self.params.features

    @property
    def nr_data_blocks(self) -> int:
        return self.md.nr_data_blocks()

    @property
    def length_sectors(self) -> int:
        """The pool target's length: the data device in sectors."""
        return self.data.size() // SECTOR_SIZE

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

    def note_change(self, dev_id: int) -> None:
        """A write, discard or write-zeroes on thin dev_id finished (or failed part way): give it a
        new, never used mark.  Thin volumes on the same id share it (``ThinVolume.read_token``)."""
        self._change_marks[dev_id] = next(_CHANGE_MARKS)

    def change_mark(self, dev_id: int) -> int:
        return self._change_marks.get(dev_id, 0)

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
