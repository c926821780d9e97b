"""The daemon's mapped devices as the NBD server's exports: one per device, named after it.

The NBD server looks exports up by name for GO, INFO and LIST alike and never closes what it looked
up, so a lookup hands out a *view* that does not count as an opener: ``udmsetup remove`` of a device
an NBD client is using succeeds (as with a kernel device whose only user is a remote client that has
not opened it), and the client's next request gets an error.  Each request goes to the device found
at lookup time.
"""

from __future__ import annotations

from devmapper.control.device import DeviceView
from devmapper.control.manager import DeviceManager, DeviceRef
from devmapper.errors import DevmapperError
from devmapper.export import Export


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
