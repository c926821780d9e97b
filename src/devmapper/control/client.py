"""Talking to the daemon: a blocking client for the control socket, and starting the daemon on demand.

``Client.call(op, **args)`` sends one request and returns its result, or raises the ``DmError`` the
daemon answered with (errno, reason, stage, device number).  ``connect`` returns a client, starting
the daemon through the ``start`` callback when nobody listens (the CLI knows how to launch it) and
waiting up to ``wait`` seconds for the socket to answer; several clients may race to start it, the
daemons' locks let exactly one win and the others' clients simply connect to it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devmapper.control.endpoint import socket_address
from devmapper.control.errors import DmError
from devmapper.control.protocol import Decoder, decode_bytes, encode, encode_bytes
from devmapper.errors import DevmapperError
from devmapper.export import Extent

__all__ = ["Client", "DaemonUnavailableError", "connect"]


class DaemonUnavailableError(DevmapperError):
    """No daemon answers on the control socket (and none could be started)."""


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._decoder = Decoder()
        self._next_id = 0

    @classmethod
    def open(cls, runtime_dir: Path, timeout: float | None = None) -> Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            with socket_address(runtime_dir) as address:
                sock.connect(address)
        except OSError as e:
            sock.close()
            raise DaemonUnavailableError(f"cannot connect to the devmapper daemon in {runtime_dir}: {e}") from e
        sock.settimeout(None)
        return cls(sock)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def call(self, op: str, **args: Any) -> Any:
        self._next_id += 1
        rid = self._next_id
        self._sock.sendall(encode({"id": rid, "op": op, "args": args}))
        response = self._receive()
        if response.get("id") not in (rid, None):
            raise DmError("EPROTO", f"response {response.get('id')} to request {rid}")
        if response.get("ok"):
            return response.get("result")
        err = response.get("error") or {}
        devno = err.get("devno")
        raise DmError(
            str(err.get("errno") or "EIO"), str(err.get("reason") or ""), stage=err.get("stage"),
            devno=tuple(devno) if isinstance(devno, list) and len(devno) == 2 else None,
            logged=err.get("logged") is not False,
        )

    def _receive(self) -> dict[str, Any]:
        while True:
            data = self._sock.recv(1 << 20)
            if not data:
                raise DaemonUnavailableError("the devmapper daemon closed the connection")
            messages = self._decoder.feed(data)
            if messages:
                return messages[0]

    # -- I/O helpers -----------------------------------------------------------------------------

    def read(self, device: str, offset: int, length: int) -> bytes:
        return decode_bytes(self.call("read", device=device, offset=offset, length=length)["data"])

    def write(self, device: str, offset: int, data: bytes, fua: bool = False) -> None:
        self.call("write", device=device, offset=offset, data=encode_bytes(data), fua=fua)

    def flush(self, device: str) -> None:
        self.call("flush", device=device)

    def block_status(self, device: str, offset: int, length: int) -> list[Extent]:
        return [Extent(n, bool(h), bool(z)) for n, h, z in
                self.call("block_status", device=device, offset=offset, length=length)]


def connect(runtime_dir: Path, start: Callable[[], None] | None = None, wait: float = 20.0) -> Client:
    """A client of the daemon serving runtime_dir; ``start`` launches one if none answers."""
    try:
        return Client.open(runtime_dir)
    except DaemonUnavailableError:
        if start is None:
            raise
    start()
    deadline = time.monotonic() + wait
    while True:
        try:
            client = Client.open(runtime_dir)
            client.call("ping")
            return client
        except (DaemonUnavailableError, DmError, OSError):
            if time.monotonic() >= deadline:
                raise DaemonUnavailableError(
                    f"the devmapper daemon did not come up in {runtime_dir} within {wait:g} s"
                ) from None
            time.sleep(0.05)
