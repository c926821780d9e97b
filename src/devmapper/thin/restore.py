"""Build metadata from visitor events (the writing half of thin_restore).

Semantics follow thin_restore 0.9.0: the output device must already exist and be big enough (its size
sets the metadata space map); every device gets its own mapping tree (no metadata sharing); a data
block's reference count is the number of mappings naming it; ``mapped_blocks`` is recomputed rather
than trusted; a data block beyond ``nr_data_blocks`` is an error.

Block 0 is zeroed before anything else is written and again if the restore fails, so a failed restore
never leaves a half-written pool that looks valid.
"""

from __future__ import annotations

from devmapper.blockdev.base import BlockDevice
from devmapper.errors import MetadataError
from devmapper.thin.ir import DeviceInfo, Run, SuperblockInfo
from devmapper.thin.metadata import PoolMetadata
from devmapper.units import METADATA_BLOCK_SIZE

_BATCH = 4096


class RestoreEmitter:
    """A MetadataVisitor that writes what it is shown into fresh metadata on ``dev``."""

    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.pmd: PoolMetadata | None = None
        self._device: DeviceInfo | None = None
        self._pending: list[tuple[int, int, int]] = []
        self.nr_mappings = 0
        self._seen: set[int] = set()

    def _zero_superblock(self) -> None:
        self.dev.write(0, bytes(METADATA_BLOCK_SIZE))
        self.dev.flush()

    def superblock_b(self, sb: SuperblockInfo) -> None:
        self._zero_superblock()
        pmd = PoolMetadata.format(self.dev, sb.data_block_size, sb.nr_data_blocks)
        pmd.time, pmd.trans_id, pmd.flags = sb.time, sb.transaction, sb.flags
        uuid = sb.uuid.encode()[:16]
        pmd.sb = pmd.sb.replace(uuid=uuid, version=sb.version)
        self.pmd = pmd

    def _need(self) -> PoolMetadata:
        if self.pmd is None:
            raise MetadataError("restore: mappings or devices before the superblock")
        return self.pmd

    def device_b(self, dev: DeviceInfo) -> None:
        pmd = self._need()
        if dev.dev_id in self._seen:
            raise MetadataError(f"restore: duplicate device id {dev.dev_id}")
        self._seen.add(dev.dev_id)
        pmd.create_thin(dev.dev_id)
        self._device = dev

    def map(self, run: Run) -> None:
        pmd = self._need()
        if self._device is None:
            raise MetadataError("restore: mapping outside a device")
        if run.data_begin + run.length > pmd.dsm.nr_blocks:
            raise MetadataError(
                f"restore: data block {run.data_begin + run.length - 1} of device {self._device.dev_id} is "
                f"beyond nr_data_blocks ({pmd.dsm.nr_blocks})"
            )
        for i in range(run.length):
            pmd.inc_data_block(run.data_begin + i)
            self._pending.append((run.origin_begin + i, run.data_begin + i, run.time))
        if len(self._pending) >= _BATCH:
            self._flush_pending()

    def _flush_pending(self) -> None:
        if self._pending and self._device is not None:
            self.nr_mappings += len(self._pending)
            self._need().insert_many(self._device.dev_id, self._pending)
        self._pending = []

    def device_e(self) -> None:
        self._flush_pending()
        d = self._device
        if d is None:
            raise MetadataError("restore: end of a device that was not begun")
        self._need().set_device_details(d.dev_id, d.transaction, d.creation_time & 0xFFFFFFFF,
                                        d.snap_time & 0xFFFFFFFF)
        self._device = None

    def superblock_e(self) -> None:
        self._need().commit()

    def eof(self) -> None:
        pmd = self._need()
        pmd.close()

    def fail(self) -> None:
        """Called when the input turned out bad: leave a zeroed superblock behind."""
        self._zero_superblock()
