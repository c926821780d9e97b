"""The lock-free read path must never return bytes of a data block reassigned under it.

Reads take no block lock (``ThinVolume._readinto``): they look the blocks up, read the data, and
trust it only if the metadata's epoch did not move in between.  These tests reassign a block while
a read is between its lookup and its data I/O -- deterministically, from a hook in the data
device's ``read``, and at random, with writers breaking sharing, discarding and committing while
readers check that every 4 KiB they get belongs to the block they asked for.  Each block of the
volume holds an 8-byte tag (device, virtual block, version) repeated, so a read that got a block
now mapped elsewhere shows a foreign tag.
"""

from __future__ import annotations

import random
import struct
import threading
import time
from collections.abc import Callable

import pytest

from devmapper.blockdev.memory import MemoryBlockDevice
from devmapper.thin.pool import Pool
from pool.support import BLOCK, MiB

TAG = struct.Struct("<HHI")  # thin id, virtual block, version
PAGE = 4096


def tagged(dev: int, vblock: int, version: int) -> bytes:
    return TAG.pack(dev, vblock, version) * (BLOCK // TAG.size)


class HookedMemory(MemoryBlockDevice):
    """A memory device that calls ``hook`` at the start of every read, before copying anything."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.hook: Callable[[], None] | None = None

    def read(self, offset: int, length: int) -> bytes:
        if self.hook is not None:
            self.hook()
        return super().read(offset, length)


def check_tags(dev: int, offset: int, data: bytes | bytearray) -> None:
    """Every 4 KiB page read at offset is zeroes or one tag of (dev, its virtual block) repeated."""
    assert offset % PAGE == 0 and len(data) % PAGE == 0
    for pos in range(0, len(data), PAGE):
        page = bytes(data[pos : pos + PAGE])
        word = page[: TAG.size]
        assert page == word * (PAGE // TAG.size), f"torn page at {offset + pos}"
        if word != bytes(TAG.size):
            got_dev, got_vblock, _version = TAG.unpack(word)
            assert (got_dev, got_vblock) == (dev, (offset + pos) // BLOCK), (
                f"page at {offset + pos} holds data of thin {got_dev} block {got_vblock}"
            )


@pytest.mark.parametrize("commit", [False, True], ids=["same-transaction", "after-commit"])
@pytest.mark.parametrize("how", ["read", "readinto"])
def test_a_block_reallocated_between_lookup_and_read_is_not_returned(commit: bool, how: str) -> None:
    """The pool is full; the read's hook discards the block being read and writes another virtual
    block, which can only get the block just freed (at once when it was allocated in the open
    transaction, else after the commit).  The read must see the discard, never the new data."""
    data = HookedMemory(4 * BLOCK)
    with Pool.open(MemoryBlockDevice(4 * MiB), data, BLOCK // 512) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, 16 * BLOCK // 512) as vol:
            for v in range(4):
                vol.write(v * BLOCK, tagged(0, v, 0))
            if commit:
                vol.flush()
            before = pool.md.lookup(0, 1)
            assert before is not None and pool.md.nr_free_data_blocks() == 0
            fired = []

            def reassign() -> None:
                if fired:
                    return
                fired.append(True)
                vol.discard(BLOCK, BLOCK)
                if commit:
                    vol.flush()
                vol.write(9 * BLOCK, tagged(0, 9, 1))
                after = pool.md.lookup(0, 9)
                assert after is not None and after.data_block == before.data_block  # really reused

            data.hook = reassign
            if how == "read":
                got: bytes | bytearray = vol.read(0, 3 * BLOCK)
            else:
                got = bytearray(3 * BLOCK)
                vol.readinto(0, got)
            data.hook = None
            assert fired
            check_tags(0, 0, got)
            assert got[BLOCK : 2 * BLOCK] == bytes(BLOCK)  # the discard, which came first
            assert got[: BLOCK] == tagged(0, 0, 0) and got[2 * BLOCK :] == tagged(0, 2, 0)


def test_an_unchanged_epoch_serves_reads_without_block_locks() -> None:
    """The fast path really is lock-free: a read goes through while a writer holds a block's lock."""
    with Pool.open(MemoryBlockDevice(4 * MiB), MemoryBlockDevice(8 * BLOCK), BLOCK // 512) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, 8 * BLOCK // 512) as vol:
            vol.write(0, tagged(0, 0, 0) + tagged(0, 1, 0))
            with pool.locks.hold((0, 1)):
                assert vol.read(0, 2 * BLOCK) == tagged(0, 0, 0) + tagged(0, 1, 0)


NR_VBLOCKS = 12
RACE_OPS = 300


def test_readers_never_see_reassigned_blocks_while_writers_churn() -> None:
    """Readers (slowed down between lookup and data copy) against a writer that breaks sharing,
    discards, rewrites and commits in a pool with hardly any free blocks, so freed blocks are
    handed out again at once."""
    data = HookedMemory((NR_VBLOCKS + 3) * BLOCK)
    data.hook = lambda: time.sleep(0.0003)  # widen the window between lookup and data copy
    errors: list[BaseException] = []
    stop = threading.Event()
    with Pool.open(MemoryBlockDevice(4 * MiB), data, BLOCK // 512, commit_period=0.01) as pool:
        pool.create_thin(0)
        vol = pool.open_thin(0, NR_VBLOCKS * BLOCK // 512)
        for v in range(NR_VBLOCKS):
            vol.write(v * BLOCK, tagged(0, v, 0))
        vol.flush()

        def writer() -> None:
            rng = random.Random(1)
            try:
                for version in range(1, RACE_OPS + 1):
                    v = rng.randrange(NR_VBLOCKS)
                    r = rng.random()
                    if r < 0.4:
                        vol.discard(v * BLOCK, BLOCK)
                        if rng.random() < 0.5:
                            vol.flush()
                        w = rng.randrange(NR_VBLOCKS)  # most likely gets the block just freed
                        vol.write(w * BLOCK, tagged(0, w, version))
                    elif r < 0.6:
                        pool.create_snap(1, 0)  # every block is shared: the next writes break sharing
                        for w in rng.sample(range(NR_VBLOCKS), 2):
                            vol.write(w * BLOCK, tagged(0, w, version))
                        pool.delete(1)  # frees the old copies (the message commits)
                    elif r < 0.8:
                        vol.write(v * BLOCK, tagged(0, v, version))  # in place, or into a new block
                    else:
                        vol.write_zeroes(v * BLOCK, BLOCK)
                        vol.flush()
            except BaseException as e:  # pragma: no cover - reported by the test
                errors.append(e)
            finally:
                stop.set()

        def reader(seed: int, into: bool) -> None:
            rng = random.Random(seed)
            try:
                while not stop.is_set():
                    first = rng.randrange(NR_VBLOCKS)
                    offset = first * BLOCK + rng.randrange(BLOCK // PAGE) * PAGE
                    length = rng.randint(1, (NR_VBLOCKS * BLOCK - offset) // PAGE) * PAGE
                    length = min(length, 4 * BLOCK)
                    if into:
                        got: bytes | bytearray = bytearray(length)
                        vol.readinto(offset, got)
                    else:
                        got = vol.read(offset, length)
                    check_tags(0, offset, got)
            except BaseException as e:  # pragma: no cover - reported by the test
                errors.append(e)
                stop.set()

        threads = [threading.Thread(target=writer)]
        threads += [threading.Thread(target=reader, args=(i, i % 2 == 1)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        data.hook = None
        vol.close()
        assert not errors, errors
