"""Both ways against thin-provisioning-tools on randomly generated valid pools.

* our restore -> thin_check clean, and thin_dump prints exactly the canonical dump of the input;
* thin_restore -> our dump prints exactly the canonical dump, and our check finds no defect.

Pools come from ``helpers.gen``: many devices (ids up to 2^24-1), snapshots sharing mappings with
their origins, runs and single mappings, large origin and data block numbers.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from devmapper.blockdev.file import FileBlockDevice
from devmapper.cli.main import main as cli_main
from devmapper.thin.check import check_metadata
from devmapper.thin.dump import dump
from devmapper.thin.xml import XmlWriter
from helpers.gen import GenSizes, canonical_dump, generate_pool, metadata_file_size, pool_to_xml, random_style
from helpers.tools import require_tool, run_tool

CASES = [
    (seed, GenSizes(nr_devices=nd, mappings_per_device=mp, max_data_blocks=1 << 27))
    for seed, nd, mp in [
        (0, 1, 10), (1, 3, 50), (2, 8, 200), (3, 8, 200), (4, 12, 400), (5, 20, 100),
        (6, 5, 1500), (7, 30, 300), (8, 2, 5000), (9, 16, 800),
    ]
]


def _make(tmp_path: Path, seed: int, sizes: GenSizes) -> tuple[str, str, int]:
    rng = random.Random(seed)
    pool = generate_pool(rng, sizes)
    xml = pool_to_xml(pool, rng, random_style(rng))
    return xml, canonical_dump(pool), metadata_file_size(pool)


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.parametrize(("seed", "sizes"), CASES, ids=[f"seed{s}" for s, _ in CASES])
def test_our_restore_is_judged_by_thin_tools(tmp_path: Path, seed: int, sizes: GenSizes) -> None:
    thin_check = require_tool("thin_check")
    thin_dump = require_tool("thin_dump")
    xml, canonical, size = _make(tmp_path, seed, sizes)
    src = tmp_path / "in.xml"
    src.write_text(xml)
    meta = _sparse(tmp_path / "meta.bin", size)
    assert cli_main(["thin", "restore", "-q", "-i", str(src), "-o", str(meta)]) == 0
    run_tool([thin_check, str(meta)])
    assert run_tool([thin_dump, str(meta)]).stdout == canonical
    report = check_metadata(FileBlockDevice(meta, read_only=True))
    assert report.ok, [d.message for d in report.defects]


@pytest.mark.parametrize(("seed", "sizes"), CASES, ids=[f"seed{s}" for s, _ in CASES])
def test_thin_restore_output_is_read_by_us(tmp_path: Path, seed: int, sizes: GenSizes) -> None:
    thin_restore = require_tool("thin_restore")
    xml, canonical, size = _make(tmp_path, seed, sizes)
    src = tmp_path / "in.xml"
    src.write_text(xml)
    meta = _sparse(tmp_path / "meta.bin", size)
    run_tool([thin_restore, "-i", str(src), "-o", str(meta)])
    out = io.StringIO()
    dump(FileBlockDevice(meta, read_only=True), XmlWriter(out))
    assert out.getvalue() == canonical
    report = check_metadata(FileBlockDevice(meta, read_only=True))
    assert report.ok, [d.message for d in report.defects]


def test_cli_dump_matches_thin_dump_byte_for_byte(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    thin_restore = require_tool("thin_restore")
    thin_dump = require_tool("thin_dump")
    sizes = GenSizes(nr_devices=6, mappings_per_device=300, max_data_blocks=1 << 20)
    xml, _canonical, size = _make(tmp_path, 42, sizes)
    src = tmp_path / "in.xml"
    src.write_text(xml)
    meta = _sparse(tmp_path / "meta.bin", size)
    run_tool([thin_restore, "-i", str(src), "-o", str(meta)])
    for fmt in ("xml", "human_readable"):
        assert cli_main(["thin", "dump", "-f", fmt, str(meta)]) == 0
        ours = capsys.readouterr().out
        assert ours == run_tool([thin_dump, "-f", fmt, str(meta)]).stdout


def test_failed_restore_leaves_a_zeroed_superblock(tmp_path: Path) -> None:
    meta = _sparse(tmp_path / "meta.bin", 8 << 20)
    meta.write_bytes(b"\xff" * 4096 + bytes((8 << 20) - 4096))
    bad = tmp_path / "bad.xml"
    bad.write_text('<superblock uuid="" time="0" transaction="0" data_block_size="128" nr_data_blocks="10">\n'
                   '  <device dev_id="1" mapped_blocks="1" transaction="0" creation_time="0" snap_time="0">\n'
                   '    <single_mapping origin_block="0" data_block="99" time="0"/>\n'
                   "  </device>\n</superblock>\n")
    assert cli_main(["thin", "restore", "-i", str(bad), "-o", str(meta)]) != 0
    assert meta.read_bytes()[:4096] == bytes(4096)
