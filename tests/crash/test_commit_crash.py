"""Crash-test every write of a commit (style guide 8.8, habit 9).

A committed state S1 is built; a batch of changes (creates, snapshots of snapshots, inserts across many
leaves, overwrites, range removals, deletes) is applied on top and committed through a fault-injecting
device that fails at write k, for every k from 0 to the number of writes the commit makes.  Reopening
the underlying device must show exactly S1 (its ``thin_dump`` is byte-identical to S1's) -- or S2, the
new state, when every write went through -- and ``thin_check`` must pass each time.

The same with a volatile write cache: unflushed writes are dropped at the crash, or (with the
test-local ``PowerCutDevice``) any subset of them survives, as on a disk that reorders its cache.  Only
"write everything, flush, then write the superblock, flush" survives that.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from devmapper.blockdev import FaultyBlockDevice, FileBlockDevice, MemoryBlockDevice
from devmapper.blockdev.base import BlockDevice
from devmapper.errors import BlockDeviceError, PoolFailedError
from devmapper.thin.metadata import PoolMetadata
from helpers.tools import require_tool

METADATA_BYTES = 4 << 20
NR_DATA_BLOCKS = 6000
DATA_BLOCK_SIZE = 128


# -- devices ------------------------------------------------------------------------------------------


class PowerCutDevice:
    """A disk with a volatile, reordering write cache.

    Writes wait in a cache until ``flush``.  ``fail_after_writes=N``: write N+1 raises (the power goes
    out while the engine writes); ``fail_after_flushes=N``: flush N+1 raises before pushing anything
    (the power goes out while the cache drains).  ``power_cut(keep)`` then persists the cached writes
    for which ``keep(index, count)`` is true -- any subset may reach the platter -- and drops the rest.
    Reads see the newest data.  With ``reads_survive`` reads keep working after a write fault (a transient
    error rather than a power cut), so the engine can re-read its last commit.
    """

    def __init__(self, inner: BlockDevice, fail_after_writes: int | None = None, reads_survive: bool = False):
        self.inner = inner
        self.read_only = False
        self.fail_after_writes = fail_after_writes
        self.fail_after_flushes: int | None = None
        self.reads_survive = reads_survive
        self.nr_writes = 0
        self.nr_flushes = 0
        self.failed = False
        self.pending: list[tuple[int, bytes]] = []
        self.events: list[str] = []  # "w" / "f" for every write and flush that went through

    def size(self) -> int:
        return self.inner.size()

    def read(self, offset: int, length: int) -> bytes:
        if self.failed and not self.reads_survive:
            raise BlockDeviceError("power cut")
        data = bytearray(self.inner.read(offset, length))
        for off, buf in self.pending:
            lo, hi = max(off, offset), min(off + len(buf), offset + length)
            if lo < hi:
                data[lo - offset : hi - offset] = buf[lo - off : hi - off]
        return bytes(data)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.failed or (self.fail_after_writes is not None and self.nr_writes >= self.fail_after_writes):
            self.failed = True
            raise BlockDeviceError(f"injected fault at write {self.nr_writes + 1}")
        self.nr_writes += 1
        self.events.append("w")
        self.pending.append((offset, bytes(data)))

    def flush(self) -> None:
        if self.failed or (self.fail_after_flushes is not None and self.nr_flushes >= self.fail_after_flushes):
            self.failed = True
            raise BlockDeviceError(f"injected fault at flush {self.nr_flushes + 1}")
        for off, buf in self.pending:
            self.inner.write(off, buf)
        self.pending.clear()
        self.nr_flushes += 1
        self.events.append("f")
        self.inner.flush()

    def power_cut(self, keep: Callable[[int, int], bool]) -> None:
        n = len(self.pending)
        for i, (off, buf) in enumerate(self.pending):
            if keep(i, n):
                self.inner.write(off, buf)
        self.pending.clear()
        self.failed = True

    def heal(self) -> None:
        """The transient fault is over: writes work again (the cache was kept)."""
        self.failed = False
        self.fail_after_writes = None
        self.fail_after_flushes = None

    def resize(self, new_size: int) -> None:
        self.inner.resize(new_size)

    def close(self) -> None:
        pass


KEEP_POLICIES: dict[str, Callable[[int, int], bool]] = {
    "none": lambda i, n: False,
    "all": lambda i, n: True,
    "even": lambda i, n: i % 2 == 0,
    "odd": lambda i, n: i % 2 == 1,
    "last": lambda i, n: i == n - 1,
    "first": lambda i, n: i == 0,
}


def copy_device(image: bytes) -> MemoryBlockDevice:
    dev = MemoryBlockDevice(len(image))
    dev.write(0, image)
    return dev


def image_of(dev: MemoryBlockDevice) -> bytes:
    return dev.read(0, dev.size())


# -- the real tools -----------------------------------------------------------------------------------


class Judge:
    """Writes images to files and runs thin_check + thin_dump (+ thin_dump -m) on them concurrently."""

    def __init__(self, tmp_path: Path) -> None:
        self.check = require_tool("thin_check")
        self.dump = require_tool("thin_dump")
        self.dir = tmp_path
        self.n = 0

    def __call__(self, image: bytes) -> tuple[str, str | None]:
        """(thin_dump output, thin_dump -m output or None when no metadata snapshot is held)."""
        self.n += 1
        path = self.dir / f"img{self.n}"
        path.write_bytes(image)
        env = dict(os.environ, LC_ALL="C")
        cmds = [[self.check, str(path)], [self.dump, str(path)], [self.dump, "-m", str(path)]]
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
        (c_out, c_err), (d_out, d_err), (m_out, _m_err) = (p.communicate(timeout=300) for p in procs)
        path.unlink()
        assert procs[0].returncode == 0, f"thin_check failed:\n{c_out}\n{c_err}"
        assert procs[1].returncode == 0, f"thin_dump failed:\n{d_err}"
        snap = m_out if procs[2].returncode == 0 else None
        return d_out, snap


# -- states -------------------------------------------------------------------------------------------


def build_s1(held_snapshot: bool) -> bytes:
    """S1: three devices (one a snapshot), ~1300 mappings over several leaves; optionally a held
    metadata snapshot, so the batch must also copy around the snapshot's shared trees."""
    dev = MemoryBlockDevice(METADATA_BYTES)
    pmd = PoolMetadata.format(dev, DATA_BLOCK_SIZE, NR_DATA_BLOCKS)
    pmd.create_thin(1)
    for v in range(1000):
        pmd.insert(1, v, pmd.alloc_data_block())
    pmd.create_thin(2)
    for v in range(0, 3000, 10):
        pmd.insert(2, v, pmd.alloc_data_block())
    pmd.create_snap(3, 1)
    pmd.set_transaction_id(0, 1)
    pmd.commit()
    if held_snapshot:
        pmd.reserve_metadata_snap()
    return image_of(dev)


