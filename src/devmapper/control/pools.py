"""Running pools shared by the tables that name them (the kernel's ``dm_thin_pool_table``).

Theory of operation
-------------------
A ``Pool`` belongs to its metadata device, not to a table: reloading a thin-pool table (to grow the
data device, change the low water mark...) binds the *same* pool to the new table, so thin volumes
and their open state survive the reload.  ``acquire`` finds the pool by the metadata device's key or
opens it (``Pool.open`` formats all-zero metadata); ``release`` drops a table's reference and closes
the pool when the last one goes.  The kernel's ``__pool_find`` rules apply: the same metadata device
with a different data device is refused, and so is a second pool device for one metadata device.

A pool sees its data device through a private ``Lower`` capped at the table length (``limit``), so
``<len> / <block size>`` is the number of data blocks, as in the kernel; ``grow`` raises the cap and
lets the pool pick the new blocks up (``Pool.resume``).  Its metadata device is a second private
handle on the whole device.  Neither private handle counts as an opener: the tables' own handles do.

Pool events go to one callback with the pool's key; the manager turns them into device events and
autoextend checks.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

from devmapper.control.errors import DmError
from devmapper.control.lower import Key, Lower
from devmapper.errors import DeviceError, DevmapperError
from devmapper.thin.pool import Pool, PoolEvent
from devmapper.thin.status import PoolTable
from devmapper.units import SECTOR_SIZE

log = logging.getLogger(__name__)

__all__ = ["PoolEntry", "PoolRegistry"]

EventSink = Callable[[Key, PoolEvent], None]


@dataclasses.dataclass(eq=False)
class PoolEntry:
    """One running pool and what it was opened with."""

    key: Key
    pool: Pool
    data_key: Key
    owner: int  # minor of the mapped device that runs it
    metadata: Lower
    data: Lower
    block_sectors: int
    refs: int = 1


class PoolRegistry:
    def __init__(self, on_event: EventSink | None = None, *, no_space_timeout: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._pools: dict[Key, PoolEntry] = {}
        self._on_event = on_event
        self.no_space_timeout = no_space_timeout

    def acquire(self, owner: int, name: str, meta: Lower, data: Lower, table: PoolTable, length: int) -> PoolEntry:
        """The pool of this metadata device, opened if needed; raises ``DmError`` as ``pool_ctr`` would."""
        with self._lock:
            entry = self._pools.get(meta.key)
            if entry is not None:
                self._check_shared(entry, owner, data, table, length)
                entry.refs += 1
                return entry
            for other in self._pools.values():
                if other.owner == owner:
                    raise DmError("EINVAL", "thin-pool: different pool cannot replace a pool")
                if data.key in (other.data_key, other.key) or meta.key == other.data_key:
                    raise DmError("EBUSY", "thin-pool: data device already in use by a different pool")
            entry = self._open(owner, name, meta, data, table, length)
            self._pools[meta.key] = entry
            return entry

    def _check_shared(self, entry: PoolEntry, owner: int, data: Lower, table: PoolTable, length: int) -> None:
        if entry.owner != owner:
            raise DmError("EBUSY", "thin-pool: metadata device already in use by a pool")
        if entry.data_key != data.key:
            raise DmError("EINVAL", "thin-pool: different pool cannot replace a pool")
        if entry.block_sectors != table.data_block_size:
            raise DmError("EINVAL", "thin-pool: pool block size cannot change")
        features = entry.pool.features
        if features.ignore_discard != table.features.ignore_discard:
            raise DmError("EINVAL", "thin-pool: Discard support cannot be disabled once enabled")
        if features.read_only != table.features.read_only:
            raise DmError("EINVAL", "thin-pool: changing read_only of an active pool is not supported")
        nr_blocks = length // table.data_block_size
        if nr_blocks < entry.pool.nr_data_blocks:
            raise DmError(
                "EINVAL", f"thin-pool: pool target ({nr_blocks} blocks) too small: expected {entry.pool.nr_data_blocks}"
            )

    def _open(self, owner: int, name: str, meta: Lower, data: Lower, table: PoolTable, length: int) -> PoolEntry:
        own_meta = meta.reopen()
        own_data = data.reopen(limit=length * SECTOR_SIZE)
        sink = self._on_event
        key = meta.key
        try:
            pool = Pool.open(
                own_meta, own_data, table.data_block_size, table.low_water_mark, table.features,
                metadata_name=meta.label, data_name=data.label, name=name, no_space_timeout=self.no_space_timeout,
                event_callback=None if sink is None else (lambda _pool, event: sink(key, event)),
            )
        except DevmapperError as e:
            own_meta.close()
            own_data.close()
            errno_name = e.errno_name if isinstance(e, DeviceError) else "EINVAL"
            raise DmError(errno_name, f"thin-pool: Error creating metadata object: {e}") from e
        return PoolEntry(meta.key, pool, data.key, owner, own_meta, own_data, table.data_block_size)

    def release(self, entry: PoolEntry) -> None:
        """Drop one table's reference; the last one closes the pool (which commits)."""
        with self._lock:
            entry.refs -= 1
            if entry.refs > 0:
                return
            self._pools.pop(entry.key, None)
        try:
            entry.pool.close()
        except DevmapperError:
            log.exception("%s: closing the pool failed", entry.pool.name)
        finally:
            entry.metadata.close()
            entry.data.close()

    def grow(self, entry: PoolEntry, length: int) -> None:
        """Let the pool use ``length`` sectors of its data device (a resumed bigger table)."""
        entry.data.limit = length * SECTOR_SIZE
        entry.pool.resume()

    def find(self, key: Key) -> PoolEntry | None:
        with self._lock:
            return self._pools.get(key)

    def entries(self) -> list[PoolEntry]:
        with self._lock:
            return list(self._pools.values())
