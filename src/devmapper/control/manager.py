"""The device manager: the kernel's device-mapper core and its ioctls, in userspace.

Theory of operation
-------------------
``DeviceManager`` owns every ``MappedDevice`` (by name, uuid and minor), the running pools and the
persistent state.  Each public method is one ioctl and mirrors ``dm-ioctl.c``:

* ``create`` registers a device (EBUSY if the name or uuid is taken); with a table it also loads
  and resumes it, and undoes the creation if either fails (libdm's ``_create_and_load``).
* ``load`` constructs a table (every target's ``ctr`` runs now, so bad arguments fail here) and
  makes it the inactive table, destroying the one it replaces.  ``clear`` drops the inactive table.
* ``resume`` swaps an inactive table in: suspend if needed, ``preresume`` the new targets (a pool
  grows and rebinds here), swap, destroy the old table, resume.  If ``preresume`` fails the device
  is left as it was.  Without an inactive table it resumes a suspended device (``preresume`` again,
  which lets a pool see a data file grown behind its back).
* ``suspend`` holds I/O and flushes (``noflush`` skips the flush); ``remove`` refuses an open device
  (EBUSY) unless ``deferred``, which removes it when its last opener goes.
* ``message`` routes ``dmsetup message`` text to the target holding the sector; ``@``-messages are
  for the core (``@cancel_deferred_remove``, ``@autoextend``).
* ``info``, ``table``, ``status``, ``deps``, ``list_devices``, ``wait``, ``targets``, ``version``
  report.

Every method validates fully before it changes anything, so a refused request leaves all state
untouched; after every change the whole state is saved atomically (``state.py``).  One re-entrant
lock serialises control operations; I/O never takes it (devices have their own gates), and
``wait`` waits outside it.  ``start`` restores the saved devices in dependency order: a table that
names ``253:N`` is restored after device N.  A device whose table cannot be restored comes back
without tables and keeps its saved tables for the next start.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from devmapper.control.autoextend import AutoextendMonitor, AutoextendPolicy, AutoextendStats, extend_if_due
from devmapper.control.device import DeviceHandle, DeviceInfo, MappedDevice, Table
from devmapper.control.errors import DmError
from devmapper.control.exports import ExportHub
from devmapper.control.lower import DM_MAJOR, Key, Lower, MappedLower, Stackable, devno_label
from devmapper.control.pools import PoolRegistry
from devmapper.control.records import device_from_record, device_record, lines_from, restore_order, top_down
from devmapper.control.state import STATE_VERSION, StateStore
from devmapper.control.table import TableLine
from devmapper.control.targets import TARGET_TYPES, Target, TargetContext, target_type
from devmapper.control.targets.thin import PoolTarget
from devmapper.errors import DevmapperError
from devmapper.export import Extent
from devmapper.thin.pool import PoolEvent

log = logging.getLogger(__name__)

__all__ = ["DRIVER_VERSION", "DeviceManager", "DeviceRef"]

DRIVER_VERSION = (4, 47, 0)
MAX_NAME = 127  # DM_NAME_LEN - 1
MAX_UUID = 128  # DM_UUID_LEN - 1
MAX_MINOR = (1 << 20) - 1
R = TypeVar("R")


class DeviceRef:
    """How a request names a device: by name (or /dev/mapper path), uuid, or device number."""

    def __init__(self, name: str | None = None, uuid: str | None = None, minor: int | None = None) -> None:
        self.name, self.uuid, self.minor = name, uuid, minor

    @classmethod
    def from_json(cls, raw: object) -> DeviceRef:
        if isinstance(raw, str):
            return cls(name=raw)
        if isinstance(raw, dict):
            name, uuid, devno = raw.get("name"), raw.get("uuid"), raw.get("devno")
            if isinstance(name, str):
                return cls(name=name)
            if isinstance(uuid, str):
                return cls(uuid=uuid)
            if isinstance(devno, list) and len(devno) == 2 and all(isinstance(x, int) for x in devno):
                if devno[0] != DM_MAJOR:
                    return cls(minor=-1)
                return cls(minor=devno[1])
        raise DmError("EINVAL", "No device specified.")

    def label(self) -> str:
        if self.name is not None:
            return self.name
        return self.uuid if self.uuid is not None else f"{DM_MAJOR}:{self.minor}"


def _check_name(name: str) -> None:
    if not name or "/" in name or len(name) > MAX_NAME or name in (".", ".."):
        raise DmError("EINVAL", f"Invalid device name {name!r}")


class DeviceManager:
    def __init__(
        self, store: StateStore | None = None, *, no_space_timeout: float = 60.0, monitor_interval: float = 1.0
    ) -> None:
        self._lock = threading.RLock()
        self._by_name: dict[str, MappedDevice] = {}
        self._by_minor: dict[int, MappedDevice] = {}
        self._policies: dict[int, AutoextendPolicy] = {}
        self._stats: dict[int, AutoextendStats] = {}
        self._unrestored: dict[int, dict[str, Any]] = {}
        self._closing = False
        self.store = store
        self.pools = PoolRegistry(self._pool_event, no_space_timeout=no_space_timeout)
        self.monitor = AutoextendMonitor(self.autoextend_check, monitor_interval)
        self.exports: ExportHub | None = None  # device files, loop devices, mapper links (the daemon's)

    # -- lookups (also the MappedLookup the targets use) -----------------------------------------

    def by_name(self, name: str) -> Stackable | None:
        return self._by_name.get(name)

    def by_minor(self, minor: int) -> Stackable | None:
        return self._by_minor.get(minor)

    def find(self, ref: DeviceRef) -> MappedDevice:
        """The device a request names; ENXIO if none (``__find_device_hash_cell``)."""
        md: MappedDevice | None = None
        if ref.name is not None:
            name = ref.name
            if name.startswith("/dev/mapper/"):
                name = name[len("/dev/mapper/") :]
            elif name.startswith("/dev/dm-") and name[8:].isdigit():
                md = self._by_minor.get(int(name[8:]))
            md = md or self._by_name.get(name)
        elif ref.uuid is not None:
            md = next((d for d in self._by_minor.values() if d.uuid and d.uuid == ref.uuid), None)
        elif ref.minor is not None:
            md = self._by_minor.get(ref.minor)
        if md is None:
            raise DmError("ENXIO")  # the kernel logs nothing for a device that is not there
        return md

    def _locked(self, fn: Callable[[], R]) -> R:
        with self._lock:
            if self._closing:
                raise DmError("ENXIO", "the device-mapper daemon is shutting down")
            return fn()

    # -- create, load, resume --------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        uuid: str = "",
        table: list[TableLine] | None = None,
        read_only: bool = False,
        minor: int | None = None,
        read_ahead: int | None = None,
        autoextend: AutoextendPolicy | None = None,
        cwd: str | None = None,
    ) -> DeviceInfo:
        return self._locked(lambda: self._create(name, uuid, table, read_only, minor, read_ahead, autoextend, cwd))

    def _create(
        self, name: str, uuid: str, table: list[TableLine] | None, read_only: bool, minor: int | None,
        read_ahead: int | None, autoextend: AutoextendPolicy | None, cwd: str | None,
    ) -> DeviceInfo:
        _check_name(name)
        if len(uuid) > MAX_UUID:
            raise DmError("EINVAL", "uuid too long").at("create")
        if name in self._by_name:
            raise DmError("EBUSY", f"device {name} already exists", logged=False).at("create")
        if uuid and any(d.uuid == uuid for d in self._by_minor.values()):
            raise DmError("EBUSY", f"uuid {uuid} is already in use", logged=False).at("create")
        md = MappedDevice(name, uuid, self._pick_minor(minor), read_only=read_only)
        if read_ahead is not None:
            md.read_ahead = read_ahead
        self._register(md)
        try:
            if table is not None:
                try:
                    md.inactive = self._construct(md, table, read_only, cwd)
                except DmError as e:
                    raise e.at("reload", md.devno) from None
                self._resume(md)
            if autoextend is not None:
                self._set_policy(md, autoextend)
        except DmError:
            self._destroy(md)
            raise
        self._export(md)
        self._save()
        return md.info()

    def _pick_minor(self, wanted: int | None) -> int:
        if wanted is not None:
            if not 0 <= wanted <= MAX_MINOR:
                raise DmError("EINVAL", f"minor {wanted} out of range").at("create")
            if wanted in self._by_minor:
                raise DmError("EBUSY", f"minor {wanted} is in use", logged=False).at("create")
            return wanted
        minor = 0
        while minor in self._by_minor:
            minor += 1
        return minor

    def _register(self, md: MappedDevice) -> None:
        md.on_idle = self._on_idle
        self._by_name[md.name] = md
        self._by_minor[md.minor] = md

    def load(
        self, ref: DeviceRef, table: list[TableLine], *, read_only: bool = False,
        autoextend: AutoextendPolicy | None = None, cwd: str | None = None,
    ) -> DeviceInfo:
        def op() -> DeviceInfo:
            md = self.find(ref)
            new = self._construct(md, table, read_only or md.flag_read_only, cwd)
            if autoextend is not None and not isinstance(new.targets[0], PoolTarget):
                new.destroy()
                raise DmError("EINVAL", f"{md.name}: autoextend applies to thin-pool devices only", stage="reload")
            old, md.inactive = md.inactive, new
            self._unrestored.pop(md.minor, None)
            if old is not None:
                old.destroy()
            if autoextend is not None:
                self._set_policy(md, autoextend)
            self._save()
            return md.info()

        return self._locked(op)

    def clear(self, ref: DeviceRef) -> DeviceInfo:
        def op() -> DeviceInfo:
            md = self.find(ref)
            old, md.inactive = md.inactive, None
            if old is not None:
                old.destroy()
                self._save()
            return md.info()

        return self._locked(op)

    def resume(self, ref: DeviceRef) -> DeviceInfo:
        def op() -> DeviceInfo:
            md = self.find(ref)
            self._resume(md)
            self._export(md)
            self._save()
            return md.info()

        return self._locked(op)

    def _resume(self, md: MappedDevice) -> None:
        new = md.inactive
        if new is None:
            if md.suspended and md.live is not None:
                self._preresume(md, md.live)
            md.unsuspend()
            return
        was_suspended = md.suspended
        md.suspend(noflush=False)
        try:
            self._preresume(md, new)
        except DmError:
            if not was_suspended:
                md.unsuspend()
            raise
        old, md.live, md.inactive = md.live, new, None
        self._unrestored.pop(md.minor, None)
        if old is not None:
            old.destroy()
        for target in new.targets:
            target.resume()
        md.unsuspend()

    @staticmethod
    def _preresume(md: MappedDevice, table: Table) -> None:
        for target in table.targets:
            try:
                target.preresume()
            except DevmapperError as e:
                if isinstance(e, DmError):
                    raise e.at("resume") from None
                raise DmError("EINVAL", f"{target.type_name}: {e}", stage="resume") from e

    # -- constructing tables ---------------------------------------------------------------------

    def _construct(self, md: MappedDevice, lines: list[TableLine], read_only: bool, cwd: str | None) -> Table:
        """Check a table as ``dm_table_add_target``/``table_load`` do, then construct every target."""
        types = self._check_layout(md, lines)
        ctx = TargetContext(
            device_name=md.name, minor=md.minor, lookup=self, pools=self.pools, read_only=read_only, cwd=cwd
        )
        targets: list[Target] = []
        try:
            for line, cls in zip(lines, types, strict=True):
                targets.append(self._construct_one(md, ctx, line, cls))
            self._check_stacking(md, ctx.lowers)
        except BaseException:
            for target in targets:
                target.destroy()
            ctx.close_all()
            raise
        return Table(targets, ctx.lowers, read_only)

    def _construct_one(self, md: MappedDevice, ctx: TargetContext, line: TableLine, cls: type[Target]) -> Target:
        try:
            return cls(ctx, line.start, line.length, line.params.split())
        except DmError as e:
            reason = e.reason if e.reason.startswith(f"{line.target}:") else f"{line.target}: {e.reason}"
            e.reason = f"table: {devno_label(md.devno)}: {reason}"
            raise
        except DevmapperError as e:
            raise DmError("EINVAL", f"table: {devno_label(md.devno)}: {line.target}: {e}") from e
        except OSError as e:
            errno_name = errno.errorcode.get(e.errno or 0, "EIO")
            raise DmError(errno_name, f"table: {devno_label(md.devno)}: {line.target}: {e.strerror}") from e

    def _check_layout(self, md: MappedDevice, lines: list[TableLine]) -> list[type[Target]]:
        where = f"table: {devno_label(md.devno)}"
        if not lines:
            raise DmError("EINVAL", f"{where}: no targets specified")
        types: list[type[Target]] = []
        end = 0
        for line in lines:
            cls = target_type(line.target)
            if line.length == 0:
                raise DmError("EINVAL", f"{where}: zero-length target")
            if cls is None:
                raise DmError("EINVAL", f"{where}: {line.target}: unknown target type")
            if line.start != end:
                raise DmError("EINVAL", f"{where}: {line.target}: Gap in table")
            if cls.singleton and len(lines) > 1:
                raise DmError("EINVAL", f"{where}: target type {line.target} must appear alone in table")
            end = line.start + line.length
            types.append(cls)
        if end > (1 << 64) - 1:
            raise DmError("EINVAL", f"{where}: table too large")
        live = md.live
        if live is not None and live.targets[0].immutable and types[0] is not type(live.targets[0]):
            raise DmError("EINVAL", f"can't replace immutable target type {live.targets[0].type_name}")
        return types

    def _check_stacking(self, md: MappedDevice, lowers: list[Lower]) -> None:
        """A table may not name its own device, directly or through the devices under it."""
        seen: set[int] = set()
        todo = [lower.md for lower in lowers if isinstance(lower, MappedLower)]
        while todo:
            dev = todo.pop()
            if not isinstance(dev, MappedDevice) or dev.minor in seen:
                continue
            if dev is md:
                raise DmError("EINVAL", f"table: {devno_label(md.devno)}: a device cannot be stacked on itself")
            seen.add(dev.minor)
            for table in (dev.live, dev.inactive):
                if table is not None:
                    todo.extend(lw.md for lw in table.lowers if isinstance(lw, MappedLower))

    # -- suspend, remove, rename -----------------------------------------------------------------

    def suspend(self, ref: DeviceRef, *, noflush: bool = False) -> DeviceInfo:
        def op() -> DeviceInfo:
            md = self.find(ref)
            md.suspend(noflush)
            self._save()
            return md.info()

        return self._locked(op)

    def remove(self, ref: DeviceRef, *, deferred: bool = False) -> DeviceInfo:
        def op() -> DeviceInfo:
            md = self.find(ref)
            info = md.info()
            if self.exports is not None and self.exports.busy(md):
                if not deferred:
                    raise DmError("EBUSY", f"{md.name}: unable to remove open device", logged=False)
                md.deferred_remove = True
                self.exports.defer(md, lambda: self._deferred_export_gone(md))
                self._save()
                return md.info()
            if md.open_count:
                if not deferred:
                    raise DmError("EBUSY", f"{md.name}: unable to remove open device", logged=False)
                md.deferred_remove = True
                self._save()
                return md.info()
            self._destroy(md)
            self._save()
            return info

        return self._locked(op)

    def _export(self, md: MappedDevice) -> None:
        if self.exports is not None:
            self.exports.refresh(md)

    def _deferred_export_gone(self, md: MappedDevice) -> None:
        """The last user of a device's loop device went away: finish its deferred removal."""
        with self._lock:
            if self._closing or self._by_minor.get(md.minor) is not md or not md.deferred_remove:
                return
            if md.open_count or (self.exports is not None and self.exports.busy(md)):
                return
            log.info("%s: deferred removal", md.name)
            self._destroy(md)
            self._save()

    def _destroy(self, md: MappedDevice) -> None:
        """Flush, unregister and tear a device down (``__dm_destroy``)."""
        if self.exports is not None:
            self.exports.detach(md)
        if self._by_minor.get(md.minor) is md:
            del self._by_minor[md.minor]
            self._by_name.pop(md.name, None)
        self._policies.pop(md.minor, None)
        self._stats.pop(md.minor, None)
        self._unrestored.pop(md.minor, None)
        if not md.suspended:
            try:
                md.suspend(noflush=False)
            except DevmapperError:
                log.exception("%s: flushing before removal failed", md.name)
        md.kill()
        for table in (md.inactive, md.live):
            if table is not None:
                table.destroy()
        md.live = md.inactive = None

    def _on_idle(self, md: MappedDevice) -> None:
        """The last opener of a device marked for deferred removal went away."""
        with self._lock:
            if self._closing or self._by_minor.get(md.minor) is not md or md.open_count:
                return
            log.info("%s: deferred removal", md.name)
            self._destroy(md)
            self._save()

    def remove_all(self, *, deferred: bool = False, force: bool = False) -> list[str]:
        """Remove every device that is not open, repeatedly (``dm_hash_remove_all``); returns the
        names still there.  ``force`` first replaces tables with ``error`` where it can."""

        def op() -> list[str]:
            self._remove_idle()
            if force:
                for md in list(self._by_minor.values()):
                    self._wipe(md)
                self._remove_idle()
            left = sorted(self._by_name)
            if deferred:
                for name in left:
                    self._by_name[name].deferred_remove = True
            self._save()
            return left

        return self._locked(op)

    def _remove_idle(self) -> None:
        progress = True
        while progress:
            progress = False
            for md in sorted(self._by_minor.values(), key=lambda d: d.name):
                if not md.open_count and not (self.exports is not None and self.exports.busy(md)):
                    self._destroy(md)
                    progress = True

    def _wipe(self, md: MappedDevice) -> None:
        """``dmsetup wipe_table``: an error table of the same size, resumed without flushing."""
        size = md.live.length if md.live is not None else 0
        if not size:
            return
        try:
            new = self._construct(md, [TableLine(0, size, "error", "")], md.flag_read_only, None)
        except DmError:
            return  # immutable targets (pools) cannot be replaced
        old, md.inactive = md.inactive, new
        if old is not None:
            old.destroy()
        md.suspend(noflush=True)
        self._resume(md)

    def wipe_table(self, ref: DeviceRef) -> DeviceInfo:
        def op() -> DeviceInfo:
            md = self.find(ref)
            size = md.live.length if md.live is not None else 0
            new = self._construct(md, [TableLine(0, size, "error", "")], md.flag_read_only, None)
            old, md.inactive = md.inactive, new
            if old is not None:
                old.destroy()
            md.suspend(noflush=True)
            self._resume(md)
            self._save()
            return md.info()

        return self._locked(op)

    def rename(self, ref: DeviceRef, *, new_name: str | None = None, new_uuid: str | None = None) -> DeviceInfo:
        def op() -> DeviceInfo:
            md = self.find(ref)
            if new_uuid is not None:
                self._set_uuid(md, new_uuid)
            elif new_name is not None:
                _check_name(new_name)
                if new_name in self._by_name:
                    raise DmError(
                        "EBUSY", f"Unable to change name on mapped device {md.name} to one that already exists: "
                        f"{new_name}")
                del self._by_name[md.name]
                old_name = md.name
                md.rename(new_name)
                self._by_name[new_name] = md
                if self.exports is not None:
                    self.exports.renamed(md, old_name)
            self._save()
            return md.info()

        return self._locked(op)

    def _set_uuid(self, md: MappedDevice, uuid: str) -> None:
        if md.uuid:
            raise DmError(
                "EINVAL", f"Unable to change uuid of mapped device {md.name} to {uuid} because uuid is already set."
            )
        if not uuid or len(uuid) > MAX_UUID:
            raise DmError("EINVAL", "Invalid uuid")
        if any(d.uuid == uuid for d in self._by_minor.values()):
            raise DmError(
                "EBUSY", f"Unable to change uuid on mapped device {md.name} to one that already exists: {uuid}")
        md.uuid = uuid

    # -- messages --------------------------------------------------------------------------------

    def message(self, ref: DeviceRef, sector: int, text: str) -> str | None:
        def op() -> str | None:
            md = self.find(ref)
            argv = text.split()
            if not argv:
                raise DmError("EINVAL", "Empty message")
            if argv[0].startswith("@"):
                handled, response = self._core_message(md, argv)
                if handled:
                    self._save()
                    return response
            table = md.live
            if table is None:
                raise DmError("EINVAL", f"{md.name}: no live table to send the message to")
            if sector >= table.length:
                raise DmError("EINVAL", "Target message sector outside device.")
            target = next(t for t, _w, _p, _n in table.pieces(sector * 512, 1))
            response = target.message(argv)
            self._save()
            return response

        return self._locked(op)

    def _core_message(self, md: MappedDevice, argv: list[str]) -> tuple[bool, str | None]:
        if argv[0] == "@cancel_deferred_remove" and len(argv) == 1:
            md.deferred_remove = False
            return True, None
        if argv[0] == "@autoextend":
            return True, self._autoextend_message(md, argv[1:])
        return False, None

    def _autoextend_message(self, md: MappedDevice, args: list[str]) -> str | None:
        if not args:
            policy = self._policies.get(md.minor)
            stats = self._stats.get(md.minor, AutoextendStats())
            return "off" if policy is None else f"{policy.describe()} {stats.extensions}"
        if args == ["off"]:
            self._policies.pop(md.minor, None)
            return None
        self._set_policy(md, AutoextendPolicy.parse(args))
        return None

    def _set_policy(self, md: MappedDevice, policy: AutoextendPolicy) -> None:
        if not isinstance(md.single_target(), PoolTarget) and not (
            md.inactive is not None and isinstance(md.inactive.targets[0], PoolTarget)
        ):
            raise DmError("EINVAL", f"{md.name}: autoextend applies to thin-pool devices only")
        self._policies[md.minor] = policy
        self._stats.setdefault(md.minor, AutoextendStats())
        self.monitor.poke()

    # -- reports ---------------------------------------------------------------------------------

    def info(self, ref: DeviceRef) -> DeviceInfo:
        return self._locked(lambda: self.find(ref).info())

    def autoextend_info(self, ref: DeviceRef) -> tuple[AutoextendPolicy | None, AutoextendStats | None]:
        def op() -> tuple[AutoextendPolicy | None, AutoextendStats | None]:
            md = self.find(ref)
            return self._policies.get(md.minor), self._stats.get(md.minor)

        return self._locked(op)

    def node_of(self, minor: int) -> str | None:
        """The block device node (a loop device over the device's file) users mount, if exports run."""
        return None if self.exports is None else self.exports.node(minor)

    def autoextend_of(self, minor: int) -> tuple[AutoextendPolicy | None, AutoextendStats | None]:
        return self._policies.get(minor), self._stats.get(minor)

    def list_devices(self) -> list[DeviceInfo]:
        return self._locked(lambda: [self._by_name[n].info() for n in sorted(self._by_name)])

    def _table_of(self, md: MappedDevice, inactive: bool) -> Table | None:
        return md.inactive if inactive else md.live

    def table(self, ref: DeviceRef, *, inactive: bool = False) -> list[TableLine]:
        def op() -> list[TableLine]:
            table = self._table_of(self.find(ref), inactive)
            return [] if table is None else table.lines()

        return self._locked(op)

    def status(self, ref: DeviceRef, *, noflush: bool = False, inactive: bool = False) -> list[TableLine]:
        def op() -> list[TableLine]:
            md = self.find(ref)
            table = self._table_of(md, inactive)
            if table is None:
                return []
            quiet = noflush or md.suspended or inactive
            return [TableLine(t.start, t.length, t.type_name, t.status_params(quiet)) for t in table.targets]

        return self._locked(op)

    def deps(self, ref: DeviceRef, *, inactive: bool = False) -> list[tuple[str, tuple[int, int] | None]]:
        """The devices a table uses, newest first: (label, device number or None for files)."""

        def op() -> list[tuple[str, tuple[int, int] | None]]:
            table = self._table_of(self.find(ref), inactive)
            return [] if table is None else [(lw.label, lw.devno) for lw in table.deps()]

        return self._locked(op)

    def wait(self, ref: DeviceRef, event_nr: int, timeout: float | None = None) -> DeviceInfo:
        md = self._locked(lambda: self.find(ref))
        if not md.wait_event(event_nr, timeout):
            raise DmError("ETIME", f"{md.name}: no event within {timeout} s", logged=False)
        return md.info()

    @staticmethod
    def targets() -> list[tuple[str, tuple[int, int, int]]]:
        return [(t.type_name, t.version) for t in TARGET_TYPES]

    # -- I/O through the control socket (tools and tests) -----------------------------------------

    def read(self, ref: DeviceRef, offset: int, length: int) -> bytes:
        return self._locked(lambda: self.find(ref)).read(offset, length)

    def write(self, ref: DeviceRef, offset: int, data: bytes, fua: bool = False) -> None:
        self._locked(lambda: self.find(ref)).write(offset, data, fua)

    def flush(self, ref: DeviceRef) -> None:
        self._locked(lambda: self.find(ref)).flush()

    def discard(self, ref: DeviceRef, offset: int, length: int) -> None:
        self._locked(lambda: self.find(ref)).discard(offset, length)

    def write_zeroes(self, ref: DeviceRef, offset: int, length: int, fua: bool = False) -> None:
        self._locked(lambda: self.find(ref)).write_zeroes(offset, length, fua)

    def block_status(self, ref: DeviceRef, offset: int, length: int) -> list[Extent]:
        return self._locked(lambda: self.find(ref)).block_status(offset, length)

    def peek(self, ref: DeviceRef) -> MappedDevice:
        """The device ref names, without opening it (NBD looks exports up for INFO and LIST too)."""
        return self._locked(lambda: self.find(ref))

    def open_export(self, ref: DeviceRef) -> DeviceHandle:
        """An ``Export`` on a device for the NBD and FUSE adapters; it counts as an opener until closed."""
        return self._locked(lambda: self.find(ref).open_handle())

    # -- pool events and autoextend --------------------------------------------------------------

    def _pool_event(self, key: Key, event: PoolEvent) -> None:
        entry = self.pools.find(key)
        md = None if entry is None else self._by_minor.get(entry.owner)
        if md is not None:
            log.info("%s: pool event: %s", md.name, event.value)
            md.bump_event()
        self.monitor.poke()

    def autoextend_check(self) -> None:
        """Grow every pool whose policy is due (called by the monitor thread)."""
        with self._lock:
            if self._closing:
                return
            for minor, policy in list(self._policies.items()):
                md = self._by_minor.get(minor)
                target = None if md is None else md.single_target()
                if md is not None and isinstance(target, PoolTarget) and policy.enabled:
                    self._maybe_extend(md, target, policy)

    def _maybe_extend(self, md: MappedDevice, target: PoolTarget, policy: AutoextendPolicy) -> None:
        stats = self._stats.setdefault(md.minor, AutoextendStats())
        if extend_if_due(md, target, policy, stats, self.pools.grow):
            md.bump_event()
            self._save()

    # -- persistence -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        with self._lock:
            devices = [
                device_record(md, self._unrestored.get(m, {}), self._policies.get(m), self._stats.get(m))
                for m, md in sorted(self._by_minor.items())
            ]
            return {"version": STATE_VERSION, "devices": devices}

    def _save(self) -> None:
        if self.store is not None and not self._closing:
            self.store.save(self.state())

    def start(self) -> None:
        """Restore the saved devices and start the autoextend monitor."""
        with self._lock:
            if self.exports is not None:
                self.exports.start()
            if self.store is not None:
                self._restore(self.store.load())
            for md in self._by_minor.values():
                self._export(md)
        self.monitor.start()

    def _restore(self, state: dict[str, Any]) -> None:
        records: dict[int, dict[str, Any]] = {}
        for rec in state.get("devices", []):
            restored = device_from_record(rec)
            if restored is None:
                continue
            md, policy, stats = restored
            if md.name in self._by_name or md.minor in self._by_minor:
                log.error("skipping saved device %s: name or minor in use", md.name)
                continue
            self._register(md)
            if policy is not None:
                self._policies[md.minor] = policy
            if stats is not None:
                self._stats[md.minor] = stats
            records[md.minor] = rec
        for minor in restore_order(records):
            self._restore_tables(self._by_minor[minor], records[minor])

    def _restore_tables(self, md: MappedDevice, rec: dict[str, Any]) -> None:
        try:
            live, inactive = lines_from(rec.get("live")), lines_from(rec.get("inactive"))
            if live is not None:
                md.inactive = self._construct(md, live, md.flag_read_only, None)
                self._resume(md)
            if inactive is not None:
                md.inactive = self._construct(md, inactive, md.flag_read_only, None)
            if rec.get("suspended"):
                md.suspend(noflush=True)
        except (DevmapperError, OSError) as e:
            log.error("%s: could not restore its tables (%s); it stays without them until reloaded", md.name, e)
            if md.inactive is not None and md.live is None:
                md.inactive.destroy()
                md.inactive = None
            self._unrestored[md.minor] = rec

    def shutdown(self) -> None:
        """Stop the monitor, then flush and close every device, top of the stacks first.  The saved
        state is left as it is: the devices come back at the next start."""
        self.monitor.stop()
        if self.exports is not None:
            self.exports.close()
        with self._lock:
            if self.store is not None:
                self.store.save(self.state())
            self._closing = True
            devices = list(self._by_minor.values())
            for md in top_down(devices):
                try:
                    self._close_device(md)
                except Exception:
                    log.exception("%s: closing failed", md.name)
            self._by_minor.clear()
            self._by_name.clear()

    @staticmethod
    def _close_device(md: MappedDevice) -> None:
        if not md.suspended:
            md.suspend(noflush=False)
        md.kill()
        for table in (md.inactive, md.live):
            if table is not None:
                table.destroy()
        md.live = md.inactive = None

