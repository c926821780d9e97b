"""Where the daemon listens: ``<runtime dir>/control``, a unix stream socket.

Unix socket paths are limited to 107 bytes.  A longer runtime directory (deep test directories) is
reached through ``/proc/self/fd/N/control``, N being an ``O_PATH`` descriptor of the directory, which
both ``bind`` and ``connect`` accept; ``socket_address`` yields the address to use and keeps the
descriptor open meanwhile.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_NAME", "PID_NAME", "SOCKET_NAME", "socket_address"]

SOCKET_NAME = "control"
PID_NAME = "daemon.pid"
LOCK_NAME = "daemon.lock"
MAX_SUN_PATH = 100


@contextmanager
def socket_address(runtime_dir: Path) -> Iterator[str]:
    path = str(runtime_dir / SOCKET_NAME)
    if len(path.encode()) <= MAX_SUN_PATH:
        yield path
        return
    fd = os.open(runtime_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_NAME}"
    finally:
        os.close(fd)
