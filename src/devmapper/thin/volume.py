"""A thin volume: one thin device of a pool used as a block device (the kernel's ``thin`` target).

Theory of operation
-------------------
Writes are cut at data-block boundaries (as the kernel splits bios) and each piece is handled
under the block lock of its (thin id, virtual block), see ``locks.py``.  Each piece's data goes to
the data file with its own ``pwritev``, which also keeps the file's page-cache folios at most one
block large.  (Merging a large write into one ``pwritev`` was tried: on ext4 with Linux 6.18 the
large folios it creates made later 1 MiB reads about a third faster, but random 4 KiB writes with
the periodic commit's flush two to five times slower.)  A write across several blocks that are all
mapped and unshared (the steady state of a written volume) skips the per-piece steps: one gate
hold, its blocks' locks taken together in ascending order, one range lookup (``in_place_range``),
then the same per-block ``pwritev`` calls -- or a single one when the blocks are consecutive in the
data file and all its pages are in the page cache (``DataDevice.cached``): such a write creates no
folios, so the folio sizes above are kept, and one call costs about 10% less than sixteen.  Reads take no lock:

* read: one range lookup maps every block of the request; mapped -> the data blocks, consecutive
  ones with one ``preadv``; unmapped -> the external origin's bytes (zeroes past its end) or zeroes.
  Nothing is allocated.  Instead of locks the read checks the metadata's ``epoch`` before the
  lookup and after the data I/O: it moves on whenever a data block may become allocatable again
  (a count dropped to zero, a commit, an abort -- see ``metadata.py``), so an unchanged epoch
  proves that no block read was reassigned to other data meanwhile.  On a change the read is done
  again under the block locks (``_readinto``), as the kernel's bio prison would have it.
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

from collections.abc import Hashable, Iterator
from contextlib import contextmanager
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


def _consecutive(blocks: list[int]) -> bool:
    """Whether a non-empty list of data blocks is one stretch of the data file, in order."""
    return blocks == list(range(blocks[0], blocks[0] + len(blocks)))


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
        """The volume's bytes at offset (see ``_readinto`` for how reads are served)."""
        self._check(offset, length)
        if not length:
            return b""
        md = self.pool.md
        epoch = md.epoch
        runs = self._runs(offset, length)
        buf = None
        if len(runs) == 1 and runs[0][1] >= 0:  # one stretch of data blocks: one pread into new bytes
            data = self.pool.data.pread(runs[0][1], length)
            if md.epoch == epoch:
                return data
        else:
            buf = bytearray(length)
            self._serve(runs, offset, memoryview(buf))
            if md.epoch == epoch:
                return bytes(buf)
        if buf is None:
            buf = bytearray(length)
        self._readinto_locked(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill buf with the volume's bytes from offset (runs of data blocks with one preadv each)."""
        out = memoryview(buf).cast("B")
        self._check(offset, len(out))
        if len(out):
            self._readinto(offset, out)

    def _readinto(self, offset: int, out: memoryview) -> None:
        """The read path: lock-free, checked by the metadata's epoch, with a locked retry.

        One range lookup maps the request; consecutive data blocks merge into one run (one
        ``preadv``), unmapped stretches are zeroes or the external origin's bytes.  No block lock is
        taken: a block the lookup named can only be reassigned -- and rewritten or punched -- after
        its count dropped to zero, a commit or an abort, and each of those moves ``md.epoch`` on
        before the block can be allocated again (``metadata.py``).  So if the epoch is unchanged
        after the data was read, nothing read came from a reassigned block.  Otherwise the read is
        done again holding the blocks' locks, which keep their mappings, and so their data blocks,
        in place.  A write or discard of the same blocks racing with the read may show through
        either way (old or new bytes, as with any block device); a foreign block's bytes never do.
        """
        md = self.pool.md
        epoch = md.epoch
        self._serve(self._runs(offset, len(out)), offset, out)
        if md.epoch != epoch:
            self._readinto_locked(offset, out)

    def _readinto_locked(self, offset: int, out: memoryview) -> None:
        """``_readinto`` under the block locks of every block touched, taken in ascending order (every
        other path holds one block lock at a time, or several in ascending order: no deadlock)."""
        locks = self.pool.locks
        keys = self._block_keys(offset, len(out))
        entries = locks.acquire_many(keys)
        try:
            self._serve(self._runs(offset, len(out)), offset, out)
        finally:
            locks.release_many(keys, entries)

    def _runs(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """A read of length > 0 as runs (position in request, data offset or -1 if unmapped, length):
        consecutive data blocks merge, and so do consecutive unmapped blocks."""
        bs = self._bs
        first, within = divmod(offset, bs)
        last = (offset + length - 1) // bs
        vblocks, blocks = self.pool.md.map_range(self.dev_id, first, last + 1)
        n = last - first + 1
        if len(vblocks) == n and _consecutive(blocks):
            return [(0, blocks[0] * bs + within, length)]  # the common case: all mapped, in order
        if not vblocks:
            return [(0, -1, length)]
        runs: list[tuple[int, int, int]] = []
        i, pos, start = 0, 0, within
        for vblock in range(first, last + 1):
            size = min(bs - start, length - pos)
            where = -1
            if i < len(vblocks) and vblocks[i] == vblock:
                where = blocks[i] * bs + start
                i += 1
            p, w, m = runs[-1] if runs else (0, -2, 0)
            if (where < 0 and w == -1) or (where >= 0 and w >= 0 and w + m == where):
                runs[-1] = (p, w, m + size)
            else:
                runs.append((pos, where, size))
            pos += size
            start = 0
        return runs

    def _serve(self, runs: list[tuple[int, int, int]], offset: int, out: memoryview) -> None:
        data = self.pool.data
        for pos, where, n in runs:
            piece = out[pos : pos + n] if n != len(out) else out
            if where >= 0:
                data.read_into(where, piece)
            elif self.origin is not None:
                self._read_origin(offset + pos, piece)
            else:
                _zero_fill(piece)

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
        try:
            several = len(mv) > self._bs - offset % self._bs
            if not (several and self._write_in_place(offset, mv, fua)):
                for vblock, within, pos, n in self._pieces(offset, len(mv)):
                    self._put(vblock, within, mv[pos : pos + n], fua)
        finally:
            self.pool.note_change(self.dev_id)
        if fua:
            self._complete_fua()

    @contextmanager
    def write_target(self, offset: int, length: int) -> Iterator[memoryview | None]:
        """For a write of [offset, offset + length) whose blocks are all mapped, unshared,
        consecutive in the data file and cached: hold them as ``_write_in_place`` does (gate and
        block locks) and yield a writable view of the data file over the range, so the caller can
        put the bytes there itself (the NBD server receives a payload straight into it); yield
        None otherwise (then use ``write``).  The range counts as changed afterwards, however much
        of it was written."""
        self._check(offset, length)
        with self._in_place(offset, length) as blocks:
            start = None if blocks is None else self._cached_stretch(offset, length, blocks)
            view = None if start is None else self.pool.data.mapped(start, length)
            try:
                yield view
            finally:
                if view is not None:
                    self.pool.note_change(self.dev_id)

    def read_token(self) -> tuple[int, int]:
        """A value that changes whenever this volume's bytes may have changed: after every write,
        discard or write-zeroes through any volume of this thin id (whether it succeeded or not)
        and with the metadata's ``epoch``.
        Bytes read after taking a token are still the volume's bytes while the token is unchanged
        (the NBD server's read-ahead relies on it)."""
        return self.pool.change_mark(self.dev_id), self.pool.md.epoch

    def _write_in_place(self, offset: int, mv: memoryview, fua: bool) -> bool:
        """A write across several blocks that are all mapped and unshared, at the cost of one:
        ``_in_place`` holds them, then each block's piece gets its own ``pwritev`` as ``_put`` would,
        or one call covers them all when they are consecutive and cached (module docstring).  False,
        with nothing written, when some block is unmapped or shared (the write then goes piece by
        piece)."""
        bs, length = self._bs, len(mv)
        with self._in_place(offset, length) as blocks:
            if blocks is None:
                return False
            write, within = self.pool.data.write, offset % bs
            start = self._cached_stretch(offset, length, blocks)
            if start is not None:
                write(start, [mv], fua)  # one stretch of cached pages: one call, and no new folios
                return True
            pos = 0
            for b in blocks:
                n = min(bs - within, length - pos)
                write(b * bs + within, [mv[pos : pos + n]], fua)
                pos += n
                within = 0
            return True

    def _cached_stretch(self, offset: int, length: int, blocks: list[int]) -> int | None:
        """Where [offset, offset + length) starts in the data file when its data blocks (from
        ``_in_place``) are one stretch, in order, and all its pages are cached; else None."""
        if not _consecutive(blocks):
            return None
        start = blocks[0] * self._bs + offset % self._bs
        return start if self.pool.data.cached(start, length) else None

    @contextmanager
    def _in_place(self, offset: int, length: int) -> Iterator[list[int] | None]:
        """Hold the gate (shared) and the locks of every block of [offset, offset + length), taken
        together in ascending order, and yield their data blocks if all are mapped and unshared
        (``in_place_range``), else None."""
        pool = self.pool
        keys = self._block_keys(offset, length)
        pool.gate.acquire_shared()
        try:
            entries = pool.locks.acquire_many(keys)
            try:
                yield pool.md.in_place_range(self.dev_id, offset // self._bs, (offset + length - 1) // self._bs + 1)
            finally:
                pool.locks.release_many(keys, entries)
        finally:
            pool.gate.release_shared()

    def _block_keys(self, offset: int, length: int) -> list[Hashable]:
        """The lock keys of the blocks of [offset, offset + length), in ascending order."""
        bs, dev = self._bs, self.dev_id
        return [(dev, v) for v in range(offset // bs, (offset + length - 1) // bs + 1)]

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
        try:
            self._unmap(begin, end, pool.discard_passdown)
        finally:
            self.pool.note_change(self.dev_id)

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None:
        """Make the range read as zeroes; whole blocks are unmapped when that is equivalent and unmap."""
        self._check(offset, length)
        bs, pool = self._bs, self.pool
        begin, end = -(-offset // bs), (offset + length) // bs
        can_unmap = unmap and self.origin is None and pool.mode < PoolMode.OUT_OF_METADATA_SPACE
        try:
            if begin >= end or not can_unmap:
                self._zero_pieces(offset, length)
            else:
                self._zero_pieces(offset, begin * bs - offset)
                self._unmap(begin, end, pool.discard_enabled and pool.discard_passdown)
                self._zero_pieces(end * bs, offset + length - end * bs)
        finally:
            self.pool.note_change(self.dev_id)
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
