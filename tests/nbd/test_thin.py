"""NBD over thin volumes: pool errors become NBD errors, TRIM/WRITE_ZEROES unmap blocks, FLUSH and
FUA commit, snapshots are seen through block status."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Serve
from devmapper.cli.nbd import ThinExport
from devmapper.thin.pool import Pool, PoolFeatures
from pool.support import make_pool_files

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB


@pytest.fixture
def small_pool(tmp_path: Path) -> Iterator[Pool]:
    files = make_pool_files(tmp_path / "pool", data_blocks=16)  # 1 MiB of data space
    pool = files.open(features=PoolFeatures(error_if_no_space=True))
    pool.create_thin(0)
    yield pool
    pool.close()
    files.check()


def connect(path: str, name: str) -> object:
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_export_name(name)
    h.connect_unix(path)
    return h


def extents(h: object, count: int, offset: int = 0) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []

    def cb(_ctx: str, _off: int, entries: list[int], _err: int) -> int:
        got.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    h.block_status(count, offset, cb)  # type: ignore[attr-defined]
    return got


def test_out_of_data_space_is_enospc_and_reads_still_work(small_pool: Pool, serve: Serve) -> None:
    vol = ThinExport(small_pool.open_thin(0, 4 * MiB // 512), "thin")
    _server, path = serve({"thin": vol})
    h = connect(path, "thin")
    h.pwrite(b"\x5a" * MiB, 0)  # type: ignore[attr-defined]
    with pytest.raises(nbd.Error) as info:
        h.pwrite(b"\x01" * 4096, 2 * MiB)  # type: ignore[attr-defined]
    assert info.value.errnum == errno.ENOSPC
    assert h.pread(4096, 0) == b"\x5a" * 4096  # type: ignore[attr-defined]
    h.pwrite(b"\x02" * 4096, 4096)  # type: ignore[attr-defined]  # in place: no new block needed
    h.trim(MiB, 0)  # type: ignore[attr-defined]  # frees the blocks ...
    h.flush()  # type: ignore[attr-defined]  # ... once committed
    h.pwrite(b"\x03" * 4096, 2 * MiB)  # type: ignore[attr-defined]
    h.shutdown()  # type: ignore[attr-defined]
    vol.close()


def test_trim_zero_flush_fua_and_snapshot_sharing(small_pool: Pool, serve: Serve) -> None:
    pool = small_pool
    origin = ThinExport(pool.open_thin(0, MiB // 512), "origin")
    _server, path = serve({"origin": origin})
    h = connect(path, "origin")
    h.pwrite(b"\x11" * (4 * BLOCK), 0)  # type: ignore[attr-defined]
    assert pool.changed_this_transaction(0)
    h.flush()  # type: ignore[attr-defined]
    assert not pool.changed_this_transaction(0)  # FLUSH committed the new mappings
    h.pwrite(b"\x12" * BLOCK, 4 * BLOCK, nbd.CMD_FLAG_FUA)  # type: ignore[attr-defined]
    assert not pool.changed_this_transaction(0)  # so did FUA
    assert extents(h, MiB) == [(5 * BLOCK, 0), (MiB - 5 * BLOCK, 3)]
    h.trim(BLOCK + 4096, BLOCK)  # type: ignore[attr-defined]  # one whole block and a partial one
    assert extents(h, MiB) == [(BLOCK, 0), (BLOCK, 3), (3 * BLOCK, 0), (MiB - 5 * BLOCK, 3)]
    h.zero(BLOCK, 2 * BLOCK)  # type: ignore[attr-defined]  # whole block: unmapped
    h.zero(4096, 3 * BLOCK, nbd.CMD_FLAG_NO_HOLE)  # type: ignore[attr-defined]  # stays mapped, reads 0
    assert h.pread(8192, 3 * BLOCK) == bytes(4096) + b"\x11" * 4096  # type: ignore[attr-defined]
    assert extents(h, 5 * BLOCK) == [(BLOCK, 0), (2 * BLOCK, 3), (2 * BLOCK, 0)]
    h.shutdown()  # type: ignore[attr-defined]

    pool.create_snap(1, 0)
    snap = ThinExport(pool.open_thin(1, MiB // 512), "snap", read_only=True)
    _server2, path2 = serve({"snap": snap, "origin": origin})
    s = connect(path2, "snap")
    assert s.is_read_only()  # type: ignore[attr-defined]
    assert extents(s, 5 * BLOCK) == [(BLOCK, 0), (2 * BLOCK, 3), (2 * BLOCK, 0)]
    assert s.pread(4096, 0) == b"\x11" * 4096  # type: ignore[attr-defined]
    with pytest.raises(nbd.Error) as info:
        s.pwrite(bytes(4096), 0)  # type: ignore[attr-defined]
    assert info.value.errnum == errno.EPERM
    o = connect(path2, "origin")
    o.pwrite(b"\x99" * 4096, 0)  # type: ignore[attr-defined]  # breaks sharing; the snapshot keeps its data
    assert s.pread(4096, 0) == b"\x11" * 4096  # type: ignore[attr-defined]
    s.shutdown()  # type: ignore[attr-defined]
    o.shutdown()  # type: ignore[attr-defined]
    _server2.shutdown()
    snap.close()
    origin.close()
