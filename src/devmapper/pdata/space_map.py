"""Space maps: reference counts of metadata and data blocks (mirrors ``dm-space-map-*``).

Representation (kernel ``dm-space-map-common``): 2-bit entries in bitmap blocks (0 free, 1, 2, 3 =
"see the overflow tree"), an index entry per bitmap (block, nr_free, none_free_before) and an overflow
B-tree of le32 counts for blocks referenced three or more times.  The *data* space map keeps its index
in a B-tree; the *metadata* space map keeps it in one index block (at most 255 bitmaps).

In memory
---------
Bitmaps are loaded on first use into ``bytearray`` pages (one byte per entry), so searches run at C
speed (``bytearray.find``).  Changes in the open transaction touch only pages and a dict of pending
overflow counts; they reach disk at ``commit``:

* ``_committed[i]`` keeps page i as it was at the last commit, from its first change on, because a
  block may be allocated only if it is free **both now and at the last commit**: blocks freed in this
  transaction still hold committed data and must not be overwritten before the next commit.
* ``_unwritten`` names pages whose contents differ from their bitmap block; commit shadows those blocks
  and copies the pages in.

The metadata space map's recursion
----------------------------------
Writing the metadata space map allocates and frees metadata blocks (bitmap and overflow-tree shadows),
which changes the metadata space map again.  The kernel queues such operations while it is inside an
update; here counting is in memory and never recurses, and ``commit`` loops "apply overflow changes,
write changed pages" until nothing changes (a block shadowed once in a transaction is then written in
place, so this converges in two or three rounds).  The index block is shadowed first, and its entries
are filled in last, so the index written already accounts for its own relocation.
"""

from __future__ import annotations

from devmapper.errors import MetadataCorruption, NoSpaceError
from devmapper.format.bitmap import ENTRIES_PER_BLOCK, MAX_METADATA_BITMAPS, MAX_METADATA_BLOCKS
from devmapper.format.btree_node import Node
from devmapper.format.records import IndexEntry
from devmapper.format.superblock import SmRoot
from devmapper.pdata import btree
from devmapper.pdata.blocks import BitmapBlock, IndexBlock
from devmapper.pdata.transaction_manager import TransactionManager

E = ENTRIES_PER_BLOCK
REF_COUNT_VT = btree.ValueType(4)
INDEX_VT = btree.ValueType(16)


def nr_bitmaps(nr_blocks: int) -> int:
    return (nr_blocks + E - 1) // E


