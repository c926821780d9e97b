"""Pool autoextend: LVM's threshold/percent policy growing a file-backed data device while writes go on."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from control.support import Udm
from devmapper.control.autoextend import AutoextendPolicy, AutoextendStats
from devmapper.control.errors import DmError
from devmapper.control.manager import DeviceManager, DeviceRef
from devmapper.control.state import StateStore
from devmapper.control.table import parse_table
from helpers.tools import require_tool

MiB = 1 << 20
BLOCK = 65536


def sparse(path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def test_policy_arithmetic() -> None:
    p = AutoextendPolicy(70, 20)
    assert not p.due(69, 100) and p.due(70, 100)
    assert p.grown_length(8192, 128) == 8192 + 1664  # 20% = 1638.4 sectors, rounded up to 13 blocks
    assert AutoextendPolicy(50, 1).grown_length(1024, 128) == 1152  # at least one block
    assert AutoextendPolicy.parse(["70%,20%"]) == p == AutoextendPolicy.parse(["70", "20"])
    assert not AutoextendPolicy(100, 20).enabled and not AutoextendPolicy(70, 0).enabled
    for bad in (["0", "20"], ["101", "5"], ["70"], ["a", "b"], ["70", "-1"]):
        with pytest.raises(DmError):
            AutoextendPolicy.parse(bad)
    stats = AutoextendStats(extensions=2, last_time=0.0, last_from=8, last_to=16)
    assert AutoextendStats.from_json(stats.to_json()) == stats
    assert stats.describe().startswith("extended 2 times, last ")


def test_a_small_sparse_pool_grows_past_its_threshold_and_writes_continue(tmp_path: Path) -> None:
    meta = sparse(tmp_path / "meta", 8 * MiB)
    data = sparse(tmp_path / "data", 64 * BLOCK)  # 64 blocks of 64 KiB
    m = DeviceManager(StateStore(tmp_path / "state"), monitor_interval=0.05)
    m.start()
    try:
        m.create("pool", table=parse_table(f"0 8192 thin-pool {meta} {data} 128 0"),
                 autoextend=AutoextendPolicy(50, 50))
        m.message(DeviceRef("pool"), 0, "create_thin 0")
        m.create("vol", table=parse_table("0 409600 thin 253:0 0"))
        payload = os.urandom(100 * BLOCK)  # more than the pool held at first
        for i in range(100):
            m.write(DeviceRef("vol"), i * BLOCK, payload[i * BLOCK : (i + 1) * BLOCK])
        m.flush(DeviceRef("vol"))
        assert m.read(DeviceRef("vol"), 0, len(payload)) == payload
        m.monitor.stop()  # 100/144 blocks is still past 50%: freeze growth before comparing figures
        length = m.table(DeviceRef("pool"))[0].length
        steps = [8192, 12288, 18432, 27648, 41472]  # +50% each time; 100 blocks need at least 144 (18432)
        assert length in steps[2:]  # further steps depend on when the monitor looked
        assert os.path.getsize(data) == length * 512
        status = m.status(DeviceRef("pool"))[0].params
        assert re.match(rf"0 \d+/2048 100/{length // 128} - rw ", status), status
        policy, stats = m.autoextend_of(0)
        assert policy == AutoextendPolicy(50, 50) and stats is not None
        assert stats.extensions == steps.index(length)
        assert m.info(DeviceRef("pool")).event_nr >= stats.extensions
    finally:
        m.shutdown()
    proc = subprocess.run([require_tool("thin_check"), meta], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_autoextend_through_udmsetup_and_a_restart(udm: Udm, tmp_path: Path) -> None:
    meta, data = sparse(tmp_path / "meta", 8 * MiB), sparse(tmp_path / "data", 100 * BLOCK)
    udm.ok("create", "pool", "--autoextend", "70,20", "--table", f"0 12800 thin-pool {meta} {data} 128 0")
    udm.ok("message", "pool", "0", "create_thin 0")
    udm.ok("create", "vol", "--table", "0 204800 thin /dev/mapper/pool 0")
    with udm.client() as c:
        c.write("vol", 0, b"a" * (71 * BLOCK), fua=True)  # 71% of 100 blocks
    info = ""
    for _ in range(200):
        info = udm.ok("info", "pool")
        if "extended 1 time," in info:
            break
        __import__("time").sleep(0.05)
    assert "Autoextend:        threshold 70%, percent 20%; extended 1 time, last " in info
    assert "from 12800 to 15360 sectors" in info
    assert udm.ok("table", "pool").startswith("0 15360 thin-pool ")
    assert re.fullmatch(r"0 15360 thin-pool 0 \d+/2048 71/120 - rw discard_passdown queue_if_no_space - 512 \n",
                        udm.ok("status", "pool"))
    assert "extended 1 time" in udm.log() or "autoextend" in udm.log()
    udm.kill()
    udm.start()
    assert udm.ok("table", "pool").startswith("0 15360 thin-pool ")
    assert udm.ok("message", "pool", "0", "@autoextend") == "70 20 1\n"
