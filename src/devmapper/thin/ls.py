"""thin_ls: per-device mapped, exclusive and shared block counts.

A data block is *exclusive* to a device when exactly one mapping in the whole pool names it, and
*shared* otherwise (thin_ls 0.9.0's rule: it counts mappings, not leaves).  Counting uses a two-pass
walk with a saturating per-data-block counter (one byte per data block, so memory is nr_data_blocks
bytes).  ``render`` reproduces thin_ls's grid: each column right-justified to its widest cell, every
cell followed by one space.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from devmapper.blockdev.base import BlockDevice
from devmapper.errors import MetadataCorruption
from devmapper.thin.dump import MetadataReader

FIELDS: tuple[str, ...] = (
    "DEV", "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS", "MAPPED_SECTORS", "EXCLUSIVE_SECTORS",
    "SHARED_SECTORS", "MAPPED_BYTES", "EXCLUSIVE_BYTES", "SHARED_BYTES", "MAPPED", "EXCLUSIVE", "SHARED",
    "TRANSACTION", "CREATE_TIME", "SNAP_TIME",
)
DEFAULT_FIELDS: tuple[str, ...] = ("DEV", "MAPPED", "CREATE_TIME", "SNAP_TIME")


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceUsage:
    dev_id: int
    mapped_blocks: int
    exclusive_blocks: int
    transaction: int
    creation_time: int
    snap_time: int

    @property
    def shared_blocks(self) -> int:
        return self.mapped_blocks - self.exclusive_blocks


def format_disk_unit(nr_bytes: int) -> str:
    """thin-provisioning-tools' human size: integer steps down to <= 1 MiB, then round to the next unit
    when above 8 KiB (round half away from zero)."""
    n, i = nr_bytes, 0
    while n > 1024 * 1024:
        n //= 1024
        i += 1
    if n > 8 * 1024:
        n = (n + 512) // 1024
        i += 1
    return f"{n}{('', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB')[i]}"


def usage(
    dev: BlockDevice, metadata_snap: bool = False, progress: Callable[[int, int], None] | None = None
) -> tuple[int, list[DeviceUsage]]:
    """(data block size, usage of every device) for the metadata on dev."""
    reader = MetadataReader(dev, metadata_snap)
    details = reader.details()
    roots = dict(reader.device_roots())
    nr_data = reader.sb.data_sm_root.nr_blocks
    seen = bytearray(nr_data)
    total = 2 * len(details)
    for n, dev_id in enumerate(details):
        if dev_id not in roots:
            raise MetadataCorruption(f"device {dev_id} has details but no mapping tree")
        for _vblock, value in reader.mappings(roots[dev_id]):
            b = value >> 24
            if b >= nr_data:
                raise MetadataCorruption(f"device {dev_id} maps data block {b} beyond nr_data_blocks {nr_data}")
            if seen[b] < 2:
                seen[b] += 1
        if progress is not None:
            progress(n + 1, total)
    out = []
    for n, (dev_id, d) in enumerate(details.items()):
        exclusive = sum(1 for _v, value in reader.mappings(roots[dev_id]) if seen[value >> 24] == 1)
        out.append(DeviceUsage(dev_id, d.mapped_blocks, exclusive, d.transaction_id, d.creation_time,
                               d.snapshotted_time))
        if progress is not None:
            progress(len(details) + n + 1, total)
    return reader.sb.data_block_size, out


def _cell(field: str, u: DeviceUsage, block_size: int) -> str:
    kind, _, unit = field.partition("_")
    blocks = {"MAPPED": u.mapped_blocks, "EXCLUSIVE": u.exclusive_blocks, "SHARED": u.shared_blocks}
    if field == "DEV":
        return str(u.dev_id)
    if field == "TRANSACTION":
        return str(u.transaction)
    if field == "CREATE_TIME":
        return str(u.creation_time)
    if field == "SNAP_TIME":
        return str(u.snap_time)
    nr = blocks[kind]
    if unit == "BLOCKS":
        return str(nr)
    if unit == "SECTORS":
        return str(nr * block_size)
    if unit == "BYTES":
        return str(nr * block_size * 512)
    return format_disk_unit(nr * block_size * 512)


def render(block_size: int, devices: Sequence[DeviceUsage], fields: Sequence[str], headers: bool = True) -> str:
    """thin_ls's grid, as text (one line per row, trailing space after every cell)."""
    for f in fields:
        if f not in FIELDS:
            raise ValueError(f"unknown field {f!r}")
    rows = [list(fields)] if headers else []
    rows += [[_cell(f, u, block_size) for f in fields] for u in devices]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(len(fields))]
    return "".join("".join(c.rjust(w) + " " for c, w in zip(r, widths, strict=True)) + "\n" for r in rows)