class SpaceMap:
    """Counting, allocation and page write-out shared by the data and metadata space maps."""

    what = "blocks"

    def __init__(
        self, tm: TransactionManager, nr_blocks: int, nr_allocated: int, index: list[IndexEntry], ref_count_root: int
    ) -> None:
        self.tm = tm
        self.nr_blocks = nr_blocks
        self.nr_allocated = nr_allocated
        self.index = index
        self.ref_count_root = ref_count_root
        self._pages: dict[int, bytearray] = {}
        self._committed: dict[int, bytes] = {}
        self._unwritten: set[int] = set()
        self._overflow: dict[int, int] = {}
        self._cursor = 0

    # -- counts ----------------------------------------------------------------------------------

    def _page(self, i: int) -> bytearray:
        page = self._pages.get(i)
        if page is None:
            e = self.index[i]
            entries = None if e.blocknr == 0 else self.tm.read(e.blocknr, BitmapBlock.unpack, BitmapBlock).entries
            page = bytearray(E) if entries is None else bytearray(entries)
            self._pages[i] = page
        return page

    def _check_range(self, b: int) -> None:
        if not 0 <= b < self.nr_blocks:
            raise MetadataCorruption(f"{self.what} space map: block {b} out of range (nr_blocks {self.nr_blocks})")

    def get_count(self, b: int) -> int:
        self._check_range(b)
        i, bit = divmod(b, E)
        v = self._page(i)[bit]
        if v < 3:
            return v
        c = self._overflow.get(b)
        if c is None:
            c = btree.lookup(self.tm, self.ref_count_root, b)
            if c is None:
                raise MetadataCorruption(f"{self.what} space map: block {b} has count 3+ but no overflow entry")
        return c

    def _set(self, b: int, new: int, old: int) -> None:
        i, bit = divmod(b, E)
        page = self._page(i)
        if i not in self._committed:
            self._committed[i] = bytes(page)
        self._unwritten.add(i)
        page[bit] = new if new < 3 else 3
        if new >= 3:
            self._overflow[b] = new
        elif old >= 3:
            self._overflow[b] = 0
        if old == 0 and new > 0:
            self.nr_allocated += 1
        elif old > 0 and new == 0:
            self.nr_allocated -= 1

    def inc(self, b: int) -> None:
        self._check_range(b)
        old = self.get_count(b)
        self._set(b, old + 1, old)

    def dec(self, b: int) -> None:
        self._check_range(b)
        old = self.get_count(b)
        if old == 0:
            raise MetadataCorruption(f"{self.what} space map: decrementing block {b} with count 0")
        self._set(b, old - 1, old)

    def nr_free(self) -> int:
        return self.nr_blocks - self.nr_allocated

    def _limit(self, i: int) -> int:
        return min(E, self.nr_blocks - i * E)

    # -- allocation ------------------------------------------------------------------------------

    def _find_free(self, i: int, start: int) -> int:
        """First entry >= start of page i free now and at the last commit, or -1."""
        if i not in self._pages and self.index[i].nr_free == 0:
            return -1
        page = self._page(i)
        committed = self._committed.get(i)
        limit = self._limit(i)
        pos = start
        while True:
            pos = page.find(0, pos, limit)
            if pos < 0 or committed is None or committed[pos] == 0:
                return pos
            pos += 1

    def new_block(self) -> int:
        """Allocate a block free now and at the last commit (count becomes 1).  Raises NoSpaceError."""
        n = nr_bitmaps(self.nr_blocks)
        if n == 0:
            raise NoSpaceError(self.what)
        first, start = divmod(self._cursor % max(self.nr_blocks, 1), E)
        for step in range(n + 1):
            i = (first + step) % n
            pos = self._find_free(i, start if step == 0 else 0)
            if pos >= 0:
                b = i * E + pos
                self._set(b, 1, 0)
                self._cursor = b + 1
                return b
        raise NoSpaceError(self.what)

    # -- commit helpers --------------------------------------------------------------------------

    def _write_pages(self) -> list[int]:
        """Copy every changed page into its (shadowed or new) bitmap block; returns the pages written.

        A page never loaded since the space map grew is all zero: its new bitmap block is written
        without materialising the page (a pool of 2^32 data blocks has 263,000 of them).
        """
        written = []
        while self._unwritten:
            for i in sorted(self._unwritten):
                self._write_page(i)
                written.append(i)
        return written

    def _write_page(self, i: int) -> None:
        e = self.index[i]
        if e.blocknr == 0:
            bmp = self.tm.new_block(lambda b: BitmapBlock(b, None))
        else:
            bmp, _ = self.tm.shadow(e.blocknr, BitmapBlock.unpack, BitmapBlock)
        self._unwritten.discard(i)
        page = self._pages.get(i)
        if page is None:
            bmp.entries = None
            self.index[i] = IndexEntry(bmp.blocknr, E, 0)
        else:
            bmp.entries = bytearray(page)
            # Like the kernel, count the phantom entries past nr_blocks in a partial last bitmap as free.
            nfb = page.find(0)
            self.index[i] = IndexEntry(bmp.blocknr, page.count(0), E if nfb < 0 else nfb)

    def _apply_overflow(self) -> None:
        """Carry pending counts >= 3 into the overflow tree (0 = remove the entry)."""
        for b in sorted(self._overflow):
            c = self._overflow.get(b)
            if c is None:
                continue
            if c >= 3:
                self.ref_count_root, _ = btree.insert(self.tm, self.ref_count_root, b, c, REF_COUNT_VT)
            else:
                self.ref_count_root, _ = btree.remove(self.tm, self.ref_count_root, b, REF_COUNT_VT)
            if self._overflow.get(b) == c:
                del self._overflow[b]

    def _grow_pages(self, new_nr_blocks: int) -> None:
        """Cover more blocks.  New bitmaps start all free and are only materialised when touched."""
        old_pages = nr_bitmaps(self.nr_blocks)
        self.nr_blocks = new_nr_blocks
        for i in range(old_pages, nr_bitmaps(new_nr_blocks)):
            self.index.append(IndexEntry(0, E, 0))
            self._unwritten.add(i)

    def _end_transaction(self) -> None:
        self._committed.clear()


