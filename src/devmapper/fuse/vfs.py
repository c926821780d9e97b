"""What mapped devices look like as files: one flat directory, one regular file per device.

Theory of operation
-------------------
``DeviceTree`` maps file names to ``Export`` objects.  Every file is a regular file whose size is
the export's current ``size()`` (asked on every ``getattr``, so a grown table shows at once -- the
adapter mounts with zero attribute timeouts).  Reads past the end are short, writes past the end
fail with ``ENOSPC`` (a block device cannot grow by writing), ``fsync`` is ``flush``.  Errors from an
export become ``VfsError`` carrying the errno the adapter returns (``errno_of``).

The tree never imports a FUSE binding and never talks to the control plane: the control plane adds
and removes entries (``add``/``remove``/``rename``), the adapter turns FUSE callbacks into calls
here.  All methods are thread-safe; I/O runs outside the tree's lock, on the caller's thread, so a
suspended device blocks only the requests that touch it.
"""

from __future__ import annotations

import dataclasses
import errno
import stat
import threading

from devmapper.errors import DevmapperError
from devmapper.export import Export, errno_of

__all__ = ["DeviceTree", "FileAttr", "FileSource", "VfsError"]

FileSource = Export  # what a file shows (the adapter names it through this module)


class VfsError(OSError):
    """An error to report to the kernel: ``errno`` is set."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, message or errno.errorcode.get(code, "error"))


def _errno_value(error: BaseException) -> int:
    return int(getattr(errno, errno_of(error), errno.EIO))


@dataclasses.dataclass(frozen=True, slots=True)
class FileAttr:
    ino: int
    mode: int
    size: int
    nlink: int


class DeviceTree:
    """The flat directory of device files; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, tuple[int, Export]] = {}
        self._next_ino = 2
        self._opens: dict[str, int] = {}

    # -- the control plane's side ----------------------------------------------------------------

    def add(self, name: str, export: Export) -> None:
        with self._lock:
            if name in self._files:
                raise VfsError(errno.EEXIST, name)
            self._files[name] = (self._next_ino, export)
            self._next_ino += 1

    def remove(self, name: str) -> Export | None:
        with self._lock:
            entry = self._files.pop(name, None)
            self._opens.pop(name, None)
        return None if entry is None else entry[1]

    def rename(self, old: str, new: str) -> None:
        with self._lock:
            if new in self._files:
                raise VfsError(errno.EEXIST, new)
            entry = self._files.pop(old, None)
            if entry is not None:
                self._files[new] = entry
                if old in self._opens:
                    self._opens[new] = self._opens.pop(old)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._files)

    def open_count(self, name: str) -> int:
        with self._lock:
            return self._opens.get(name, 0)

    # -- the adapter's side ----------------------------------------------------------------------

    def _export(self, name: str) -> Export:
        with self._lock:
            entry = self._files.get(name)
        if entry is None:
            raise VfsError(errno.ENOENT, name)
        return entry[1]

    def root_attr(self) -> FileAttr:
        with self._lock:
            count = len(self._files)
        return FileAttr(ino=1, mode=stat.S_IFDIR | 0o755, size=count, nlink=2)

    def attr(self, name: str) -> FileAttr:
        with self._lock:
            entry = self._files.get(name)
        if entry is None:
            raise VfsError(errno.ENOENT, name)
        ino, export = entry
        mode = stat.S_IFREG | (0o400 if export.read_only else 0o600)
        return FileAttr(ino=ino, mode=mode, size=export.size(), nlink=1)

    def open(self, name: str, writable: bool) -> None:
        export = self._export(name)
        if writable and export.read_only:
            raise VfsError(errno.EROFS, name)
        with self._lock:
            self._opens[name] = self._opens.get(name, 0) + 1

    def release(self, name: str) -> None:
        with self._lock:
            if self._opens.get(name, 0) > 0:
                self._opens[name] -= 1

    def read(self, name: str, offset: int, length: int) -> bytes:
        export = self._export(name)
        try:
            size = export.size()
            if offset >= size or length <= 0:
                return b""
            return export.read(offset, min(length, size - offset))
        except DevmapperError as e:
            raise VfsError(_errno_value(e), str(e)) from e

    def write(self, name: str, offset: int, data: bytes) -> int:
        export = self._export(name)
        try:
            if offset + len(data) > export.size():
                raise VfsError(errno.ENOSPC, f"{name}: write beyond the end of the device")
            export.write(offset, data)
        except DevmapperError as e:
            raise VfsError(_errno_value(e), str(e)) from e
        return len(data)

    def fsync(self, name: str) -> None:
        export = self._export(name)
        try:
            if export.size():
                export.flush()
        except DevmapperError as e:
            raise VfsError(_errno_value(e), str(e)) from e

    def truncate(self, name: str, length: int) -> None:
        """Only a no-op truncate is allowed (O_TRUNC on an empty device, or to the same size)."""
        if self._export(name).size() != length:
            raise VfsError(errno.EPERM, f"{name}: resize the device with a table reload")
