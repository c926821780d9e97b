"""Mapped devices: a name, a device number, a live and an inactive table (``struct mapped_device``).

Theory of operation
-------------------
A ``Table`` is a list of constructed targets covering sectors ``[0, length)`` without gaps; the
device cuts every request at target boundaries and passes each piece to its target with offsets
relative to the target's start.  A device holds up to two tables: the *live* one serves I/O, the
*inactive* one was loaded and waits for ``resume`` to swap it in (``manager.py`` does the swap).

The I/O gate: every request enters the gate (``io()``), which waits while the device is suspended
and counts the request as in flight.  ``suspend`` closes the gate and waits until nothing is in
flight, then lets the targets flush (unless ``noflush``) and commit (``pre``/``postsuspend``), so a
suspended device has no I/O in progress and everything completed before it is durable -- what the
seeds rely on before ``create_snap``.  ``unsuspend`` opens the gate again.  A removed device's gate
stays shut and fails every request with ENXIO.

Open count: every table that names this device (live or inactive, of any device) and every export
handle counts once (``hold``/``unhold``), like the kernel's openers.  A device with openers cannot be
removed; with the deferred-remove flag it is removed when the count drops to zero (``on_idle``).

Events: ``event_nr`` counts table events (pool low water, mode changes, autoextend); ``wait_event``
blocks until it differs from the number the caller saw (``dmsetup wait``).

Reads: besides ``read`` a device offers ``readinto(offset, buf)``, which hands each target its slice
of the caller's buffer (``Target.readinto``: a thin target reads through ``ThinVolume.readinto``,
linear and striped ones ``preadv`` from their files, zero fills), so a large NBD read goes from the
page cache into the server's reply buffer with no intermediate ``bytes``.  A one-target ``read``
returns the target's own ``bytes`` without copying them.

``DeviceHandle`` is the ``Export`` an adapter gets: it forwards to the device and holds it open
until ``close``; ``DeviceView`` is the same without counting as an opener.  Both have ``readinto``.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from devmapper.control.errors import DmError
from devmapper.control.lower import DM_MAJOR, DevNo, Lower
from devmapper.control.table import TableLine
from devmapper.control.targets.base import Target
from devmapper.errors import DevmapperError
from devmapper.export import Export, Extent, merge_extents
from devmapper.units import SECTOR_SIZE

log = logging.getLogger(__name__)

__all__ = ["DeviceHandle", "DeviceInfo", "MappedDevice", "Table"]

Buffer = bytes | bytearray | memoryview
DEFAULT_READ_AHEAD = 256  # sectors


class Table:
    """Constructed targets in sector order and the lower devices they opened (newest first)."""

    def __init__(self, targets: list[Target], lowers: list[Lower], read_only: bool) -> None:
        self.targets = targets
        self.lowers = lowers
        self.read_only = read_only
        self._starts = [t.start for t in targets]

    @property
    def length(self) -> int:
        """Sectors covered."""
        return sum(t.length for t in self.targets)

    def lines(self) -> list[TableLine]:
        return [TableLine(t.start, t.length, t.type_name, t.table_params()) for t in self.targets]

    def pieces(self, offset: int, length: int) -> Iterator[tuple[Target, int, int, int]]:
        """(target, offset within target, position in request, length) for a byte range."""
        pos = 0
        index = max(0, bisect.bisect_right(self._starts, offset // SECTOR_SIZE) - 1)
        while pos < length:
            target = self.targets[index]
            base = target.start * SECTOR_SIZE
            within = offset + pos - base
            n = min(target.size - within, length - pos)
            if n > 0:
                yield target, within, pos, n
                pos += n
            index += 1

    def deps(self) -> list[Lower]:
        return list(self.lowers)

    def destroy(self) -> None:
        """Destroy every target, then close the lower devices (``dm_table_destroy``)."""
        for target in self.targets:
            try:
                target.destroy()
            except DevmapperError:
                log.exception("destroying a %s target failed", target.type_name)
        for lower in self.lowers:
            lower.close()


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What ``dmsetup info`` shows about a device."""

    name: str
    uuid: str
    major: int
    minor: int
    suspended: bool
    read_only: bool
    deferred_remove: bool
    live_table: bool
    inactive_table: bool
    open_count: int
    event_nr: int
    target_count: int
    read_ahead: int


