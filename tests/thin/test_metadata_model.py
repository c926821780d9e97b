"""PoolMetadata against an in-memory model: a Hypothesis state machine, judged by the real tools.

The model is, per thin device, a dict vblock -> (data_block, time) plus the device's details
(transaction id, creation time, snapshot time; mapped_blocks is the dict's size), the pool's time and
transaction id, the last committed copy of all that (for abort and crash-reopen) and, while a metadata
snapshot is held, the copy it froze.

After every step the engine's own view (devices, details, mappings, data block reference counts) must
equal the model.  After every commit ``thin_check`` must pass and ``thin_dump`` (and ``thin_dump -m``
with a held metadata snapshot) must print exactly the model; ``devmapper.thin.check.check_metadata``,
when present, must find nothing.

Data blocks: an allocated block must be free both now and at the last commit (never a block the
committed trees or the held snapshot reach); a data block's count is the number of distinct mapping
leaves naming it (live trees and the held snapshot's), so it is >= 1 exactly when some device or the
held snapshot maps it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import itertools
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
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

from devmapper.blockdev import FileBlockDevice, MemoryBlockDevice
from devmapper.errors import DeviceError, NoSpaceError
from devmapper.format.records import DeviceDetails
from devmapper.format.superblock import Superblock
from devmapper.pdata import btree
from devmapper.thin.dump import dump as our_dump
from devmapper.thin.metadata import LookupResult, PoolMetadata
from devmapper.thin.xml import XmlWriter
from devmapper.units import MAX_DEV_ID
from helpers.tools import require_tool, run_tools

try:  # the independent checker, written by another engineer; optional here
    from devmapper.thin.check import check_metadata
except ImportError:  # pragma: no cover
    check_metadata = None

METADATA_BYTES = 8 << 20
NR_DATA_BLOCKS = 1500  # small, so freed blocks are reused and the pool can run out
DATA_BLOCK_SIZE = 128

Mappings = dict[int, tuple[int, int]]


@dataclasses.dataclass
class State:
    """What the pool holds: devices (mappings + details), time, transaction id."""

    maps: dict[int, Mappings] = dataclasses.field(default_factory=dict)
    details: dict[int, tuple[int, int, int]] = dataclasses.field(default_factory=dict)  # trans, ctime, stime
    time: int = 0
    trans_id: int = 0

    def clone(self) -> State:
        return copy.deepcopy(self)

    def data_blocks(self) -> set[int]:
        return {b for m in self.maps.values() for b, _t in m.values()}

    def device_details(self, dev: int) -> DeviceDetails:
        trans, ctime, stime = self.details[dev]
        return DeviceDetails(len(self.maps[dev]), trans, ctime, stime)


# -- the real tools -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Dump:
    sb: dict[str, str]
    details: dict[int, dict[str, str]]
    maps: dict[int, Mappings]


def parse_dump(xml_text: str) -> Dump:
    root = ET.fromstring(xml_text)
    assert root.tag == "superblock"
    details: dict[int, dict[str, str]] = {}
    maps: dict[int, Mappings] = {}
    for dev in root:
        assert dev.tag == "device", dev.tag
        dev_id = int(dev.attrib["dev_id"])
        assert dev_id not in details, f"device {dev_id} dumped twice"
        details[dev_id] = dict(dev.attrib)
        m: Mappings = {}
        for e in dev:
            t = int(e.attrib["time"])
            if e.tag == "single_mapping":
                v = int(e.attrib["origin_block"])
                assert v not in m
                m[v] = (int(e.attrib["data_block"]), t)
            else:
                assert e.tag == "range_mapping", e.tag
                ob, db, n = (int(e.attrib[k]) for k in ("origin_begin", "data_begin", "length"))
                assert n >= 2, "a run of one must be a single_mapping"
                for i in range(n):
                    assert ob + i not in m
                    m[ob + i] = (db + i, t)
        maps[dev_id] = m
    return Dump(dict(root.attrib), details, maps)


def assert_dump_equals(dump: Dump, state: State, nr_data_blocks: int, what: str) -> None:
    assert dump.sb == {
        "uuid": "", "time": str(state.time), "transaction": str(state.trans_id), "flags": "0", "version": "2",
        "data_block_size": str(DATA_BLOCK_SIZE), "nr_data_blocks": str(nr_data_blocks),
    }, what
    assert sorted(dump.details) == sorted(state.maps), f"{what}: devices differ"
    for dev in state.maps:
        d = state.device_details(dev)
        assert dump.details[dev] == {
            "dev_id": str(dev), "mapped_blocks": str(d.mapped_blocks), "transaction": str(d.transaction_id),
            "creation_time": str(d.creation_time), "snap_time": str(d.snapshotted_time),
        }, f"{what}: details of device {dev}"
        assert dump.maps[dev] == state.maps[dev], f"{what}: mappings of device {dev}"


def our_xml(path: Path, metadata_snap: bool = False) -> str:
    """devmapper's own dump of the committed image, as thin_dump XML."""
    dev = FileBlockDevice(path, read_only=True)
    try:
        buf = io.StringIO()
        our_dump(dev, XmlWriter(buf), metadata_snap=metadata_snap)
        return buf.getvalue()
    finally:
        dev.close()


