"""The thin superblock (block 0) and the space-map roots it embeds.

Layout (kernel ``struct thin_disk_superblock``, 364 bytes, rest of the block zero)::

    0   le32 csum            salt 160774, over bytes 4..4095
    4   le32 flags           bit 0: NEEDS_CHECK
    8   le64 blocknr         0 for the live superblock; own location for a metadata-snapshot copy
    16  u8[16] uuid
    32  le64 magic           27022010
    40  le32 version         2
    44  le32 time            snapshot time counter
    48  le64 trans_id
    56  le64 held_root       metadata-snapshot copy, 0 = none
    64  u8[128] data_space_map_root       (disk_sm_root in the first 32 bytes)
    192 u8[128] metadata_space_map_root
    320 le64 data_mapping_root
    328 le64 device_details_root
    336 le32 data_block_size  sectors
    340 le32 metadata_block_size  sectors (8)
    344 le64 metadata_nr_blocks
    352 le32 compat_flags
    356 le32 compat_ro_flags
    360 le32 incompat_flags
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Final

from devmapper.errors import MetadataError
from devmapper.format import validators
from devmapper.format.checksum import BlockType
from devmapper.units import METADATA_BLOCK_SIZE, SECTORS_PER_METADATA_BLOCK

THIN_SUPERBLOCK_MAGIC: Final = 27022010
THIN_VERSION: Final = 2
NEEDS_CHECK_FLAG: Final = 1
SPACE_MAP_ROOT_SIZE: Final = 128

_SB = struct.Struct("<IIQ16sQIIQQ128s128sQQIIQIII")
SIZE: Final = _SB.size
assert SIZE == 364, SIZE

_SM_ROOT = struct.Struct("<QQQQ")
SM_ROOT_SIZE: Final = _SM_ROOT.size
assert SM_ROOT_SIZE == 32


@dataclasses.dataclass(frozen=True, slots=True)
class SmRoot:
    """``disk_sm_root``: what a space map needs to reopen."""

    nr_blocks: int
    nr_allocated: int
    bitmap_root: int  # data SM: root of the index btree; metadata SM: the index block
    ref_count_root: int  # root of the overflow (ref count >= 3) btree

    def pack(self) -> bytes:
        return _SM_ROOT.pack(self.nr_blocks, self.nr_allocated, self.bitmap_root, self.ref_count_root).ljust(
            SPACE_MAP_ROOT_SIZE, b"\0"
        )

    @classmethod
    def unpack(cls, raw: bytes) -> SmRoot:
        return cls(*_SM_ROOT.unpack_from(raw, 0))


ZERO_SM_ROOT: Final = SmRoot(0, 0, 0, 0)


@dataclasses.dataclass(frozen=True, slots=True)
class Superblock:
    flags: int
    blocknr: int
    uuid: bytes
    magic: int
    version: int
    time: int
    trans_id: int
    held_root: int
    data_sm_root: SmRoot
    metadata_sm_root: SmRoot
    data_mapping_root: int
    device_details_root: int
    data_block_size: int  # sectors
    metadata_block_size: int = SECTORS_PER_METADATA_BLOCK
    metadata_nr_blocks: int = 0
    compat_flags: int = 0
    compat_ro_flags: int = 0
    incompat_flags: int = 0

    @property
    def needs_check(self) -> bool:
        return bool(self.flags & NEEDS_CHECK_FLAG)

    def pack(self) -> bytearray:
        """A whole 4 KiB block with blocknr and checksum stamped."""
        buf = bytearray(METADATA_BLOCK_SIZE)
        _SB.pack_into(
            buf, 0, 0, self.flags, self.blocknr, self.uuid.ljust(16, b"\0")[:16], self.magic, self.version,
            self.time, self.trans_id, self.held_root, self.data_sm_root.pack(), self.metadata_sm_root.pack(),
            self.data_mapping_root, self.device_details_root, self.data_block_size, self.metadata_block_size,
            self.metadata_nr_blocks, self.compat_flags, self.compat_ro_flags, self.incompat_flags,
        )
        validators.prepare_for_write(buf, self.blocknr, BlockType.SUPERBLOCK)
        return buf

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, location: int = 0) -> Superblock:
        """Decode and validate (checksum, location, magic).  Raises MetadataError."""
        if len(buf) < METADATA_BLOCK_SIZE:
            raise MetadataError(f"superblock: short block ({len(buf)} bytes)")
        validators.check(buf, location, BlockType.SUPERBLOCK, "superblock")
        f = _SB.unpack_from(buf, 0)
        if f[4] != THIN_SUPERBLOCK_MAGIC:
            raise MetadataError(f"superblock at block {location}: bad magic {f[4]}")
        return cls(
            flags=f[1], blocknr=f[2], uuid=f[3], magic=f[4], version=f[5], time=f[6], trans_id=f[7],
            held_root=f[8], data_sm_root=SmRoot.unpack(f[9]), metadata_sm_root=SmRoot.unpack(f[10]),
            data_mapping_root=f[11], device_details_root=f[12], data_block_size=f[13],
            metadata_block_size=f[14], metadata_nr_blocks=f[15], compat_flags=f[16],
            compat_ro_flags=f[17], incompat_flags=f[18],
        )

    def replace(self, **changes: object) -> Superblock:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
