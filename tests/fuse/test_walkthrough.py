"""The seeds' walkthrough for real: udmsetup makes a pool on loop devices, thin volumes appear as
``/dev/mapper/NAME`` (a loop device over the daemon's FUSE file), mkfs.ext4/xfs, mount, snapshots
with and without suspend, snapshots of snapshots, growing, busy and deferred removal, teardown and
``thin_check`` on the metadata.  Needs root, /dev/fuse and loop devices (skips otherwise)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fuse.rig import Rig, run
from helpers.tools import require_tool

MiB = 1 << 20
GiB = 1 << 30
SECTORS_PER_MiB = 2048


def make_pool(rig: Rig, pool: str, data_size: int = 4 * GiB) -> str:
    rig.start()
    data = rig.sparse_loop("data.img", data_size)
    meta = rig.sparse_loop("meta.img", 64 * MiB)
    table = f"0 {data_size // 512} thin-pool {meta} {data} 128 32768 1 skip_block_zeroing"
    rig.udm.ok("create", pool, "--table", table)
    return str(rig.tmp / "meta.img")


def thin(rig: Rig, pool: str, name: str, dev_id: int, size_mib: int) -> str:
    rig.udm.ok("create", name, "--table", f"0 {size_mib * SECTORS_PER_MiB} thin /dev/mapper/{pool} {dev_id}")
    return rig.dev(name)


def has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def thin_check(meta: str) -> None:
    proc = run(require_tool("thin_check"), meta, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_seed_walkthrough_ext4_snapshots_grow_and_teardown(rig_dev_mapper: Rig) -> None:
    rig = rig_dev_mapper
    tag = f"udmt{os.getpid()}"
    pool, base, snap1, snap2, snap3 = (f"{tag}-{n}" for n in ("pool", "base", "snap1", "snap2", "snap3"))
    meta = make_pool(rig, pool)
    rig.udm.ok("message", rig.ref(pool), "0", "create_thin 0")
    dev = thin(rig, pool, base, 0, 256)
    assert Path(dev).resolve().name.startswith("loop")
    assert (rig.files / base).stat().st_size == 256 * MiB
    run("mkfs.ext4", "-q", dev)
    mnt = rig.mount(dev, "base")
    (mnt / "id.txt").write_text("hello world\n")
    run("sync")

    # snapshot with suspend/resume around it (the seed's way)
    rig.udm.ok("suspend", base)
    rig.udm.ok("message", rig.ref(pool), "0", "create_snap 1 0")
    rig.udm.ok("resume", base)
    mnt1 = rig.mount(thin(rig, pool, snap1, 1, 256), "snap1")
    assert (mnt1 / "id.txt").read_text() == "hello world\n"
    (mnt1 / "id.txt").write_text("I am snap1\n")
    (mnt / "base-only.txt").write_text("base after snap1\n")
    run("sync")
    assert (mnt / "id.txt").read_text() == "hello world\n"  # isolation: snapshot -> origin
    assert not (mnt1 / "base-only.txt").exists()  # and origin -> snapshot

    # snapshot without suspend (of a synced, mounted origin), then a snapshot of the snapshot
    rig.udm.ok("message", rig.ref(pool), "0", "create_snap 2 0")
    rig.udm.ok("message", rig.ref(pool), "0", "create_snap 3 1")
    mnt2 = rig.mount(thin(rig, pool, snap2, 2, 256), "snap2")
    mnt3 = rig.mount(thin(rig, pool, snap3, 3, 256), "snap3")
    assert (mnt2 / "id.txt").read_text() == "hello world\n"
    assert (mnt2 / "base-only.txt").read_text() == "base after snap1\n"
    assert (mnt3 / "id.txt").read_text() == "I am snap1\n"
    assert not (mnt3 / "base-only.txt").exists()
    (mnt3 / "id.txt").write_text("I am snap3\n")
    run("sync")
    assert (mnt1 / "id.txt").read_text() == "I am snap1\n"

    # grow the origin: load a bigger table, resume, resize2fs online
    before = os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize
    rig.udm.ok("load", base, "--table", f"0 {512 * SECTORS_PER_MiB} thin /dev/mapper/{pool} 0")
    rig.udm.ok("resume", base)
    assert (rig.files / base).stat().st_size == 512 * MiB
    assert int(run("blockdev", "--getsize64", dev).stdout) == 512 * MiB
    if has_cap_sys_resource():
        run("resize2fs", dev)  # online, as in the seed
    else:  # ext4's online resize ioctl needs CAP_SYS_RESOURCE, which this sandbox withholds even from root
        rig.umount(mnt)
        run("e2fsck", "-f", "-y", dev)
        run("resize2fs", dev)
        mnt = rig.mount(dev, "base")
    after = os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize
    assert after > before + 200 * MiB
    assert (mnt / "id.txt").read_text() == "hello world\n"

    # teardown
    for where in list(reversed(rig.mounts)):
        rig.umount(where)
    for name in (snap3, snap2, snap1, base):
        rig.udm.ok("remove", name)
        assert not Path(rig.dev(name)).exists()
    rig.udm.ok("remove", pool)
    assert not (rig.files / pool).exists()
    rig.stop_daemon()
    thin_check(meta)


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_filesystem_survives_fio_verify_and_remount(rig: Rig, fs: str) -> None:
    fio = require_tool("fio")
    meta = make_pool(rig, "pool")
    rig.udm.ok("message", rig.ref("pool"), "0", "create_thin 0")
    dev = thin(rig, "pool", "vol", 0, 512)
    run(f"mkfs.{fs}", "-q", *(["-f"] if fs == "xfs" else []), dev)
    mnt = rig.mount(dev, "vol")
    job = [fio, "--name=verify", f"--directory={mnt}", "--size=32M", "--bs=4k", "--rw=randwrite",
           "--ioengine=psync", "--direct=1", "--verify=crc32c", "--randseed=1234", "--do_verify=1",
           "--verify_fatal=1", "--verify_state_save=0"]  # no state file in the working directory
    proc = run(*job, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rig.umount(mnt)
    mnt = rig.mount(dev, "vol")
    proc = run(*job, "--verify_only", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify" in proc.stdout and "err= 0" in proc.stdout
    rig.umount(mnt)
    rig.udm.ok("remove", "vol")
    rig.udm.ok("remove", "pool")
    rig.stop_daemon()
    thin_check(meta)


def test_remove_mounted_fails_busy_and_deferred_waits_for_unmount(rig: Rig) -> None:
    make_pool(rig, "pool", 1 * GiB)
    rig.udm.ok("message", rig.ref("pool"), "0", "create_thin 0")
    dev = thin(rig, "pool", "vol", 0, 128)
    run("mkfs.ext4", "-q", dev)
    mnt = rig.mount(dev, "vol")
    r = rig.udm.fails("remove", "vol")
    assert "Device or resource busy" in r.err
    assert rig.udm.ok("info", "-c", "--noheadings", "-o", "name", "vol").strip() == "vol"
    rig.udm.ok("remove", "--deferred", "vol")
    assert "(DEFERRED REMOVE)" in rig.udm.ok("info", "vol")
    (mnt / "still.txt").write_text("usable while deferred\n")
    rig.umount(mnt)
    deadline = time.monotonic() + 10
    while rig.udm("info", "vol").rc == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rig.udm("info", "vol").rc != 0
    assert not Path(dev).exists() and not (rig.files / "vol").exists()
    # the pool itself is not busy (nothing mounted on it) and goes at once
    rig.udm.ok("remove", "pool")


def test_shutdown_with_a_mounted_device_does_not_hang_and_restart_brings_the_files_back(rig: Rig) -> None:
    make_pool(rig, "pool", 1 * GiB)
    rig.udm.ok("message", rig.ref("pool"), "0", "create_thin 0")
    dev = thin(rig, "pool", "vol", 0, 128)
    run("mkfs.ext4", "-q", dev)
    mnt = rig.mount(dev, "vol")
    (mnt / "kept.txt").write_text("synced before the daemon stopped\n")
    run("sync")
    started = time.monotonic()
    rig.stop_daemon()  # SIGTERM while the filesystem is still mounted
    assert time.monotonic() - started < 20
    assert not os.path.ismount(rig.files)
    run("umount", "-l", str(mnt))  # its loop device lost its file with the daemon
    rig.mounts.remove(mnt)

    rig.start()  # the saved devices come back with their files, loop devices and links
    assert sorted(os.listdir(rig.files)) == ["pool", "vol"]
    assert Path(dev).resolve().name.startswith("loop")
    mnt = rig.mount(dev, "vol")
    assert (mnt / "kept.txt").read_text() == "synced before the daemon stopped\n"
    rig.umount(mnt)

    def our_loops() -> dict[str, str]:
        listing = run("losetup", "-l", "-n", "--raw", "-O", "NAME,BACK-FILE").stdout
        pairs = (line.split(" ", 1) for line in listing.splitlines())
        return {loop: back for loop, back in pairs if back.startswith(f"{rig.files}/")}

    old = our_loops()
    assert len(old) == 2
    rig.udm.kill()  # SIGKILL: loop devices stay behind on a dead mount
    rig.start()  # the new daemon detaches them and attaches fresh ones
    assert len(our_loops()) == 2  # four if the stale ones were still attached
    mnt = rig.mount(dev, "vol")
    assert (mnt / "kept.txt").read_text() == "synced before the daemon stopped\n"


def test_rename_moves_the_file_and_the_link_and_grow_from_an_empty_device(rig: Rig) -> None:
    make_pool(rig, "pool", 1 * GiB)
    rig.udm.ok("message", rig.ref("pool"), "0", "create_thin 0")
    rig.udm.ok("create", "vol", "--notable")  # no table: a file of size 0, no loop device yet
    assert (rig.files / "vol").stat().st_size == 0
    assert not Path(rig.dev("vol")).exists()
    rig.udm.ok("load", "vol", "--table", f"0 {64 * SECTORS_PER_MiB} thin /dev/mapper/pool 0")
    rig.udm.ok("resume", "vol")
    loop = Path(rig.dev("vol")).resolve()
    assert int(run("blockdev", "--getsize64", str(loop)).stdout) == 64 * MiB
    with open(loop, "r+b", buffering=0) as f:
        f.write(b"renamed".ljust(4096, b"\0"))
    rig.udm.ok("rename", "vol", "other")
    assert not Path(rig.dev("vol")).exists() and not (rig.files / "vol").exists()
    assert Path(rig.dev("other")).resolve() == loop
    assert (rig.files / "other").read_bytes()[:7] == b"renamed"
    rig.udm.ok("remove", "other")
    assert not Path(rig.dev("other")).exists()
    assert run("losetup", str(loop), check=False).returncode != 0  # detached
