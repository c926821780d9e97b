"""Failed metadata operations: abort + NEEDS_CHECK + read-only; a failed abort latches Fail;
power loss (volatile caches dropped) never leaves a mapping to data that was not written."""

from __future__ import annotations

import pytest

from devmapper.blockdev.faulty import FaultyBlockDevice
from devmapper.blockdev.file import FileBlockDevice
from devmapper.errors import DeviceError, MetadataCorruption, PoolFailedError
from devmapper.thin.metadata import PoolMetadata
from devmapper.thin.pool import Pool, PoolIOError
from devmapper.thin.status import PoolMode
from pool.support import BLOCK, PoolFiles, pattern, thin_check

SECTORS = 64 * 128


def break_next_insert(md: PoolMetadata, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise MetadataCorruption("injected: btree node damaged")

    monkeypatch.setattr(md, "insert", broken)


def test_failed_metadata_operation_sets_needs_check_and_goes_read_only(
    files: PoolFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, SECTORS) as vol:
            vol.write(0, b"kept" * 100)
            vol.flush()
            vol.write(3 * BLOCK, b"lost: never flushed")
            break_next_insert(pool.md, monkeypatch)
            with pytest.raises(PoolIOError) as exc:
                vol.write(9 * BLOCK, b"x")
            assert exc.value.errno_name == "EIO"
            monkeypatch.undo()
            assert pool.mode is PoolMode.READ_ONLY
            fields = pool.status().split()
            assert (fields[4], fields[7]) == ("ro", "needs_check")
            assert vol.read(0, 400) == b"kept" * 100
            assert vol.read(3 * BLOCK, 5) == bytes(5)  # the aborted transaction is gone
            vol.write(0, b"KEPT")  # in place: still allowed
            vol.discard(0, BLOCK)  # read-only: succeeds, does nothing
            assert vol.read(0, 4) == b"KEPT"
            with pytest.raises(PoolIOError):
                vol.write(20 * BLOCK, b"needs a block")
            with pytest.raises(DeviceError) as derr:
                pool.message("create_thin 1")
            assert derr.value.errno_name == "EOPNOTSUPP"
    thin_check(files.meta)
    with files.open() as pool:  # NEEDS_CHECK survives a restart and keeps the pool read-only
        assert pool.mode is PoolMode.READ_ONLY and "needs_check" in pool.status()
        size = pool.data.size()
        pool.resize_data(size + 16 * BLOCK)
        assert pool.status().split()[2].endswith("/256")  # not grown until repaired
    thin_check(files.meta, "--clear-needs-check-flag")
    with files.open() as pool:
        assert pool.mode is PoolMode.WRITE and pool.status().split()[2].endswith("/272")
    files.check()


def test_failed_abort_latches_fail(files: PoolFiles) -> None:
    meta = FaultyBlockDevice(FileBlockDevice(files.meta))
    pool = Pool.open(meta, files.data, 128)
    pool.create_thin(0)
    vol = pool.open_thin(0, SECTORS)
    vol.write(0, b"committed")
    vol.flush()
    vol.write(BLOCK, b"doomed")
    meta.fail_after_writes = meta.nr_writes  # the metadata device dies: writes and reads fail
    with pytest.raises(PoolIOError):
        vol.flush()
    assert pool.mode is PoolMode.FAIL
    assert pool.status() == "Fail" and vol.status() == "Fail"
    with pytest.raises(PoolFailedError):
        vol.read(0, 9)
    with pytest.raises(PoolFailedError):
        vol.write(0, b"x")
    with pytest.raises(DeviceError):
        pool.open_thin(0, SECTORS)
    vol.close()
    pool.close()
    files.check()  # the last commit is intact on disk
    with files.open() as pool, pool.open_thin(0, SECTORS) as vol:
        assert vol.read(0, 9) == b"committed"


def test_power_loss_after_commit_keeps_data_and_mappings(files: PoolFiles) -> None:
    meta = FaultyBlockDevice(FileBlockDevice(files.meta), volatile=True)
    data = FaultyBlockDevice(FileBlockDevice(files.data), volatile=True)
    pool = Pool.open(meta, data, 128, commit_period=3600)
    pool.create_thin(0)
    vol = pool.open_thin(0, SECTORS)
    durable = pattern(1, 5 * BLOCK + 123)
    vol.write(7, durable)
    pool.commit()  # must flush the data before the mapping becomes durable
    vol.write(20 * BLOCK, b"volatile")  # never flushed: may vanish, mapping and data alike
    meta.crash()
    data.crash()
    thin_check(files.meta)
    with files.open() as pool2, pool2.open_thin(0, SECTORS) as vol2:
        assert vol2.read(7, len(durable)) == durable
        assert vol2.read(20 * BLOCK, 8) == bytes(8)


def test_power_loss_after_fua_write(files: PoolFiles) -> None:
    meta = FaultyBlockDevice(FileBlockDevice(files.meta), volatile=True)
    data = FaultyBlockDevice(FileBlockDevice(files.data), volatile=True)
    pool = Pool.open(meta, data, 128, commit_period=3600)
    pool.create_thin(0)
    vol = pool.open_thin(0, SECTORS)
    vol.write(3 * BLOCK + 1, b"fua!", fua=True)
    vol.write(3 * BLOCK + 100, b"in place fua", fua=True)
    meta.crash()
    data.crash()
    with files.open() as pool2, pool2.open_thin(0, SECTORS) as vol2:
        assert vol2.read(3 * BLOCK + 1, 4) == b"fua!"
        assert vol2.read(3 * BLOCK + 100, 12) == b"in place fua"
    files.check()
