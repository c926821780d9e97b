"""The ``zero`` and ``error`` targets.

* ``zero`` (``dm-zero.c``): reads return zeroes, writes and discards are accepted and dropped; it
  takes no arguments ("No arguments required").  Its extents are holes that read as zeroes.
* ``error`` (``dm-target.c``'s ``io_err``): every read and write fails with EIO; arguments are
  ignored, which is what ``dmsetup wipe_table`` and ``remove --force`` rely on.
"""

from __future__ import annotations

from devmapper.control.errors import DmError
from devmapper.control.targets.base import Target, TargetContext, zero_fill
from devmapper.export import Extent

__all__ = ["ErrorTarget", "ZeroTarget"]


class ZeroTarget(Target):
    type_name = "zero"
    version = (1, 2, 0)

    def __init__(self, ctx: TargetContext, start: int, length: int, argv: list[str]) -> None:
        if argv:
            raise DmError("EINVAL", "zero: No arguments required")
        super().__init__(ctx, start, length, argv)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def read_token(self) -> object | None:
        return 0  # always zeroes

    def readinto(self, offset: int, out: memoryview) -> None:
        zero_fill(out)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, fua: bool, unmap: bool) -> None:
        pass

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(length, hole=True, zero=True)]


class ErrorTarget(Target):
    type_name = "error"
    version = (1, 6, 0)

    def write_zeroes(self, offset: int, length: int, fua: bool, unmap: bool) -> None:
        raise DmError("EIO", "error: I/O error")

    def discard(self, offset: int, length: int) -> None:
        raise DmError("EIO", "error: I/O error")
