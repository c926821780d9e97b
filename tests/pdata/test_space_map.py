"""Space maps: allocation rule, overflow counts, growth across bitmap boundaries, resize.

Data space-map tests go through PoolMetadata (alloc/inc/dec_data_block, resize_data_dev); metadata
space-map tests use the pool's ``msm`` directly and let ``thin_check`` (which verifies every metadata
reference count) judge the result.  A Hypothesis state machine compares data counts with a Counter.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from devmapper.blockdev import FileBlockDevice, MemoryBlockDevice
from devmapper.blockdev.base import BlockDevice
from devmapper.errors import DeviceError, NoSpaceError
from devmapper.format.bitmap import ENTRIES_PER_BLOCK, unpack_bitmap, unpack_index_block
from devmapper.format.records import IndexEntry
from devmapper.format.superblock import Superblock
from devmapper.pdata import btree
from devmapper.thin.metadata import PoolMetadata
from helpers.tools import require_tool

E = ENTRIES_PER_BLOCK  # 16320

try:  # the independent checker, written by another engineer; optional here
    from devmapper.thin.check import check_metadata
except ImportError:  # pragma: no cover
    check_metadata = None


# -- helpers ------------------------------------------------------------------------------------------


def tool(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool(args[0]), *args[1:]], capture_output=True, text=True, check=False,
        env=dict(os.environ, LC_ALL="C"),
    )


def image_file(dev: BlockDevice, tmp_path: Path, name: str = "meta.img") -> Path:
    if isinstance(dev, FileBlockDevice):
        return Path(dev.path)
    path = tmp_path / name
    path.write_bytes(dev.read(0, dev.size()))
    return path


def assert_thin_check(dev: BlockDevice, tmp_path: Path) -> None:
    proc = tool(["thin_check", str(image_file(dev, tmp_path))])
    assert proc.returncode == 0, f"thin_check failed:\n{proc.stdout}\n{proc.stderr}"


def assert_our_check(dev: BlockDevice) -> None:
    """devmapper.thin.check (when present) finds nothing wrong with the committed image."""
    if check_metadata is None:
        return
    ro = FileBlockDevice(image_file(dev, Path(os.environ["DEVMAPPER_STATE_DIR"]), "ours.img"), read_only=True)
    try:
        report = check_metadata(ro)
    finally:
        ro.close()
    assert report.ok, "; ".join(str(d) for d in report.defects)


def on_disk_sb(pmd: PoolMetadata) -> Superblock:
    return Superblock.unpack(pmd.bm.read(0), 0)


def bitmap_entry(pmd: PoolMetadata, index: list[IndexEntry], b: int) -> int:
    e = index[b // E]
    return unpack_bitmap(pmd.bm.read(e.blocknr), e.blocknr)[b % E]


def data_index(pmd: PoolMetadata) -> list[IndexEntry]:
    """The committed data space-map index (a B-tree keyed by bitmap number)."""
    root = on_disk_sb(pmd).data_sm_root.bitmap_root
    items = list(btree.iterate(pmd.tm, root))
    assert [k for k, _ in items] == list(range(len(items)))
    return [IndexEntry.unpack(v) for _, v in items]


def metadata_index(pmd: PoolMetadata) -> list[IndexEntry]:
    root = on_disk_sb(pmd).metadata_sm_root
    n = (root.nr_blocks + E - 1) // E
    entries = unpack_index_block(pmd.bm.read(root.bitmap_root), root.bitmap_root)
    assert all(e == IndexEntry(0, 0, 0) for e in entries[n:])
    return entries[:n]


def assert_index_hints(pmd: PoolMetadata, index: list[IndexEntry], nr_blocks: int) -> None:
    """nr_free > 0 whenever a free entry exists; none_free_before <= the first free entry."""
    for i, e in enumerate(index):
        entries = unpack_bitmap(pmd.bm.read(e.blocknr), e.blocknr)
        real = min(E, nr_blocks - i * E)
        assert not any(entries[real:]), f"bitmap {i}: entries set past nr_blocks"
        first_free = entries.find(0, 0, real)
        if first_free >= 0:
            assert e.nr_free > 0, f"bitmap {i}: free entries but nr_free 0"
            assert e.none_free_before <= first_free, f"bitmap {i}: none_free_before {e.none_free_before} > {first_free}"
        assert e.nr_free >= entries[:real].count(0), f"bitmap {i}: nr_free {e.nr_free} too small"


def new_pool(nr_data_blocks: int, metadata_bytes: int = 4 << 20) -> tuple[MemoryBlockDevice, PoolMetadata]:
    dev = MemoryBlockDevice(metadata_bytes)
    return dev, PoolMetadata.format(dev, 128, nr_data_blocks)


# -- allocation rule ----------------------------------------------------------------------------------


def test_blocks_freed_in_a_transaction_are_not_reused_before_commit(tmp_path: Path) -> None:
    dev, pmd = new_pool(100)
    got = [pmd.alloc_data_block() for _ in range(100)]
    assert sorted(got) == list(range(100))
    assert pmd.nr_free_data_blocks() == 0
    with pytest.raises(NoSpaceError):
        pmd.alloc_data_block()
    pmd.commit()
    freed = [3, 17, *range(40, 50), 99]
    for b in freed:
        pmd.dec_data_block(b)
    assert pmd.nr_free_data_blocks() == len(freed)
    with pytest.raises(NoSpaceError):  # free now, but still allocated in the committed state
        pmd.alloc_data_block()
    pmd.commit()
    again = [pmd.alloc_data_block() for _ in freed]
    assert sorted(again) == sorted(freed)
    with pytest.raises(NoSpaceError):
        pmd.alloc_data_block()
    pmd.commit()
    assert on_disk_sb(pmd).data_sm_root.nr_allocated == 100
    assert_thin_check(dev, tmp_path)


def test_block_allocated_and_freed_in_one_transaction_is_reusable_at_once() -> None:
    _dev, pmd = new_pool(10)
    got = [pmd.alloc_data_block() for _ in range(10)]
    pmd.dec_data_block(got[3])
    assert pmd.alloc_data_block() == got[3]  # never committed: free in both states


def test_abort_forgets_allocations() -> None:
    _dev, pmd = new_pool(10)
    first = [pmd.alloc_data_block() for _ in range(10)]
    pmd.abort()
    assert pmd.nr_free_data_blocks() == 10
    assert all(pmd.data_block_count(b) == 0 for b in range(10))
    assert sorted(pmd.alloc_data_block() for _ in range(10)) == sorted(first)


def test_metadata_blocks_freed_in_a_transaction_are_not_reused_before_commit(tmp_path: Path) -> None:
    """Shadowing frees the committed copies of nodes; the metadata allocator must not hand them out
    (they hold the committed trees) until the next commit -- then it may."""
    dev, pmd = new_pool(5000, metadata_bytes=1 << 20)  # 256 metadata blocks
    pmd.create_thin(0)
    for v in range(2000):
        pmd.insert(0, v, pmd.alloc_data_block())
    pmd.commit()
    nr = pmd.nr_metadata_blocks()
    before = [pmd.msm.get_count(b) for b in range(nr)]
    pmd.remove_range(0, 0, 1000)  # shadows (frees) the committed path and merges leaves
    for v in range(0, 2000, 50):
        pmd.insert(0, v + 5000, pmd.alloc_data_block())
    freed = {b for b in range(nr) if before[b] > 0 and pmd.msm.get_count(b) == 0}
    assert freed, "the changes freed no committed metadata block"
    grabbed = []
    with pytest.raises(NoSpaceError):
        while True:
            grabbed.append(pmd.msm.new_block())
    assert not freed & set(grabbed), f"handed out committed blocks {sorted(freed & set(grabbed))}"
    assert pmd.nr_free_metadata_blocks() == len(freed)
    for b in grabbed:
        pmd.msm.dec(b)
    pmd.commit()
    assert_thin_check(dev, tmp_path)
    grabbed = []
    with pytest.raises(NoSpaceError):
        while True:
            grabbed.append(pmd.msm.new_block())
    assert freed <= set(grabbed), "blocks freed before the last commit are reusable now"
    for b in grabbed:
        pmd.msm.dec(b)
    pmd.commit()
    assert_thin_check(dev, tmp_path)


# -- overflow (counts >= 3) ---------------------------------------------------------------------------


def test_data_counts_of_three_and_more_go_to_the_overflow_tree_and_back(tmp_path: Path) -> None:
    dev, pmd = new_pool(20000)
    b = 16321  # in the second bitmap
    c = 5
    for _ in range(3):
        pmd.inc_data_block(b)
    for _ in range(1000):
        pmd.inc_data_block(c)
    pmd.inc_data_block(7)
    pmd.inc_data_block(7)
    pmd.commit()
    sb = on_disk_sb(pmd)
    index = data_index(pmd)
    assert len(index) == 2
    assert [bitmap_entry(pmd, index, x) for x in (b, c, 7, 8)] == [3, 3, 2, 0]
    rc_root = sb.data_sm_root.ref_count_root
    assert btree.lookup(pmd.tm, rc_root, b) == 3
    assert btree.lookup(pmd.tm, rc_root, c) == 1000
    assert btree.lookup(pmd.tm, rc_root, 7) is None  # 2 fits in the bitmap
    assert sb.data_sm_root.nr_allocated == 3
    assert_index_hints(pmd, index, 20000)

    reopened = PoolMetadata.open(dev)
    assert [reopened.data_block_count(x) for x in (b, c, 7, 8)] == [3, 1000, 2, 0]

    pmd.dec_data_block(b)
    for _ in range(998):
        pmd.dec_data_block(c)
    pmd.inc_data_block(7)  # 2 -> 3 -> 2 within one transaction: no overflow entry at commit
    pmd.dec_data_block(7)
    pmd.commit()
    index = data_index(pmd)
    assert [bitmap_entry(pmd, index, x) for x in (b, c, 7)] == [2, 2, 2]
    rc_root = on_disk_sb(pmd).data_sm_root.ref_count_root
    assert list(btree.iterate(pmd.tm, rc_root)) == []
    assert [PoolMetadata.open(dev).data_block_count(x) for x in (b, c, 7)] == [2, 2, 2]
    assert_thin_check(dev, tmp_path)


def test_many_overflow_entries_make_a_multi_level_overflow_tree(tmp_path: Path) -> None:
    dev, pmd = new_pool(2000)
    for blk in range(1000):  # 1000 entries > 336 per leaf
        for _ in range(3 + blk % 4):
            pmd.inc_data_block(blk)
    pmd.commit()
    rc_root = on_disk_sb(pmd).data_sm_root.ref_count_root
    assert not pmd.tm.read_node(rc_root).is_leaf
    assert dict(btree.iterate(pmd.tm, rc_root)) == {blk: 3 + blk % 4 for blk in range(1000)}
    for blk in range(0, 1000, 2):
        for _ in range(3 + blk % 4):
            pmd.dec_data_block(blk)
    pmd.commit()
    assert dict(btree.iterate(pmd.tm, on_disk_sb(pmd).data_sm_root.ref_count_root)) == {
        blk: 3 + blk % 4 for blk in range(1, 1000, 2)
    }
    assert pmd.nr_free_data_blocks() == 2000 - 500
    assert_thin_check(dev, tmp_path)


def test_metadata_counts_of_three_and_more_go_to_the_overflow_tree_and_back(tmp_path: Path) -> None:
    """Snapshots share the origin's subtree root: its metadata count climbs past 2 and falls back."""
    dev, pmd = new_pool(1000)
    pmd.create_thin(0)
    for v in range(10):
        pmd.insert(0, v, pmd.alloc_data_block())
    pmd.commit()
    root = btree.lookup(pmd.tm, pmd.mapping_root, 0)
    assert root is not None
    for snap in range(1, 6):
        pmd.create_snap(snap, 0)
    assert pmd.msm.get_count(root) == 6
    pmd.commit()
    rc_root = on_disk_sb(pmd).metadata_sm_root.ref_count_root
    assert btree.lookup(pmd.tm, rc_root, root) == 6
    assert bitmap_entry(pmd, metadata_index(pmd), root) == 3
    assert_thin_check(dev, tmp_path)
    assert_our_check(dev)
    for snap in range(1, 5):
        pmd.delete(snap)
    pmd.commit()
    assert pmd.msm.get_count(root) == 2
    assert bitmap_entry(pmd, metadata_index(pmd), root) == 2
    assert btree.lookup(pmd.tm, on_disk_sb(pmd).metadata_sm_root.ref_count_root, root) is None
    assert_thin_check(dev, tmp_path)
    assert_our_check(dev)


