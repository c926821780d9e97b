"""Space-map rules of the checker: stored counts against the counts rebuilt from the trees.

Two phases, because a space map's own blocks are counted in the metadata space map:

1. ``load_metadata_sm`` / ``load_data_sm`` find each space map's index (the metadata index block,
   or the data space map's index btree), its bitmaps and its overflow (ref count >= 3) tree, adding
   one expected metadata reference per pointer -- the index block, every bitmap, every tree node
   (§2.3).  Nothing is compared yet.
2. ``compare`` reads each bitmap once and checks, per bitmap: every 2-bit entry against the expected
   count (value 3 means "exact count in the overflow tree"), the index entry's ``nr_free`` and
   ``none_free_before`` hints, and then the space map's ``nr_allocated`` and the overflow tree's
   consistency with the bitmaps.

A stored count below the expected one is fatal (a block in use could be handed out again); above it
is a leak, reported as non-fatal.  Free-space hints that err on the safe side (``nr_allocated`` too
high, ``none_free_before`` past a free entry) are reported as hints, which do not fail a check;
``nr_free`` 0 with free entries (the kernel then skips the whole bitmap) is a non-fatal defect.

Comparison is bulk: an expected slice is clamped to 0..3 with ``bytes.translate`` and compared with
the stored entries in C; only mismatching bitmaps are scanned entry by entry.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Final

from devmapper.format.bitmap import ENTRIES_PER_BLOCK, MAX_METADATA_BITMAPS, unpack_bitmap
from devmapper.format.checksum import BlockType
from devmapper.format.records import IndexEntry
from devmapper.format.superblock import SmRoot
from devmapper.thin.check_base import DefectRule, Progress, RefCounts
from devmapper.thin.check_btree import OVERFLOW, SM_INDEX, Nodes, RawNode, TreeWalker

E: Final = ENTRIES_PER_BLOCK
_INDEX_ENTRY = struct.Struct("<QII")
_CLAMP3: Final = bytes(min(v, 3) for v in range(256))


def nr_bitmaps(nr_blocks: int) -> int:
    return (nr_blocks + E - 1) // E


@dataclasses.dataclass(slots=True)
class LoadedSpaceMap:
    """What phase 1 found: index entries (None = missing), where each lives, the overflow counts."""

    name: str  # "metadata" or "data"
    root: SmRoot
    entries: list[IndexEntry | None]
    entry_blocks: list[int]  # the block holding index entry i (index block or index tree leaf)
    overflow: dict[int, int] = dataclasses.field(default_factory=dict)
    overflow_complete: bool = True

    @property
    def path(self) -> str:
        return f"{self.name} space map"


class SpaceMapChecker:
    """Loads and compares the two space maps against expected counts; reports through the walker's sink."""

    def __init__(self, walker: TreeWalker, progress: Progress | None = None) -> None:
        self.walker = walker
        self.reader = walker.reader
        self.sink = walker.sink
        self.progress = progress

    # -- phase 1: find and count the space maps' own blocks ---------------------------------------

    def load_metadata_sm(self, root: SmRoot) -> LoadedSpaceMap | None:
        """Count the index block, bitmaps and overflow tree of the metadata space map."""
        n = min(nr_bitmaps(root.nr_blocks), MAX_METADATA_BITMAPS)
        self.walker.count(root.bitmap_root)
        buf = self.reader.read(root.bitmap_root, BlockType.INDEX, "metadata space map")
        if buf is None:
            return None
        raw = [IndexEntry(*_INDEX_ENTRY.unpack_from(buf, 16 + 16 * i)) for i in range(MAX_METADATA_BITMAPS)]
        for i in range(n, MAX_METADATA_BITMAPS):
            if raw[i] != IndexEntry(0, 0, 0):
                self.sink.add(DefectRule.INDEX_ENTRY_WRONG, root.bitmap_root,
                              f"index entry {i} is set, but the space map has only {n} bitmaps",
                              fatal=False, path="metadata space map")
        sm = LoadedSpaceMap("metadata", root, list(raw[:n]), [root.bitmap_root] * n)
        self._count_bitmaps(sm)
        self._load_overflow(sm)
        return sm

    def load_data_sm(self, root: SmRoot) -> LoadedSpaceMap:
        """Walk (and count) the data space map's index tree, bitmaps and overflow tree."""
        found: dict[int, tuple[IndexEntry, int]] = {}

        def on_leaf(node: RawNode, path: str, nodes: Nodes, replay: bool) -> None:
            for key, rec in zip(node.keys, node.records(_INDEX_ENTRY), strict=True):
                found[key] = (IndexEntry(*rec), node.blocknr)

        index = self.walker.walk(root.bitmap_root, SM_INDEX, "data space map index tree", on_leaf)
        n = nr_bitmaps(root.nr_blocks)
        for key in sorted(k for k in found if k >= n):
            self.sink.add(DefectRule.INDEX_ENTRY_WRONG, found[key][1],
                          f"index entry for bitmap {key}, but the space map has only {n} bitmaps",
                          fatal=False, path="data space map index tree")
        entries = [found[i][0] if i in found else None for i in range(n)]
        blocks = [found[i][1] if i in found else root.bitmap_root for i in range(n)]
        sm = LoadedSpaceMap("data", root, entries, blocks)
        if index is not None and index.complete:
            for i in range(n):
                if i not in found:
                    self.sink.add(DefectRule.INDEX_ENTRY_WRONG, root.bitmap_root, f"bitmap {i} has no index entry",
                                  path="data space map index tree")
        self._count_bitmaps(sm)
        self._load_overflow(sm)
        return sm

    def _count_bitmaps(self, sm: LoadedSpaceMap) -> None:
        for i, e in enumerate(sm.entries):
            if e is None:
                continue
            if e.blocknr == 0:
                self.sink.add(DefectRule.INDEX_ENTRY_WRONG, sm.entry_blocks[i], f"bitmap {i} is missing (block 0)",
                              path=sm.path)
                sm.entries[i] = None
            elif self.reader.in_range(e.blocknr, f"bitmap {i}", sm.path):
                self.walker.count(e.blocknr)
            else:
                sm.entries[i] = None

    def _load_overflow(self, sm: LoadedSpaceMap) -> None:
        def on_leaf(node: RawNode, path: str, nodes: Nodes, replay: bool) -> None:
            sm.overflow.update(zip(node.keys, node.values_u32(), strict=True))

        tree = self.walker.walk(sm.root.ref_count_root, OVERFLOW, f"{sm.name} space map reference count tree",
                                on_leaf)
        sm.overflow_complete = tree is not None and tree.complete

    # -- phase 2: compare --------------------------------------------------------------------------

    def compare(self, sm: LoadedSpaceMap, expected: RefCounts) -> None:
        """Check every bitmap entry, the index hints, nr_allocated and the overflow tree of sm."""
        nr_blocks = sm.root.nr_blocks
        stage = f"checking {sm.name} space map"
        allocated, complete = 0, sm.overflow_complete
        used: set[int] = set()
        for i, e in enumerate(sm.entries):
            got = None if e is None else self._bitmap(e.blocknr, sm)
            if self.progress is not None:
                self.progress(stage, i + 1, len(sm.entries))
            if e is None or got is None:
                complete = False
                continue
            lo = i * E
            got = got[: min(E, nr_blocks - lo)]
            free = got.count(0)
            allocated += len(got) - free
            self._check_index_entry(i, e, got, free, sm)
            self._compare_bitmap(lo, got, expected, sm, e.blocknr, used)
        if not complete:
            return
        if allocated != sm.root.nr_allocated:
            # Too high only hides free blocks (a hint, see check_base); too low over-reports free space.
            self.sink.add(DefectRule.NR_ALLOCATED_WRONG, 0,
                          f"{sm.name} space map nr_allocated {sm.root.nr_allocated}, but {allocated} blocks are in use",
                          fatal=False, path=sm.path, hint=allocated < sm.root.nr_allocated)
        self._check_unused_overflow(sm, used)

    def _bitmap(self, b: int, sm: LoadedSpaceMap) -> bytearray | None:
        buf = self.reader.read(b, BlockType.BITMAP, sm.path)
        if buf is None:
            return None
        # Location was already checked (and reported); decode the block as what it says it is.
        return unpack_bitmap(buf, int.from_bytes(buf[8:16], "little"))

    def _check_index_entry(self, i: int, e: IndexEntry, got: bytearray, free: int, sm: LoadedSpaceMap) -> None:
        first_free = got.find(0)
        if first_free < 0:
            return
        where = sm.entry_blocks[i]
        if e.nr_free == 0:
            self.sink.add(DefectRule.INDEX_ENTRY_WRONG, where,
                          f"index entry {i} has nr_free 0, but bitmap {e.blocknr} has {free} free entries",
                          fatal=False, path=sm.path)
        if e.none_free_before > first_free:
            self.sink.add(DefectRule.INDEX_ENTRY_WRONG, where,
                          f"index entry {i} has none_free_before {e.none_free_before}, "
                          f"but entry {first_free} of bitmap {e.blocknr} is free", fatal=False, path=sm.path,
                          hint=True)

    def _compare_bitmap(
        self, lo: int, got: bytearray, expected: RefCounts, sm: LoadedSpaceMap, bitmap: int, used: set[int]
    ) -> None:
        width = len(got)
        exp = bytes(expected.small[lo : lo + width]).ljust(width, b"\0").translate(_CLAMP3)
        if exp != got:
            for j in range(width):
                if exp[j] != got[j]:
                    stored = got[j] if got[j] < 3 else sm.overflow.get(lo + j)
                    if stored is not None:
                        self._mismatch(lo + j, stored, self._expected(expected, lo + j), sm, bitmap)
        pos = got.find(3)
        while pos >= 0:
            b = lo + pos
            used.add(b)
            count = sm.overflow.get(b)
            if count is None:
                if sm.overflow_complete:
                    self.sink.add(DefectRule.OVERFLOW_WRONG, bitmap,
                                  f"bitmap says block {b} has count 3 or more, but the overflow tree has no entry",
                                  path=sm.path)
            elif exp[pos] == 3 and count != expected.get(b):
                self._mismatch(b, count, expected.get(b), sm, bitmap)
            pos = got.find(3, pos + 1)

    @staticmethod
    def _expected(expected: RefCounts, b: int) -> int:
        return expected.get(b) if b < expected.nr_blocks else 0

    def _mismatch(self, b: int, stored: int, exp: int, sm: LoadedSpaceMap, bitmap: int) -> None:
        fatal = stored < exp
        if sm.name == "data":
            self.sink.add(DefectRule.DATA_REFCOUNT, bitmap, f"reference count {stored}, expected {exp}",
                          fatal=fatal, path=sm.path, data_block=b, subject=f"data block {b}")
        else:
            self.sink.add(DefectRule.METADATA_REFCOUNT, b, f"metadata reference count {stored}, expected {exp}",
                          fatal=fatal, path=sm.path)

    def _check_unused_overflow(self, sm: LoadedSpaceMap, used: set[int]) -> None:
        for b, count in sorted(sm.overflow.items()):
            if b not in used:
                self.sink.add(DefectRule.OVERFLOW_WRONG, sm.root.ref_count_root,
                              f"overflow entry for block {b} (count {count}), but its bitmap entry is not 3",
                              fatal=False, path=sm.path)
            elif count < 3:
                self.sink.add(DefectRule.OVERFLOW_WRONG, sm.root.ref_count_root,
                              f"overflow entry for block {b} has count {count}, below 3", fatal=False, path=sm.path)
