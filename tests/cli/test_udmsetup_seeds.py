"""The seeds' dmsetup sequences, run with udmsetup in dmsetup's place (up to their mkfs/mount steps).

Each test follows one blog post command by command -- sparse files, loop devices (or the files
themselves), the pool table, ``create_thin``/``create_snap`` messages, thin tables, suspend/resume
around snapshots, the grow-by-reloading-a-bigger-table trick of seed 001 -- and checks that every
command succeeds and that ``table``/``status`` print what the kernel would print.  Where the seeds
mount a filesystem we write recognisable bytes through the daemon instead.  At the end the daemon
stops cleanly and ``thin_check`` judges the pool metadata.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from control.support import Backing, Udm, backing_fixture, udm_fixture  # noqa: F401 - fixtures
from helpers.tools import require_tool

GiB = 1 << 30
BASE = b"hello world, I am a base\n"


def thin_check(path: str) -> None:
    tool = require_tool("thin_check")
    proc = subprocess.run([tool, path], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def pool_status(status: str) -> re.Match[str]:
    m = re.fullmatch(
        r"0 (\d+) thin-pool (\d+) (\d+)/(\d+) (\d+)/(\d+) - rw discard_passdown queue_if_no_space - (\d+) \n", status
    )
    assert m is not None, repr(status)
    return m


def write_block(u: Udm, device: str, offset: int, data: bytes) -> None:
    with u.client() as c:
        c.write(device, offset, data.ljust(4096, b"\0"), fua=True)


def read_block(u: Udm, device: str, offset: int) -> bytes:
    with u.client() as c:
        return c.read(device, offset, 4096)


def test_seed_002_pool_thin_and_snapshots_of_snapshots(udm: Udm, backing: Backing) -> None:
    data = backing.sparse("data.img", 10 * GiB + 1024)  # dd bs=1K count=1 seek=10M
    meta = backing.sparse("meta.data.img", 1024 * GiB + 1024)  # dd bs=1K count=1 seek=1G
    pool_table = f"0 20971522 thin-pool {meta} {data} 128 65536 1 skip_block_zeroing"
    assert udm.ok("create", "hchen-thin-pool", "--table", pool_table) == ""
    dm_meta, dm_data = backing.devno("meta.data.img"), backing.devno("data.img")
    assert udm.ok("table", "hchen-thin-pool") == (
        f"0 20971522 thin-pool {dm_meta} {dm_data} 128 65536 1 skip_block_zeroing \n"
    )
    m = pool_status(udm.ok("status", "hchen-thin-pool"))
    assert (m[1], m[2], m[4], m[5], m[6], m[7]) == ("20971522", "0", "4161600", "0", "163840", "1024")

    assert udm.ok("message", "/dev/mapper/hchen-thin-pool", "0", "create_thin 0") == ""
    udm.ok("create", "hchen-thin-volumn-001", "--table", "0 2097152 thin /dev/mapper/hchen-thin-pool 0")
    assert udm.ok("table", "hchen-thin-volumn-001") == "0 2097152 thin 253:0 0\n"
    assert udm.ok("status", "hchen-thin-volumn-001") == "0 2097152 thin 0 -\n"
    write_block(udm, "hchen-thin-volumn-001", 0, BASE)  # stands for mkfs + "hello world" in id.txt
    assert udm.ok("status", "hchen-thin-volumn-001") == "0 2097152 thin 128 127\n"

    udm.ok("message", "/dev/mapper/hchen-thin-pool", "0", "create_snap 1 0")
    udm.ok("create", "mysnap1", "--table", "0 2097152 thin /dev/mapper/hchen-thin-pool 1")
    assert read_block(udm, "mysnap1", 0).startswith(BASE)
    write_block(udm, "mysnap1", 0, BASE + b"I am snap1\n")
    assert read_block(udm, "hchen-thin-volumn-001", 0).rstrip(b"\0") == BASE  # the base is untouched

    udm.ok("message", "/dev/mapper/hchen-thin-pool", "0", "create_snap 2 1")
    udm.ok("create", "mysnap2", "--table", "0 2097152 thin /dev/mapper/hchen-thin-pool 2")
    assert read_block(udm, "mysnap2", 0).rstrip(b"\0") == BASE + b"I am snap1\n"

    # The Docker part: snapshot a device by id (Docker's base device is 24; we create it first).
    udm.ok("message", "hchen-thin-pool", "0", "create_thin 24")
    udm.ok("message", "/dev/mapper/hchen-thin-pool", "0", "create_snap 1024 24")
    udm.ok("create", "dockersnap", "--table", "0 20971520 thin /dev/mapper/hchen-thin-pool 1024")
    assert udm.ok("table", "dockersnap") == "0 20971520 thin 253:0 1024\n"
    assert udm.ok("ls") == (
        "dockersnap\t(253:4)\nhchen-thin-pool\t(253:0)\nhchen-thin-volumn-001\t(253:1)\n"
        "mysnap1\t(253:2)\nmysnap2\t(253:3)\n"
    )
    m = pool_status(udm.ok("status", "hchen-thin-pool"))
    assert m[2] == "0" and m[5] == "2"  # trans id 0; the base block and snap1's copy
    udm.stop()
    thin_check(str(backing.file("meta.data.img")))


def test_seed_003_docker_pool_tables(udm: Udm, backing: Backing) -> None:
    for name in ("centos-root", "centos-swap"):  # the host's own LVs take 253:0 and 253:1 in the seed
        udm.ok("create", name, "--table", f"0 2048 linear {backing.sparse(name, 1 << 20)} 0")
    data = backing.sparse("data", 100 * GiB)
    meta = backing.sparse("metadata", 2 * GiB)
    pool = "docker-253:1-138011042-pool"
    udm.ok("create", pool, "--table", f"0 209715200 thin-pool {meta} {data} 128 32768 1 skip_block_zeroing")
    assert udm.ok("table", pool) == (
        f"0 209715200 thin-pool {backing.devno('metadata')} {backing.devno('data')} 128 32768 1 skip_block_zeroing \n"
    )
    udm.ok("message", f"/dev/mapper/{pool}", "0", "create_thin 166")
    thin = "docker-253:1-138011042-641cdebd22b55f2656a560cd250e661ab181dcf2f5c5b78dc306df7ce62231f3"
    udm.ok("create", thin, "--table", f"0 20971520 thin /dev/mapper/{pool} 166")
    assert udm.ok("table", thin) == "0 20971520 thin 253:2 166\n"  # exactly the seed's line
    pool_line = udm.ok("table", pool)  # with loop devices it names them 7:N: those load back too
    udm.ok("load", pool, stdin=pool_line)
    udm.ok("resume", pool)
    assert udm.ok("table", pool) == pool_line

    # The yy_thin_pool snapshot recipe: suspend the origin, create_snap, resume, activate the snapshot.
    yy_meta, yy_data = backing.sparse("yy_meta", 64 << 20), backing.sparse("yy_data", 80 << 20)
    udm.ok("create", "yy_thin_pool", "--table", f"0 163840 thin-pool {yy_meta} {yy_data} 128 0")
    udm.ok("message", "/dev/mapper/yy_thin_pool", "0", "create_thin 0")
    udm.ok("create", "thin", "--table", "0 40960 thin /dev/mapper/yy_thin_pool 0")
    write_block(udm, "thin", 131072, b"origin data")
    udm.ok("suspend", "/dev/mapper/thin")
    assert "State:             SUSPENDED" in udm.ok("info", "thin")
    udm.ok("message", "/dev/mapper/yy_thin_pool", "0", "create_snap 1 0")
    udm.ok("resume", "/dev/mapper/thin")
    udm.ok("create", "snap", "--table", "0 40960 thin /dev/mapper/yy_thin_pool 1")
    assert read_block(udm, "snap", 131072).rstrip(b"\0") == b"origin data"
    assert udm.ok("status", "snap") == "0 40960 thin 128 383\n"
    udm.stop()
    thin_check(str(backing.file("metadata")))
    thin_check(str(backing.file("yy_meta")))


def test_seed_004_walkthrough_and_basic_commands(udm: Udm, backing: Backing) -> None:
    meta = backing.sparse("metadata", 2 * GiB)  # dd bs=1 count=0 seek=2G
    data = backing.sparse("data", 100 * GiB)
    udm.ok("create", "pool", "--table", f"0 20971520 thin-pool {meta} {data} 128 32768")
    devs = f"{backing.devno('metadata')} {backing.devno('data')}"
    assert udm.ok("table", "pool") == f"0 20971520 thin-pool {devs} 128 32768 0 \n"
    m = pool_status(udm.ok("status", "pool"))
    assert (m[4], m[6], m[7]) == ("524288", "163840", "1024")
    udm.ok("message", "/dev/mapper/pool", "0", "create_thin 0")
    udm.ok("create", "thin", "--table", "0 2097152 thin /dev/mapper/pool 0")
    write_block(udm, "thin", 0, b"before the snapshot")
    udm.ok("suspend", "/dev/mapper/thin")
    udm.ok("message", "/dev/mapper/pool", "0", "create_snap 1 0")
    udm.ok("resume", "/dev/mapper/thin")
    udm.ok("create", "snap", "--table", "0 2097152 thin /dev/mapper/pool 1")
    write_block(udm, "thin", 0, b"after the snapshot")
    assert read_block(udm, "snap", 0).rstrip(b"\0") == b"before the snapshot"
    assert pool_status(udm.ok("status", "pool"))[5] == "2"

    # "dmsetup create mydevice --table '0 209715200 linear /dev/sdc1 2048'" and the commands after it.
    sdc1 = backing.sparse("sdc1", 100 * GiB + (1 << 20))
    udm.ok("create", "mydevice", "--table", f"0 209715200 linear {sdc1} 2048")
    dev = backing.devno("sdc1")
    deps = f"({dev.replace(':', ', ')})" if backing.kind == "loop" else f"({dev})"
    assert udm.ok("deps", "mydevice") == f"1 dependencies\t: {deps}\n"
    assert udm.ok("info", "mydevice") == (
        "Name:              mydevice\nState:             ACTIVE\nRead Ahead:        256\n"
        "Tables present:    LIVE\nOpen count:        0\nEvent number:      0\n"
        "Major, minor:      253, 3\nNumber of targets: 1\n\n"
    )
    assert udm.ok("table", "mydevice") == f"0 209715200 linear {dev} 2048\n"
    assert udm.ok("status", "mydevice") == "0 209715200 linear \n"
    assert udm.ok("ls") == "mydevice\t(253:3)\npool\t(253:0)\nsnap\t(253:2)\nthin\t(253:1)\n"
    udm.ok("suspend", "mydevice")
    udm.ok("resume", "mydevice")
    udm.ok("remove", "mydevice")
    udm.ok("remove", "snap", "thin")
    udm.ok("message", "pool", "0", "delete 1")
    assert pool_status(udm.ok("status", "pool"))[5] == "1"
    udm.ok("remove", "pool")
    assert udm.ok("ls") == "No devices found\n"
    thin_check(str(backing.file("metadata")))


@pytest.mark.parametrize("via_sed", [False, True])
def test_seed_001_grow_a_volume_by_loading_a_bigger_table(udm: Udm, backing: Backing, via_sed: bool) -> None:
    data, meta = backing.sparse("data", 100 * GiB), backing.sparse("metadata", 2 * GiB)
    udm.ok("create", "docker-0:37-1471009-pool", "--table",
           f"0 209715200 thin-pool {meta} {data} 128 32768 1 skip_block_zeroing")
    udm.ok("message", "docker-0:37-1471009-pool", "0", "create_thin 7")
    dev = "docker-0:37-1471009-4ab0bdde0a0dd663d35993e401055ee0a66c63892ba960680b3386938bda3603"
    udm.ok("create", dev, "--table", "0 20971520 thin /dev/mapper/docker-0:37-1471009-pool 7")
    old = udm.ok("table", dev)
    assert old == "0 20971520 thin 253:0 7\n"
    write_block(udm, dev, 10 * GiB - 4096, b"last block of the 10 GiB volume")
    new_len = 42 * 1024 * 1024 * 1024 // 512
    assert new_len == 88080384
    if via_sed:  # dmsetup table $DEV | sed "s/0 [0-9]* thin/0 $((42*1024*1024*1024/512)) thin/" | dmsetup load $DEV
        udm.ok("load", dev, stdin=re.sub(r"0 [0-9]* thin", f"0 {new_len} thin", old))
    else:  # echo 0 88080384 thin 254:0 7 | dmsetup load $DEV
        udm.ok("load", dev, stdin="0 88080384 thin 253:0 7\n")
    assert udm.ok("table", dev) == old  # not live until resumed
    assert "Tables present:    LIVE & INACTIVE" in udm.ok("info", dev)
    udm.ok("resume", dev)
    assert udm.ok("table", dev) == "0 88080384 thin 253:0 7\n"
    write_block(udm, dev, 41 * GiB, b"beyond the old end")
    assert read_block(udm, dev, 41 * GiB).rstrip(b"\0") == b"beyond the old end"
    assert read_block(udm, dev, 10 * GiB - 4096).rstrip(b"\0") == b"last block of the 10 GiB volume"
    assert udm.ok("status", dev) == f"0 88080384 thin 256 {41 * GiB // 512 + 127}\n"
    udm.stop()
    thin_check(str(backing.file("metadata")))
