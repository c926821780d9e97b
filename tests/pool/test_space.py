"""Out of data space (error and queue modes, the no-space timeout), recovery by growing the data
file, low-water events, metadata growth and out-of-metadata-space."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from devmapper.errors import DeviceError
from devmapper.thin.pool import OutOfDataSpaceError, Pool, PoolEvent, PoolIOError
from devmapper.thin.status import PoolFeatures, PoolMode
from devmapper.thin.volume import ThinVolume
from pool.support import BLOCK, MiB, make_pool_files, pattern, used_data_blocks

POOL_BLOCKS = 16
VOL_BLOCKS = 32
VOL_SECTORS = VOL_BLOCKS * BLOCK // 512


def mode_word(pool: Pool) -> str:
    return pool.status(noflush=True).split()[4]


def policy_word(pool: Pool) -> str:
    return pool.status(noflush=True).split()[6]


def wait_until(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def fill_pool(vol: ThinVolume) -> bytes:
    data = pattern(5, POOL_BLOCKS * BLOCK)
    vol.write(0, data)
    return data


def test_error_if_no_space_fails_at_once_then_growth_recovers(tmp_path: Path) -> None:
    files = make_pool_files(tmp_path, data_blocks=POOL_BLOCKS)
    with files.open(features=PoolFeatures(error_if_no_space=True)) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            data = fill_pool(vol)
            t0 = time.monotonic()
            with pytest.raises(OutOfDataSpaceError) as exc:
                vol.write(POOL_BLOCKS * BLOCK, b"more")
            assert exc.value.errno_name == "ENOSPC" and time.monotonic() - t0 < 2
            meta = pool.status().split()[1]
            assert pool.status() == f"0 {meta} 16/16 - out_of_data_space discard_passdown error_if_no_space - 256 "
            vol.write(5, b"in place still works")
            data = data[:5] + b"in place still works" + data[25:]
            assert vol.read(0, len(data)) == data
            pool.resize_data(VOL_BLOCKS * BLOCK)
            assert mode_word(pool) == "rw" and pool.status().split()[2] == "16/32"
            tail = pattern(6, (VOL_BLOCKS - POOL_BLOCKS) * BLOCK)
            vol.write(POOL_BLOCKS * BLOCK, tail)
            assert vol.read(0, VOL_BLOCKS * BLOCK) == data + tail
    files.check()


def test_queue_if_no_space_waits_for_growth(tmp_path: Path) -> None:
    files = make_pool_files(tmp_path, data_blocks=POOL_BLOCKS)
    with files.open(no_space_timeout=60) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            data = fill_pool(vol)
            done: list[BaseException | None] = []

            def writer() -> None:
                try:
                    vol.write(POOL_BLOCKS * BLOCK, b"queued")
                    done.append(None)
                except BaseException as e:
                    done.append(e)

            t = threading.Thread(target=writer)
            t.start()
            wait_until(lambda: pool.mode is PoolMode.OUT_OF_DATA_SPACE)
            assert mode_word(pool) == "out_of_data_space" and policy_word(pool) == "queue_if_no_space"
            assert vol.read(0, BLOCK) == data[:BLOCK]  # reads are not blocked
            time.sleep(0.2)
            assert not done
            pool.resize_data(VOL_BLOCKS * BLOCK)
            t.join(10)
            assert done == [None]
            assert vol.read(POOL_BLOCKS * BLOCK, 6) == b"queued"
            assert mode_word(pool) == "rw"
    files.check()


def test_queued_writes_time_out_and_the_pool_switches_to_error(tmp_path: Path) -> None:
    files = make_pool_files(tmp_path, data_blocks=POOL_BLOCKS)
    events: list[PoolEvent] = []
    with files.open(no_space_timeout=0.3, event_callback=lambda p, e: events.append(e)) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            fill_pool(vol)
            t0 = time.monotonic()
            with pytest.raises(OutOfDataSpaceError):
                vol.write(POOL_BLOCKS * BLOCK, b"x")
            assert 0.25 < time.monotonic() - t0 < 5
            assert policy_word(pool) == "error_if_no_space"
            t0 = time.monotonic()
            with pytest.raises(OutOfDataSpaceError):
                vol.write(POOL_BLOCKS * BLOCK, b"x")
            assert time.monotonic() - t0 < 0.2
            pool.resize_data(VOL_BLOCKS * BLOCK)
            assert (mode_word(pool), policy_word(pool)) == ("rw", "queue_if_no_space")
            vol.write(POOL_BLOCKS * BLOCK, b"x")
    wait_until(lambda: PoolEvent.NO_SPACE_TIMEOUT in events)
    assert PoolEvent.MODE_CHANGED in events
    files.check()


def test_discard_frees_space_and_the_next_commit_returns_to_rw(tmp_path: Path) -> None:
    files = make_pool_files(tmp_path, data_blocks=POOL_BLOCKS)
    with files.open(features=PoolFeatures(error_if_no_space=True)) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            fill_pool(vol)
            with pytest.raises(OutOfDataSpaceError):
                vol.write(POOL_BLOCKS * BLOCK, b"x")
            vol.discard(0, 2 * BLOCK)
            vol.flush()
            assert mode_word(pool) == "rw"
            vol.write(POOL_BLOCKS * BLOCK, b"x")
            assert used_data_blocks(pool) == POOL_BLOCKS - 1
    files.check()


def test_low_water_mark_event_fires_once_until_resume(tmp_path: Path) -> None:
    files = make_pool_files(tmp_path, data_blocks=POOL_BLOCKS)
    events: list[PoolEvent] = []
    with files.open(low_water_mark=4, event_callback=lambda p, e: events.append(e)) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, VOL_SECTORS) as vol:
            vol.write(0, b"a" * (11 * BLOCK))
            time.sleep(0.1)
            assert PoolEvent.LOW_WATER_MARK not in events
            vol.write(11 * BLOCK, b"a" * (3 * BLOCK))
            wait_until(lambda: events.count(PoolEvent.LOW_WATER_MARK) == 1)
            pool.resize_data(VOL_BLOCKS * BLOCK)  # resume re-arms the event
            vol.write(14 * BLOCK, b"a" * (15 * BLOCK))
            wait_until(lambda: events.count(PoolEvent.LOW_WATER_MARK) == 2)


def test_a_dmeventd_like_callback_grows_the_pool_under_load(tmp_path: Path) -> None:
    files = make_pool_files(tmp_path, data_blocks=8)

    def grow(pool: Pool, event: PoolEvent) -> None:
        if event is PoolEvent.LOW_WATER_MARK:
            pool.resize_data(pool.data.size() + 8 * BLOCK)

    with files.open(low_water_mark=4, event_callback=grow) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, 64 * 128) as vol:
            data = pattern(9, 48 * BLOCK)
            for off in range(0, len(data), BLOCK):
                vol.write(off, data[off : off + BLOCK])
            assert vol.read(0, len(data)) == data
    files.check()


def test_metadata_grows_while_in_use(tmp_path: Path) -> None:
    files = make_pool_files(tmp_path, data_blocks=64, meta_bytes=2 * MiB)
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, 64 * 128) as vol:
            vol.write(0, b"m" * BLOCK)
            assert pool.status().split()[1].endswith("/512") and pool.status().endswith(" 128 ")
            pool.resize_metadata(8 * MiB)
            assert pool.status().split()[1].endswith("/2048") and pool.status().endswith(" 512 ")
            vol.write(BLOCK, b"n" * BLOCK)
            assert vol.read(0, 2 * BLOCK) == b"m" * BLOCK + b"n" * BLOCK
    files.check()
    with pytest.raises(DeviceError), files.open() as pool:
        pool.resize_metadata(1 * MiB)


def test_out_of_metadata_space_goes_read_only_and_metadata_growth_recovers(tmp_path: Path) -> None:
    files = make_pool_files(tmp_path, data_blocks=40000, meta_bytes=1 * MiB)
    events: list[PoolEvent] = []
    features = PoolFeatures(skip_block_zeroing=True)
    with files.open(features=features, event_callback=lambda p, e: events.append(e)) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, 80000 * 128) as vol:
            written = 0
            with pytest.raises(PoolIOError):
                for vblock in range(0, 80000, 2):  # sparse: one leaf entry per block
                    vol.write(vblock * BLOCK, vblock.to_bytes(8, "little"))
                    written = vblock
            assert pool.mode is PoolMode.OUT_OF_METADATA_SPACE
            status = pool.status().split()
            assert status[4] == "ro" and status[7] == "-"  # no needs_check: growth is enough
            assert vol.read(written * BLOCK, 8) == written.to_bytes(8, "little")
            pool.resize_metadata(4 * MiB)
            assert pool.mode is PoolMode.WRITE
            vol.write((written + 2) * BLOCK, b"after")
            assert vol.read((written + 2) * BLOCK, 5) == b"after"
    assert PoolEvent.METADATA_LOW_WATER_MARK in events
    files.check()
