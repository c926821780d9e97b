"""The multi-block in-place write path: taken only when every block is mapped and unshared, and
then equivalent to writing piece by piece (breaking sharing and provisioning go the slow way)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devmapper.blockdev.file import FileBlockDevice
from devmapper.errors import DeviceError
from devmapper.thin.data_device import DataDevice
from devmapper.thin.volume import ThinVolume
from pool.support import BLOCK, PoolFiles, pattern

VOL_SECTORS = 16 * 128  # 16 blocks


@pytest.fixture
def puts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The virtual blocks that went through the piece-by-piece path."""
    seen: list[int] = []
    original = ThinVolume._put

    def counting(self: ThinVolume, vblock: int, within: int, payload: object, fua: bool) -> None:
        seen.append(vblock)
        original(self, vblock, within, payload, fua)  # type: ignore[arg-type]

    monkeypatch.setattr(ThinVolume, "_put", counting)
    return seen


def test_in_place_range_names_blocks_only_when_all_mapped_and_unshared(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            vol.write(0, pattern(1, 4 * BLOCK))
            vol.write(5 * BLOCK, pattern(2, BLOCK))
            blocks = pool.md.in_place_range(0, 0, 4)
            assert blocks is not None and len(blocks) == 4
            assert pool.md.in_place_range(0, 3, 6) is None  # vblock 4 is unmapped
            pool.create_snap(1, 0)
            assert pool.md.in_place_range(0, 0, 4) is None  # now shared with the snapshot
            assert pool.md.in_place_range(1, 0, 4) is None
    files.check()


def test_mapped_unshared_write_skips_the_piece_path(files: PoolFiles, puts: list[int]) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            vol.write(0, pattern(1, 8 * BLOCK))
            assert puts == list(range(8))  # provisioning goes piece by piece
            puts.clear()
            new = pattern(2, 5 * BLOCK + 300)
            vol.write(BLOCK + 77, new)  # unaligned at both ends, all mapped
            assert puts == []
            want = bytearray(pattern(1, 8 * BLOCK))
            want[BLOCK + 77 : BLOCK + 77 + len(new)] = new
            assert vol.read(0, 8 * BLOCK) == want
            vol.write(BLOCK, pattern(3, 2 * BLOCK), fua=True)
            assert puts == []
            want[BLOCK : 3 * BLOCK] = pattern(3, 2 * BLOCK)
            assert vol.read(0, 8 * BLOCK) == want
    files.check()


def test_a_shared_block_sends_the_write_piece_by_piece(files: PoolFiles, puts: list[int]) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            vol.write(0, pattern(1, 4 * BLOCK))
        pool.create_snap(1, 0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            vol.write(0, pattern(9, BLOCK))  # block 0 broken out of sharing; 1..3 still shared
            puts.clear()
            vol.write(BLOCK // 2, pattern(2, 2 * BLOCK))
            assert puts == [0, 1, 2]
            want = bytearray(pattern(9, BLOCK) + pattern(1, 4 * BLOCK)[BLOCK:])
            want[BLOCK // 2 : BLOCK // 2 + 2 * BLOCK] = pattern(2, 2 * BLOCK)
            assert vol.read(0, 4 * BLOCK) == want
        with pool.open_thin(1, VOL_SECTORS) as snap:
            assert snap.read(0, 4 * BLOCK) == pattern(1, 4 * BLOCK)
    files.check()


def test_a_hole_in_the_range_provisions_it(files: PoolFiles, puts: list[int]) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            vol.write(0, pattern(1, BLOCK))
            vol.write(2 * BLOCK, pattern(2, BLOCK))
            puts.clear()
            vol.write(BLOCK // 2, pattern(3, 2 * BLOCK))
            assert puts == [0, 1, 2]
            want = pattern(1, BLOCK // 2) + pattern(3, 2 * BLOCK) + pattern(2, BLOCK)[BLOCK // 2 :]
            assert vol.read(0, 3 * BLOCK) == want
            assert vol.status().split()[0] == str(3 * 128)
    files.check()


def test_read_token_moves_with_every_change_even_a_failed_one(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            seen = {vol.read_token()}

            def moved() -> bool:
                token = vol.read_token()
                fresh = token not in seen
                seen.add(token)
                return fresh

            vol.read(0, BLOCK)
            assert not moved()  # reads change nothing
            vol.write(0, pattern(1, 2 * BLOCK))
            assert moved()
            vol.write(BLOCK, pattern(2, 2 * BLOCK))  # the in-place path
            assert moved()
            vol.discard(0, BLOCK)
            assert moved()
            vol.write_zeroes(100, 200)
            assert moved()
            with pytest.raises(DeviceError):
                vol.write(VOL_SECTORS * 512 - 10, b"x" * 20)  # beyond the end: refused before any change
            assert not moved()
            pool.commit()  # a commit that wrote moves the metadata epoch
            assert moved()
    files.check()


def test_cached_follows_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(os.urandom(1 << 20))
    data = DataDevice(FileBlockDevice(path))
    try:
        if not data.cached(0, 4096) and not data._cachestat:
            pytest.skip("cachestat(2) is not available here")
        os.fsync(data.fd)
        os.posix_fadvise(data.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if data.cached(0, 4096):
            pytest.skip("this file system keeps its pages in memory (tmpfs)")
        assert not data.cached(0, 1 << 20)
        os.pread(data.fd, 4096, 512 << 10)
        assert data.cached(512 << 10, 4096) and not data.cached(0, 1 << 20)
        os.preadv(data.fd, [bytearray(1 << 20)], 0)
        assert data.cached(0, 1 << 20) and data.cached(100, 5000)
        assert not data.cached(0, 0)
    finally:
        data.dev.close()


def test_blocks_scattered_in_the_data_file_are_written_one_by_one_in_place(files: PoolFiles, puts: list[int]) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            for v in (3, 1, 2, 0):  # data blocks 0..3 hold vblocks 3, 1, 2, 0
                vol.write(v * BLOCK, pattern(v, BLOCK))
            _vblocks, blocks = pool.md.map_range(0, 0, 4)
            assert blocks == [3, 1, 2, 0]
            puts.clear()
            new = pattern(9, 3 * BLOCK)
            vol.write(BLOCK // 2, new)
            assert puts == []
            want = b"".join(pattern(v, BLOCK) for v in range(4))
            assert vol.read(0, 4 * BLOCK) == want[: BLOCK // 2] + new + want[BLOCK // 2 + len(new) :]
    files.check()


def test_read_token_is_shared_by_every_volume_of_a_thin(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        pool.create_thin(1)
        with pool.open_thin(0, VOL_SECTORS) as a, pool.open_thin(0, VOL_SECTORS) as b, \
                pool.open_thin(1, VOL_SECTORS) as other:
            before = b.read_token()
            other.write(0, b"x" * 512)  # another thin: not a change of thin 0
            assert b.read_token() == before
            a.write(0, b"y" * 512)
            assert b.read_token() != before and b.read_token() == a.read_token()
    files.check()