def batch(pmd: PoolMetadata) -> None:
    """The changes committed on top of S1 (deterministic, including data block allocation)."""
    pmd.create_thin(10)
    for v in range(0, 1200, 3):  # a few leaves of a new device
        pmd.insert(10, v, pmd.alloc_data_block())
    pmd.create_snap(11, 3)  # a snapshot of a snapshot
    for v in range(100, 700, 2):  # overwrite shared mappings: copies the shared leaves
        pmd.insert(11, v, pmd.alloc_data_block())
    pmd.insert(1, 5000, pmd.alloc_data_block())
    pmd.remove_range(1, 200, 650)  # across several leaves of the origin
    pmd.remove(2, 20)
    pmd.delete(2)
    pmd.create_thin(2)  # the id again, now empty
    pmd.set_transaction_id(1, 2)


def apply_and_commit(image: bytes, dev_factory: Callable[[MemoryBlockDevice], BlockDevice]) -> tuple[
    MemoryBlockDevice, BlockDevice, PoolMetadata
]:
    base = copy_device(image)
    wrapped = dev_factory(base)
    pmd = PoolMetadata.open(wrapped)
    batch(pmd)
    return base, wrapped, pmd


def assert_failed_cleanly(pmd: PoolMetadata, s1_devices: list[int]) -> None:
    """After a failed commit the object is latched failed, or aborted back to S1 and usable."""
    if pmd.failed:
        with pytest.raises(PoolFailedError):
            pmd.devices()
        with pytest.raises(PoolFailedError):
            pmd.create_thin(99)
    else:
        assert pmd.devices() == s1_devices, "commit failed but the object neither latched nor aborted"
    try:
        pmd.close()
    except BlockDeviceError:
        pass


# -- tests --------------------------------------------------------------------------------------------


States = dict[bool, tuple[bytes, str, str | None, str, int]]


