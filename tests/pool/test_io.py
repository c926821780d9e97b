"""Thin volume I/O semantics: provisioning, zeroing, breaking sharing, origins, FUA, flush, bounds."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devmapper.blockdev.memory import MemoryBlockDevice
from devmapper.errors import DeviceError
from devmapper.thin.metadata import PoolMetadata
from devmapper.thin.pool import Pool
from devmapper.thin.status import PoolFeatures
from pool.support import BLOCK, MiB, PoolFiles, distinct_mapped_blocks, make_pool_files, pattern, used_data_blocks

VOL_SECTORS = 64 * 128  # 64 blocks


def test_unprovisioned_reads_are_zero_and_allocate_nothing(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            assert vol.read(12345, 3 * BLOCK) == bytes(3 * BLOCK)
            assert used_data_blocks(pool) == 0
            assert vol.status() == "0 -"


def test_partial_write_zeroes_the_rest_of_a_new_block(files: PoolFiles) -> None:
    with open(files.data, "r+b") as f:  # stale bytes where block 0 will be allocated
        f.write(b"\xff" * BLOCK)
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            vol.write(100, b"abc")
            assert vol.read(0, BLOCK) == bytes(100) + b"abc" + bytes(BLOCK - 103)
    files.check()


def test_skip_block_zeroing_leaves_stale_bytes(files: PoolFiles) -> None:
    with open(files.data, "r+b") as f:
        f.write(b"\xff" * BLOCK)
    with files.open(features=PoolFeatures(skip_block_zeroing=True)) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            vol.write(100, b"abc")
            assert vol.read(0, BLOCK) == b"\xff" * 100 + b"abc" + b"\xff" * (BLOCK - 103)
    files.check()


def test_writes_cross_block_boundaries_at_byte_granularity(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            payload = pattern(1, 3 * BLOCK + 777)
            vol.write(BLOCK - 5, payload)
            assert vol.read(BLOCK - 5, len(payload)) == payload
            assert vol.read(0, BLOCK - 5) == bytes(BLOCK - 5)
            assert vol.status() == f"{5 * 128} {5 * 128 - 1}"
            vol.write_sectors(3, b"s" * 1024)
            assert vol.read_sectors(3, 2) == b"s" * 1024
            with pytest.raises(DeviceError):
                vol.write_sectors(0, b"odd")
    files.check()


def test_snapshot_isolation_and_breaking_sharing(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        base = pattern(2, 8 * BLOCK)
        with pool.open_thin(0, VOL_SECTORS) as origin:
            origin.write(0, base)
            pool.create_snap(1, 0)
            with pool.open_thin(1, VOL_SECTORS) as snap:
                origin.write(BLOCK + 10, b"O" * 20)  # partial: the old block is copied
                snap.write(2 * BLOCK, b"S" * BLOCK)  # whole block: nothing copied
                expected_origin = bytearray(base)
                expected_origin[BLOCK + 10 : BLOCK + 30] = b"O" * 20
                expected_snap = bytearray(base)
                expected_snap[2 * BLOCK : 3 * BLOCK] = b"S" * BLOCK
                assert origin.read(0, 8 * BLOCK) == expected_origin
                assert snap.read(0, 8 * BLOCK) == expected_snap
                assert used_data_blocks(pool) == 10 == distinct_mapped_blocks(pool.md)
                # writing the same block again goes in place: no new allocation
                origin.write(BLOCK, b"again")
                assert used_data_blocks(pool) == 10
    files.check()


def test_external_origin_shows_through_and_is_copied_on_write(files: PoolFiles, tmp_path: Path) -> None:
    origin_path = tmp_path / "origin"
    image = pattern(3, 2 * BLOCK + 1000)  # not a multiple of the block size
    origin_path.write_bytes(image)
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS, origin=origin_path) as vol:
            assert vol.read(0, 4 * BLOCK) == image + bytes(4 * BLOCK - len(image))
            vol.write(BLOCK + 5, b"W")  # inside the origin: rest of the block copied
            vol.write(2 * BLOCK + 10, b"T")  # tail block: copied up to the origin's end, then zeroes
            vol.write(3 * BLOCK + 1, b"Z")  # past the origin: zeroes
            expected = bytearray(image + bytes(4 * BLOCK - len(image)))
            expected[BLOCK + 5] = ord("W")
            expected[2 * BLOCK + 10] = ord("T")
            expected[3 * BLOCK + 1] = ord("Z")
            assert vol.read(0, 4 * BLOCK) == expected
            assert origin_path.read_bytes() == image
            vol.write_zeroes(0, BLOCK)  # whole block over an origin: written, not unmapped
            assert vol.read(0, BLOCK) == bytes(BLOCK)
    files.check()


def test_write_zeroes_unmaps_whole_blocks_and_zeroes_partial_ones(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            vol.write(0, b"\x11" * (4 * BLOCK))
            vol.write_zeroes(100, 2 * BLOCK)
            assert vol.read(0, 4 * BLOCK) == b"\x11" * 100 + bytes(2 * BLOCK) + b"\x11" * (2 * BLOCK - 100)
            assert vol.status().split()[0] == str(3 * 128)  # block 1 unmapped
            vol.write_zeroes(10 * BLOCK, 3 * BLOCK, unmap=False)  # unmapped already: nothing to do
            assert used_data_blocks(pool) == 3
    files.check()


def test_partial_block_discard_changes_nothing(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            vol.write(0, b"\x22" * (2 * BLOCK))
            vol.discard(1, 2 * BLOCK - 2)
            assert vol.read(0, 2 * BLOCK) == b"\x22" * (2 * BLOCK)
            vol.discard(0, BLOCK + 1)
            assert vol.read(0, 2 * BLOCK) == bytes(BLOCK) + b"\x22" * BLOCK
    files.check()


def test_discard_is_refused_with_ignore_discard(files: PoolFiles) -> None:
    with files.open(features=PoolFeatures(ignore_discard=True)) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            with pytest.raises(DeviceError) as exc:
                vol.discard(0, BLOCK)
            assert exc.value.errno_name == "EOPNOTSUPP"


def test_io_beyond_the_end_is_refused(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, 3) as vol:  # 1536 bytes: sizes need not be block multiples
            vol.write(1000, b"x" * 536)
            for call in (lambda: vol.write(1536, b"x"), lambda: vol.read(1500, 100), lambda: vol.discard(0, 2000)):
                with pytest.raises(DeviceError) as exc:
                    call()
                assert exc.value.errno_name == "EINVAL"
        with pytest.raises(DeviceError) as exc:
            pool.open_thin(9, 8)
        assert exc.value.errno_name == "ENODATA"


def superblock_writes(pool: Pool) -> int:
    return pool.md.bm.nr_writes


def test_flush_commits_only_when_the_thin_changed(files: PoolFiles) -> None:
    with files.open(commit_period=3600) as pool:
        pool.create_thin(0)
        pool.create_thin(1)
        with pool.open_thin(0, VOL_SECTORS) as v0, pool.open_thin(1, VOL_SECTORS) as v1:
            v0.write(0, b"a" * 10)
            before = superblock_writes(pool)
            v1.flush()  # thin 1 did not change: no metadata written
            assert superblock_writes(pool) == before
            v0.flush()
            assert superblock_writes(pool) > before
            before = superblock_writes(pool)
            v0.write(5, b"b")  # in place: no metadata change
            v0.flush()
            v0.write(5, b"c", fua=True)
            assert superblock_writes(pool) == before
            v0.write(BLOCK * 7, b"d", fua=True)  # provisions: FUA commits
            assert superblock_writes(pool) > before
            assert PoolMetadata.open(MemoryCopy(files.meta), read_only=True).lookup(0, 7) is not None


def MemoryCopy(path: Path) -> MemoryBlockDevice:
    """An in-memory snapshot of a file, to inspect committed metadata without disturbing the pool."""
    raw = path.read_bytes()
    dev = MemoryBlockDevice(len(raw))
    dev.write(0, raw)
    return dev


def test_changes_are_committed_within_the_commit_period(files: PoolFiles) -> None:
    with files.open(commit_period=0.2) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            vol.write(3 * BLOCK, b"x")
            deadline = time.monotonic() + 5
            while PoolMetadata.open(MemoryCopy(files.meta), read_only=True).lookup(0, 3) is None:
                assert time.monotonic() < deadline, "periodic commit did not happen"
                time.sleep(0.05)


def test_idle_pool_writes_no_metadata(files: PoolFiles) -> None:
    with files.open(commit_period=0.05) as pool:
        pool.create_thin(0)
        before = superblock_writes(pool)
        time.sleep(0.3)
        assert superblock_writes(pool) == before


def test_concurrent_first_writes_to_one_block_provision_it_once(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            barrier = threading.Barrier(8)

            def writer(i: int) -> None:
                barrier.wait()
                vol.write(i * 1000, bytes([i + 1]) * 1000)

            threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert used_data_blocks(pool) == 1
            assert vol.read(0, 8000) == b"".join(bytes([i + 1]) * 1000 for i in range(8))
    files.check()


def test_many_threads_over_several_volumes_and_snapshots(files: PoolFiles) -> None:
    with files.open() as pool:
        for dev in range(4):
            pool.create_thin(dev)
        vols = [pool.open_thin(dev, VOL_SECTORS // 2) for dev in range(4)]
        size = VOL_SECTORS // 2 * 512
        for i, v in enumerate(vols):
            v.write(0, pattern(i, size))
        for dev in range(4):
            pool.create_snap(10 + dev, dev)
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                v = vols[k % 4]
                rng = __import__("random").Random(k)
                for _ in range(200):
                    off = rng.randrange(0, size - 9000)
                    if rng.random() < 0.5:
                        v.write(off, bytes([k]) * rng.randrange(1, 9000))
                    else:
                        v.read(off, rng.randrange(1, 9000))
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for dev in range(4):
            with pool.open_thin(10 + dev, VOL_SECTORS // 2) as snap:
                assert snap.read(0, size) == pattern(dev, size)
        for v in vols:
            v.close()
        assert used_data_blocks(pool) == distinct_mapped_blocks(pool.md)
    files.check()


def test_memory_devices_work_without_file_fast_paths() -> None:
    meta, data = MemoryBlockDevice(4 * MiB), MemoryBlockDevice(64 * BLOCK)
    with Pool.open(meta, data, 128) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            vol.write(5, b"hello")
            pool.create_snap(1, 0)
            vol.write(7, b"XY")
            assert vol.read(0, 12) == b"\0" * 5 + b"heXYo" + b"\0\0"
            with pool.open_thin(1, VOL_SECTORS) as snap:
                assert snap.read(5, 5) == b"hello"
            vol.discard(0, BLOCK)
            assert vol.read(0, 12) == bytes(12)
        assert pool.status().split()[2] == "1/64"


def test_pool_with_big_blocks_uses_bounded_buffers(tmp_path: Path) -> None:
    files = make_pool_files(tmp_path, data_blocks=4, block_sectors=2048 * 8)  # 8 MiB blocks
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, 4 * 2048 * 8) as vol:
            vol.write(3 * MiB, b"q" * 100)
            pool.create_snap(1, 0)
            vol.write(5 * MiB, b"r")
            data = vol.read(0, 8 * MiB)
            assert data[3 * MiB : 3 * MiB + 100] == b"q" * 100 and data[5 * MiB] == ord("r")
            assert data.count(0) == 8 * MiB - 101
    files.check()


def test_data_file_too_small_for_existing_metadata_is_refused(files: PoolFiles) -> None:
    files.open().close()
    os.truncate(files.data, 10 * BLOCK)
    with pytest.raises(DeviceError) as exc:
        files.open()
    assert exc.value.errno_name == "EINVAL"


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A loop device over a 64 MiB sparse file (skips unless we may create loop devices)."""
    import shutil
    import subprocess

    losetup = shutil.which("losetup") or "/usr/sbin/losetup"
    if os.geteuid() != 0 or not os.path.exists(losetup) or not os.path.exists("/dev/loop-control"):
        pytest.skip("loop devices need root, losetup and /dev/loop-control")
    backing = tmp_path / "loop-backing"
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    proc = subprocess.run([losetup, "-f", "--show", str(backing)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot attach a loop device: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run([losetup, "-d", dev], check=False)


def test_pool_on_a_loop_device(loop_device: str, tmp_path: Path) -> None:
    files = make_pool_files(tmp_path / "pool", data_blocks=1)
    with Pool.open(files.meta, loop_device, 128) as pool:
        assert pool.table().split()[1] == loop_device and pool.status().split()[2] == "0/1024"
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            vol.write(12345, b"loop" * 5000)
            pool.create_snap(1, 0)
            vol.write(12345, b"L")  # breaks sharing between block-device blocks
            with pool.open_thin(1, VOL_SECTORS) as snap:
                assert snap.read(12345, 4) == b"loop"
            assert vol.read(12345, 4) == b"Loop"
            vol.discard(0, 4 * BLOCK)
            assert vol.read(12345, 4) == bytes(4)
    files.check()
