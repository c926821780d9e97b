"""Status and table lines, byte for byte in the kernel's format (dm-thin.c pool_status/thin_status)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devmapper.errors import DeviceError
from devmapper.thin.status import PoolFeatures, PoolMode, PoolStatus, PoolTable, ThinStatus, ThinTable
from pool.support import BLOCK, MiB, PoolFiles, make_pool_files


def test_fresh_pool_status_matches_the_documented_example(tmp_path: Path) -> None:
    files = make_pool_files(tmp_path, data_blocks=10000, meta_bytes=4 * MiB)
    with files.open() as pool:
        assert pool.status() == "0 111/1024 0/10000 - rw discard_passdown queue_if_no_space - 256 "
        assert pool.status_line() == "0 1280000 thin-pool " + pool.status()
        assert pool.table() == "253:0 253:1 128 0 0 "
        assert pool.table_line() == "0 1280000 thin-pool 253:0 253:1 128 0 0 "
    files.check()


def test_status_counts_data_metadata_and_transaction(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.message("create_thin 7")
        pool.message("set_transaction_id 0 42")
        with pool.open_thin(7, 4096, pool_dev="253:2") as vol:
            vol.write(0, b"a" * (3 * BLOCK))
            vol.write(10 * BLOCK + 5, b"b")
            assert vol.status() == f"{4 * 128} {11 * 128 - 1}"
            assert vol.status_line() == f"0 4096 thin {4 * 128} {11 * 128 - 1}"
            assert vol.table() == "253:2 7"
            assert vol.table_line() == "0 4096 thin 253:2 7"
        info = pool.status_info()
        assert (info.transaction_id, info.used_data_blocks, info.total_data_blocks) == (42, 4, 256)
        assert pool.status().startswith(f"42 {info.used_metadata_blocks}/1024 4/256 - rw ")
    files.check()


def test_thin_status_of_an_empty_device_has_no_highest_sector(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, 2048, origin=files.meta, pool_dev="253:2", origin_dev="8:16") as vol:
            assert vol.status() == "0 -"
            assert vol.table() == "253:2 0 8:16"


def test_held_root_appears_in_status(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        held = pool.reserve_metadata_snap()
        assert held > 0
        assert pool.status().split()[3] == str(held)
        pool.message("release_metadata_snap")
        assert pool.status().split()[3] == "-"
    files.check()


@pytest.mark.parametrize(
    ("words", "table_tail", "status_tail"),
    [
        ([], "0 ", "rw discard_passdown queue_if_no_space - "),
        (["skip_block_zeroing"], "1 skip_block_zeroing ", "rw discard_passdown queue_if_no_space - "),
        (["ignore_discard"], "1 ignore_discard ", "rw ignore_discard queue_if_no_space - "),
        (["no_discard_passdown"], "1 no_discard_passdown ", "rw no_discard_passdown queue_if_no_space - "),
        (["error_if_no_space"], "1 error_if_no_space ", "rw discard_passdown error_if_no_space - "),
        (
            ["ERROR_IF_NO_SPACE", "no_discard_passdown", "skip_block_zeroing", "ignore_discard"],
            "4 skip_block_zeroing ignore_discard no_discard_passdown error_if_no_space ",
            "rw ignore_discard error_if_no_space - ",
        ),
    ],
)
def test_features_in_table_and_status(files: PoolFiles, words: list[str], table_tail: str, status_tail: str) -> None:
    with files.open(features=PoolFeatures.parse(words), low_water_mark=17) as pool:
        assert pool.table() == "253:0 253:1 128 17 " + table_tail
        assert pool.status().endswith(" " + status_tail + "256 ")


def test_read_only_pool_reports_ro(files: PoolFiles) -> None:
    files.open().close()
    with files.open(features=PoolFeatures(read_only=True)) as pool:
        assert pool.mode is PoolMode.READ_ONLY
        assert pool.table() == "253:0 253:1 128 0 1 read_only "
        assert pool.status() == "0 111/1024 0/256 - ro discard_passdown queue_if_no_space - 256 "


def test_fail_mode_status_is_fail() -> None:
    assert PoolStatus(0, 0, 0, 0, 0, 0, PoolMode.FAIL, "", False, False, 0).format() == "Fail"
    assert ThinStatus(0, None, failed=True).format() == "Fail"


def test_out_of_metadata_space_reports_ro() -> None:
    status = PoolStatus(3, 10, 20, 5, 6, 0, PoolMode.OUT_OF_METADATA_SPACE, "discard_passdown", False, True, 5)
    assert status.format() == "3 10/20 5/6 - ro discard_passdown queue_if_no_space needs_check 5 "


def test_metadata_low_water_mark_is_a_quarter_of_a_small_device(tmp_path: Path) -> None:
    files = make_pool_files(tmp_path, data_blocks=16, meta_bytes=2 * MiB)
    with files.open() as pool:
        assert pool.status().endswith(" 128 ")
    big = make_pool_files(tmp_path / "big", data_blocks=16, meta_bytes=64 * MiB)
    with big.open() as pool:
        assert pool.status().endswith(" 1024 ")


# -- table line parsing ------------------------------------------------------------------------


def test_pool_table_round_trips() -> None:
    line = "253:0 253:1 256 10 2 skip_block_zeroing error_if_no_space "
    table = PoolTable.parse(line)
    assert table.features == PoolFeatures(skip_block_zeroing=True, error_if_no_space=True)
    assert table.format() == line
    assert PoolTable.parse("a b 128 0").format() == "a b 128 0 0 "


@pytest.mark.parametrize(
    "params",
    [
        "a b 128",  # too few arguments
        "a a 128 0",  # same metadata and data device
        "a b 100 0",  # block size not a multiple of 128
        "a b 64 0",  # below 64 KiB
        "a b 4194304 0",  # above 1 GiB
        "a b 128 x",  # bad low water mark
        "a b 128 0 1 frobnicate",  # unknown feature
        "a b 128 0 5 read_only read_only read_only read_only read_only",  # more than 4 features
        "a b 128 0 2 read_only",  # count larger than the words given
    ],
)
def test_pool_table_rejects_what_the_kernel_rejects(params: str) -> None:
    with pytest.raises(DeviceError) as exc:
        PoolTable.parse(params)
    assert exc.value.errno_name == "EINVAL"


def test_block_size_needs_not_be_a_power_of_two() -> None:
    assert PoolTable.parse("a b 384 0").data_block_size == 384
    assert PoolTable.parse("a b 2097152 0").data_block_size == 2097152


def test_thin_table_parsing() -> None:
    assert ThinTable.parse("253:2 16777215").format() == "253:2 16777215"
    assert ThinTable.parse("253:2 1 8:1") == ThinTable("253:2", 1, "8:1")
    for bad in ("253:2", "253:2 16777216", "p 1 p", "p x", "p 1 2 3"):
        with pytest.raises(DeviceError):
            ThinTable.parse(bad)
