"""The ``docker info`` "Storage Driver: devicemapper" block, label for label, plus the pool's health.

Docker computed every figure from one ``dmsetup status`` line and never showed the pool's mode or
``needs_check``; we print Docker's rows in Docker's order with Docker's units (go-units HumanSize,
decimal, no space) and then the rows Docker lacked: ``Pool Mode``, ``Pool Needs Check``,
``No Space Behavior``, ``Transaction ID``.

Values that have no kernel counterpart here:

* ``Udev Sync Supported`` is ``true``: the daemon creates each device's node and ``/dev/mapper``
  link before its create call returns, which is what udev sync guaranteed Docker.
* ``Data file``/``Metadata file`` name the files the pool uses directly (Docker showed the loop
  devices it had attached to them); ``Data loop file``/``Metadata loop file`` are the same paths,
  shown as Docker did whenever sparse files back the pool.
* ``Library Version`` is our device-mapper's version.
"""

from __future__ import annotations

import os
from pathlib import Path

from devmapper.control.manager import DRIVER_VERSION
from devmapper.layers.deviceset import DeviceSet
from devmapper.layers.options import human_size

__all__ = ["LOOP_WARNING", "info_rows", "render"]

LOOP_WARNING = ("WARNING: devicemapper: usage of loopback devices is strongly discouraged for production use. "
                "Use `--storage-opt dm.thinpooldev` to specify a custom block storage device.")


def _host_free(path: Path) -> int | None:
    """Free bytes of the filesystem holding a regular file (Docker's cap on "Available")."""
    try:
        if not path.is_file():
            return None
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bfree * st.f_frsize


def info_rows(ds: DeviceSet) -> list[tuple[str, str]]:
    u = ds.pool_usage()
    bs = u.block_size
    base = ds.devices.get("")
    data_used, data_total = u.used_data * bs, u.total_data * bs
    meta_used, meta_total = u.used_meta * 4096, u.total_meta * 4096
    data_avail, meta_avail = data_total - data_used, meta_total - meta_used
    loop_mode = not ds.options.thinpooldev and not ds.options.datadev
    data_file, meta_file = ds.data_path, ds.metadata_path
    if loop_mode:
        for name, path in (("data", data_file), ("meta", meta_file)):
            free = _host_free(path)
            if free is not None:
                if name == "data":
                    data_avail = min(data_avail, free)
                else:
                    meta_avail = min(meta_avail, free)
    rows = [
        ("Pool Name", ds.pool),
        ("Pool Blocksize", human_size(bs)),
        ("Base Device Size", human_size(base.size if base else 0)),
        ("Backing Filesystem", ds.base_fs),
        ("Udev Sync Supported", "true"),
    ]
    if not ds.options.thinpooldev:
        rows += [("Data file", str(data_file)), ("Metadata file", str(meta_file))]
    if loop_mode:
        rows += [("Data loop file", str(data_file)), ("Metadata loop file", str(meta_file))]
    min_free = u.total_data * ds.options.min_free_space // 100 * bs
    rows += [
        ("Data Space Used", human_size(data_used)),
        ("Data Space Total", human_size(data_total)),
        ("Data Space Available", human_size(max(data_avail, 0))),
        ("Metadata Space Used", human_size(meta_used)),
        ("Metadata Space Total", human_size(meta_total)),
        ("Metadata Space Available", human_size(max(meta_avail, 0))),
        ("Thin Pool Minimum Free Space", human_size(min_free)),
        ("Deferred Removal Enabled", str(ds.options.use_deferred_removal).lower()),
        ("Deferred Deletion Enabled", str(ds.options.use_deferred_deletion).lower()),
        ("Deferred Deleted Device Count", str(ds.deleted_count)),
        ("Library Version", f"devmapper userspace device-mapper {'.'.join(map(str, DRIVER_VERSION))}"),
        ("Pool Mode", u.mode),
        ("Pool Needs Check", str(u.needs_check).lower()),
        ("No Space Behavior", "error" if u.error_if_no_space else "queue"),
        ("Transaction ID", str(u.transaction_id)),
    ]
    return rows


def render(ds: DeviceSet) -> str:
    lines = ["Storage Driver: devicemapper"]
    lines += [f" {label}: {value}" for label, value in info_rows(ds)]
    if not ds.options.thinpooldev and not ds.options.datadev:
        lines.append(LOOP_WARNING)
    return "\n".join(lines) + "\n"
