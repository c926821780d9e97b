"""The daemon process: locking, clean shutdown, and SIGKILL in the middle of a workload."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from control.support import Backing, Udm
from devmapper.control.client import Client
from devmapper.control.server import Daemon
from helpers.tools import require_tool

MiB = 1 << 20
BLOCK = 65536


def thin_check(path: Path) -> None:
    proc = subprocess.run([require_tool("thin_check"), str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def block(i: int, generation: int) -> bytes:
    seed = hashlib.sha256(f"{i}:{generation}".encode()).digest()
    return seed * (4096 // len(seed))


def make_pool(u: Udm, b: Backing) -> None:
    meta, data = b.sparse("meta", 16 * MiB), b.sparse("data", 256 * MiB)
    u.ok("create", "pool", "--table", f"0 524288 thin-pool {meta} {data} 128 0")
    u.ok("message", "pool", "0", "create_thin 0")
    u.ok("create", "vol", "--table", "0 1048576 thin /dev/mapper/pool 0")


def test_a_second_daemon_on_the_same_directories_is_refused(udm: Udm) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "devmapper.cli.main", "daemon", "--runtime-dir", str(udm.runtime),
         "--state-dir", str(udm.state)], capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 1
    assert "another devmapper daemon holds" in proc.stderr
    assert udm.ok("ls") == "No devices found\n"  # the first one still serves


def test_clean_shutdown_commits_everything(udm: Udm, backing: Backing) -> None:
    make_pool(udm, backing)
    with udm.client() as c:
        for i in range(20):
            c.write("vol", i * BLOCK, block(i, 0))  # never flushed: the shutdown must commit them
    udm.ok("load", "vol", "--table", "0 2097152 thin /dev/mapper/pool 0")
    udm.ok("suspend", "vol")
    before = (udm.ok("table"), udm.ok("table", "--inactive"), udm.ok("info"))
    udm.stop()
    assert not (udm.runtime / "control").exists() and not (udm.runtime / "daemon.pid").exists()
    thin_check(backing.file("meta"))
    udm.start()
    assert (udm.ok("table"), udm.ok("table", "--inactive"), udm.ok("info")) == before
    udm.ok("resume", "vol")
    with udm.client() as c:
        for i in range(20):
            assert c.read("vol", i * BLOCK, 4096) == block(i, 0)


def test_sigkill_mid_workload_keeps_flushed_data(udm: Udm, backing: Backing) -> None:
    """Writers acknowledge FUA writes and flushes; the daemon dies at a random point; after a restart
    every acknowledged write reads back, the devices and tables are as they were and thin_check is clean."""
    make_pool(udm, backing)
    udm.ok("message", "pool", "0", "create_snap 1 0")
    udm.ok("create", "snap", "--table", "0 1048576 thin /dev/mapper/pool 1")
    tables = udm.ok("table")
    durable: dict[tuple[str, int], bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def worker(device: str, region: int) -> None:
        """Each generation writes 8 new 4 KiB pieces (never an offset twice), half of them FUA, then
        flushes; only then are they durable."""
        try:
            with Client.open(udm.runtime) as c:
                generation = 0
                while not stop.is_set() and generation < 1000:
                    generation += 1
                    pending = {}
                    for i in range(8):
                        offset = region * 32 * MiB + (generation * 8 + i) * 4096
                        pending[(device, offset)] = data = block(region * 8 + i, generation)
                        c.write(device, offset, data, fua=(i % 2 == 0))
                    c.flush(device)
                    with lock:
                        durable.update(pending)
        except Exception:
            pass  # the daemon died under us

    threads = [threading.Thread(target=worker, args=(d, r)) for d, r in (("vol", 0), ("vol", 1), ("snap", 2))]
    for t in threads:
        t.start()
    while len(durable) < 200:
        threading.Event().wait(0.02)
    udm.kill(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    thin_check(backing.file("meta"))  # the last commit is intact on disk
    udm.start()
    assert udm.ok("table") == tables
    with udm.client() as c:
        for (device, offset), data in sorted(durable.items()):
            assert c.read(device, offset, len(data)) == data, (device, offset)
    udm.stop()
    thin_check(backing.file("meta"))


def test_restart_after_sigkill_replaces_the_stale_socket(udm: Udm) -> None:
    udm.ok("create", "z", "--table", "0 8 zero")
    pid = udm.pid()
    udm.kill()
    assert (udm.runtime / "control").exists()  # left behind by SIGKILL
    udm.start()
    assert udm.pid() != pid
    assert udm.ok("ls") == "z\t(253:0)\n"
    assert os.stat(udm.runtime / "control").st_mode & 0o777 == 0o600


def test_in_thread_daemon_with_a_runtime_path_too_long_for_a_socket(tmp_path: Path) -> None:
    runtime = tmp_path / ("r" * 60) / ("u" * 60)
    assert len(str(runtime / "control")) > 108
    daemon = Daemon(runtime, tmp_path / "state")
    daemon.start()
    thread = threading.Thread(target=daemon.serve_forever)
    thread.start()
    try:
        with Client.open(runtime) as c:
            assert c.call("ping")["pid"] == os.getpid()
            c.call("create", name="z", table=[[0, 8, "zero", ""]])
            assert c.read("z", 0, 4) == bytes(4)
            c.call("shutdown")
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        daemon.request_shutdown()
        thread.join(timeout=30)
        daemon.close()
    assert not (runtime / "control").exists()
