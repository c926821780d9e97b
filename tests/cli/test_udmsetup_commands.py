"""udmsetup commands one by one: dmsetup's output formats and the kernel's semantics."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from control.support import Udm, udm_fixture  # noqa: F401 - fixtures
from devmapper.control.errors import DmError

MiB = 1 << 20


def sparse(path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


@pytest.fixture
def stack(udm: Udm, tmp_path: Path) -> Udm:
    """pool (253:0) with thin 1 active as vol (253:1); lin (253:2) on a file; top (253:3) on lin."""
    meta, data = sparse(tmp_path / "meta", 8 * MiB), sparse(tmp_path / "data", 64 * MiB)
    udm.ok("create", "pool", "--table", f"0 131072 thin-pool {meta} {data} 128 16")
    udm.ok("message", "pool", "0", "create_thin 1")
    udm.ok("create", "vol", "--table", "0 8192 thin /dev/mapper/pool 1")
    udm.ok("create", "lin", "--table", f"0 2048 linear {sparse(tmp_path / 'small', MiB)} 0")
    udm.ok("create", "top", "--table", "0 1024 linear 253:2 1024")
    return udm


def test_info_columns(stack: Udm) -> None:
    stack.ok("rename", "top", "--setuuid", "TOP-UUID")
    stack.ok("load", "lin", "--table", "0 2048 zero")
    blank = " " * 32
    assert stack.ok("info", "-c") == (
        f"Name             Maj Min Stat Open Targ Event  UUID{' ' * 28}\n"
        f"lin              253   2 LI-w    1    1      0 {blank}\n"
        f"pool             253   0 L--w    1    1      0 {blank}\n"
        f"top              253   3 L--w    0    1      0 TOP-UUID{' ' * 24}\n"
        f"vol              253   1 L--w    0    1      0 {blank}\n"
    )
    assert stack.ok("info", "-c", "--noheadings", "-o", "name,attr,open,devno", "pool", "lin") == (
        "pool:L--w:1:253:0\nlin:LI-w:1:253:2\n"
    )
    assert stack.ok("info", "-C", "-o", "name,tables_loaded,suspended,readonly", "lin") == (
        "Name             Tables Suspended Read-only\nlin              Both   Active    Writeable\n"
    )
    assert stack.ok("info", "-c", "-o", "+device_count", "--noheadings", "pool").startswith("pool:253:0:L--w:1:1:0::2")
    r = stack("info", "-c", "-o", "name,nosuchfield")
    assert r.rc == 1 and r.err == "Unrecognised field: nosuchfield\nCommand failed.\n"


def test_info_long_shows_every_state(stack: Udm) -> None:
    stack.ok("create", "ro", "--notable", "--readonly", "-u", "LVM-xyz", "--readahead", "512")
    stack.ok("suspend", "top")
    assert stack.ok("info", "ro", "top") == (
        "Name:              ro\nState:             ACTIVE (READ-ONLY)\nRead Ahead:        512\n"
        "Tables present:    None\nOpen count:        0\nEvent number:      0\nMajor, minor:      253, 4\n"
        "Number of targets: 0\nUUID: LVM-xyz\n\n"
        "Name:              top\nState:             SUSPENDED\nRead Ahead:        256\n"
        "Tables present:    LIVE\nOpen count:        0\nEvent number:      0\nMajor, minor:      253, 3\n"
        "Number of targets: 1\n\n"
    )
    assert stack.ok("info", "-u", "LVM-xyz").startswith("Name:              ro\n")
    assert stack.ok("info", "-j", "253", "-m", "1").startswith("Name:              vol\n")
    assert stack.ok("info", "/dev/mapper/pool") == stack.ok("info", "pool") == stack.ok("info", "/dev/dm-0")


def test_ls_and_tree(stack: Udm) -> None:
    assert stack.ok("ls") == "lin\t(253:2)\npool\t(253:0)\ntop\t(253:3)\nvol\t(253:1)\n"
    d = stack.state.parent
    assert stack.ok("ls", "--tree") == (
        f"top (253:3)\n `-lin (253:2)\n    `-{d}/small\n"
        f"vol (253:1)\n `-pool (253:0)\n    |-{d}/data\n    `-{d}/meta\n"
    )
    assert stack.ok("ls", "--tree", "-o", "utf,nodevice,active,open") == (
        f"top [ACTIVE, 0]\n \u2514\u2500lin [ACTIVE, 1]\n    \u2514\u2500{d}/small\n"
        f"vol [ACTIVE, 0]\n \u2514\u2500pool [ACTIVE, 1]\n    \u251c\u2500{d}/data\n    \u2514\u2500{d}/meta\n"
    )
    assert stack.ok("ls", "--tree", "-o", "inverted,rw") == (  # leaves in the order they were met
        f"{d}/small\n `-lin (253:2) [RW]\n    `-top (253:3) [RW]\n"
        f"{d}/data\n `-pool (253:0) [RW]\n    `-vol (253:1) [RW]\n"
        f"{d}/meta\n `-pool (253:0) [RW]\n    `-vol (253:1) [RW]\n"
    )
    r = stack("ls", "--tree", "-o", "sideways")
    assert r.rc == 1 and "Tree option not recognised: sideways." in r.err
    assert stack.ok("ls", "--target", "thin") == "vol\t(253, 1)\n"
    assert stack.ok("ls", "--target", "linear") == "lin\t(253, 2)\ntop\t(253, 3)\n"


def test_deps(stack: Udm) -> None:
    d = stack.state.parent
    assert stack.ok("deps", "vol") == "1 dependencies\t: (253, 0)\n"
    assert stack.ok("deps", "pool", "top") == (
        f"pool: 2 dependencies\t: ({d}/data) ({d}/meta)\ntop: 1 dependencies\t: (253, 2)\n"
    )
    assert stack.ok("deps", "-o", "devname", "top") == "1 dependencies\t: (lin)\n"
    assert stack.ok("deps", "-o", "blkdevname", "top") == "1 dependencies\t: (dm-2)\n"
    assert stack.ok("deps").count("dependencies") == 4


def test_status_and_table_with_target_filter_and_no_table(stack: Udm) -> None:
    stack.ok("create", "empty", "--notable")
    assert stack.ok("table", "empty") == "\n"
    table = stack.ok("table")
    assert "empty: \n" in table and "vol: 0 8192 thin 253:0 1\n" in table
    status = stack.ok("status", "--target", "thin-pool")
    assert status.startswith("pool: 0 131072 thin-pool 0 ") and status.count("\n") == 1
    assert stack.ok("status", "--target", "thin", "vol") == "0 8192 thin 0 -\n"
    assert stack.ok("status", "--target", "linear", "vol") == ""
    assert stack.ok("status", "lin") == "0 2048 linear \n"
    assert stack.ok("table", "--target", "linear") == (
        f"lin: 0 2048 linear {stack.state.parent}/small 0\ntop: 0 1024 linear 253:2 1024\n"
    )
    assert stack.ok("status", "--noflush", "pool").startswith("0 131072 thin-pool 0 ")
    out = stack.ok("table", "-v", "vol")
    assert out.startswith("Name:              vol\n") and out.endswith("\n0 8192 thin 253:0 1\n")


def test_load_clear_wipe_and_resume(stack: Udm) -> None:
    stack.ok("load", "top", "--table", "0 512 zero")
    assert stack.ok("table", "--inactive", "top") == "0 512 zero \n"
    stack.ok("clear", "top")
    assert "Tables present:    LIVE\n" in stack.ok("info", "top")
    stack.ok("reload", "top", stdin="0 512 error\n")
    stack.ok("resume", "top")
    assert stack.ok("table", "top") == "0 512 error \n"
    with stack.client() as c, pytest.raises(DmError, match="I/O error"):
        c.read("top", 0, 512)
    stack.ok("wipe_table", "lin")
    assert stack.ok("table", "lin") == "0 2048 error \n"
    assert stack.ok("deps", "top") == "0 dependencies\t:\n"  # top no longer uses lin: lin is closed
    assert "Open count:        0\n" in stack.ok("info", "lin")


def test_suspend_holds_io_until_resume(stack: Udm) -> None:
    stack.ok("suspend", "--noflush", "vol")
    done = threading.Event()

    def writer() -> None:
        with stack.client() as c:
            c.write("vol", 0, b"x" * 4096)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.5)
    assert not done.is_set()  # held while suspended
    assert stack.ok("status", "vol") == "0 8192 thin 0 -\n"
    stack.ok("resume", "vol")
    thread.join(timeout=30)
    assert done.is_set()
    assert stack.ok("status", "vol") == "0 8192 thin 128 127\n"


def test_rename_keeps_references_by_number(stack: Udm) -> None:
    stack.ok("rename", "pool", "renamed-pool")
    assert stack.ok("table", "vol") == "0 8192 thin 253:0 1\n"
    stack.ok("message", "/dev/mapper/renamed-pool", "0", "create_thin 2")
    stack.ok("create", "vol2", "--table", "0 100 thin /dev/mapper/renamed-pool 2")
    stack.ok("rename", "/dev/mapper/vol2", "--setuuid", "UUID-2")
    assert "UUID: UUID-2\n" in stack.ok("info", "vol2")


def test_remove_deferred_and_cancel(stack: Udm) -> None:
    assert stack.ok("remove", "--deferred", "pool") == ""
    assert "State:             ACTIVE (DEFERRED REMOVE)\n" in stack.ok("info", "pool")
    stack.ok("message", "pool", "0", "@cancel_deferred_remove")
    assert "State:             ACTIVE\n" in stack.ok("info", "pool")
    stack.ok("remove", "--deferred", "pool")
    stack.ok("remove", "vol")  # the pool's last opener goes: the pool follows
    assert stack.ok("ls") == "lin\t(253:2)\ntop\t(253:3)\n"
    stack.ok("remove", "--deferred", "top")  # not open: removed at once
    assert stack.ok("ls") == "lin\t(253:2)\n"


def test_remove_force_and_retry(stack: Udm) -> None:
    r = stack("remove", "--force", "lin")  # open (top uses it): wiped, then busy
    assert r.rc == 1 and "remove ioctl on lin  failed: Device or resource busy" in r.err
    assert stack.ok("table", "lin") == "0 2048 error \n"
    threading.Timer(0.6, lambda: stack.ok("remove", "top")).start()
    stack.ok("remove", "--retry", "lin")  # succeeds once top is gone
    assert stack.ok("ls") == "pool\t(253:0)\nvol\t(253:1)\n"
    stack.ok("remove", "-f", "vol")
    assert stack.ok("ls") == "pool\t(253:0)\n"


def test_remove_all(stack: Udm) -> None:
    assert stack.ok("remove_all") == ""
    assert stack.ok("ls") == "No devices found\n"
    assert stack.ok("info") == "No devices found\n"


def test_wait_for_events(stack: Udm, tmp_path: Path) -> None:
    r = stack("wait", "pool", "--timeout", "0.2")
    assert r.rc == 1 and "device-mapper: waitevent ioctl on pool  failed: Timer expired" in r.err
    with stack.client() as c:  # 64 of 1024 blocks used: far from the low water mark of 16 free blocks
        c.write("vol", 0, b"y" * (4 * MiB))
    assert stack("wait", "pool", "0", "--timeout", "0.5").rc == 1
    # a low water mark of 1000 free blocks is already passed: the next allocation raises the event
    stack.ok("load", "pool", "--table", f"0 131072 thin-pool {tmp_path}/meta {tmp_path}/data 128 1000")
    stack.ok("resume", "pool")
    stack.ok("message", "pool", "0", "create_thin 2")
    stack.ok("create", "vol2", "--table", "0 8192 thin /dev/mapper/pool 2")
    with stack.client() as c:
        c.write("vol2", 0, b"z" * 65536)
    assert stack.ok("wait", "pool", "0", "--timeout", "10") == ""
    assert "Event number:      1\n" in stack.ok("info", "pool")
    assert stack.ok("wait", "-v", "pool", "--timeout", "1").startswith("Name:              pool\n")


def test_autoextend_policy_by_option_and_message(stack: Udm, tmp_path: Path) -> None:
    assert stack.ok("message", "pool", "0", "@autoextend") == "off\n"
    stack.ok("message", "pool", "0", "@autoextend 80 25")
    assert stack.ok("message", "pool", "0", "@autoextend") == "80 25 0\n"
    assert "Autoextend:        threshold 80%, percent 25%; extended 0 times\n" in stack.ok("info", "pool")
    stack.ok("load", "pool", "--autoextend", "70,10", "--table",
             f"0 131072 thin-pool {tmp_path}/meta {tmp_path}/data 128 16")
    assert stack.ok("message", "pool", "0", "@autoextend") == "70 10 0\n"
    stack.ok("message", "pool", "0", "@autoextend off")
    assert "Autoextend" not in stack.ok("info", "pool")


def test_external_origin(stack: Udm, tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    origin.write_bytes(b"O" * 65536 + b"P" * 1000)
    stack.ok("message", "pool", "0", "create_thin 5")
    stack.ok("create", "ext", "--table", f"0 1024 thin /dev/mapper/pool 5 {origin}")
    assert stack.ok("table", "ext") == f"0 1024 thin 253:0 5 {origin}\n"
    with stack.client() as c:
        assert c.read("ext", 65536, 1024) == b"P" * 1000 + bytes(24)
        c.write("ext", 65536 + 10, b"new")
        assert c.read("ext", 65536, 16) == b"P" * 10 + b"new" + b"P" * 3
        assert c.read("ext", 0, 4) == b"OOOO"
    assert origin.read_bytes()[65536 + 10 : 65536 + 13] == b"PPP"  # the origin is never written


def test_mknodes_and_verbose_create(stack: Udm) -> None:
    assert stack.ok("mknodes") == ""
    assert stack.ok("mknodes", "nosuch") == ""
    out = stack.ok("create", "-v", "z", "--table", "0 8 zero")
    assert out.startswith("Name:              z\nState:             ACTIVE\n")


def test_block_status_reports_holes(stack: Udm) -> None:
    with stack.client() as c:
        c.write("vol", 65536, b"d" * 65536)
        extents = c.block_status("vol", 0, 4 * 65536)
    assert [(e.length, e.hole) for e in extents] == [(65536, True), (65536, False), (2 * 65536, True)]


def test_table_output_loads_back_unchanged(stack: Udm, tmp_path: Path) -> None:
    stack.ok("create", "stripes", "--table",
             f"0 512 striped 2 8 {sparse(tmp_path / 's1', MiB)} 0 {sparse(tmp_path / 's2', MiB)} 16\n512 8 error")
    before = stack.ok("table")
    for line in before.splitlines():
        name = line.split(": ", 1)[0]
        stack.ok("load", name, stdin=stack.ok("table", name))
        stack.ok("resume", name)
    assert stack.ok("table") == before
    assert stack.ok("table", "mapper/pool") == stack.ok("table", "pool")
