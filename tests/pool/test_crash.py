"""Crash consistency: a child runs the crash workload and is killed with SIGKILL at a random moment.

After the kill the metadata must pass thin_check and our checker, and every byte a device held at
its last completed flush (``flush``, or any message: messages commit) must read back, except where a
later operation may have changed it.  50 trials by default; ``-m crash_long`` runs 500.
"""

from __future__ import annotations

import concurrent.futures
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pool.crash_workload import INITIAL_DEVICES, Op, Params, operations, params, payload
from pool.support import PoolFiles, check_metadata_clean, make_pool_files

WORKER = Path(__file__).with_name("crash_worker.py")
CI_TRIALS = 50
LONG_TRIALS = 500


class Replay:
    """The model: what each device holds now, what it held at its last flush, what may differ."""

    def __init__(self, p: Params) -> None:
        self.p = p
        self.cur = {d: bytearray(p.vol_size) for d in INITIAL_DEVICES}
        self.durable = {d: bytes(p.vol_size) for d in INITIAL_DEVICES}
        self.touched = {d: bytearray(p.vol_size) for d in INITIAL_DEVICES}
        self.uncertain: set[int] = set()  # may or may not exist after the crash
        self.gone: set[int] = set()

    def _touch(self, dev: int, begin: int, end: int) -> None:
        self.touched[dev][begin:end] = b"\1" * (end - begin)

    def _make_durable(self, devs: list[int]) -> None:
        for d in devs:
            self.durable[d] = bytes(self.cur[d])
            self.touched[d] = bytearray(self.p.vol_size)

    def step(self, op: Op, done: bool) -> None:
        d, begin, end = op.dev, op.offset, op.offset + op.length
        if op.kind == "write":
            self.cur[d][begin:end] = payload(op)
        elif op.kind == "discard":
            bs = self.p.block
            lo, hi = -(-begin // bs) * bs, end // bs * bs
            if lo < hi:
                self.cur[d][lo:hi] = bytes(hi - lo)
        elif op.kind == "zeroes":
            self.cur[d][begin:end] = bytes(end - begin)
        elif op.kind == "snap":
            self._snap(op, done)
        elif op.kind == "delete":
            self._delete(op, done)
        if op.kind in ("write", "discard", "zeroes"):
            self._touch(d, begin, end)
        elif op.kind == "flush" and done:
            self._make_durable([d])

    def _snap(self, op: Op, done: bool) -> None:
        self.cur[op.new] = bytearray(self.cur[op.dev])
        self.touched[op.new] = bytearray(self.p.vol_size)
        self.durable[op.new] = bytes(self.cur[op.new])
        if done:
            self._make_durable(list(self.cur))
        else:
            self.uncertain.add(op.new)

    def _delete(self, op: Op, done: bool) -> None:
        for table in (self.cur, self.durable, self.touched):
            del table[op.dev]  # type: ignore[attr-defined]
        if done:
            self.gone.add(op.dev)
            self._make_durable(list(self.cur))
        else:
            self.uncertain.add(op.dev)


def replay(seed: int, last_started: int, completed: set[int]) -> Replay:
    model = Replay(params(seed))
    for i, op in enumerate(operations(seed)):
        if i > last_started:
            break
        model.step(op, i in completed)
    return model


def masked(actual: bytes, durable: bytes, touched: bytearray) -> bytearray:
    """actual, with the bytes that may legitimately differ replaced by the durable ones."""
    out = bytearray(actual)
    pos = touched.find(1)
    while pos >= 0:
        end = touched.find(0, pos)
        end = len(touched) if end < 0 else end
        out[pos:end] = durable[pos:end]
        pos = touched.find(1, end)
    return out


def run_child(root: Path, seed: int, kill_at_op: int, delay: float) -> tuple[int, set[int]]:
    """Run the worker; SIGKILL it ``delay`` seconds after it starts op ``kill_at_op`` (so the moment is
    random but the amount of work done does not depend on the machine's speed).  Returns the last
    op started and the flushing ops completed."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(root), str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    ready = proc.stdout.readline()
    if ready != "READY\n":
        proc.kill()
        pytest.fail(f"worker did not start: {ready!r} {proc.communicate()[1]}")
    lines: list[str] = []
    reached = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line == f"S {kill_at_op}\n":
                reached.set()
        reached.set()

    reader = threading.Thread(target=read)
    reader.start()
    reached.wait(60)
    time.sleep(delay)
    proc.kill()
    reader.join()
    err = proc.stderr.read()
    proc.wait()
    assert proc.returncode == -9, f"worker ended by itself ({proc.returncode}): {err}"
    return parse_reports(lines)


def parse_reports(lines: list[str]) -> tuple[int, set[int]]:
    started, completed = -1, set()
    for line in lines:
        if not line.endswith("\n"):
            break  # torn last line
        tag, index = line.split()
        if tag == "S":
            started = int(index)
        else:
            completed.add(int(index))
    return started, completed


def verify(root: Path, seed: int, started: int, completed: set[int]) -> None:
    p = params(seed)
    model = replay(seed, started, completed)
    pf = PoolFiles(root, root / "meta", root / "data", p.block_sectors)
    check_metadata_clean(pf.meta)
    with pf.open() as pool:
        existing = set(pool.md.devices())
        assert not (model.gone & existing), f"deleted devices came back: {model.gone & existing}"
        for dev in model.cur:
            if dev in model.uncertain:
                continue
            assert dev in existing, f"device {dev} lost"
            with pool.open_thin(dev, p.vol_size // 512) as vol:
                actual = vol.read(0, p.vol_size)
            ok = masked(actual, model.durable[dev], model.touched[dev]) == model.durable[dev]
            assert ok, f"seed {seed}: device {dev} lost flushed data (started {started})"
    check_metadata_clean(pf.meta)


def trial(base: Path, seed: int) -> int:
    root = base / f"trial-{seed}"
    p = params(seed)
    make_pool_files(root, data_blocks=p.data_blocks, block_sectors=p.block_sectors)
    rng = random.Random(seed)
    started, completed = run_child(root, seed, rng.randrange(400), rng.uniform(0.0, 0.02))
    verify(root, seed, started, completed)
    return started


def run_trials(base: Path, seeds: range) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        started = list(pool.map(lambda s: trial(base, s), seeds))
    assert sum(started) > 100 * len(seeds), f"workers barely ran: {started}"


def test_sigkill_during_io_loses_nothing_flushed(tmp_path: Path) -> None:
    run_trials(tmp_path, range(CI_TRIALS))


@pytest.mark.crash_long
def test_sigkill_during_io_loses_nothing_flushed_long(tmp_path: Path) -> None:
    run_trials(tmp_path, range(1000, 1000 + LONG_TRIALS))


def test_replay_model_tracks_durability() -> None:
    """The checker's model: a flush makes a device's bytes durable; later writes are uncertain."""
    seed = 7
    ops = []
    for op in operations(seed):
        ops.append(op)
        if len(ops) == 200:
            break
    flush_at = next(i for i, op in enumerate(ops) if op.kind == "flush")
    model = replay(seed, flush_at, {flush_at})
    dev = ops[flush_at].dev
    assert model.durable[dev] == bytes(model.cur[dev])
    assert not any(model.touched[dev])
