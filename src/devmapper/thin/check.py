"""Check pool metadata (our thin_check): find every broken invariant, change nothing.

Theory of operation
-------------------
The checker never trusts the engine: it reads raw blocks through a ``BlockManager`` and decodes them
itself (``check_base.BlockReader``, ``check_btree.TreeWalker``), so a bug in ``pdata`` or
``thin.metadata`` cannot hide a defect it wrote.  It never writes: the device is only read.

Order, as in thin_check 0.9.0, each stage aggregating every defect it finds:

1. **Superblock** (block 0): checksum (if bad: fatal, stop -- nothing else can be located), then
   magic, location, version, flags, block sizes, space-map sizes against the device.
2. **Trees**: the device-details tree, then the two-level mapping tree (``--skip-mappings``: top
   level only), then the metadata snapshot's copy of the superblock and its two trees when
   ``held_root`` is set (with ``metadata_snap`` only those).  Every node is checked once
   (``check_btree``); every mapping once per distinct leaf: data block < data ``nr_blocks``, time not
   later than the superblock's.  Then per tree pair: details ids == top-level mapping ids, and each
   device's ``mapped_blocks`` == the entries under its subtree root.
3. **Space maps** (skipped with ``metadata_snap`` or ``skip_mappings``, as thin_check skips them,
   since the expected counts would be incomplete): expected metadata counts follow §2.3 exactly --
   superblock 1, each node once per parent pointer (children of a shared node counted once), the
   metadata index block, every bitmap, every overflow and data-index tree node, the snapshot copy and
   its two roots; expected data counts are the entries of distinct mapping leaves naming each data
   block.  ``check_space_map`` compares them with the bitmaps and overflow trees, and checks
   ``nr_allocated`` and the index hints.

Stricter than thin_check 0.9.0: superblock magic/location/version, the snapshot copy, child keys
below the parent's next key, equal leaf depth, data reference counts, ``mapped_blocks``, data
block range, times, details/mapping ids, ``nr_allocated``, index hints, overflow consistency.

Cost: one read of every reachable block and every bitmap; one byte of memory per metadata block and
per data block for expected counts, plus a small memo per tree node.  Progress is reported through
``progress(stage, done, total)``.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Final

from devmapper.blockdev.base import BlockDevice
from devmapper.errors import BlockDeviceError
from devmapper.format import validators
from devmapper.format.bitmap import MAX_METADATA_BLOCKS
from devmapper.format.checksum import BlockType, raw_crc
from devmapper.format.records import MAX_DATA_BLOCK, TIME_MASK
from devmapper.format.superblock import NEEDS_CHECK_FLAG, THIN_SUPERBLOCK_MAGIC, ZERO_SM_ROOT, Superblock
from devmapper.pdata.block_manager import BlockManager
from devmapper.thin.check_base import (
    BlockReader,
    Defect,
    DefectRule,
    DefectSink,
    Progress,
    RefCounts,
    Report,
)
from devmapper.thin.check_btree import DETAILS, MAPPING, TOP_LEVEL, Nodes, RawNode, Summary, TreeWalker
from devmapper.thin.check_space_map import SpaceMapChecker
from devmapper.units import MAX_DATA_BLOCK_SIZE, METADATA_BLOCK_SIZE, MIN_DATA_BLOCK_SIZE

__all__ = ["Defect", "DefectRule", "Report", "check_metadata"]

_DETAILS = struct.Struct("<QQII")
_SUPERBLOCK_STAGE: Final = "checking superblock"
_KNOWN_VERSIONS: Final = (1, 2)


def check_metadata(
    dev: BlockDevice,
    *,
    metadata_snap: bool = False,
    skip_mappings: bool = False,
    super_block_only: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Check the metadata on dev and return every defect found.  Never writes to dev.

    ``metadata_snap`` checks only the metadata snapshot's trees (thin_check -m); ``skip_mappings``
    walks only the top level of the mapping tree; ``super_block_only`` stops after the superblock.
    Does not raise for damaged metadata or unreadable blocks: those become defects (an unreadable
    block 0 a fatal SUPERBLOCK_UNREADABLE).  Reads every reachable block once; see the module
    docstring for memory use.
    """
    report = Report()
    sink = DefectSink(report)
    bm = BlockManager(dev)
    if progress is not None:
        progress(_SUPERBLOCK_STAGE, 0, 1)
    sb = _read_superblock(bm, sink)
    if sb is None:
        return report
    _summarise(sb, report)
    limit = _check_superblock_fields(sb, bm.nr_blocks(), sink)
    if progress is not None:
        progress(_SUPERBLOCK_STAGE, 1, 1)
    if not super_block_only:
        _Checker(bm, sink, sb, limit, progress).run(metadata_snap, skip_mappings)
    report.nr_blocks_read = bm.nr_reads
    return report


