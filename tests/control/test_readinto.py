"""``readinto`` of mapped devices: every target fills its slice of the caller's buffer, and the NBD
exports of the daemon (``DeviceExports``) offer it, so the server's large reads avoid copies."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from control.support import sparse
from devmapper.control.device import DeviceView
from devmapper.control.errors import DmError
from devmapper.control.manager import DeviceManager, DeviceRef
from devmapper.control.nbd_exports import DeviceExports
from devmapper.control.table import parse_table
from devmapper.thin.volume import ThinVolume

MiB = 1 << 20


def readinto(view: DeviceView, offset: int, length: int) -> bytes:
    buf = bytearray(b"\xee" * length)  # garbage: every byte must be overwritten
    view.readinto(offset, buf)
    return bytes(buf)


def test_readinto_matches_read_across_linear_zero_striped_segments(mgr: DeviceManager, tmp_path: Path) -> None:
    a, b, c = (sparse(tmp_path / n, 4 * MiB) for n in "abc")
    mgr.create("mix", table=parse_table(
        f"0 1024 linear {a} 2048\n1024 512 zero\n1536 2048 striped 2 8 {b} 16 {c} 0\n3584 8 error"))
    rng = random.Random(3)
    for _ in range(50):
        off = rng.randrange(0, 3584 * 512 - 70000)
        mgr.write(DeviceRef(name="mix"), off, rng.randbytes(rng.randrange(1, 70000)))
    view = DeviceView(mgr.peek(DeviceRef(name="mix")))
    for _ in range(50):
        off = rng.randrange(0, 3584 * 512 - 1)
        n = rng.randrange(1, 3584 * 512 - off)
        assert readinto(view, off, n) == view.read(off, n)
    with pytest.raises(DmError, match="I/O error"):
        readinto(view, 3584 * 512 - 512, 1024)  # reaches into the error target
    with pytest.raises(DmError, match="beyond the end"):
        readinto(view, 3592 * 512, 1)


def test_thin_exports_read_straight_into_the_buffer(
    mgr: DeviceManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = sparse(tmp_path / "disk", 80 * MiB)
    mgr.create("meta", table=parse_table(f"0 16384 linear {disk} 0"))
    mgr.create("data", table=parse_table(f"0 131072 linear {disk} 16384"))  # the pool's data is stacked
    mgr.create("pool", table=parse_table("0 131072 thin-pool /dev/mapper/meta 253:1 128 0"))
    mgr.message(DeviceRef(name="pool"), 0, "create_thin 0")
    mgr.create("thin", table=parse_table("0 8192 thin 253:2 0"))  # 4 MiB
    payload = os.urandom(MiB + 4096)
    mgr.write(DeviceRef(name="thin"), 3 * 65536 + 512, payload)
    export = DeviceExports(mgr).lookup("thin")
    assert isinstance(export, DeviceView) and callable(getattr(export, "readinto", None))

    def no_read(*args: object) -> bytes:
        raise AssertionError("readinto went through ThinVolume.read")

    monkeypatch.setattr(ThinVolume, "read", no_read)
    expected = bytes(3 * 65536 + 512) + payload + bytes(4 * MiB - 3 * 65536 - 512 - len(payload))
    assert readinto(export, 0, 4 * MiB) == expected
    assert readinto(export, 65536 - 7, 2 * MiB) == expected[65536 - 7 : 65536 - 7 + 2 * MiB]
    with pytest.raises(DmError, match="beyond the end"):
        readinto(export, 4 * MiB - 512, 1024)
