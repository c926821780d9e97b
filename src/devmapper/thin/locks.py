"""The two locks of the pool's I/O path: the commit gate and the virtual-block lock table.

Theory of operation
-------------------
The kernel serialises bios on a block with its *bio prison* (a cell per virtual block) and keeps
commits apart from in-flight mappings by running both in one worker thread.  A userspace engine has
many threads, so it needs the same two guarantees as explicit locks:

* ``CommitGate`` -- a readers/writer lock.  Every I/O step that writes a data block or changes a
  mapping holds it *shared*; ``commit``, pool messages and resizes hold it *exclusive*.  That gives
  three properties at once: (1) data written to a new block has reached the data device before the
  commit that maps it starts flushing the data device (the kernel's pre-commit flush); (2) a block
  freed by a discard cannot be reallocated (that needs a commit) while the freeing step is still
  punching a hole in it; (3) ``create_snap`` sees no write half-way between "the mapping is not
  shared" and "the data went in place", which is why the kernel asks the origin to be suspended.
  The gate is phase-fair (readers and writers take turns), so neither a stream of I/O nor a loop
  of snapshots starves the other.  Never take it twice in one thread.

* ``BlockLocks`` -- one mutex per (thin id, virtual block) in use, created on demand and dropped
  when its last user leaves.  Writes (and discards, write-zeroes) of a block hold it across lookup
  and data I/O, so two writers provision an unmapped block once and a block's mapping changes one
  step at a time.  Reads normally take none: they validate with the metadata's epoch instead
  (``volume.py``), and only a read that raced with a block becoming reallocatable is redone under
  the locks of its blocks, which keep those blocks mapped, hence unfreed, until it is done.
  Holders of several keys take them in ascending order; everybody else holds at most one key, so
  the table cannot deadlock.

Lock order: gate, then block locks, then the pool's metadata lock (``Pool._md_lock``) and state
lock, then ``PoolMetadata``'s own lock.  Nothing waits for the gate while holding a block lock.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager


class CommitGate:
    """A phase-fair readers/writer lock (not reentrant).

    A reader arriving while a writer holds or awaits the gate queues; the writer's release admits
    every queued reader at once, before any later writer.  So writers are not starved by a stream
    of readers, and readers are not starved by a stream of writers (a snapshot loop).
    """

    __slots__ = ("_cond", "_exclusive", "_phase", "_queued", "_shared", "_waiting")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # writers waiting
        self._queued = 0  # readers waiting for the next writer release
        self._phase = 0  # writer releases so far

    def acquire_shared(self) -> None:
        with self._cond:
            if not self._exclusive and not self._waiting:
                self._shared += 1
                return
            self._queued += 1
            phase = self._phase
            while self._phase == phase:
                self._cond.wait()  # release_exclusive counts us in _shared

    def release_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            if not self._shared and self._waiting:
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            if self._queued:
                self._shared += self._queued
                self._queued = 0
                self._phase += 1
            self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class BlockLocks:
    """Mutexes keyed by any hashable (the pool uses ``(thin id, virtual block)``)."""

    __slots__ = ("_mutex", "_table")

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._table: dict[Hashable, _Entry] = {}

    def acquire(self, key: Hashable) -> _Entry:
        """Block until key is ours; pass the result to ``release``."""
        with self._mutex:
            entry = self._table.get(key)
            if entry is None:
                entry = self._table[key] = _Entry()
            entry.users += 1
        entry.lock.acquire()
        return entry

    def acquire_many(self, keys: list[Hashable]) -> list[_Entry]:
        """``acquire`` for each key, in the order given (callers pass ascending keys), registering all
        of them under one hold of the table's mutex."""
        with self._mutex:
            entries = []
            for key in keys:
                entry = self._table.get(key)
                if entry is None:
                    entry = self._table[key] = _Entry()
                entry.users += 1
                entries.append(entry)
        for entry in entries:
            entry.lock.acquire()
        return entries

    def release_many(self, keys: list[Hashable], entries: list[_Entry]) -> None:
        for entry in entries:
            entry.lock.release()
        with self._mutex:
            for key, entry in zip(keys, entries, strict=True):
                entry.users -= 1
                if not entry.users:
                    del self._table[key]

    def release(self, key: Hashable, entry: _Entry) -> None:
        entry.lock.release()
        with self._mutex:
            entry.users -= 1
            if not entry.users:
                del self._table[key]

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        entry = self.acquire(key)
        try:
            yield
        finally:
            self.release(key, entry)

    @contextmanager
    def hold_all(self, keys: Iterable[Hashable]) -> Iterator[None]:
        """Hold every key; the caller passes them in ascending order (see the module docstring)."""
        held: list[tuple[Hashable, _Entry]] = []
        try:
            for key in keys:
                held.append((key, self.acquire(key)))
            yield
        finally:
            for key, entry in reversed(held):
                self.release(key, entry)

    def __len__(self) -> int:
        with self._mutex:
            return len(self._table)