# -- superblock ----------------------------------------------------------------------------------


def _read_superblock(bm: BlockManager, sink: DefectSink) -> Superblock | None:
    """Block 0 decoded, or None (after a fatal defect) when its checksum fails or it cannot be read."""
    try:
        buf = bm.read(0)
    except BlockDeviceError as e:
        sink.add(DefectRule.SUPERBLOCK_UNREADABLE, 0, f"superblock unreadable: {e}")
        return None
    stored = int.from_bytes(buf[:4], "little")
    computed = raw_crc(memoryview(buf)[4:]) ^ BlockType.SUPERBLOCK
    if stored != computed:
        sink.add(DefectRule.SUPERBLOCK_CHECKSUM, 0,
                 f"superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")
        return None
    return decode_superblock(buf)


def decode_superblock(buf: bytes) -> Superblock:
    """Decode a checksum-valid superblock whatever its stored location and magic.

    ``Superblock.unpack`` refuses a wrong location or magic; the checker reports those itself, so it
    hands ``unpack`` an in-memory copy with both normalised and puts the real values back.
    """
    blocknr, magic = struct.unpack_from("<Q", buf, 8)[0], struct.unpack_from("<Q", buf, 32)[0]
    tmp = bytearray(buf)
    struct.pack_into("<Q", tmp, 32, THIN_SUPERBLOCK_MAGIC)
    validators.prepare_for_write(tmp, 0, BlockType.SUPERBLOCK)
    return Superblock.unpack(tmp, 0).replace(blocknr=blocknr, magic=magic)


def _summarise(sb: Superblock, report: Report) -> None:
    msm, dsm = sb.metadata_sm_root, sb.data_sm_root
    report.trans_id, report.time, report.held_root = sb.trans_id, sb.time, sb.held_root
    report.needs_check = sb.needs_check
    report.data_block_size = sb.data_block_size
    report.nr_metadata_blocks = msm.nr_blocks
    report.metadata_free_blocks = max(0, msm.nr_blocks - msm.nr_allocated)
    report.nr_data_blocks = dsm.nr_blocks
    report.data_free_blocks = max(0, dsm.nr_blocks - dsm.nr_allocated)


def _check_superblock_fields(sb: Superblock, dev_blocks: int, sink: DefectSink) -> int:
    """Report bad superblock fields; return the metadata block limit every pointer must stay below."""
    if sb.blocknr != 0:
        sink.add(DefectRule.BAD_BLOCKNR, 0, f"superblock has block number {sb.blocknr}, expected 0")
    if sb.magic != THIN_SUPERBLOCK_MAGIC:
        sink.add(DefectRule.BAD_MAGIC, 0, f"superblock magic {sb.magic}, expected {THIN_SUPERBLOCK_MAGIC}")
    field = DefectRule.SUPERBLOCK_FIELD
    if sb.version not in _KNOWN_VERSIONS:
        sink.add(field, 0, f"superblock version {sb.version}, expected 1 or 2")
    if sb.flags & ~NEEDS_CHECK_FLAG:
        sink.add(field, 0, f"superblock flags {sb.flags:#x} has unknown bits", fatal=False)
    if sb.incompat_flags or sb.compat_ro_flags:
        sink.add(field, 0, f"superblock feature flags incompat {sb.incompat_flags:#x}, "
                           f"compat_ro {sb.compat_ro_flags:#x}: the kernel refuses these")
    dbs = sb.data_block_size
    if not (MIN_DATA_BLOCK_SIZE <= dbs <= MAX_DATA_BLOCK_SIZE and dbs % MIN_DATA_BLOCK_SIZE == 0):
        sink.add(field, 0, f"data block size {dbs} sectors is not a multiple of 128 in 128..2097152")
    if sb.metadata_block_size != METADATA_BLOCK_SIZE // 512:
        sink.add(field, 0, f"metadata block size {sb.metadata_block_size} sectors, expected 8", fatal=False)
    if sb.data_sm_root.nr_blocks > MAX_DATA_BLOCK + 1:
        sink.add(field, 0, f"data space map nr_blocks {sb.data_sm_root.nr_blocks} beyond 2^40")
    return _metadata_limit(sb, dev_blocks, sink)


def _metadata_limit(sb: Superblock, dev_blocks: int, sink: DefectSink) -> int:
    nr = sb.metadata_sm_root.nr_blocks
    field = DefectRule.SUPERBLOCK_FIELD
    if nr == 0 or nr > MAX_METADATA_BLOCKS:
        sink.add(field, 0, f"metadata space map nr_blocks {nr} outside 1..{MAX_METADATA_BLOCKS}")
        return min(dev_blocks, MAX_METADATA_BLOCKS)
    if nr > dev_blocks:
        sink.add(field, 0, f"metadata space map covers {nr} blocks, but the device has only {dev_blocks}")
    return min(nr, dev_blocks)


