"""Metadata engine benchmark: insert, lookup and commit rates and metadata size per mapping.

For 10^4, 10^5 and 10^6 mappings (sequential and random virtual blocks on one thin device) it prints
inserts/s, lookups/s, the commit time of the whole batch, the time of a commit after 10^4 further
new mappings, metadata bytes per mapped block, and the kernel's estimate from ``thin_metadata_size``
for the same pool beside it.  Optional PNG plot with --plot (needs matplotlib).

    .venv/bin/python bench/metadata.py [--sizes 10000,100000,1000000] [--plot bench/out/metadata.png]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile
import time

from devmapper.blockdev.file import FileBlockDevice
from devmapper.thin.metadata import PoolMetadata

BLOCK_SECTORS = 128  # 64 KiB data blocks, as Docker and the seeds use


def kernel_estimate_bytes(nr_blocks: int, max_thins: int = 1) -> int | None:
    """thin_metadata_size's estimate for a pool of nr_blocks 64 KiB blocks, in bytes."""
    tool = shutil.which("thin_metadata_size") or "/usr/sbin/thin_metadata_size"
    if not os.path.exists(tool):
        return None
    out = subprocess.run(
        [tool, "-b", "64k", "-s", f"{nr_blocks * 64}k", "-m", str(max_thins), "-u", "b", "-n"],
        capture_output=True, text=True, check=True,
    ).stdout
    return int(float(out.split()[0]))


def run_one(n: int, pattern: str, workdir: str) -> dict[str, float]:
    path = os.path.join(workdir, f"meta-{n}-{pattern}.bin")
    with open(path, "wb") as f:
        f.truncate(max(64 << 20, n * 96))
    pmd = PoolMetadata.format(FileBlockDevice(path), BLOCK_SECTORS, nr_data_blocks=n + 20000)
    pmd.create_thin(0)
    pmd.commit()
    keys = list(range(n))
    if pattern == "random":
        keys = random.Random(n).sample(range(n * 4), n)
    base_used = pmd.msm.nr_allocated

    t0 = time.perf_counter()
    for k in keys:
        pmd.insert(0, k, pmd.alloc_data_block())
    t1 = time.perf_counter()
    pmd.commit()
    t2 = time.perf_counter()
    used = pmd.msm.nr_allocated - base_used
    probe = random.Random(1).sample(keys, min(n, 100000))
    t3 = time.perf_counter()
    for k in probe:
        pmd.lookup(0, k)
    t4 = time.perf_counter()
    top = max(keys) + 1
    for k in range(top, top + 10000):
        pmd.insert(0, k, pmd.alloc_data_block())
    t5 = time.perf_counter()
    pmd.commit()
    t6 = time.perf_counter()
    pmd.close()
    os.unlink(path)
    return {
        "inserts_per_s": n / (t1 - t0),
        "commit_s": t2 - t1,
        "lookups_per_s": len(probe) / (t4 - t3),
        "commit_1e4_s": t6 - t5,
        "bytes_per_mapping": used * 4096 / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--patterns", default="sequential,random")
    ap.add_argument("--plot", help="write a PNG plot here")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dm-bench-") as workdir:
        for n in sizes:
            est = kernel_estimate_bytes(n)
            for pattern in args.patterns.split(","):
                r = run_one(n, pattern, workdir)
                r["kernel_bytes_per_mapping"] = float("nan") if est is None else est / n
                rows.append((n, pattern, r))
    hdr = (f"{'mappings':>9} {'pattern':>10} {'inserts/s':>10} {'lookups/s':>10} {'commit s':>9} "
           f"{'commit+1e4 s':>12} {'meta B/map':>10} {'kernel B/map':>12} {'ratio':>6}")
    print(hdr)
    print("-" * len(hdr))
    for n, pattern, r in rows:
        ratio = r["bytes_per_mapping"] / r["kernel_bytes_per_mapping"]
        print(f"{n:>9} {pattern:>10} {r['inserts_per_s']:>10.0f} {r['lookups_per_s']:>10.0f} "
              f"{r['commit_s']:>9.3f} {r['commit_1e4_s']:>12.3f} {r['bytes_per_mapping']:>10.1f} "
              f"{r['kernel_bytes_per_mapping']:>12.1f} {ratio:>6.2f}")
    if args.plot:
        plot(rows, args.plot)


def plot(rows: list[tuple[int, str, dict[str, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for pattern in sorted({p for _, p, _ in rows}):
        pts = [(n, r) for n, p, r in rows if p == pattern]
        a.plot([n for n, _ in pts], [r["inserts_per_s"] for _, r in pts], marker="o", label=f"insert {pattern}")
        a.plot([n for n, _ in pts], [r["lookups_per_s"] for _, r in pts], marker="x", label=f"lookup {pattern}")
        b.plot([n for n, _ in pts], [r["bytes_per_mapping"] for _, r in pts], marker="o", label=pattern)
    b.plot([n for n, _, _ in rows], [r["kernel_bytes_per_mapping"] for _, _, r in rows], "k--", label="kernel estimate")
    a.set_xscale("log")
    b.set_xscale("log")
    a.set_xlabel("mappings")
    b.set_xlabel("mappings")
    a.set_ylabel("operations/s")
    b.set_ylabel("metadata bytes per mapping")
    a.legend()
    b.legend()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
