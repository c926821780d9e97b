"""The pool engine: modes, commits, space accounting and the I/O-path interface of a thin pool.

Theory of operation
-------------------
``PoolEngine`` is the part of ``Pool`` (``pool.py``) that ``ThinVolume`` (``volume.py``) runs on:
it owns the ``PoolMetadata``, the data device, the commit gate and block locks, the pool's mode, and
the periodic committer; it decides whether a write may get a new block and what happens when none
is left.  ``Pool`` adds opening, messages, volumes, resize and status on top.

Modes (``PoolMode``, the kernel's ``set_pool_mode``):

* ``WRITE`` -- normal.
* ``OUT_OF_DATA_SPACE`` -- an allocation found no free block even after a commit.  Writes that need a
  new block wait (``queue_if_no_space``) until a commit finds free blocks again (discard, delete,
  growth) or until ``no_space_timeout`` seconds (60, 0 = forever) have passed since the pool entered
  the mode; then they, and all later ones, fail with ``OutOfDataSpaceError`` and the status says
  ``error_if_no_space``.  With the ``error_if_no_space`` feature they fail at once.  Reads, writes to
  unshared mapped blocks, discards and messages still work.
* ``OUT_OF_METADATA_SPACE`` -- reported free metadata (free minus the reserve, see ``status.py``)
  reached 0.  Allocation checks it before taking a block (a commit then switches the mode), so the
  reserve is left for the commit.  Behaves as ``READ_ONLY`` until the metadata device grows.
* ``READ_ONLY`` -- the ``read_only`` feature, NEEDS_CHECK in the superblock, or a failed metadata
  operation (the transaction is aborted, NEEDS_CHECK set).  No new mappings: writes that need one
  fail with ``PoolIOError`` (EIO), discards succeed without effect, messages fail with EOPNOTSUPP.
* ``FAIL`` -- aborting or setting NEEDS_CHECK failed.  All I/O fails; only ``close`` works.

Commits (``commit``) hold the commit gate exclusively (``locks.py``), flush the data device, then
commit the metadata: a mapping is never durable before its data.  Discard passdown for blocks freed
in the transaction happens right after that, still under the gate (``queue_passdown``): never while
the committed metadata may map them, never after they could have been reallocated.  Commits happen
on flush/FUA of a device changed in this transaction, at most ``commit_period`` (1 s) after the
first change, after every successful message, on resize, on ``status`` (unless ``noflush``) and on
``close``.

Locks: the gate; per-block locks; ``_md_lock`` serialising metadata *changes* with mode decisions
(lookups go straight to ``PoolMetadata``, which has its own lock); ``_state`` (mode, waiters, open
volumes).  Order: gate, block locks, ``_md_lock``, ``_state``, ``PoolMetadata``'s lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from devmapper.blockdev.base import BlockDevice
from devmapper.errors import DevmapperError, NoSpaceError, PoolFailedError
from devmapper.thin.background import EventDispatcher, PeriodicCommitter, PoolEvent
from devmapper.thin.data_device import DataDevice
from devmapper.thin.locks import BlockLocks, CommitGate
from devmapper.thin.metadata import PoolMetadata, metadata_blocks_of
from devmapper.thin.status import PoolMode, PoolTable, metadata_low_water_mark, metadata_reserve
from devmapper.thin.volume import OutOfDataSpaceError, PoolIOError, runs
from devmapper.units import SECTOR_SIZE

log = logging.getLogger(__name__)

R = TypeVar("R")


class PoolEngine:
    """State and I/O-path services of a pool; see ``Pool`` for the public life cycle."""

    def __init__(
        self,
        md: PoolMetadata,
        metadata_dev: BlockDevice,
        data_dev: BlockDevice,
        table: PoolTable,
        *,
        name: str,
        no_space_timeout: float,
        commit_period: float,
        on_event: Callable[[PoolEvent], None] | None,
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
        self._mode = PoolMode.READ_ONLY if table.features.read_only or md.needs_check else PoolMode.WRITE
        self._error_if_no_space = table.features.error_if_no_space
        self._oods_since = 0.0
        self._closing = False
        self._changed: set[int] = set()
        self._passdown: list[tuple[int, int]] = []  # data block runs to punch at the next commit
        self._low_water_triggered = False
        self._meta_below_threshold = False
        self._meta_free_at_commit = md.nr_free_metadata_blocks()
        self._meta_threshold = metadata_low_water_mark(metadata_blocks_of(metadata_dev))
        self._events = EventDispatcher(on_event, name)
        self._committer = PeriodicCommitter(self._periodic_commit, commit_period, name)

    # -- properties ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def mode(self) -> PoolMode:
        return self._mode

    @property
    def discard_enabled(self) -> bool:
        return not self.params.features.ignore_discard

    @property
    def discard_passdown(self) -> bool:
        """Passdown as in effect: requested, and the data device can deallocate."""
        return not self.params.features.no_discard_passdown and self.data.can_punch

    @property
    def metadata_low_water_mark(self) -> int:
        """min(1024, metadata device blocks / 4); recomputed when the pool resumes."""
        return self._meta_threshold

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

    # -- services of the I/O path (ThinVolume) ----------------------------------------------------

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
