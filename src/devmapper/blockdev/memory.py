"""An in-memory block device: sparse 64 KiB pages, zero where never written."""

from __future__ import annotations

from devmapper.errors import BlockDeviceError, ReadOnlyError

_PAGE = 65536


class MemoryBlockDevice:
    """Sparse RAM-backed device of a fixed (resizable) size.  Flush is a no-op: memory never crashes;
    wrap it in ``FaultyBlockDevice`` to model a volatile cache."""

    def __init__(self, size: int, read_only: bool = False) -> None:
        self._size = size
        self._pages: dict[int, bytearray] = {}
        self.read_only = read_only
        self.nr_writes = 0

    def size(self) -> int:
        return self._size

    def _bounds(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise BlockDeviceError(f"access [{offset}, {offset + length}) beyond device end {self._size}")

    def read(self, offset: int, length: int) -> bytes:
        self._bounds(offset, length)
        out = bytearray(length)
        pos = 0
        while pos < length:
            page, within = divmod(offset + pos, _PAGE)
            n = min(_PAGE - within, length - pos)
            data = self._pages.get(page)
            if data is not None:
                out[pos : pos + n] = data[within : within + n]
            pos += n
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.read_only:
            raise ReadOnlyError("memory device is read-only")
        mv = memoryview(data).cast("B")
        self._bounds(offset, len(mv))
        pos = 0
        while pos < len(mv):
            page, within = divmod(offset + pos, _PAGE)
            n = min(_PAGE - within, len(mv) - pos)
            buf = self._pages.get(page)
            if buf is None:
                buf = self._pages[page] = bytearray(_PAGE)
            buf[within : within + n] = mv[pos : pos + n]
            pos += n
        self.nr_writes += 1

    def discard(self, offset: int, length: int) -> None:
        """Forget whole pages inside the range and zero partial ones (reads return zeroes)."""
        self._bounds(offset, length)
        end = offset + length
        pos = offset
        while pos < end:
            page, within = divmod(pos, _PAGE)
            n = min(_PAGE - within, end - pos)
            if n == _PAGE:
                self._pages.pop(page, None)
            elif page in self._pages:
                self._pages[page][within : within + n] = bytes(n)
            pos += n

    def flush(self) -> None:
        pass

    def resize(self, new_size: int) -> None:
        if new_size < self._size:
            for page in [p for p in self._pages if p * _PAGE >= new_size]:
                del self._pages[page]
        self._size = new_size

    def allocated_bytes(self) -> int:
        return len(self._pages) * _PAGE

    def close(self) -> None:
        pass
