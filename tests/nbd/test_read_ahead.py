"""The server's read-ahead for sequential READs: it happens, it is served only for the exact next
READ, and a write, trim or write-zeroes from any connection (or a failed write) throws it away."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Serve
from control.support import mgr_fixture, sparse
from devmapper.cli.nbd import ThinExport
from devmapper.control.manager import DeviceManager, DeviceRef
from devmapper.control.nbd_exports import DeviceExports
from devmapper.control.table import parse_table
from devmapper.nbd import server as nbd_server
from devmapper.thin.pool import Pool
from devmapper.thin.volume import ThinVolume

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")

__all__ = ["mgr_fixture"]  # the in-process device manager fixture ("mgr")

MiB = 1 << 20
PIECE = 256 << 10  # the smallest READ that is read ahead
BLOCK = 64 << 10  # the pool's block size


class CountingExport(ThinExport):
    """A ThinExport that records every readinto (offset, length)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.readintos: list[tuple[int, int]] = []

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        self.readintos.append((offset, len(buf)))
        super().readinto(offset, buf)


@pytest.fixture
def served(pool: Pool, serve: Serve) -> Iterator[tuple[CountingExport, str]]:
    export = CountingExport(pool.open_thin(0, 8 * MiB // 512), "vol")
    export.write(0, bytes([7]) * (8 * MiB))
    _server, path = serve({"vol": export}, workers=0)
    yield export, path
    export.close()


def read_ahead_of(export: CountingExport, offset: int, timeout: float = 10.0) -> None:
    """Wait until the server has read ahead at offset (it does so after sending the reply)."""
    deadline = time.monotonic() + timeout
    while (offset, PIECE) not in export.readintos:
        assert time.monotonic() < deadline, f"no read-ahead at {offset}: {export.readintos}"
        time.sleep(0.001)


def connect(path: str) -> Any:
    h = nbd.NBD()
    h.set_export_name("vol")
    h.connect_unix(path)
    return h


def test_sequential_reads_are_read_ahead_and_served_from_it(served: tuple[CountingExport, str]) -> None:
    export, path = served
    h = connect(path)
    for i in range(4):
        assert h.pread(PIECE, i * PIECE) == bytes([7]) * PIECE
    read_ahead_of(export, 4 * PIECE)
    # READs 0 and 1 were read on demand; READ 1 continued READ 0, so READ 2 was read ahead, and so on
    assert export.readintos == [(i * PIECE, PIECE) for i in range(5)]
    h.pread(PIECE, 0)  # not the range read ahead: read on demand, nothing more ahead (not sequential)
    assert export.readintos[5:] == [(0, PIECE)]
    h.shutdown()


def test_small_or_random_reads_are_not_read_ahead(served: tuple[CountingExport, str]) -> None:
    export, path = served
    h = connect(path)
    for i in range(8):
        h.pread(64 << 10, i * (64 << 10))
    for off in (3 * MiB, MiB, 5 * MiB):
        h.pread(PIECE, off)
    small = [(i * (64 << 10), 64 << 10) for i in range(8)]
    assert export.readintos == [*small, (3 * MiB, PIECE), (MiB, PIECE), (5 * MiB, PIECE)]  # each on demand only
    h.shutdown()


Change = Callable[[Any, int], None]
CHANGES: dict[str, Change] = {
    "write": lambda h, off: h.pwrite(b"\xab" * 4096, off + 8192),
    "trim": lambda h, off: h.trim(PIECE, off),
    "zero": lambda h, off: h.zero(8192, off + 4096),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("same_connection", [False, True], ids=["other_connection", "same_connection"])
def test_a_change_to_the_volume_throws_the_read_ahead_away(
    served: tuple[CountingExport, str], change: str, same_connection: bool
) -> None:
    export, path = served
    reader = connect(path)
    writer = reader if same_connection else connect(path)
    reader.pread(PIECE, 0)
    reader.pread(PIECE, PIECE)
    read_ahead_of(export, 2 * PIECE)
    CHANGES[change](writer, 2 * PIECE)
    want = bytearray(export.volume.read(2 * PIECE, PIECE))
    assert want != bytes([7]) * PIECE
    assert reader.pread(PIECE, 2 * PIECE) == want
    assert export.readintos[-2] == (2 * PIECE, PIECE)  # read again on demand
    reader.shutdown()
    if not same_connection:
        writer.shutdown()


def test_a_failed_write_also_throws_it_away(
    served: tuple[CountingExport, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    export, path = served
    reader, writer = connect(path), connect(path)
    reader.pread(PIECE, 0)
    reader.pread(PIECE, PIECE)
    read_ahead_of(export, 2 * PIECE)
    volume = export.volume
    real_write_in_place = type(volume)._write_in_place

    def half_then_fail(self: Any, offset: int, mv: memoryview, fua: bool) -> bool:
        _vblocks, blocks = self.pool.md.map_range(self.dev_id, offset // BLOCK, offset // BLOCK + 1)
        self.pool.data.write(blocks[0] * BLOCK, [mv[:4096]])  # the first 4 KiB reach the data file
        raise OSError(5, "injected")

    monkeypatch.setattr(type(volume), "_write_in_place", half_then_fail)
    with pytest.raises(nbd.Error):
        writer.pwrite(b"\xcd" * (128 << 10), 2 * PIECE)
    monkeypatch.setattr(type(volume), "_write_in_place", real_write_in_place)
    assert reader.pread(PIECE, 2 * PIECE)[:4096] == b"\xcd" * 4096  # what reached the disk shows
    reader.shutdown()
    writer.shutdown()


def test_read_ahead_stops_at_the_end_of_the_export(served: tuple[CountingExport, str]) -> None:
    export, path = served
    h = connect(path)
    end = 8 * MiB
    h.pread(PIECE, end - 2 * PIECE)
    h.pread(PIECE, end - PIECE)
    assert export.readintos == [(end - 2 * PIECE, PIECE), (end - PIECE, PIECE)]  # nothing past the end
    h.shutdown()


def test_the_sizes_that_trigger_read_ahead() -> None:
    assert nbd_server.READ_AHEAD_MIN == PIECE


def test_daemon_exports_read_ahead_and_see_writes_through_another_device(
    mgr: DeviceManager, tmp_path: Path, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta, data = sparse(tmp_path / "meta", 8 * MiB), sparse(tmp_path / "data", 64 * MiB)
    mgr.create("pool", table=parse_table(f"0 131072 thin-pool {meta} {data} 128 0"))
    mgr.message(DeviceRef(name="pool"), 0, "create_thin 0")
    mgr.create("thin", table=parse_table("0 8192 thin /dev/mapper/pool 0"))
    mgr.create("again", table=parse_table("0 8192 thin /dev/mapper/pool 0"))  # the same thin
    mgr.write(DeviceRef(name="thin"), 0, bytes([7]) * (4 * MiB))
    calls: list[tuple[int, int]] = []
    real = ThinVolume.readinto

    def counting(self: ThinVolume, offset: int, buf: bytearray | memoryview) -> None:
        calls.append((offset, len(buf)))
        real(self, offset, buf)

    monkeypatch.setattr(ThinVolume, "readinto", counting)
    _server, path = serve(DeviceExports(mgr), workers=0)
    h = nbd.NBD()
    h.set_export_name("thin")
    h.connect_unix(path)
    h.pread(PIECE, 0)
    h.pread(PIECE, PIECE)
    deadline = time.monotonic() + 10
    while (2 * PIECE, PIECE) not in calls:
        assert time.monotonic() < deadline, calls
        time.sleep(0.001)
    mgr.write(DeviceRef(name="again"), 2 * PIECE + 4096, b"\xee" * 4096)
    got = h.pread(PIECE, 2 * PIECE)
    assert got[4096:8192] == b"\xee" * 4096 and got[:4096] == bytes([7]) * 4096
    h.shutdown()
