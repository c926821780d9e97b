"""The device manager in-process: targets' I/O, table swaps, stacking, open counts, exports, restore."""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import pytest

from control.support import sparse
from devmapper.control.errors import DmError
from devmapper.control.manager import DeviceManager, DeviceRef
from devmapper.control.state import StateStore
from devmapper.control.table import TableLine, parse_table
from devmapper.export import Export, Extent

MiB = 1 << 20


def reopen(m: DeviceManager, tmp_path: Path) -> DeviceManager:
    m.shutdown()
    m2 = DeviceManager(StateStore(tmp_path / "state"), monitor_interval=0.1)
    m2.start()
    return m2


def ref(name: str) -> DeviceRef:
    return DeviceRef(name=name)


def test_linear_striped_zero_error_segments_match_a_model(mgr: DeviceManager, tmp_path: Path) -> None:
    a, b, c = (sparse(tmp_path / n, 4 * MiB) for n in "abc")
    mgr.create("mix", table=parse_table(
        f"0 1024 linear {a} 2048\n1024 512 zero\n1536 2048 striped 2 8 {b} 16 {c} 0\n3584 8 error"))
    model = bytearray(3584 * 512)
    rng = random.Random(7)
    for _ in range(200):
        off = rng.randrange(0, 3584 * 512 - 5000)
        data = rng.randbytes(rng.randrange(1, 5000))
        mgr.write(ref("mix"), off, data)
        model[off : off + len(data)] = data
    model[1024 * 512 : 1536 * 512] = bytes(512 * 512)  # zero target drops writes
    assert mgr.read(ref("mix"), 0, len(model)) == bytes(model)
    stripe0 = open(b, "rb").read()[16 * 512 : 16 * 512 + 4096]  # noqa: SIM115
    assert stripe0 == bytes(model[1536 * 512 : 1536 * 512 + 4096])  # chunk 0 of the stripe set lives on b
    with pytest.raises(DmError, match="I/O error"):
        mgr.read(ref("mix"), 3584 * 512, 512)
    with pytest.raises(DmError, match="beyond the end"):
        mgr.read(ref("mix"), 3592 * 512, 1)
    assert [line.target for line in mgr.status(ref("mix"))] == ["linear", "zero", "striped", "error"]
    assert mgr.status(ref("mix"))[2].params == f"2 {b} {c} 1 AA"


def test_load_is_inactive_until_resume_and_swap_keeps_io_consistent(mgr: DeviceManager, tmp_path: Path) -> None:
    f = sparse(tmp_path / "f", MiB)
    mgr.create("d", table=parse_table(f"0 2048 linear {f} 0"))
    mgr.write(ref("d"), 0, b"live")
    mgr.load(ref("d"), parse_table("0 4096 zero"))
    assert mgr.read(ref("d"), 0, 4) == b"live"
    assert mgr.info(ref("d")).inactive_table
    mgr.resume(ref("d"))
    assert mgr.read(ref("d"), 0, 4) == bytes(4)
    assert mgr.table(ref("d")) == [TableLine(0, 4096, "zero", "")]
    assert not mgr.info(ref("d")).inactive_table


def test_pool_on_linear_devices_and_open_counts(mgr: DeviceManager, tmp_path: Path) -> None:
    disk = sparse(tmp_path / "disk", 80 * MiB)
    mgr.create("meta", table=parse_table(f"0 16384 linear {disk} 0"))  # 8 MiB
    mgr.create("data", table=parse_table(f"0 131072 linear {disk} 16384"))  # 64 MiB
    mgr.create("pool", table=parse_table("0 131072 thin-pool /dev/mapper/meta 253:1 128 0"))
    assert mgr.table(ref("pool"))[0].params == "253:0 253:1 128 0 0 "
    assert mgr.deps(ref("pool")) == [("253:1", (253, 1)), ("253:0", (253, 0))]
    assert mgr.info(ref("meta")).open_count == 1
    mgr.message(ref("pool"), 0, "create_thin 0")
    mgr.create("thin", table=parse_table("0 204800 thin 253:2 0"))
    payload = os.urandom(3 * 65536 + 100)
    mgr.write(ref("thin"), 65536 * 7 + 5, payload)
    mgr.flush(ref("thin"))
    assert mgr.read(ref("thin"), 65536 * 7 + 5, len(payload)) == payload
    assert mgr.status(ref("thin"))[0].params == f"{4 * 128} {11 * 128 - 1}"
    with pytest.raises(DmError) as e:
        mgr.remove(ref("data"))
    assert e.value.errno_name == "EBUSY"
    mgr.remove(ref("thin"))
    mgr.remove(ref("pool"))
    assert mgr.info(ref("meta")).open_count == 0
    mgr.remove(ref("meta"))
    mgr.remove(ref("data"))
    assert mgr.list_devices() == []


