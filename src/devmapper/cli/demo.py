"""``devmapper demo``: the seeds' thin-provisioning walkthrough, run for real on sparse files.

It follows the blog posts step by step (each step prints the dmsetup command it stands for): sparse
data and metadata files, a thin pool with 64 KiB blocks and skip_block_zeroing, ``create_thin 0``, a
1 GiB thin volume written with a "base image", a snapshot (``create_snap 1 0``) written through copy-on-write,
a snapshot of the snapshot, isolation checks both ways, ``thin_ls``-style usage, the pool status, a
grow of a volume by loading a bigger table, and finally our metadata check and the real ``thin_check``.
Then, as root with FUSE, the Docker part (``demo_docker``): an image loaded as snapshots of a base
device and two containers sharing its blocks, with ``docker info``'s block (``--no-docker`` skips it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, TextIO

from devmapper.blockdev.file import FileBlockDevice
from devmapper.cli import demo_docker
from devmapper.thin import ls
from devmapper.thin.check import check_metadata
from devmapper.thin.pool import Pool
from devmapper.thin.status import PoolFeatures

MiB = 1 << 20
GiB = 1 << 30
VOLUME_SECTORS = 2097152  # 1 GiB, as in the seeds' "0 2097152 thin ..." tables


def _pattern(tag: str, length: int) -> bytes:
    """Deterministic, incompressible bytes standing for a file's contents."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{tag}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:length])


class _Narrator:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.step = 0

    def __call__(self, title: str, command: str | None = None) -> None:
        self.step += 1
        self.out.write(f"\n[{self.step}] {title}\n")
        if command:
            self.out.write(f"    $ {command}\n")

    def say(self, text: str) -> None:
        self.out.write(f"    {text}\n")


