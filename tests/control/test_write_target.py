"""``write_target`` of mapped devices (the NBD server's direct writes through the daemon's exports):
offered for a range inside one thin target over mapped, unshared blocks, refused elsewhere, held
as I/O in flight (a suspend waits for it), and received into straight from an NBD client."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from control.support import sparse
from devmapper.control.device import DeviceView, MappedDevice
from devmapper.control.errors import DmError
from devmapper.control.manager import DeviceManager, DeviceRef
from devmapper.control.nbd_exports import DeviceExports
from devmapper.control.table import parse_table
from devmapper.nbd.server import NbdServer
from pool.support import pattern

MiB = 1 << 20
BLOCK = 64 << 10


def pool_with_thin(mgr: DeviceManager, tmp_path: Path) -> DeviceView:
    meta, data = sparse(tmp_path / "meta", 8 * MiB), sparse(tmp_path / "data", 64 * MiB)
    mgr.create("pool", table=parse_table(f"0 131072 thin-pool {meta} {data} 128 0"))
    mgr.message(DeviceRef(name="pool"), 0, "create_thin 0")
    mgr.create("thin", table=parse_table("0 8192 thin /dev/mapper/pool 0"))  # 4 MiB
    thin = DeviceView(mgr.peek(DeviceRef(name="thin")))
    thin.write(0, bytes(2 * MiB))  # blocks 0..31 mapped, consecutive, cached
    return thin


def test_a_thin_device_offers_its_mapped_blocks(mgr: DeviceManager, tmp_path: Path) -> None:
    thin = pool_with_thin(mgr, tmp_path)
    token = thin.read_token()
    with thin.write_target(BLOCK + 10, 3 * BLOCK) as target:
        assert target is not None and len(target) == 3 * BLOCK
        target[:] = pattern(1, 3 * BLOCK)
    assert thin.read(BLOCK + 10, 3 * BLOCK) == pattern(1, 3 * BLOCK)
    assert thin.read_token() != token
    with thin.write_target(MiB, 2 * MiB) as target:
        assert target is None  # the second MiB's blocks are not mapped


def test_other_targets_and_ranges_across_targets_get_none(mgr: DeviceManager, tmp_path: Path) -> None:
    pool_with_thin(mgr, tmp_path)
    disk = sparse(tmp_path / "disk", 4 * MiB)
    mgr.create("lin", table=parse_table(f"0 2048 linear {disk} 0"))
    mgr.create("z", table=parse_table("0 2048 zero"))
    mgr.create("two", table=parse_table("0 1024 thin /dev/mapper/pool 0\n1024 1024 zero"))
    for name in ("lin", "z"):
        with DeviceView(mgr.peek(DeviceRef(name=name))).write_target(0, 256 << 10) as target:
            assert target is None
    two = DeviceView(mgr.peek(DeviceRef(name="two")))
    with two.write_target(256 << 10, 512 << 10) as target:
        assert target is None  # half thin, half zero
    with two.write_target(0, 256 << 10) as target:
        assert target is not None  # all in the thin segment


def test_a_read_only_device_refuses(mgr: DeviceManager, tmp_path: Path) -> None:
    pool_with_thin(mgr, tmp_path)
    mgr.create("ro", table=parse_table("0 8192 thin /dev/mapper/pool 0"), read_only=True)
    ro = DeviceView(mgr.peek(DeviceRef(name="ro")))
    with pytest.raises(DmError, match="read-only"), ro.write_target(0, 256 << 10):
        pass


@pytest.mark.parametrize("noflush", [False, True])
@pytest.mark.parametrize("device", ["thin", "pool"])
def test_a_suspend_waits_for_a_held_write_target(
    mgr: DeviceManager, tmp_path: Path, device: str, noflush: bool
) -> None:
    thin = pool_with_thin(mgr, tmp_path)
    suspended = threading.Event()
    with thin.write_target(0, 256 << 10) as target:
        assert target is not None

        def suspend() -> None:
            mgr.suspend(DeviceRef(name=device), noflush=noflush)
            suspended.set()

        t = threading.Thread(target=suspend, daemon=True)
        t.start()
        assert not suspended.wait(0.3), f"{device} suspended while a write was in flight"
        target[:] = pattern(2, 256 << 10)
    assert suspended.wait(10)
    mgr.resume(DeviceRef(name=device))
    assert thin.read(0, 256 << 10) == pattern(2, 256 << 10)


def test_nbd_writes_through_a_daemon_export_go_straight_in(
    mgr: DeviceManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    pool_with_thin(mgr, tmp_path)
    ordinary: list[int] = []
    write = MappedDevice.write

    def spy(self: MappedDevice, offset: int, data: object, fua: bool = False) -> None:
        ordinary.append(offset)
        write(self, offset, data, fua)  # type: ignore[arg-type]

    monkeypatch.setattr(MappedDevice, "write", spy)
    d = tempfile.mkdtemp(prefix="nbdt-")
    server = NbdServer(DeviceExports(mgr))
    try:
        path = server.serve_unix(os.path.join(d, "sock"))
        h = nbd.NBD()
        h.set_export_name("thin")
        h.connect_unix(path)
        data = pattern(3, MiB)
        h.pwrite(data, BLOCK)
        assert all(off > BLOCK for off in ordinary)  # at most a tail went the ordinary way
        assert h.pread(MiB, BLOCK) == data
        h.pwrite(pattern(4, MiB), 3 * MiB - BLOCK)  # partly unmapped: the ordinary way
        assert ordinary[-1] == 3 * MiB - BLOCK and h.pread(MiB, 3 * MiB - BLOCK) == pattern(4, MiB)
        h.shutdown()
    finally:
        server.shutdown()
        shutil.rmtree(d, ignore_errors=True)