def test_export_handles_count_as_openers(mgr: DeviceManager, tmp_path: Path) -> None:
    mgr.create("z", table=parse_table("0 2048 zero"))
    handle: Export = mgr.open_export(ref("z"))
    assert handle.name == "z" and handle.size() == 2048 * 512 and not handle.read_only
    assert mgr.info(ref("z")).open_count == 1
    assert handle.block_status(0, 4096) == [Extent(4096, hole=True, zero=True)]
    with pytest.raises(DmError):
        mgr.remove(ref("z"))
    mgr.remove(ref("z"), deferred=True)
    assert mgr.info(ref("z")).deferred_remove
    handle.close()
    assert mgr.list_devices() == []
    with pytest.raises(DmError, match="closed"):
        handle.read(0, 1)


def test_read_only_device_refuses_writes(mgr: DeviceManager) -> None:
    mgr.create("ro", table=parse_table("0 8 zero"), read_only=True)
    with pytest.raises(DmError) as e:
        mgr.write(ref("ro"), 0, b"x")
    assert e.value.errno_name == "EROFS"


def test_suspended_device_holds_io(mgr: DeviceManager, tmp_path: Path) -> None:
    f = sparse(tmp_path / "f", MiB)
    mgr.create("d", table=parse_table(f"0 2048 linear {f} 0"))
    mgr.suspend(ref("d"))
    done = threading.Event()
    threading.Thread(target=lambda: (mgr.write(ref("d"), 0, b"late"), done.set()), daemon=True).start()
    assert not done.wait(0.3)
    mgr.resume(ref("d"))
    assert done.wait(10)
    assert open(f, "rb").read(4) == b"late"  # noqa: SIM115


def test_everything_comes_back_after_restart(mgr: DeviceManager, tmp_path: Path) -> None:
    meta, data = sparse(tmp_path / "meta", 8 * MiB), sparse(tmp_path / "data", 64 * MiB)
    mgr.create("pool", table=parse_table(f"0 131072 thin-pool {meta} {data} 128 0"), uuid="POOL")
    mgr.message(ref("pool"), 0, "@autoextend 90 10")
    mgr.message(ref("pool"), 0, "create_thin 3")
    mgr.create("vol", table=parse_table("0 4096 thin 253:0 3"))
    mgr.write(ref("vol"), 0, b"persistent")
    mgr.load(ref("vol"), parse_table("0 8192 thin 253:0 3"))
    mgr.suspend(ref("vol"))
    mgr.create("idle", table=parse_table("0 8 zero"))
    mgr.remove(ref("pool"), deferred=True)
    before = (mgr.list_devices(), [mgr.table(ref(n)) for n in ("pool", "vol", "idle")],
              mgr.table(ref("vol"), inactive=True))
    m2 = reopen(mgr, tmp_path)
    try:
        after = (m2.list_devices(), [m2.table(ref(n)) for n in ("pool", "vol", "idle")],
                 m2.table(ref("vol"), inactive=True))
        assert after == before
        assert m2.info(ref("vol")).suspended and m2.info(ref("pool")).deferred_remove
        assert m2.autoextend_of(0)[0] is not None
        m2.resume(ref("vol"))
        assert m2.read(ref("vol"), 0, 10) == b"persistent"
        assert m2.table(ref("vol")) == [TableLine(0, 8192, "thin", "253:0 3")]
    finally:
        m2.shutdown()


