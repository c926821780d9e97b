"""``MemoryExport``: an in-memory ``Export`` that tracks holes, for NBD tests.

Allocation is tracked per ``grain`` bytes (4 KiB by default): a write allocates the grains it
touches; ``discard`` and ``write_zeroes(unmap=True)`` deallocate the grains they cover whole (which
then read as zeroes, so a hole is also a zero extent); ``write_zeroes(unmap=False)`` allocates.
Calls are counted (``calls``) and an error can be injected per operation (``fail``, after
``fail_skip`` successful calls).  ``readinto`` is the optional fast read path the server uses for
large reads.
"""

from __future__ import annotations

import collections
import threading

from devmapper.errors import DeviceError
from devmapper.export import Extent, merge_extents


class MemoryExport:
    def __init__(
        self, size: int, name: str = "mem", *, read_only: bool = False, grain: int = 4096, description: str = ""
    ) -> None:
        self._name = name
        self._read_only = read_only
        self.description = description
        self.grain = grain
        self.data = bytearray(size)
        self.allocated = bytearray(-(-size // grain))  # 1 per allocated grain
        self.calls: collections.Counter[str] = collections.Counter()
        self.fail: dict[str, str] = {}  # operation -> errno name raised by its next call ...
        self.fail_skip: collections.Counter[str] = collections.Counter()  # ... after this many calls pass
        self.closed = False
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def read_only(self) -> bool:
        return self._read_only

    def size(self) -> int:
        return len(self.data)

    def _enter(self, op: str, offset: int, length: int, write: bool = False) -> None:
        self.calls[op] += 1
        if op in self.fail and self.fail_skip[op] > 0:
            self.fail_skip[op] -= 1
        elif op in self.fail:
            name = self.fail.pop(op)
            raise DeviceError(f"injected {name} in {op}", name)
        if write and self._read_only:
            raise DeviceError("read-only export", "EROFS")
        if offset < 0 or length < 0 or offset + length > len(self.data):
            raise DeviceError(f"[{offset}, {offset + length}) is beyond the end", "EINVAL")

    def _mark(self, offset: int, length: int, value: int, whole_only: bool) -> None:
        g = self.grain
        if whole_only:
            first, last = -(-offset // g), (offset + length) // g
            if offset + length == len(self.data):
                last = len(self.allocated)
        else:
            first, last = offset // g, -(-(offset + length) // g)
        for i in range(first, last):
            self.allocated[i] = value
            if not value:
                self.data[i * g : (i + 1) * g] = bytes(len(self.data[i * g : (i + 1) * g]))

    def read(self, offset: int, length: int) -> bytes:
        self._enter("read", offset, length)
        return bytes(self.data[offset : offset + length])

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """The optional fast path the NBD server uses for large reads."""
        self._enter("readinto", offset, len(buf))
        memoryview(buf)[:] = self.data[offset : offset + len(buf)]

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        mv = memoryview(data).cast("B")
        self._enter("write", offset, len(mv), write=True)
        with self._lock:
            self.data[offset : offset + len(mv)] = mv
            if len(mv):
                self._mark(offset, len(mv), 1, False)
            if fua:
                self.calls["fua"] += 1

    def flush(self) -> None:
        self._enter("flush", 0, 0)

    def discard(self, offset: int, length: int) -> None:
        self._enter("discard", offset, length, write=True)
        with self._lock:
            self._mark(offset, length, 0, True)

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None:
        self._enter("write_zeroes", offset, length, write=True)
        with self._lock:
            self.data[offset : offset + length] = bytes(length)
            if unmap:
                self._mark(offset, length, 0, True)
            elif length:
                self._mark(offset, length, 1, False)
            if fua:
                self.calls["fua"] += 1

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self._enter("block_status", offset, length)
        g, out, pos, end = self.grain, [], offset, offset + length
        while pos < end:
            i = pos // g
            n = min((i + 1) * g, end) - pos
            hole = not self.allocated[i]
            out.append(Extent(n, hole=hole, zero=hole))
            pos += n
        return merge_extents(out)

    def close(self) -> None:
        self.closed = True

    def holes(self) -> list[tuple[int, int, bool]]:
        """(offset, length, hole) runs over the whole export."""
        out, pos = [], 0
        for e in self.block_status(0, len(self.data)) if self.data else []:
            out.append((pos, e.length, e.hole))
            pos += e.length
        return out
