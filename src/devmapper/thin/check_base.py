"""The checker's vocabulary: defect rules, defects, the report, expected counts and raw block reads.

Shared by ``check`` (superblock, devices, space maps) and ``check_btree`` (node and tree rules); kept
apart so neither imports the other's internals.  Nothing here writes: ``BlockReader`` only reads whole
blocks through a ``BlockManager`` and reports what is wrong with them instead of raising.

Vocabulary
----------
* A **defect** is one broken invariant at one place.  Its ``rule`` names the invariant
  (``KEYS_OUT_OF_ORDER``), never the symptom; ``fatal`` says whether the metadata is unsafe to use
  (a leak, i.e. a stored count above the expected one, is the typical non-fatal defect).
* A **hint** is a defect record for a stale space-map *free-space hint* that errs on the safe side
  (``nr_allocated`` above the blocks in use, ``none_free_before`` past a free entry): the kernel
  merely overlooks some free blocks until the hint is next updated, and thin_restore 0.9.0 itself
  writes such hints.  Hints are reported in ``Report.hints`` and do not make a report fail.
* **Expected counts** (``RefCounts``) are what the space maps should hold, rebuilt from what is
  reachable: one byte per block, saturating at 255 into a dict, so memory stays one byte per block.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable
from typing import Final

from devmapper.errors import BlockDeviceError
from devmapper.format.checksum import BlockType, identify, raw_crc
from devmapper.pdata.block_manager import BlockManager

Progress = Callable[[str, int, int], None]

#: Beyond this many defects of one rule only a count is kept (``Report.suppressed``).
MAX_DEFECTS_PER_RULE: Final = 1000


class DefectRule(enum.StrEnum):
    """The invariants the checker verifies; each value is the rule's stable lower-case name."""

    SUPERBLOCK_UNREADABLE = "superblock_unreadable"  # device too small or block 0 unreadable
    SUPERBLOCK_CHECKSUM = "superblock_checksum"
    BAD_MAGIC = "bad_magic"
    SUPERBLOCK_FIELD = "superblock_field"  # version, flags, block sizes, space-map size vs device
    HELD_ROOT = "held_root"  # metadata-snapshot copy unusable or inconsistent
    BLOCK_OUT_OF_RANGE = "block_out_of_range"  # pointer >= metadata nr_blocks (or device end)
    CHECKSUM = "checksum"
    NOT_A_NODE = "not_a_node"  # checksum matches another block type's salt
    NOT_A_BITMAP = "not_a_bitmap"
    NOT_AN_INDEX = "not_an_index"
    BAD_BLOCKNR = "bad_blocknr"  # stored block number differs from the location
    BAD_FLAGS = "bad_flags"  # node flags neither INTERNAL nor LEAF
    VALUE_SIZE_MISMATCH = "value_size_mismatch"
    MAX_ENTRIES_NOT_DIV3 = "max_entries_not_div3"
    MAX_ENTRIES_WRONG = "max_entries_wrong"  # overruns the block, or not the canonical capacity
    TOO_MANY_ENTRIES = "too_many_entries"
    UNDERFULL = "underfull"
    KEYS_OUT_OF_ORDER = "keys_out_of_order"
    PARENT_KEY_TOO_BIG = "parent_key_too_big"  # parent key > child's first key
    KEY_OUTSIDE_PARENT_RANGE = "key_outside_parent_range"  # child key >= the parent's next key
    LEAF_KEYS_OVERLAP = "leaf_keys_overlap"  # leaf's first key <= previous leaf's last key
    UNEQUAL_DEPTH = "unequal_depth"
    CYCLE = "cycle"  # a node is its own ancestor
    CROSS_LINKED = "cross_linked"  # one block used as nodes of two kinds of tree
    DETAILS_MAPPING_MISMATCH = "details_mapping_mismatch"
    MAPPED_BLOCKS_WRONG = "mapped_blocks_wrong"
    TIME_TOO_BIG = "time_too_big"  # a mapping or device time later than the superblock's time
    DATA_BLOCK_OUT_OF_RANGE = "data_block_out_of_range"
    METADATA_REFCOUNT = "metadata_refcount"
    DATA_REFCOUNT = "data_refcount"
    NR_ALLOCATED_WRONG = "nr_allocated_wrong"
    INDEX_ENTRY_WRONG = "index_entry_wrong"
    OVERFLOW_WRONG = "overflow_wrong"


