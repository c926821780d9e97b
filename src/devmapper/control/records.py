"""Saved device records: what ``devices.json`` holds for one device, and the order to restore them.

A record is a plain JSON object: name, uuid, minor, read-only flag, read-ahead, suspended flag,
event number, deferred-remove flag, the live and inactive tables in canonical form (``[start,
length, type, params]`` lists, as ``table`` prints them, so device references are ``253:N``,
``7:0`` or file paths), and the autoextend policy and counters.  Records are validated field by
field when read back; a malformed one is skipped (and logged) rather than stopping the daemon.

Restoring in dependency order (``restore_order``): a record whose tables name ``253:N`` comes after
device N.  Shutting down in the opposite order (``top_down``): a device before the devices under it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

from devmapper.control.autoextend import AutoextendPolicy, AutoextendStats
from devmapper.control.device import DEFAULT_READ_AHEAD, MappedDevice, Table
from devmapper.control.errors import DmError
from devmapper.control.lower import DM_MAJOR, MappedLower
from devmapper.control.table import TableLine
from devmapper.errors import DevmapperError

log = logging.getLogger(__name__)

__all__ = ["device_from_record", "device_record", "lines_from", "restore_order", "top_down"]

Record = dict[str, Any]
_DM_REF = re.compile(rf"\b{DM_MAJOR}:(\d+)\b")


def lines_json(table: Table) -> list[list[object]]:
    return [line.to_json() for line in table.lines()]


def lines_from(raw: object) -> list[TableLine] | None:
    """A saved table, or None if there was none; ``DmError`` if it is malformed."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise DmError("EINVAL", "malformed saved table")
    try:
        return [TableLine.from_json(item) for item in raw]
    except DevmapperError as e:
        raise DmError("EINVAL", f"malformed saved table: {e}") from e


def device_record(
    md: MappedDevice, saved: Record, policy: AutoextendPolicy | None, stats: AutoextendStats | None
) -> Record:
    """The record of a device; tables it could not restore come from its previous record (``saved``)."""
    return {
        "name": md.name, "uuid": md.uuid, "minor": md.minor, "read_only": md.flag_read_only,
        "read_ahead": md.read_ahead, "suspended": md.suspended, "event_nr": md.event_nr,
        "deferred_remove": md.deferred_remove,
        "live": lines_json(md.live) if md.live is not None else saved.get("live"),
        "inactive": lines_json(md.inactive) if md.inactive is not None else saved.get("inactive"),
        "autoextend": None if policy is None else policy.to_json(),
        "autoextend_stats": None if stats is None else stats.to_json(),
    }


def device_from_record(rec: Record) -> tuple[MappedDevice, AutoextendPolicy | None, AutoextendStats | None] | None:
    """A table-less device with the record's identity and flags, its policy and counters; None if the
    record is malformed."""
    try:
        md = MappedDevice(
            str(rec["name"]), str(rec.get("uuid", "")), int(rec["minor"]), read_only=bool(rec.get("read_only")),
            read_ahead=int(rec.get("read_ahead", DEFAULT_READ_AHEAD)),
        )
        md.event_nr = int(rec.get("event_nr", 0))
    except (KeyError, TypeError, ValueError):
        log.error("skipping a malformed saved device: %r", rec)
        return None
    md.deferred_remove = bool(rec.get("deferred_remove"))
    policy = None
    if isinstance(rec.get("autoextend"), dict):
        try:
            policy = AutoextendPolicy(int(rec["autoextend"]["threshold"]), int(rec["autoextend"]["percent"]))
        except (KeyError, TypeError, ValueError, DmError):
            log.error("%s: ignoring a malformed autoextend policy", md.name)
    raw_stats = rec.get("autoextend_stats")
    return md, policy, None if raw_stats is None else AutoextendStats.from_json(raw_stats)


def _dm_refs(rec: Record) -> set[int]:
    """Minors of our devices that a record's tables name (``253:N``)."""
    refs: set[int] = set()
    for key in ("live", "inactive"):
        for item in rec.get(key) or []:
            if isinstance(item, list) and len(item) == 4 and isinstance(item[3], str):
                refs.update(int(m) for m in _DM_REF.findall(item[3]))
    return refs


def restore_order(records: dict[int, Record]) -> Iterator[int]:
    """Minors in an order where every device comes after the devices its tables name.  A cycle
    (which a running daemon never saves) is broken arbitrarily."""
    todo = dict(records)
    while todo:
        ready = [m for m, rec in todo.items() if not (_dm_refs(rec) - {m}) & todo.keys()]
        for minor in ready or list(todo)[:1]:
            del todo[minor]
            yield minor


def _users(devices: Iterable[MappedDevice]) -> Iterator[tuple[MappedDevice, int]]:
    """(device, minor of a mapped device its tables use) pairs."""
    for md in devices:
        for table in (md.live, md.inactive):
            for lower in table.lowers if table is not None else []:
                if isinstance(lower, MappedLower):
                    yield md, lower.md.devno[1]


def top_down(devices: Iterable[MappedDevice]) -> list[MappedDevice]:
    """Devices ordered so that every device comes before the devices its tables use."""
    todo = list(devices)
    users = {md.minor: 0 for md in todo}
    for _md, minor in _users(todo):
        if minor in users:
            users[minor] += 1
    order: list[MappedDevice] = []
    while todo:
        free = [md for md in todo if users[md.minor] == 0] or todo[:1]
        for md in free:
            todo.remove(md)
            order.append(md)
            for _md, minor in _users([md]):
                if minor in users:
                    users[minor] -= 1
    return order
