"""The metadata checker: clean on valid pools (ours and thin_restore's), precise on damaged ones.

Valid pools are built with ``PoolMetadata`` (devices with internal nodes, snapshots sharing
subtrees, broken sharing, discards, a metadata snapshot) and must pass both our check and
/usr/sbin/thin_check.  Each damage test breaks one invariant with ``thin.damage`` and expects the
named rule at the damaged block -- and checks that the checker left the image byte-identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devmapper.blockdev.file import FileBlockDevice
from devmapper.blockdev.memory import MemoryBlockDevice
from devmapper.format.bitmap import pack_bitmap
from devmapper.format.records import unpack_block_time
from devmapper.thin import damage
from devmapper.thin.check import Defect, DefectRule, Report, check_metadata
from devmapper.thin.metadata import PoolMetadata
from helpers.tools import find_tool, require_tool, run_tool

NR_DATA = 100_000
META_SIZE = 8 << 20

R = DefectRule


# -- building pools --------------------------------------------------------------------------------


def _write(pmd: PoolMetadata, dev_id: int, vblocks: range) -> None:
    pmd.insert_many(dev_id, [(v, pmd.alloc_data_block(), pmd.time) for v in vblocks])


def build_pool(path: Path, *, metadata_snap: bool) -> None:
    """Four devices: 1 (3000 mappings, internal nodes), 2 = snapshot of 1 with sharing broken in
    every leaf, 3 (sparse, partly discarded), 4 = untouched snapshot of 2 (subtree root shared);
    optionally a metadata snapshot taken before device 1 and 3 change."""
    with open(path, "wb") as f:
        f.truncate(META_SIZE)
    pmd = PoolMetadata.format(FileBlockDevice(path), 128, NR_DATA)
    pmd.create_thin(1)
    _write(pmd, 1, range(3000))
    pmd.commit()
    pmd.create_snap(2, 1)
    pmd.create_thin(3)
    _write(pmd, 3, range(0, 6000, 5))
    pmd.commit()
    _write(pmd, 2, range(0, 3000, 9))
    pmd.set_transaction_id(0, 42)
    pmd.commit()
    if metadata_snap:
        pmd.reserve_metadata_snap()
    _write(pmd, 1, range(100, 400))
    pmd.remove_range(3, 0, 1000)
    pmd.commit()
    pmd.create_snap(4, 2)
    pmd.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("images")
    out = {}
    for name, snap in (("held", True), ("plain", False)):
        out[name] = base / f"{name}.bin"
        build_pool(out[name], metadata_snap=snap)
    return out


@pytest.fixture
def held(images: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh copy of the pool with a metadata snapshot."""
    return Path(shutil.copy(images["held"], tmp_path / "held.bin"))