@pytest.fixture(scope="module")
def judged_states(tmp_path_factory: pytest.TempPathFactory) -> States:
    """For held_snapshot in (False, True): S1 image, S1 dump, S1 -m dump, S2 dump, writes of the commit."""
    judge = Judge(tmp_path_factory.mktemp("states"))
    out: States = {}
    for held in (False, True):
        s1 = build_s1(held)
        s1_dump, s1_snap = judge(s1)
        base, faulty, pmd = apply_and_commit(s1, FaultyBlockDevice)
        assert isinstance(faulty, FaultyBlockDevice)
        before = faulty.nr_writes
        pmd.commit()
        writes = faulty.nr_writes - before
        s2_dump, s2_snap = judge(image_of(base))
        assert s2_dump != s1_dump
        assert s2_snap == s1_snap, "the held metadata snapshot changed"
        assert writes > 20, f"the commit makes only {writes} writes: the batch is too small to be interesting"
        out[held] = (s1, s1_dump, s1_snap, s2_dump, writes)
    return out


@pytest.mark.parametrize("held_snapshot", [False, True], ids=["plain", "held-metadata-snap"])
def test_commit_fails_at_every_write(judged_states: States, held_snapshot: bool, tmp_path: Path) -> None:
    s1, s1_dump, s1_snap, s2_dump, writes = judged_states[held_snapshot]
    judge = Judge(tmp_path)
    s1_devices = PoolMetadata.open(copy_device(s1)).devices()
    for k in range(writes + 1):
        base, faulty, pmd = apply_and_commit(s1, lambda d: FaultyBlockDevice(d))
        assert isinstance(faulty, FaultyBlockDevice)
        faulty.fail_after_writes = faulty.nr_writes + k
        if k < writes:
            with pytest.raises(BlockDeviceError):
                pmd.commit()
            assert_failed_cleanly(pmd, s1_devices)
        else:
            pmd.commit()
        dump, snap = judge(image_of(base))
        assert dump == (s2_dump if k == writes else s1_dump), f"crash at write {k + 1} of {writes}"
        assert snap == s1_snap
        PoolMetadata.open(base).close()  # and the engine itself reopens it


@pytest.mark.parametrize("held_snapshot", [False, True], ids=["plain", "held-metadata-snap"])
def test_commit_with_volatile_cache_crash_at_every_write(
    judged_states: States, held_snapshot: bool, tmp_path: Path
) -> None:
    """Writes fail after k; the unflushed ones vanish (FaultyBlockDevice(volatile=True).crash())."""
    s1, s1_dump, s1_snap, s2_dump, writes = judged_states[held_snapshot]
    judge = Judge(tmp_path)
    s1_devices = PoolMetadata.open(copy_device(s1)).devices()
    for k in range(writes + 1):
        base, faulty, pmd = apply_and_commit(s1, lambda d: FaultyBlockDevice(d, volatile=True))
        assert isinstance(faulty, FaultyBlockDevice)
        faulty.fail_after_writes = faulty.nr_writes + k
        if k < writes:
            with pytest.raises(BlockDeviceError):
                pmd.commit()
            assert_failed_cleanly(pmd, s1_devices)
        else:
            pmd.commit()  # returns only after the superblock was flushed
        faulty.crash()
        dump, snap = judge(image_of(base))
        assert dump == (s2_dump if k == writes else s1_dump), f"crash at write {k + 1} of {writes}"
        assert snap == s1_snap


@pytest.mark.parametrize("policy", ["none", "all", "even", "last"])
def test_reordering_cache_keeps_s1_or_s2(judged_states: States, policy: str, tmp_path: Path) -> None:
    """Power cut at every write and at every flush of the commit, and any subset of the unflushed
    writes survives: the result is S1 or S2, never a mix, and never S1 again once S2 was seen."""
    s1, s1_dump, _s1_snap, s2_dump, writes = judged_states[False]
    judge = Judge(tmp_path)
    keep = KEEP_POLICIES[policy]
    s1_devices = PoolMetadata.open(copy_device(s1)).devices()
    base, dev, pmd = apply_and_commit(s1, PowerCutDevice)
    assert isinstance(dev, PowerCutDevice)
    pmd.commit()
    events = dev.events
    assert events.count("w") == writes and "f" in events
    # crash points in the order they happen: (writes done, flushes done) before each event, the next
    # event being the one that fails; the last point lets the commit complete and cuts the power
    # right after it returned
    points = [(events[:i].count("w"), events[:i].count("f")) for i in range(len(events) + 1)]
    seen_s2 = False
    for w, f in points:
        base, dev, pmd = apply_and_commit(s1, PowerCutDevice)
        assert isinstance(dev, PowerCutDevice)
        dev.fail_after_writes, dev.fail_after_flushes = w, f
        try:
            pmd.commit()
            completed = True
        except BlockDeviceError:
            completed = False
        assert (dev.nr_writes, dev.nr_flushes) == (w, f), "the commit is not deterministic"
        dev.power_cut(keep)
        if not completed:
            assert_failed_cleanly(pmd, s1_devices)
        dump, _ = judge(image_of(base))
        where = f"power cut after {w} writes and {f} flushes, kept {policy}"
        assert dump in (s1_dump, s2_dump), f"{where}: a mixed state"
        if completed:
            assert dump == s2_dump, f"{where}: the commit returned but S2 is not durable"
        if dump == s2_dump:
            seen_s2 = True
        else:
            assert not seen_s2, f"{where}: S1 came back after S2 was durable"
    assert seen_s2


