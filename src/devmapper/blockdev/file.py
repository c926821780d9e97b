"""A block device over a regular file (sparse or not) or a real block device node."""

from __future__ import annotations

import os
import stat

from devmapper.errors import BlockDeviceError, ReadOnlyError


class FileBlockDevice:
    """pread/pwrite on a file descriptor; ``flush`` is fdatasync.

    Regular files can be resized (truncate) and have holes punched for discard; block device nodes
    report their size with lseek(SEEK_END) and cannot be resized here.
    """

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False, exclusive: bool = False) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if exclusive:
            flags |= os.O_EXCL
        try:
            self._fd = os.open(self.path, flags | os.O_CLOEXEC)
        except OSError as e:
            raise BlockDeviceError(f"{self.path}: {e.strerror}") from e
        mode = os.fstat(self._fd).st_mode
        self.is_block_device = stat.S_ISBLK(mode)
        if not (self.is_block_device or stat.S_ISREG(mode)):
            os.close(self._fd)
            raise BlockDeviceError(f"{self.path}: not a regular file or block device")

    def fileno(self) -> int:
        return self._fd

    def size(self) -> int:
        if self.is_block_device:
            return os.lseek(self._fd, 0, os.SEEK_END)
        return os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size():
            raise BlockDeviceError(f"{self.path}: read [{offset}, {offset + length}) beyond end {self.size()}")
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as e:
            raise BlockDeviceError(f"{self.path}: read at {offset}: {e.strerror}") from e
        if len(data) != length:
            raise BlockDeviceError(f"{self.path}: short read at {offset} ({len(data)} of {length})")
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.path}: opened read-only")
        n = len(memoryview(data).cast("B"))
        if offset < 0 or offset + n > self.size():
            raise BlockDeviceError(f"{self.path}: write [{offset}, {offset + n}) beyond end {self.size()}")
        try:
            done = os.pwrite(self._fd, data, offset)
        except OSError as e:
            raise BlockDeviceError(f"{self.path}: write at {offset}: {e.strerror}") from e
        if done != n:
            raise BlockDeviceError(f"{self.path}: short write at {offset}")

    def flush(self) -> None:
        if not self.read_only:
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                raise BlockDeviceError(f"{self.path}: flush: {e.strerror}") from e

    def resize(self, new_size: int) -> None:
        if self.is_block_device:
            raise BlockDeviceError(f"{self.path}: cannot resize a block device")
        if self.read_only:
            raise ReadOnlyError(f"{self.path}: opened read-only")
        os.ftruncate(self._fd, new_size)

    def allocated_bytes(self) -> int:
        return os.fstat(self._fd).st_blocks * 512

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
