"""Transaction manager: the only source of writable metadata blocks (mirrors ``dm-transaction-manager``).

Vocabulary
----------
* **shadow**: copy-on-write of a block for this transaction.  ``shadow(b)`` returns a writable copy at
  a new location and drops one reference to ``b`` -- unless ``b`` was itself created or shadowed in
  this transaction and is not shared, in which case it is written in place.  The caller patches the
  parent's pointer, and when the original was shared (ref count > 1) must increment the children of
  the copy (``inc_children`` is returned for that).
* **shadow table**: the set of blocks created or shadowed in the open transaction.  Wiped at commit,
  so the first change to any block in a new transaction always copies it.

Crash safety
------------
Blocks reachable from the committed superblock are never written: new blocks come from the metadata
space map, which only hands out blocks free both now and at the last commit.  ``pre_commit`` writes
every dirty block and flushes; the caller then writes block 0 (``commit_superblock``) and flushes again.

Caching
-------
Decoded blocks live in two maps: ``_dirty`` (changed in this transaction, pinned until written) and an
LRU of clean decoded blocks.  When the dirty set outgrows ``max_dirty`` the oldest dirty blocks are
written back early -- always safe, since they are not referenced by the committed superblock -- and stay
in the shadow table, so later changes in the same transaction still go in place.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, TypeVar

from devmapper.errors import MetadataCorruption, ReadOnlyError
from devmapper.format.btree_node import Node
from devmapper.pdata.block_manager import BlockManager


class CachedBlock(Protocol):
    blocknr: int

    def pack(self) -> bytearray: ...


T = TypeVar("T", bound=CachedBlock)


class RefCounter(Protocol):
    """What the transaction manager needs from the metadata space map."""

    def get_count(self, b: int) -> int: ...

    def inc(self, b: int) -> None: ...

    def dec(self, b: int) -> None: ...

    def new_block(self) -> int: ...


class TransactionManager:
    def __init__(self, bm: BlockManager, cache_blocks: int = 4096, max_dirty: int = 8192) -> None:
        self.bm = bm
        self.sm: RefCounter | None = None  # set by the metadata space map once it exists (bootstrap)
        self.cache_blocks = cache_blocks
        self.max_dirty = max_dirty
        self._clean: OrderedDict[int, CachedBlock] = OrderedDict()
        self._dirty: OrderedDict[int, CachedBlock] = OrderedDict()
        self._shadows: set[int] = set()
        self.read_only = bm.read_only

    # -- reading ---------------------------------------------------------------------------------

    def read(self, b: int, unpack: Callable[[bytes, int], T], kind: type[T]) -> T:
        """A decoded block for reading.  Callers must not modify it."""
        obj = self._dirty.get(b)
        if obj is None:
            obj = self._clean.get(b)
            if obj is not None:
                self._clean.move_to_end(b)
            else:
                obj = unpack(self.bm.read(b), b)
                self._remember_clean(b, obj)
        if not isinstance(obj, kind):
            raise MetadataCorruption(f"block {b}: expected a {kind.__name__}, found a {type(obj).__name__}")
        return obj

    def read_node(self, b: int) -> Node:
        return self.read(b, Node.unpack, Node)

    def _remember_clean(self, b: int, obj: CachedBlock) -> None:
        self._clean[b] = obj
        if len(self._clean) > self.cache_blocks:
            self._clean.popitem(last=False)

    # -- writing ---------------------------------------------------------------------------------

    def _sm(self) -> RefCounter:
        if self.read_only:
            raise ReadOnlyError("metadata is open read-only")
        assert self.sm is not None, "transaction manager used before its space map was attached"
        return self.sm

    def new_block(self, make: Callable[[int], T]) -> T:
        """Allocate a block (ref count 1) and return ``make(blocknr)`` as its writable contents."""
        b = self._sm().new_block()
        obj = make(b)
        self._adopt(b, obj)
        return obj

    def new_node(self, leaf: bool, value_size: int) -> Node:
        return self.new_block(lambda b: Node.empty(b, leaf, value_size))

    def place(self, obj: CachedBlock) -> None:
        """Adopt an object at a block the caller already allocated (space-map bootstrap only)."""
        self._adopt(obj.blocknr, obj)

    def _adopt(self, b: int, obj: CachedBlock) -> None:
        self._clean.pop(b, None)
        self._dirty[b] = obj
        self._dirty.move_to_end(b)
        self._shadows.add(b)
        if len(self._dirty) > self.max_dirty:
            self._write_back(len(self._dirty) // 4)

    def shadow(self, b: int, unpack: Callable[[bytes, int], T], kind: type[T]) -> tuple[T, bool]:
        """Writable copy of block b; returns (copy, inc_children).  Mirrors ``dm_tm_shadow_block``."""
        sm = self._sm()
        count = sm.get_count(b)
        if count == 0:
            raise MetadataCorruption(f"block {b}: shadowing a block with reference count 0")
        if b in self._shadows and count == 1:
            obj = self.read(b, unpack, kind)
            if b not in self._dirty:
                self._clean.pop(b, None)
                self._dirty[b] = obj
            return obj, False
        orig = self.read(b, unpack, kind)
        new_b = sm.new_block()
        sm.dec(b)
        copy = orig.copy(new_b)  # type: ignore[attr-defined]
        self._adopt(new_b, copy)
        return copy, count > 1

    def shadow_node(self, b: int) -> tuple[Node, bool]:
        return self.shadow(b, Node.unpack, Node)

    def inc(self, b: int) -> None:
        self._sm().inc(b)

    def dec(self, b: int) -> None:
        self._sm().dec(b)

    def ref_count(self, b: int) -> int:
        assert self.sm is not None
        return self.sm.get_count(b)

    # -- commit ----------------------------------------------------------------------------------

    def _write_back(self, nr: int) -> None:
        for _ in range(min(nr, len(self._dirty))):
            b, obj = self._dirty.popitem(last=False)
            self.bm.write(b, obj.pack())
            self._remember_clean(b, obj)

    def pre_commit(self) -> None:
        """Write every dirty block that is still referenced, then flush (``dm_tm_pre_commit``)."""
        sm = self._sm()
        for b, obj in self._dirty.items():
            if sm.get_count(b) > 0:
                self.bm.write(b, obj.pack())
        self.bm.flush()
        for b, obj in self._dirty.items():
            self._remember_clean(b, obj)
        self._dirty.clear()

    def commit_superblock(self, buf: bytes | bytearray) -> None:
        """Write block 0 and flush; the transaction is then durable (``dm_tm_commit``)."""
        self._shadows.clear()
        self.bm.write(0, buf)
        self.bm.flush()

    def forget(self) -> None:
        """Drop everything cached (abort): the next reads come from disk."""
        self._dirty.clear()
        self._clean.clear()
        self._shadows.clear()

    @property
    def nr_dirty(self) -> int:
        return len(self._dirty)
