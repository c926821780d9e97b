"""Lower devices: what a table line names, opened for a target (the kernel's ``dm_get_device``).

Theory of operation
-------------------
A table names the devices under a target in one of four ways, and ``resolve`` turns each into an
opened ``Lower``:

* ``MAJOR:MINOR`` -- with our major (``DM_MAJOR``, 253) one of our own mapped devices (stacking);
  any other major a real block device, found through ``/sys/dev/block/MAJOR:MINOR``;
* ``/dev/mapper/NAME`` or ``/dev/dm-N`` -- one of our mapped devices, by name or minor;
* a block-device node such as ``/dev/loop0`` -- that device, shown in tables as ``7:0``;
* a regular file -- the file itself (our extension: the kernel wants block devices), shown in
  tables by its absolute path.  Relative paths are taken relative to the client's directory.

A ``Lower`` is a ``BlockDevice`` (so a pool can use it as metadata or data device) with the extras
targets need: FUA writes, discard, write-zeroes, hole queries, a table ``label`` (``7:0``, ``253:1``,
``/srv/data.img``), a ``devno`` for ``deps`` (None for files) and a ``key`` that says whether two
names mean the same device.  ``FileLower`` is a ``FileBlockDevice`` subclass, so the pool's data path
keeps its in-kernel copies and hole punching on files and loop devices; ``MappedLower`` forwards to a
mapped device through the ``Stackable`` protocol, which ``MappedDevice`` implements.

``limit`` caps the visible size: a pool sees exactly its table's length of the data device, as the
kernel's pool target does, however large the device.  ``reopen`` gives a second handle on the same
device (files through ``/proc/self/fd``, so a renamed or replaced path cannot swap the inode).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from devmapper.blockdev.file import FileBlockDevice
from devmapper.control.errors import DmError
from devmapper.errors import BlockDeviceError, DevmapperError
from devmapper.export import Extent
from devmapper.thin.data_device import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
)

__all__ = ["DM_MAJOR", "FileLower", "Lower", "MappedLower", "Stackable", "devno_label", "parse_devno", "resolve"]

DM_MAJOR = 253  # the major number of our mapped devices (the kernel's is dynamic; 253 is the usual one)
MAPPER_DIR = "/dev/mapper/"
SYS_DEV_BLOCK = Path("/sys/dev/block")
ZERO_CHUNK = 1 << 20
_DEVNO = re.compile(r"^(\d+):(\d+)$")
_DM_NODE = re.compile(r"^/dev/dm-(\d+)$")

Key = tuple[object, ...]
DevNo = tuple[int, int]


def devno_label(devno: DevNo) -> str:
    return f"{devno[0]}:{devno[1]}"


def parse_devno(text: str) -> DevNo | None:
    m = _DEVNO.match(text)
    return None if m is None else (int(m.group(1)), int(m.group(2)))


class Stackable(Protocol):
    """What a mapped device offers the devices stacked on it (``MappedDevice`` implements it)."""

    @property
    def name(self) -> str: ...

    @property
    def devno(self) -> DevNo: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def suspended(self) -> bool: ...

    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None: ...

    def block_status(self, offset: int, length: int) -> list[Extent]: ...

    def hold(self) -> None: ...

    def unhold(self) -> None: ...

    def io(self) -> AbstractContextManager[None]:
        """Enter the device's I/O gate (waits while it is suspended) for the duration of a request."""
        ...

    def single_target(self) -> object | None:
        """The target of a one-target live table, else None."""
        ...