# -- reference counts from the trees ------------------------------------------------------------------


def leaf_data_counts(pmd: PoolMetadata) -> Counter[int]:
    """Expected data counts: entries of distinct mapping leaves (live trees and the held snapshot's)."""
    tops = [pmd.mapping_root]
    if pmd.held_root:
        tops.append(Superblock.unpack(pmd.bm.read(pmd.held_root), pmd.held_root).data_mapping_root)
    seen: set[int] = set()
    counts: Counter[int] = Counter()
    stack = [sub for top in tops for _k, sub in btree.iterate(pmd.tm, top)]
    while stack:
        b = stack.pop()
        if b in seen:
            continue
        seen.add(b)
        node = pmd.tm.read_node(b)
        if node.is_leaf:
            counts.update(v >> 24 for v in node.values)
        else:
            stack.extend(node.values)
    return counts


# -- the machine --------------------------------------------------------------------------------------

dev_ids = st.sampled_from([0, 1, 2, 3, 4, MAX_DEV_ID])
small_vblocks = st.integers(0, 1500)
vblocks = st.one_of(small_vblocks, small_vblocks, st.integers(0, (1 << 40) - 1))


class MetadataMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmpdir = Path(tempfile.mkdtemp(prefix="metadata-model-"))
        self.path = self.tmpdir / "meta"
        with open(self.path, "wb") as f:
            f.truncate(METADATA_BYTES)
        self.pmd = PoolMetadata.format(FileBlockDevice(self.path), DATA_BLOCK_SIZE, NR_DATA_BLOCKS)
        self.cur = State()
        self.committed = State()
        self.held: State | None = None
        self._verified: tuple[bytes, str] | None = None

    def teardown(self) -> None:
        try:
            self.pmd.dev.close()
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    # -- model helpers -----------------------------------------------------------------------------

    def _did_commit(self) -> None:
        self.committed = self.cur.clone()

    def _unavailable(self) -> set[int]:
        """Blocks alloc_data_block must not return: mapped now, at the last commit, or by the held snapshot."""
        out = self.cur.data_blocks() | self.committed.data_blocks()
        if self.held is not None:
            out |= self.held.data_blocks()
        return out

    def _expect_error(self, errno_name: str, fn: object, *args: int) -> None:
        with pytest.raises(DeviceError) as info:
            fn(*args)  # type: ignore[operator]
        assert info.value.errno_name == errno_name, f"{fn}{args}: {info.value.errno_name} != {errno_name}"

    def _devices(self) -> list[int]:
        return sorted(self.cur.maps)

    def _pick(self, data: st.DataObject, existing: bool = True) -> int:
        """A device id: usually an existing one (when asked and there is one), else any."""
        devices = self._devices() if existing else []
        i = data.draw(st.integers(0, len(devices)))
        return devices[i] if i < len(devices) else data.draw(dev_ids)

    # -- rules -------------------------------------------------------------------------------------

    @initialize(ids=st.lists(dev_ids, max_size=3, unique=True), n=st.sampled_from([0, 5, 300]))
    def start(self, ids: list[int], n: int) -> None:
        """Usually a device with some mappings and a chain of snapshots of snapshots."""
        if not ids:
            return
        self.create_thin(ids[0])
        self._insert_run(ids[0], range(0, 2 * n, 2))
        for prev, dev in itertools.pairwise(ids):
            self.create_snap(dev, prev)

    def _insert_run(self, dev: int, targets: Iterable[int]) -> None:
        unavailable = self._unavailable()
        pinned = self.committed.data_blocks() | (self.held.data_blocks() if self.held is not None else set())
        refs = Counter(b for m in self.cur.maps.values() for b, _t in m.values())
        for v in targets:
            if len(unavailable) >= NR_DATA_BLOCKS:
                with pytest.raises(NoSpaceError):
                    self.pmd.alloc_data_block()
                return
            b = self.pmd.alloc_data_block()
            assert 0 <= b < NR_DATA_BLOCKS
            assert b not in unavailable, f"allocated data block {b}, which is still referenced now or committed"
            unavailable.add(b)
            self.pmd.insert(dev, v, b)
            refs[b] += 1
            old = self.cur.maps[dev].get(v)
            self.cur.maps[dev][v] = (b, self.cur.time)
            if old is not None:
                refs[old[0]] -= 1
                if not refs[old[0]] and old[0] not in pinned:
                    unavailable.discard(old[0])  # never committed and now unmapped: free in both states

    @rule(dev=dev_ids)
    def create_thin(self, dev: int) -> None:
        if dev in self.cur.maps:
            self._expect_error("EEXIST", self.pmd.create_thin, dev)
            return
        self.pmd.create_thin(dev)
        self.cur.maps[dev] = {}
        self.cur.details[dev] = (self.cur.trans_id, self.cur.time, self.cur.time)

    @rule(data=st.data())
    def snap(self, data: st.DataObject) -> None:
        """Usually a new id from an existing origin (snapshots of snapshots follow)."""
        ids = [i for i in (0, 1, 2, 3, 4, MAX_DEV_ID) if i not in self.cur.maps] + self._devices()
        dev = ids[data.draw(st.integers(0, len(ids) - 1))]
        self.create_snap(dev, self._pick(data))

    def create_snap(self, dev: int, origin: int) -> None:
        if dev in self.cur.maps:
            self._expect_error("EEXIST", self.pmd.create_snap, dev, origin)
            return
        if origin not in self.cur.maps:
            self._expect_error("ENODATA", self.pmd.create_snap, dev, origin)
            return
        self.pmd.create_snap(dev, origin)
        c = self.cur
        c.time += 1
        trans, ctime, _ = c.details[origin]
        c.details[origin] = (trans, ctime, c.time)
        c.maps[dev] = dict(c.maps[origin])
        c.details[dev] = (c.trans_id, c.time, c.time)

    @rule(data=st.data())
    def delete_device(self, data: st.DataObject) -> None:
        self.delete(self._pick(data))

    def delete(self, dev: int) -> None:
        if dev not in self.cur.maps:
            self._expect_error("ENODATA", self.pmd.delete, dev)
            return
        self.pmd.delete(dev)
        del self.cur.maps[dev]
        del self.cur.details[dev]

    @rule(bad=st.sampled_from([MAX_DEV_ID + 1, 1 << 32]))
    def out_of_range_id(self, bad: int) -> None:
        self._expect_error("EINVAL", self.pmd.create_thin, bad)
        if self.cur.maps:
            self._expect_error("EINVAL", self.pmd.create_snap, bad, self._devices()[0])

    @precondition(lambda self: bool(self.cur.maps))
    @rule(
        data=st.data(),
        start=vblocks,
        n=st.sampled_from([1, 3, 60, 253, 600]),
        stride=st.sampled_from([1, 1, 2, 5]),
        extra=st.lists(vblocks, max_size=5),
        nr_overwrite=st.sampled_from([0, 0, 20, 150]),
    )
    def insert(
        self, data: st.DataObject, start: int, n: int, stride: int, extra: list[int], nr_overwrite: int
    ) -> None:
        """A run of new mappings (several leaves' worth), a few scattered ones, some overwrites."""
        dev = data.draw(st.sampled_from(self._devices()))
        mapped = sorted(self.cur.maps[dev])
        targets = [*range(start, start + n * stride, stride), *extra]
        if mapped and nr_overwrite:
            rnd = data.draw(st.randoms(use_true_random=False))
            targets += rnd.sample(mapped, min(nr_overwrite, len(mapped)))
        self._insert_run(dev, targets)

    @precondition(lambda self: bool(self.cur.maps))
    @rule(data=st.data(), absent=vblocks)
    def remove(self, data: st.DataObject, absent: int) -> None:
        dev = data.draw(st.sampled_from(self._devices()))
        mapped = sorted(self.cur.maps[dev])
        targets = [absent]
        if mapped:
            rnd = data.draw(st.randoms(use_true_random=False))
            targets += rnd.sample(mapped, min(len(mapped), data.draw(st.sampled_from([1, 10, 100]))))
        for v in targets:
            was = v in self.cur.maps[dev]
            assert self.pmd.remove(dev, v) == was, f"remove({dev}, {v})"
            self.cur.maps[dev].pop(v, None)

    @precondition(lambda self: bool(self.cur.maps))
    @rule(data=st.data())
    def remove_range(self, data: st.DataObject) -> None:
        dev = data.draw(st.sampled_from(self._devices()))
        mapped = sorted(self.cur.maps[dev])
        if mapped and data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(mapped) - 1))
            j = data.draw(st.integers(i, len(mapped)))
            begin = mapped[i]
            end = mapped[j] if j < len(mapped) else mapped[-1] + data.draw(st.integers(1, 3))
        else:
            begin = data.draw(vblocks)
            end = begin + data.draw(st.sampled_from([0, 1, 10, 700, 1 << 41]))
        gone = sorted(v for v in self.cur.maps[dev] if begin <= v < end)
        seen: list[tuple[int, int]] = []
        n = self.pmd.remove_range(dev, begin, end, lambda v, b: seen.append((v, b)))
        assert n == len(gone), f"remove_range({dev}, {begin}, {end}) = {n}, expected {len(gone)}"
        assert sorted(seen) == [(v, self.cur.maps[dev][v][0]) for v in gone]
        for v in gone:
            del self.cur.maps[dev][v]

    @precondition(lambda self: bool(self.cur.maps))
    @rule(data=st.data(), v=vblocks)
    def lookup(self, data: st.DataObject, v: int) -> None:
        dev = data.draw(st.sampled_from(self._devices()))
        mapped = sorted(self.cur.maps[dev])
        if mapped and data.draw(st.booleans()):
            v = data.draw(st.sampled_from(mapped))
        got = self.pmd.lookup(dev, v)
        if v not in self.cur.maps[dev]:
            assert got is None
        else:
            b, t = self.cur.maps[dev][v]
            stime = self.cur.details[dev][2]
            assert got == LookupResult(b, t, stime > t)

    @rule(right=st.booleans(), new=st.integers(0, (1 << 64) - 1))
    def set_transaction_id(self, right: bool, new: int) -> None:
        cur = self.cur.trans_id if right else self.cur.trans_id + 1
        if not right:
            self._expect_error("EINVAL", self.pmd.set_transaction_id, cur, new)
            return
        self.pmd.set_transaction_id(cur, new)
        self.cur.trans_id = new

    @rule()
    def commit(self) -> None:
        self.pmd.commit()
        self._did_commit()
        self.verify_on_disk()

    @rule(crash=st.booleans())
    def rollback(self, crash: bool) -> None:
        """abort(), or a power cut (drop the object unclosed and reopen): back to the last commit."""
        if crash:
            self.crash_reopen()
        else:
            self.pmd.abort()
            self.cur = self.committed.clone()

    @rule()
    def reserve_metadata_snap(self) -> None:
        if self.held is not None:
            # the kernel commits first, then finds the snapshot: EBUSY with the transaction committed
            self._expect_error("EBUSY", self.pmd.reserve_metadata_snap)
            self._did_commit()
        else:
            held_root = self.pmd.reserve_metadata_snap()
            assert held_root == self.pmd.held_root != 0
            self._did_commit()
            self.held = self.committed.clone()
        self.verify_on_disk()

    @rule()
    def release_metadata_snap(self) -> None:
        if self.held is None:
            self._expect_error("EINVAL", self.pmd.release_metadata_snap)
            return
        self.pmd.release_metadata_snap()
        self.held = None
        self._did_commit()
        self.verify_on_disk()

    @rule()
    def reopen(self) -> None:
        """close() commits; open sees everything."""
        self.pmd.close()
        self._did_commit()
        self.pmd = PoolMetadata.open(FileBlockDevice(self.path), data_block_size=DATA_BLOCK_SIZE)
        self.verify_on_disk()

    def crash_reopen(self) -> None:
        """Drop the object without committing (power cut): open sees the last commit."""
        self.pmd.dev.close()
        self.pmd = PoolMetadata.open(FileBlockDevice(self.path))
        self.cur = self.committed.clone()
        self.verify_on_disk()

    # -- checks ------------------------------------------------------------------------------------

    def verify_on_disk(self) -> None:
        """The committed image against the model, judged by thin_check and thin_dump (-m).

        Skipped when neither the image nor the expected state changed since the last verification.
        """
        key = (hashlib.blake2b(self.path.read_bytes()).digest(), repr((self.committed, self.held)))
        if key == self._verified:
            return
        path = str(self.path)
        cmds = [[require_tool("thin_check"), path], [require_tool("thin_dump"), path]]
        if self.held is not None:
            cmds.append([require_tool("thin_dump"), "-m", path])
        check, dump, *snap = run_tools(*cmds)
        assert check.returncode == 0, f"thin_check failed:\n{check.stdout}\n{check.stderr}"
        assert dump.returncode == 0, f"thin_dump failed:\n{dump.stderr}"
        assert_dump_equals(parse_dump(dump.stdout), self.committed, NR_DATA_BLOCKS, "thin_dump")
        assert our_xml(self.path) == dump.stdout, "devmapper.thin.dump differs from thin_dump"
        if self.held is not None:
            (snap_dump,) = snap
            assert snap_dump.returncode == 0, f"thin_dump -m failed:\n{snap_dump.stderr}"
            assert_dump_equals(parse_dump(snap_dump.stdout), self.held, 0, "thin_dump -m")
            # the superblock line differs (see test_our_dump_of_the_metadata_snapshot_*): compare the rest
            ours = our_xml(self.path, metadata_snap=True)
            assert ours.split("\n", 1)[1] == snap_dump.stdout.split("\n", 1)[1], "our dump -m differs"
        if check_metadata is not None:
            dev = FileBlockDevice(self.path, read_only=True)
            try:
                report = check_metadata(dev)
            finally:
                dev.close()
            assert report.ok, "check_metadata: " + "; ".join(str(d) for d in report.defects)
        self._verified = key

    @invariant()
    def engine_matches_model(self) -> None:
        pmd, c = self.pmd, self.cur
        assert pmd.devices() == self._devices()
        assert pmd.trans_id == c.trans_id and pmd.time == c.time
        for dev in c.maps:
            assert pmd.details(dev) == c.device_details(dev), f"details of device {dev}"
            got = list(pmd.mappings(dev))
            assert got == [(v, b, t) for v, (b, t) in sorted(c.maps[dev].items())], f"mappings of device {dev}"
        assert bool(pmd.held_root) == (self.held is not None)

    @invariant()
    def data_counts_match_leaves(self) -> None:
        expect = leaf_data_counts(self.pmd)
        referenced = self.cur.data_blocks() | (self.held.data_blocks() if self.held is not None else set())
        assert set(expect) == referenced, "leaves name other data blocks than the model maps"
        for b, n in expect.items():
            assert self.pmd.data_block_count(b) == n, f"data block {b}: count {self.pmd.data_block_count(b)} != {n}"
        # every other block is free: nothing leaked
        assert self.pmd.nr_free_data_blocks() == NR_DATA_BLOCKS - len(referenced)