# -- growth -------------------------------------------------------------------------------------------


def test_data_space_map_extends_across_a_bitmap_boundary(tmp_path: Path) -> None:
    dev, pmd = new_pool(16000)
    pmd.resize_data_dev(E)  # exactly one full bitmap
    pmd.commit()
    assert len(data_index(pmd)) == 1
    pmd.resize_data_dev(E + 1)  # one entry into a second bitmap
    pmd.commit()
    index = data_index(pmd)
    assert len(index) == 2
    assert pmd.nr_data_blocks() == E + 1 == on_disk_sb(pmd).data_sm_root.nr_blocks
    assert_index_hints(pmd, index, E + 1)
    got = [pmd.alloc_data_block() for _ in range(E + 1)]
    assert sorted(got) == list(range(E + 1)), "every block, both sides of the boundary, exactly once"
    with pytest.raises(NoSpaceError):
        pmd.alloc_data_block()
    assert pmd.nr_free_data_blocks() == 0
    pmd.commit()
    assert on_disk_sb(pmd).data_sm_root.nr_allocated == E + 1
    assert [bitmap_entry(pmd, data_index(pmd), x) for x in (0, E - 1, E)] == [1, 1, 1]
    assert_index_hints(pmd, data_index(pmd), E + 1)
    pmd.resize_data_dev(3 * E + 5)
    pmd.commit()
    assert pmd.nr_free_data_blocks() == 2 * E + 4
    assert pmd.alloc_data_block() == E + 1  # the cursor carries on where it stopped
    with pytest.raises(DeviceError):
        pmd.resize_data_dev(E)  # no shrinking
    pmd.commit()
    reopened = PoolMetadata.open(dev)
    assert reopened.nr_data_blocks() == 3 * E + 5
    assert reopened.nr_free_data_blocks() == 2 * E + 3
    assert reopened.data_block_count(E) == 1 and reopened.data_block_count(E + 1) == 1
    assert_index_hints(reopened, data_index(reopened), 3 * E + 5)
    assert_thin_check(dev, tmp_path)
    dump = tool(["thin_dump", str(image_file(dev, tmp_path))])
    assert f'nr_data_blocks="{3 * E + 5}"' in dump.stdout


