"""The ``linear`` target (``dm-linear.c``): ``<device> <offset>`` maps the segment onto the device
starting at sector ``offset``.  Status is empty; the table shows the device by its label."""

from __future__ import annotations

from devmapper.control.errors import DmError
from devmapper.control.targets.base import Target, TargetContext
from devmapper.export import Extent
from devmapper.units import SECTOR_SIZE

__all__ = ["LinearTarget", "check_device_area", "parse_sector"]


def parse_sector(word: str, reason: str) -> int:
    if not word.isascii() or not word.isdigit() or int(word) >= 1 << 64:
        raise DmError("EINVAL", reason)
    return int(word)


def check_device_area(target: str, label: str, dev_size: int, start: int, length: int) -> None:
    """``device_area_is_invalid``: the segment must fit inside the lower device."""
    dev_sectors = dev_size // SECTOR_SIZE
    if start + length > dev_sectors:
        raise DmError(
            "EINVAL", f"{target}: {label} too small for target: start={start}, len={length}, dev_size={dev_sectors}"
        )


class LinearTarget(Target):
    type_name = "linear"
    version = (1, 4, 0)

    def __init__(self, ctx: TargetContext, start: int, length: int, argv: list[str]) -> None:
        super().__init__(ctx, start, length, argv)
        if len(argv) != 2:
            raise DmError("EINVAL", "linear: Invalid argument count")
        self.offset_sectors = parse_sector(argv[1], "linear: Invalid device sector")
        self.dev = ctx.open(argv[0])
        check_device_area("linear", self.dev.label, self.dev.size(), self.offset_sectors, length)
        self._base = self.offset_sectors * SECTOR_SIZE

    def read(self, offset: int, length: int) -> bytes:
        return self.dev.read(self._base + offset, length)

    def readinto(self, offset: int, out: memoryview) -> None:
        self.dev.readinto(self._base + offset, out)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.dev.write_fua(self._base + offset, data, fua)

    def flush(self) -> None:
        self.dev.flush()

    def discard(self, offset: int, length: int) -> None:
        self.dev.discard(self._base + offset, length)

    def write_zeroes(self, offset: int, length: int, fua: bool, unmap: bool) -> None:
        self.dev.write_zeroes(self._base + offset, length, fua)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self.dev.block_status(self._base + offset, length)

    def table_params(self) -> str:
        return f"{self.dev.label} {self.offset_sectors}"
