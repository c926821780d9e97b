"""The daemon serves every mapped device over NBD on <runtime dir>/nbd.sock, judged by real clients."""

from __future__ import annotations

import subprocess

from control.support import Backing, Udm
from helpers.tools import require_tool

MiB = 1 << 20


def _pool_and_thin(u: Udm, b: Backing) -> None:
    meta, data = b.sparse("meta", 16 * MiB), b.sparse("data", 256 * MiB)
    u.ok("create", "pool", "--table", f"0 524288 thin-pool {meta} {data} 128 0")
    u.ok("message", "pool", "0", "create_thin 0")
    u.ok("create", "vol", "--table", "0 65536 thin /dev/mapper/pool 0")  # 32 MiB


def _run(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_thin_volume_is_an_nbd_export_with_holes_where_unprovisioned(udm: Udm, backing: Backing) -> None:
    qemu_io, nbdinfo = require_tool("qemu-io"), require_tool("nbdinfo")
    _pool_and_thin(udm, backing)
    uri = f"nbd+unix:///vol?socket={udm.runtime}/nbd.sock"
    _run([qemu_io, "-f", "raw", "-c", "write -P 0xab 1M 1M", uri])
    _run([qemu_io, "-f", "raw", "-c", "read -P 0xab 1M 1M", "-c", "read -P 0 0 1M", uri])
    extents = [line.split() for line in _run([nbdinfo, "--map", uri]).splitlines()]
    assert [(int(e[0]), int(e[1]), e[3]) for e in extents] == [
        (0, MiB, "hole,zero"), (MiB, MiB, "data"), (2 * MiB, 30 * MiB, "hole,zero")
    ]
    listed = _run([nbdinfo, "--list", "--json", f"nbd+unix://?socket={udm.runtime}/nbd.sock"])
    assert '"vol"' in listed and '"pool"' in listed
    # the data went through the pool: the thin's status counts the 16 provisioned 64 KiB blocks
    assert udm.ok("status", "vol").split()[3] == str(16 * 128)


def test_removed_device_is_no_longer_exported(udm: Udm, backing: Backing) -> None:
    nbdinfo = require_tool("nbdinfo")
    _pool_and_thin(udm, backing)
    udm.ok("remove", "vol")
    proc = subprocess.run([nbdinfo, f"nbd+unix:///vol?socket={udm.runtime}/nbd.sock"], capture_output=True,
                          text=True, check=False, timeout=60)
    assert proc.returncode != 0
