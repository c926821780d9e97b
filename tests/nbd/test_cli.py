"""``devmapper nbd``: serve a file and thin volumes of a pool until SIGTERM, then close cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers.tools import run_tool
from pool.support import make_pool_files

MiB = 1 << 20


@contextmanager
def devmapper_nbd(*args: str) -> Iterator[list[str]]:
    """Run ``devmapper nbd ARGS``; yields the URIs it prints; SIGTERM at the end must exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "devmapper.cli.main", "nbd", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        uris: list[str] = []
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        uris.append(line.split()[0])
        yield uris
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


@pytest.fixture
def sockdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="nbdc-") as d:
        yield d


def test_serves_a_file(tmp_path: Path, sockdir: str) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"\x77" * 65536)
    with devmapper_nbd("--file", str(img), "--socket", f"{sockdir}/s") as (uri,):
        assert uri == f"nbd+unix:///disk.img?socket={sockdir}/s"
        info = json.loads(run_tool(["nbdinfo", "--json", uri]).stdout)
        assert info["exports"][0]["export-size"] == 8 * MiB
        run_tool(["qemu-io", "-f", "raw", "-c", "read -P 0x77 1M 64k", "-c", "write -P 0x12 4M 4k", uri])
        mapped = json.loads(run_tool(["nbdinfo", "--map", "--json", uri]).stdout)
        assert any(e["offset"] <= MiB < e["offset"] + e["length"] and e["type"] == 0 for e in mapped)
    with open(img, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(4096) == b"\x12" * 4096


def test_serves_thin_volumes_of_a_pool(tmp_path: Path, sockdir: str) -> None:
    files = make_pool_files(tmp_path / "pool", data_blocks=512)
    args = ["--metadata", str(files.meta), "--data", str(files.data), "--thin", "0:base", "--thin", "1",
            "--create", "--size", "16M", "--socket", f"{sockdir}/s"]
    with devmapper_nbd(*args) as (uri,):
        assert uri == f"nbd+unix:///base?socket={sockdir}/s"
        run_tool(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M", uri])
        listing = json.loads(run_tool(["nbdinfo", "--list", "--json", uri]).stdout)
        assert sorted(e["export-name"] for e in listing["exports"]) == ["base", "thin1"]
    files.check()  # closed cleanly: thin_check passes
    with devmapper_nbd(*args[:-2], "--read-only", "--socket", f"{sockdir}/s") as (uri,):
        run_tool(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x42 0 1M", uri])
        proc = run_tool(["qemu-io", "-f", "raw", "-c", "write 0 4k", uri], check=False)
        assert "Operation not permitted" in proc.stdout + proc.stderr or proc.returncode != 0


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    env = dict(os.environ)
    for args in ([], ["--file", "x"], ["--metadata", "m", "--socket", "s"]):
        proc = subprocess.run([sys.executable, "-m", "devmapper.cli.main", "nbd", *args],
                              capture_output=True, text=True, env=env, check=False, timeout=60)
        assert proc.returncode != 0 and proc.stderr
