"""Helpers shared by the pool tests: pool files on disk, metadata checks, byte patterns.

``check_metadata_clean`` runs Debian's ``thin_check`` (skipping the test when it is missing) and,
when ``devmapper.thin.check.check_metadata`` exists, our own checker too.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import os
import random
from pathlib import Path
from typing import Any

from devmapper.blockdev.file import FileBlockDevice
from devmapper.thin.data_device import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from devmapper.thin.metadata import PoolMetadata
from devmapper.thin.pool import Pool
from helpers.tools import run_tool

BLOCK_SECTORS = 128
BLOCK = BLOCK_SECTORS * 512
MiB = 1 << 20


@dataclasses.dataclass
class PoolFiles:
    root: Path
    meta: Path
    data: Path
    block_sectors: int = BLOCK_SECTORS

    def open(self, **kw: Any) -> Pool:
        kw.setdefault("metadata_name", "253:0")
        kw.setdefault("data_name", "253:1")
        return Pool.open(self.meta, self.data, self.block_sectors, **kw)

    def check(self) -> None:
        check_metadata_clean(self.meta)


def make_pool_files(
    root: Path, data_blocks: int = 256, meta_bytes: int = 4 * MiB, block_sectors: int = BLOCK_SECTORS
) -> PoolFiles:
    """A sparse metadata file and a sparse data file of data_blocks blocks."""
    root.mkdir(parents=True, exist_ok=True)
    files = PoolFiles(root, root / "meta", root / "data", block_sectors)
    with open(files.meta, "wb") as f:
        f.truncate(meta_bytes)
    with open(files.data, "wb") as f:
        f.truncate(data_blocks * block_sectors * 512)
    return files


def thin_check(meta: Path, *extra: str) -> None:
    run_tool(["thin_check", *extra, str(meta)])


def our_check(meta: Path) -> None:
    """Our checker, if it exists yet, must report no defects."""
    try:
        mod = importlib.import_module("devmapper.thin.check")
    except ImportError:
        return
    fn = getattr(mod, "check_metadata", None)
    if fn is None:
        return
    dev = FileBlockDevice(meta, read_only=True)
    try:
        report = fn(dev)
    finally:
        dev.close()
    assert report.ok, report.defects


def check_metadata_clean(meta: Path) -> None:
    thin_check(meta)
    our_check(meta)


def pattern(seed: int, n: int) -> bytes:
    """n deterministic, incompressible-looking bytes."""
    return random.Random(seed).randbytes(n)


def distinct_mapped_blocks(md: PoolMetadata) -> int:
    """Data blocks referenced by any mapping of any device (shared ones once)."""
    blocks: set[int] = set()
    for dev in md.devices():
        blocks.update(b for _v, b, _t in md.mappings(dev))
    return len(blocks)


def used_data_blocks(pool: Pool) -> int:
    return pool.md.nr_data_blocks() - pool.md.nr_free_data_blocks()


def punch_hole_supported(directory: Path) -> str | None:
    """None if files in directory can have holes punched, else the reason they cannot."""
    probe = directory / "punch-probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x" * (1 << 20), 0)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 1 << 20)
        os.fsync(fd)
        if os.fstat(fd).st_blocks * 512 >= 1 << 20:
            return "punching a hole did not reduce st_blocks"
        return None
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
            return f"fallocate(PUNCH_HOLE) unsupported in {directory}: {e.strerror}"
        raise
    finally:
        os.close(fd)
        probe.unlink()