def test_pool_metadata_against_model() -> None:
    require_tool("thin_check")
    require_tool("thin_dump")
    run_state_machine_as_test(MetadataMachine, settings=settings(stateful_step_count=30))


def test_data_block_counts_with_shared_leaves() -> None:
    """A pinned example: counts follow leaves, not devices (snapshot shares the leaf: count 1)."""
    require_tool("thin_check")
    m = MetadataMachine()
    try:
        m.create_thin(0)
        m.pmd.insert(0, 7, b := m.pmd.alloc_data_block())
        m.cur.maps[0][7] = (b, 0)
        m.create_snap(1, 0)
        assert m.pmd.data_block_count(b) == 1  # one leaf, two devices
        m.commit()
        m.create_snap(2, 1)
        m.pmd.insert(2, 8, c := m.pmd.alloc_data_block())  # copies the shared leaf: b now in two leaves
        m.cur.maps[2][8] = (c, m.cur.time)
        assert m.pmd.data_block_count(b) == 2
        m.data_counts_match_leaves()
        m.engine_matches_model()
        m.commit()
        m.delete(0)
        m.delete(1)
        assert m.pmd.data_block_count(b) == 1
        m.reopen()
        m.engine_matches_model()
        m.data_counts_match_leaves()
    finally:
        m.teardown()


