"""CRC-32C as the kernel uses it for metadata blocks, with the per-type salts.

The kernel computes ``crc32c(~0, block[4:4096])`` and stores the raw register (no final xor) xored
with a salt that names the block type.  The standard CRC-32C has a final xor of ~0, so the raw value is
``standard ^ 0xFFFFFFFF``.
"""

from __future__ import annotations

import enum
from typing import Final

try:  # pragma: no cover - the C extension is a declared dependency; the table is a fallback
    from crc32c import crc32c as _crc32c_std
except ImportError:  # pragma: no cover
    _TABLE = []
    for _i in range(256):
        _c = _i
        for _ in range(8):
            _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
        _TABLE.append(_c)

    def _crc32c_std(data: bytes | bytearray | memoryview) -> int:
        crc = 0xFFFFFFFF
        for b in bytes(data):
            crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF


class BlockType(enum.IntEnum):
    """Checksum salts, one per metadata block type (kernel *_CSUM_XOR constants)."""

    SUPERBLOCK = 160774
    BTREE_NODE = 121107
    BITMAP = 240779
    INDEX = 160478


CSUM_OFFSET: Final = 4  # the checksum covers bytes 4..4095


def raw_crc(data: bytes | bytearray | memoryview) -> int:
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
