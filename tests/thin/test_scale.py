"""Scale: about 1,000,000 mappings across 100 snapshots; thin_check clean; memory bounded.

The engine caches at most 4,096 clean and 8,192 dirty decoded metadata blocks, so its memory does not
grow with the pool: the child's peak RSS stays near 100 MiB (measured: 99 MiB) however many mappings
it writes.  The bound asserted here, 300 MiB, is what a leak of decoded nodes (8,000 leaves of about
20 KiB each) would exceed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from devmapper.blockdev.file import FileBlockDevice
from devmapper.thin.check import check_metadata
from helpers.tools import require_tool


def test_a_million_mappings_across_100_snapshots(tmp_path: Path) -> None:
    thin_check = require_tool("thin_check")
    meta = tmp_path / "meta"
    with open(meta, "wb") as f:
        f.truncate(512 << 20)
    worker = Path(__file__).with_name("scale_worker.py")
    out = subprocess.run([sys.executable, str(worker), str(meta)], capture_output=True, text=True, check=True,
                         timeout=600).stdout.split()
    written, peak_kib = int(out[0]), int(out[1])
    assert written >= 1_000_000
    assert peak_kib < 300 * 1024, f"peak RSS {peak_kib // 1024} MiB"
    proc = subprocess.run([thin_check, str(meta)], capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = check_metadata(FileBlockDevice(meta, read_only=True))
    assert report.ok, [d.message for d in report.defects[:5]]
    assert report.nr_devices == 100
