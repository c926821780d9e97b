"""Bad input gets dmsetup's error messages, exit status 1, and changes nothing.

Every case starts from the same small setup (a pool with an active thin, a linear device and an
inactive table waiting on it), snapshots ``table``, ``info``, the inactive table and the saved state,
runs the bad command, checks the messages, and compares the snapshot.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from control.support import Udm, udm_fixture  # noqa: F401 - fixtures

MiB = 1 << 20


@pytest.fixture
def setup(udm: Udm, tmp_path: Path) -> Udm:
    for name, size in (("meta", 8 * MiB), ("data", 64 * MiB), ("small", MiB)):
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
    udm.ok("create", "pool", "--table", f"0 131072 thin-pool {tmp_path}/meta {tmp_path}/data 128 0")  # 253:0
    udm.ok("message", "pool", "0", "create_thin 1")
    udm.ok("create", "vol", "--table", "0 8192 thin /dev/mapper/pool 1")  # 253:1
    udm.ok("create", "lin", "--table", f"0 1024 linear {tmp_path}/small 0")  # 253:2
    udm.ok("load", "lin", "--table", "0 2048 zero")
    return udm


def snapshot(u: Udm) -> tuple[str, ...]:
    return (*u.snapshot(), u.ok("table", "--inactive"), u.ok("status", "--noflush"))


def refuse(u: Udm, *args: str, stdin: str = "") -> str:
    before = snapshot(u)
    result = u.fails(*args, stdin=stdin)
    assert result.out == ""
    assert snapshot(u) == before
    return result.err


def test_malformed_table_text_is_refused_by_udmsetup_itself(setup: Udm, tmp_path: Path) -> None:
    assert refuse(setup, "create", "x", "--table", "0 100") == "Invalid format on line 1 of table .\nCommand failed.\n"
    assert refuse(setup, "create", "x", stdin="# comment\n0 zero 100\n") == (
        "Invalid format on line 2 of table on stdin.\nCommand failed.\n"
    )
    bad = tmp_path / "bad.table"
    bad.write_text("0 100 zero\nx 1 zero\n")
    assert refuse(setup, "load", "lin", str(bad)) == f"Invalid format on line 2 of table {bad}.\nCommand failed.\n"
    assert refuse(setup, "create", "x", str(tmp_path / "missing")).startswith("Couldn't open ")


@pytest.mark.parametrize(
    ("table", "reason"),
    [
        ("0 100 frobnicate", "table: 253:3: frobnicate: unknown target type"),
        ("0 100 zero\n50 100 zero", "table: 253:3: zero: Gap in table"),
        ("0 100 zero\n200 100 zero", "table: 253:3: zero: Gap in table"),
        ("10 100 zero", "table: 253:3: zero: Gap in table"),
        ("0 0 zero", "table: 253:3: zero-length target"),
        ("0 100 zero extra", "table: 253:3: zero: No arguments required"),
        ("0 4096 linear {d}/small 0", "table: 253:3: linear: {d}/small too small for target: start=0, len=4096, "
                                      "dev_size=2048"),
        ("0 100 linear {d}/small 2000", "too small for target: start=2000, len=100, dev_size=2048"),
        ("0 100 linear {d}/small", "table: 253:3: linear: Invalid argument count"),
        ("0 100 linear {d}/small x", "table: 253:3: linear: Invalid device sector"),
        ("0 100 striped 3 8 {d}/small 0 {d}/small 0", "striped: Target length not divisible by number of stripes"),
        ("0 96 striped 2 32 {d}/small 0", "striped: Target length not divisible by chunk size"),
        ("0 96 striped 2 8 {d}/small 0", "striped: Not enough destinations specified"),
        ("0 100 thin-pool {d}/meta2 {d}/data2 100 0", "thin-pool: Invalid block size 100"),
        ("0 100 thin-pool {d}/meta2 {d}/data2 128 0 1 no_such_feature", "Unrecognised pool feature requested"),
        ("0 100 thin-pool {d}/meta2 {d}/data2 128 0 2 skip_block_zeroing", "Invalid number of pool feature"),
        ("0 100 thin-pool {d}/meta2 {d}/meta2 128 0", "Error setting metadata or data device"),
        ("0 999999 thin-pool {d}/meta2 {d}/data2 128 0", "thin-pool: {d}/data2 too small for target"),
        ("0 128 thin-pool {d}/meta2 {d}/data2 128 0\n128 128 zero", "target type thin-pool must appear alone"),
        ("0 100 thin /dev/mapper/lin 1", "thin: Couldn't find pool object"),
        ("0 100 thin {d}/small 1", "thin: Couldn't get pool mapped device"),
        ("0 100 thin 253:0 99", "thin: Couldn't open thin internal device"),
        ("0 100 thin 253:0", "thin: Invalid argument count"),
        ("0 100 linear 253:77 0", "Device lookup failed: 253:77"),
        ("0 100 linear /dev/mapper/nosuch 0", "Device lookup failed: /dev/mapper/nosuch"),
        ("0 100 linear {d}/nosuch 0", "Device lookup failed"),
    ],
)
def test_bad_tables_fail_at_reload_and_create_nothing(setup: Udm, tmp_path: Path, table: str, reason: str) -> None:
    for name, size in (("meta2", 8 * MiB), ("data2", 8 * MiB)):
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
    table, reason = table.format(d=tmp_path), reason.format(d=tmp_path)
    err = refuse(setup, "create", "new", "--table", table)
    lines = err.splitlines()
    assert reason in lines[0], err
    assert lines[1].startswith("device-mapper: reload ioctl on new (253:3) failed: ")
    assert lines[2] == "Command failed."
    assert "new" not in setup.ok("ls")


def test_failed_load_keeps_the_previous_inactive_table(setup: Udm) -> None:
    err = refuse(setup, "load", "lin", "--table", "0 100 nosuchtarget")
    assert err.endswith("device-mapper: reload ioctl on lin  failed: Invalid argument\nCommand failed.\n")
    assert setup.ok("table", "--inactive", "lin") == "0 2048 zero \n"


def test_immutable_pool_table_cannot_be_replaced(setup: Udm) -> None:
    err = refuse(setup, "load", "pool", "--table", "0 131072 zero")
    assert "can't replace immutable target type thin-pool" in err
    assert "reload ioctl on pool  failed: Invalid argument" in err


def test_device_cannot_be_stacked_on_itself(setup: Udm) -> None:
    assert "cannot be stacked on itself" in refuse(setup, "load", "lin", "--table", "0 100 linear 253:2 0")
    setup.ok("create", "top", "--table", "0 100 linear /dev/mapper/lin 0")
    assert "cannot be stacked on itself" in refuse(setup, "load", "lin", "--table", "0 100 linear /dev/mapper/top 0")


def test_duplicate_names_and_uuids(setup: Udm) -> None:
    err = refuse(setup, "create", "lin", "--notable")  # exactly what dmsetup prints
    assert err == "device-mapper: create ioctl on lin  failed: Device or resource busy\nCommand failed.\n"
    setup.ok("create", "u1", "--notable", "-u", "UUID-1")
    err = refuse(setup, "create", "u2", "--notable", "-u", "UUID-1")
    assert err == "device-mapper: create ioctl on u2 UUID-1 failed: Device or resource busy\nCommand failed.\n"
    err = refuse(setup, "rename", "u1", "lin")
    assert err == ("device-mapper: Unable to change name on mapped device u1 to one that already exists: lin\n"
                   "device-mapper: rename ioctl on u1  failed: Device or resource busy\nCommand failed.\n")
    err = refuse(setup, "rename", "u1", "--setuuid", "OTHER")
    assert "because uuid is already set" in err
    assert refuse(setup, "create", "a/b", "--notable") == 'Name "a/b" invalid. It contains "/".\nCommand failed.\n'


def test_messages_to_a_non_pool_and_bad_messages(setup: Udm) -> None:
    err = refuse(setup, "message", "vol", "0", "create_thin", "2")
    assert err == ("device-mapper: Target type does not support messages\n"
                   "device-mapper: message ioctl on vol  failed: Invalid argument\nCommand failed.\n")
    assert "Unrecognised thin pool target message" in refuse(setup, "message", "pool", "0", "frob")
    assert "Target message sector outside device." in refuse(setup, "message", "pool", "131072", "create_thin 3")
    assert refuse(setup, "message", "pool", "x", "create_thin 3") == "Invalid sector.\nCommand failed.\n"
    assert "Invalid device id" in refuse(setup, "message", "pool", "0", "create_thin 16777216")
    assert "applies to thin-pool devices only" in refuse(setup, "message", "lin", "0", "@autoextend 70 20")
    assert "threshold 101" in refuse(setup, "message", "pool", "0", "@autoextend 101 20")


def test_thin_ids_in_use(setup: Udm) -> None:
    err = refuse(setup, "message", "pool", "0", "create_thin 1")
    assert err.endswith("device-mapper: message ioctl on pool  failed: File exists\nCommand failed.\n")
    assert "File exists" in refuse(setup, "message", "pool", "0", "create_snap 1 1")
    assert "No data available" in refuse(setup, "message", "pool", "0", "create_snap 5 9")
    assert "No data available" in refuse(setup, "message", "pool", "0", "delete 9")
    err = refuse(setup, "message", "pool", "0", "delete 1")  # active thin
    assert "message ioctl on pool  failed: Device or resource busy" in err
    assert "Invalid argument" in refuse(setup, "message", "pool", "0", "set_transaction_id 5 6")


def test_busy_and_missing_devices(setup: Udm) -> None:
    err = refuse(setup, "remove", "pool")
    assert err == "device-mapper: remove ioctl on pool  failed: Device or resource busy\nCommand failed.\n"
    err = refuse(setup, "remove", "nosuch")
    assert err == "device-mapper: remove ioctl on nosuch  failed: No such device or address\nCommand failed.\n"
    assert refuse(setup, "info", "nosuch") == "Device does not exist.\nCommand failed.\n"
    assert refuse(setup, "status", "nosuch") == "Device does not exist.\nCommand failed.\n"
    assert refuse(setup, "table", "nosuch") == (
        "device-mapper: table ioctl on nosuch  failed: No such device or address\nCommand failed.\n"
    )
    assert "deps ioctl on nosuch  failed" in refuse(setup, "deps", "nosuch")
    assert "reload ioctl on nosuch  failed: No such device or address" in refuse(
        setup, "load", "nosuch", "--table", "0 1 zero")
    assert "suspend ioctl on nosuch  failed" in refuse(setup, "suspend", "nosuch")
    assert "resume ioctl on nosuch  failed" in refuse(setup, "resume", "nosuch")
    assert "message ioctl on nosuch  failed" in refuse(setup, "message", "nosuch", "0", "x")
    assert refuse(setup, "info", "/tmp/nosuch") == "Device /tmp/nosuch not found\nCommand failed.\n"
    assert "autoextend applies to thin-pool devices only" in refuse(
        setup, "create", "z", "--table", "0 8 zero", "--autoextend", "70,20")
    assert "autoextend applies to thin-pool devices only" in refuse(
        setup, "load", "lin", "--table", "0 8 zero", "--autoextend", "70,20")


def test_option_errors(setup: Udm) -> None:
    before = snapshot(setup)
    r = setup("create", "x", "--table", "0 1 zero", "--notable")
    assert r.rc == 1 and "--table and --notable are incompatible." in r.err
    r = setup("load", "lin", "--notable")
    assert r.rc == 1 and "--notable only available when creating new device." in r.err
    r = setup("info", "-j", "253")
    assert r.rc == 1 and "Please specify both major number and minor number." in r.err
    r = setup("frobnicate")
    assert r.rc == 1 and r.err.startswith("Unknown command.\nUsage:")
    r = setup("--bogus", "ls")
    assert r.rc == 1 and "Couldn't process command line." in r.err
    r = setup("rename", "a", "b", "c")
    assert r.rc == 1 and r.err.startswith("Incorrect number of arguments.")
    assert snapshot(setup) == before
