"""CRC-32C as the kernel uses it for metadata blocks, with the per-type salts.

The kernel computes ``crc32c(~0, block[4:4096])`` and stores the raw register (no final xor) xored
with a salt that names the block type.  The standard CRC-32C has a final xor of ~0, so the raw value is
``standard ^ 0xFFFFFFFF``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final

Buffer = bytes | bytearray | memoryview


def _crc32c_table(data: Buffer) -> int:
    """Standard CRC-32C, table-driven: the fallback when the C extension is missing (slow)."""
    crc = 0xFFFFFFFF
    for b in bytes(data):
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE: Final = _make_table()
_crc32c_std: Callable[[Buffer], int]
try:
    from crc32c import crc32c as _crc32c_std
except ImportError:  # pragma: no cover - crc32c is a declared dependency
    _crc32c_std = _crc32c_table


class BlockType(enum.IntEnum):
    """Checksum salts, one per metadata block type (kernel *_CSUM_XOR constants)."""

    SUPERBLOCK = 160774
    BTREE_NODE = 121107
    BITMAP = 240779
    INDEX = 160478


CSUM_OFFSET: Final = 4  # the checksum covers bytes 4..4095


def raw_crc(data: Buffer) -> int:
    """The kernel's crc32c(~0, data): CRC-32C register without the final xor."""
    return int(_crc32c_std(data)) ^ 0xFFFFFFFF


def block_csum(block: bytes | bytearray | memoryview, salt: int) -> int:
    """Checksum a 4 KiB block (over bytes 4..4095) for the given salt."""
    return raw_crc(memoryview(block)[CSUM_OFFSET:]) ^ salt


def identify(block: bytes | bytearray | memoryview) -> BlockType | None:
    """Tell a block's type from which salt makes its checksum match, or None."""
    stored = int.from_bytes(bytes(block[:4]), "little")
    salt = raw_crc(memoryview(block)[CSUM_OFFSET:]) ^ stored
    try:
        return BlockType(salt)
    except ValueError:
        return None
