"""Filesystems on thin devices: mkfs once, probe, mount, unmount, grow -- the driver's shell-outs.

Docker ran the same programs: ``mkfs.ext4 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0`` then
``tune2fs -c -1 -i 0`` (eager inode-table and journal initialisation, so that ext4's lazy-init
thread does not later write the tables again inside every snapshot and use pool space once per
layer), or ``mkfs.xfs``; ``mount`` with ``nouuid`` for xfs (every device of a chain shares the base
filesystem's UUID); and ``resize2fs``/``xfs_growfs`` on a mounted device to grow it.  ``probe``
reads the filesystem magic the way Docker did (``XFSB`` at 0, ext's ``0xEF53`` at 0x438).

Growing ext4 online needs CAP_SYS_RESOURCE for the resize inode's reserved blocks in some
sandboxes; when the online resize is refused we unmount, ``e2fsck -f -p`` and resize offline.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import subprocess
from pathlib import Path

from devmapper.errors import DevmapperError

__all__ = ["FsError", "grow", "mkfs", "mount", "probe", "syncfs", "umount"]

SUPPORTED = ("ext4", "xfs")


class FsError(DevmapperError):
    """A filesystem program failed; the message carries its output."""


def _run(*argv: str, ok: tuple[int, ...] = (0,)) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise FsError(f"{argv[0]}: not installed ({e})") from e
    if proc.returncode not in ok:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise FsError(f"{' '.join(argv)} failed (exit {proc.returncode}): {' / '.join(detail)}")
    return proc.stdout


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def syncfs(path: Path) -> None:
    """Write back one filesystem (``syncfs(2)``), not every filesystem on the host as ``sync`` does."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def mkfs(fs: str, device: str, extra: list[str]) -> None:
    if fs == "ext4":
        _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", *extra, device)
        _run("tune2fs", "-c", "-1", "-i", "0", device)
    elif fs == "xfs":
        _run("mkfs.xfs", "-q", "-f", *extra, device)
    else:
        raise FsError(f"Unsupported filesystem type {fs}")


def probe(device: str) -> str | None:
    """``ext4``, ``xfs`` or None, from the superblock magic (Docker's ProbeFsType)."""
    with open(device, "rb") as f:
        head = f.read(0x440)
    if head[:4] == b"XFSB":
        return "xfs"
    if len(head) >= 0x43A and head[0x438:0x43A] == b"\x53\xef":
        return "ext4"
    return None


def mount_options(fs: str, extra: list[str], read_only: bool = False) -> list[str]:
    opts: list[str] = []
    if fs == "xfs":
        opts.append("nouuid")
        if read_only:
            opts.append("norecovery")
    elif read_only:
        opts.append("noload")  # no journal replay: a read-only open must not write
    if read_only:
        opts.append("ro")
    opts.extend(o for o in extra if o)
    return opts


def mount(device: str, target: Path, fs: str, options: list[str]) -> None:
    argv = ["mount", "-t", fs]
    if options:
        argv += ["-o", ",".join(options)]
    _run(*argv, device, str(target))


def umount(target: Path, *, lazy: bool = False) -> None:
    """Unmount; ``lazy`` detaches even when busy (Docker's MNT_DETACH)."""
    _run("umount", *(["-l"] if lazy else []), str(target))


def is_mountpoint(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN  # a mount whose FUSE server died is still a mount


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below root, deepest first (from /proc/self/mountinfo)."""
    prefix = str(root.absolute()).rstrip("/") + "/"
    found: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if (point + "/").startswith(prefix):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def grow(fs: str, device: str, target: Path, options: list[str]) -> None:
    """Grow the filesystem on ``device`` to the device's size; ``target`` is where to mount it."""
    was_mounted = is_mountpoint(target)
    if not was_mounted:
        target.mkdir(parents=True, exist_ok=True)
        mount(device, target, fs, options)
    try:
        if fs == "xfs":
            _run("xfs_growfs", str(target))
            return
        try:
            _run("resize2fs", device)
            return
        except FsError as online_error:
            if was_mounted:
                raise
            umount(target)
            was_mounted = True  # nothing to unmount in the finally
            _run("e2fsck", "-f", "-p", device, ok=(0, 1))
            try:
                _run("resize2fs", device)
            except FsError as e:
                raise FsError(f"{e} (online: {online_error})") from e
    finally:
        if not was_mounted:
            umount(target)