@pytest.mark.parametrize("new_blocks", [1500, E, E + 1, 2 * E + 100], ids=["same-bitmap", "full", "boundary", "three"])
def test_metadata_resize_keeps_thin_check_clean(new_blocks: int, tmp_path: Path) -> None:
    path = tmp_path / "meta"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    dev = FileBlockDevice(path)
    pmd = PoolMetadata.format(dev, 128, 4000)
    pmd.create_thin(0)
    for v in range(600):
        pmd.insert(0, v, pmd.alloc_data_block())
    pmd.create_snap(1, 0)
    pmd.commit()
    pmd.reserve_metadata_snap()
    with pytest.raises(DeviceError):
        pmd.resize_metadata_dev(new_blocks)  # the device has not grown yet
    pmd.abort()
    dev.resize(new_blocks * 4096)
    pmd.resize_metadata_dev(new_blocks)
    pmd.commit()
    assert pmd.nr_metadata_blocks() == new_blocks == on_disk_sb(pmd).metadata_sm_root.nr_blocks
    index = metadata_index(pmd)
    assert len(index) == (new_blocks + E - 1) // E
    assert_index_hints(pmd, index, new_blocks)
    assert pmd.nr_free_metadata_blocks() == new_blocks - on_disk_sb(pmd).metadata_sm_root.nr_allocated
    assert_thin_check(dev, tmp_path)
    assert_our_check(dev)
    with pytest.raises(DeviceError):
        pmd.resize_metadata_dev(1024)  # no shrinking
    pmd.abort()
    # the new space is usable and survives a reopen
    for v in range(600, 3000):
        pmd.insert(1, v, pmd.alloc_data_block())
    pmd.release_metadata_snap()
    pmd.close()
    again = PoolMetadata.open(FileBlockDevice(path))
    assert again.nr_metadata_blocks() == new_blocks
    assert len(list(again.mappings(1))) == 3000
    again.close()
    proc = tool(["thin_check", str(path)])
    assert proc.returncode == 0, proc.stderr


