"""Direct writes: a large WRITE payload received straight into the data file over mapped, unshared,
consecutive, cached blocks -- with the bytes landing right, the read token moving, a stalled client
giving the blocks back (a commit is not held up) and a client vanishing mid-payload harming nothing."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import nbd_wire as wire
import pytest

from conftest import Serve
from devmapper.cli.nbd import ThinExport
from devmapper.nbd import server as nbd_server
from devmapper.nbd.protocol import Cmd, Opt
from devmapper.thin.pool import Pool
from devmapper.thin.volume import ThinVolume
from pool.support import pattern

MiB = 1 << 20
BLOCK = 64 << 10


class Recording(ThinExport):
    """Counts the write targets that were given out and the ordinary writes."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.targets = 0
        self.writes: list[tuple[int, int]] = []

    def write(self, offset: int, data: Any, fua: bool = False) -> None:
        self.writes.append((offset, len(memoryview(data))))
        super().write(offset, data, fua)

    def write_target(self, offset: int, length: int) -> Any:
        outer = super().write_target(offset, length)
        export = self

        class Counting:
            def __enter__(self) -> memoryview | None:
                view = outer.__enter__()
                export.targets += view is not None
                return view

            def __exit__(self, *exc: Any) -> Any:
                return outer.__exit__(*exc)

        return Counting()


@pytest.fixture
def served(pool: Pool, serve: Serve) -> Iterator[tuple[Recording, str]]:
    export = Recording(pool.open_thin(0, 8 * MiB // 512), "vol")
    export.volume.write(0, bytes(4 * MiB))  # blocks 0..63 mapped, consecutive, cached
    _server, path = serve({"vol": export})
    yield export, path
    export.close()


def test_write_target_only_for_mapped_unshared_consecutive_blocks(pool: Pool) -> None:
    with pool.open_thin(0, 8 * MiB // 512) as vol:
        vol.write(0, pattern(1, 4 * BLOCK))
        token = vol.read_token()
        with vol.write_target(100, 2 * BLOCK) as target:
            assert target is not None and len(target) == 2 * BLOCK
            target[:] = pattern(2, 2 * BLOCK)
        assert vol.read(100, 2 * BLOCK) == pattern(2, 2 * BLOCK)
        assert vol.read_token() != token
        with vol.write_target(3 * BLOCK, 2 * BLOCK) as target:
            assert target is None  # block 4 is not mapped
        pool.create_snap(1, 0)
        with vol.write_target(0, 2 * BLOCK) as target:
            assert target is None  # shared with the snapshot now


def test_large_writes_go_straight_in_and_read_back(served: tuple[Recording, str]) -> None:
    nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    export, path = served
    h = nbd.NBD()
    h.set_export_name("vol")
    h.connect_unix(path)
    data = pattern(3, MiB)
    h.pwrite(data, BLOCK + 123)
    assert export.targets == 1
    assert all(off >= BLOCK + 123 for off, _n in export.writes)  # at most a tail went the usual way
    assert h.pread(MiB, BLOCK + 123) == data
    h.pwrite(pattern(4, MiB), 6 * MiB)  # unmapped blocks: the usual way
    assert export.targets == 1 and h.pread(MiB, 6 * MiB) == pattern(4, MiB)
    h.pwrite(pattern(5, 512 << 10), 0, nbd.CMD_FLAG_FUA)  # FUA: the usual way
    assert export.targets == 1 and h.pread(512 << 10, 0) == pattern(5, 512 << 10)
    h.shutdown()


def _connect_raw(path: str) -> socket.socket:
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(30)
    raw.connect(path)
    raw.recv(18, socket.MSG_WAITALL)
    raw.sendall(wire.client_flags(3) + wire.option(Opt.EXPORT_NAME, b"vol"))
    raw.recv(10, socket.MSG_WAITALL)  # size and flags (NO_ZEROES: no padding)
    return raw


def test_a_payload_after_its_header_goes_straight_in_from_its_first_byte(
    served: tuple[Recording, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header that arrives alone: the payload's first receive already goes into the volume (no
    bytes land in the payload buffer first, to be copied over)."""
    seen: list[int] = []
    receive_direct = nbd_server._Connection._receive_direct

    def spy(self: Any, req: Any, payload: memoryview, filled: int) -> bool:
        seen.append(filled)
        return receive_direct(self, req, payload, filled)

    monkeypatch.setattr(nbd_server._Connection, "_receive_direct", spy)
    export, path = served
    raw = _connect_raw(path)
    data = pattern(9, MiB)
    raw.sendall(wire.request(Cmd.WRITE, 3 * BLOCK, MiB, cookie=5))
    time.sleep(0.05)  # the server has parsed the header and waits for the payload
    raw.sendall(data)
    _magic, error, cookie = struct.unpack(">IIQ", raw.recv(16, socket.MSG_WAITALL))
    assert (error, cookie) == (0, 5)
    assert seen == [0] and export.targets == 1 and not export.writes
    assert export.volume.read(3 * BLOCK, MiB) == data
    raw.close()


def test_a_stalled_client_does_not_hold_up_a_commit(
    served: tuple[Recording, str], pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nbd_server, "DIRECT_BUDGET", 0.2)
    export, path = served
    raw = _connect_raw(path)
    data = pattern(6, MiB)
    raw.sendall(wire.request(Cmd.WRITE, 2 * BLOCK, MiB, cookie=7) + data[: 300 << 10])
    time.sleep(0.05)  # the server is receiving straight into the blocks now
    done = threading.Event()
    threading.Thread(target=lambda: (pool.commit(), done.set()), daemon=True).start()
    assert done.wait(5), "a commit waited for a stalled client"
    raw.sendall(data[300 << 10 :])
    _magic, error, cookie = struct.unpack(">IIQ", raw.recv(16, socket.MSG_WAITALL))
    assert (error, cookie) == (0, 7)
    assert export.volume.read(2 * BLOCK, MiB) == data
    assert export.writes and export.writes[-1][0] > 2 * BLOCK  # the rest went the usual way
    raw.close()


def test_a_client_gone_mid_payload_leaves_the_blocks_free(served: tuple[Recording, str], pool: Pool) -> None:
    export, path = served
    raw = _connect_raw(path)
    raw.sendall(wire.request(Cmd.WRITE, 0, MiB, cookie=1) + pattern(7, 200 << 10))
    time.sleep(0.05)
    raw.close()
    deadline = time.monotonic() + 10
    while len(pool.locks):
        assert time.monotonic() < deadline, "block locks still held"
        time.sleep(0.01)
    pool.commit()
    export.volume.write(0, b"x" * 4096)  # the blocks are usable
    assert isinstance(export.volume, ThinVolume)


def test_a_write_target_that_fails_leaves_the_ordinary_write(pool: Pool, serve: Serve) -> None:
    nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    from devmapper.errors import DeviceError

    class Refusing(Recording):
        def write_target(self, offset: int, length: int) -> Any:
            raise DeviceError("no direct path today", "EIO")

    export = Refusing(pool.open_thin(0, 8 * MiB // 512), "vol")
    export.volume.write(0, bytes(2 * MiB))
    _server, path = serve({"vol": export})
    h = nbd.NBD()
    h.set_export_name("vol")
    h.connect_unix(path)
    h.pwrite(pattern(8, MiB), 0)
    assert h.pread(MiB, 0) == pattern(8, MiB) and export.writes == [(0, MiB)]
    h.shutdown()
    export.close()
