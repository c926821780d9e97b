"""NBD tests.  This directory is deliberately not a package: a package named ``nbd`` on the test
path would shadow python3-libnbd's ``nbd`` module.  Its helper modules (``nbd_wire``,
``nbd_memory``) are imported by name, from the path entry added here."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devmapper.nbd.server import NbdServer
from devmapper.thin.pool import Pool
from pool.support import make_pool_files

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

Serve = Callable[..., tuple[NbdServer, str]]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """``serve(exports, **NbdServer options) -> (server, unix socket path)``; shut down after the test.

    Sockets live in a short /tmp directory: unix socket paths are limited to 107 bytes."""
    started: list[tuple[NbdServer, str]] = []

    def start(exports: Any, **kw: Any) -> tuple[NbdServer, str]:
        d = tempfile.mkdtemp(prefix="nbdt-")
        server = NbdServer(exports, **kw)
        started.append((server, d))
        return server, server.serve_unix(os.path.join(d, "sock"))

    yield start
    for server, d in started:
        server.shutdown()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    """A pool of 128 data blocks (8 MiB) with thin 0 created; checked clean afterwards."""
    files = make_pool_files(tmp_path / "pool", data_blocks=128)
    pool = files.open()
    pool.create_thin(0)
    yield pool
    pool.close()
    files.check()
