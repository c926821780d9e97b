"""The target interface: one segment of a table, constructed from its arguments (``struct target_type``).

Theory of operation
-------------------
A table is a list of segments ``(start, length, target)``; the mapped device cuts each request at
segment boundaries and hands every piece to its target with *target-relative* byte offsets, as the
kernel's ``dm_target_offset`` does.  A target is built by its constructor from the argument words
of its table line (the kernel's ``ctr``), which opens the lower devices it names through the
``TargetContext`` and raises ``DmError`` with the kernel's reason (``ti->error``) on bad arguments.
Nothing a failed constructor opened stays open: the context closes it.

Life cycle, mirroring ``dm-table.c``: ``ctr`` at load; ``presuspend``/``postsuspend`` when the device
suspends; ``preresume``/``resume`` when a table goes live (the pool grows there); ``destroy`` when the
table is dropped (``dtr``).  ``table_params`` and ``status_params`` are the texts ``dmsetup table``
and ``dmsetup status`` print after ``<start> <length> <type> ``.

Flags: ``singleton`` targets must be alone in their table, ``immutable`` ones can only be replaced
by a table of the same type (both hold for ``thin-pool``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, ClassVar

from devmapper.control.errors import DmError
from devmapper.control.lower import Lower, MappedLookup, resolve
from devmapper.export import Extent
from devmapper.units import SECTOR_SIZE

if TYPE_CHECKING:
    from devmapper.control.pools import PoolRegistry

__all__ = ["Target", "TargetContext", "zero_fill"]

Version = tuple[int, int, int]
_ZEROS = bytes(1 << 20)


def zero_fill(out: memoryview) -> None:
    """Fill a writable byte view with zeroes (at most 1 MiB of zeroes at a time)."""
    for pos in range(0, len(out), len(_ZEROS)):
        n = min(len(_ZEROS), len(out) - pos)
        out[pos : pos + n] = _ZEROS[:n]


class TargetContext:
    """What a constructor may use: device lookup, the shared pools, the table's read-only flag.

    Lower devices are shared within one table (the kernel's per-table ``dm_dev`` list); ``lowers``
    lists them newest first, the order ``dmsetup deps`` prints.
    """

    def __init__(
        self,
        *,
        device_name: str,
        minor: int,
        lookup: MappedLookup,
        pools: PoolRegistry,
        read_only: bool,
        cwd: str | None,
    ) -> None:
        self.device_name = device_name
        self.minor = minor
        self.lookup = lookup
        self.pools = pools
        self.read_only = read_only
        self.cwd = cwd
        self._lowers: dict[object, Lower] = {}
        self._order: list[Lower] = []

    def open(self, spec: str) -> Lower:
        """Open (or share) the device a table argument names."""
        lower = resolve(spec, lookup=self.lookup, read_only=self.read_only, cwd=self.cwd)
        shared = self._lowers.get(lower.key)
        if shared is not None:
            lower.close()
            return shared
        self._lowers[lower.key] = lower
        self._order.insert(0, lower)
        return lower

    def open_private(self, spec: str, read_only: bool) -> Lower:
        """Open a device outside the shared list (an external origin, opened read-only)."""
        lower = resolve(spec, lookup=self.lookup, read_only=read_only or self.read_only, cwd=self.cwd)
        self._order.insert(0, lower)
        return lower

    @property
    def lowers(self) -> list[Lower]:
        return list(self._order)

    def close_all(self) -> None:
        for lower in self._order:
            lower.close()
        self._order.clear()
        self._lowers.clear()


class Target:
    """Base class of every target type; subclasses set ``type_name``/``version`` and override I/O."""

    type_name: ClassVar[str] = ""
    version: ClassVar[Version] = (0, 0, 0)
    singleton: ClassVar[bool] = False
    immutable: ClassVar[bool] = False

    def __init__(self, ctx: TargetContext, start: int, length: int, argv: list[str]) -> None:
        self.start = start
        self.length = length  # sectors
        self.name = ctx.device_name

    @property
    def size(self) -> int:
        return self.length * SECTOR_SIZE

    # -- I/O (offsets relative to the target, in bytes) --------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        raise DmError("EIO", f"{self.type_name}: I/O error")

    def read_token(self) -> object | None:
        """A value that changes whenever this target's bytes may have changed, or None when the
        target cannot tell (the default: its backing may be written behind our back)."""
        return None

    def readinto(self, offset: int, out: memoryview) -> None:
        """Fill out (a writable byte view) with the bytes at offset; targets that can read straight
        into it override this (the default copies what ``read`` returns)."""
        out[:] = self.read(offset, len(out))

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        raise DmError("EIO", f"{self.type_name}: I/O error")

    def write_target(self, offset: int, length: int) -> AbstractContextManager[memoryview | None]:
        """Where a write of [offset, offset + length) may be put straight into storage: a context
        yielding a writable view of it, held for the write, or None -- then use ``write`` (the
        default; thin targets over mapped, unshared blocks offer a view of the data file)."""
        return nullcontext(None)

    def flush(self) -> None:
        """Make completed writes durable."""

    def discard(self, offset: int, length: int) -> None:
        """Advisory; the default ignores it."""

    def write_zeroes(self, offset: int, length: int, fua: bool, unmap: bool) -> None:
        pos, end, chunk = offset, offset + length, bytes(min(length, 1 << 20))
        while pos < end:
            n = min(len(chunk), end - pos)
            self.write(pos, memoryview(chunk)[:n], False)
            pos += n
        if fua:
            self.flush()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(length)]

    # -- text ------------------------------------------------------------------------------------

    def table_params(self) -> str:
        return ""

    def status_params(self, noflush: bool) -> str:
        return ""

    def message(self, argv: list[str]) -> str | None:
        raise DmError("EINVAL", "Target type does not support messages")

    # -- life cycle ------------------------------------------------------------------------------

    def presuspend(self, noflush: bool) -> None:
        if not noflush:
            self.flush()

    def postsuspend(self) -> None:
        pass

    def preresume(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def destroy(self) -> None:
        pass