# -- a state machine against a Counter ----------------------------------------------------------------

NR = E + 64  # two bitmaps
blocks = st.one_of(st.integers(0, 40), st.integers(E - 8, E + 8), st.integers(0, NR - 1))


class DataSpaceMapMachine(RuleBasedStateMachine):
    """Data counts vs a Counter: alloc obeys "free now and at the last commit", counts persist."""

    def __init__(self) -> None:
        super().__init__()
        self.dev = MemoryBlockDevice(4 << 20)
        self.pmd = PoolMetadata.format(self.dev, 128, NR)
        self.cur: Counter[int] = Counter()
        self.committed: Counter[int] = Counter()

    @rule(n=st.integers(1, 50))
    def alloc(self, n: int) -> None:
        for _ in range(n):
            b = self.pmd.alloc_data_block()
            assert self.cur[b] == 0, f"allocated block {b}, which has count {self.cur[b]}"
            assert self.committed[b] == 0, f"allocated block {b}, counted {self.committed[b]} at the last commit"
            self.cur[b] = 1

    @rule(b=blocks, times=st.sampled_from([1, 1, 2, 3, 40]))
    def inc(self, b: int, times: int) -> None:
        for _ in range(times):
            self.pmd.inc_data_block(b)
            self.cur[b] += 1

    @precondition(lambda self: +self.cur)
    @rule(data=st.data())
    def dec(self, data: st.DataObject) -> None:
        b = data.draw(st.sampled_from(sorted(+self.cur)))
        times = data.draw(st.integers(1, self.cur[b]))
        for _ in range(times):
            self.pmd.dec_data_block(b)
            self.cur[b] -= 1

    @rule()
    def commit(self) -> None:
        self.pmd.commit()
        self.committed = Counter(+self.cur)
        assert on_disk_sb(self.pmd).data_sm_root.nr_allocated == len(+self.cur)

    @rule()
    def abort(self) -> None:
        self.pmd.abort()
        self.cur = Counter(self.committed)

    @rule()
    def reopen(self) -> None:
        self.pmd = PoolMetadata.open(self.dev)  # the old object is dropped: last commit
        self.cur = Counter(self.committed)

    @invariant()
    def counts_match(self) -> None:
        for b in set(self.cur) | {0, E - 1, E, NR - 1}:
            assert self.pmd.data_block_count(b) == self.cur[b], f"block {b}"
        assert self.pmd.nr_free_data_blocks() == NR - len(+self.cur)


def test_data_space_map_against_counter(tmp_path: Path) -> None:
    run_state_machine_as_test(DataSpaceMapMachine, settings=settings(stateful_step_count=30))


def test_counter_machine_image_passes_thin_check(tmp_path: Path) -> None:
    """A pinned run of the machine: the committed image with overflow entries in both bitmaps."""
    m = DataSpaceMapMachine()
    m.alloc(30)
    m.inc(E + 3, 40)
    m.inc(E - 1, 3)
    m.commit()
    for _ in range(39):
        m.pmd.dec_data_block(E + 3)
        m.cur[E + 3] -= 1
    m.alloc(5)
    m.commit()
    m.counts_match()
    m.reopen()
    m.counts_match()
    assert_thin_check(m.dev, tmp_path)
    assert_index_hints(m.pmd, data_index(m.pmd), NR)
