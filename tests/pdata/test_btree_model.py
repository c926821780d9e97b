"""pdata.btree against a dict: a Hypothesis state machine driving the B-tree code directly.

The tree under test is thin device 0's mapping subtree inside a minimal pool image built from the
pdata layer alone (transaction manager + metadata space map + empty data space map + details and
top-level trees), so that after every commit the real ``thin_check`` can judge the image and
``thin_dump`` can list the tree's contents.  A second device (1) optionally holds a frozen clone of the
tree (its root gains a reference, as ``create_snap`` does), so later changes must copy shared nodes
and leave the clone intact.

Checked after every step:

* contents (iterate, lookup, lookup_next) equal the dict, for the tree and for the clone;
* keys strictly ascending; every non-root node holds >= max_entries // 3 entries; parent key[i] <= first
  key of child i and every key of child i < key[i+1]; all leaves at the same depth; canonical
  max_entries / value sizes;
* value references, counted with a Counter from the value type's inc/dec callbacks, equal the number of
  distinct reachable leaves naming each value (the data space map rule of dm-thin);
* the metadata space map's count of each tree node equals the number of parent pointers to it.

After every commit: ``thin_check`` exits 0 and ``thin_dump`` lists exactly the dict's mappings.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import xml.etree.ElementTree as ET
from bisect import bisect_left
from collections import Counter
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from devmapper.blockdev import MemoryBlockDevice
from devmapper.format.btree_node import calc_max_entries
from devmapper.format.records import DeviceDetails
from devmapper.format.superblock import THIN_SUPERBLOCK_MAGIC, THIN_VERSION, Superblock
from devmapper.pdata import btree
from devmapper.pdata.block_manager import BlockManager
from devmapper.pdata.space_map import DiskSpaceMap, MetadataSpaceMap
from devmapper.pdata.transaction_manager import TransactionManager
from helpers.tools import require_tool, run_tools

METADATA_BYTES = 16 << 20  # 4096 metadata blocks: room for ~40k keys plus copy-on-write copies
MAX_MODEL_KEYS = 40_000
U64 = (1 << 64) - 1
TOP_VT = btree.ValueType(8)  # top-level leaf of this scaffold: never shared, never overwritten
DETAILS_VT = btree.ValueType(DeviceDetails.SIZE)

small_keys = st.integers(0, 4000)
huge_keys = st.integers(0, U64)
top_keys = st.integers(U64 - 4000, U64)
any_key = st.one_of(small_keys, small_keys, huge_keys, top_keys)


def write_sparse_image(dev: MemoryBlockDevice, path: Path) -> None:
    """Copy a memory device into a (sparse) file for the external tools."""
    chunk = 1 << 20
    zero = bytes(chunk)
    with open(path, "wb") as f:
        f.truncate(dev.size())
        for off in range(0, dev.size(), chunk):
            n = min(chunk, dev.size() - off)
            data = dev.read(off, n)
            if data != zero[:n]:
                f.seek(off)
                f.write(data)


def parse_dump(xml_text: str) -> dict[int, dict[int, tuple[int, int]]]:
    """thin_dump's devices -> {vblock: (data_block, time)}, ranges expanded."""
    root = ET.fromstring(xml_text)
    out: dict[int, dict[int, tuple[int, int]]] = {}
    for dev in root.findall("device"):
        maps: dict[int, tuple[int, int]] = {}
        for m in dev:
            t = int(m.get("time", "0"))
            if m.tag == "single_mapping":
                maps[int(m.get("origin_block", ""))] = (int(m.get("data_block", "")), t)
            else:
                assert m.tag == "range_mapping", m.tag
                ob, db, n = int(m.get("origin_begin", "")), int(m.get("data_begin", "")), int(m.get("length", ""))
                for i in range(n):
                    maps[ob + i] = (db + i, t)
        out[int(dev.get("dev_id", ""))] = maps
    return out


