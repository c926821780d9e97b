"""Thin-pool I/O benchmark: MiB/s and IOPS of our engine against the raw data file, same run.

For 4 KiB and 64 KiB requests it measures sequential and random writes and reads on

* ``raw new``      -- a fresh sparse file (the first write allocates, like provisioning);
* ``raw written``  -- the same file after it was written (overwrite / read in place);
* ``thin fresh``   -- a new thin volume: every first write to a block provisions it (and zeroes the
  rest of a 64 KiB data block); reads of a fresh volume return zeroes without touching data;
* ``thin provisioned`` -- a fully written volume: writes go in place, reads hit data blocks;
* ``thin snapshot``    -- a snapshot of the provisioned volume: the first write to each block breaks
  sharing (allocate, copy the rest of the block with copy_file_range, write).

Each cell runs for ``--seconds`` or until the volume is covered.  All I/O goes through the page cache
(no O_DIRECT) and the final flush is not timed unless ``--sync``; the raw rows are measured the same
way, so the ratio column compares like with like.  Writes use one thread unless ``--threads``.

    .venv/bin/python bench/pool_io.py [--size-mib 256] [--seconds 2] [--threads 1] [--sync] [--dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

from devmapper.thin.pool import Pool
from devmapper.thin.volume import ThinVolume

BLOCK_SECTORS = 128
SIZES = (4096, 65536)
KINDS = ("seq write", "rand write", "seq read", "rand read")

IoFn = Callable[[int, int, bytes], None]  # (offset, length, payload)


@dataclasses.dataclass
class Result:
    target: str
    kind: str
    bs: int
    nbytes: int
    nops: int
    seconds: float

    @property
    def mib_s(self) -> float:
        return self.nbytes / (1 << 20) / self.seconds if self.seconds else 0.0

    @property
    def iops(self) -> float:
        return self.nops / self.seconds if self.seconds else 0.0


def offsets(kind: str, bs: int, size: int, seed: int) -> list[int]:
    n = size // bs
    if kind.startswith("seq"):
        return [i * bs for i in range(n)]
    rng = random.Random(seed)
    return [rng.randrange(n) * bs for _ in range(n)]


def run(
    kind: str, bs: int, size: int, io: IoFn, seconds: float, threads: int, sync: Callable[[], None] | None
) -> Result:
    """Issue the requests of one cell until done or out of time; returns bytes, ops and elapsed time."""
    offs = offsets(kind, bs, size, seed=bs)
    payload = os.urandom(bs)
    done = [0] * threads
    deadline = time.perf_counter() + seconds

    def worker(t: int) -> None:
        mine = offs[t::threads]
        for i, off in enumerate(mine):
            if not i & 63 and time.perf_counter() > deadline:
                break
            io(off, bs, payload)
            done[t] += 1

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    if sync is not None:
        sync()
    elapsed = time.perf_counter() - start
    nops = sum(done)
    return Result("", kind, bs, nops * bs, nops, elapsed)


class RawFile:
    def __init__(self, path: str, size: int) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, size)

    def io(self, kind: str) -> IoFn:
        fd = self.fd

        def write(off: int, n: int, buf: bytes) -> None:
            os.pwrite(fd, buf, off)

        def read(off: int, n: int, buf: bytes) -> None:
            os.pread(fd, n, off)

        return write if "write" in kind else read

    def sync(self) -> None:
        os.fdatasync(self.fd)


def thin_io(vol: ThinVolume, kind: str) -> IoFn:
    def write(off: int, n: int, buf: bytes) -> None:
        vol.write(off, buf)

    def read(off: int, n: int, buf: bytes) -> None:
        vol.read(off, n)

    return write if "write" in kind else read


class Bench:
    def __init__(self, workdir: str, size: int, seconds: float, threads: int, sync: bool) -> None:
        self.workdir, self.size, self.seconds, self.threads, self.sync = workdir, size, seconds, threads, sync
        self.results: list[Result] = []
        self.next_id = 0

    def record(self, target: str, r: Result) -> None:
        r.target = target
        self.results.append(r)
        print(f"  {target:<17} {r.kind:<10} {r.bs // 1024:>3}K {r.mib_s:9.1f} MiB/s {r.iops:10.0f} IOPS", flush=True)

    def raw(self) -> None:
        for bs in SIZES:
            for kind in KINDS[:2]:  # first writes into a sparse file
                self._raw_cell("raw new", kind, bs, filled=False)
            for kind in KINDS:  # overwrites and reads of a written file
                self._raw_cell("raw written", kind, bs, filled=True)

    def _raw_cell(self, target: str, kind: str, bs: int, filled: bool) -> None:
        f = RawFile(os.path.join(self.workdir, "raw"), self.size)
        try:
            if filled:
                self._fill_raw(f)
            self.record(target, run(kind, bs, self.size, f.io(kind), self.seconds, self.threads, self._raw_sync(f)))
        finally:
            os.close(f.fd)

    def _raw_sync(self, f: RawFile) -> Callable[[], None] | None:
        return f.sync if self.sync else None

    def _fill_raw(self, f: RawFile) -> None:
        chunk = os.urandom(1 << 20)
        for off in range(0, self.size, len(chunk)):
            os.pwrite(f.fd, chunk[: self.size - off], off)

    def thin(self, pool: Pool) -> None:
        base = self._new_thin(pool)
        with pool.open_thin(base, self.size // 512) as vol:
            chunk = os.urandom(1 << 20)
            for off in range(0, self.size, len(chunk)):
                vol.write(off, chunk[: self.size - off])
        for bs in SIZES:
            for kind in KINDS:
                self._thin_cell(pool, "thin fresh", kind, bs, self._new_thin(pool))
                self._thin_cell(pool, "thin provisioned", kind, bs, base)
                snap = self._new_id()
                pool.create_snap(snap, base)
                self._thin_cell(pool, "thin snapshot", kind, bs, snap)
                pool.delete(snap)

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _new_thin(self, pool: Pool) -> int:
        dev = self._new_id()
        pool.create_thin(dev)
        return dev

    def _thin_cell(self, pool: Pool, target: str, kind: str, bs: int, dev: int) -> None:
        with pool.open_thin(dev, self.size // 512) as vol:
            sync = vol.flush if self.sync else None
            r = run(kind, bs, self.size, thin_io(vol, kind), self.seconds, self.threads, sync)
        self.record(target, r)
        if target == "thin fresh":
            pool.delete(dev)

    def table(self) -> str:
        """One row per cell; "vs raw" divides by raw new (fresh writes) or raw written (the rest)."""
        raw = {(r.target, r.kind, r.bs): r for r in self.results if r.target.startswith("raw")}
        lines = [
            f"{'target':<17} {'pattern':<10} {'size':>5} {'MiB/s':>9} {'IOPS':>9} {'vs raw':>7}",
            "-" * 62,
        ]
        order = ("raw new", "raw written", "thin fresh", "thin provisioned", "thin snapshot")
        for r in sorted(self.results, key=lambda r: (r.bs, KINDS.index(r.kind), order.index(r.target))):
            base_target = "raw new" if r.target == "thin fresh" and "write" in r.kind else "raw written"
            base = raw.get((base_target, r.kind, r.bs))
            if r.target.startswith("raw") or base is None or not base.mib_s:
                ratio = "-"
            else:
                ratio = f"{r.mib_s / base.mib_s:.2f}x"
            lines.append(f"{r.target:<17} {r.kind:<10} {r.bs // 1024:>4}K {r.mib_s:9.1f} {r.iops:9.0f} {ratio:>7}")
        return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256, help="volume and raw file size (default 256)")
    ap.add_argument("--seconds", type=float, default=2.0, help="time limit per cell (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="concurrent requesters per cell (default 1)")
    ap.add_argument("--sync", action="store_true", help="include a final flush in each cell's time")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary directory)")
    args = ap.parse_args()
    size = args.size_mib << 20
    workdir = tempfile.mkdtemp(prefix="pool-io-", dir=args.dir)
    try:
        bench = Bench(workdir, size, args.seconds, args.threads, args.sync)
        print(f"raw file baseline ({args.size_mib} MiB, {args.threads} thread(s)):", flush=True)
        bench.raw()
        meta, data = os.path.join(workdir, "meta"), os.path.join(workdir, "data")
        with open(meta, "wb") as f:
            f.truncate(64 << 20)
        with open(data, "wb") as f:
            f.truncate(4 * size + (64 << 20))
        print(f"thin pool (64 KiB data blocks, {args.size_mib} MiB volumes):", flush=True)
        with Pool.open(meta, data, BLOCK_SECTORS) as pool:
            bench.thin(pool)
        print()
        print(bench.table())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
