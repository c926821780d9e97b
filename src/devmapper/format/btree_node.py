"""B-tree node blocks (kernel ``struct btree_node``).

Layout::

    0   le32 csum          salt 121107
    4   le32 flags         1 = INTERNAL, 2 = LEAF
    8   le64 blocknr
    16  le32 nr_entries
    20  le32 max_entries
    24  le32 value_size
    28  le32 padding
    32  le64 keys[max_entries]
    32 + 8*max_entries     values[max_entries], value_size bytes each

Values are held decoded as ints of ``value_size`` little-endian bytes (see ``records``).
``unpack`` is lenient: it refuses only what makes a node unusable (checksum, location, flags,
sizes that overrun the block).  Fill and ordering rules are the checker's business.
"""

from __future__ import annotations

import struct
from typing import Final

from devmapper.errors import MetadataCorruption
from devmapper.format import validators
from devmapper.format.checksum import BlockType
from devmapper.units import METADATA_BLOCK_SIZE

INTERNAL_NODE: Final = 1
LEAF_NODE: Final = 2
NODE_HEADER_SIZE: Final = 32
_HEADER = struct.Struct("<IIQIIII")
assert _HEADER.size == NODE_HEADER_SIZE


def calc_max_entries(value_size: int) -> int:
    """The kernel's capacity rule: a multiple of 3 that fits in a block."""
    total = (METADATA_BLOCK_SIZE - NODE_HEADER_SIZE) // (8 + value_size)
    return (total // 3) * 3


class Node:
    """A decoded B-tree node.  Mutable: only obtain writable nodes from the transaction manager."""

    __slots__ = ("blocknr", "flags", "keys", "max_entries", "value_size", "values")

    def __init__(
        self, blocknr: int, flags: int, value_size: int, max_entries: int, keys: list[int], values: list[int]
    ) -> None:
        self.blocknr = blocknr
        self.flags = flags
        self.value_size = value_size
        self.max_entries = max_entries
        self.keys = keys
        self.values = values

    @classmethod
    def empty(cls, blocknr: int, leaf: bool, value_size: int) -> Node:
        vs = value_size if leaf else 8
        return cls(blocknr, LEAF_NODE if leaf else INTERNAL_NODE, vs, calc_max_entries(vs), [], [])

    @property
    def is_leaf(self) -> bool:
        return self.flags == LEAF_NODE

    @property
    def nr_entries(self) -> int:
        return len(self.keys)

    def copy(self, blocknr: int) -> Node:
        return Node(blocknr, self.flags, self.value_size, self.max_entries, list(self.keys), list(self.values))

    def pack(self) -> bytearray:
        n = len(self.keys)
        if n > self.max_entries:
            raise MetadataCorruption(f"block {self.blocknr}: node overfull ({n} > {self.max_entries})")
        buf = bytearray(METADATA_BLOCK_SIZE)
        _HEADER.pack_into(buf, 0, 0, self.flags, self.blocknr, n, self.max_entries, self.value_size, 0)
        struct.pack_into(f"<{n}Q", buf, NODE_HEADER_SIZE, *self.keys)
        voff = NODE_HEADER_SIZE + 8 * self.max_entries
        vs = self.value_size
        if vs == 8:
            struct.pack_into(f"<{n}Q", buf, voff, *self.values)
        elif vs == 4:
            struct.pack_into(f"<{n}I", buf, voff, *self.values)
        else:
            for i, v in enumerate(self.values):
                buf[voff + i * vs : voff + (i + 1) * vs] = v.to_bytes(vs, "little")
        validators.prepare_for_write(buf, self.blocknr, BlockType.BTREE_NODE)
        return buf

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, blocknr: int) -> Node:
        validators.check(buf, blocknr, BlockType.BTREE_NODE, "btree node")
        _csum, flags, _bnr, n, max_entries, vs, _pad = _HEADER.unpack_from(buf, 0)
        if flags not in (INTERNAL_NODE, LEAF_NODE):
            raise MetadataCorruption(f"block {blocknr}: btree node has bad flags {flags}")
        if vs == 0 or NODE_HEADER_SIZE + (8 + vs) * max_entries > METADATA_BLOCK_SIZE:
            raise MetadataCorruption(
                f"block {blocknr}: btree node max_entries {max_entries} value_size {vs} overrun the block"
            )
        if n > max_entries:
            raise MetadataCorruption(f"block {blocknr}: btree node nr_entries {n} > max_entries {max_entries}")
        keys = list(struct.unpack_from(f"<{n}Q", buf, NODE_HEADER_SIZE))
        voff = NODE_HEADER_SIZE + 8 * max_entries
        if vs == 8:
            values = list(struct.unpack_from(f"<{n}Q", buf, voff))
        elif vs == 4:
            values = list(struct.unpack_from(f"<{n}I", buf, voff))
        else:
            raw = bytes(buf[voff : voff + n * vs])
            values = [int.from_bytes(raw[i * vs : (i + 1) * vs], "little") for i in range(n)]
        return cls(blocknr, flags, vs, max_entries, keys, values)
