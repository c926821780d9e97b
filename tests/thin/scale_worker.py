"""Child process for test_scale: 100 chained snapshots, 10,000 new mappings each plus 200 overwrites
(about 1,020,000 mappings written), then prints the peak RSS (VmHWM) in KiB."""

from __future__ import annotations

import random
import resource
import sys

from devmapper.blockdev.file import FileBlockDevice
from devmapper.thin.metadata import PoolMetadata


def main(path: str) -> None:
    pmd = PoolMetadata.format(FileBlockDevice(path), 128, 1_200_000)
    pmd.create_thin(0)
    rng = random.Random(0)
    written = 0
    for dev in range(100):
        if dev:
            pmd.create_snap(dev, dev - 1)
        base = dev * 10_000
        for v in range(base, base + 10_000):
            pmd.insert(dev, v, pmd.alloc_data_block())
        for v in rng.sample(range(base + 1), min(200, base + 1)):
            pmd.insert(dev, v, pmd.alloc_data_block())
        written += 10_000 + min(200, base + 1)
        if dev % 10 == 9:
            pmd.commit()
    pmd.close()
    print(written, peak_rss_kib())


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM).  Not getrusage's ru_maxrss: Linux carries that across
    execve, so it would include the memory of the (forked) test process that started us."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


if __name__ == "__main__":
    main(sys.argv[1])
