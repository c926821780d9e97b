"""Many threads on several volumes with snapshots being taken and deleted underneath.

Each writer owns a byte range that starts and ends inside data blocks, so neighbours provision and
break sharing of the same blocks concurrently; per-writer models must match at the end."""

from __future__ import annotations

import random
import threading
import time

from devmapper.thin.locks import BlockLocks, CommitGate
from devmapper.thin.volume import ThinVolume
from pool.support import BLOCK, PoolFiles, distinct_mapped_blocks, pattern, used_data_blocks

NR_VOLS = 3
WRITERS_PER_VOL = 3
SPAN = 5 * BLOCK + 1234  # bytes owned by one writer: boundaries fall inside blocks
VOL_SIZE = -(-(WRITERS_PER_VOL * SPAN) // BLOCK) * BLOCK
OPS = 150


def writer(vol: ThinVolume, base: int, seed: int, model: bytearray, errors: list[BaseException]) -> None:
    rng = random.Random(seed)
    try:
        for _ in range(OPS):
            off = rng.randrange(SPAN)
            n = rng.randint(1, min(SPAN - off, 2 * BLOCK))
            r = rng.random()
            if r < 0.7:
                data = pattern(rng.getrandbits(32), n)
                vol.write(base + off, data, fua=rng.random() < 0.05)
                model[off : off + n] = data
            elif r < 0.85:
                vol.write_zeroes(base + off, n, unmap=False)
                model[off : off + n] = bytes(n)
            else:
                assert vol.read(base + off, n) == model[off : off + n]
    except BaseException as e:  # pragma: no cover - reported by the test
        errors.append(e)


def test_threads_over_volumes_while_snapshots_come_and_go(files: PoolFiles) -> None:
    with files.open(commit_period=0.02) as pool:
        vols = []
        for dev in range(NR_VOLS):
            pool.create_thin(dev)
            vols.append(pool.open_thin(dev, VOL_SIZE // 512))
        models = [[bytearray(SPAN) for _ in range(WRITERS_PER_VOL)] for _ in range(NR_VOLS)]
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=writer, args=(vols[v], w * SPAN, v * 10 + w, models[v][w], errors))
            for v in range(NR_VOLS)
            for w in range(WRITERS_PER_VOL)
        ]
        stop = threading.Event()

        def snapshotter() -> None:
            next_id, rng = 100, random.Random(1)
            try:
                while not stop.is_set():
                    pool.create_snap(next_id, rng.randrange(NR_VOLS))
                    if next_id > 102:
                        pool.delete(next_id - 3)
                    next_id += 1
            except BaseException as e:  # pragma: no cover
                errors.append(e)

        snap_thread = threading.Thread(target=snapshotter)
        snap_thread.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        snap_thread.join()
        assert not errors, errors
        for v, vol in enumerate(vols):
            assert vol.read(0, WRITERS_PER_VOL * SPAN) == b"".join(models[v])
            vol.close()
        assert used_data_blocks(pool) == distinct_mapped_blocks(pool.md)
    files.check()


def test_concurrent_discards_and_writes_leave_consistent_metadata(files: PoolFiles) -> None:
    with files.open(commit_period=0.02) as pool:
        pool.create_thin(0)
        pool.create_thin(1)
        v0, v1 = pool.open_thin(0, 64 * 128), pool.open_thin(1, 64 * 128)
        v0.write(0, b"\x01" * 64 * BLOCK)
        pool.create_snap(2, 0)
        errors: list[BaseException] = []

        def churn(vol: ThinVolume, seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(300):
                    off = rng.randrange(0, 60) * BLOCK + rng.randrange(BLOCK)
                    if rng.random() < 0.5:
                        vol.write(off, b"\x02" * rng.randint(1, 3 * BLOCK))
                    else:
                        vol.discard(off, rng.randint(1, 4 * BLOCK))
            except BaseException as e:  # pragma: no cover
                errors.append(e)

        threads = [threading.Thread(target=churn, args=(v, i)) for i, v in enumerate([v0, v0, v1, v1])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        v0.close()
        v1.close()
        with pool.open_thin(2, 64 * 128) as snap:  # the snapshot never saw any of it
            assert snap.read(0, 64 * BLOCK) == b"\x01" * 64 * BLOCK
        assert used_data_blocks(pool) == distinct_mapped_blocks(pool.md)
    files.check()


def test_commit_gate_lets_readers_and_writers_take_turns() -> None:
    gate = CommitGate()
    stop = threading.Event()
    counts = {"shared": 0, "exclusive": 0}

    def hammer_exclusive() -> None:
        while not stop.is_set():
            with gate.exclusive():
                counts["exclusive"] += 1

    def hammer_shared() -> None:
        while not stop.is_set():
            with gate.shared():
                counts["shared"] += 1

    threads = [threading.Thread(target=hammer_exclusive) for _ in range(2)]
    threads += [threading.Thread(target=hammer_shared) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert counts["shared"] > 10 and counts["exclusive"] > 10, counts


def test_block_locks_are_dropped_when_released() -> None:
    locks = BlockLocks()
    with locks.hold_all([(0, 1), (0, 2)]):
        assert len(locks) == 2
        with locks.hold((1, 1)):
            assert len(locks) == 3
    assert len(locks) == 0
