"""A fault-injecting wrapper: crash after write N, or lose writes that were never flushed.

Two failure models, usable together:

* ``fail_after_writes=N``: the first N writes reach the device; write N+1 and every later write or
  flush raise ``BlockDeviceError`` (power cut in the middle of a commit).
* ``volatile=True``: writes sit in a cache that only ``flush`` pushes down; ``crash()`` drops the
  cache, as a disk with a volatile write cache does on power loss.

Reads always see the newest data (cache first), like a real disk before the crash.
"""

from __future__ import annotations

from devmapper.blockdev.base import BlockDevice
from devmapper.errors import BlockDeviceError


class FaultyBlockDevice:
    def __init__(self, inner: BlockDevice, fail_after_writes: int | None = None, volatile: bool = False) -> None:
        self.inner = inner
        self.read_only = inner.read_only
        self.fail_after_writes = fail_after_writes
        self.volatile = volatile
        self.nr_writes = 0
        self.failed = False
        self._cache: dict[int, bytes] = {}  # offset -> data, in write order

    def size(self) -> int:
        return self.inner.size()

    def _tick(self) -> None:
        if self.failed:
            raise BlockDeviceError("injected fault: device is gone")
        if self.fail_after_writes is not None and self.nr_writes >= self.fail_after_writes:
            self.failed = True
            raise BlockDeviceError(f"injected fault at write {self.nr_writes + 1}")
        self.nr_writes += 1

    def read(self, offset: int, length: int) -> bytes:
        if self.failed:
            raise BlockDeviceError("injected fault: device is gone")
        data = bytearray(self.inner.read(offset, length))
        for off, cached in self._cache.items():
            lo, hi = max(off, offset), min(off + len(cached), offset + length)
            if lo < hi:
                data[lo - offset : hi - offset] = cached[lo - off : hi - off]
        return bytes(data)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._tick()
        if self.volatile:
            self._cache.pop(offset, None)
            self._cache[offset] = bytes(data)
        else:
            self.inner.write(offset, data)

    def flush(self) -> None:
        if self.failed:
            raise BlockDeviceError("injected fault: device is gone")
        for off, data in self._cache.items():
            self.inner.write(off, data)
        self._cache.clear()
        self.inner.flush()

    def crash(self) -> None:
        """Power loss: unflushed writes vanish and the device stops answering."""
        self._cache.clear()
        self.failed = True

    def resize(self, new_size: int) -> None:
        self.inner.resize(new_size)

    def close(self) -> None:
        self.inner.close()
