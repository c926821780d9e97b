"""Pool metadata: devices, mappings and transactions on a metadata device (mirrors ``dm-thin-metadata.c``).

What lives where
----------------
* Block 0, the superblock: roots of everything below, the snapshot ``time``, ``trans_id``,
  ``held_root`` (metadata snapshot) and the NEEDS_CHECK flag.  Rewritten in place at every commit.
* The metadata space map counts every 4 KiB metadata block, itself included; the data space map
  counts data blocks (a data block's count is the number of distinct mapping *leaves* naming it).
* The device-details tree: thin id -> {mapped_blocks, transaction_id, creation_time,
  snapshotted_time}.  Details are cached here and written back at commit (``__write_changed_details``).
* The two-level mapping tree: thin id -> root of that device's tree, virtual block -> block_time
  ``(data_block << 24) | time``.  A snapshot shares the origin's whole tree (its root gains a
  reference); copy-on-write of shared nodes separates them as either side changes.

Time and sharing
----------------
``time`` increases by one at every ``create_snap``.  A mapping is *shared* when its time is older than
its device's ``snapshotted_time`` (the kernel's rule: "sharing is broken n+1 times by design").

Commit order (kernel ``__commit_transaction``): write changed details; commit the data space map;
commit the metadata space map; write every dirty block and flush; write the superblock and flush.
Nothing is ever written into a block the committed superblock can reach, so a crash at any point
leaves the previous transaction intact.

Data block reuse
----------------
A data block can be handed out again (and then rewritten or zeroed) only after it became free, and
the data space map hands out only blocks free both now and at the last commit.  So a block that a
mapping stops naming (discarded, sharing broken, device deleted) can be reallocated at once if it
was itself allocated in the open transaction, or else after the next commit; an abort forgets the
open transaction's allocations, which frees those blocks too.  ``epoch`` counts these moments: it
grows by one whenever a data block's count drops to zero, at the end of every commit that wrote
something, and at every (re)load, abort included.  A reader that sees the same epoch before its
lookup and after reading the data therefore knows that no block it read was reassigned in between
(the thin volume's lock-free read path, see ``volume.py``).

Locking and failure
-------------------
Every public method takes the pool lock (an ``RLock``), checks the failure latch, and calls its
``_locked`` worker (the kernel's ``dm_pool_x``/``__x`` pairs).  If ``abort`` itself fails the pool is
latched failed and every later call but ``close`` raises ``PoolFailedError``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Concatenate, ParamSpec, TypeVar

from devmapper.blockdev.base import BlockDevice
from devmapper.errors import (
    DeviceError,
    MetadataError,
    PoolFailedError,
    ReadOnlyError,
)
from devmapper.format.bitmap import MAX_METADATA_BLOCKS
from devmapper.format.records import DeviceDetails, pack_block_time, unpack_block_time
from devmapper.format.superblock import (
    NEEDS_CHECK_FLAG,
    THIN_SUPERBLOCK_MAGIC,
    THIN_VERSION,
    ZERO_SM_ROOT,
    Superblock,
)
from devmapper.pdata import btree
from devmapper.pdata.block_manager import BlockManager
from devmapper.pdata.space_map import DiskSpaceMap, MetadataSpaceMap
from devmapper.pdata.transaction_manager import TransactionManager
from devmapper.units import MAX_DATA_BLOCK_SIZE, MAX_DEV_ID, METADATA_BLOCK_SIZE, MIN_DATA_BLOCK_SIZE

log = logging.getLogger(__name__)

DETAILS_VT = btree.ValueType(DeviceDetails.SIZE)


@dataclasses.dataclass(frozen=True, slots=True)
class LookupResult:
    data_block: int
    time: int
    shared: bool


class SuperblockCopy:
    """A metadata-snapshot copy of the superblock, as a block the transaction manager can write."""

    __slots__ = ("blocknr", "sb")

    def __init__(self, blocknr: int, sb: Superblock) -> None:
        self.blocknr = blocknr
        self.sb = sb

    def pack(self) -> bytearray:
        return self.sb.replace(blocknr=self.blocknr).pack()

    def copy(self, blocknr: int) -> SuperblockCopy:
        return SuperblockCopy(blocknr, self.sb)


def metadata_blocks_of(dev: BlockDevice) -> int:
    """Usable metadata blocks on a device: its size in 4 KiB blocks, capped at the kernel's maximum."""
    return min(dev.size() // METADATA_BLOCK_SIZE, MAX_METADATA_BLOCKS)


P = ParamSpec("P")
R = TypeVar("R")


def _locked(fn: Callable[Concatenate[PoolMetadata, P], R]) -> Callable[Concatenate[PoolMetadata, P], R]:
    """Public entry: take the pool lock and refuse work after the failure latch closed."""

    def wrapper(self: PoolMetadata, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            if self._failed:
                raise PoolFailedError("pool metadata has failed; only close is possible")
            return fn(self, *args, **kwargs)

    functools.update_wrapper(wrapper, fn)
    return wrapper


def _writes(fn: Callable[Concatenate[PoolMetadata, P], R]) -> Callable[Concatenate[PoolMetadata, P], R]:
    """A changing entry: also refuse read-only metadata and mark the transaction dirty."""

    def wrapper(self: PoolMetadata, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.read_only:
            raise ReadOnlyError("pool metadata is open read-only")
        self._in_service = True
        return fn(self, *args, **kwargs)

    functools.update_wrapper(wrapper, fn)
    return _locked(wrapper)


class PoolMetadata:
    """dm-thin metadata on a block device.  Create with ``format`` or ``open``; close with ``close``."""

    def __init__(self, dev: BlockDevice, read_only: bool) -> None:
        self.dev = dev
        self.read_only = read_only
        self._lock = threading.RLock()
        self._failed = False
        self._in_service = False
        self.bm = BlockManager(dev)
        self.tm = TransactionManager(self.bm)
        self.sb: Superblock  # last committed
        self.msm: MetadataSpaceMap
        self.dsm: DiskSpaceMap
        self.time = 0
        self.trans_id = 0
        self.held_root = 0
        self.flags = 0
        self.mapping_root = 0
        self.details_root = 0
        self.data_block_size = 0
        self._details: dict[int, DeviceDetails] = {}
        self._changed: set[int] = set()
        self.epoch = 0  # see "Data block reuse" above
        self.data_vt = btree.ValueType(
            8,
            inc=lambda v: self.dsm.inc(v >> 24),
            dec=lambda v: self._dec_data(v >> 24),
            equal=lambda a, b: (a >> 24) == (b >> 24),
        )
        self.top_vt = btree.ValueType(8, inc=self.tm.inc, dec=lambda r: btree.delete_tree(self.tm, r, self.data_vt))

    # -- creation --------------------------------------------------------------------------------

    @classmethod
    def format(cls, dev: BlockDevice, data_block_size: int, nr_data_blocks: int = 0) -> PoolMetadata:
        """Write fresh metadata (kernel ``__format_metadata``) and commit it."""
        if not (MIN_DATA_BLOCK_SIZE <= data_block_size <= MAX_DATA_BLOCK_SIZE and data_block_size % 128 == 0):
            raise DeviceError(f"invalid data block size {data_block_size}")
        pmd = cls(dev, read_only=False)
        pmd.msm = MetadataSpaceMap.format(pmd.tm, metadata_blocks_of(dev))
        pmd.dsm = DiskSpaceMap.create(pmd.tm)
        pmd.mapping_root = btree.empty_tree(pmd.tm, pmd.top_vt)
        pmd.details_root = btree.empty_tree(pmd.tm, DETAILS_VT)
        pmd.data_block_size = data_block_size
        pmd.sb = Superblock(
            flags=0, blocknr=0, uuid=bytes(16), magic=THIN_SUPERBLOCK_MAGIC, version=THIN_VERSION, time=0,
            trans_id=0, held_root=0, data_sm_root=ZERO_SM_ROOT, metadata_sm_root=ZERO_SM_ROOT,
            data_mapping_root=0, device_details_root=0, data_block_size=data_block_size,
            metadata_nr_blocks=pmd.msm.nr_blocks,
        )
        pmd._commit_locked()
        if nr_data_blocks:
            pmd.resize_data_dev(nr_data_blocks)
            pmd.commit()
        return pmd

    @classmethod
    def open(cls, dev: BlockDevice, read_only: bool = False, data_block_size: int | None = None) -> PoolMetadata:
        """Open existing metadata; refuses what the kernel refuses (bad superblock, flags, block size)."""
        pmd = cls(dev, read_only=read_only or dev.read_only)
        pmd._load()
        if data_block_size is not None and data_block_size != pmd.data_block_size:
            raise MetadataError(
                f"changing the data block size (from {pmd.data_block_size} to {data_block_size}) is not supported"
            )
        return pmd

    def _load(self) -> None:
        sb = Superblock.unpack(self.bm.read(0), 0)
        if sb.incompat_flags:
            raise MetadataError(f"superblock has unsupported incompatible features {sb.incompat_flags:#x}")
        if sb.compat_ro_flags and not self.read_only:
            raise MetadataError(f"superblock has unsupported read-only features {sb.compat_ro_flags:#x}")
        if sb.metadata_sm_root.nr_blocks > self.bm.nr_blocks():
            raise MetadataError(
                f"metadata device is smaller ({self.bm.nr_blocks()} blocks) than its space map "
                f"({sb.metadata_sm_root.nr_blocks} blocks)"
            )
        self.tm.forget()
        self.sb = sb
        self.msm = MetadataSpaceMap.open(self.tm, sb.metadata_sm_root)
        self.dsm = DiskSpaceMap.open(self.tm, sb.data_sm_root)
        self.time, self.trans_id, self.held_root, self.flags = sb.time, sb.trans_id, sb.held_root, sb.flags
        self.mapping_root, self.details_root = sb.data_mapping_root, sb.device_details_root
        self.data_block_size = sb.data_block_size
        self._details.clear()
        self._changed.clear()
        self._in_service = False
        self.epoch += 1

    # -- transactions ----------------------------------------------------------------------------

    @_locked
    def commit(self) -> None:
        """Make every change durable.  A commit with nothing changed writes nothing."""
        if self.read_only or not self._in_service:
            return
        self._commit_locked()

    def _commit_locked(self) -> None:
        """Commit; on any failure abort to the last committed state (or latch failed) and re-raise.

        A half-done commit must never be built upon: the space maps would have forgotten which blocks
        the on-disk superblock still references.
        """
        try:
            self._commit_steps_locked()
        except BaseException:
            self._abort_locked()
            raise

    def _commit_steps_locked(self) -> None:
        for dev in sorted(self._changed):
            self.details_root, _ = btree.insert(self.tm, self.details_root, dev, self._details[dev].pack(), DETAILS_VT)
        self._changed.clear()
        data_root = self.dsm.commit()
        meta_root = self.msm.commit()
        self.tm.pre_commit()
        sb = self.sb.replace(
            flags=self.flags, time=self.time, trans_id=self.trans_id, held_root=self.held_root,
            data_sm_root=data_root, metadata_sm_root=meta_root, data_mapping_root=self.mapping_root,
            device_details_root=self.details_root,
        )
        self.tm.commit_superblock(sb.pack())
        self.sb = sb
        self._in_service = False
        self.epoch += 1

    @_locked
    def abort(self) -> None:
        """Drop the open transaction and return to the last committed state."""
        self._abort_locked()

    def _abort_locked(self) -> None:
        try:
            self._load()
        except BaseException:
            self._failed = True
            log.exception("abort failed; pool metadata latched failed")
            raise

    def close(self) -> None:
        """Commit (unless failed or read-only) and release the device."""
        with self._lock:
            try:
                if not self._failed and not self.read_only:
                    self.commit()
            finally:
                self.dev.close()

    @property
    def failed(self) -> bool:
        return self._failed

    def fail(self) -> None:
        """Latch failure (used by the pool when it cannot trust the metadata any more)."""
        with self._lock:
            self._failed = True

    @property
    def needs_check(self) -> bool:
        return bool(self.flags & NEEDS_CHECK_FLAG)

    @_locked
    def set_needs_check(self) -> None:
        """Set NEEDS_CHECK in the superblock and commit it (``dm_pool_metadata_set_needs_check``)."""
        if self.read_only:
            raise ReadOnlyError("pool metadata is open read-only")
        self.flags |= NEEDS_CHECK_FLAG
        self._in_service = True
        self._commit_locked()

    @_locked
    def clear_needs_check(self) -> None:
        """Clear NEEDS_CHECK and commit (thin_check --clear-needs-check-flag, after a clean check)."""
        if self.read_only:
            raise ReadOnlyError("pool metadata is open read-only")
        self.flags &= ~NEEDS_CHECK_FLAG
        self._in_service = True
        self._commit_locked()

    # -- devices ---------------------------------------------------------------------------------

    def _details_of(self, dev: int) -> DeviceDetails | None:
        d = self._details.get(dev)
        if d is None:
            v = btree.lookup(self.tm, self.details_root, dev)
            if v is None:
                return None
            d = self._details[dev] = DeviceDetails.unpack(v)
        return d

    def _set_details(self, dev: int, d: DeviceDetails) -> None:
        self._details[dev] = d
        self._changed.add(dev)

    @staticmethod
    def _check_id(dev: int) -> None:
        if not 0 <= dev <= MAX_DEV_ID:
            raise DeviceError(f"device id {dev} out of range (0..{MAX_DEV_ID})")

    @_writes
    def create_thin(self, dev: int) -> None:
        """A new empty thin device (``dm_pool_create_thin``).  EEXIST if the id is in use."""
        self._check_id(dev)
        if self._details_of(dev) is not None:
            raise DeviceError(f"device {dev} already exists", "EEXIST")
        subtree = btree.empty_tree(self.tm, self.data_vt)
        self.mapping_root, _ = btree.insert(self.tm, self.mapping_root, dev, subtree, self.top_vt)
        self._set_details(dev, DeviceDetails(0, self.trans_id, self.time, self.time))

    @_writes
    def create_snap(self, dev: int, origin: int) -> None:
        """A snapshot sharing origin's whole mapping tree; time advances by one (``__create_snap``)."""
        self._check_id(dev)
        if self._details_of(dev) is not None:
            raise DeviceError(f"device {dev} already exists", "EEXIST")
        od = self._details_of(origin)
        origin_root = btree.lookup(self.tm, self.mapping_root, origin)
        if od is None or origin_root is None:
            raise DeviceError(f"origin device {origin} does not exist", "ENODATA")
        self.tm.inc(origin_root)
        self.mapping_root, _ = btree.insert(self.tm, self.mapping_root, dev, origin_root, self.top_vt)
        self.time += 1
        self._set_details(origin, dataclasses.replace(od, snapshotted_time=self.time))
        self._set_details(dev, DeviceDetails(od.mapped_blocks, self.trans_id, self.time, self.time))

    @_writes
    def delete(self, dev: int) -> None:
        """Remove a device and drop its mappings (``dm_pool_delete_thin_device``).  ENODATA if absent."""
        if self._details_of(dev) is None:
            raise DeviceError(f"device {dev} does not exist", "ENODATA")
        self.details_root, _ = btree.remove(self.tm, self.details_root, dev, DETAILS_VT)
        self._details.pop(dev, None)
        self._changed.discard(dev)
        self.mapping_root, _ = btree.remove(self.tm, self.mapping_root, dev, self.top_vt)

    @_writes
    def set_transaction_id(self, current: int, new: int) -> None:
        """Compare-and-swap of the userspace transaction id."""
        if not (0 <= current < 1 << 64 and 0 <= new < 1 << 64):
            raise DeviceError("transaction ids are unsigned 64-bit numbers", "EINVAL")
        if current != self.trans_id:
            raise DeviceError(f"mismatched transaction id: current is {self.trans_id}, not {current}", "EINVAL")
        self.trans_id = new

    @_locked
    def device_exists(self, dev: int) -> bool:
        return self._details_of(dev) is not None

    @_locked
    def details(self, dev: int) -> DeviceDetails:
        d = self._details_of(dev)
        if d is None:
            raise DeviceError(f"device {dev} does not exist", "ENODATA")
        return d

    @_locked
    def devices(self) -> list[int]:
        ids = {k for k, _ in btree.iterate(self.tm, self.details_root)}
        ids.update(self._details)
        return sorted(ids)

    # -- mappings --------------------------------------------------------------------------------

    def _subtree(self, dev: int) -> int:
        root = btree.lookup(self.tm, self.mapping_root, dev)
        if root is None:
            raise DeviceError(f"device {dev} does not exist", "ENODATA")
        return root

    @_locked
    def lookup(self, dev: int, vblock: int) -> LookupResult | None:
        """Where vblock of dev lives, or None if unprovisioned (``dm_thin_find_block``)."""
        v = btree.lookup(self.tm, self._subtree(dev), vblock)
        if v is None:
            return None
        block, t = unpack_block_time(v)
        d = self._details_of(dev)
        assert d is not None
        return LookupResult(block, t, d.snapshotted_time > t)

    @_writes
    def insert(self, dev: int, vblock: int, data_block: int) -> None:
        """Map vblock to data_block at the current time; the caller's reference to data_block passes to
        the mapping, and a replaced mapping's block is released (``dm_thin_insert_block``)."""
        if not 0 <= vblock < 1 << 64:
            raise DeviceError(f"virtual block {vblock} is not an unsigned 64-bit number")
        self._insert_many_locked(dev, [(vblock, data_block, self.time)])

    @_writes
    def insert_many(self, dev: int, mappings: Iterable[tuple[int, int, int]]) -> int:
        """Insert (vblock, data_block, time) triples in one descent of the top level; returns how many
        were new.  References pass as with ``insert``.  Used by restore."""
        return self._insert_many_locked(dev, mappings)

    def _insert_many_locked(self, dev: int, mappings: Iterable[tuple[int, int, int]]) -> int:
        d = self._details_of(dev)
        if d is None:
            raise DeviceError(f"device {dev} does not exist", "ENODATA")
        nr_data = self.dsm.nr_blocks
        added = [0]

        def change(sub: int) -> int:
            for vblock, data_block, t in mappings:
                if not 0 <= vblock < 1 << 64:
                    raise DeviceError(f"virtual block {vblock} is not an unsigned 64-bit number")
                if not 0 <= data_block < nr_data:
                    raise DeviceError(f"data block {data_block} beyond the data device ({nr_data} blocks)")
                if not 0 <= t < (1 << 24):
                    raise DeviceError(f"mapping time {t} does not fit in 24 bits")
                sub, new = btree.insert(self.tm, sub, vblock, pack_block_time(data_block, t), self.data_vt)
                added[0] += new
            return sub

        self.mapping_root = btree.update_subtree(self.tm, self.mapping_root, dev, self.top_vt, change)
        if added[0]:
            self._set_details(dev, dataclasses.replace(d, mapped_blocks=d.mapped_blocks + added[0]))
        return added[0]

    @_writes
    def set_device_details(self, dev: int, transaction_id: int, creation_time: int, snapshotted_time: int) -> None:
        """Overwrite a device's recorded transaction id and times (restore only)."""
        d = self._details_of(dev)
        if d is None:
            raise DeviceError(f"device {dev} does not exist", "ENODATA")
        self._set_details(dev, DeviceDetails(d.mapped_blocks, transaction_id, creation_time, snapshotted_time))

    @_writes
    def remove(self, dev: int, vblock: int) -> bool:
        """Unmap one block; returns whether it was mapped (``dm_thin_remove_block``)."""
        return self._remove_range_locked(dev, vblock, vblock + 1) == 1

    @_writes
    def remove_range(self, dev: int, begin: int, end: int, on_remove: Callable[[int, int], None] | None = None) -> int:
        """Unmap every block in [begin, end); returns how many were mapped.  ``on_remove(vblock,
        data_block)`` sees each one before its reference is dropped."""
        return self._remove_range_locked(dev, begin, end, on_remove)

    def _remove_range_locked(
        self, dev: int, begin: int, end: int, on_remove: Callable[[int, int], None] | None = None
    ) -> int:
        d = self._details_of(dev)
        sub = self._subtree(dev)
        if d is None:
            raise DeviceError(f"device {dev} does not exist", "ENODATA")
        found = btree.lookup_next(self.tm, sub, begin)
        if found is None or found[0] >= end:
            return 0
        removed = [0]
        hook = None if on_remove is None else (lambda k, v: on_remove(k, v >> 24))

        def change(sub_root: int) -> int:
            new_root, removed[0] = btree.remove_range(self.tm, sub_root, begin, end, self.data_vt, hook)
            return new_root

        self.mapping_root = btree.update_subtree(self.tm, self.mapping_root, dev, self.top_vt, change)
        self._set_details(dev, dataclasses.replace(d, mapped_blocks=d.mapped_blocks - removed[0]))
        return removed[0]

    @_locked
    def mappings(self, dev: int, begin: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
        """(vblock, data_block, time) in ascending vblock order.  Materialised under the lock."""
        keys, values = btree.lookup_range(self.tm, self._subtree(dev), begin, 1 << 64 if end is None else end)
        return iter([(k, v >> 24, v & 0xFFFFFF) for k, v in zip(keys, values, strict=True)])

    @_locked
    def map_range(self, dev: int, begin: int, end: int) -> tuple[list[int], list[int]]:
        """The mapped vblocks of dev in [begin, end) and their data blocks: the read path's lookup,
        one descent and a few list slices whatever the range's length."""
        vblocks, values = btree.lookup_range(self.tm, self._subtree(dev), begin, end)
        return vblocks, [v >> 24 for v in values]

    @_locked
    def in_place_range(self, dev: int, begin: int, end: int) -> list[int] | None:
        """The data blocks of vblocks [begin, end) when every one is mapped and none is shared, so a
        write may go in place into all of them (the multi-block write's lookup); else None."""
        vblocks, values = btree.lookup_range(self.tm, self._subtree(dev), begin, end)
        if len(vblocks) != end - begin:
            return None
        d = self._details_of(dev)
        assert d is not None
        snapshotted = d.snapshotted_time
        if any(v & 0xFFFFFF < snapshotted for v in values):
            return None
        return [v >> 24 for v in values]

    @_locked
    def highest_mapped(self, dev: int) -> int | None:
        """The highest mapped virtual block of dev, or None."""
        node = self.tm.read_node(self._subtree(dev))
        while not node.is_leaf:
            node = self.tm.read_node(node.values[-1])
        return node.keys[-1] if node.keys else None

    # -- data space ------------------------------------------------------------------------------

    @_writes
    def alloc_data_block(self) -> int:
        """A data block free now and at the last commit, with count 1.  Raises NoSpaceError."""
        return self.dsm.new_block()

    @_writes
    def inc_data_block(self, b: int) -> None:
        self.dsm.inc(b)

    @_writes
    def dec_data_block(self, b: int) -> None:
        self._dec_data(b)

    def _dec_data(self, b: int) -> None:
        """Drop a reference to data block b; a block that becomes free moves the epoch on."""
        self.dsm.dec(b)
        if not self.dsm.get_count(b):
            self.epoch += 1

    @_locked
    def data_block_count(self, b: int) -> int:
        return self.dsm.get_count(b)

    @_locked
    def nr_data_blocks(self) -> int:
        return self.dsm.nr_blocks

    @_locked
    def nr_free_data_blocks(self) -> int:
        return self.dsm.nr_free()

    @_writes
    def resize_data_dev(self, nr_blocks: int) -> None:
        """Grow the data space map (``dm_pool_resize_data_dev``); shrinking is refused."""
        if nr_blocks < self.dsm.nr_blocks:
            raise DeviceError(
                f"pool target (data) too small: {nr_blocks} blocks < {self.dsm.nr_blocks} in use", "EINVAL"
            )
        if nr_blocks > self.dsm.nr_blocks:
            self.dsm.extend(nr_blocks)

    # -- metadata space --------------------------------------------------------------------------

    @_locked
    def nr_metadata_blocks(self) -> int:
        return self.msm.nr_blocks

    @_locked
    def nr_free_metadata_blocks(self) -> int:
        return self.msm.nr_free()

    @_writes
    def resize_metadata_dev(self, nr_blocks: int) -> None:
        """Grow the metadata space map to cover a bigger metadata device (``dm_pool_resize_metadata_dev``)."""
        nr_blocks = min(nr_blocks, MAX_METADATA_BLOCKS)
        if nr_blocks < self.msm.nr_blocks:
            raise DeviceError(
                f"metadata device too small: {nr_blocks} blocks < {self.msm.nr_blocks} in use", "EINVAL"
            )
        if nr_blocks > self.bm.nr_blocks():
            raise DeviceError(f"metadata device has only {self.bm.nr_blocks()} blocks, not {nr_blocks}", "EINVAL")
        if nr_blocks > self.msm.nr_blocks:
            self.msm.extend(nr_blocks)

    # -- metadata snapshots ----------------------------------------------------------------------

    @_writes
    def reserve_metadata_snap(self) -> int:
        """Commit, then copy the superblock to a new block holding the current trees (``held_root``)."""
        self._commit_locked()
        self._in_service = True
        if self.held_root:
            raise DeviceError("pool metadata snapshot already exists", "EBUSY")
        copy = self.sb.replace(data_sm_root=ZERO_SM_ROOT, metadata_sm_root=ZERO_SM_ROOT)
        obj = self.tm.new_block(lambda b: SuperblockCopy(b, copy))
        self.tm.inc(copy.data_mapping_root)
        self.tm.inc(copy.device_details_root)
        self.held_root = obj.blocknr
        self._commit_locked()
        return self.held_root

    @_writes
    def release_metadata_snap(self) -> None:
        """Drop the metadata snapshot and the references it held (``__release_metadata_snap``)."""
        if not self.held_root:
            raise DeviceError("no pool metadata snapshot found", "EINVAL")
        snap = Superblock.unpack(self.bm.read(self.held_root), self.held_root)
        held, self.held_root = self.held_root, 0
        btree.delete_tree(self.tm, snap.data_mapping_root, self.top_vt)
        btree.delete_tree(self.tm, snap.device_details_root, DETAILS_VT)
        self.tm.dec(held)
        self._commit_locked()
