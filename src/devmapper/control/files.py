"""Durable small files: the one way the daemon's state and the layer store's records are written.

``replace_file`` is the sequence Docker used for its metadata files plus the step Docker skipped:
temporary file in the same directory, write, fsync, rename over the target, then fsync the
directory so that the rename itself survives a crash.  A failure never leaves the temporary file
behind.  Temporary names start with a caller-chosen prefix so that readers can skip leftovers
(Docker's loader skips names starting with ``.``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["fsync_dir", "replace_file", "write_fsynced"]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_fsynced(path: Path, data: bytes, mode: int, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` and fsync the file (not its directory)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, mode: int = 0o600, *, tmp_prefix: str | None = None) -> None:
    """Atomically replace ``path`` with ``data`` (see the module docstring)."""
    prefix = f".{path.name}.tmp-" if tmp_prefix is None else tmp_prefix
    tmp = path.with_name(f"{prefix}{secrets.token_hex(8)}")
    try:
        write_fsynced(tmp, data, mode, exclusive=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