def render_dump(trans_id: int, devices: dict[int, dict[int, int]]) -> str:
    """The exact text thin_dump 0.9.0 prints for this scaffold: runs of consecutive virtual and data
    blocks with one time become range_mapping, runs of one single_mapping."""
    out = [
        f'<superblock uuid="" time="0" transaction="{trans_id}" flags="0" version="2" '
        f'data_block_size="128" nr_data_blocks="0">'
    ]
    for dev_id, maps in sorted(devices.items()):
        out.append(
            f'  <device dev_id="{dev_id}" mapped_blocks="{len(maps)}" transaction="0" creation_time="0" snap_time="0">'
        )
        items = sorted(maps.items())
        i = 0
        while i < len(items):
            v0, x0 = items[i]
            b0, t0 = x0 >> 24, x0 & 0xFFFFFF
            j = i + 1
            while j < len(items) and items[j][0] == v0 + (j - i) and items[j][1] == ((b0 + j - i) << 24) | t0:
                j += 1
            if j - i == 1:
                out.append(f'    <single_mapping origin_block="{v0}" data_block="{b0}" time="{t0}"/>')
            else:
                out.append(
                    f'    <range_mapping origin_begin="{v0}" data_begin="{b0}" length="{j - i}" time="{t0}"/>'
                )
            i = j
        out.append("  </device>")
    out.append("</superblock>")
    return "\n".join(out) + "\n"


def check_and_compare(path: Path, trans_id: int, devices: dict[int, dict[int, int]]) -> None:
    """thin_check must exit 0 and thin_dump must list exactly ``devices`` (dev -> {key: block_time}).

    Fast path: thin_dump's text equals the rendering of the model.  Otherwise the XML is parsed and
    compared by content (so another tools version with other formatting still gets a fair judgement).
    """
    check, dump = run_tools([require_tool("thin_check"), str(path)], [require_tool("thin_dump"), str(path)])
    assert check.returncode == 0, f"thin_check failed:\n{check.stdout}\n{check.stderr}"
    assert dump.returncode == 0, f"thin_dump failed:\n{dump.stdout}\n{dump.stderr}"
    if dump.stdout == render_dump(trans_id, devices):
        return
    dumped = parse_dump(dump.stdout)
    expect = {d: {k: (v >> 24, v & 0xFFFFFF) for k, v in maps.items()} for d, maps in devices.items()}
    assert dumped.keys() == expect.keys()
    for dev_id, maps in expect.items():
        assert dumped[dev_id] == maps, f"thin_dump of device {dev_id} differs from the model"


