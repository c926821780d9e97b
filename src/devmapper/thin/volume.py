"""A thin volume: one thin device of a pool used as a block device (the kernel's ``thin`` target).

Theory of operation
-------------------
A request is cut at data-block boundaries (as the kernel splits bios) and each piece is handled
under the block lock of its (thin id, virtual block), see ``locks.py``:

* read: look the block up; mapped -> read the data block; unmapped -> the external origin's bytes
  (zeroes past its end) or zeroes.  Nothing is allocated.
* write, mapped and not shared -> in place.  Otherwise a new block is allocated and
  - unmapped, no origin: the rest of the block is zeroed (unless ``skip_block_zeroing``);
  - unmapped, external origin: the rest is copied from the origin (zeroes past its end);
  - shared ("breaking sharing"): the rest is copied from the old block;
  in every case nothing is copied or zeroed when the write covers the whole block.  Only then is
  the block mapped, so a crash never leaves a mapping to unwritten data (the commit that makes the
  mapping durable flushes the data device first; the commit gate keeps the two in order).
  "Shared" is the kernel's time-stamp test: the mapping is older than the device's last snapshot.
* discard: whole blocks only (a partial block is left alone, as the kernel does).  Mappings are
  removed; blocks whose reference count drops to 0 are queued for passdown (a punched hole) unless
  ``no_discard_passdown``.  A block still shared with a snapshot is only unmapped here.  The pool
  punches queued blocks inside the commit that makes their unmapping durable, before anything can
  reallocate them: until that commit the *committed* metadata may still map such a block (say the
  origin broke sharing with a snapshot and the snapshot then discarded the block), so punching it
  at once -- as the kernel does -- can zero flushed data if the machine dies before the commit.
* write-zeroes: partial blocks are written with zeroes; whole blocks are unmapped when nothing
  shows through (no external origin) and the pool may change metadata, else zeroed in place.
* flush: commit if this thin changed in the current transaction, else flush the data device.
  FUA: in-place pieces are written with ``RWF_DSYNC``, then a flush as above if the thin changed
  (write-zeroes with FUA simply flushes at the end).

When no data block is free the piece drops all its locks and asks the pool (``wait_for_space``),
which commits, queues or raises according to the pool's mode and no-space policy, then retries.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING

from devmapper.errors import BlockDeviceError, DeviceError, NoSpaceError
from devmapper.thin.data_device import CHUNK, ZEROS, DataDevice
from devmapper.thin.metadata import LookupResult
from devmapper.thin.status import PoolMode, ThinStatus, ThinTable, target_line
from devmapper.units import SECTOR_SIZE

if TYPE_CHECKING:
    from devmapper.thin.pool import Pool

UNMAP_BATCH = 4096  # virtual blocks examined (and at most locked) per discard step

Buffer = bytes | bytearray | memoryview
Payload = memoryview | int  # bytes to write, or that many zero bytes


class PoolIOError(BlockDeviceError):
    """An I/O the pool cannot service in its mode, or a closed pool (the kernel's EIO)."""

    errno_name = "EIO"


class OutOfDataSpaceError(NoSpaceError):
    """A write needed a data block and the pool has none (error_if_no_space, or the queue timed out)."""

    errno_name = "ENOSPC"

    def __init__(self) -> None:
        super().__init__("data")


def _payload_len(payload: Payload) -> int:
    return payload if isinstance(payload, int) else len(payload)


def runs(sorted_items: list[int]) -> Iterator[tuple[int, int]]:
    """[begin, end) runs of consecutive integers in an ascending list."""
    i = 0
    while i < len(sorted_items):
        j = i + 1
        while j < len(sorted_items) and sorted_items[j] == sorted_items[j - 1] + 1:
            j += 1
        yield sorted_items[i], sorted_items[j - 1] + 1
        i = j


class ThinVolume:
    """Thin device ``dev_id`` of a pool as a block device of ``size_sectors``.  Thread-safe.

    Open with ``Pool.open_thin``; ``close`` flushes and releases it (the pool refuses to delete an
    open thin).  Offsets and lengths are in bytes; the ``*_sectors`` variants take sectors.
    """

    def __init__(
        self,
        pool: Pool,
        dev_id: int,
        size_sectors: int,
        origin: DataDevice | None,
        pool_dev: str,
        origin_dev: str | None,
    ) -> None:
        if size_sectors < 0:
            raise DeviceError(f"invalid size {size_sectors}", "EINVAL")
        self.pool = pool
        self.dev_id = dev_id
        self.size_sectors = size_sectors
        self.size = size_sectors * SECTOR_SIZE
        self.origin = origin
        self.origin_size = 0 if origin is None else origin.size()
        self._table = ThinTable(pool_dev, dev_id, origin_dev)
        self._bs = pool.block_bytes
        self._closed = False

    def __enter__(self) -> ThinVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush (commit if this thin changed) and release the thin device."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.pool.mode is not PoolMode.FAIL and not self.pool.closed:
                self.pool.flush_device(self.dev_id)
        finally:
            self.pool.close_thin(self.dev_id)
            if self.origin is not None:
                self.origin.close()

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise DeviceError(f"thin device {self.dev_id}: volume is closed", "EBADF")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DeviceError(
                f"thin device {self.dev_id}: I/O [{offset}, {offset + length}) beyond the end ({self.size})", "EINVAL"
            )
        self.pool.check_io()

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(virtual block, offset in block, offset in request, length) per block touched."""
        bs, pos = self._bs, 0
        while pos < length:
            vblock, within = divmod(offset + pos, bs)
            n = min(bs - within, length - pos)
            yield vblock, within, pos, n
            pos += n

    # -- read ------------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """The volume's bytes at offset (see ``_locked_runs`` for how multi-block reads are served)."""
        self._check(offset, length)
        pieces = list(self._pieces(offset, length))
        if len(pieces) == 1:
            vblock, within, _pos, n = pieces[0]
            data = self._read_mapped(vblock, within, n)
            if data is not None:
                return data
        parts: list[bytes] = []

        def serve(runs: list[tuple[int, int, int]]) -> None:
            parts.extend(bytes(n) if where < 0 else self.pool.data.pread(where, n) for _pos, where, n in runs)

        if not self._locked_runs(pieces, serve):
            buf = bytearray(length)
            self._readinto_pieces(pieces, memoryview(buf))
            return bytes(buf)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _locked_runs(self, pieces: list[tuple[int, int, int, int]],
                     serve: Callable[[list[tuple[int, int, int]]], None]) -> bool:
        """Serve a read as runs (position in request, data offset or -1 for zeroes, length).

        The blocks' locks are taken in ascending order (every other path holds one block lock at a
        time, so this cannot deadlock); one range lookup finds the mappings, consecutive data blocks
        merge into one run, so each run is one ``pread``.  Returns False, serving nothing, when an
        external origin shows through (the caller then reads block by block).
        """
        pool = self.pool
        keys: list[Hashable] = [(self.dev_id, p[0]) for p in pieces]
        entries = pool.locks.acquire_many(keys)
        try:
            mapped = {vb: b for vb, b, _t in pool.md.mappings(self.dev_id, pieces[0][0], pieces[-1][0] + 1)}
            runs: list[tuple[int, int, int]] = []
            for vblock, within, pos, n in pieces:
                data_block = mapped.get(vblock)
                if data_block is None and self.origin is not None:
                    return False
                where = -1 if data_block is None else data_block * self._bs + within
                if runs and runs[-1][1] >= 0 and where >= 0 and runs[-1][1] + runs[-1][2] == where:
                    runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + n)
                elif runs and runs[-1][1] < 0 and where < 0:
                    runs[-1] = (runs[-1][0], -1, runs[-1][2] + n)
                else:
                    runs.append((pos, where, n))
            serve(runs)
            return True
        finally:
            pool.locks.release_many(keys, entries)

    def _read_mapped(self, vblock: int, within: int, length: int) -> bytes | None:
        """Bytes within one block, or None when they come from the external origin."""
        pool, key = self.pool, (self.dev_id, vblock)
        entry = pool.locks.acquire(key)
        try:
            r = pool.md.lookup(self.dev_id, vblock)
            if r is None:
                return bytes(length) if self.origin is None else None
            return pool.data.pread(r.data_block * self._bs + within, length)
        finally:
            pool.locks.release(key, entry)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill buf with the volume's bytes from offset (runs of data blocks with one preadv each)."""
        out = memoryview(buf).cast("B")
        self._check(offset, len(out))
        pieces = list(self._pieces(offset, len(out)))
        if not pieces:
            return

        def serve(runs: list[tuple[int, int, int]]) -> None:
            for pos, where, n in runs:
                if where < 0:
                    _zero_fill(out[pos : pos + n])
                else:
                    self.pool.data.read_into(where, out[pos : pos + n])

        if not self._locked_runs(pieces, serve):
            self._readinto_pieces(pieces, out)

    def _readinto_pieces(self, pieces: list[tuple[int, int, int, int]], out: memoryview) -> None:
        for vblock, within, pos, n in pieces:
            self._read_piece(vblock, within, out[pos : pos + n])

    def _read_piece(self, vblock: int, within: int, out: memoryview) -> None:
        pool, key = self.pool, (self.dev_id, vblock)
        entry = pool.locks.acquire(key)
        try:
            r = pool.md.lookup(self.dev_id, vblock)
            if r is not None:
                pool.data.read_into(r.data_block * self._bs + within, out)
            elif self.origin is not None:
                self._read_origin(vblock * self._bs + within, out)
            else:
                _zero_fill(out)
        finally:
            pool.locks.release(key, entry)

    def _read_origin(self, voffset: int, out: memoryview) -> None:
        assert self.origin is not None
        avail = max(0, min(len(out), self.origin_size - voffset))
        if avail:
            self.origin.read_into(voffset, out[:avail])
        _zero_fill(out[avail:])

    # -- write -----------------------------------------------------------------------------------

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        """Write data at offset; with fua it is durable (mapping included) on return."""
        mv = memoryview(data).cast("B")
        self._check(offset, len(mv))
        for vblock, within, pos, n in self._pieces(offset, len(mv)):
            self._put(vblock, within, mv[pos : pos + n], fua)
        if fua:
            self._complete_fua()

    def _complete_fua(self) -> None:
        if self.pool.changed_this_transaction(self.dev_id):
            self.pool.flush_device(self.dev_id)

    def _put(self, vblock: int, within: int, payload: Payload, fua: bool) -> None:
        while not self._try_put(vblock, within, payload, fua):
            self.pool.wait_for_space()

    def _try_put(self, vblock: int, within: int, payload: Payload, fua: bool) -> bool:
        """One piece under the gate and its block lock; False when no data block was free."""
        pool, dev = self.pool, self.dev_id
        pool.gate.acquire_shared()
        try:
            key = (dev, vblock)
            entry = pool.locks.acquire(key)
            try:
                r = pool.md.lookup(dev, vblock)
                if r is not None and not r.shared:
                    self._put_data(r.data_block * self._bs + within, payload, fua)
                    return True
                if r is None and isinstance(payload, int) and self.origin is None:
                    return True  # zeroes onto an unmapped block: it already reads as zeroes
                b = pool.alloc_block()
                if b is None:
                    return False
                self._provision(vblock, b, r, within, payload)
                return True
            finally:
                pool.locks.release(key, entry)
        finally:
            pool.gate.release_shared()

    def _provision(self, vblock: int, b: int, old: LookupResult | None, within: int, payload: Payload) -> None:
        """Fill new block b (copy or zero around the payload), then map it."""
        pool, dev = self.pool, self.dev_id
        try:
            self._fill_new_block(vblock, b, old, within, payload)
        except BaseException:
            pool.release_block(b)
            raise
        pool.change(dev, lambda: pool.md.insert(dev, vblock, b))

    def _fill_new_block(self, vblock: int, b: int, old: LookupResult | None, within: int, payload: Payload) -> None:
        bs, base = self._bs, b * self._bs
        end = within + _payload_len(payload)
        whole = within == 0 and end == bs
        if not whole and old is None and self.origin is None and isinstance(payload, memoryview) and bs <= CHUNK:
            pad = self.pool.zero_new_blocks
            parts = [ZEROS[:within], payload, ZEROS[: bs - end]] if pad else [payload]
            self.pool.data.write(base if pad else base + within, [p for p in parts if len(p)])
            return
        if not whole:
            self._fill_gap(vblock, base, old, 0, within)
            self._fill_gap(vblock, base, old, end, bs)
        self._put_data(base + within, payload, False)

    def _fill_gap(self, vblock: int, base: int, old: LookupResult | None, g0: int, g1: int) -> None:
        """Bytes [g0, g1) of a new block that the write does not cover."""
        if g0 >= g1:
            return
        data = self.pool.data
        if old is not None:
            data.copy_from(data, old.data_block * self._bs + g0, base + g0, g1 - g0)
            return
        if self.origin is not None:
            avail = min(g1, max(0, self.origin_size - vblock * self._bs))
            if g0 < avail:
                data.copy_from(self.origin, vblock * self._bs + g0, base + g0, avail - g0)
                g0 = avail
        if g0 < g1 and self.pool.zero_new_blocks:
            data.zero(base + g0, g1 - g0)

    def _put_data(self, offset: int, payload: Payload, fua: bool) -> None:
        data = self.pool.data
        if isinstance(payload, int):
            data.zero(offset, payload)  # write_zeroes flushes at the end when asked for FUA
        else:
            data.write(offset, [payload], fua)

    # -- flush, discard, write-zeroes ------------------------------------------------------------

    def flush(self) -> None:
        """Make every completed write durable (commit if this thin changed in this transaction)."""
        self._check(0, 0)
        self.pool.flush_device(self.dev_id)

    def discard(self, offset: int, length: int) -> None:
        """Unmap the whole blocks inside the range (EOPNOTSUPP with ignore_discard)."""
        self._check(offset, length)
        pool = self.pool
        if not pool.discard_enabled:
            raise DeviceError("discards are disabled on this pool (ignore_discard)", "EOPNOTSUPP")
        if pool.mode >= PoolMode.OUT_OF_METADATA_SPACE:
            return  # read-only pools complete discards without doing anything
        begin, end = -(-offset // self._bs), (offset + length) // self._bs
        self._unmap(begin, end, pool.discard_passdown)

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None:
        """Make the range read as zeroes; whole blocks are unmapped when that is equivalent and unmap."""
        self._check(offset, length)
        bs, pool = self._bs, self.pool
        begin, end = -(-offset // bs), (offset + length) // bs
        can_unmap = unmap and self.origin is None and pool.mode < PoolMode.OUT_OF_METADATA_SPACE
        if begin >= end or not can_unmap:
            self._zero_pieces(offset, length)
        else:
            self._zero_pieces(offset, begin * bs - offset)
            self._unmap(begin, end, pool.discard_enabled and pool.discard_passdown)
            self._zero_pieces(end * bs, offset + length - end * bs)
        if fua:
            pool.flush_device(self.dev_id)

    def _zero_pieces(self, offset: int, length: int) -> None:
        for vblock, within, _pos, n in self._pieces(offset, length):
            self._put(vblock, within, n, False)

    def _unmap(self, begin: int, end: int, passdown: bool) -> None:
        pool, dev = self.pool, self.dev_id
        while begin < end:
            hi = min(end, begin + UNMAP_BATCH)
            vblocks = [v for v, _b, _t in pool.md.mappings(dev, begin, hi)]
            if vblocks:
                self._unmap_batch(vblocks, passdown)
            begin = hi

    def _unmap_batch(self, vblocks: list[int], passdown: bool) -> None:
        pool, dev = self.pool, self.dev_id
        with pool.gate.shared(), pool.locks.hold_all((dev, v) for v in vblocks):
            freed = pool.change(dev, lambda: self._remove_locked(vblocks))
            if passdown:
                pool.queue_passdown(freed)

    def _remove_locked(self, vblocks: list[int]) -> list[int]:
        """Remove the runs of vblocks; return the data blocks nothing references any more."""
        md, removed = self.pool.md, []
        for lo, hi in runs(vblocks):
            md.remove_range(self.dev_id, lo, hi, on_remove=lambda _v, d: removed.append(d))
        return [d for d in removed if md.data_block_count(d) == 0]

    # -- sector interface ------------------------------------------------------------------------

    def read_sectors(self, sector: int, count: int) -> bytes:
        return self.read(sector * SECTOR_SIZE, count * SECTOR_SIZE)

    def write_sectors(self, sector: int, data: Buffer, fua: bool = False) -> None:
        if len(memoryview(data).cast("B")) % SECTOR_SIZE:
            raise DeviceError("sector writes must be a multiple of 512 bytes", "EINVAL")
        self.write(sector * SECTOR_SIZE, data, fua)

    def discard_sectors(self, sector: int, count: int) -> None:
        self.discard(sector * SECTOR_SIZE, count * SECTOR_SIZE)

    def write_zeroes_sectors(self, sector: int, count: int, fua: bool = False, unmap: bool = True) -> None:
        self.write_zeroes(sector * SECTOR_SIZE, count * SECTOR_SIZE, fua, unmap)

    # -- status ----------------------------------------------------------------------------------

    def status_info(self) -> ThinStatus:
        pool = self.pool
        if pool.mode is PoolMode.FAIL:
            return ThinStatus(0, None, failed=True)
        spb = pool.block_sectors
        mapped = pool.md.details(self.dev_id).mapped_blocks
        highest = pool.md.highest_mapped(self.dev_id)
        return ThinStatus(mapped * spb, None if highest is None else (highest + 1) * spb - 1)

    def status(self) -> str:
        """``<nr mapped sectors> <highest mapped sector|->``, or ``Fail``."""
        return self.status_info().format()

    def status_line(self) -> str:
        return target_line(0, self.size_sectors, "thin", self.status())

    def table(self) -> str:
        """``<pool dev> <dev id>[ <origin dev>]``."""
        return self._table.format()

    def table_line(self) -> str:
        return target_line(0, self.size_sectors, "thin", self._table.format())


def _zero_fill(out: memoryview) -> None:
    pos = 0
    while pos < len(out):
        n = min(len(ZEROS), len(out) - pos)
        out[pos : pos + n] = ZEROS[:n]
        pos += n
