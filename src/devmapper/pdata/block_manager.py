"""Block manager: whole 4 KiB metadata blocks on a block device (mirrors ``dm-block-manager``).

It only moves bytes; validation happens where blocks are decoded (``format``), caching of decoded
blocks in the transaction manager.  ``nr_blocks`` is the device size in metadata blocks, rounded down.
"""

from __future__ import annotations

from devmapper.blockdev.base import BlockDevice
from devmapper.errors import BlockDeviceError
from devmapper.units import METADATA_BLOCK_SIZE


class BlockManager:
    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.nr_reads = 0
        self.nr_writes = 0

    @property
    def read_only(self) -> bool:
        return self.dev.read_only

    def nr_blocks(self) -> int:
        return self.dev.size() // METADATA_BLOCK_SIZE

    def read(self, blocknr: int) -> bytes:
        if blocknr < 0 or blocknr >= self.nr_blocks():
            raise BlockDeviceError(f"metadata block {blocknr} beyond device end ({self.nr_blocks()} blocks)")
        self.nr_reads += 1
        return self.dev.read(blocknr * METADATA_BLOCK_SIZE, METADATA_BLOCK_SIZE)

    def write(self, blocknr: int, buf: bytes | bytearray) -> None:
        if len(buf) != METADATA_BLOCK_SIZE:
            raise ValueError("metadata writes are whole blocks")
        if blocknr < 0 or blocknr >= self.nr_blocks():
            raise BlockDeviceError(f"metadata block {blocknr} beyond device end ({self.nr_blocks()} blocks)")
        self.nr_writes += 1
        self.dev.write(blocknr * METADATA_BLOCK_SIZE, buf)

    def flush(self) -> None:
        self.dev.flush()