class Scaffold:
    """A pool image whose device 0 maps through the tree under test (and device 1 through a clone)."""

    def __init__(self, dev: MemoryBlockDevice, vt: btree.ValueType) -> None:
        self.dev = dev
        self.vt = vt
        self.tm = TransactionManager(BlockManager(dev))
        self.msm = MetadataSpaceMap.format(self.tm, dev.size() // 4096)
        self.dsm = DiskSpaceMap.create(self.tm)
        self.top_root = btree.empty_tree(self.tm, TOP_VT)
        self.details_root = btree.empty_tree(self.tm, DETAILS_VT)
        self.root = btree.empty_tree(self.tm, vt)
        self.top_root, _ = btree.insert(self.tm, self.top_root, 0, self.root, TOP_VT)
        self.clone_root: int | None = None
        self.trans_id = 0

    def set_root(self, new_root: int) -> None:
        """Patch device 0's top-level pointer (the old root was shadowed, which dropped its reference)."""
        self.root = new_root
        self.top_root = btree.update_subtree(self.tm, self.top_root, 0, TOP_VT, lambda _old: new_root)

    def commit(self, counts: dict[int, int]) -> None:
        for dev_id in (0, 1):
            if dev_id in counts:
                d = DeviceDetails(counts[dev_id], 0, 0, 0).pack()
                self.details_root, _ = btree.insert(self.tm, self.details_root, dev_id, d, DETAILS_VT)
            else:
                self.details_root, _ = btree.remove(self.tm, self.details_root, dev_id, DETAILS_VT)
        data_root = self.dsm.commit()
        meta_root = self.msm.commit()
        self.tm.pre_commit()
        self.trans_id += 1
        sb = Superblock(
            flags=0, blocknr=0, uuid=bytes(16), magic=THIN_SUPERBLOCK_MAGIC, version=THIN_VERSION, time=0,
            trans_id=self.trans_id, held_root=0, data_sm_root=data_root, metadata_sm_root=meta_root,
            data_mapping_root=self.top_root, device_details_root=self.details_root, data_block_size=128,
            metadata_nr_blocks=self.msm.nr_blocks,
        )
        self.tm.commit_superblock(sb.pack())


def walk(tm: TransactionManager, root: int) -> tuple[list[tuple[int, int]], list[int], dict[int, int]]:
    """Check the structural invariants of the tree at root.

    Returns (items in order, leaf block numbers, {node: parent pointers within this tree}).
    """
    items: list[tuple[int, int]] = []
    leaves: list[int] = []
    parents: Counter[int] = Counter()
    leaf_depths: set[int] = set()

    def visit(b: int, depth: int, lo: int | None, hi: int | None, is_root: bool) -> None:
        node = tm.read_node(b)
        n = node.nr_entries
        where = f"node {b} (depth {depth})"
        assert len(node.values) == n, where
        assert node.value_size == 8, where  # mapping leaves and every internal node
        if not node.is_leaf:
            assert n >= 1, f"{where}: internal node with no entries"
        assert node.max_entries == calc_max_entries(node.value_size), where
        assert n <= node.max_entries, f"{where}: {n} > max {node.max_entries}"
        if not is_root:
            assert n >= node.max_entries // 3, f"{where}: underfull, {n} < {node.max_entries // 3}"
        assert all(a < c for a, c in zip(node.keys, node.keys[1:], strict=False)), f"{where}: keys not ascending"
        if n:
            if lo is not None:
                assert node.keys[0] >= lo, f"{where}: first key {node.keys[0]} below parent key {lo}"
            if hi is not None:
                assert node.keys[-1] < hi, f"{where}: last key {node.keys[-1]} not below next parent key {hi}"
        if node.is_leaf:
            leaf_depths.add(depth)
            leaves.append(b)
            items.extend(zip(node.keys, node.values, strict=True))
            return
        for i, child in enumerate(node.values):
            parents[child] += 1
            nxt = node.keys[i + 1] if i + 1 < n else hi
            visit(child, depth + 1, node.keys[i], nxt, False)

    visit(root, 0, None, None, True)
    assert len(leaf_depths) <= 1, f"leaves at different depths {sorted(leaf_depths)}"
    return items, leaves, dict(parents)


class BTreeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmpdir = Path(tempfile.mkdtemp(prefix="btree-model-"))
        self.refs: Counter[int] = Counter()  # value -> references held, from the value type's callbacks
        self.vt = btree.ValueType(8, inc=self._inc, dec=self._dec)
        self.s = Scaffold(MemoryBlockDevice(METADATA_BYTES), self.vt)
        self.model: dict[int, int] = {}
        self.clone: dict[int, int] | None = None
        self.serial = 0

    def teardown(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    # -- value references --------------------------------------------------------------------------

    def _inc(self, v: int) -> None:
        self.refs[v] += 1

    def _dec(self, v: int) -> None:
        assert self.refs[v] > 0, f"value {v:#x} released more often than referenced"
        self.refs[v] -= 1
        if not self.refs[v]:
            del self.refs[v]

    def fresh_value(self) -> int:
        """A new value, as thin's block_time ((data_block << 24) | time); the caller's reference passes to
        the tree."""
        self.serial += 1
        v = (self.serial << 24) | (self.serial % 5)
        self.refs[v] += 1
        return v

    # -- helpers -----------------------------------------------------------------------------------

    def _insert(self, key: int, value: int) -> None:
        root, new = btree.insert(self.s.tm, self.s.root, key, value, self.vt)
        self.s.set_root(root)
        assert new == (key not in self.model), f"insert({key}) reported new={new}"
        self.model[key] = value

    def _keys(self) -> list[int]:
        return sorted(self.model)

    # -- rules -------------------------------------------------------------------------------------

    @initialize(n=st.sampled_from([0, 0, 300, 10_000]), stride=st.sampled_from([1, 3, 1 << 40]))
    def start(self, n: int, stride: int) -> None:
        """Some runs begin with a bigger tree (two levels, ~80 leaves), most with an empty one.  (Three
        levels need ~32000 keys: too slow here; ``test_three_level_tree_*`` covers them.)"""
        for k in range(n):
            self._insert(k * stride, self.fresh_value())
        if n:
            self._commit()

    @precondition(lambda self: len(self.model) < MAX_MODEL_KEYS)
    @rule(keys=st.lists(any_key, min_size=50, max_size=500))
    def bulk_insert(self, keys: list[int]) -> None:
        for k in keys:
            self._insert(k, self.fresh_value())

    @precondition(lambda self: len(self.model) < MAX_MODEL_KEYS)
    @rule(
        start=st.one_of(small_keys, st.integers(0, 1 << 48)),
        n=st.integers(50, 3000),
        stride=st.sampled_from([1, 2, 7]),
    )
    def bulk_insert_run(self, start: int, n: int, stride: int) -> None:
        for k in range(start, start + n * stride, stride):
            self._insert(k, self.fresh_value())

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), same=st.booleans())
    def overwrite(self, data: st.DataObject, same: bool) -> None:
        keys = data.draw(st.lists(st.sampled_from(self._keys()), min_size=1, max_size=300))
        for k in keys:
            if same:
                # an equal value: no reference moves (the tree keeps one, ours is dropped here)
                v = self.model[k]
                root, new = btree.insert(self.s.tm, self.s.root, k, v, self.vt)
                self.s.set_root(root)
                assert not new
            else:
                self._insert(k, self.fresh_value())

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), absent=st.lists(any_key, max_size=20))
    def remove(self, data: st.DataObject, absent: list[int]) -> None:
        keys = data.draw(st.lists(st.sampled_from(self._keys()), min_size=1, max_size=400))
        for k in keys + absent:
            root, old = btree.remove(self.s.tm, self.s.root, k, self.vt)
            self.s.set_root(root)
            assert old == self.model.pop(k, None), f"remove({k}) returned {old}"

    @rule(data=st.data())
    def remove_range(self, data: st.DataObject) -> None:
        keys = self._keys()
        if keys and data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(keys) - 1))
            j = data.draw(st.integers(i, min(len(keys), i + data.draw(st.sampled_from([5, 300, 3000, 50_000])))))
            begin = keys[i] - data.draw(st.integers(0, 1))
            end = keys[j] if j < len(keys) else U64
            begin = max(begin, 0)
        else:
            begin = data.draw(any_key)
            end = data.draw(st.integers(begin, min(U64, begin + data.draw(st.sampled_from([1, 100, 1 << 62])))))
        expect = {k for k in self.model if begin <= k < end}
        removed: list[tuple[int, int]] = []
        root, n = btree.remove_range(self.s.tm, self.s.root, begin, end, self.vt, lambda k, v: removed.append((k, v)))
        self.s.set_root(root)
        assert n == len(expect), f"remove_range({begin}, {end}) removed {n}, expected {len(expect)}"
        assert sorted(removed) == sorted((k, self.model[k]) for k in expect)
        for k in expect:
            del self.model[k]

    @rule(key=any_key, data=st.data())
    def lookup(self, key: int, data: st.DataObject) -> None:
        if self.model and data.draw(st.booleans()):
            key = data.draw(st.sampled_from(self._keys()))
        assert btree.lookup(self.s.tm, self.s.root, key) == self.model.get(key)

    @rule(key=any_key, data=st.data())
    def lookup_next(self, key: int, data: st.DataObject) -> None:
        keys = self._keys()
        if keys and data.draw(st.booleans()):
            key = data.draw(st.sampled_from(keys)) + data.draw(st.integers(-1, 1))
            key = min(max(key, 0), U64)
        i = bisect_left(keys, key)
        expect = (keys[i], self.model[keys[i]]) if i < len(keys) else None
        assert btree.lookup_next(self.s.tm, self.s.root, key) == expect
        if self.clone is not None and self.s.clone_root is not None:
            ckeys = sorted(self.clone)
            i = bisect_left(ckeys, key)
            expect = (ckeys[i], self.clone[ckeys[i]]) if i < len(ckeys) else None
            assert btree.lookup_next(self.s.tm, self.s.clone_root, key) == expect

    @precondition(lambda self: self.clone is None)
    @rule()
    def clone_tree(self) -> None:
        """Share the whole tree with device 1 (what create_snap does to a mapping subtree)."""
        self.s.tm.inc(self.s.root)
        self.s.clone_root = self.s.root
        self.s.top_root, _ = btree.insert(self.s.tm, self.s.top_root, 1, self.s.root, TOP_VT)
        self.clone = dict(self.model)

    @precondition(lambda self: self.clone is not None)
    @rule()
    def drop_clone(self) -> None:
        assert self.s.clone_root is not None
        self.s.top_root, old = btree.remove(self.s.tm, self.s.top_root, 1, TOP_VT)
        assert old == self.s.clone_root
        btree.delete_tree(self.s.tm, self.s.clone_root, self.vt)
        self.s.clone_root = None
        self.clone = None

    @rule()
    def commit(self) -> None:
        self._commit()

    def _commit(self) -> None:
        counts = {0: len(self.model)}
        if self.clone is not None:
            counts[1] = len(self.clone)
        self.s.commit(counts)
        path = self.tmpdir / "meta.img"
        write_sparse_image(self.s.dev, path)
        devices = {0: self.model}
        if self.clone is not None:
            devices[1] = self.clone
        check_and_compare(path, self.s.trans_id, devices)

    # -- invariants --------------------------------------------------------------------------------

    @invariant()
    def tree_matches_model(self) -> None:
        items, leaves, parents = walk(self.s.tm, self.s.root)
        assert items == sorted(self.model.items())
        all_leaves = set(leaves)
        node_refs = Counter(parents)
        node_refs[self.s.root] += 1  # the top-level leaf
        if self.s.clone_root is not None:
            assert self.clone is not None
            citems, cleaves, _ = walk(self.s.tm, self.s.clone_root)
            assert citems == sorted(self.clone.items()), "the clone changed"
            # a node reachable from both trees has one pointer per distinct parent block
            node_refs = self._distinct_parent_pointers()
            all_leaves |= set(cleaves)
        # metadata counts: one per distinct parent pointer
        for b, expected in node_refs.items():
            assert self.s.tm.ref_count(b) == expected, f"node {b}: count {self.s.tm.ref_count(b)}, expected {expected}"
        # value references: one per distinct leaf naming the value
        leaf_refs: Counter[int] = Counter()
        for b in all_leaves:
            leaf_refs.update(self.s.tm.read_node(b).values)
        assert leaf_refs == self.refs, "value references differ from the number of leaves naming them"

    def _distinct_parent_pointers(self) -> Counter[int]:
        """Pointers to each node from distinct parent blocks (and the two top-level entries)."""
        assert self.s.clone_root is not None
        refs: Counter[int] = Counter([self.s.root, self.s.clone_root])
        seen: set[int] = set()
        stack = [self.s.root, self.s.clone_root]
        while stack:
            b = stack.pop()
            if b in seen:
                continue
            seen.add(b)
            node = self.s.tm.read_node(b)
            if not node.is_leaf:
                refs.update(node.values)
                stack.extend(node.values)
        return refs