class Lower(Protocol):
    """An opened lower device; see the module docstring."""

    label: str
    devno: DevNo | None
    key: Key
    read_only: bool
    limit: int | None

    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def readinto(self, offset: int, out: memoryview) -> None:
        """Fill out (a writable byte view) from offset: ``read`` without an intermediate ``bytes``."""
        ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def write_fua(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None: ...

    def block_status(self, offset: int, length: int) -> list[Extent]: ...

    def resize(self, new_size: int) -> None: ...

    def reopen(self, limit: int | None = None, counted: bool = False) -> Lower: ...

    def is_regular_file(self) -> bool: ...

    def close(self) -> None: ...


def _check_range(lower: Lower, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > lower.size():
        raise BlockDeviceError(f"{lower.label}: access [{offset}, {offset + length}) beyond end {lower.size()}")


class FileLower(FileBlockDevice):
    """A regular file or a real block device under a target."""

    def __init__(
        self,
        path: str,
        *,
        read_only: bool,
        label: str,
        devno: DevNo | None,
        key: Key,
        limit: int | None = None,
    ) -> None:
        super().__init__(path, read_only=read_only)
        self.label = label
        self.devno = devno
        self.key = key
        self.limit = limit

    def size(self) -> int:
        real = super().size()
        return real if self.limit is None else min(real, self.limit)

    def real_size(self) -> int:
        return super().size()

    def is_regular_file(self) -> bool:
        return not self.is_block_device

    def readinto(self, offset: int, out: memoryview) -> None:
        _check_range(self, offset, len(out))
        done = 0
        while done < len(out):
            try:
                n = os.preadv(self.fileno(), [out[done:]], offset + done)
            except OSError as e:
                raise BlockDeviceError(f"{self.label}: read at {offset + done}: {e.strerror}") from e
            if n <= 0:
                raise BlockDeviceError(f"{self.label}: short read at {offset + done}")
            done += n

    def write_fua(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        self.write(offset, data)
        if fua:
            self.flush()

    def discard(self, offset: int, length: int) -> None:
        """Deallocate the range (punch a hole; loop and other block devices discard).  Best effort."""
        _check_range(self, offset, length)
        if self.read_only or not length:
            return
        try:
            fallocate(self.fileno(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError:
            pass  # discard is advisory

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        _check_range(self, offset, length)
        if not length:
            return
        try:
            fallocate(self.fileno(), FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError:
            zeros = bytes(min(ZERO_CHUNK, length))
            pos, end = offset, offset + length
            while pos < end:
                n = min(len(zeros), end - pos)
                self.write(pos, memoryview(zeros)[:n])
                pos += n
        if fua:
            self.flush()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Holes of a sparse regular file (SEEK_HOLE/SEEK_DATA); block devices are all data."""
        _check_range(self, offset, length)
        if self.is_block_device or not length:
            return [Extent(length)] if length else []
        return _file_extents(self.fileno(), offset, offset + length)

    def reopen(self, limit: int | None = None, counted: bool = False) -> FileLower:
        return FileLower(
            f"/proc/self/fd/{self.fileno()}", read_only=self.read_only, label=self.label, devno=self.devno,
            key=self.key, limit=limit,
        )


def _file_extents(fd: int, begin: int, end: int) -> list[Extent]:
    out: list[Extent] = []
    pos = begin
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                out.append(Extent(end - pos, hole=True, zero=True))
                break
            return [Extent(end - begin)]
        if data > pos:
            hole_end = min(data, end)
            out.append(Extent(hole_end - pos, hole=True, zero=True))
            pos = hole_end
            continue
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        data_end = min(hole, end)
        out.append(Extent(data_end - pos))
        pos = data_end
    return out


class MappedLower:
    """One of our mapped devices under a target (a pool on linear devices, a linear on a thin...)."""

    def __init__(self, md: Stackable, *, read_only: bool, limit: int | None = None, counted: bool = True) -> None:
        self.md = md
        self.label = devno_label(md.devno)
        self.devno: DevNo | None = md.devno
        self.key: Key = ("dm", md.devno[1])
        self.read_only = read_only
        self.limit = limit
        self._counted = counted
        self._closed = False
        if counted:
            md.hold()

    def size(self) -> int:
        real = self.md.size()
        return real if self.limit is None else min(real, self.limit)

    def read(self, offset: int, length: int) -> bytes:
        _check_range(self, offset, length)
        return self.md.read(offset, length)

    def readinto(self, offset: int, out: memoryview) -> None:
        _check_range(self, offset, len(out))
        self.md.readinto(offset, out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.write_fua(offset, data, False)

    def write_fua(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        if self.read_only:
            raise DmError("EROFS", f"{self.label}: opened read-only")
        _check_range(self, offset, len(memoryview(data).cast("B")))
        self.md.write(offset, data, fua)

    def flush(self) -> None:
        self.md.flush()

    def discard(self, offset: int, length: int) -> None:
        _check_range(self, offset, length)
        try:
            self.md.discard(offset, length)
        except DevmapperError:
            pass  # advisory

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        _check_range(self, offset, length)
        self.md.write_zeroes(offset, length, fua)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        _check_range(self, offset, length)
        return self.md.block_status(offset, length)

    def resize(self, new_size: int) -> None:
        raise BlockDeviceError(f"{self.label}: a mapped device grows by loading a bigger table")

    def reopen(self, limit: int | None = None, counted: bool = False) -> MappedLower:
        return MappedLower(self.md, read_only=self.read_only, limit=limit, counted=counted)

    def is_regular_file(self) -> bool:
        return False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._counted:
                self.md.unhold()


# -- resolving names ---------------------------------------------------------------------------------


class MappedLookup(Protocol):
    def by_name(self, name: str) -> Stackable | None: ...

    def by_minor(self, minor: int) -> Stackable | None: ...


@dataclass(frozen=True, slots=True)
class _Found:
    path: str
    label: str
    devno: DevNo | None
    key: Key


def _lookup_failed(spec: str, why: str = "Device lookup failed", errno_name: str = "ENODEV") -> DmError:
    return DmError(errno_name, f"{why}: {spec}")


def _block_node(devno: DevNo) -> str | None:
    """The /dev node of a real block device number (udev's DEVNAME in sysfs, else a /dev scan)."""
    uevent = SYS_DEV_BLOCK / devno_label(devno) / "uevent"
    try:
        for line in uevent.read_text().splitlines():
            if line.startswith("DEVNAME="):
                node = "/dev/" + line.split("=", 1)[1]
                st = os.stat(node)
                if stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == devno:
                    return node
    except OSError:
        pass
    try:
        for entry in os.scandir("/dev"):
            st = entry.stat()
            if stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == devno:
                return entry.path
    except OSError:
        pass
    return None


def _find_path(spec: str, cwd: str | None) -> _Found:
    path = spec if os.path.isabs(spec) or cwd is None else os.path.join(cwd, spec)
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise _lookup_failed(spec, f"Device lookup failed ({e.strerror})") from None
    if stat.S_ISBLK(st.st_mode):
        devno = (os.major(st.st_rdev), os.minor(st.st_rdev))
        return _Found(path, devno_label(devno), devno, ("blk", devno))
    if stat.S_ISREG(st.st_mode):
        return _Found(path, path, None, ("file", st.st_dev, st.st_ino))
    raise _lookup_failed(spec, "Device lookup failed (not a block device or regular file)")


def resolve(
    spec: str, *, lookup: MappedLookup, read_only: bool, cwd: str | None = None, limit: int | None = None
) -> Lower:
    """Open the device a table names; raises ``DmError(ENODEV)`` when there is none."""
    mapped = _resolve_mapped(spec, lookup)
    if mapped is not None:
        return MappedLower(mapped, read_only=read_only, limit=limit)
    devno = parse_devno(spec)
    if devno is not None:
        node = _block_node(devno)
        if node is None:
            raise _lookup_failed(spec, errno_name="ENXIO")
        found = _Found(node, devno_label(devno), devno, ("blk", devno))
    else:
        found = _find_path(spec, cwd)
    try:
        return FileLower(found.path, read_only=read_only, label=found.label, devno=found.devno, key=found.key,
                         limit=limit)
    except BlockDeviceError as e:
        raise _lookup_failed(spec, f"Device lookup failed ({e})") from None


def _resolve_mapped(spec: str, lookup: MappedLookup) -> Stackable | None:
    """A mapped device named by ``253:N``, ``/dev/mapper/NAME`` or ``/dev/dm-N``; else None."""
    devno = parse_devno(spec)
    if devno is not None and devno[0] == DM_MAJOR:
        md = lookup.by_minor(devno[1])
        if md is None:
            raise _lookup_failed(spec, errno_name="ENXIO")
        return md
    if spec.startswith(MAPPER_DIR) and "/" not in spec[len(MAPPER_DIR):]:
        md = lookup.by_name(spec[len(MAPPER_DIR):])
        if md is None:
            raise _lookup_failed(spec)
        return md
    m = _DM_NODE.match(spec)
    if m is not None:
        md = lookup.by_minor(int(m.group(1)))
        if md is None:
            raise _lookup_failed(spec)
        return md
    return None
