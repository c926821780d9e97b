"""Space-map bitmap blocks and the metadata space map's index block.

Bitmap block::

    0   le32 csum      salt 240779
    4   le32 not_used
    8   le64 blocknr
    16  2-bit entries, 16320 of them

Entry i uses bits 2i (HIGH, value 2) and 2i+1 (LOW, value 1) in little-endian bit order, so byte j
holds entries 4j..4j+3.  Values: 0 free, 1, 2, 3 = "look in the overflow ref-count tree".

Decoded entries are a ``bytearray`` with one byte (0..3) per entry, which lets callers search with
``bytearray.find`` at C speed.

Metadata index block::

    0   le32 csum      salt 160478
    4   le32 padding
    8   le64 blocknr
    16  disk_index_entry[255]   (blocknr le64, nr_free le32, none_free_before le32)
"""

from __future__ import annotations

import struct
from typing import Final

from devmapper.format import validators
from devmapper.format.checksum import BlockType
from devmapper.format.records import IndexEntry
from devmapper.units import METADATA_BLOCK_SIZE

BITMAP_HEADER_SIZE: Final = 16
ENTRIES_PER_BYTE: Final = 4
ENTRIES_PER_BLOCK: Final = (METADATA_BLOCK_SIZE - BITMAP_HEADER_SIZE) * ENTRIES_PER_BYTE  # 16320
MAX_METADATA_BITMAPS: Final = 255
MAX_METADATA_BLOCKS: Final = MAX_METADATA_BITMAPS * ENTRIES_PER_BLOCK  # 4,161,600


def _entries_of(byte: int) -> bytes:
    out = bytearray(4)
    for k in range(4):
        hi = (byte >> (2 * k)) & 1
        lo = (byte >> (2 * k + 1)) & 1
        out[k] = (hi << 1) | lo
    return bytes(out)


_DECODE: Final = [_entries_of(b) for b in range(256)]
_ENCODE: Final = {e: b for b, e in enumerate(_DECODE)}


def unpack_bitmap(buf: bytes | bytearray | memoryview, blocknr: int) -> bytearray:
    """Validate a bitmap block and return its 16320 entries, one byte each."""
    validators.check(buf, blocknr, BlockType.BITMAP, "bitmap")
    dec = _DECODE
    return bytearray(b"".join([dec[b] for b in bytes(buf[BITMAP_HEADER_SIZE:])]))


def pack_bitmap(entries: bytes | bytearray, blocknr: int) -> bytearray:
    """Encode up to 16320 entries (values 0..3; missing tail entries are 0) into a stamped block."""
    if len(entries) > ENTRIES_PER_BLOCK:
        raise ValueError("too many bitmap entries")
    buf = bytearray(METADATA_BLOCK_SIZE)
    if entries.count(0) != len(entries):
        raw = bytes(entries).ljust(ENTRIES_PER_BLOCK, b"\0")
        enc = _ENCODE
        buf[BITMAP_HEADER_SIZE:] = bytes([enc[raw[i : i + 4]] for i in range(0, ENTRIES_PER_BLOCK, 4)])
    validators.prepare_for_write(buf, blocknr, BlockType.BITMAP)
    return buf


_INDEX_ENTRY = struct.Struct("<QII")


def unpack_index_block(buf: bytes | bytearray | memoryview, blocknr: int) -> list[IndexEntry]:
    """Validate a metadata index block and return all 255 entries (unused ones are zero)."""
    validators.check(buf, blocknr, BlockType.INDEX, "metadata index")
    return [
        IndexEntry(*_INDEX_ENTRY.unpack_from(buf, BITMAP_HEADER_SIZE + i * _INDEX_ENTRY.size))
        for i in range(MAX_METADATA_BITMAPS)
    ]


def pack_index_block(entries: list[IndexEntry], blocknr: int) -> bytearray:
    if len(entries) > MAX_METADATA_BITMAPS:
        raise ValueError("too many metadata index entries")
    buf = bytearray(METADATA_BLOCK_SIZE)
    for i, e in enumerate(entries):
        _INDEX_ENTRY.pack_into(buf, BITMAP_HEADER_SIZE + i * _INDEX_ENTRY.size, e.blocknr, e.nr_free,
                               e.none_free_before)
    validators.prepare_for_write(buf, blocknr, BlockType.INDEX)
    return buf
