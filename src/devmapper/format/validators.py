"""Validators: prepare a block for writing (stamp blocknr and checksum) and check it after reading.

Every metadata block type stores its checksum at offset 0 and its own block number (the kernel
rejects a block read from elsewhere).  The superblock's blocknr field is at offset 8 like the others;
for the live superblock it is 0, for a metadata-snapshot copy it is the copy's location.
"""

from __future__ import annotations

import struct
from typing import Final

from devmapper.errors import BlockLocationError, ChecksumError, MetadataError
from devmapper.format.checksum import BlockType, block_csum
from devmapper.units import METADATA_BLOCK_SIZE

_BLOCKNR_OFFSET: Final = 8


def prepare_for_write(buf: bytearray, blocknr: int, kind: BlockType) -> None:
    """Stamp blocknr at offset 8 and the salted checksum at offset 0, in place."""
    if len(buf) != METADATA_BLOCK_SIZE:
        raise ValueError(f"metadata block must be {METADATA_BLOCK_SIZE} bytes, got {len(buf)}")
    struct.pack_into("<Q", buf, _BLOCKNR_OFFSET, blocknr)
    struct.pack_into("<I", buf, 0, block_csum(buf, kind))


def check(buf: bytes | bytearray | memoryview, blocknr: int, kind: BlockType, name: str) -> None:
    """Raise ChecksumError or BlockLocationError if buf is not a valid block of this kind at blocknr."""
    if len(buf) != METADATA_BLOCK_SIZE:
        raise MetadataError(f"block {blocknr}: {name} is {len(buf)} bytes, not {METADATA_BLOCK_SIZE}")
    stored = int.from_bytes(bytes(buf[0:4]), "little")
    computed = block_csum(buf, kind)
    if stored != computed:
        raise ChecksumError(blocknr, name, stored, computed)
    where = int.from_bytes(bytes(buf[_BLOCKNR_OFFSET:_BLOCKNR_OFFSET + 8]), "little")
    if where != blocknr:
        raise BlockLocationError(blocknr, name, where)