@dataclasses.dataclass(frozen=True, slots=True)
class Defect:
    """One broken invariant.

    ``block`` is the metadata block concerned (None when no single block is); ``data_block`` is set
    for defects about a data block.  ``path`` names the tree ("mapping tree of device 7"), ``nodes``
    the (block, key) pointers followed from that tree's root down to the defective node.
    """

    block: int | None
    rule: DefectRule
    message: str
    fatal: bool
    path: str | None = None
    nodes: tuple[tuple[int, int], ...] = ()
    data_block: int | None = None

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(slots=True)
class Report:
    """Every defect (and hint) found plus a summary of the metadata (fields stay None when not reached)."""

    defects: list[Defect] = dataclasses.field(default_factory=list)
    hints: list[Defect] = dataclasses.field(default_factory=list)
    suppressed: dict[DefectRule, int] = dataclasses.field(default_factory=dict)
    trans_id: int | None = None
    time: int | None = None
    needs_check: bool = False
    held_root: int = 0
    data_block_size: int | None = None
    nr_metadata_blocks: int | None = None
    metadata_free_blocks: int | None = None
    nr_data_blocks: int | None = None
    data_free_blocks: int | None = None
    nr_devices: int | None = None
    nr_mappings: int | None = None
    space_maps_checked: bool = False
    nr_blocks_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.defects and not self.suppressed

    @property
    def fatal(self) -> bool:
        return any(d.fatal for d in self.defects)

    @property
    def nr_defects(self) -> int:
        return len(self.defects) + sum(self.suppressed.values())

    def by_rule(self, rule: DefectRule) -> list[Defect]:
        return [d for d in self.defects if d.rule is rule]

    def rules(self) -> set[DefectRule]:
        return {d.rule for d in self.defects} | set(self.suppressed)


