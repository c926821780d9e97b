"""Small fixed-size records stored as B-tree values, each packed to and from an int.

B-tree nodes keep every value as a Python int of ``value_size`` bytes (little-endian), whatever its
meaning; these helpers give the ints meaning.

* mapping value (8 bytes): ``(data_block << 24) | time`` (kernel ``pack_block_time``)
* device details (24 bytes): mapped_blocks le64, transaction_id le64, creation_time le32,
  snapshotted_time le32
* index entry (16 bytes): blocknr le64, nr_free le32, none_free_before le32
"""

from __future__ import annotations

import dataclasses
from typing import Final

TIME_BITS: Final = 24
TIME_MASK: Final = (1 << TIME_BITS) - 1
MAX_DATA_BLOCK: Final = (1 << 40) - 1


def pack_block_time(data_block: int, time: int) -> int:
    return (data_block << TIME_BITS) | (time & TIME_MASK)


def unpack_block_time(value: int) -> tuple[int, int]:
    return value >> TIME_BITS, value & TIME_MASK


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceDetails:
    mapped_blocks: int
    transaction_id: int
    creation_time: int
    snapshotted_time: int

    SIZE = 24

    def pack(self) -> int:
        return (
            self.mapped_blocks
            | (self.transaction_id << 64)
            | (self.creation_time << 128)
            | (self.snapshotted_time << 160)
        )

    @classmethod
    def unpack(cls, value: int) -> DeviceDetails:
        m64 = (1 << 64) - 1
        m32 = (1 << 32) - 1
        return cls(value & m64, (value >> 64) & m64, (value >> 128) & m32, (value >> 160) & m32)


@dataclasses.dataclass(frozen=True, slots=True)
class IndexEntry:
    """``disk_index_entry``: where a space-map bitmap lives and how free it is."""

    blocknr: int
    nr_free: int
    none_free_before: int

    SIZE = 16

    def pack(self) -> int:
        return self.blocknr | (self.nr_free << 64) | (self.none_free_before << 96)

    @classmethod
    def unpack(cls, value: int) -> IndexEntry:
        return cls(value & ((1 << 64) - 1), (value >> 64) & 0xFFFFFFFF, (value >> 96) & 0xFFFFFFFF)
