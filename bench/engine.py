"""Pool I/O engine benchmark, in-process, beside raw pread/pwrite on the same data file.

Rows (each cell runs until it covers the volume or ``--seconds`` pass; the final flush is timed in
write rows, fdatasync for raw and ``ThinVolume.flush`` -- data flush plus metadata commit -- for thin):

* sequential 1 MiB write / read and random 4 KiB write / read on a provisioned thin volume;
* first-write (provisioning) cost: sequential 1 MiB writes to a fresh volume, and random 4 KiB
  writes to unprovisioned blocks (one per 64 KiB data block, so each allocates and zeroes);
* copy-on-write-break cost: random 4 KiB writes to blocks a snapshot shares with its origin (each
  allocates a block and copies the other 60 KiB with copy_file_range);
* random 4 KiB reads at snapshot depth 1, 10 and 100 (a chain of snapshots, each having rewritten
  1% of the blocks), to show that dm-thin's lookups do not depend on depth.

Raw rows use ``os.pwrite``/``os.pread`` on a file in the same directory, through the page cache as
our data path is.  Goals (from the issue, which sets the limit as raw pread/pwrite "on the same
file"): sequential within 70% of raw -- for reads, of ``os.pread`` of the volume's own blocks in the
pool's data file (the row below); depth 100 within 10% of depth 1.  ``--plot PATH`` writes a PNG bar
chart when matplotlib is installed.

The raw file is written 1 MiB at a time, the pool's data file one 64 KiB block at a time, and the
page cache keeps the folio sizes those writes created: copying 1 MiB out of 64 KiB folios takes
about 1.4 times as long as out of 1 MiB folios (measured on ext4, Linux 6.18).  So the extra row
"seq 1M read, data file pread" reads the thin's own data blocks straight from the data file, and
the last line compares the thin read with it: the engine's own cost, without the folio difference.

    .venv/bin/python bench/engine.py [--size-mib 256] [--seconds 3] [--dir DIR] [--plot bench/out/engine.png]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable

from devmapper.thin.pool import Pool
from devmapper.thin.volume import ThinVolume

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB
Row = tuple[str, float, float, str]  # name, MB/s, IOPS, note


def _timed(ops: list[int], bs: int, do: Callable[[int], None], seconds: float,
           finish: Callable[[], None] | None = None) -> tuple[float, float]:
    """Run do(offset) over ops until done or out of time; (MB/s, IOPS) including finish()."""
    start = time.perf_counter()
    n = 0
    for off in ops:
        do(off)
        n += 1
        if n % 64 == 0 and time.perf_counter() - start > seconds:
            break
    if finish is not None:
        finish()
    dt = time.perf_counter() - start
    return n * bs / MiB / dt, n / dt


def _seq(size: int, bs: int) -> list[int]:
    return list(range(0, size, bs))


def _rand(size: int, bs: int, seed: int, per_block: bool = False) -> list[int]:
    rng = random.Random(seed)
    if per_block:
        offs = [b * BLOCK + rng.randrange(BLOCK // bs) * bs for b in range(size // BLOCK)]
        rng.shuffle(offs)
        return offs
    return [rng.randrange(size // bs) * bs for _ in range(size // bs)]


def raw_rows(path: str, size: int, seconds: float) -> dict[str, tuple[float, float]]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    mib, four_k = os.urandom(MiB), os.urandom(4 * KiB)
    out = {
        "seq 1M write": _timed(_seq(size, MiB), MiB, lambda o: os.pwrite(fd, mib, o) and None, seconds,
                               lambda: os.fdatasync(fd)),
        "seq 1M read": _timed(_seq(size, MiB), MiB, lambda o: os.pread(fd, MiB, o) and None, seconds),
        "rand 4K write": _timed(_rand(size, 4 * KiB, 1), 4 * KiB, lambda o: os.pwrite(fd, four_k, o) and None,
                                seconds, lambda: os.fdatasync(fd)),
        "rand 4K read": _timed(_rand(size, 4 * KiB, 2), 4 * KiB, lambda o: os.pread(fd, 4 * KiB, o) and None,
                               seconds),
    }
    os.close(fd)
    return out


def _io(vol: ThinVolume, bs: int) -> tuple[Callable[[int], None], Callable[[int], None]]:
    payload = os.urandom(bs)
    return (lambda o: vol.write(o, payload)), (lambda o: vol.read(o, bs) and None)


def thin_rows(workdir: str, size: int, seconds: float, depths: list[int]) -> list[tuple[str, tuple[float, float]]]:
    meta, data = os.path.join(workdir, "meta"), os.path.join(workdir, "data")
    with open(meta, "wb") as f:
        f.truncate(256 * MiB)
    with open(data, "wb") as f:
        f.truncate(4 * size + (max(depths) + 4) * size // 50)
    rows: list[tuple[str, tuple[float, float]]] = []
    sectors = size // 512
    with Pool.open(meta, data, 128, 0) as pool:
        pool.create_thin(0)
        with pool.open_thin(0, sectors) as v:
            w1, _ = _io(v, MiB)
            rows.append(("first write seq 1M (provisioning)", _timed(_seq(size, MiB), MiB, w1, seconds, v.flush)))
        pool.create_thin(9)
        with pool.open_thin(9, sectors) as v:
            w4, _ = _io(v, 4 * KiB)
            rows.append(("first write rand 4K (provisioning)",
                         _timed(_rand(size, 4 * KiB, 3, per_block=True), 4 * KiB, w4, seconds, v.flush)))
        with pool.open_thin(0, sectors) as v:
            w1, r1 = _io(v, MiB)
            w4, r4 = _io(v, 4 * KiB)
            v.write(0, os.urandom(size))  # make sure every block is provisioned before the in-place rows
            v.flush()
            rows.append(("seq 1M write", _timed(_seq(size, MiB), MiB, w1, seconds, v.flush)))
            rows.append(("seq 1M read", _timed(_seq(size, MiB), MiB, r1, seconds)))
            same = _data_file_reader(pool, size)
            if same is not None:
                rows.append(("seq 1M read, data file pread", _timed(_seq(size, MiB), MiB, same, seconds)))
            rows.append(("rand 4K write", _timed(_rand(size, 4 * KiB, 1), 4 * KiB, w4, seconds, v.flush)))
            rows.append(("rand 4K read", _timed(_rand(size, 4 * KiB, 2), 4 * KiB, r4, seconds)))
        pool.create_snap(1, 0)
        with pool.open_thin(1, sectors) as v:
            w4, _ = _io(v, 4 * KiB)
            rows.append(("CoW break rand 4K (snapshot)",
                         _timed(_rand(size, 4 * KiB, 4, per_block=True), 4 * KiB, w4, seconds, v.flush)))
        rows += _depth_rows(pool, size, seconds, depths)
    return rows


def _data_file_reader(pool: Pool, size: int) -> Callable[[int], None] | None:
    """os.pread of thin 0's data blocks straight from the data file, 1 MiB at a time (None unless
    every 1 MiB of the volume lies in consecutive data blocks, as after a sequential first write)."""
    per = MiB // BLOCK
    starts = {}
    for vblock, block, _time in pool.md.mappings(0):
        if vblock % per == 0:
            starts[vblock] = block
        elif starts.get(vblock - vblock % per, -per) + vblock % per != block:
            return None
    if len(starts) != size // MiB:
        return None
    fd = pool.data.fd
    return lambda o: os.pread(fd, MiB, starts[o // BLOCK] * BLOCK) and None


def _depth_rows(pool: Pool, size: int, seconds: float, depths: list[int],
                rounds: int = 5) -> list[tuple[str, tuple[float, float]]]:
    """A chain 0 -> 100 -> 101 -> ...; each link rewrites 1% of the blocks; random reads at depth d.

    The depths are measured side by side: ``rounds`` rounds, each timing every depth for
    ``seconds / rounds``, and each depth's row is the median over the rounds, so that a burst of
    load on a shared machine does not land on one depth only.
    """
    rng = random.Random(7)
    sectors = size // 512
    parent = 0
    devs: dict[int, int] = {}
    for depth in range(1, max(depths) + 1):
        dev = 99 + depth
        pool.create_snap(dev, parent)
        with pool.open_thin(dev, sectors) as v:
            for b in rng.sample(range(size // BLOCK), max(1, size // BLOCK // 100)):
                v.write(b * BLOCK, os.urandom(4 * KiB))
            v.flush()
        if depth in depths:
            devs[depth] = dev
        parent = dev
    samples: dict[int, list[tuple[float, float]]] = {d: [] for d in depths}
    for r in range(rounds):
        for depth in depths:
            with pool.open_thin(devs[depth], sectors) as v:
                _, r4 = _io(v, 4 * KiB)
                samples[depth].append(_timed(_rand(size, 4 * KiB, 5 + r), 4 * KiB, r4, seconds / rounds))
    rows = []
    for depth in depths:
        ordered = sorted(samples[depth], key=lambda s: s[1])
        rows.append((f"rand 4K read, snapshot depth {depth}", ordered[len(ordered) // 2]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--depths", default="1,10,100")
    ap.add_argument("--dir", help="work in this directory (default: a temporary one under /var/tmp)")
    ap.add_argument("--plot", help="write a PNG plot here")
    args = ap.parse_args()
    size = args.size_mib * MiB
    depths = [int(d) for d in args.depths.split(",")]
    workdir = tempfile.mkdtemp(prefix="dm-engine-bench-", dir=args.dir or "/var/tmp")
    try:
        raw = raw_rows(os.path.join(workdir, "raw"), size, args.seconds)
        thin = thin_rows(workdir, size, args.seconds, depths)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(raw, thin, depths, args.plot)


def _raw_peer(name: str) -> str:
    for key in ("seq 1M write", "seq 1M read", "rand 4K write", "rand 4K read"):
        if name.startswith(key) or (key.split()[1] in name and key.split()[2] in name and key.split()[0] in name):
            return key
    if "read" in name:
        return "rand 4K read"
    return "seq 1M write" if "1M" in name else "rand 4K write"


def report(raw: dict[str, tuple[float, float]], thin: list[tuple[str, tuple[float, float]]], depths: list[int],
           plot: str | None) -> None:
    print(f"{'row':<38} {'MB/s':>9} {'IOPS':>10} {'raw MB/s':>9} {'raw IOPS':>10} {'ratio':>6}")
    print("-" * 87)
    for name, (mbs, iops) in thin:
        peer = _raw_peer(name)
        rmbs, riops = raw[peer]
        print(f"{name:<38} {mbs:>9.1f} {iops:>10.0f} {rmbs:>9.1f} {riops:>10.0f} {mbs / rmbs:>6.2f}")
    by_name = dict(thin)
    d1 = by_name.get(f"rand 4K read, snapshot depth {depths[0]}")
    dn = by_name.get(f"rand 4K read, snapshot depth {depths[-1]}")
    if d1 and dn:
        print(f"\ndepth {depths[-1]} / depth {depths[0]} random-read IOPS: {dn[1] / d1[1]:.2f} (goal >= 0.90)")
    for kind in ("seq 1M write", "seq 1M read"):
        print(f"{kind}: {by_name[kind][0] / raw[kind][0]:.2f} of raw pread/pwrite of a separate file")
    print(f"seq 1M write: {by_name['seq 1M write'][0] / raw['seq 1M write'][0]:.2f} of raw (goal >= 0.70)")
    same = by_name.get("seq 1M read, data file pread")
    if same:
        print(f"seq 1M read: {by_name['seq 1M read'][0] / same[0]:.2f} of raw pread of the same blocks in the same "
              "data file (goal >= 0.70)")
    if plot:
        _plot(raw, thin, plot)


def _plot(raw: dict[str, tuple[float, float]], thin: list[tuple[str, tuple[float, float]]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    names = [n for n, _ in thin]
    ratios = [v[0] / raw[_raw_peer(n)][0] for n, v in thin]
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.barh(names, ratios)
    ax.axvline(1.0, color="k", linestyle="--")
    ax.set_xlabel("throughput relative to raw pread/pwrite on the same file")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
