"""Child process of test_crash: run the crash workload on a pool until killed.

    python crash_worker.py <directory> <seed>

Formats a pool in <directory> (files ``meta`` and ``data`` must exist), creates the initial thin
devices, prints ``READY``, then before op i prints ``S i`` and after a flushing op ``F i`` completes
prints ``F i`` (stdout, flushed per line).  It never exits on its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devmapper.thin.pool import Pool
from devmapper.thin.status import PoolFeatures
from devmapper.thin.volume import ThinVolume
from pool.crash_workload import INITIAL_DEVICES, Op, operations, params, payload


def run_op(pool: Pool, vols: dict[int, ThinVolume], op: Op, sectors: int) -> None:
    vol = vols.get(op.dev)
    if op.kind == "write":
        vols[op.dev].write(op.offset, payload(op), fua=op.fua)
    elif op.kind == "discard":
        vols[op.dev].discard(op.offset, op.length)
    elif op.kind == "zeroes":
        vols[op.dev].write_zeroes(op.offset, op.length, fua=op.fua)
    elif op.kind == "flush":
        vols[op.dev].flush()
    elif op.kind == "snap":
        pool.message(f"create_snap {op.new} {op.dev}")
        vols[op.new] = pool.open_thin(op.new, sectors)
    elif op.kind == "delete":
        assert vol is not None
        vols.pop(op.dev).close()
        pool.message(f"delete {op.dev}")


def main(directory: str, seed: int) -> None:
    p = params(seed)
    root = Path(directory)
    features = PoolFeatures(no_discard_passdown=not p.passdown)
    pool = Pool.open(root / "meta", root / "data", p.block_sectors, features=features, commit_period=p.commit_period)
    sectors = p.vol_size // 512
    for dev in INITIAL_DEVICES:
        pool.create_thin(dev)
    vols = {dev: pool.open_thin(dev, sectors) for dev in INITIAL_DEVICES}
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    for i, op in enumerate(operations(seed)):
        out.write(f"S {i}\n")
        out.flush()
        run_op(pool, vols, op, sectors)
        if op.flushes:
            out.write(f"F {i}\n")
            out.flush()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
