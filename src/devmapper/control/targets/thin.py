"""The ``thin-pool`` and ``thin`` targets (``dm-thin.c``) over ``devmapper.thin``.

thin-pool ``<metadata dev> <data dev> <block sectors> <low water blocks> [<#features> <feature>...]``
    Runs the pool of the metadata device (shared across reloads, see ``pools.py``).  Its own I/O goes
    straight to the data device, as ``pool_map`` remaps bios.  Messages are the pool messages; a
    resumed table rebinds the pool (low water mark, features) and grows it to ``length / block``
    data blocks.  Suspending commits.  Singleton and immutable, like the kernel's.

thin ``<pool dev> <dev id> [<external origin dev>]``
    One thin device of the pool run by the mapped device ``<pool dev>`` (which must have a live
    thin-pool table and must not be suspended).  Requests also enter the pool device's I/O gate, so
    suspending the pool holds the thins' I/O too.  Holes are the unprovisioned blocks (zeroes unless
    an external origin shows through).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from devmapper.control.errors import DmError
from devmapper.control.lower import Lower, MappedLower, Stackable
from devmapper.control.pools import PoolEntry
from devmapper.control.targets.base import Target, TargetContext
from devmapper.errors import DeviceError, DevmapperError
from devmapper.export import Extent, errno_of, merge_extents
from devmapper.thin.pool import Pool, PoolMode
from devmapper.thin.status import PoolTable, ThinTable
from devmapper.thin.volume import ThinVolume
from devmapper.units import SECTOR_SIZE

__all__ = ["PoolTarget", "ThinTarget"]

R = TypeVar("R")
THIN_VERSION = (1, 23, 0)


def _dm_error(e: DevmapperError, prefix: str) -> DmError:
    """A pool error as the ioctl's answer: its own errno (ENOSPC for a full pool), else EIO."""
    if isinstance(e, DmError):
        return e
    return DmError(errno_of(e), f"{prefix}{e}")


class PoolTarget(Target):
    type_name = "thin-pool"
    version = THIN_VERSION
    singleton = True
    immutable = True

    def __init__(self, ctx: TargetContext, start: int, length: int, argv: list[str]) -> None:
        super().__init__(ctx, start, length, argv)
        try:
            parsed = PoolTable.parse(" ".join(argv))
        except DeviceError as e:
            raise DmError("EINVAL", f"thin-pool: {e}") from None
        if ctx.read_only and not parsed.features.read_only:
            raise DmError("EINVAL", "thin-pool: Error opening metadata block device (a read-only table needs the "
                                    "read_only feature)")
        meta = ctx.open(argv[0])
        data = ctx.open(argv[1])
        if meta.key == data.key:
            raise DmError("EINVAL", "thin-pool: Error setting metadata or data device")
        if data.size() < length * SECTOR_SIZE:
            dev_sectors = data.size() // SECTOR_SIZE
            raise DmError(
                "EINVAL", f"thin-pool: {data.label} too small for target: start=0, len={length}, dev_size={dev_sectors}"
            )
        self.meta, self.data = meta, data
        self.params = PoolTable(meta.label, data.label, parsed.data_block_size, parsed.low_water_mark, parsed.features)
        self._registry = ctx.pools
        self.entry: PoolEntry = ctx.pools.acquire(ctx.minor, ctx.device_name, meta, data, self.params, length)
        self._released = False

    @property
    def pool(self) -> Pool:
        return self.entry.pool

    # -- I/O: the pool device is its data device ---------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        return self.data.read(offset, length)

    def readinto(self, offset: int, out: memoryview) -> None:
        self.data.readinto(offset, out)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.data.write_fua(offset, data, fua)

    def flush(self) -> None:
        self.data.flush()

    def discard(self, offset: int, length: int) -> None:
        self.data.discard(offset, length)

    def write_zeroes(self, offset: int, length: int, fua: bool, unmap: bool) -> None:
        self.data.write_zeroes(offset, length, fua)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self.data.block_status(offset, length)

    # -- text and messages -----------------------------------------------------------------------

    def table_params(self) -> str:
        return self.params.format()

    def status_params(self, noflush: bool) -> str:
        return self.pool.status(noflush)

    def message(self, argv: list[str]) -> str | None:
        try:
            self.pool.message(" ".join(argv))
        except DevmapperError as e:
            raise _dm_error(e, "thin-pool: ") from e
        return None

    # -- life cycle ------------------------------------------------------------------------------

    def presuspend(self, noflush: bool) -> None:
        pass

    def postsuspend(self) -> None:
        """``pool_postsuspend``: commit what is outstanding."""
        if self.pool.mode < PoolMode.OUT_OF_METADATA_SPACE and not self.pool.closed:
            try:
                self.pool.commit()
            except DevmapperError:
                pass  # the pool changed mode and logged it

    def preresume(self) -> None:
        """``pool_preresume``: bind this table's parameters and grow to its length."""
        self.pool.rebind(self.params.low_water_mark, self.params.features)
        try:
            self.entry.data.limit = self.length * SECTOR_SIZE
            self.pool.resume()
        except DevmapperError as e:
            raise _dm_error(e, "thin-pool: ") from e

    def destroy(self) -> None:
        if not self._released:
            self._released = True
            self._registry.release(self.entry)