class DefectSink:
    """Builds defect messages ("block 42: ... (tree)") and files them in a report, capped per rule."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self._per_rule: dict[DefectRule, int] = {}

    def add(
        self,
        rule: DefectRule,
        block: int | None,
        text: str,
        *,
        fatal: bool = True,
        path: str | None = None,
        nodes: tuple[tuple[int, int], ...] = (),
        data_block: int | None = None,
        subject: str | None = None,
        hint: bool = False,
    ) -> None:
        """File a defect (``hint``: a non-failing hint); ``subject`` replaces the default "block N" at
        the start of the message."""
        n = self._per_rule.get(rule, 0) + 1
        self._per_rule[rule] = n
        if n > MAX_DEFECTS_PER_RULE:
            if not hint:
                self.report.suppressed[rule] = self.report.suppressed.get(rule, 0) + 1
            return
        if subject is None:
            subject = "" if block is None else f"block {block}"
        message = f"{subject}: {text}" if subject else text
        if path:
            message += f" ({path})"
        found = Defect(block, rule, message, fatal and not hint, path, nodes, data_block)
        (self.report.hints if hint else self.report.defects).append(found)


class RefCounts:
    """Expected reference counts of blocks 0..nr_blocks-1: one byte each, exact counts >= 255 in a dict.

    ``small`` is public so hot loops can do the common case (``c < 255``) inline.
    """

    __slots__ = ("big", "nr_blocks", "small")

    def __init__(self, nr_blocks: int) -> None:
        self.nr_blocks = nr_blocks
        self.small = bytearray(nr_blocks)
        self.big: dict[int, int] = {}

    def inc(self, b: int) -> None:
        c = self.small[b]
        if c < 255:
            self.small[b] = c + 1
        else:
            self.big[b] = self.big.get(b, 255) + 1

    def get(self, b: int) -> int:
        c = self.small[b]
        return self.big.get(b, 255) if c == 255 else c


_WRONG_TYPE_RULE: Final = {
    BlockType.BTREE_NODE: DefectRule.NOT_A_NODE,
    BlockType.BITMAP: DefectRule.NOT_A_BITMAP,
    BlockType.INDEX: DefectRule.NOT_AN_INDEX,
    BlockType.SUPERBLOCK: DefectRule.HELD_ROOT,
}
_TYPE_NAME: Final = {
    BlockType.BTREE_NODE: "btree node",
    BlockType.BITMAP: "space map bitmap",
    BlockType.INDEX: "metadata space map index",
    BlockType.SUPERBLOCK: "superblock",
}
_BLOCKNR = struct.Struct("<Q")


class BlockReader:
    """Reads metadata blocks below ``limit`` and verifies checksum, type and location, reporting defects.

    ``read`` returns the block when its checksum matches the expected type (even when its stored
    block number is wrong: that is reported, and the contents are still usable for further checks),
    or None when nothing in it can be trusted.  ``nr_reads`` feeds the progress estimate.
    """

    def __init__(self, bm: BlockManager, sink: DefectSink, limit: int) -> None:
        self.bm = bm
        self.sink = sink
        self.limit = limit
        self.nr_reads = 0

    def in_range(self, b: int, what: str, path: str | None, nodes: tuple[tuple[int, int], ...] = ()) -> bool:
        """Report BLOCK_OUT_OF_RANGE for a pointer at or beyond the metadata limit."""
        if 0 <= b < self.limit:
            return True
        self.sink.add(DefectRule.BLOCK_OUT_OF_RANGE, b, f"{what} pointer beyond the metadata end ({self.limit} blocks)",
                      path=path, nodes=nodes)
        return False

    def read(
        self, b: int, kind: BlockType, path: str | None, nodes: tuple[tuple[int, int], ...] = ()
    ) -> bytes | None:
        """The block if its checksum says it is a ``kind`` block; None (after reporting) otherwise."""
        name = _TYPE_NAME[kind]
        if not self.in_range(b, name, path, nodes):
            return None
        try:
            buf = self.bm.read(b)
        except BlockDeviceError as e:
            self.sink.add(DefectRule.BLOCK_OUT_OF_RANGE, b, f"{name} unreadable: {e}", path=path, nodes=nodes)
            return None
        self.nr_reads += 1
        stored = int.from_bytes(buf[:4], "little")
        salt = raw_crc(memoryview(buf)[4:]) ^ stored
        if salt != kind:
            self._wrong_checksum(b, buf, kind, path, nodes)
            return None
        where = _BLOCKNR.unpack_from(buf, 8)[0]
        if where != b:
            rule = DefectRule.HELD_ROOT if kind is BlockType.SUPERBLOCK else DefectRule.BAD_BLOCKNR
            self.sink.add(rule, b, f"{name} has block number {where}, expected {b}", path=path, nodes=nodes)
        return buf

    def _wrong_checksum(
        self, b: int, buf: bytes, kind: BlockType, path: str | None, nodes: tuple[tuple[int, int], ...]
    ) -> None:
        name = _TYPE_NAME[kind]
        other = identify(buf)
        if other is not None:
            self.sink.add(_WRONG_TYPE_RULE[kind], b, f"expected a {name}, found a {_TYPE_NAME[other]}",
                          path=path, nodes=nodes)
            return
        rule = DefectRule.HELD_ROOT if kind is BlockType.SUPERBLOCK else DefectRule.CHECKSUM
        stored = int.from_bytes(buf[:4], "little")
        computed = raw_crc(memoryview(buf)[4:]) ^ kind
        self.sink.add(rule, b, f"{name} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})",
                      path=path, nodes=nodes)
