"""The daemon's mapped devices as the NBD server's exports: one per device, named after it.

The NBD server looks exports up by name for GO, INFO and LIST alike and never closes what it looked
up, so a lookup hands out a *view* that does not count as an opener: ``udmsetup remove`` of a device
an NBD client is using succeeds (as with a kernel device whose only user is a remote client that has
not opened it), and the client's next request gets an error.  Each request goes to the device found
at lookup time.
"""

from __future__ import annotations

from devmapper.control.device import MappedDevice
from devmapper.control.manager import DeviceManager, DeviceRef
from devmapper.errors import DevmapperError
from devmapper.export import Export, Extent

Buffer = bytes | bytearray | memoryview


class DeviceView:
    """An ``Export`` over a mapped device that does not hold it open."""

    def __init__(self, md: MappedDevice) -> None:
        self._md = md

    @property
    def name(self) -> str:
        return self._md.name

    @property
    def read_only(self) -> bool:
        return self._md.read_only

    def size(self) -> int:
        return self._md.size()

    def read(self, offset: int, length: int) -> bytes:
        return self._md.read(offset, length)

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self._md.write(offset, data, fua)

    def flush(self) -> None:
        self._md.flush()

    def discard(self, offset: int, length: int) -> None:
        self._md.discard(offset, length)

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None:
        self._md.write_zeroes(offset, length, fua, unmap)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self._md.block_status(offset, length)

    def close(self) -> None:
        """Nothing to release: the view never opened the device."""


class DeviceExports:
    """``lookup(name)``/``list()`` over a ``DeviceManager``, the registry shape the NBD server takes."""

    def __init__(self, manager: DeviceManager) -> None:
        self.manager = manager

    def lookup(self, name: str) -> Export | None:
        try:
            md = self.manager.peek(DeviceRef(name))
        except DevmapperError:
            return None
        if md.live is None:  # no active table yet: nothing to serve
            return None
        return DeviceView(md)

    def list(self) -> list[str]:
        return [d.name for d in self.manager.list_devices() if d.live_table]