@pytest.mark.parametrize(
    ("what", "value"), [("trans_id", 1 << 64), ("trans_id", -1), ("vblock", 1 << 64), ("vblock", -1)]
)
def test_values_outside_u64_are_refused_up_front(what: str, value: int) -> None:
    pmd = PoolMetadata.format(MemoryBlockDevice(4 << 20), DATA_BLOCK_SIZE, 100)
    pmd.create_thin(0)
    pmd.commit()
    with pytest.raises(DeviceError):
        if what == "trans_id":
            pmd.set_transaction_id(0, value)
        else:
            pmd.insert(0, value, pmd.alloc_data_block())


def test_our_dump_of_the_metadata_snapshot_matches_thin_dump_m(tmp_path: Path) -> None:
    path = tmp_path / "meta"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    pmd = PoolMetadata.format(FileBlockDevice(path), DATA_BLOCK_SIZE, 100)
    pmd.create_thin(0)
    pmd.insert(0, 1, pmd.alloc_data_block())
    pmd.reserve_metadata_snap()  # the copy: time 0, transaction 0
    pmd.set_transaction_id(0, 5)
    pmd.create_snap(1, 0)  # live: time 1, transaction 5
    pmd.close()
    (real,) = run_tools([require_tool("thin_dump"), "-m", str(path)])
    assert real.returncode == 0, real.stderr
    assert real.stdout.startswith('<superblock uuid="" time="0" transaction="0" ')
    assert our_xml(path, metadata_snap=True) == real.stdout