def test_btree_against_dict() -> None:
    require_tool("thin_check")
    require_tool("thin_dump")
    run_state_machine_as_test(BTreeMachine, settings=settings(stateful_step_count=20))


def _depth(m: BTreeMachine) -> int:
    node = m.s.tm.read_node(m.s.root)
    depth = 1
    while not node.is_leaf:
        node = m.s.tm.read_node(node.values[0])
        depth += 1
    return depth


def test_three_level_tree_random_operations_with_a_clone() -> None:
    """A seeded run of the machine's rules on a 3-level tree shared with a clone: internal nodes below
    the root split, merge and redistribute while the clone must stay intact."""
    require_tool("thin_check")
    rnd = random.Random(20240611)
    m = BTreeMachine()
    try:
        m.start(40_000, 5)
        assert _depth(m) == 3
        m.clone_tree()
        for step in range(36):
            keys = m._keys()
            op = step % 4
            if op == 0:  # scattered removals, some absent
                for k in rnd.sample(keys, min(len(keys), 1500)) + [rnd.randrange(1 << 64) for _ in range(20)]:
                    root, old = btree.remove(m.s.tm, m.s.root, k, m.vt)
                    m.s.set_root(root)
                    assert old == m.model.pop(k, None)
            elif op == 1:  # a range removal spanning many leaves
                i = rnd.randrange(len(keys)) if keys else 0
                j = min(len(keys), i + rnd.choice([100, 2000, 8000]))
                begin = keys[i] if keys else 0
                end = keys[j] if j < len(keys) else U64
                expect = {k for k in m.model if begin <= k < end}
                root, n = btree.remove_range(m.s.tm, m.s.root, begin, end, m.vt)
                m.s.set_root(root)
                assert n == len(expect)
                for k in expect:
                    del m.model[k]
            elif op == 2:  # inserts and overwrites
                for k in [rnd.randrange(250_000) for _ in range(1500)] + rnd.sample(keys, min(len(keys), 300)):
                    m._insert(k, m.fresh_value())
            else:
                m._commit()
            m.tree_matches_model()
            if step == 17:
                m.drop_clone()
                m.clone_tree()
        m.drop_clone()
        m._commit()
    finally:
        m.teardown()


def test_three_level_tree_survives_removal_of_everything() -> None:
    """A deterministic deep case: 3 levels, removed in slices from both ends and the middle."""
    require_tool("thin_check")
    m = BTreeMachine()
    try:
        for k in range(40_000):
            m._insert(k * 5, m.fresh_value())
        m.tree_matches_model()
        assert _depth(m) == 3
        m._commit()
        for begin, end in [(0, 20_000), (199_000, 200_000), (60_000, 140_000), (0, 1 << 64), (0, 1)]:
            expect = {k for k in m.model if begin <= k < end}
            root, n = btree.remove_range(m.s.tm, m.s.root, begin, min(end, U64), m.vt)
            m.s.set_root(root)
            assert n == len(expect)
            for k in expect:
                del m.model[k]
            m.tree_matches_model()
            m._commit()
        assert m.model == {}
        assert m.s.tm.read_node(m.s.root).is_leaf
    finally:
        m.teardown()
