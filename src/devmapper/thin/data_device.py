"""Data-device I/O for the pool: positional reads and writes, in-kernel copies, zeroing, hole punching.

Theory of operation
-------------------
The pool moves data only in three shapes: part of a block in place, a whole new block (data plus
zero padding, or data plus a copy of the old block), and "this block is free now" (discard
passdown).  On a ``FileBlockDevice`` (regular file or block-device node) those go straight to its
descriptor:

* reads with ``os.preadv`` into the caller's buffer (no intermediate ``bytes``);
* writes with ``os.pwritev``, one call for data and padding, ``RWF_DSYNC`` for FUA;
* copies with ``os.copy_file_range``, which stays in the kernel (and reflinks on XFS/btrfs);
* zeroing of large ranges and passdown with ``fallocate(2)`` (``ZERO_RANGE`` and
  ``PUNCH_HOLE``, both with ``KEEP_SIZE``) called through libc, because ``os.posix_fallocate``
  can only allocate.  A punched range of a sparse file stops counting in ``st_blocks``.

Any other ``BlockDevice`` (memory, fault-injecting) takes the portable path through ``read`` and
``write`` in chunks of at most ``CHUNK`` bytes, so a 1 GiB data block never becomes a 1 GiB Python
buffer.  A fast path that the kernel refuses (``EXDEV``, ``EOPNOTSUPP``...) is switched off for
good and the portable path is used instead.

Nothing here knows about mappings or locks; callers make sure the ranges they touch are theirs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
from collections.abc import Callable
from typing import Protocol, cast, runtime_checkable

from devmapper.blockdev.base import BlockDevice
from devmapper.blockdev.file import FileBlockDevice
from devmapper.errors import BlockDeviceError

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

CHUNK = 1 << 20  # largest Python buffer used for a copy or a zero write
ZERO_BY_FALLOCATE = 256 << 10  # zero ranges at least this long with fallocate(ZERO_RANGE)
ZEROS = memoryview(bytes(CHUNK))

# Errors that mean "this fast path is not available here", not "the device failed".
_UNSUPPORTED = frozenset({errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF, errno.ENOTTY})


@runtime_checkable
class Discardable(Protocol):
    def discard(self, offset: int, length: int) -> None: ...


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_fallocate = _load_fallocate()


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_PAGE = os.sysconf("SC_PAGE_SIZE")
_SYS_CACHESTAT = {"x86_64": 451, "aarch64": 451, "riscv64": 451}.get(os.uname().machine)


def _load_syscall() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "syscall", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_long
    return cast(Callable[..., int], fn)


_syscall = _load_syscall() if _SYS_CACHESTAT is not None else None


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError (ENOSYS when libc has no fallocate)."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class DataDevice:
    """The pool's data device (and, read-only, a thin volume's external origin)."""

    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.fd = dev.fileno() if isinstance(dev, FileBlockDevice) else -1
        self._copy_in_kernel = self.fd >= 0
        self._zero_range = self.fd >= 0
        self.can_punch = self.fd >= 0 or isinstance(dev, Discardable)
        self._cachestat = self.fd >= 0 and _syscall is not None
        self._mmap: mmap.mmap | None = None

    @property
    def name(self) -> str:
        return getattr(self.dev, "path", type(self.dev).__name__)

    def _error(self, what: str, offset: int, e: OSError) -> BlockDeviceError:
        return BlockDeviceError(f"{self.name}: {what} at byte {offset}: {e.strerror}")

    # -- reading and writing ---------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        """length bytes from offset as a new ``bytes`` (one copy, straight from the kernel)."""
        if self.fd < 0:
            return self.dev.read(offset, length)
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise self._error("read", offset, e) from e
        if len(data) != length:
            buf = bytearray(data) + bytearray(length - len(data))
            self.read_into(offset + len(data), memoryview(buf)[len(data) :])
            return bytes(buf)
        return data

    def cached(self, offset: int, length: int) -> bool:
        """Whether every page of the range is in the page cache now (``cachestat(2)``, Linux 6.5+;
        False where it is not available).  A write over cached pages allocates no new folios."""
        if not self._cachestat or length <= 0:
            return False
        assert _syscall is not None and _SYS_CACHESTAT is not None
        rng, st = _CachestatRange(offset, length), _Cachestat()
        if _syscall(_SYS_CACHESTAT, self.fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
            self._cachestat = False  # ENOSYS and friends: not here, do not ask again
            return False
        return int(st.nr_cache) >= (offset + length - 1) // _PAGE - offset // _PAGE + 1

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill buf from offset (buf lies within the device)."""
        if self.fd < 0:
            buf[:] = self.dev.read(offset, len(buf))
            return
        done = 0
        try:
            while done < len(buf):
                n = os.preadv(self.fd, [buf[done:]], offset + done)
                if n <= 0:
                    raise BlockDeviceError(f"{self.name}: short read at byte {offset + done}")
                done += n
        except OSError as e:
            raise self._error("read", offset + done, e) from e

    def write(self, offset: int, parts: list[memoryview], fua: bool = False) -> None:
        """Write the concatenation of parts at offset; with fua the data is durable on return."""
        if self.fd < 0:
            pos = offset
            for part in parts:
                self.dev.write(pos, part)
                pos += len(part)
            if fua:
                self.dev.flush()
            return
        flags = os.RWF_DSYNC if fua else 0
        try:
            while parts:
                n = os.pwritev(self.fd, parts, offset, flags)
                offset += n
                parts = _advance(parts, n)
        except OSError as e:
            raise self._error("write", offset, e) from e

    def zero(self, offset: int, length: int) -> None:
        """Make [offset, offset + length) read as zeroes."""
        if length >= ZERO_BY_FALLOCATE and self._zero_range:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise self._error("zero", offset, e) from e
                log.info("%s: fallocate(ZERO_RANGE) unsupported (%s); writing zeroes", self.name, e.strerror)
                self._zero_range = False
        end = offset + length
        while offset < end:
            n = min(CHUNK, end - offset)
            self.write(offset, [ZEROS[:n]])
            offset += n

    def copy_from(self, src: DataDevice, src_offset: int, dst_offset: int, length: int) -> None:
        """Copy length bytes from src (this device or another) without Python buffers when possible."""
        if length <= 0:
            return
        if self._copy_in_kernel and src.fd >= 0:
            try:
                while length > 0:
                    n = os.copy_file_range(src.fd, self.fd, length, src_offset, dst_offset)
                    if n <= 0:
                        raise BlockDeviceError(f"{src.name}: copy source ends at byte {src_offset}")
                    src_offset, dst_offset, length = src_offset + n, dst_offset + n, length - n
                return
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise self._error("copy", dst_offset, e) from e
                log.info("%s: copy_file_range unsupported (%s); copying through memory", self.name, e.strerror)
                self._copy_in_kernel = False
        buf = memoryview(bytearray(min(CHUNK, length)))
        while length > 0:
            n = min(len(buf), length)
            src.read_into(src_offset, buf[:n])
            self.write(dst_offset, [buf[:n]])
            src_offset, dst_offset, length = src_offset + n, dst_offset + n, length - n

    # -- discard and durability ------------------------------------------------------------------

    def punch(self, offset: int, length: int) -> bool:
        """Pass a discard down: deallocate the range (it reads as zeroes).  False if unsupported."""
        if not self.can_punch:
            return False
        if self.fd < 0:
            assert isinstance(self.dev, Discardable)
            self.dev.discard(offset, length)
            return True
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise self._error("punch hole", offset, e) from e
            log.warning("%s: cannot punch holes (%s); discard passdown disabled", self.name, e.strerror)
            self.can_punch = False
            return False
        return True

    def flush(self) -> None:
        try:
            self.dev.flush()
        except OSError as e:
            raise self._error("flush", 0, e) from e

    def size(self) -> int:
        return self.dev.size()

    def resize(self, new_size: int) -> None:
        self.dev.resize(new_size)

    def allocated_bytes(self) -> int | None:
        """Bytes the device really holds (st_blocks for files), or None if unknown."""
        if self.fd >= 0:
            return os.fstat(self.fd).st_blocks * 512
        fn = getattr(self.dev, "allocated_bytes", None)
        return int(fn()) if callable(fn) else None

    def mapped(self, offset: int, length: int) -> memoryview | None:
        """A writable view of [offset, offset + length) of the data file through a shared mmap, or
        None where there is no file descriptor (or mmap fails).  Bytes stored there are written as
        by ``write`` (the page cache is the same); the caller holds whatever makes the range its
        own.  The map covers the file as it is; a longer file is mapped again."""
        if self.fd < 0:
            return None
        m = self._mmap
        if m is None or offset + length > len(m):
            try:
                m = mmap.mmap(self.fd, 0)
            except (OSError, ValueError):
                return None
            self._mmap = m  # views of an older map keep it alive until they are released
        if offset + length > len(m):
            return None
        return memoryview(m)[offset : offset + length]

    def close(self) -> None:
        self._mmap = None
        self.dev.close()


def _advance(parts: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first n bytes of a buffer list (after a short pwritev)."""
    while parts and n >= len(parts[0]):
        n -= len(parts[0])
        parts = parts[1:]
    if parts and n:
        parts = [parts[0][n:], *parts[1:]]
    return parts
