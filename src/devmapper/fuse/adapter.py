"""Serve a ``DeviceTree`` on a FUSE mount with libfuse3 through mfusepy (ctypes).

Theory of operation
-------------------
``FuseMount.start`` runs libfuse's multi-threaded loop (``fuse_main``) on a daemon thread and waits
for ``FUSE_INIT``, so the directory is usable when it returns.  The mount uses ``direct_io`` (no
page cache in front of the devices: every read and write reaches the export, which is what a loop
device with ``--direct-io=on`` on top expects) and zero attribute/entry timeouts (a table reload that
grows a device shows in ``stat`` at once).  libfuse installs its own SIGINT/SIGTERM/SIGHUP handlers
only where the process still has the default ones, so the daemon installs its handlers first.

``stop`` unmounts lazily (``fusermount3 -u -z``), which ends the loop even while a file is still
open, then joins the thread with a timeout: stopping never waits on a client.  A stale mount left by
a killed daemon ("transport endpoint is not connected") is unmounted the same way before mounting.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import mfusepy

from devmapper.fuse.vfs import DeviceTree, FileSource, VfsError

log = logging.getLogger(__name__)

__all__ = ["FuseMount", "FuseUnavailableError"]

INIT_TIMEOUT = 10.0


class FuseUnavailableError(OSError):
    """The FUSE mount could not be set up."""


def _name(path: str) -> str:
    if path.count("/") != 1 or path == "/":
        raise mfusepy.FuseOSError(errno.ENOENT)
    return path[1:]


def _fail(e: VfsError) -> mfusepy.FuseOSError:
    return mfusepy.FuseOSError(e.errno or errno.EIO)


class _Operations(mfusepy.Operations):  # type: ignore[misc]
    """FUSE callbacks (path based) -> ``DeviceTree`` calls."""

    use_ns = True

    def __init__(self, tree: DeviceTree, ready: threading.Event) -> None:
        self.tree = tree
        self.ready = ready
        self.uid, self.gid = os.getuid(), os.getgid()

    def init(self, path: str) -> None:
        self.ready.set()

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        try:
            a = self.tree.root_attr() if path == "/" else self.tree.attr(_name(path))
        except VfsError as e:
            raise _fail(e) from None
        return {"st_ino": a.ino, "st_mode": a.mode, "st_size": a.size, "st_nlink": a.nlink, "st_uid": self.uid,
                "st_gid": self.gid, "st_blksize": 4096, "st_blocks": (a.size + 511) // 512}

    def readdir(self, path: str, fh: Any) -> list[str]:
        if path != "/":
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", *self.tree.names()]

    def open(self, path: str, flags: int) -> int:
        try:
            self.tree.open(_name(path), (flags & os.O_ACCMODE) != os.O_RDONLY)
        except VfsError as e:
            raise _fail(e) from None
        return 0

    def release(self, path: str, fh: Any) -> int:
        self.tree.release(_name(path))
        return 0

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        try:
            return self.tree.read(_name(path), offset, size)
        except VfsError as e:
            raise _fail(e) from None

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        try:
            return self.tree.write(_name(path), offset, data)
        except VfsError as e:
            raise _fail(e) from None

    def fsync(self, path: str, datasync: int, fh: Any) -> int:
        try:
            self.tree.fsync(_name(path))
        except VfsError as e:
            raise _fail(e) from None
        return 0

    def flush(self, path: str, fh: Any) -> int:
        return 0

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        try:
            self.tree.truncate(_name(path), length)
        except VfsError as e:
            raise _fail(e) from None
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}


def lazy_unmount(mountpoint: Path) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is not None:
        subprocess.run([tool, "-u", "-z", "-q", str(mountpoint)], capture_output=True, check=False)


class FuseMount:
    """A ``DeviceTree`` mounted at ``directory``; implements the control plane's ``DeviceFiles``."""

    def __init__(self, directory: Path, tree: DeviceTree | None = None) -> None:
        self.directory = directory
        self.tree = tree or DeviceTree()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        if not os.path.exists("/dev/fuse"):
            raise FuseUnavailableError(errno.ENODEV, "/dev/fuse is missing")
        lazy_unmount(self.directory)  # a stale mount of a killed daemon
        self.directory.mkdir(parents=True, exist_ok=True)
        ready = threading.Event()
        ops = _Operations(self.tree, ready)

        def run() -> None:
            try:
                mfusepy.FUSE(ops, str(self.directory), foreground=True, nothreads=False, direct_io=True,
                             attr_timeout=0, entry_timeout=0, negative_timeout=0, allow_other=os.geteuid() == 0,
                             fsname="devmapper", subtype="devmapper")
            except BaseException as e:  # reported by start(), or logged when the loop ends
                self._error = e
                log.error("FUSE loop on %s ended: %s", self.directory, e)
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name="fuse-loop", daemon=True)
        self._thread.start()
        ready.wait(INIT_TIMEOUT)
        if self._error is not None or not self._thread.is_alive():
            raise FuseUnavailableError(errno.EIO, f"mounting {self.directory} failed: {self._error}")
        log.info("device files on %s", self.directory)

    def path(self, name: str) -> Path:
        return self.directory / name

    def add(self, name: str, export: FileSource) -> None:
        self.tree.add(name, export)

    def remove(self, name: str) -> None:
        self.tree.remove(name)

    def rename(self, old: str, new: str) -> None:
        self.tree.rename(old, new)

    def open_count(self, name: str) -> int:
        return self.tree.open_count(name)

    def stop(self) -> None:
        lazy_unmount(self.directory)
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                log.warning("the FUSE loop on %s did not stop", self.directory)
            self._thread = None
        try:
            self.directory.rmdir()
        except OSError:
            pass
