"""Requests to manager calls: the daemon's side of the protocol, still without sockets.

``handle`` takes one decoded request and returns its response object.  Every operation checks the
types of its arguments before it calls the manager, so a malformed request is an ``EINVAL`` answer,
never a crash; errors become ``error_payload`` objects (a ``DmError`` keeps its stage and device
number for dmsetup's message); anything unexpected is logged with its traceback and answered
``EIO``.  The operations and their arguments are listed in ``HANDLERS``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

from devmapper.control.autoextend import AutoextendPolicy
from devmapper.control.errors import DmError
from devmapper.control.manager import DRIVER_VERSION, DeviceManager, DeviceRef
from devmapper.control.protocol import decode_bytes, encode_bytes, error_payload
from devmapper.control.table import TableLine
from devmapper.errors import DevmapperError
from devmapper.export import errno_of

log = logging.getLogger(__name__)

__all__ = ["HANDLERS", "handle"]

Args = dict[str, Any]
Handler = Callable[[DeviceManager, Args], Any]


def _get(args: Args, key: str, kind: type, default: Any = None) -> Any:
    value = args.get(key, default)
    if value is None and default is None:
        return None
    if kind is int and isinstance(value, bool):
        raise DmError("EINVAL", f"argument {key!r} must be an integer")
    if not isinstance(value, kind):
        raise DmError("EINVAL", f"argument {key!r} must be {kind.__name__}")
    return value


def _ref(args: Args) -> DeviceRef:
    return DeviceRef.from_json(args.get("device"))


def _table(args: Args, key: str = "table") -> list[TableLine] | None:
    raw = args.get(key)
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise DmError("EINVAL", "table must be a list of lines")
    try:
        return [TableLine.from_json(line) for line in raw]
    except DevmapperError as e:
        raise DmError("EINVAL", str(e)) from e


def _policy(args: Args) -> AutoextendPolicy | None:
    raw = args.get("autoextend")
    if raw is None:
        return None
    if isinstance(raw, str):
        return AutoextendPolicy.parse([raw])
    if isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, int) for x in raw):
        return AutoextendPolicy(raw[0], raw[1])
    raise DmError("EINVAL", "autoextend must be [threshold, percent]")


def _info_json(manager: DeviceManager, info: Any) -> dict[str, Any]:
    out: dict[str, Any] = dataclasses.asdict(info)
    policy, stats = manager.autoextend_of(info.minor)
    out["autoextend"] = None if policy is None else policy.to_json()
    out["autoextend_status"] = None if stats is None or policy is None else stats.describe()
    out["node"] = manager.node_of(info.minor)
    return out


def _lines(lines: list[TableLine]) -> list[list[object]]:
    return [line.to_json() for line in lines]


def _create(m: DeviceManager, a: Args) -> Any:
    info = m.create(
        _get(a, "name", str, ""), uuid=_get(a, "uuid", str, ""), table=_table(a),
        read_only=_get(a, "read_only", bool, False), minor=_get(a, "minor", int),
        read_ahead=_get(a, "read_ahead", int), autoextend=_policy(a), cwd=_get(a, "cwd", str),
    )
    return _info_json(m, info)


def _load(m: DeviceManager, a: Args) -> Any:
    table = _table(a)
    if table is None:
        raise DmError("EINVAL", "no table given")
    info = m.load(_ref(a), table, read_only=_get(a, "read_only", bool, False), autoextend=_policy(a),
                  cwd=_get(a, "cwd", str))
    return _info_json(m, info)


def _rename(m: DeviceManager, a: Args) -> Any:
    return _info_json(m, m.rename(_ref(a), new_name=_get(a, "new_name", str), new_uuid=_get(a, "new_uuid", str)))


def _message(m: DeviceManager, a: Args) -> Any:
    sector = _get(a, "sector", int, 0)
    if sector < 0:
        raise DmError("EINVAL", "Invalid sector.")
    return {"response": m.message(_ref(a), sector, _get(a, "text", str, ""))}


def _deps(m: DeviceManager, a: Args) -> Any:
    return [[label, None if devno is None else list(devno)]
            for label, devno in m.deps(_ref(a), inactive=_get(a, "inactive", bool, False))]


def _wait(m: DeviceManager, a: Args) -> Any:
    timeout = a.get("timeout")
    if timeout is not None and not isinstance(timeout, (int, float)):
        raise DmError("EINVAL", "timeout must be a number")
    return _info_json(m, m.wait(_ref(a), _get(a, "event_nr", int, 0), timeout))


def _tree(m: DeviceManager, a: Args) -> Any:
    nodes = []
    for info in m.list_devices():
        ref = DeviceRef(name=info.name)
        nodes.append({"info": _info_json(m, info), "deps": _deps(m, {"device": info.name}),
                      "inactive_deps": [[lb, None if d is None else list(d)] for lb, d in m.deps(ref, inactive=True)]})
    return nodes


def _read(m: DeviceManager, a: Args) -> Any:
    return {"data": encode_bytes(m.read(_ref(a), _get(a, "offset", int, 0), _get(a, "length", int, 0)))}


def _write(m: DeviceManager, a: Args) -> Any:
    m.write(_ref(a), _get(a, "offset", int, 0), decode_bytes(a.get("data")), _get(a, "fua", bool, False))


def _extents(m: DeviceManager, a: Args) -> Any:
    extents = m.block_status(_ref(a), _get(a, "offset", int, 0), _get(a, "length", int, 0))
    return [[e.length, e.hole, e.zero] for e in extents]


HANDLERS: dict[str, Handler] = {
    "ping": lambda m, a: {"pid": os.getpid()},
    "version": lambda m, a: {"driver": ".".join(map(str, DRIVER_VERSION))},
    "targets": lambda m, a: [[name, ".".join(map(str, v))] for name, v in m.targets()],
    "list": lambda m, a: [_info_json(m, info) for info in m.list_devices()],
    "create": _create,
    "load": _load,
    "clear": lambda m, a: _info_json(m, m.clear(_ref(a))),
    "resume": lambda m, a: _info_json(m, m.resume(_ref(a))),
    "suspend": lambda m, a: _info_json(m, m.suspend(_ref(a), noflush=_get(a, "noflush", bool, False))),
    "remove": lambda m, a: dataclasses.asdict(m.remove(_ref(a), deferred=_get(a, "deferred", bool, False))),
    "remove_all": lambda m, a: m.remove_all(deferred=_get(a, "deferred", bool, False),
                                            force=_get(a, "force", bool, False)),
    "wipe_table": lambda m, a: _info_json(m, m.wipe_table(_ref(a))),
    "rename": _rename,
    "message": _message,
    "info": lambda m, a: _info_json(m, m.info(_ref(a))),
    "table": lambda m, a: _lines(m.table(_ref(a), inactive=_get(a, "inactive", bool, False))),
    "status": lambda m, a: _lines(m.status(_ref(a), noflush=_get(a, "noflush", bool, False),
                                           inactive=_get(a, "inactive", bool, False))),
    "deps": _deps,
    "tree": _tree,
    "wait": _wait,
    "read": _read,
    "write": _write,
    "flush": lambda m, a: m.flush(_ref(a)),
    "discard": lambda m, a: m.discard(_ref(a), _get(a, "offset", int, 0), _get(a, "length", int, 0)),
    "write_zeroes": lambda m, a: m.write_zeroes(_ref(a), _get(a, "offset", int, 0), _get(a, "length", int, 0),
                                                _get(a, "fua", bool, False)),
    "block_status": _extents,
}


def handle(manager: DeviceManager, request: dict[str, Any]) -> dict[str, Any]:
    """The response to one request (never raises)."""
    rid = request.get("id")
    op, args = request.get("op"), request.get("args", {})
    handler = HANDLERS.get(op) if isinstance(op, str) else None
    if handler is None or not isinstance(args, dict):
        return {"id": rid, "ok": False, "error": error_payload("EINVAL", f"unknown operation {op!r}")}
    try:
        return {"id": rid, "ok": True, "result": handler(manager, args)}
    except DmError as e:
        if e.reason:
            log.info("device-mapper: %s", e.reason)
        return {"id": rid, "ok": False, "error": error_payload(e.errno_name, e.reason, e.stage, e.devno, e.logged)}
    except DevmapperError as e:
        return {"id": rid, "ok": False, "error": error_payload(errno_of(e), str(e))}
    except Exception as e:
        log.exception("%s failed", op)
        return {"id": rid, "ok": False, "error": error_payload("EIO", f"internal error: {e}")}
