"""The layer-store test stack: a daemon with device files and loop devices, and stores on it.

``Stack`` opens ``LayerStore`` objects on a Docker root under the test's tmp directory with small
sizes (the pool's files are sparse).  ``cleanup`` lazily unmounts every filesystem under the tmp
directory (the store's ``mnt/<id>`` mounts) before the FUSE rig stops the daemon.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from devmapper.layers.dm import Dm
from devmapper.layers.fs import mounts_under
from devmapper.layers.options import DmOptions

if TYPE_CHECKING:
    from devmapper.layers.store import LayerStore
    from fuse.rig import Rig

SMALL = ["dm.loopdatasize=2G", "dm.loopmetadatasize=64M", "dm.basesize=256M", "dm.min_free_space=0%"]


class Stack:
    def __init__(self, rig: Rig, tmp: Path) -> None:
        self.rig = rig
        self.tmp = tmp
        self.root = tmp / "docker"
        self.dms: list[Dm] = []

    @property
    def runtime(self) -> Path:
        return self.rig.udm.runtime

    def dm(self) -> Dm:
        dm = Dm.connect(self.runtime)
        self.dms.append(dm)
        return dm

    def store(self, *options: str, read_only: bool = False, root: Path | None = None) -> LayerStore:
        opts = DmOptions.parse([*SMALL, *options])
        return _store_class()(root or self.root, self.dm(), opts, read_only=read_only).open()

    def cleanup(self) -> None:
        for point in mounts_under(self.tmp):
            if point != self.rig.files:
                subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)
        for dm in self.dms:
            dm.close()


def _store_class() -> type[LayerStore]:
    from devmapper.layers.store import LayerStore

    return LayerStore

