"""Intermediate representation of a pool's metadata, and the visitor that carries it.

dump = metadata reader -> visitor; restore = XML reader -> visitor -> metadata writer; thin_dump's
XML and human-readable formats are visitors too.  Mirrors thin-provisioning-tools' ``ir`` module:
``*_b``/``*_e`` are begin/end events.  Mappings arrive as runs in ascending origin order; a writer
decides how to merge or split them.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol


@dataclasses.dataclass(frozen=True, slots=True)
class SuperblockInfo:
    uuid: str
    time: int
    transaction: int
    flags: int
    version: int
    data_block_size: int  # sectors
    nr_data_blocks: int
    metadata_snap: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceInfo:
    dev_id: int
    mapped_blocks: int
    transaction: int
    creation_time: int
    snap_time: int


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """``length`` consecutive origin blocks mapped to consecutive data blocks, all with one time."""

    origin_begin: int
    data_begin: int
    length: int
    time: int


class MetadataVisitor(Protocol):
    def superblock_b(self, sb: SuperblockInfo) -> None: ...

    def superblock_e(self) -> None: ...

    def device_b(self, dev: DeviceInfo) -> None: ...

    def device_e(self) -> None: ...

    def map(self, run: Run) -> None: ...

    def eof(self) -> None: ...
