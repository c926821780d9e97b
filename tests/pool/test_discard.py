"""Discard passdown on a real sparse data file: blocks go back to the pool and the file shrinks
(st_blocks), but blocks still shared with a snapshot are neither freed nor punched."""

from __future__ import annotations

from pathlib import Path

import pytest

from devmapper.thin.status import PoolFeatures
from pool.support import BLOCK, MiB, make_pool_files, punch_hole_supported, used_data_blocks

GiB = 1 << 30
CHUNK = 4 * MiB


@pytest.fixture
def punchable(tmp_path: Path) -> Path:
    reason = punch_hole_supported(tmp_path)
    if reason is not None:
        pytest.skip(reason)
    return tmp_path


def fill(vol: object, size: int, byte: int) -> None:
    buf = bytes([byte]) * CHUNK
    for off in range(0, size, CHUNK):
        vol.write(off, buf[: size - off])  # type: ignore[attr-defined]


def test_discard_of_a_written_1gib_volume_frees_blocks_and_file_space(punchable: Path) -> None:
    nr = GiB // BLOCK
    files = make_pool_files(punchable, data_blocks=nr + 64, meta_bytes=16 * MiB)
    with files.open(commit_period=3600) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, GiB // 512) as vol:
            fill(vol, GiB, 0x5A)
            assert used_data_blocks(pool) == nr
            before = pool.data.allocated_bytes()
            assert before is not None and before >= GiB
            vol.discard(0, GiB)
            assert vol.status() == "0 -"
            assert used_data_blocks(pool) == 0
            vol.flush()  # passdown happens in the commit that makes the unmapping durable
            after = pool.data.allocated_bytes()
            assert after is not None and after <= before - GiB + MiB
            assert vol.read(GiB // 2, 3 * BLOCK) == bytes(3 * BLOCK)
    files.check()


def test_discard_of_blocks_shared_with_a_snapshot_frees_nothing(punchable: Path) -> None:
    size = 64 * MiB
    files = make_pool_files(punchable, data_blocks=size // BLOCK * 2)
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, size // 512) as origin:
            fill(origin, size, 0x33)
            pool.create_snap(1, 0)
            before = pool.data.allocated_bytes()
            assert before is not None
            with pool.open_thin(1, size // 512) as snap:
                snap.discard(0, size)  # shared: unmapped in the snapshot only, not passed down
                assert snap.read(0, BLOCK) == bytes(BLOCK)
            assert origin.read(size - BLOCK, BLOCK) == b"\x33" * BLOCK
            assert used_data_blocks(pool) == size // BLOCK
            assert pool.data.allocated_bytes() == before
            pool.delete(1)
            origin.discard(0, size)  # now unshared: passed down
            assert used_data_blocks(pool) == 0
            origin.flush()
            after = pool.data.allocated_bytes()
            assert after is not None and after <= before - size + MiB
    files.check()


def test_discard_shared_by_time_but_not_by_count_is_passed_down(punchable: Path) -> None:
    """After the snapshot is deleted the mappings still look shared (time stamps), yet their blocks
    are referenced once: discarding them must free and punch them."""
    files = make_pool_files(punchable, data_blocks=256)
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, 8 * MiB // 512) as vol:
            fill(vol, 8 * MiB, 0x44)
            pool.create_snap(1, 0)
            pool.delete(1)
            before = pool.data.allocated_bytes()
            assert before is not None
            vol.discard(0, 8 * MiB)
            vol.flush()
            after = pool.data.allocated_bytes()
            assert after is not None and after <= before - 8 * MiB + BLOCK
    files.check()


def test_no_discard_passdown_unmaps_but_keeps_file_space(punchable: Path) -> None:
    files = make_pool_files(punchable, data_blocks=64)
    with files.open(features=PoolFeatures(no_discard_passdown=True)) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, 4 * MiB // 512) as vol:
            fill(vol, 4 * MiB, 0x55)
            before = pool.data.allocated_bytes()
            vol.discard(0, 4 * MiB)
            assert used_data_blocks(pool) == 0
            vol.flush()
            assert pool.data.allocated_bytes() == before
    files.check()


def test_discarded_blocks_are_not_reused_before_the_commit(punchable: Path) -> None:
    """A freed block keeps its data until the unmapping is committed (then it may be reused)."""
    files = make_pool_files(punchable, data_blocks=4)
    with files.open(commit_period=3600) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, 16 * 128) as vol:
            fill(vol, 4 * BLOCK, 0x66)
            vol.discard(0, BLOCK)
            # the pool is full except for the block freed in this transaction; a new write must
            # commit first (making the free block usable) rather than overwrite it early
            vol.write(8 * BLOCK, b"n" * BLOCK)
            assert vol.read(8 * BLOCK, BLOCK) == b"n" * BLOCK
            assert vol.read(BLOCK, BLOCK) == b"\x66" * BLOCK
    files.check()


def test_passdown_waits_for_the_commit_that_unmaps(punchable: Path) -> None:
    """Origin breaks sharing of a block, the snapshot discards its copy: the old block is free now,
    but the committed metadata still maps it to the origin.  Until the commit, a crash must find the
    origin's flushed data there, so the hole is punched only by the commit."""
    files = make_pool_files(punchable, data_blocks=16)
    with files.open(commit_period=3600) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, 8 * 128) as origin:
            origin.write(0, b"A" * BLOCK)
            pool.create_snap(1, 0)  # commits: origin block 0 -> data block D, shared
            origin.write(0, b"new")  # breaks sharing (not committed)
            with pool.open_thin(1, 8 * 128) as snap:
                snap.discard(0, BLOCK)  # D is free now; the committed metadata still maps it
                crashed = crash_copy(files)  # what a crash right now would leave
                snap.flush()  # the commit: now D may go
        assert read_origin_after_crash(crashed) == b"A" * BLOCK
        assert pool.data.allocated_bytes() == BLOCK  # only the origin's new block is left
    files.check()


def crash_copy(files: object) -> tuple[bytes, bytes]:
    return Path(files.meta).read_bytes(), Path(files.data).read_bytes()  # type: ignore[attr-defined]


def read_origin_after_crash(copy: tuple[bytes, bytes]) -> bytes:
    from devmapper.blockdev.memory import MemoryBlockDevice
    from devmapper.thin.pool import Pool

    meta, data = MemoryBlockDevice(len(copy[0])), MemoryBlockDevice(len(copy[1]))
    meta.write(0, copy[0])
    data.write(0, copy[1])
    with Pool.open(meta, data, 128) as pool, pool.open_thin(0, 8 * 128) as origin:
        return origin.read(0, BLOCK)
