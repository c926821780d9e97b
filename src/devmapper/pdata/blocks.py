"""Decoded metadata blocks other than B-tree nodes, in the shape the transaction manager handles.

Every object the transaction manager caches has ``blocknr``, ``pack()`` (a stamped 4 KiB block) and
``copy(blocknr)``; ``format.btree_node.Node`` already has them.
"""

from __future__ import annotations

from devmapper.format.bitmap import (
    MAX_METADATA_BITMAPS,
    pack_bitmap,
    pack_index_block,
    unpack_bitmap,
    unpack_index_block,
)
from devmapper.format.records import IndexEntry


class BitmapBlock:
    """A space-map bitmap: 16320 entries of 0..3, one byte each; ``None`` stands for all zero, so a
    freshly grown space map can write thousands of empty bitmaps without holding 16 KiB for each."""

    __slots__ = ("blocknr", "entries")

    def __init__(self, blocknr: int, entries: bytearray | None) -> None:
        self.blocknr = blocknr
        self.entries = entries

    @classmethod
    def unpack(cls, buf: bytes, blocknr: int) -> BitmapBlock:
        return cls(blocknr, unpack_bitmap(buf, blocknr))

    def pack(self) -> bytearray:
        return pack_bitmap(self.entries if self.entries is not None else b"", self.blocknr)

    def copy(self, blocknr: int) -> BitmapBlock:
        return BitmapBlock(blocknr, None if self.entries is None else bytearray(self.entries))


class IndexBlock:
    """The metadata space map's single index block: 255 index entries."""

    __slots__ = ("blocknr", "entries")

    def __init__(self, blocknr: int, entries: list[IndexEntry]) -> None:
        self.blocknr = blocknr
        self.entries = entries

    @classmethod
    def unpack(cls, buf: bytes, blocknr: int) -> IndexBlock:
        return cls(blocknr, unpack_index_block(buf, blocknr))

    def pack(self) -> bytearray:
        entries = list(self.entries)[:MAX_METADATA_BITMAPS]
        return pack_index_block(entries, self.blocknr)

    def copy(self, blocknr: int) -> IndexBlock:
        return IndexBlock(blocknr, list(self.entries))