@pytest.fixture
def plain(images: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh copy of the pool without a metadata snapshot."""
    return Path(shutil.copy(images["plain"], tmp_path / "plain.bin"))


@pytest.fixture
def rw(held: Path) -> Iterator[FileBlockDevice]:
    dev = FileBlockDevice(held)
    yield dev
    dev.close()


# -- helpers ---------------------------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(path: Path, **options: bool) -> Report:
    """Check path, opened read-write so a stray write would land, and prove nothing was written."""
    before = _digest(path)
    dev = FileBlockDevice(path)
    try:
        report = check_metadata(dev, **options)
    finally:
        dev.close()
    assert _digest(path) == before, "the checker modified its input"
    return report


def thin_check(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run /usr/sbin/thin_check (the test is skipped, with the reason, if it is missing)."""
    return run_tool(["thin_check", *args, str(path)], check=False)


def thin_check_also_fails(path: Path, *, mentioning: str | None = None) -> None:
    """Cross-check a damaged image with thin_check 0.9.0 when it is installed (else only ours runs)."""
    if find_tool("thin_check") is None:
        return
    proc = thin_check(path)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    if mentioning is not None:
        assert mentioning in proc.stdout + proc.stderr


def expect(report: Report, rule: DefectRule, block: int | None = None, *, fatal: bool | None = None,
           data_block: int | None = None) -> Defect:
    """The first defect of rule (at block / about data_block if given); fails listing all defects."""
    for d in report.by_rule(rule):
        if block is not None and d.block != block:
            continue
        if data_block is not None and d.data_block != data_block:
            continue
        if fatal is not None:
            assert d.fatal is fatal, d
        return d
    raise AssertionError(f"no {rule} at block {block}; defects: {[str(d) for d in report.defects]}")


def shared_root(dev: FileBlockDevice) -> int:
    root = damage.device_root(dev, 2)
    assert damage.device_root(dev, 4) == root
    return root


# -- valid pools -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["held", "plain"])
def test_valid_pool_is_clean(images: dict[str, Path], name: str) -> None:
    report = check(images[name])
    assert report.ok, [str(d) for d in report.defects]
    assert report.space_maps_checked
    assert report.trans_id == 42
    assert report.nr_devices == 4
    assert (report.held_root == 0) == (name == "plain")
    assert not report.hints


@pytest.mark.parametrize("name", ["held", "plain"])
def test_valid_pool_passes_thin_check(images: dict[str, Path], name: str) -> None:
    proc = thin_check(images[name])
    assert proc.returncode == 0, proc.stderr
    assert "TRANSACTION_ID=42" in proc.stdout


def test_metadata_snapshot_trees_are_clean(images: dict[str, Path]) -> None:
    report = check(images["held"], metadata_snap=True)
    assert report.ok, [str(d) for d in report.defects]
    assert not report.space_maps_checked
    assert report.nr_devices == 3  # taken before device 4 existed
    assert thin_check(images["held"], "-m").returncode == 0


def test_summary_counts_mappings(images: dict[str, Path]) -> None:
    report = check(images["plain"])
    pmd = PoolMetadata.open(FileBlockDevice(images["plain"], read_only=True))
    expected = sum(pmd.details(d).mapped_blocks for d in pmd.devices())
    assert report.nr_mappings == expected
    assert report.nr_data_blocks == NR_DATA
    assert report.data_free_blocks == pmd.nr_free_data_blocks()
    assert report.metadata_free_blocks == pmd.nr_free_metadata_blocks()


def test_partial_checks_are_clean(images: dict[str, Path]) -> None:
    for options in ({"skip_mappings": True}, {"super_block_only": True}):
        report = check(images["held"], **options)
        assert report.ok, (options, [str(d) for d in report.defects])
        assert not report.space_maps_checked


def test_progress_names_stages(images: dict[str, Path]) -> None:
    calls: list[tuple[str, int, int]] = []
    dev = FileBlockDevice(images["held"], read_only=True)
    check_metadata(dev, progress=lambda stage, done, total: calls.append((stage, done, total)))
    stages = [c[0] for c in calls]
    for stage in ("checking superblock", "walking trees", "checking metadata space map", "checking data space map"):
        assert stage in stages
    assert all(0 <= done <= total for _, done, total in calls)


def test_memory_device_and_empty_pool() -> None:
    dev = MemoryBlockDevice(4 << 20)
    PoolMetadata.format(dev, 128, 10_000).close()
    report = check_metadata(dev)
    assert report.ok, [str(d) for d in report.defects]
    assert report.nr_devices == 0 and report.nr_mappings == 0


def test_released_metadata_snapshot_leaves_a_clean_pool(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    build_pool(path, metadata_snap=True)
    pmd = PoolMetadata.open(FileBlockDevice(path))
    pmd.release_metadata_snap()
    pmd.delete(1)
    pmd.close()
    report = check(path)
    assert report.ok, [str(d) for d in report.defects]
    if find_tool("thin_check") is not None:
        assert thin_check(path).returncode == 0


def test_large_metadata_device_is_clean() -> None:
    dev = MemoryBlockDevice(128 << 20)  # 32768 blocks: 3 metadata bitmaps
    PoolMetadata.format(dev, 128, 1000).close()
    report = check_metadata(dev)
    assert report.ok, [str(d) for d in report.defects]


# -- images written by thin_restore ----------------------------------------------------------------

SMALL_XML = """\
<superblock uuid="" time="2" transaction="7" flags="0" version="2" data_block_size="128" nr_data_blocks="1000">
  <device dev_id="1" mapped_blocks="5" transaction="1" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="10" length="4" time="0"/>
    <single_mapping origin_block="100" data_block="50" time="1"/>
  </device>
  <device dev_id="2" mapped_blocks="5" transaction="3" creation_time="1" snap_time="2">
    <range_mapping origin_begin="0" data_begin="10" length="4" time="0"/>
    <single_mapping origin_block="100" data_block="60" time="2"/>
  </device>
  <device dev_id="5" mapped_blocks="0" transaction="5" creation_time="2" snap_time="2">
  </device>
</superblock>
"""


def _big_xml() -> str:
    lines = ['<superblock uuid="" time="3" transaction="9" flags="0" version="2" data_block_size="256" '
             'nr_data_blocks="50000">']
    for dev_id in range(4):
        lines.append(f'  <device dev_id="{dev_id}" mapped_blocks="0" transaction="{dev_id}" creation_time="0" '
                     f'snap_time="{dev_id % 4}">')
        lines.append('    <range_mapping origin_begin="0" data_begin="0" length="5000" time="0"/>')
        for k in range(300):
            origin, data = 10_000 + 3 * k, 20_000 + 400 * dev_id + k
            lines.append(f'    <single_mapping origin_block="{origin}" data_block="{data}" time="{dev_id % 4}"/>')
        lines.append("  </device>")
    lines.append("</superblock>")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("xml", [SMALL_XML, _big_xml()], ids=["small", "shared-ranges"])
def test_thin_restore_images_are_clean(tmp_path: Path, xml: str) -> None:
    require_tool("thin_restore")
    source, out = tmp_path / "x.xml", tmp_path / "out.bin"
    source.write_text(xml)
    with open(out, "wb") as f:
        f.truncate(8 << 20)
    run_tool(["thin_restore", "-i", str(source), "-o", str(out)])
    assert thin_check(out).returncode == 0
    report = check(out)
    assert report.ok, [str(d) for d in report.defects]
    assert report.nr_mappings == (10 if xml is SMALL_XML else 4 * 5300)
    # thin_restore 0.9.0 may leave the metadata space map's free-space hints one freed block stale
    # (nr_allocated one too high, none_free_before past that block): reported as hints only.
    assert {h.rule for h in report.hints} <= {R.NR_ALLOCATED_WRONG, R.INDEX_ENTRY_WRONG}


# -- damage: superblock ----------------------------------------------------------------------------


def test_detects_corrupt_superblock_and_stops(held: Path, rw: FileBlockDevice) -> None:
    damage.flip_byte(rw, 0, 200)
    report = check(held)
    d = expect(report, R.SUPERBLOCK_CHECKSUM, 0, fatal=True)
    assert d.message.startswith("block 0: superblock checksum mismatch")
    assert len(report.defects) == 1 and report.trans_id is None
    thin_check_also_fails(held)


def test_detects_bad_magic_with_super_block_only(held: Path, rw: FileBlockDevice) -> None:
    damage.rewrite_superblock(rw, magic=12345)
    report = check(held, super_block_only=True)
    assert report.rules() == {R.BAD_MAGIC}
    expect(report, R.BAD_MAGIC, 0, fatal=True)


def _set_data_nr_allocated(dev: FileBlockDevice, delta: int) -> None:
    root = damage.superblock(dev).data_sm_root
    damage.rewrite_superblock(dev, data_sm_root=dataclasses.replace(root, nr_allocated=root.nr_allocated + delta))


def test_detects_wrong_nr_allocated(held: Path, rw: FileBlockDevice) -> None:
    _set_data_nr_allocated(rw, -1)
    report = check(held)
    assert report.rules() == {R.NR_ALLOCATED_WRONG}
    assert "nr_allocated" in expect(report, R.NR_ALLOCATED_WRONG, 0, fatal=False).message


def test_reports_too_high_nr_allocated_as_hint(held: Path, rw: FileBlockDevice) -> None:
    _set_data_nr_allocated(rw, +1)
    report = check(held)
    assert report.ok
    assert [h.rule for h in report.hints] == [R.NR_ALLOCATED_WRONG]


def test_detects_damage_reachable_only_from_the_metadata_snapshot(held: Path, rw: FileBlockDevice) -> None:
    old = damage.path_to_leaf(rw, damage.device_root(rw, 1, snapshot=True), 150)[-1][0]
    assert old != _leaf_of(rw, 1, 150)  # device 1 rewrote vblocks 100..399 after the snapshot
    damage.swap_keys(rw, old, 0, 1)
    d = expect(check(held, metadata_snap=True), R.KEYS_OUT_OF_ORDER, old)
    assert d.path == "metadata snapshot mapping tree of device 1"
    expect(check(held), R.KEYS_OUT_OF_ORDER, old)


def test_metadata_snap_without_snapshot_is_fatal(plain: Path) -> None:
    report = check(plain, metadata_snap=True)
    expect(report, R.HELD_ROOT, fatal=True)


def test_detects_corrupt_metadata_snapshot_copy(held: Path, rw: FileBlockDevice) -> None:
    copy = damage.superblock(rw).held_root
    damage.flip_byte(rw, copy, 100)
    report = check(held)
    expect(report, R.HELD_ROOT, copy, fatal=True)


# -- damage: nodes ---------------------------------------------------------------------------------


def _leaf_of(dev: FileBlockDevice, dev_id: int, vblock: int) -> int:
    return damage.path_to_leaf(dev, damage.device_root(dev, dev_id), vblock)[-1][0]


def test_detects_bad_checksum(held: Path, rw: FileBlockDevice) -> None:
    leaf = _leaf_of(rw, 3, 3000)
    damage.flip_byte(rw, leaf, 1000)
    report = check(held)
    d = expect(report, R.CHECKSUM, leaf, fatal=True)
    assert d.message.startswith(f"block {leaf}: btree node checksum mismatch")
    assert d.path == "mapping tree of device 3" and d.nodes
    thin_check_also_fails(held)


def test_detects_wrong_block_number(held: Path, rw: FileBlockDevice) -> None:
    leaf = _leaf_of(rw, 1, 2000)
    damage.set_blocknr(rw, leaf, leaf + 1)
    report = check(held)
    assert report.rules() == {R.BAD_BLOCKNR}
    assert f"has block number {leaf + 1}, expected {leaf}" in expect(report, R.BAD_BLOCKNR, leaf).message
    thin_check_also_fails(held)


def test_detects_keys_out_of_order(held: Path, rw: FileBlockDevice) -> None:
    leaf = _leaf_of(rw, 3, 3000)
    damage.swap_keys(rw, leaf, 3, 4)
    report = check(held)
    assert report.rules() == {R.KEYS_OUT_OF_ORDER}
    expect(report, R.KEYS_OUT_OF_ORDER, leaf, fatal=True)
    thin_check_also_fails(held)


def test_detects_parent_key_too_big(plain: Path) -> None:
    dev = FileBlockDevice(plain)
    root = damage.device_root(dev, 1)
    parent = damage.read_node(dev, root)
    child = damage.read_node(dev, parent.values[1])
    damage.set_key(dev, root, 1, child.keys[0] + 1)
    dev.close()
    report = check(plain)
    assert report.rules() == {R.PARENT_KEY_TOO_BIG}
    expect(report, R.PARENT_KEY_TOO_BIG, child.blocknr)


def test_detects_underfull_node(plain: Path) -> None:
    dev = FileBlockDevice(plain)
    root = damage.device_root(dev, 1)
    sizes = [len(damage.read_node(dev, c).keys) for c in damage.read_node(dev, root).values]
    i = next(i for i in range(len(sizes) - 1) if sizes[i] > 83 and sizes[i + 1] + sizes[i] - 83 <= 252)
    leaf = damage.make_underfull(dev, root, i, keep=83)
    dev.close()
    report = check(plain)
    assert report.rules() == {R.UNDERFULL}
    d = expect(report, R.UNDERFULL, leaf, fatal=True)
    assert d.message == (f"block {leaf}: btree node underfull: 83 entries, at least 84 expected "
                         "(mapping tree of device 1)")
    thin_check_also_fails(plain, mentioning="83")


def test_detects_node_that_is_a_bitmap(held: Path, rw: FileBlockDevice) -> None:
    leaf = _leaf_of(rw, 3, 3000)
    damage.write_block(rw, leaf, pack_bitmap(bytearray(), leaf))
    report = check(held)
    expect(report, R.NOT_A_NODE, leaf, fatal=True)


def test_detects_pointer_beyond_metadata(plain: Path) -> None:
    dev = FileBlockDevice(plain)
    root = damage.device_root(dev, 1)
    node = damage.read_node(dev, root)
    node.values[2] = 10 ** 9
    damage.write_node(dev, node)
    dev.close()
    report = check(plain)
    expect(report, R.BLOCK_OUT_OF_RANGE, 10 ** 9, fatal=True)


def _repoint_child(path: Path, dev_id: int, i: int, target: int) -> int:
    """Make child pointer i of device dev_id's root point at target; returns the root."""
    dev = FileBlockDevice(path)
    root = damage.device_root(dev, dev_id)
    node = damage.read_node(dev, root)
    node.values[i] = target
    damage.write_node(dev, node)
    dev.close()
    return root


def test_detects_cycle(plain: Path) -> None:
    dev = FileBlockDevice(plain)
    root = damage.device_root(dev, 1)
    dev.close()
    _repoint_child(plain, 1, 1, root)
    report = check(plain)
    expect(report, R.CYCLE, root, fatal=True)


def test_detects_node_shared_by_two_kinds_of_tree(plain: Path) -> None:
    details_root = damage.superblock(FileBlockDevice(plain, read_only=True)).device_details_root
    _repoint_child(plain, 1, 1, details_root)
    report = check(plain)
    expect(report, R.CROSS_LINKED, details_root, fatal=True)
    expect(report, R.METADATA_REFCOUNT, details_root, fatal=True)


def test_detects_unequal_leaf_depth(plain: Path) -> None:
    dev = FileBlockDevice(plain)
    inner = damage.device_root(dev, 3)  # an internal node whose children are leaves
    assert not damage.read_node(dev, inner).is_leaf
    dev.close()
    root = _repoint_child(plain, 1, 1, inner)
    report = check(plain)
    expect(report, R.UNEQUAL_DEPTH, root, fatal=True)


# -- damage: devices and mappings ------------------------------------------------------------------


def test_detects_details_mapping_mismatch(held: Path, rw: FileBlockDevice) -> None:
    damage.remove_details(rw, 3)
    top_leaf = damage.superblock(rw).data_mapping_root
    report = check(held)
    assert report.rules() == {R.DETAILS_MAPPING_MISMATCH}
    d = expect(report, R.DETAILS_MAPPING_MISMATCH, top_leaf, fatal=True)
    assert "device 3 has a mapping tree but no details" in d.message


def test_detects_wrong_mapped_blocks(held: Path, rw: FileBlockDevice) -> None:
    real = damage.read_node(rw, damage.details_leaf(rw, 1)[0])
    block = damage.set_mapped_blocks(rw, 1, 7)
    assert block == real.blocknr
    report = check(held)
    assert report.rules() == {R.MAPPED_BLOCKS_WRONG}
    d = expect(report, R.MAPPED_BLOCKS_WRONG, block)
    assert "device 1 has mapped_blocks 7, but its mapping tree holds 3000" in d.message


def test_detects_data_block_beyond_data_device(held: Path, rw: FileBlockDevice) -> None:
    leaf = damage.set_mapping(rw, 3, 3000, data_block=NR_DATA + 7)
    report = check(held)
    d = expect(report, R.DATA_BLOCK_OUT_OF_RANGE, leaf, fatal=True, data_block=NR_DATA + 7)
    assert "virtual block 3000" in d.message


def test_detects_mapping_time_in_the_future(held: Path, rw: FileBlockDevice) -> None:
    sb = damage.superblock(rw)
    leaf = damage.set_mapping(rw, 3, 3000, time=sb.time + 1)
    report = check(held)
    assert report.rules() == {R.TIME_TOO_BIG}
    expect(report, R.TIME_TOO_BIG, leaf)


# -- damage: space maps ----------------------------------------------------------------------------


def test_detects_metadata_refcount_too_low(plain: Path) -> None:
    dev = FileBlockDevice(plain)
    root = shared_root(dev)
    assert damage.space_map_entry(dev, "metadata", root) == 2
    damage.set_space_map_entry(dev, "metadata", root, 1)
    dev.close()
    report = check(plain)
    assert report.rules() == {R.METADATA_REFCOUNT}
    d = expect(report, R.METADATA_REFCOUNT, root, fatal=True)
    assert d.message == f"block {root}: metadata reference count 1, expected 2 (metadata space map)"
    thin_check_also_fails(plain, mentioning=f"block {root}")


def test_detects_overflowed_metadata_refcount_too_low(held: Path, rw: FileBlockDevice) -> None:
    root = shared_root(rw)  # live devices 2 and 4, and device 2 in the metadata snapshot
    assert damage.space_map_entry(rw, "metadata", root) == 3
    damage.set_space_map_entry(rw, "metadata", root, 2)
    report = check(held)
    assert expect(report, R.METADATA_REFCOUNT, root, fatal=True).message.startswith(
        f"block {root}: metadata reference count 2, expected 3")
    expect(report, R.OVERFLOW_WRONG, fatal=False)  # the overflow entry for root is now unused


def test_detects_metadata_leak_as_non_fatal(held: Path, rw: FileBlockDevice) -> None:
    root = damage.device_root(rw, 3)
    damage.set_space_map_entry(rw, "metadata", root, 2)
    report = check(held)
    expect(report, R.METADATA_REFCOUNT, root, fatal=False)
    assert not report.fatal


def test_detects_data_refcount_wrong(held: Path, rw: FileBlockDevice) -> None:
    value = damage.lookup(rw, damage.device_root(rw, 3), 3000)
    assert value is not None
    data_block, _time = unpack_block_time(value)
    bitmap = damage.set_space_map_entry(rw, "data", data_block, 2)
    report = check(held)
    assert report.rules() == {R.DATA_REFCOUNT}
    d = expect(report, R.DATA_REFCOUNT, bitmap, fatal=False, data_block=data_block)
    assert d.message.startswith(f"data block {data_block}: reference count 2, expected 1")
    damage.set_space_map_entry(rw, "data", data_block, 0)
    expect(check(held), R.DATA_REFCOUNT, fatal=True, data_block=data_block)


def test_detects_shared_data_refcount_too_low(plain: Path) -> None:
    dev = FileBlockDevice(plain)
    # vblock 1 of device 2 was never rewritten: its data block is named by leaves of 1 and 2.
    value = damage.lookup(dev, damage.device_root(dev, 2), 1)
    assert value is not None and value == damage.lookup(dev, damage.device_root(dev, 1), 1)
    data_block = unpack_block_time(value)[0]
    assert damage.space_map_entry(dev, "data", data_block) == 2
    damage.set_space_map_entry(dev, "data", data_block, 1)
    dev.close()
    report = check(plain)
    assert report.rules() == {R.DATA_REFCOUNT}
    expect(report, R.DATA_REFCOUNT, fatal=True, data_block=data_block)


def test_detects_missing_overflow_entry(held: Path, rw: FileBlockDevice) -> None:
    root = damage.device_root(rw, 3)
    bitmap = damage.set_space_map_entry(rw, "metadata", root, 3)
    report = check(held)
    expect(report, R.OVERFLOW_WRONG, bitmap, fatal=True)


def test_detects_index_entry_hints(held: Path, rw: FileBlockDevice) -> None:
    index = damage.set_metadata_index_entry(rw, 0, nr_free=0)
    report = check(held)
    assert report.rules() == {R.INDEX_ENTRY_WRONG}
    expect(report, R.INDEX_ENTRY_WRONG, index, fatal=False)
    damage.set_metadata_index_entry(rw, 0, nr_free=100, none_free_before=16000)
    report = check(held)
    assert report.ok
    assert [h.block for h in report.hints] == [index]
    assert "none_free_before 16000" in report.hints[0].message


def test_partial_checks_skip_what_they_do_not_read(held: Path, rw: FileBlockDevice) -> None:
    damage.flip_byte(rw, _leaf_of(rw, 1, 2000), 1000)
    assert check(held, skip_mappings=True).ok
    assert check(held, super_block_only=True).ok
    assert not check(held).ok