class ThinTarget(Target):
    type_name = "thin"
    version = THIN_VERSION

    def __init__(self, ctx: TargetContext, start: int, length: int, argv: list[str]) -> None:
        super().__init__(ctx, start, length, argv)
        try:
            parsed = ThinTable.parse(" ".join(argv))
        except DeviceError as e:
            raise DmError("EINVAL", f"thin: {e}") from None
        pool_lower = ctx.open(argv[0])
        self.pool_dev, self.pool_target = _find_pool(pool_lower)
        origin: Lower | None = None
        if parsed.origin_dev is not None:
            origin = ctx.open_private(parsed.origin_dev, read_only=True)
            if origin.key == pool_lower.key:
                raise DmError("EINVAL", "thin: Error setting origin device")
        self.origin = origin
        self.pool = self.pool_target.pool
        try:
            self.volume: ThinVolume = self.pool.open_thin(
                parsed.dev_id, length, None if origin is None else origin.reopen(), pool_dev=pool_lower.label,
                origin_dev=None if origin is None else origin.label,
            )
        except DevmapperError as e:
            errno_name = e.errno_name if isinstance(e, DeviceError) else "EINVAL"
            raise DmError(errno_name, f"thin: Couldn't open thin internal device ({e})") from e
        self.dev_id = parsed.dev_id

    def _io(self, op: Callable[[], R]) -> R:
        """Run op inside the pool device's I/O gate, with pool errors as ``DmError``."""
        with self.pool_dev.io():
            try:
                return op()
            except DmError:
                raise
            except DevmapperError as e:
                raise _dm_error(e, "thin: ") from e

    def read(self, offset: int, length: int) -> bytes:
        return self._io(lambda: self.volume.read(offset, length))

    def readinto(self, offset: int, out: memoryview) -> None:
        self._io(lambda: self.volume.readinto(offset, out))

    def read_token(self) -> object | None:
        """The thin's own (every writer of this thin id moves it); None with an external origin,
        whose device we do not watch."""
        return None if self.origin is not None else self.volume.read_token()

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._io(lambda: self.volume.write(offset, data, fua))

    @contextmanager
    def write_target(self, offset: int, length: int) -> Iterator[memoryview | None]:
        """``ThinVolume.write_target`` inside the pool device's I/O gate (a pool suspend waits for it)."""
        with self.pool_dev.io(), self.volume.write_target(offset, length) as view:
            yield view

    def flush(self) -> None:
        self._io(self.volume.flush)

    def discard(self, offset: int, length: int) -> None:
        self._io(lambda: self.volume.discard(offset, length))

    def write_zeroes(self, offset: int, length: int, fua: bool, unmap: bool) -> None:
        self._io(lambda: self.volume.write_zeroes(offset, length, fua, unmap))

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self._io(lambda: self._block_status(offset, length))

    def _block_status(self, offset: int, length: int) -> list[Extent]:
        bs = self.pool.block_bytes
        begin, end = offset // bs, -(-(offset + length) // bs)
        mapped = {v for v, _b, _t in self.pool.md.mappings(self.dev_id, begin, end)}
        hole_zero = self.origin is None
        out: list[Extent] = []
        for vblock in range(begin, end):
            lo, hi = max(offset, vblock * bs), min(offset + length, (vblock + 1) * bs)
            out.append(Extent(hi - lo) if vblock in mapped else Extent(hi - lo, hole=True, zero=hole_zero))
        return merge_extents(out)

    def table_params(self) -> str:
        return self.volume.table()

    def status_params(self, noflush: bool) -> str:
        return self.volume.status()

    def presuspend(self, noflush: bool) -> None:
        if noflush or self.pool_dev.suspended or self.pool.mode is PoolMode.FAIL:
            return
        try:
            self.volume.flush()
        except DevmapperError:
            pass  # the pool logged it; suspend must not fail on it

    def destroy(self) -> None:
        try:
            self.volume.close()
        except DevmapperError:
            pass


def _find_pool(lower: Lower) -> tuple[Stackable, PoolTarget]:
    """The running pool behind the mapped device a thin table names (``__pool_table_lookup``)."""
    if not isinstance(lower, MappedLower):
        raise DmError("EINVAL", "thin: Couldn't get pool mapped device")
    md = lower.md
    target = md.single_target()
    if not isinstance(target, PoolTarget):
        raise DmError("EINVAL", "thin: Couldn't find pool object")
    if md.suspended:
        raise DmError("EINVAL", "thin: Unable to activate thin device while pool is suspended")
    return md, target
