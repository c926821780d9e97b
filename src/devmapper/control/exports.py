"""Mapped devices as files and block devices: the hook the manager calls on create/resize/remove/rename.

Theory of operation
-------------------
The kernel gives every mapped device a block device node and udev links ``/dev/mapper/NAME`` to it.
We cannot create block devices from userspace, so the daemon publishes each device as a file on a
FUSE mount (``DeviceFiles``, provided by ``devmapper.fuse.adapter`` and wired in by the CLI; this
module does not import it) and, as root, backs a loop device with that file (``losetup
--direct-io=on``) and links ``<mapper dir>/NAME`` to the loop device.  ``mkfs``/``mount`` then work
on ``/dev/mapper/NAME`` as with the kernel.

``ExportHub`` keeps that view in step with the manager, which calls it under its lock:

* ``refresh`` after create and every resume: add the file; attach a loop device once the device
  has a size; ``losetup -c`` when the size changed (a grown table grows the loop device).
* ``busy`` before remove: the loop device is held exclusively (mounted, or opened ``O_EXCL``), or
  the file is open by someone else.  The manager then refuses (EBUSY) or, with ``deferred``,
  ``defer`` polls until the holder goes and calls the manager back.
* ``detach`` on removal: unlink the mapper link, detach the loop device, drop the file.
* ``renamed`` moves the file and the link.  ``close`` (daemon shutdown) detaches everything and
  unmounts lazily, so shutdown never waits on a user of a device.

The files' I/O reaches the device directly (an uncounted ``Export``), never the manager lock, so
FUSE requests issued while the manager holds its lock (``losetup -c``, a loop detach) cannot deadlock.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from devmapper.control.device import DeviceView, MappedDevice
from devmapper.export import Export

log = logging.getLogger(__name__)

__all__ = ["DeviceFiles", "ExportHub"]

DEFER_POLL = 0.2


class DeviceFiles(Protocol):
    """A directory of device files (the FUSE mount)."""

    directory: Path

    def start(self) -> None: ...

    def path(self, name: str) -> Path: ...

    def add(self, name: str, export: Export) -> None: ...

    def remove(self, name: str) -> None: ...

    def rename(self, old: str, new: str) -> None: ...

    def open_count(self, name: str) -> int: ...

    def stop(self) -> None: ...




def _run(*argv: str) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(errno.EIO, f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


class _Entry:
    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: str | None = None
        self.size = 0


class ExportHub:
    """Files, loop devices and mapper links for every device; see the module docstring."""

    def __init__(self, files: DeviceFiles, mapper_dir: Path | None) -> None:
        self.files = files
        self.mapper_dir = mapper_dir  # None: no loop devices, no links
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def start(self) -> None:
        """Mount the files; if that fails the daemon runs on without them (logged)."""
        self._detach_stale()  # before mounting: a lazy unmount would hide which files they were on
        try:
            self.files.start()
        except OSError as e:
            log.error("no device files: %s", e)
            self._closing.set()
            return
        if self.mapper_dir is not None:
            self.mapper_dir.mkdir(parents=True, exist_ok=True)

    def _detach_stale(self) -> None:
        """Detach loop devices (and drop their links) left on our files by a daemon that was killed."""
        prefix = f"{self.files.directory}/"
        try:
            listing = _run("losetup", "-l", "-n", "--raw", "-O", "NAME,BACK-FILE")
        except OSError as e:
            log.warning("cannot list loop devices: %s", e)
            return
        for line in listing.splitlines():
            loop, _, back = line.partition(" ")
            if not back.startswith(prefix):
                continue
            name = back[len(prefix) :].removesuffix(" (deleted)")
            log.info("detaching %s left on %s by an earlier daemon", loop, back)
            self._drop_link(name, loop)
            try:
                _run("losetup", "-d", loop)
            except OSError as e:
                log.warning("%s", e)

    def _link(self, name: str) -> Path | None:
        return None if self.mapper_dir is None else self.mapper_dir / name

    def _place_link(self, name: str, loop: str) -> None:
        link = self._link(name)
        if link is None:
            return
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            log.error("%s exists and is not a link; not replacing it", link)
            return
        link.symlink_to(loop)

    def _drop_link(self, name: str, loop: str | None) -> None:
        link = self._link(name)
        if link is not None and link.is_symlink() and (loop is None or os.readlink(link) == loop):
            link.unlink()

    def refresh(self, md: MappedDevice) -> None:
        """After create or resume: the file exists, the loop device exists and has the device's size."""
        if self._closing.is_set():
            return
        with self._lock:
            entry = self._entries.get(md.minor)
            if entry is None:
                entry = self._entries[md.minor] = _Entry(md.name)
                try:
                    self.files.add(md.name, DeviceView(md))
                except OSError as e:
                    log.error("%s: no device file: %s", md.name, e)
            size = md.size()
            try:
                if self.mapper_dir is not None and size and entry.loop is None:
                    entry.loop = _run("losetup", "--direct-io=on", "-f", "--show", str(self.files.path(md.name)))
                    self._place_link(md.name, entry.loop)
                elif entry.loop is not None and size != entry.size:
                    _run("losetup", "-c", entry.loop)
            except OSError as e:
                log.error("%s: loop device: %s", md.name, e)
            entry.size = size

    def node(self, minor: int) -> str | None:
        """The loop device standing for a device (what ``/dev/mapper/NAME`` links to), if it has one."""
        entry = self._entries.get(minor)
        return None if entry is None else entry.loop

    def busy(self, md: MappedDevice) -> bool:
        entry = self._entries.get(md.minor)
        if entry is None:
            return False
        if entry.loop is not None:
            try:
                fd = os.open(entry.loop, os.O_RDONLY | os.O_EXCL)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    return True
            else:
                os.close(fd)
        return self.files.open_count(entry.name) > (0 if entry.loop is None else 1)

    def defer(self, md: MappedDevice, remove: Callable[[], None]) -> None:
        """Call ``remove`` (without holding anything) once the device is no longer busy."""

        def watch() -> None:
            while not self._closing.wait(DEFER_POLL):
                if not md.deferred_remove or md.minor not in self._entries:
                    return
                if not self.busy(md):
                    remove()
                    return

        threading.Thread(target=watch, name=f"deferred-{md.name}", daemon=True).start()

    def detach(self, md: MappedDevice) -> None:
        with self._lock:
            entry = self._entries.pop(md.minor, None)
            if entry is not None:
                self._detach(entry)

    def _detach(self, entry: _Entry) -> None:
        self._drop_link(entry.name, entry.loop)
        if entry.loop is not None:
            try:
                _run("losetup", "-d", entry.loop)
            except OSError as e:
                log.error("%s: %s", entry.name, e)
        self.files.remove(entry.name)

    def renamed(self, md: MappedDevice, old: str) -> None:
        with self._lock:
            entry = self._entries.get(md.minor)
            if entry is None:
                return
            self.files.rename(old, md.name)
            entry.name = md.name
            if entry.loop is not None:
                self._drop_link(old, entry.loop)
                self._place_link(md.name, entry.loop)

    def close(self) -> None:
        if self._closing.is_set() and not self._entries:
            return
        self._closing.set()
        with self._lock:
            for entry in self._entries.values():
                self._detach(entry)
            self._entries.clear()
        self.files.stop()