def test_superblock_is_the_last_write_and_follows_a_flush(judged_states: States) -> None:
    """The commit's last write is block 0, written only after a flush of everything else."""
    s1 = judged_states[False][0]
    _base, dev, pmd = apply_and_commit(s1, PowerCutDevice)
    assert isinstance(dev, PowerCutDevice)
    log: list[tuple[str, int]] = []
    orig_write, orig_flush = dev.write, dev.flush

    def write(offset: int, data: bytes | bytearray | memoryview) -> None:
        log.append(("write", offset // 4096))
        orig_write(offset, data)

    def flush() -> None:
        log.append(("flush", -1))
        orig_flush()

    dev.write, dev.flush = write, flush  # type: ignore[method-assign]
    pmd.commit()
    assert log[-2:] == [("write", 0), ("flush", -1)]
    assert log[-3] == ("flush", -1)
    assert ("write", 0) not in log[:-2]


def test_uncommitted_changes_are_gone_after_reopen(judged_states: States, tmp_path: Path) -> None:
    """Changes never committed vanish -- even when dirty blocks were written back early."""
    s1, s1_dump, s1_snap, _s2, _w = judged_states[True]
    judge = Judge(tmp_path)
    for volatile in (False, True):
        base = copy_device(s1)
        faulty = FaultyBlockDevice(base, volatile=volatile)
        pmd = PoolMetadata.open(faulty)
        pmd.tm.max_dirty = 4  # force early write-back of dirty blocks
        batch(pmd)
        assert faulty.nr_writes > 0, "nothing was written back early; the test lost its point"
        if volatile:
            faulty.crash()
        # no commit, no close (close would commit): the object is simply dropped
        dump, snap = judge(image_of(base))
        assert dump == s1_dump
        assert snap == s1_snap
        again = PoolMetadata.open(base)
        assert again.devices() == [1, 2, 3]
        assert again.trans_id == 1


def test_transient_write_error_aborts_cleanly_and_a_retry_commits_s2(judged_states: States, tmp_path: Path) -> None:
    """Reads survive the fault: commit aborts to S1 (not latched); redoing the batch commits exactly S2."""
    s1, s1_dump, _snap, s2_dump, writes = judged_states[False]
    judge = Judge(tmp_path)
    s1_devices = PoolMetadata.open(copy_device(s1)).devices()
    for k in (0, 1, writes // 2, writes - 2, writes - 1):
        base, dev, pmd = apply_and_commit(s1, lambda d: PowerCutDevice(d, reads_survive=True))
        assert isinstance(dev, PowerCutDevice)
        dev.fail_after_writes = dev.nr_writes + k
        with pytest.raises(BlockDeviceError):
            pmd.commit()
        assert not pmd.failed, "abort could re-read the superblock, so the pool should not latch"
        assert pmd.devices() == s1_devices
        assert pmd.trans_id == 1
        dev.heal()
        dev.flush()  # whatever the failed commit left in the cache goes down: it must be harmless
        assert judge(image_of(base))[0] == s1_dump
        batch(pmd)
        pmd.commit()
        assert judge(image_of(base))[0] == s2_dump, f"retry after a fault at write {k + 1}"


@pytest.mark.parametrize("op", ["reserve", "release"])
def test_metadata_snapshot_messages_crash_at_every_write(op: str, tmp_path: Path) -> None:
    """reserve/release_metadata_snap commit twice or once; any crash leaves S1, the batch committed
    without the snapshot change (reserve's first commit), or the final state -- in that order."""
    judge = Judge(tmp_path)
    s1 = build_s1(held_snapshot=(op == "release"))
    s1_dump, s1_snap = judge(s1)

    def run(dev_factory: Callable[[MemoryBlockDevice], BlockDevice]) -> tuple[
        MemoryBlockDevice, BlockDevice, PoolMetadata
    ]:
        return apply_and_commit(s1, dev_factory)

    base, faulty, pmd = run(FaultyBlockDevice)
    assert isinstance(faulty, FaultyBlockDevice)
    before = faulty.nr_writes
    pmd.reserve_metadata_snap() if op == "reserve" else pmd.release_metadata_snap()
    writes = faulty.nr_writes - before
    final = judge(image_of(base))
    if op == "reserve":
        assert s1_snap is None and final[1] is not None
    else:
        assert s1_snap is not None and final[1] is None

    order = [(s1_dump, s1_snap)]
    for k in range(writes + 1):
        base, faulty, pmd = run(lambda d: FaultyBlockDevice(d, volatile=True))
        assert isinstance(faulty, FaultyBlockDevice)
        faulty.fail_after_writes = faulty.nr_writes + k
        try:
            pmd.reserve_metadata_snap() if op == "reserve" else pmd.release_metadata_snap()
            assert k == writes
        except BlockDeviceError:
            assert k < writes
        faulty.crash()
        got = judge(image_of(base))
        if got != order[-1]:
            order.append(got)
    assert order[-1] == final
    if op == "reserve":
        assert len(order) in (2, 3)
        if len(order) == 3:  # the batch committed, the snapshot not yet taken
            assert order[1] == (final[0], None)
    else:
        assert len(order) == 2, "release commits once: S1 or the final state"


# -- failures outside PoolMetadata.commit()'s abort ---------------------------------------------------


def build_small_s1(held_snapshot: bool) -> bytes:
    """A 1 MiB metadata device (256 blocks) so the metadata allocator wraps around quickly."""
    dev = MemoryBlockDevice(1 << 20)
    pmd = PoolMetadata.format(dev, DATA_BLOCK_SIZE, 20000)
    pmd.create_thin(0)
    for v in range(3000):
        pmd.insert(0, v, pmd.alloc_data_block())
    pmd.commit()
    if held_snapshot:
        pmd.reserve_metadata_snap()
    return image_of(dev)


@pytest.mark.parametrize(
    "how", ["commit-eio-on-fsync", "reserve_metadata_snap", "release_metadata_snap", "set_needs_check"]
)
def test_a_failed_commit_never_endangers_the_committed_state(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After any failed commit the object must be aborted (back to the on-disk state, with the
    allocation rule intact) or latched failed.  Then carrying on -- lots of copy-on-write with early
    write-back -- and losing power before the next commit must leave the committed state S1 intact."""
    judge = Judge(tmp_path)
    s1 = build_small_s1(held_snapshot=(how == "release_metadata_snap"))
    s1_dump = judge(s1)
    path = tmp_path / "meta"
    path.write_bytes(s1)
    if how == "commit-eio-on-fsync":
        dev: BlockDevice = FileBlockDevice(path)
    else:
        dev = PowerCutDevice(copy_device(s1), reads_survive=True)
    pmd = PoolMetadata.open(dev)
    for v in range(3000):  # copies every leaf: the committed ones are now free in the open transaction
        pmd.insert(0, v, pmd.alloc_data_block())
    with pytest.raises(Exception):  # noqa: B017 - any failure; what matters is the state afterwards
        if how == "commit-eio-on-fsync":
            def eio(fd: int) -> None:
                raise OSError(errno.EIO, os.strerror(errno.EIO))

            with monkeypatch.context() as m:
                m.setattr(os, "fdatasync", eio)
                pmd.commit()
        else:
            assert isinstance(dev, PowerCutDevice)
            dev.fail_after_writes = dev.nr_writes  # the first write of the commit fails
            getattr(pmd, how)()
    if isinstance(dev, PowerCutDevice):
        dev.heal()  # a transient fault: the device works again
    try:
        pmd.tm.max_dirty = 2  # write dirty blocks back early
        pmd.create_thin(1)
        pmd.insert_many(1, [(v, 5, 0) for v in range(25000)])  # ~200 new nodes: the allocator wraps
    except PoolFailedError:
        pass
    # power cut before any further commit: what was written back stays, nothing else happens
    if isinstance(dev, PowerCutDevice):
        dev.flush()
        image = image_of(dev.inner)  # type: ignore[arg-type]
    else:
        image = path.read_bytes()
    assert judge(image) == s1_dump
