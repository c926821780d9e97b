"""The block interface every exported device offers (NBD, FUSE and the control socket speak to it).

Theory of operation
-------------------
An ``Export`` is one mapped device seen as a byte-addressed disk: a size, reads, writes with an
optional FUA bit, flush, discard (trim), write-zeroes, and a ``block_status`` query that tells
allocated data from holes, so an NBD server can answer ``base:allocation`` and a FUSE file can
report sparseness.  The control plane (``devmapper.control``) implements it for every mapped device
whatever its table (thin, linear, striped, zero, error, pool); the protocol adapters depend only on
this module, never on ``control`` or ``thin``.

Contract:

* Offsets and lengths are bytes; I/O must lie within ``[0, size())`` (else an error with errno
  ``EINVAL``).  ``size()`` can change between calls (a table reload grows a device).
* Errors are ``DevmapperError`` subclasses; ``errno_of`` names the errno an adapter should report
  (``EIO`` when the error does not say).  A write to a read-only export fails with ``EROFS``.
* ``flush`` makes every write that completed before it durable.  ``write(..., fua=True)`` is durable
  when it returns.
* ``discard`` is advisory: the range may read back as zeroes or as old data.  ``write_zeroes`` is
  not: the range reads back as zeroes afterwards; ``unmap=True`` lets the device deallocate.
* ``block_status`` returns extents covering exactly ``[offset, offset + length)`` in order; a hole
  is unallocated, a zero extent reads as zeroes (a hole usually is both).  Devices that cannot tell
  report one data extent.
* ``close`` releases the handle (the device's open count drops); the object is unusable after it.

Optional fast paths an adapter looks for with ``getattr`` (an export need not have them):
``readinto(offset, buf)`` fills a caller's buffer; ``read_token()`` returns a value that changes
whenever the export's bytes may have (None: cannot tell), so read-ahead can be trusted;
``write_target(offset, length)`` is a context manager yielding a writable view of the storage for a
write of that range (or None), held for the write while the view is in use.

Threading: an export may be called from several threads at once; each call is independent.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from devmapper.errors import DevmapperError, NoSpaceError

__all__ = ["Export", "Extent", "errno_of", "merge_extents"]


@dataclasses.dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with the same allocation state (NBD ``base:allocation`` flags)."""

    length: int
    hole: bool = False  # NBD_STATE_HOLE: not allocated
    zero: bool = False  # NBD_STATE_ZERO: reads as zeroes


class Export(Protocol):
    """One mapped device as a block device; see the module docstring for the contract."""

    @property
    def name(self) -> str: ...

    @property
    def read_only(self) -> bool: ...

    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None: ...

    def block_status(self, offset: int, length: int) -> list[Extent]: ...

    def close(self) -> None: ...


def errno_of(error: BaseException, default: str = "EIO") -> str:
    """The errno name an adapter should report for an error raised by an export."""
    if isinstance(error, DevmapperError):
        name = getattr(error, "errno_name", None)
        if isinstance(name, str) and name:
            return name
        if isinstance(error, NoSpaceError):
            return "ENOSPC"
    return default


def merge_extents(extents: list[Extent]) -> list[Extent]:
    """Join neighbours with the same flags and drop empty extents."""
    out: list[Extent] = []
    for e in extents:
        if e.length <= 0:
            continue
        if out and out[-1].hole == e.hole and out[-1].zero == e.zero:
            out[-1] = Extent(out[-1].length + e.length, e.hole, e.zero)
        else:
            out.append(e)
    return out