def test_unrestorable_tables_are_kept_until_their_devices_return(tmp_path: Path) -> None:
    f = Path(sparse(tmp_path / "f", MiB))
    m = DeviceManager(StateStore(tmp_path / "state"))
    m.start()
    m.create("d", table=parse_table(f"0 2048 linear {f} 0"))
    m.create("top", table=parse_table("0 1024 linear 253:0 0"))
    m.shutdown()
    f.rename(tmp_path / "away")
    m = DeviceManager(StateStore(tmp_path / "state"))
    m.start()
    assert [(i.name, i.live_table) for i in m.list_devices()] == [("d", False), ("top", False)]
    m.create("other", table=parse_table("0 8 zero"))  # a save must not drop the unrestored tables
    m.shutdown()
    saved = json.loads((tmp_path / "state" / "devices.json").read_text())
    assert saved["devices"][0]["live"] == [[0, 2048, "linear", f"{f} 0"]]
    (tmp_path / "away").rename(f)
    m = DeviceManager(StateStore(tmp_path / "state"))
    m.start()
    try:
        assert [(i.name, i.live_table) for i in m.list_devices()] == [("d", True), ("other", True), ("top", True)]
    finally:
        m.shutdown()


def test_corrupt_state_is_kept_aside(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "devices.json").write_text("{not json")
    m = DeviceManager(StateStore(tmp_path / "state"))
    m.start()
    try:
        assert m.list_devices() == []
        assert (tmp_path / "state" / "devices.json.corrupt").read_text() == "{not json"
    finally:
        m.shutdown()


def test_suspending_the_pool_holds_its_thins(mgr: DeviceManager, tmp_path: Path) -> None:
    meta, data = sparse(tmp_path / "meta", 8 * MiB), sparse(tmp_path / "data", 16 * MiB)
    mgr.create("pool", table=parse_table(f"0 32768 thin-pool {meta} {data} 128 0"))
    mgr.message(ref("pool"), 0, "create_thin 0")
    mgr.message(ref("pool"), 0, "create_thin 1")
    mgr.create("thin", table=parse_table("0 2048 thin 253:0 0"))
    mgr.suspend(ref("pool"))
    with pytest.raises(DmError, match="Unable to activate thin device while pool is suspended"):
        mgr.create("other", table=parse_table("0 2048 thin 253:0 1"))
    assert [i.name for i in mgr.list_devices()] == ["pool", "thin"]
    done = threading.Event()
    threading.Thread(target=lambda: (mgr.write(ref("thin"), 0, b"held"), done.set()), daemon=True).start()
    assert not done.wait(0.3)
    mgr.resume(ref("pool"))
    assert done.wait(10)
    assert mgr.read(ref("thin"), 0, 4) == b"held"


def test_a_full_pool_with_error_if_no_space_fails_writes_with_enospc(mgr: DeviceManager, tmp_path: Path) -> None:
    meta, data = sparse(tmp_path / "meta", 8 * MiB), sparse(tmp_path / "data", 2 * 65536)
    mgr.create("pool", table=parse_table(f"0 256 thin-pool {meta} {data} 128 0 1 error_if_no_space"))
    mgr.message(ref("pool"), 0, "create_thin 0")
    mgr.create("thin", table=parse_table("0 2048 thin 253:0 0"))
    mgr.write(ref("thin"), 0, b"a" * 2 * 65536)
    with pytest.raises(DmError) as e:
        mgr.write(ref("thin"), 2 * 65536, b"b")
    assert e.value.errno_name == "ENOSPC"
    assert " out_of_data_space " in mgr.status(ref("pool"))[0].params


def test_a_read_only_pool_table_needs_the_read_only_feature(mgr: DeviceManager, tmp_path: Path) -> None:
    meta, data = sparse(tmp_path / "meta", 8 * MiB), sparse(tmp_path / "data", 16 * MiB)
    mgr.create("pool", table=parse_table(f"0 32768 thin-pool {meta} {data} 128 0"))
    mgr.message(ref("pool"), 0, "create_thin 0")
    mgr.remove(ref("pool"))
    with pytest.raises(DmError, match="read_only feature"):
        mgr.create("ro", table=parse_table(f"0 32768 thin-pool {meta} {data} 128 0"), read_only=True)
    mgr.create("ro", table=parse_table(f"0 32768 thin-pool {meta} {data} 128 0 1 read_only"), read_only=True)
    assert " ro " in mgr.status(ref("ro"))[0].params
    with pytest.raises(DmError) as e:
        mgr.message(ref("ro"), 0, "create_thin 1")
    assert e.value.errno_name == "EOPNOTSUPP"
