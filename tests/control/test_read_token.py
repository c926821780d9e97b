"""``read_token`` of mapped devices: stable while nothing can change the bytes, moved by every
write (through any device on the same thin), by a table swap; None when it cannot be told."""

from __future__ import annotations

from pathlib import Path

from control.support import sparse
from devmapper.control.device import DeviceView
from devmapper.control.manager import DeviceManager, DeviceRef
from devmapper.control.table import parse_table

MiB = 1 << 20


def pool_with_thin(mgr: DeviceManager, tmp_path: Path) -> None:
    meta, data = sparse(tmp_path / "meta", 8 * MiB), sparse(tmp_path / "data", 64 * MiB)
    mgr.create("pool", table=parse_table(f"0 131072 thin-pool {meta} {data} 128 0"))
    mgr.message(DeviceRef(name="pool"), 0, "create_thin 0")
    mgr.create("thin", table=parse_table("0 8192 thin /dev/mapper/pool 0"))
    mgr.create("again", table=parse_table("0 8192 thin /dev/mapper/pool 0"))  # the same thin, twice


def view(mgr: DeviceManager, name: str) -> DeviceView:
    return DeviceView(mgr.peek(DeviceRef(name=name)))


def test_thin_token_moves_with_writes_through_any_device_of_the_thin(mgr: DeviceManager, tmp_path: Path) -> None:
    pool_with_thin(mgr, tmp_path)
    thin = view(mgr, "thin")
    before = thin.read_token()
    assert before is not None
    thin.read(0, MiB)
    assert thin.read_token() == before
    mgr.write(DeviceRef(name="again"), 4096, b"x" * 4096)
    after = thin.read_token()
    assert after != before and after is not None
    thin.discard(0, MiB)
    assert thin.read_token() != after


def test_a_table_swap_or_a_suspend_changes_it(mgr: DeviceManager, tmp_path: Path) -> None:
    pool_with_thin(mgr, tmp_path)
    thin, ref = view(mgr, "thin"), DeviceRef(name="thin")
    before = thin.read_token()
    mgr.suspend(ref)
    assert thin.read_token() is None
    mgr.resume(ref)
    assert thin.read_token() == before  # same table, nothing written
    mgr.load(ref, parse_table("0 16384 thin /dev/mapper/pool 0"))
    mgr.suspend(ref)
    mgr.resume(ref)
    assert thin.read_token() not in (None, before)


def test_targets_that_cannot_tell_give_none(mgr: DeviceManager, tmp_path: Path) -> None:
    disk = sparse(tmp_path / "disk", 4 * MiB)
    mgr.create("lin", table=parse_table(f"0 2048 linear {disk} 0"))
    mgr.create("z", table=parse_table("0 2048 zero"))
    mgr.create("mix", table=parse_table(f"0 1024 zero\n1024 1024 linear {disk} 0"))
    assert view(mgr, "lin").read_token() is None
    assert view(mgr, "mix").read_token() is None
    z = view(mgr, "z")
    assert z.read_token() is not None and z.read_token() == z.read_token()
