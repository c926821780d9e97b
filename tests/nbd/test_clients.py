"""Real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio's nbd engine) against our server,
serving an in-memory export and a thin volume of a real pool (through ``devmapper nbd``'s
``ThinExport``).  Each test skips with the reason when its client binary is missing."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nbd_memory import MemoryExport

from conftest import Serve
from devmapper.cli.nbd import ThinExport
from devmapper.export import Export
from devmapper.thin.pool import Pool
from helpers.tools import run_tool
from pool.support import make_pool_files

MiB = 1 << 20
SIZE = 32 * MiB
BLOCK = 64 << 10  # thin data block


@dataclass
class Target:
    kind: str
    export: Export
    uri: str
    pool: Pool | None = None

    def mapped_runs(self) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) runs the backend itself says are allocated."""
        if self.pool is None:
            assert isinstance(self.export, MemoryExport)
            return [(o, n, not hole) for o, n, hole in self.export.holes()]
        assert isinstance(self.export, ThinExport)
        mapped = {v for v, _b, _t in self.pool.md.mappings(self.export.volume.dev_id)}
        runs: list[tuple[int, int, bool]] = []
        for v in range(SIZE // BLOCK):
            data = v in mapped
            if runs and runs[-1][2] == data:
                o, n, _ = runs[-1]
                runs[-1] = (o, n + BLOCK, data)
            else:
                runs.append((v * BLOCK, BLOCK, data))
        return runs


@pytest.fixture(params=["memory", "thin"])
def target(request: pytest.FixtureRequest, serve: Serve, tmp_path: Path) -> Iterator[Target]:
    pool = None
    export: Any
    if request.param == "memory":
        export = MemoryExport(SIZE, "vol", grain=BLOCK)
    else:
        files = make_pool_files(tmp_path / "pool", data_blocks=2 * SIZE // BLOCK)
        pool = files.open()
        pool.create_thin(0)
        export = ThinExport(pool.open_thin(0, SIZE // 512), "vol")
    _server, path = serve({"vol": export})
    yield Target(str(request.param), export, f"nbd+unix:///vol?socket={path}", pool)
    if pool is not None:
        _server.shutdown()
        export.close()
        pool.close()
        files.check()


def nbdinfo_map(uri: str) -> list[tuple[int, int, bool]]:
    out = run_tool(["nbdinfo", "--map", "--json", uri]).stdout
    return [(e["offset"], e["length"], not e["type"] & 1) for e in json.loads(out)]


def qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = run_tool([*args, uri])
    assert "Pattern verification failed" not in proc.stdout + proc.stderr, proc.stdout
    return proc.stdout


def test_qemu_img_info(target: Target) -> None:
    info = json.loads(run_tool(["qemu-img", "info", "--output=json", target.uri]).stdout)
    assert info["virtual-size"] == SIZE
    assert info["format"] == "raw"


def test_qemu_io_patterns_and_map(target: Target) -> None:
    qemu_io(target.uri, "write -P 0xab 1M 200k", "write -P 0x5c 8M 64k", "write -z 20M 128k",
            "write -P 0x11 30M 4k")
    qemu_io(target.uri, "read -P 0xab 1M 200k", "read -P 0x5c 8M 64k", "read -P 0 20M 128k", "read -P 0x11 30M 4k",
            "read -P 0 0 1M", "read -P 0 10M 1M")
    assert target.export.read(1 * MiB, 4) == b"\xab" * 4
    # the client's view of allocation equals the backend's own mappings
    assert nbdinfo_map(target.uri) == target.mapped_runs()
    qemu_io(target.uri, "discard 8M 64k")
    assert nbdinfo_map(target.uri) == target.mapped_runs()
    assert not any(d for o, n, d in target.mapped_runs() if o <= 8 * MiB < o + n)


def _sparse_image(path: Path) -> None:
    rng = random.Random(5)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for _ in range(40):
            f.seek(rng.randrange(SIZE // 4096) * 4096)
            f.write(rng.randbytes(rng.choice([4096, 65536, 200_000])))


def test_qemu_img_convert_and_compare(target: Target, tmp_path: Path) -> None:
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    _sparse_image(src)
    run_tool(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), target.uri])
    run_tool(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), target.uri])
    run_tool(["qemu-img", "convert", "-f", "raw", "-O", "raw", target.uri, str(back)])
    assert src.read_bytes() == back.read_bytes()
    # sparse source -> holes stay holes on our side (qemu-img zeroes or skips them)
    data = sum(n for _o, n, d in nbdinfo_map(target.uri) if d)
    assert data < SIZE // 2


def test_nbdcopy_round_trip(target: Target, tmp_path: Path) -> None:
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    _sparse_image(src)
    run_tool(["nbdcopy", str(src), target.uri])
    run_tool(["nbdcopy", target.uri, str(back)])
    assert src.read_bytes() == back.read_bytes()
    run_tool(["nbdcopy", "--flush", "--request-size=1048576", "--requests=16", target.uri, "null:"])


def test_fio_nbd_engine_verify(target: Target) -> None:
    args = ["fio", "--name=verify", "--ioengine=nbd", f"--uri={target.uri}", "--rw=randwrite", "--bs=4k",
            "--size=8M", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
            "--verify_state_save=0"]
    run_tool(args)
    seq = ["fio", "--name=seq", "--ioengine=nbd", f"--uri={target.uri}", "--rw=write", "--bs=1M", "--size=16M",
           "--offset=16M", "--iodepth=4", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0"]
    run_tool(seq)


def test_nbdinfo_list_and_details(target: Target) -> None:
    out = json.loads(run_tool(["nbdinfo", "--list", "--json", target.uri]).stdout)
    (export,) = out["exports"]
    assert export["export-name"] == "vol"
    assert export["export-size"] == SIZE
    assert "base:allocation" in export["contexts"]
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[flag] is True, flag


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux")
def test_nbdcopy_multi_conn(target: Target, tmp_path: Path) -> None:
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(random.Random(9).randbytes(SIZE))
    run_tool(["nbdcopy", "--connections=4", str(src), target.uri])
    run_tool(["nbdcopy", "--connections=4", target.uri, str(back)])
    assert src.read_bytes() == back.read_bytes()
