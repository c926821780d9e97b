"""The ``striped`` target (``dm-stripe.c``): ``<#stripes> <chunk sectors> (<device> <offset>)...``.

Chunk ``c`` of the segment lives on stripe ``c % stripes`` as that stripe's chunk ``c // stripes``;
each stripe holds ``length / stripes`` sectors from its offset.  Status is ``<#stripes> <device>...
1 <A|D per stripe>`` (``A`` alive; we never mark a stripe dead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from devmapper.control.errors import DmError
from devmapper.control.lower import Lower
from devmapper.control.targets.base import Target, TargetContext
from devmapper.control.targets.linear import check_device_area, parse_sector
from devmapper.export import Extent, merge_extents
from devmapper.units import SECTOR_SIZE

__all__ = ["StripedTarget"]


class StripedTarget(Target):
    type_name = "striped"
    version = (1, 6, 0)

    def __init__(self, ctx: TargetContext, start: int, length: int, argv: list[str]) -> None:
        super().__init__(ctx, start, length, argv)
        if len(argv) < 2:
            raise DmError("EINVAL", "striped: Not enough arguments")
        stripes = argv[0]
        if not stripes.isdigit() or int(stripes) < 1:
            raise DmError("EINVAL", "striped: Invalid stripe count")
        if not argv[1].isdigit() or int(argv[1]) < 1:
            raise DmError("EINVAL", "striped: Invalid chunk_size")
        self.nr_stripes, self.chunk = int(stripes), int(argv[1])
        width, rest = divmod(length, self.nr_stripes)
        if rest:
            raise DmError("EINVAL", "striped: Target length not divisible by number of stripes")
        if width % self.chunk:
            raise DmError("EINVAL", "striped: Target length not divisible by chunk size")
        if len(argv) != 2 + 2 * self.nr_stripes:
            raise DmError("EINVAL", "striped: Not enough destinations specified")
        self.stripes: list[tuple[Lower, int]] = []
        for i in range(self.nr_stripes):
            offset = parse_sector(argv[3 + 2 * i], "striped: Invalid stripe destination")
            dev = ctx.open(argv[2 + 2 * i])
            check_device_area("striped", dev.label, dev.size(), offset, width)
            self.stripes.append((dev, offset))

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[Lower, int, int, int]]:
        """(device, device byte offset, position in request, length) per chunk piece."""
        chunk_bytes, pos = self.chunk * SECTOR_SIZE, 0
        while pos < length:
            chunk, within = divmod(offset + pos, chunk_bytes)
            n = min(chunk_bytes - within, length - pos)
            dev, dev_start = self.stripes[chunk % self.nr_stripes]
            yield dev, dev_start * SECTOR_SIZE + (chunk // self.nr_stripes) * chunk_bytes + within, pos, n
            pos += n

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.readinto(offset, memoryview(out))
        return bytes(out)

    def readinto(self, offset: int, out: memoryview) -> None:
        for dev, at, pos, n in self._pieces(offset, len(out)):
            dev.readinto(at, out[pos : pos + n])

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        for dev, at, pos, n in self._pieces(offset, len(data)):
            dev.write_fua(at, data[pos : pos + n], fua)

    def flush(self) -> None:
        for dev, _ in self.stripes:
            dev.flush()

    def _each(self, offset: int, length: int, op: Callable[[Lower, int, int], None]) -> None:
        for dev, at, _pos, n in self._pieces(offset, length):
            op(dev, at, n)

    def discard(self, offset: int, length: int) -> None:
        self._each(offset, length, lambda dev, at, n: dev.discard(at, n))

    def write_zeroes(self, offset: int, length: int, fua: bool, unmap: bool) -> None:
        self._each(offset, length, lambda dev, at, n: dev.write_zeroes(at, n, fua))

    def block_status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for dev, at, _pos, n in self._pieces(offset, length):
            out.extend(dev.block_status(at, n))
        return merge_extents(out)

    def table_params(self) -> str:
        devs = "".join(f" {dev.label} {offset}" for dev, offset in self.stripes)
        return f"{self.nr_stripes} {self.chunk}{devs}"

    def status_params(self, noflush: bool) -> str:
        names = "".join(f"{dev.label} " for dev, _ in self.stripes)
        return f"{self.nr_stripes} {names}1 {'A' * self.nr_stripes}"
