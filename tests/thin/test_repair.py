"""``thin repair``: damaged metadata in, fresh metadata out that thin_check accepts, holding every
mapping that could be read -- checked against the tree before the damage and against thin_repair."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from devmapper.blockdev.file import FileBlockDevice
from devmapper.cli.main import main
from devmapper.thin import damage
from devmapper.thin.dump import MetadataReader
from devmapper.thin.metadata import PoolMetadata
from devmapper.thin.repair import salvage
from devmapper.thin.restore import RestoreEmitter
from helpers.tools import require_tool, run_tool

NR_DATA = 20_000
META_SIZE = 8 << 20


def build(path: Path) -> None:
    """Device 1 (2000 mappings: several leaves), 2 = snapshot of 1 (shares its subtree), 3 (sparse)."""
    with open(path, "wb") as f:
        f.truncate(META_SIZE)
    pmd = PoolMetadata.format(FileBlockDevice(path), 128, NR_DATA)
    pmd.create_thin(1)
    pmd.insert_many(1, [(v, pmd.alloc_data_block(), pmd.time) for v in range(2000)])
    pmd.commit()
    pmd.create_snap(2, 1)
    pmd.create_thin(3)
    pmd.insert_many(3, [(v, pmd.alloc_data_block(), pmd.time) for v in range(0, 3000, 7)])
    pmd.commit()
    pmd.close()


def mappings(path: Path) -> dict[int, dict[int, int]]:
    """dev id -> {vblock: data block} as the metadata on path says."""
    dev = FileBlockDevice(path, read_only=True)
    try:
        reader = MetadataReader(dev)
        return {d: {v: value >> 24 for v, value in reader.mappings(root)} for d, root in reader.device_roots()}
    finally:
        dev.close()


def repair(src: Path, tmp_path: Path, name: str = "fixed") -> Path:
    out = tmp_path / name
    with open(out, "wb") as f:
        f.truncate(META_SIZE)
    assert main(["thin", "repair", "-q", "-i", str(src), "-o", str(out)]) == 0
    return out


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    path = tmp_path / "meta"
    build(path)
    return path


def test_intact_metadata_comes_out_the_same(pool: Path, tmp_path: Path) -> None:
    fixed = repair(pool, tmp_path)
    run_tool([require_tool("thin_check"), str(fixed)])
    assert mappings(fixed) == mappings(pool)
    dev = FileBlockDevice(pool, read_only=True)
    sink = tmp_path / "sink"
    sink.write_bytes(bytes(META_SIZE))
    report = salvage(dev, RestoreEmitter(FileBlockDevice(sink)))
    dev.close()
    assert report.clean and report.devices == 3 and report.mappings == 2000 + 2000 + len(range(0, 3000, 7))


def test_a_bad_leaf_loses_only_its_mappings(pool: Path, tmp_path: Path) -> None:
    before = mappings(pool)
    dev = FileBlockDevice(pool)
    leaves = damage.leaves(dev, damage.device_root(dev, 3))
    bad = leaves[1]
    lost = set(damage.read_node(dev, bad).keys)
    damage.flip_byte(dev, bad, 100)  # checksum no longer matches
    dev.close()
    assert run_tool([require_tool("thin_check"), str(pool)], check=False).returncode != 0
    fixed = repair(pool, tmp_path)
    run_tool([require_tool("thin_check"), str(fixed)])
    after = mappings(fixed)
    assert after[1] == before[1] and after[2] == before[2]
    assert after[3] == {v: b for v, b in before[3].items() if v not in lost} and lost


def test_a_shared_subtree_damaged_once_is_lost_for_both_sharers(pool: Path, tmp_path: Path) -> None:
    before = mappings(pool)
    dev = FileBlockDevice(pool)
    root = damage.device_root(dev, 1)
    assert root == damage.device_root(dev, 2)  # the snapshot shares device 1's tree
    bad = damage.leaves(dev, root)[0]
    lost = set(damage.read_node(dev, bad).keys)
    damage.swap_keys(dev, bad, 0, 5)  # re-stamped: a structural defect, not a checksum one
    dev.close()
    fixed = repair(pool, tmp_path)
    run_tool([require_tool("thin_check"), str(fixed)])
    after = mappings(fixed)
    for d in (1, 2):
        assert after[d] == {v: b for v, b in before[d].items() if v not in lost}
    assert after[3] == before[3]


def test_lost_details_are_rebuilt_and_reported(pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = mappings(pool)
    dev = FileBlockDevice(pool)
    damage.remove_details(dev, 3)
    dev.close()
    out = tmp_path / "fixed"
    out.write_bytes(bytes(META_SIZE))
    assert main(["thin", "repair", "-i", str(pool), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "device 3: details lost" in err and "repaired: 3 devices" in err
    run_tool([require_tool("thin_check"), str(out)])
    assert mappings(out) == before


def test_agrees_with_thin_repair(pool: Path, tmp_path: Path) -> None:
    thin_repair = require_tool("thin_repair")
    thin_dump = require_tool("thin_dump")
    dev = FileBlockDevice(pool)
    damage.flip_byte(dev, damage.leaves(dev, damage.device_root(dev, 3))[2], 200)
    dev.close()
    ours = repair(pool, tmp_path)
    theirs = tmp_path / "theirs"
    theirs.write_bytes(bytes(META_SIZE))
    run_tool([thin_repair, "-i", str(pool), "-o", str(theirs)])

    def xml(path: Path) -> str:
        text = run_tool([thin_dump, str(path)]).stdout
        return re.sub(r'nr_data_blocks="\d+"', "", text)  # thin_repair may size the data space differently

    assert mappings(ours) == mappings(theirs)
    assert xml(ours) == xml(theirs)


def test_refusals(pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["thin", "repair", "-i", str(pool), "-o", str(tmp_path / "missing")]) != 0
    assert "does not exist" in capsys.readouterr().err
    assert main(["thin", "repair", "-i", str(pool), "-o", str(pool)]) != 0
    assert "must not be the input" in capsys.readouterr().err
    dev = FileBlockDevice(pool)
    damage.flip_byte(dev, 0, 64)  # the superblock
    dev.close()
    out = tmp_path / "out"
    shutil.copyfile(pool, out)
    assert main(["thin", "repair", "-i", str(pool), "-o", str(out)]) != 0
    assert "superblock is damaged" in capsys.readouterr().err
