"""Helper for ``bench/nbd.sh``: build the pool and raw image, then turn fio's JSON into a table and a plot.

    nbd_bench.py setup DIR [--size-mib 1024] [--depth 100]
    nbd_bench.py report DIR [--png FILE]

``setup`` writes, in DIR (all on one file system):

* ``raw.img`` -- SIZE of pseudo-random data (the raw-file and nbdkit targets; qcow2 images are
  converted from it by the shell script);
* a thin pool (``meta``, ``data``; 64 KiB blocks) with
  - thin 1000: a fully written volume (the "written thin volume" rows);
  - thin 0 fully written, then a chain of snapshots: thin i = snapshot of thin i-1 plus a 4 MiB
    write, for i = 1 .. depth-1, so thin d-1 is the volume at snapshot depth d (the same shape as
    the qcow2 chain: populated base plus 4 MiB per layer).

``report`` reads ``DIR/results/<target>__<row>__r<round>.json``, keeps each target's best round and
prints IOPS / MB/s with ratios, then checks the goals.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from devmapper.thin.pool import Pool
from devmapper.thin.volume import ThinVolume

MiB = 1 << 20
CHUNK = 4 * MiB

MAIN_ROWS = [
    ("seqread-1M-qd1", "seq read 1 MiB, qd1", "MB/s"),
    ("seqwrite-1M-qd1", "seq write 1 MiB, qd1", "MB/s"),
    ("randread-4k-qd1", "rand read 4 KiB, qd1", "IOPS"),
    ("randread-4k-qd32", "rand read 4 KiB, qd32", "IOPS"),
    ("randwrite-4k-qd1", "rand write 4 KiB, qd1", "IOPS"),
    ("randwrite-4k-qd32", "rand write 4 KiB, qd32", "IOPS"),
]
MAIN_TARGETS = [
    ("ours", "devmapper nbd (thin)"),
    ("qcow2wb", "qemu-nbd qcow2 writeback"),
    ("qcow2direct", "qemu-nbd qcow2 none/native"),
    ("nbdkit", "nbdkit file"),
    ("raw", "raw file libaio O_DIRECT"),
]
DEPTHS = (1, 10, 100)
DEPTH_ROWS = [("randread-4k-qd1", "rand read 4 KiB, qd1"), ("randread-4k-qd32", "rand read 4 KiB, qd32")]


def _pattern(seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(CHUNK)


def _fill(vol: ThinVolume, size: int, seed: int) -> None:
    base = _pattern(seed)
    for off in range(0, size, CHUNK):
        stamp = off.to_bytes(8, "little")  # every 4 MiB chunk differs
        vol.write(off, stamp + base[8:])


def setup(d: Path, size_mib: int, depth: int) -> None:
    size = size_mib * MiB
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(d / "raw.img", "wb") as f:
        base = _pattern(1)
        for off in range(0, size, CHUNK):
            f.write(off.to_bytes(8, "little") + base[8:])
        f.flush()
        os.fsync(f.fileno())
    for name, nbytes in (("meta", 64 * MiB), ("data", 2 * size + depth * CHUNK + 256 * MiB)):
        with open(d / name, "wb") as f:
            f.truncate(nbytes)
    with Pool.open(d / "meta", d / "data", 128) as pool:
        pool.create_thin(1000)
        with pool.open_thin(1000, size // 512) as vol:
            _fill(vol, size, 2)
        pool.create_thin(0)
        with pool.open_thin(0, size // 512) as vol:
            _fill(vol, size, 3)
        for i in range(1, depth):
            pool.create_snap(i, i - 1)
            with pool.open_thin(i, size // 512) as vol:
                off = (i * 8 * MiB) % (size - CHUNK)
                vol.write(off, bytes([i % 256]) * CHUNK)
        pool.commit()
    os.sync()
    print(f"setup: {size_mib} MiB volumes, snapshot chain of depth {depth}, {time.perf_counter() - t0:.1f} s")


# -- report -----------------------------------------------------------------------------------------


def _rounds(d: Path, target: str, row: str) -> dict[int, dict[str, float]]:
    """Each round of target on row (``results/<target>__<row>__r<N>.json``) by round number."""
    out: dict[int, dict[str, float]] = {}
    for path in sorted((d / "results").glob(f"{target}__{row}__r*.json")):
        text = path.read_text()
        text = text[text.index("{") :]  # fio may print "connected to NBD server" first
        job = json.loads(text)["jobs"][0]
        side = job["write"] if job["write"]["io_bytes"] else job["read"]
        out[int(path.stem.rsplit("__r", 1)[1])] = {
            "IOPS": float(side["iops"]),
            "MB/s": float(side["bw_bytes"]) / 1e6,
            "p50": float(side["clat_ns"]["percentile"].get("50.000000", 0)) / 1000,
        }
    return out


def _load(d: Path, target: str, row: str) -> dict[str, float] | None:
    """The best round of target on row, or None."""
    return max(_rounds(d, target, row).values(), key=lambda r: r["IOPS"], default=None)


def _won(d: Path, row: str, rival: str) -> str:
    """In how many rounds ours was at least rival (the two ran one after the other), as "k/n"."""
    ours, theirs = _rounds(d, "ours", row), _rounds(d, rival, row)
    both = sorted(set(ours) & set(theirs))
    return "-" if not both else f"{sum(ours[n]['IOPS'] >= theirs[n]['IOPS'] for n in both)}/{len(both)}"


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if unit == "IOPS" or v >= 100 else f"{v:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def report(d: Path, png: Path | None) -> int:
    main: dict[tuple[str, str], float | None] = {}
    for row, _title, unit in MAIN_ROWS:
        for target, _ in MAIN_TARGETS:
            r = _load(d, target, row)
            main[(target, row)] = None if r is None else r[unit]
    cols = [t for t, _ in MAIN_TARGETS]
    head = f"{'workload':<24}" + "".join(f"{t:>13}" for t in cols)
    head += f"{'ours/qcow2wb':>14}{'won':>6}{'ours/nbdkit':>13}{'ours/raw':>10}"
    print("\nMain table (IOPS or MB/s, best of the rounds; fio nbd engine over unix sockets; won = rounds in")
    print("which ours was at least qcow2wb, the two running one after the other)")
    print(head)
    print("-" * len(head))
    goals: list[tuple[str, bool]] = []
    for row, title, unit in MAIN_ROWS:
        vals = [main[(t, row)] for t in cols]
        ours, qwb, kit, raw = main[("ours", row)], main[("qcow2wb", row)], main[("nbdkit", row)], main[("raw", row)]
        line = f"{title + ' ' + unit:<24}" + "".join(f"{_fmt(v, unit):>13}" for v in vals)
        line += f"{_ratio(ours, qwb):>14}{_won(d, row, 'qcow2wb'):>6}{_ratio(ours, kit):>13}{_ratio(ours, raw):>10}"
        print(line)
        if ours and qwb:
            goals.append((f">= qemu-nbd qcow2 (writeback) on {title}", ours >= qwb))
        if row.startswith("seq") and ours and kit:
            goals.append((f">= 70% of nbdkit file on {title}", ours >= 0.7 * kit))

    print("\nSnapshot depth (random 4 KiB reads; IOPS and median latency of the best round; volume = snapshot")
    print("N-1 of a chain over a fully written base, each layer adding 4 MiB)")
    head = f"{'target':<26}" + "".join(f"{'depth ' + str(n):>16}" for n in DEPTHS) + f"{'d100/d1':>10}"
    depth_data: Series = {}
    for row, title in DEPTH_ROWS:
        print(f"{title}:")
        print(head)
        for target, label in (("ours", "devmapper nbd (thin)"), ("qcow2wb", "qemu-nbd qcow2 writeback")):
            runs = [_load(d, f"{target}-d{n}", row) for n in DEPTHS]
            vals = [None if r is None else r["IOPS"] for r in runs]
            depth_data[(target, row)] = vals
            cells = "".join(
                f"{'-':>16}" if r is None else f"{_fmt(r['IOPS'], 'IOPS'):>8} {r['p50']:4.0f}us" for r in runs
            )
            print(f"{label:<26}{cells}{_ratio(vals[-1], vals[0]):>10}")
            if target == "ours" and vals[0] and vals[-1]:
                goals.append((f"depth 100 within 10% of depth 1 ({title})", vals[-1] >= 0.9 * vals[0]))
        for n, q, o in zip(DEPTHS, depth_data[("qcow2wb", row)], depth_data[("ours", row)], strict=True):
            if q and o:
                goals.append((f">= qemu-nbd qcow2 at depth {n} ({title})", o >= q))

    print("\nGoals")
    for what, ok in goals:
        print(f"  [{'met' if ok else 'NOT met'}] {what}")
    if png is not None:
        _plot(png, main, depth_data)
    return 0


Series = dict[tuple[str, str], list[float | None]]


def _plot(png: Path, main: dict[tuple[str, str], float | None], depth: Series) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not available: no plot written to {png}")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(MAIN_TARGETS)
    for i, (target, label) in enumerate(MAIN_TARGETS):
        ref = [main[("nbdkit", row)] or 1.0 for row, _, _ in MAIN_ROWS]
        vals = [(main[(target, row)] or 0.0) / r for (row, _, _), r in zip(MAIN_ROWS, ref, strict=True)]
        ax1.bar([x + i * width for x in range(len(MAIN_ROWS))], vals, width, label=label)
    ax1.set_xticks([x + 0.4 - width / 2 for x in range(len(MAIN_ROWS))])
    ax1.set_xticklabels([t for _, t, _ in MAIN_ROWS], rotation=20, ha="right")
    ax1.set_ylabel("relative to nbdkit file (= 1)")
    ax1.set_title("NBD targets, fio nbd engine (unix socket)")
    ax1.legend(fontsize=8)
    for (target, row), vals in depth.items():
        style = "-o" if target == "ours" else "--s"
        name = "devmapper thin" if target == "ours" else "qemu-nbd qcow2"
        ax2.plot(DEPTHS, [v or 0 for v in vals], style, label=f"{name} {row.split('-')[-1]}")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xticks(DEPTHS)
    ax2.set_xticklabels([str(n) for n in DEPTHS])
    ax2.set_xlabel("snapshot depth")
    ax2.set_ylabel("IOPS (random 4 KiB reads)")
    ax2.set_title("Reads vs snapshot depth")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"plot written to {png}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("dir", type=Path)
    s.add_argument("--size-mib", type=int, default=1024)
    s.add_argument("--depth", type=int, default=100)
    r = sub.add_parser("report")
    r.add_argument("dir", type=Path)
    r.add_argument("--png", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "setup":
        setup(args.dir, args.size_mib, args.depth)
        return 0
    return report(args.dir, args.png)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