class MappedDevice:
    """One mapped device; thread-safe.  Control operations come from ``DeviceManager`` only."""

    def __init__(self, name: str, uuid: str, minor: int, *, read_only: bool = False,
                 read_ahead: int = DEFAULT_READ_AHEAD) -> None:
        self._name = name
        self.uuid = uuid
        self.minor = minor
        self.flag_read_only = read_only
        self.read_ahead = read_ahead
        self.live: Table | None = None
        self.inactive: Table | None = None
        self.deferred_remove = False
        self.on_idle: Callable[[MappedDevice], None] | None = None
        self._gate = threading.Condition()
        self._suspended = False
        self._dead = False
        self._in_flight = 0
        self._holders = 0
        self._events = threading.Condition()
        self.event_nr = 0

    # -- identity --------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    def rename(self, name: str) -> None:
        self._name = name

    @property
    def devno(self) -> DevNo:
        return (DM_MAJOR, self.minor)

    @property
    def read_only(self) -> bool:
        return self.flag_read_only or (self.live is not None and self.live.read_only)

    @property
    def suspended(self) -> bool:
        return self._suspended

    @property
    def open_count(self) -> int:
        return self._holders

    def info(self) -> DeviceInfo:
        return DeviceInfo(
            name=self._name, uuid=self.uuid, major=DM_MAJOR, minor=self.minor, suspended=self._suspended,
            read_only=self.read_only, deferred_remove=self.deferred_remove, live_table=self.live is not None,
            inactive_table=self.inactive is not None, open_count=self._holders, event_nr=self.event_nr,
            target_count=0 if self.live is None else len(self.live.targets), read_ahead=self.read_ahead,
        )

    def single_target(self) -> object | None:
        table = self.live
        return table.targets[0] if table is not None and len(table.targets) == 1 else None

    # -- openers ---------------------------------------------------------------------------------

    def hold(self) -> None:
        with self._gate:
            self._holders += 1

    def unhold(self) -> None:
        with self._gate:
            self._holders -= 1
            idle = self._holders == 0 and self.deferred_remove and not self._dead
        if idle and self.on_idle is not None:
            self.on_idle(self)

    def open_handle(self) -> DeviceHandle:
        """An ``Export`` on this device that counts as an opener until closed."""
        return DeviceHandle(self)

    # -- the I/O gate ----------------------------------------------------------------------------

    @contextmanager
    def io(self) -> Iterator[None]:
        with self._gate:
            while self._suspended and not self._dead:
                self._gate.wait()
            if self._dead:
                raise DmError("ENXIO", f"{self._name}: device removed")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._gate:
                self._in_flight -= 1
                if not self._in_flight:
                    self._gate.notify_all()

    def _block_io(self) -> None:
        with self._gate:
            self._suspended = True
            while self._in_flight:
                self._gate.wait()

    def suspend(self, noflush: bool) -> None:
        """Hold new I/O, wait for what is in flight, then let the targets flush and commit."""
        if self._suspended:
            return
        self._block_io()
        if self.live is not None:
            for target in self.live.targets:
                target.presuspend(noflush)
            for target in self.live.targets:
                target.postsuspend()

    def unsuspend(self) -> None:
        with self._gate:
            self._suspended = False
            self._gate.notify_all()

    def kill(self) -> None:
        """Removed: fail all future I/O; wakes waiters."""
        self._block_io()
        with self._gate:
            self._dead = True
            self._gate.notify_all()
        self.bump_event()

    # -- events ----------------------------------------------------------------------------------

    def bump_event(self) -> None:
        with self._events:
            self.event_nr += 1
            self._events.notify_all()

    def wait_event(self, event_nr: int, timeout: float | None) -> bool:
        """Wait until the event number differs from event_nr; False on timeout."""
        with self._events:
            return self._events.wait_for(lambda: self.event_nr != event_nr or self._dead, timeout)

    # -- I/O -------------------------------------------------------------------------------------

    def _live(self, offset: int, length: int) -> Table:
        table = self.live
        if table is None:
            raise DmError("ENXIO", f"{self._name}: no table loaded")
        size = table.length * SECTOR_SIZE
        if offset < 0 or length < 0 or offset + length > size:
            raise DmError("EINVAL", f"{self._name}: I/O [{offset}, {offset + length}) beyond the end ({size})")
        return table

    def size(self) -> int:
        table = self.live
        return 0 if table is None else table.length * SECTOR_SIZE

    def read(self, offset: int, length: int) -> bytes:
        with self.io():
            table = self._live(offset, length)
            pieces = list(table.pieces(offset, length))
            if len(pieces) == 1:
                target, within, _pos, n = pieces[0]
                return target.read(within, n)
            out = bytearray(length)
            view = memoryview(out)
            for target, within, pos, n in pieces:
                target.readinto(within, view[pos : pos + n])
            return bytes(out)

    def read_token(self) -> object | None:
        """A value that changes whenever the device's bytes may have: the live table (a swap
        changes it) and each target's own token; None when suspended, without a table, or when a
        target cannot tell.  The NBD server serves read-ahead only while it is unchanged."""
        table = self.live
        if table is None or self._suspended:
            return None
        tokens = []
        for target in table.targets:
            token = target.read_token()
            if token is None:
                return None
            tokens.append(token)
        return table, id(table), tuple(tokens)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill buf with the bytes at offset; each target reads straight into its part of it."""
        out = memoryview(buf).cast("B")
        with self.io():
            for target, within, pos, n in self._live(offset, len(out)).pieces(offset, len(out)):
                target.readinto(within, out if n == len(out) else out[pos : pos + n])

    def _check_writable(self) -> None:
        if self.read_only:
            raise DmError("EROFS", f"{self._name}: device is read-only")

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        mv = memoryview(data).cast("B")
        with self.io():
            self._check_writable()
            table = self._live(offset, len(mv))
            for target, within, pos, n in table.pieces(offset, len(mv)):
                target.write(within, mv[pos : pos + n], fua)

    @contextmanager
    def write_target(self, offset: int, length: int) -> Iterator[memoryview | None]:
        """Where a write of [offset, offset + length) may be put straight into storage (the NBD
        server's direct writes): the target's own ``write_target`` when one target holds the whole
        range, else None.  Held as I/O in flight, so a suspend waits until the caller is done."""
        with self.io():
            self._check_writable()
            pieces = list(self._live(offset, length).pieces(offset, length))
            if len(pieces) != 1:
                yield None
                return
            target, within, _pos, n = pieces[0]
            with target.write_target(within, n) as view:
                yield view

    def flush(self) -> None:
        with self.io():
            for target in self._live(0, 0).targets:
                target.flush()

    def discard(self, offset: int, length: int) -> None:
        with self.io():
            self._check_writable()
            for target, within, _pos, n in self._live(offset, length).pieces(offset, length):
                target.discard(within, n)

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None:
        with self.io():
            self._check_writable()
            for target, within, _pos, n in self._live(offset, length).pieces(offset, length):
                target.write_zeroes(within, n, fua, unmap)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        with self.io():
            out: list[Extent] = []
            for target, within, _pos, n in self._live(offset, length).pieces(offset, length):
                out.extend(target.block_status(within, n))
            return merge_extents(out)


class DeviceView:
    """An ``Export`` over a mapped device that does not count as an opener (NBD lookups, FUSE files)."""

    def __init__(self, md: MappedDevice) -> None:
        self._md = md

    @property
    def name(self) -> str:
        return self._md.name

    @property
    def read_only(self) -> bool:
        return self._md.read_only

    def _dev(self) -> MappedDevice:
        return self._md

    def size(self) -> int:
        return self._dev().size()

    def read(self, offset: int, length: int) -> bytes:
        return self._dev().read(offset, length)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill buf from offset (the NBD server's copy-saving path for large reads)."""
        self._dev().readinto(offset, buf)

    def read_token(self) -> object | None:
        """See ``MappedDevice.read_token`` (the NBD server's read-ahead checks it)."""
        return self._dev().read_token()

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self._dev().write(offset, data, fua)

    def write_target(self, offset: int, length: int) -> AbstractContextManager[memoryview | None]:
        """See ``MappedDevice.write_target`` (the NBD server receives large WRITEs straight into it)."""
        return self._dev().write_target(offset, length)

    def flush(self) -> None:
        self._dev().flush()

    def discard(self, offset: int, length: int) -> None:
        self._dev().discard(offset, length)

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None:
        self._dev().write_zeroes(offset, length, fua, unmap)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self._dev().block_status(offset, length)

    def close(self) -> None:
        """Nothing to release: the view never opened the device."""


class DeviceHandle(DeviceView):
    """An opened mapped device (``Export``): counts as an opener until ``close``."""

    def __init__(self, md: MappedDevice) -> None:
        super().__init__(md)
        self._closed = False
        md.hold()

    def _dev(self) -> MappedDevice:
        if self._closed:
            raise DmError("EBADF", "device handle is closed")
        return self._md

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._md.unhold()


_IMPLEMENTS: type[Export] = DeviceHandle  # checked by mypy: a handle is an Export
