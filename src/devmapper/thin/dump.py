"""Read metadata and replay it to a ``MetadataVisitor`` (the reading half of thin_dump).

Reads the committed on-disk state only (block 0 and what it reaches), through a read-only transaction
manager, so it can run beside a live pool.  With ``metadata_snap`` the trees come from the held
metadata-snapshot copy; as in thin_dump 0.9.0, ``nr_data_blocks`` is then reported as 0 (the copy has
no space maps).  Devices come in top-level mapping-tree order; mappings as maximal runs of consecutive
virtual and data blocks with one time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from devmapper.blockdev.base import BlockDevice
from devmapper.errors import MetadataCorruption, MetadataError
from devmapper.format.records import DeviceDetails
from devmapper.format.superblock import Superblock
from devmapper.pdata import btree
from devmapper.pdata.block_manager import BlockManager
from devmapper.pdata.transaction_manager import TransactionManager
from devmapper.thin.ir import DeviceInfo, MetadataVisitor, Run, SuperblockInfo

Progress = Callable[[int, int], None]


class MetadataReader:
    """Read-only view of committed metadata (live trees or the metadata snapshot's)."""

    def __init__(self, dev: BlockDevice, metadata_snap: bool | int = False) -> None:
        self.tm = TransactionManager(BlockManager(dev))
        self.tm.read_only = True
        self.sb = Superblock.unpack(self.tm.bm.read(0), 0)
        self.roots_sb = self.sb
        self.nr_data_blocks = self.sb.data_sm_root.nr_blocks
        if metadata_snap is not False:
            held = self.sb.held_root
            if not held:
                raise MetadataError("no metadata snapshot: the superblock's held_root is 0")
            if metadata_snap is not True and int(metadata_snap) != held:
                raise MetadataError(f"metadata snapshot is at block {held}, not {metadata_snap}")
            self.roots_sb = Superblock.unpack(self.tm.bm.read(held), held)
            self.nr_data_blocks = 0

    def superblock_info(self) -> SuperblockInfo:
        # with -m, thin_dump reports the snapshot copy's time and transaction
        return superblock_info(self.roots_sb, self.nr_data_blocks)

    def device_roots(self) -> Iterator[tuple[int, int]]:
        """(thin id, mapping subtree root) in ascending id order."""
        return btree.iterate(self.tm, self.roots_sb.data_mapping_root)

    def details(self) -> dict[int, DeviceDetails]:
        return {k: DeviceDetails.unpack(v) for k, v in btree.iterate(self.tm, self.roots_sb.device_details_root)}

    def mappings(self, subtree_root: int) -> Iterator[tuple[int, int]]:
        """(virtual block, block_time value) in ascending order, leaf by leaf."""
        for leaf in btree.iterate_leaves(self.tm, subtree_root):
            yield from zip(leaf.keys, leaf.values, strict=True)

    def runs(self, subtree_root: int) -> Iterator[Run]:
        return runs_of(self.mappings(subtree_root))


def superblock_info(sb: Superblock, nr_data_blocks: int) -> SuperblockInfo:
    """What a dump reports of a superblock (thin_dump leaves the uuid empty)."""
    return SuperblockInfo(
        uuid="", time=sb.time, transaction=sb.trans_id, flags=sb.flags, version=sb.version,
        data_block_size=sb.data_block_size, nr_data_blocks=nr_data_blocks,
    )


def runs_of(mappings: Iterable[tuple[int, int]]) -> Iterator[Run]:
    """Merge (vblock, block_time) pairs into maximal runs: consecutive origin and data, same time."""
    start = data0 = time0 = length = -1
    for vblock, value in mappings:
        data, t = value >> 24, value & 0xFFFFFF
        if length > 0 and vblock == start + length and data == data0 + length and t == time0:
            length += 1
            continue
        if length > 0:
            yield Run(start, data0, length, time0)
        start, data0, time0, length = vblock, data, t, 1
    if length > 0:
        yield Run(start, data0, length, time0)


def dump(
    dev: BlockDevice,
    visitor: MetadataVisitor,
    *,
    metadata_snap: bool | int = False,
    dev_ids: Iterable[int] | None = None,
    skip_mappings: bool = False,
    progress: Progress | None = None,
) -> None:
    """Replay the metadata on dev to visitor.  Raises MetadataError on unreadable metadata."""
    reader = MetadataReader(dev, metadata_snap)
    details = reader.details()
    wanted = None if dev_ids is None else set(dev_ids)
    roots = list(reader.device_roots())
    visitor.superblock_b(reader.superblock_info())
    for n, (dev_id, root) in enumerate(roots):
        if progress is not None:
            progress(n, len(roots))
        if wanted is not None and dev_id not in wanted:
            continue
        d = details.get(dev_id)
        if d is None:
            raise MetadataCorruption(f"mapping tree has device {dev_id} but the details tree does not")
        visitor.device_b(DeviceInfo(dev_id, d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time))
        if not skip_mappings:
            for run in reader.runs(root):
                visitor.map(run)
        visitor.device_e()
    if progress is not None:
        progress(len(roots), len(roots))
    visitor.superblock_e()
    visitor.eof()
