"""Pool auto-extension, the way LVM's dmeventd plugin grows a thin pool.

Theory of operation
-------------------
A pool device can carry a policy: ``threshold`` (``thin_pool_autoextend_threshold``, percent of data
space used that triggers) and ``percent`` (``thin_pool_autoextend_percent``, growth as a percent of
the current size).  As in LVM, a threshold of 100 or a percent of 0 switches it off.  Set it with
``udmsetup create|load ... --autoextend THRESHOLD,PERCENT`` or ``udmsetup message POOL 0
"@autoextend THRESHOLD PERCENT"`` (``@autoextend off`` to clear; no arguments to print it).

``AutoextendMonitor`` is the dmeventd loop: it wakes on every pool event (low water mark, mode
change -- an out-of-data-space pool signals one) and every ``interval`` seconds, and calls the
manager's check.  The check (``DeviceManager.autoextend_check``) compares the pool's used data
blocks with the threshold and, when due, grows a file-backed data device: the file is extended,
the pool device's live table gets the longer length (what ``lvextend`` + reload + resume do) and
the pool picks the new blocks up; writers queued for space (``queue_if_no_space``) carry on.  Only
regular-file data devices can grow this way; for others the check logs once and does nothing.

The kernel status line is never touched; ``udmsetup info`` shows the policy and counters.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from devmapper.control.device import MappedDevice
from devmapper.control.errors import DmError
from devmapper.control.lower import FileLower
from devmapper.control.pools import PoolEntry
from devmapper.control.targets.thin import PoolTarget
from devmapper.errors import DevmapperError
from devmapper.units import SECTOR_SIZE

log = logging.getLogger(__name__)

__all__ = ["AutoextendMonitor", "AutoextendPolicy", "AutoextendStats", "extend_if_due"]


@dataclasses.dataclass(frozen=True, slots=True)
class AutoextendPolicy:
    threshold: int  # percent of data blocks used that triggers growth (1..100; 100 = off)
    percent: int  # growth, percent of the current length (0..1000; 0 = off)

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= 100:
            raise DmError("EINVAL", f"autoextend threshold {self.threshold} is not a percentage in 1..100")
        if not 0 <= self.percent <= 1000:
            raise DmError("EINVAL", f"autoextend percent {self.percent} is not in 0..1000")

    @classmethod
    def parse(cls, words: list[str]) -> AutoextendPolicy:
        """``THRESHOLD PERCENT`` (also ``THRESHOLD,PERCENT``; a trailing ``%`` is allowed)."""
        if len(words) == 1 and "," in words[0]:
            words = words[0].split(",")
        values = [w.strip().rstrip("%") for w in words]
        if len(values) != 2 or not all(v.isdigit() for v in values):
            raise DmError("EINVAL", "autoextend wants THRESHOLD,PERCENT (two whole percentages)")
        return cls(int(values[0]), int(values[1]))

    @property
    def enabled(self) -> bool:
        return self.threshold < 100 and self.percent > 0

    def due(self, used: int, total: int) -> bool:
        return self.enabled and total > 0 and used * 100 >= self.threshold * total

    def grown_length(self, length: int, block_sectors: int) -> int:
        """The new table length: ``percent`` more, rounded up to whole data blocks (at least one)."""
        grow = max(-(-length * self.percent // 100), block_sectors)
        grow = -(-grow // block_sectors) * block_sectors
        return length + grow

    def to_json(self) -> dict[str, int]:
        return {"threshold": self.threshold, "percent": self.percent}

    def describe(self) -> str:
        return f"{self.threshold} {self.percent}"


@dataclasses.dataclass(slots=True)
class AutoextendStats:
    extensions: int = 0
    failures: int = 0
    last_time: float | None = None
    last_from: int = 0  # sectors
    last_to: int = 0
    last_error: str = ""

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: object) -> AutoextendStats:
        stats = cls()
        if isinstance(raw, dict):
            for field in dataclasses.fields(cls):
                value = raw.get(field.name)
                if isinstance(value, type(getattr(stats, field.name))) or (
                    field.name == "last_time" and isinstance(value, (int, float))
                ):
                    setattr(stats, field.name, value)
        return stats

    def describe(self) -> str:
        text = f"extended {self.extensions} time{'s' if self.extensions != 1 else ''}"
        if self.last_time is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.last_time))
            text += f", last {when} from {self.last_from} to {self.last_to} sectors"
        if self.failures:
            text += f", {self.failures} failed ({self.last_error})"
        return text


class AutoextendMonitor:
    """A thread calling ``check`` on every ``poke`` and every ``interval`` seconds."""

    def __init__(self, check: Callable[[], None], interval: float) -> None:
        self._check = check
        self.interval = interval
        self._cond = threading.Condition()
        self._poked = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="autoextend", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        with self._cond:
            self._poked = True
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._poked and not self._stopping:
                    self._cond.wait(self.interval)
                if self._stopping:
                    return
                self._poked = False
            try:
                self._check()
            except Exception:
                log.exception("autoextend check failed")


def extend_if_due(
    md: MappedDevice, target: PoolTarget, policy: AutoextendPolicy, stats: AutoextendStats,
    grow: Callable[[PoolEntry, int], None],
) -> bool:
    """Grow the pool's data device if its policy is due; True if it grew.  Failures are counted
    and logged, not raised (the next check tries again)."""
    pool = target.pool
    total = pool.nr_data_blocks
    used = total - pool.md.nr_free_data_blocks()
    if pool.closed or not policy.due(used, total):
        return False
    data = target.data
    if not (isinstance(data, FileLower) and data.is_regular_file()):
        if not stats.last_error:
            log.warning("%s: autoextend: data device %s is not a regular file; cannot grow it", md.name, data.label)
            stats.last_error = "data device is not a regular file"
        return False
    old, new = target.length, policy.grown_length(target.length, pool.block_sectors)
    try:
        if data.real_size() < new * SECTOR_SIZE:
            data.resize(new * SECTOR_SIZE)
        target.length = new
        grow(target.entry, new)
    except (DevmapperError, OSError) as e:
        stats.failures += 1
        stats.last_error = str(e)
        log.error("%s: autoextend from %d to %d sectors failed: %s", md.name, old, new, e)
        return False
    stats.extensions += 1
    stats.last_time, stats.last_from, stats.last_to = time.time(), old, new
    log.warning("%s: autoextend: %d/%d data blocks used (>= %d%%): grew the data device from %d to %d sectors (+%d%%)",
                md.name, used, total, policy.threshold, old, new, policy.percent)
    return True