# -- trees ---------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _PoolTrees:
    """What one (live or snapshot) pair of roots holds: details and mapping subtree summaries."""

    label: str  # "" for the live trees, "metadata snapshot " for the held copy
    details: dict[int, tuple[int, tuple[int, int, int, int]]] = dataclasses.field(default_factory=dict)
    devices: dict[int, tuple[int, Summary | None]] = dataclasses.field(default_factory=dict)
    details_complete: bool = True
    mappings_complete: bool = True


class _Checker:
    """One run over the trees and space maps of a pool whose superblock decoded."""

    def __init__(
        self, bm: BlockManager, sink: DefectSink, sb: Superblock, limit: int, progress: Progress | None
    ) -> None:
        self.sink = sink
        self.sb = sb
        self.progress = progress
        self.reader = BlockReader(bm, sink, limit)
        self.nr_data = sb.data_sm_root.nr_blocks
        # Mappings store only 24 bits of time; past 2^24 the comparison means nothing.
        self.max_time = sb.time if sb.time <= TIME_MASK else TIME_MASK
        self.meta_counts: RefCounts | None = None
        self.data_counts: RefCounts | None = None
        self.skip_mappings = False
        self.walker = TreeWalker(self.reader, None, progress, sb.metadata_sm_root.nr_allocated)

    def run(self, metadata_snap: bool, skip_mappings: bool) -> None:
        self.skip_mappings = skip_mappings
        counting = not (metadata_snap or skip_mappings)
        if counting:
            self.meta_counts = RefCounts(self.reader.limit)
            self.data_counts = RefCounts(self.nr_data)
            self.walker.counts = self.meta_counts
            self.walker.count(0)
        live: _PoolTrees | None = None
        if not metadata_snap:
            live = self._check_pool_trees(self.sb, "")
        snap = self._check_snapshot(required=metadata_snap)
        self.walker.finish_progress()
        shown = snap if metadata_snap else live
        if shown is not None:
            report = self.sink.report
            report.nr_devices = len(shown.details)
            if not skip_mappings:
                report.nr_mappings = sum(s.nr_entries for _, s in shown.devices.values() if s is not None)
        if counting:
            self._check_space_maps()

    def _check_snapshot(self, required: bool) -> _PoolTrees | None:
        held = self.sb.held_root
        if held == 0:
            if required:
                self.sink.add(DefectRule.HELD_ROOT, 0, "no metadata snapshot: the superblock's held_root is 0")
            return None
        if held >= self.reader.limit:
            self.sink.add(DefectRule.HELD_ROOT, 0, f"held_root {held} is beyond the metadata end "
                                                   f"({self.reader.limit} blocks)")
            return None
        self.walker.count(held)
        copy = self._snapshot_superblock(held)
        return None if copy is None else self._check_pool_trees(copy, "metadata snapshot ")

    def _snapshot_superblock(self, held: int) -> Superblock | None:
        buf = self.reader.read(held, BlockType.SUPERBLOCK, "metadata snapshot")
        if buf is None:
            return None
        copy = decode_superblock(buf)
        add = self.sink.add
        if copy.magic != THIN_SUPERBLOCK_MAGIC:
            add(DefectRule.HELD_ROOT, held, f"metadata snapshot superblock magic {copy.magic}, "
                                            f"expected {THIN_SUPERBLOCK_MAGIC}")
        if copy.held_root != 0:
            add(DefectRule.HELD_ROOT, held, f"metadata snapshot holds another snapshot ({copy.held_root})",
                fatal=False)
        if copy.data_sm_root != ZERO_SM_ROOT or copy.metadata_sm_root != ZERO_SM_ROOT:
            add(DefectRule.HELD_ROOT, held, "metadata snapshot superblock has non-zero space map roots", fatal=False)
        return copy

    def _check_pool_trees(self, sb: Superblock, label: str) -> _PoolTrees:
        trees = _PoolTrees(label)
        details = self.walker.walk(sb.device_details_root, DETAILS, f"{label}details tree",
                                   lambda node, path, nodes, replay: self._details_leaf(trees, node, path, replay))
        trees.details_complete = details is not None and details.complete
        top = self.walker.walk(sb.data_mapping_root, TOP_LEVEL, f"{label}mapping tree",
                               lambda node, path, nodes, replay: self._top_leaf(trees, node, nodes, replay))
        trees.mappings_complete = top is not None and top.complete
        self._compare_devices(trees)
        return trees

    def _details_leaf(self, trees: _PoolTrees, node: RawNode, path: str, replay: bool) -> None:
        for dev, (mapped, trans, created, snapped) in zip(node.keys, node.records(_DETAILS), strict=True):
            trees.details[dev] = (node.blocknr, (mapped, trans, created, snapped))
            if not replay and max(created, snapped) > self.sb.time:
                self.sink.add(DefectRule.TIME_TOO_BIG, node.blocknr,
                              f"device {dev} has creation time {created}, snapshot time {snapped}, "
                              f"later than the pool's time {self.sb.time}", path=path)

    def _top_leaf(self, trees: _PoolTrees, node: RawNode, nodes: Nodes, replay: bool) -> None:
        """Walk each device's subtree -- or, replaying a leaf shared with an earlier walk, only look up
        what that walk learned (its pointers are already counted)."""
        for dev, root in zip(node.keys, node.values_u64(), strict=True):
            where = (*nodes, (node.blocknr, dev))
            sub_path = f"{trees.label}mapping tree of device {dev}"
            if replay:
                summary = self.walker.summary_of(root)
            elif self.skip_mappings:
                self.reader.in_range(root, "mapping subtree root", sub_path, where)
                summary = None
            else:
                summary = self.walker.walk(root, MAPPING, sub_path, self._mapping_leaf)
            trees.devices[dev] = (node.blocknr, summary)

    def _mapping_leaf(self, node: RawNode, path: str, nodes: Nodes, replay: bool) -> None:
        """Count data references of one distinct leaf and check its data blocks and times."""
        values = node.values_u64()
        nr_data, max_time, counts = self.nr_data, self.max_time, self.data_counts
        small = counts.small if counts is not None else None
        beyond: list[int] = []
        late: list[int] = []
        for i, v in enumerate(values):
            b = v >> 24
            if b >= nr_data:
                beyond.append(i)
                continue
            if v & TIME_MASK > max_time:
                late.append(i)
            if small is not None:
                c = small[b]
                if c < 255:
                    small[b] = c + 1
                else:
                    self._inc_data_slow(b)
        if beyond:
            i = beyond[0]
            self.sink.add(DefectRule.DATA_BLOCK_OUT_OF_RANGE, node.blocknr,
                          f"{len(beyond)} mapping(s) name data blocks beyond the data device ({nr_data} blocks), "
                          f"first: virtual block {node.keys[i]} -> data block {values[i] >> 24}",
                          path=path, nodes=nodes, data_block=values[i] >> 24)
        if late:
            i = late[0]
            self.sink.add(DefectRule.TIME_TOO_BIG, node.blocknr,
                          f"{len(late)} mapping(s) have a time later than the pool's time {self.sb.time}, "
                          f"first: virtual block {node.keys[i]} time {values[i] & TIME_MASK}",
                          path=path, nodes=nodes)

    def _inc_data_slow(self, b: int) -> None:
        assert self.data_counts is not None
        self.data_counts.inc(b)

    def _compare_devices(self, trees: _PoolTrees) -> None:
        """Details ids == top-level mapping ids; mapped_blocks == entries under each subtree root."""
        path = f"{trees.label}details tree"
        add = self.sink.add
        if trees.mappings_complete:
            for dev in sorted(trees.details.keys() - trees.devices.keys()):
                add(DefectRule.DETAILS_MAPPING_MISMATCH, trees.details[dev][0],
                    f"device {dev} has details but no mapping tree", path=path)
        if trees.details_complete:
            for dev in sorted(trees.devices.keys() - trees.details.keys()):
                add(DefectRule.DETAILS_MAPPING_MISMATCH, trees.devices[dev][0],
                    f"device {dev} has a mapping tree but no details", path=f"{trees.label}mapping tree")
        for dev in sorted(trees.details.keys() & trees.devices.keys()):
            block, (mapped, *_rest) = trees.details[dev]
            summary = trees.devices[dev][1]
            if summary is not None and summary.complete and summary.nr_entries != mapped:
                add(DefectRule.MAPPED_BLOCKS_WRONG, block,
                    f"device {dev} has mapped_blocks {mapped}, but its mapping tree holds {summary.nr_entries}",
                    path=path)

    # -- space maps --------------------------------------------------------------------------------

    def _check_space_maps(self) -> None:
        assert self.meta_counts is not None and self.data_counts is not None
        sms = SpaceMapChecker(self.walker, self.progress)
        meta = sms.load_metadata_sm(self.sb.metadata_sm_root)
        data = sms.load_data_sm(self.sb.data_sm_root)
        sms.compare(data, self.data_counts)
        if meta is not None:
            sms.compare(meta, self.meta_counts)
        self.sink.report.space_maps_checked = True