def _sparse(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _allocated(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size / GiB:.2f} GiB apparent, {st.st_blocks * 512 / MiB:.1f} MiB allocated"


def run_demo(workdir: str, out: TextIO, docker: bool = True) -> int:
    say = _Narrator(out)
    data, meta = os.path.join(workdir, "data.img"), os.path.join(workdir, "meta.data.img")

    say("Sparse data (10 GiB) and metadata (1 GiB) files", "dd if=/dev/zero of=data.img bs=1K count=1 seek=10M")
    _sparse(data, 10 * GiB)
    _sparse(meta, 1 * GiB)
    say.say(f"data.img: {_allocated(data)}")
    say.say(f"meta.data.img: {_allocated(meta)}")

    table = f"0 20971520 thin-pool {meta} {data} 128 32768 1 skip_block_zeroing"
    say("Thin pool over them: 64 KiB blocks, low water mark 32768 blocks",
        f'dmsetup create demo-thin-pool --table "{table}"')
    pool = Pool.open(meta, data, 128, 32768, PoolFeatures(skip_block_zeroing=True), name="demo-thin-pool")
    try:
        say.say(pool.status_line())
        base_digest, snap1_digest = _volumes(pool, say)
        say("Usage per thin device (thin_ls)", "thin_ls -o DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS ...")
        say.say("pool status: " + pool.status_line())
    finally:
        pool.close()

    block_size, devices = ls.usage(FileBlockDevice(meta, read_only=True))
    for line in ls.render(block_size, devices, ("DEV", "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS",
                                                 "MAPPED", "CREATE_TIME", "SNAP_TIME")).splitlines():
        say.say(line)
    say.say(f"data.img now: {_allocated(data)}")

    say("Reopen the pool: everything flushed is still there")
    with Pool.open(meta, data, 128, 32768, PoolFeatures(skip_block_zeroing=True)) as pool:
        with pool.open_thin(0, VOLUME_SECTORS) as v0, pool.open_thin(1, VOLUME_SECTORS) as v1:
            assert hashlib.sha256(v0.read(0, 64 * MiB)).hexdigest() == base_digest
            assert hashlib.sha256(v1.read(0, 64 * MiB)).hexdigest() == snap1_digest
        say.say("base and snapshot contents verified after reopen")

    rc = _checks(meta, say)
    if not docker:
        return rc
    why = demo_docker.unavailable()
    if why is not None:
        say("Docker's devicemapper storage (images and containers as snapshots)")
        say.say(f"skipped: {why}")
        return rc
    docker_dir = Path(workdir) / "docker-demo"
    docker_dir.mkdir(exist_ok=True)
    return demo_docker.run_docker_demo(docker_dir, say) or rc


def _volumes(pool: Pool, say: _Narrator) -> tuple[str, str]:
    say("Thin device 0 and a 1 GiB volume on it", 'dmsetup message demo-thin-pool 0 "create_thin 0"')
    pool.message("create_thin 0")
    base = _pattern("base-image", 64 * MiB)
    with pool.open_thin(0, VOLUME_SECTORS) as v0:
        say.say(f"thin table: {v0.table_line()}")
        v0.write(0, base)
        v0.flush()
        say.say(f"wrote a 64 MiB base image; thin status: {v0.status_line()}")

    say("Snapshot of the base (device 1) and a write into it", 'dmsetup message demo-thin-pool 0 "create_snap 1 0"')
    pool.message("create_snap 1 0")
    with pool.open_thin(1, VOLUME_SECTORS) as v1:
        v1.write(8 * MiB, _pattern("layer-1", 4 * MiB))
        v1.flush()
        snap1 = v1.read(0, 64 * MiB)
    say.say("snapshot 1 changed 4 MiB at offset 8 MiB (64 blocks copied on write)")

    say("Snapshot of the snapshot (device 2) and a write into it", 'dmsetup message demo-thin-pool 0 "create_snap 2 1"')
    pool.message("create_snap 2 1")
    with pool.open_thin(2, VOLUME_SECTORS) as v2:
        v2.write(32 * MiB + 4096, _pattern("layer-2", 100_000))
        v2.flush()
        snap2 = v2.read(0, 64 * MiB)

    say("Isolation both ways")
    with pool.open_thin(0, VOLUME_SECTORS) as v0, pool.open_thin(1, VOLUME_SECTORS) as v1:
        checks = {
            "base unchanged by the snapshots": v0.read(0, 64 * MiB) == base,
            "snapshot 1 unchanged by snapshot 2": v1.read(0, 64 * MiB) == snap1,
            "snapshot 2 sees snapshot 1's write": snap2[8 * MiB : 12 * MiB] == snap1[8 * MiB : 12 * MiB],
        }
    for what, ok in checks.items():
        say.say(f"{'ok  ' if ok else 'FAIL'} {what}")
    if not all(checks.values()):
        raise SystemExit(1)

    say("Grow volume 2 to 2 GiB by loading a bigger table",
        "dmsetup table demosnap2 | sed 's/2097152/4194304/' | dmsetup load demosnap2; dmsetup resume demosnap2")
    with pool.open_thin(2, 2 * VOLUME_SECTORS) as v2:
        v2.write(GiB + 12345, b"beyond the old end")
        say.say(f"new table: {v2.table_line()}; status: {v2.status_line()}")
    return hashlib.sha256(base).hexdigest(), hashlib.sha256(snap1).hexdigest()


def _checks(meta: str, say: _Narrator) -> int:
    say("Metadata checks", "devmapper thin check meta.data.img; thin_check meta.data.img")
    report = check_metadata(FileBlockDevice(meta, read_only=True))
    say.say(f"devmapper thin check: {'clean' if report.ok else f'{report.nr_defects} defects'}"
            f" ({report.nr_devices} devices, {report.nr_mappings} mappings)")
    tool = shutil.which("thin_check") or ("/usr/sbin/thin_check" if os.path.exists("/usr/sbin/thin_check") else None)
    rc = 0
    if tool is None:
        say.say("thin_check: not installed (apt-get install thin-provisioning-tools)")
    else:
        r = subprocess.run([tool, meta], capture_output=True, text=True, check=False)
        say.say(f"thin_check: exit {r.returncode}" + ("" if r.returncode == 0 else f"\n{r.stderr}"))
        rc = r.returncode
    return 0 if report.ok and rc == 0 else 1


def _handler(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
        return run_demo(args.dir, out, not args.no_docker)
    with tempfile.TemporaryDirectory(prefix="devmapper-demo-") as workdir:
        return run_demo(workdir, out, not args.no_docker)


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the seed walkthrough (pool, thin volume, snapshots) on sparse files",
                       description=__doc__)
    p.add_argument("--dir", help="keep the files here instead of a temporary directory")
    p.add_argument("--no-docker", action="store_true",
                   help="skip the Docker part (images and containers; needs root, FUSE and busybox)")
    p.set_defaults(handler=_handler)