class DiskSpaceMap(SpaceMap):
    """The data space map: index entries in a B-tree (``dm-space-map-disk``)."""

    what = "data"

    def __init__(
        self, tm: TransactionManager, root: SmRoot, index: list[IndexEntry]
    ) -> None:
        super().__init__(tm, root.nr_blocks, root.nr_allocated, index, root.ref_count_root)
        self.index_root = root.bitmap_root

    @classmethod
    def create(cls, tm: TransactionManager) -> DiskSpaceMap:
        index_root = btree.empty_tree(tm, INDEX_VT)
        rc_root = btree.empty_tree(tm, REF_COUNT_VT)
        return cls(tm, SmRoot(0, 0, index_root, rc_root), [])

    @classmethod
    def open(cls, tm: TransactionManager, root: SmRoot) -> DiskSpaceMap:
        index = []
        for i, (key, value) in enumerate(btree.iterate(tm, root.bitmap_root)):
            if key != i:
                raise MetadataCorruption(f"data space map index: missing bitmap {i} (found key {key})")
            index.append(IndexEntry.unpack(value))
        if len(index) != nr_bitmaps(root.nr_blocks):
            raise MetadataCorruption(
                f"data space map index has {len(index)} bitmaps, {nr_bitmaps(root.nr_blocks)} expected"
            )
        return cls(tm, root, index)

    def extend(self, new_nr_blocks: int) -> None:
        if new_nr_blocks < self.nr_blocks:
            raise ValueError("data space maps cannot shrink")
        self._grow_pages(new_nr_blocks)

    def commit(self) -> SmRoot:
        for i in self._write_pages():
            self.index_root, _ = btree.insert(self.tm, self.index_root, i, self.index[i].pack(), INDEX_VT)
        self._apply_overflow()
        self._end_transaction()
        return self.root()

    def root(self) -> SmRoot:
        return SmRoot(self.nr_blocks, self.nr_allocated, self.index_root, self.ref_count_root)


class MetadataSpaceMap(SpaceMap):
    """The metadata space map: one index block, counts itself (``dm-space-map-metadata``)."""

    what = "metadata"

    def __init__(self, tm: TransactionManager, root: SmRoot, index: list[IndexEntry]) -> None:
        super().__init__(tm, root.nr_blocks, root.nr_allocated, index, root.ref_count_root)
        self.index_blocknr = root.bitmap_root
        tm.sm = self

    @classmethod
    def format(cls, tm: TransactionManager, nr_blocks: int) -> MetadataSpaceMap:
        """Bootstrap on an empty device: index block 1, overflow root 2, bitmaps from 3 (kernel layout)."""
        nr_blocks = min(nr_blocks, MAX_METADATA_BLOCKS)
        k = nr_bitmaps(nr_blocks)
        if nr_blocks < 3 + k + 8:
            raise NoSpaceError("metadata (device too small to format)")
        index = [IndexEntry(3 + j, 0, 0) for j in range(k)]
        sm = cls(tm, SmRoot(nr_blocks, 0, 1, 2), index)
        for j in range(k):
            sm._pages[j] = bytearray(E)
            sm._unwritten.add(j)
            tm.place(BitmapBlock(3 + j, bytearray(E)))
        tm.place(IndexBlock(1, []))
        tm.place(Node.empty(2, leaf=True, value_size=REF_COUNT_VT.size))
        for b in range(3 + k):
            sm._set(b, 1, 0)
        sm._committed.clear()
        sm._cursor = 3 + k
        return sm

    @classmethod
    def open(cls, tm: TransactionManager, root: SmRoot) -> MetadataSpaceMap:
        n = nr_bitmaps(root.nr_blocks)
        if n > MAX_METADATA_BITMAPS:
            raise MetadataCorruption(f"metadata space map: {root.nr_blocks} blocks need {n} bitmaps (max 255)")
        idx = tm.read(root.bitmap_root, IndexBlock.unpack, IndexBlock)
        return cls(tm, root, list(idx.entries[:n]))

    def extend(self, new_nr_blocks: int) -> None:
        new_nr_blocks = min(new_nr_blocks, MAX_METADATA_BLOCKS)
        if new_nr_blocks < self.nr_blocks:
            raise ValueError("metadata space maps cannot shrink")
        self._grow_pages(new_nr_blocks)

    def commit(self) -> SmRoot:
        index_block, _ = self.tm.shadow(self.index_blocknr, IndexBlock.unpack, IndexBlock)
        self.index_blocknr = index_block.blocknr
        while self._overflow or self._unwritten:
            self._apply_overflow()
            self._write_pages()
        index_block.entries = list(self.index)
        self._end_transaction()
        return self.root()

    def root(self) -> SmRoot:
        return SmRoot(self.nr_blocks, self.nr_allocated, self.index_blocknr, self.ref_count_root)
