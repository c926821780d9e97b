"""The daemon: it holds the mapped devices (the kernel's part) and serves the control socket.

Theory of operation
-------------------
``Daemon.start`` takes two exclusive locks -- ``<runtime dir>/daemon.lock`` and ``<state dir>/lock``
-- so that one daemon serves a runtime directory and one daemon owns a state directory; a second
daemon fails with ``DaemonRunningError``.  It then restores the saved devices (``DeviceManager``),
binds ``<runtime dir>/control`` (mode 0600; a stale socket left by a killed daemon is replaced) and
writes ``daemon.pid``.  ``serve_forever`` accepts connections, one thread each; a connection carries
any number of requests, answered in order (``protocol.py`` frames them, ``api.py`` runs them).  Devices
run in-process: their I/O happens on the threads of whoever calls them (connections today, the NBD
and FUSE exports later), pools add their own commit and event threads.

``request_shutdown`` (the ``shutdown`` request, or the CLI's signal handler) ends ``serve_forever``;
``close`` then stops the connections, shuts the manager down -- every device flushed, every pool
committed and closed, the state saved -- and removes the socket and pid file.  After SIGKILL none
of that happens, which is fine: the state file is always complete and pool metadata is crash-safe.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

from devmapper.control.api import handle
from devmapper.control.endpoint import LOCK_NAME, PID_NAME, SOCKET_NAME, socket_address
from devmapper.control.exports import ExportHub
from devmapper.control.manager import DeviceManager
from devmapper.control.protocol import Decoder, ProtocolError, encode, error_payload
from devmapper.control.state import StateStore
from devmapper.errors import DevmapperError

log = logging.getLogger(__name__)

__all__ = ["Daemon", "DaemonRunningError"]

RECV_SIZE = 1 << 20


class DaemonRunningError(DevmapperError):
    """Another daemon holds the runtime or state directory."""


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DaemonRunningError(f"another devmapper daemon holds {path}") from None
    return fd


class Daemon:
    def __init__(
        self, runtime_dir: Path, state_dir: Path, *, monitor_interval: float = 1.0, no_space_timeout: float = 60.0,
        exports: ExportHub | None = None,
    ) -> None:
        self.runtime_dir = runtime_dir
        self.state_dir = state_dir
        self.manager = DeviceManager(
            StateStore(state_dir), monitor_interval=monitor_interval, no_space_timeout=no_space_timeout
        )
        self.manager.exports = exports
        self._locks: list[int] = []
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._guard = threading.Lock()

    # -- start and stop --------------------------------------------------------------------------

    def start(self) -> None:
        self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._locks.append(_lock(self.runtime_dir / LOCK_NAME))
        try:
            self._locks.append(_lock(self.state_dir / "lock"))
            self.manager.start()
            self._listen()
            (self.runtime_dir / PID_NAME).write_text(f"{os.getpid()}\n")
        except BaseException:
            self._release()
            raise
        log.info("devmapper daemon %d serving %s (state in %s)", os.getpid(), self.runtime_dir, self.state_dir)

    def _listen(self) -> None:
        path = self.runtime_dir / SOCKET_NAME
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with socket_address(self.runtime_dir) as address:
            listener.bind(address)
        os.chmod(path, 0o600)
        listener.listen(64)
        listener.settimeout(0.5)
        self._listener = listener

    def serve_forever(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                raise
            conn.settimeout(None)
            thread = threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True)
            with self._guard:
                self._conns.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def request_shutdown(self) -> None:
        self._stopping.set()

    def close(self) -> None:
        """Stop serving, close every device (flush, commit) and clean the runtime directory up."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
            (self.runtime_dir / SOCKET_NAME).unlink(missing_ok=True)
        self.manager.shutdown()
        with self._guard:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        (self.runtime_dir / PID_NAME).unlink(missing_ok=True)
        self._release()
        log.info("devmapper daemon %d stopped", os.getpid())

    def _release(self) -> None:
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()

    # -- one connection --------------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        decoder = Decoder()
        try:
            while True:
                data = conn.recv(RECV_SIZE)
                if not data:
                    return
                for request in decoder.feed(data):
                    conn.sendall(encode(self._answer(request)))
        except ProtocolError as e:
            self._send_quietly(conn, {"id": None, "ok": False, "error": error_payload("EPROTO", str(e))})
        except OSError:
            pass  # the client went away
        finally:
            with self._guard:
                self._conns.discard(conn)
            conn.close()

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("op") == "shutdown":
            self.request_shutdown()
            return {"id": request.get("id"), "ok": True, "result": None}
        return handle(self.manager, request)

    @staticmethod
    def _send_quietly(conn: socket.socket, message: dict[str, Any]) -> None:
        try:
            conn.sendall(encode(message))
        except OSError:
            pass
