"""Salvage damaged metadata (the reading half of thin_repair; the writing half is ``restore``).

Theory of operation
-------------------
``salvage`` walks the committed trees like ``dump`` but never gives up on a damaged node: a node
that fails its checksum or block-number check, cannot be decoded, has keys out of order or outside
the range its parent gives it, or is reached a second time (a loop or a shared subtree gone wrong)
is reported in ``RepairReport.lost`` and skipped with everything below it.  What is readable is
replayed to a ``MetadataVisitor``; with ``RestoreEmitter`` that writes fresh, consistent metadata
(``devmapper thin repair``), as thin_repair does with thin_dump's repair mode feeding thin_restore.

* The superblock must be intact: it names every tree and the data device's size (thin_repair needs
  overrides when it is not; we refuse with a clear error instead).
* Snapshots share mapping subtrees with their origin; that is not damage (loops are looked for within
  one tree).
* Space maps are not read at all: restore recounts every data block from the mappings kept.
* A device present in the mapping tree but missing from the details tree gets rebuilt details
  (transaction id of the superblock, times 0); a device in the details tree whose mappings cannot
  be reached is kept with no mappings, and both are reported.
* A mapping that names a data block past ``nr_data_blocks`` is dropped (counted); a virtual block
  seen twice keeps its first mapping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from devmapper.blockdev.base import BlockDevice
from devmapper.errors import DevmapperError, MetadataError
from devmapper.format.records import DeviceDetails
from devmapper.pdata.transaction_manager import TransactionManager
from devmapper.thin.dump import MetadataReader, runs_of, superblock_info
from devmapper.thin.ir import DeviceInfo, MetadataVisitor

__all__ = ["RepairReport", "salvage"]

Progress = Callable[[int, int], None]
_KEY_END = 1 << 64


@dataclasses.dataclass
class RepairReport:
    """What ``salvage`` kept and what it could not."""

    devices: int = 0
    mappings: int = 0
    lost: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)  # (tree, block, why)
    dropped_mappings: int = 0  # data block past the end, or a virtual block seen twice
    rebuilt_details: list[int] = dataclasses.field(default_factory=list)
    unreachable_mappings: list[int] = dataclasses.field(default_factory=list)  # devices kept empty

    @property
    def clean(self) -> bool:
        return not (self.lost or self.dropped_mappings or self.rebuilt_details or self.unreachable_mappings)

    def lines(self) -> list[str]:
        """One human-readable line per loss, for the command's report."""
        out = [f"{tree}: node at block {b} skipped with everything below it: {why}" for tree, b, why in self.lost]
        if self.dropped_mappings:
            out.append(f"{self.dropped_mappings} mappings dropped (data block past the end, or a block mapped twice)")
        out += [f"device {d}: details lost, rebuilt with defaults" for d in self.rebuilt_details]
        out += [f"device {d}: mappings unreachable, kept with none" for d in self.unreachable_mappings]
        return out


class _Walker:
    """Tolerant B-tree iteration over one transaction manager, recording what it skips."""

    def __init__(self, tm: TransactionManager, report: RepairReport) -> None:
        self.tm = tm
        self.report = report

    def items(self, tree: str, root: int) -> Iterator[tuple[int, int]]:
        """(key, value) of every readable leaf of the tree at root, in key order.  Snapshots share
        subtrees legitimately, so "reached twice" is judged within one tree only."""
        return self._items(tree, root, 0, _KEY_END, set())

    def _items(self, tree: str, root: int, lo: int, hi: int, visited: set[int]) -> Iterator[tuple[int, int]]:
        if root in visited:
            self.report.lost.append((tree, root, "reached twice (a loop or a crossed pointer)"))
            return
        visited.add(root)
        try:
            node = self.tm.read_node(root)
        except (DevmapperError, ValueError) as e:
            self.report.lost.append((tree, root, str(e)))
            return
        keys = node.keys
        if any(keys[i] >= keys[i + 1] for i in range(len(keys) - 1)):
            self.report.lost.append((tree, root, "keys out of order"))
            return
        if keys and (keys[0] < lo or keys[-1] >= hi):
            self.report.lost.append((tree, root, f"keys outside [{lo}, {hi})"))
            return
        if node.is_leaf:
            yield from zip(keys, node.values, strict=True)
            return
        for i, child in enumerate(node.values):
            yield from self._items(tree, child, keys[i], keys[i + 1] if i + 1 < len(keys) else hi, visited)


def salvage(dev: BlockDevice, visitor: MetadataVisitor, progress: Progress | None = None) -> RepairReport:
    """Replay everything readable in the metadata on dev to visitor; see the module docstring."""
    try:
        reader = MetadataReader(dev)
    except (DevmapperError, ValueError) as e:
        raise MetadataError(f"the superblock is damaged ({e}); nothing can be salvaged without it") from e
    sb, nr_data_blocks = reader.sb, reader.nr_data_blocks
    report = RepairReport()
    walker = _Walker(reader.tm, report)
    details: dict[int, DeviceDetails] = {}
    for dev_id, raw in walker.items("details tree", sb.device_details_root):
        try:
            details[dev_id] = DeviceDetails.unpack(raw)
        except (DevmapperError, ValueError):
            pass  # rebuilt below if the device has mappings
    roots = dict(walker.items("mapping tree", sb.data_mapping_root))
    visitor.superblock_b(superblock_info(sb, nr_data_blocks))
    ids = sorted(set(details) | set(roots))
    for n, dev_id in enumerate(ids):
        if progress is not None:
            progress(n, len(ids))
        d = details.get(dev_id)
        if d is None:
            report.rebuilt_details.append(dev_id)
            d = DeviceDetails(mapped_blocks=0, transaction_id=sb.trans_id, creation_time=0, snapshotted_time=0)
        visitor.device_b(DeviceInfo(dev_id, d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time))
        root = roots.get(dev_id)
        if root is None:
            report.unreachable_mappings.append(dev_id)
        else:
            for run in runs_of(_kept(walker.items(f"mappings of device {dev_id}", root), nr_data_blocks, report)):
                visitor.map(run)
        visitor.device_e()
        report.devices += 1
    if progress is not None:
        progress(len(ids), len(ids))
    visitor.superblock_e()
    visitor.eof()
    return report


def _kept(mappings: Iterator[tuple[int, int]], nr_data_blocks: int, report: RepairReport) -> Iterator[tuple[int, int]]:
    last = -1
    for vblock, value in mappings:
        if vblock <= last or value >> 24 >= nr_data_blocks:
            report.dropped_mappings += 1
            continue
        last = vblock
        report.mappings += 1
        yield vblock, value
