"""The device-mapper as the layer store sees it: a few dmsetup verbs over the control protocol.

Docker's driver talked to the kernel through libdevmapper; we talk to our userspace device-mapper
through its request protocol (``devmapper.control.api``), either over the daemon's socket
(``Dm.connect``: mapped devices, their loop devices and mounts outlive this process, as with the
kernel) or in-process (``Dm.in_process``: for tools and tests that do not mount anything).  Both
paths send the same requests, so the layer store has one code path.

Errors come back as ``DmError`` carrying the errno name (``EBUSY``, ``EEXIST``, ``ENODATA``,
``ENXIO``) that Docker had to guess from libdm's log text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devmapper.control.api import handle
from devmapper.control.client import Client, connect
from devmapper.control.errors import DmError
from devmapper.control.manager import DeviceManager

__all__ = ["Dm", "DmError", "DmInfo"]

Caller = Callable[..., Any]

BUSY_RETRIES = 200  # Docker: 200 x 100 ms for a synchronous remove
BUSY_WAIT = 0.1


@dataclass(frozen=True)
class DmInfo:
    name: str
    minor: int
    open_count: int
    suspended: bool
    deferred_remove: bool
    live_table: bool
    node: str | None  # the loop device users mount, when the daemon exports devices


class Dm:
    def __init__(self, call: Caller, close: Callable[[], None] | None = None) -> None:
        self._call = call
        self._close = close

    @classmethod
    def connect(cls, runtime_dir: Path, start: Callable[[], None] | None = None) -> Dm:
        client: Client = connect(runtime_dir, start)
        return cls(client.call, client.close)

    @classmethod
    def in_process(cls, manager: DeviceManager) -> Dm:
        def call(op: str, **args: Any) -> Any:
            response = handle(manager, {"id": 0, "op": op, "args": args})
            if response["ok"]:
                return response.get("result")
            err = response["error"]
            raise DmError(str(err.get("errno") or "EIO"), str(err.get("reason") or ""))

        return cls(call)

    def close(self) -> None:
        if self._close is not None:
            self._close()

    # -- queries ---------------------------------------------------------------------------------

    def info(self, name: str) -> DmInfo | None:
        try:
            raw = self._call("info", device=name)
        except DmError as e:
            if e.errno_name == "ENXIO":
                return None
            raise
        return DmInfo(raw["name"], raw["minor"], raw["open_count"], raw["suspended"], raw["deferred_remove"],
                      raw["live_table"], raw.get("node"))

    def exists(self, name: str) -> bool:
        return self.info(name) is not None

    def table(self, name: str) -> list[tuple[int, int, str, str]]:
        return [tuple(line) for line in self._call("table", device=name)]

    def status(self, name: str) -> str:
        """The params of the first status line (a pool's or thin device's status fields)."""
        lines = self._call("status", device=name)
        return str(lines[0][3]) if lines else ""

    # -- changes ---------------------------------------------------------------------------------

    def create(self, name: str, table: list[tuple[int, int, str, str]], *, read_only: bool = False) -> None:
        """Create and activate a device with this table (``dmsetup create``)."""
        self._call("create", name=name, table=[list(line) for line in table], read_only=read_only)

    def reload(self, name: str, table: list[tuple[int, int, str, str]]) -> None:
        """Load a new table and resume, as Docker's ResizePool and seed 001's grow do."""
        self._call("load", device=name, table=[list(line) for line in table])
        self._call("suspend", device=name)
        self._call("resume", device=name)

    def suspend(self, name: str) -> None:
        self._call("suspend", device=name)

    def resume(self, name: str) -> None:
        self._call("resume", device=name)

    def message(self, name: str, text: str) -> str | None:
        result = self._call("message", device=name, sector=0, text=text)
        response = result.get("response") if isinstance(result, dict) else None
        return None if response is None else str(response)

    def remove(self, name: str, *, deferred: bool = False, retries: int = BUSY_RETRIES) -> None:
        """Deactivate; EBUSY is retried ``retries`` times 100 ms apart unless ``deferred``."""
        for attempt in range(retries + 1):
            try:
                self._call("remove", device=name, deferred=deferred)
                return
            except DmError as e:
                if e.errno_name == "ENXIO":
                    return
                if e.errno_name != "EBUSY" or deferred or attempt == retries:
                    raise
            time.sleep(BUSY_WAIT)

    def discard(self, name: str, offset: int, length: int) -> None:
        self._call("discard", device=name, offset=offset, length=length)

    def cancel_deferred_remove(self, name: str) -> None:
        try:
            self.message(name, "@cancel_deferred_remove")
        except DmError as e:
            if e.errno_name != "ENXIO":
                raise
