"""Layer tars: apply one safely to a root filesystem (the graph driver's ``ApplyDiff``).

Theory of operation
-------------------
Docker's devicemapper graph driver stores each layer as a thin snapshot of its parent with the
layer's tar applied on top (``ApplyDiff``, through the "naive diff" wrapper).  This module does the
applying, on a plain directory: the caller mounts the device and passes its root, ``rootfs``.

Applying (``apply_layer``) reads an uncompressed tar sequentially and follows the AUFS whiteout
convention:

* ``dir/.wh.NAME`` deletes ``dir/NAME`` (a file or a whole tree) and is not created itself;
* ``dir/.wh..wh..opq`` makes ``dir`` opaque: every entry below it that this tar did not add, before
  or after the marker, is deleted;
* other ``.wh..wh.*`` names are AUFS bookkeeping and are skipped, except the top-level hard-link
  directory ``.wh..wh.plnk``: it is extracted like anything else, so that hard links into it resolve,
  and removed when the tar ends;
* an entry replaces whatever is at its path, except that a directory entry over an existing
  directory keeps the contents and only updates the metadata.  Missing parent directories are
  created with mode 0755;
* ownership (numeric, ``lchown``), permission bits including setuid/setgid/sticky, extended attributes
  (PAX ``SCHILY.xattr.*``) and access/modification times are applied in that order (``chown`` clears
  setuid bits and file capabilities, so it goes first).  Directory times and final modes are applied
  after the last entry, deepest first, because adding children changes a directory's mtime.

Extended attributes the filesystem refuses: ``EPERM`` is always tolerated (the kernel refuses
``user.*`` on symlinks and device nodes, and ``trusted.*``/``security.*`` need privileges), as Docker
does.  ``ENOTSUP`` is tolerated for every namespace but ``user.*``; for ``user.*`` only with
``best_effort_xattrs`` (Docker's ``BestEffortXattrs``), because those attributes are the image's
own data.  Skipped attributes are counted in ``ApplyStats.xattrs_skipped``.

Safety invariant: nothing outside ``rootfs`` is ever created, modified, chowned or deleted, and no
symlink in ``rootfs`` is ever followed while writing.  Names are cleaned lexically first: empty and
``.`` components are dropped, a leading ``/`` means ``rootfs`` (Docker does the same), and a ``..``
that would climb above ``rootfs`` is refused, absolute name or not.  Every filesystem call then names
its target relative to a directory descriptor (``dir_fd=``) obtained by opening each component from
``rootfs`` down with ``O_NOFOLLOW|O_DIRECTORY``; a component that is a symlink is refused, final
components are never followed (``O_NOFOLLOW``, ``O_EXCL``, ``follow_symlinks=False``), and trees are
removed with ``shutil.rmtree(dir_fd=...)``, which does not follow symlinks either.  ``setxattr`` has no
``dir_fd`` form, so attributes of symlinks, FIFOs and devices are set through the parent descriptor's
``/proc/self/fd`` link, which names that directory itself (``/proc`` must be mounted, as glibc's
``fchmodat(AT_SYMLINK_NOFOLLOW)`` needs it too).  A symlink entry's
target may point anywhere: absolute targets are normal in root filesystems, and they are only ever
stored, never followed.  Hard-link targets must be relative names inside ``rootfs`` reached without
symlinks.  Device nodes need ``allow_devices``.  Refusals raise ``UnsafeArchiveError``; changes made
inside ``rootfs`` before the refusal stay (the caller throws the layer's device away).

Writing layer tars from trees, and finding what changed between two trees, is in
``devmapper.layers.changes``.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO

from devmapper.errors import DevmapperError

__all__ = ["ApplyStats", "ArchiveError", "UnsafeArchiveError", "apply_layer"]

log = logging.getLogger(__name__)

RelPath = tuple[str, ...]

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
WHITEOUT_LINK_DIR = ".wh..wh.plnk"
XATTR_PAX_PREFIX = "SCHILY.xattr."

_CHUNK = 1 << 20
_NS = 1_000_000_000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_IMPLICIT_DIR_MODE = 0o755
_TOLERATED_NOTSUP = (errno.ENOTSUP, errno.EOPNOTSUPP)


class ArchiveError(DevmapperError):
    """A layer tar cannot be read or applied, or a tree cannot be written as one."""

    def __init__(self, entry: str, reason: str) -> None:
        where = f"layer tar entry {entry!r}" if entry else "layer tar"
        super().__init__(f"{where}: {reason}")
        self.entry = entry
        self.reason = reason


class UnsafeArchiveError(ArchiveError):
    """A layer tar entry would reach outside the root filesystem, or is not allowed there."""


@dataclass(slots=True)
class ApplyStats:
    """What ``apply_layer`` did."""

    entries: int = 0  # tar members processed, whiteouts and skipped ones included
    whiteouts: int = 0  # whiteouts applied, plain and opaque
    tar_bytes: int = 0  # bytes read from the stream, to its end
    content_bytes: int = 0  # sum of member sizes: what Docker's UnpackLayer returns as the layer size
    xattrs_skipped: int = 0  # extended attributes the filesystem refused (see the module docstring)


# --- reading the stream -------------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """The layer stream as tarfile sees it: counts bytes and reports progress."""

    def __init__(self, stream: BinaryIO, progress: Callable[[int], None] | None) -> None:
        super().__init__()
        self._stream = stream
        self._progress = progress
        self.nr_bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        data = self._stream.read(size)
        if data:
            self.nr_bytes += len(data)
            if self._progress is not None:
                self._progress(self.nr_bytes)
        return data

    def drain(self) -> None:
        """Read to the end: callers hash the whole stream, padding after the end marker included."""
        while self.read(_CHUNK):
            pass


# The two header conditions that end an archive normally: a zero block (the end marker), or the stream
# ending right at a block boundary (Go's reader accepts that too).  Any other bad header after the first
# would make tarfile stop silently, applying half a layer.  The type stubs do not name these classes.
_END_OF_ARCHIVE: tuple[type[Exception], ...] = tuple(
    getattr(tarfile, name) for name in ("EOFHeaderError", "EmptyHeaderError")
)


class _LayerTarInfo(tarfile.TarInfo):
    """tarfile's header reader, refusing truncated and corrupt headers instead of ending early."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> _LayerTarInfo:
        try:
            return super().fromtarfile(tar)
        except _END_OF_ARCHIVE:
            raise
        except tarfile.HeaderError as err:
            raise ArchiveError("", f"bad tar stream at byte {tar.offset}: {err}") from err


class _LayerTar(tarfile.TarFile):
    """tarfile's reader, naming the list it keeps every header in (the type stubs leave it out)."""

    members: list[tarfile.TarInfo]


def _next_member(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except (tarfile.TarError, ValueError) as err:
        raise ArchiveError("", f"bad tar stream: {err}") from err


def _members(reader: _CountingReader) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Each member with the open tar to read its body from; an empty stream is an empty layer."""
    try:
        tar = _LayerTar.open(
            fileobj=reader, mode="r|", encoding="utf-8", errors="surrogateescape", tarinfo=_LayerTarInfo
        )
    except tarfile.ReadError as err:
        if reader.nr_bytes:
            raise ArchiveError("", f"not a tar stream: {err}") from err
        return
    with tar:
        while (member := _next_member(tar)) is not None:
            yield member, tar
            tar.members.clear()  # stream mode would otherwise keep every header until the end


# --- names and metadata -------------------------------------------------------------------------


def clean_name(name: str, entry: str, what: str = "path") -> RelPath:
    """Lexically clean a member name; a leading "/" means the root, climbing above it is refused."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise UnsafeArchiveError(entry, f"{what} leaves the root filesystem")
            parts.pop()
        else:
            parts.append(part)
    return tuple(parts)


def _pax_time_ns(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int((Decimal(value) * _NS).to_integral_value(rounding=ROUND_FLOOR))
    except (InvalidOperation, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class _Meta:
    """The metadata a member asks for."""

    uid: int
    gid: int
    mode: int
    atime_ns: int
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, member: tarfile.TarInfo) -> _Meta:
        pax = member.pax_headers
        mtime = _pax_time_ns(pax.get("mtime"))
        if mtime is None:
            mtime = int(member.mtime) * _NS
        atime = _pax_time_ns(pax.get("atime"))
        xattrs = sorted(
            (key[len(XATTR_PAX_PREFIX) :], value.encode("utf-8", "surrogateescape"))
            for key, value in pax.items()
            if key.startswith(XATTR_PAX_PREFIX)
        )
        return cls(
            uid=member.uid,
            gid=member.gid,
            mode=stat.S_IMODE(member.mode),
            atime_ns=max(atime if atime is not None else mtime, mtime),  # Docker: never before mtime
            mtime_ns=mtime,
            xattrs=tuple(xattrs),
        )


@dataclass(frozen=True, slots=True)
class _DeferredDir:
    """Final mode and times of a directory, applied once all entries are in."""

    meta: _Meta
    dev: int
    ino: int


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_at(dir_fd: int, name: str) -> None:
    """Delete ``name`` (a whole tree if it is a directory) without following symlinks; missing is fine."""
    st = _lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _open_child_dir(dir_fd: int, name: str) -> int | None:
    """Open a child that is a real directory (not a symlink to one); None otherwise."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


# --- applying -----------------------------------------------------------------------------------


class _Applier:
    """Applies members one by one below a descriptor of ``rootfs`` (see the safety invariant)."""

    def __init__(
        self, rootfs: Path, *, allow_devices: bool, same_owner: bool, best_effort_xattrs: bool, stats: ApplyStats
    ) -> None:
        try:
            self._root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise ArchiveError("", f"cannot open the root filesystem {os.fspath(rootfs)!r}: {err.strerror}") from err
        self._allow_devices = allow_devices
        self._same_owner = same_owner
        self._best_effort_xattrs = best_effort_xattrs
        self._stats = stats
        self._added: set[RelPath] = set()  # paths this tar created, for opaque directories
        self._added_parents: set[RelPath] = set()  # strict ancestors of those
        self._dirs: dict[RelPath, _DeferredDir] = {}
        self._saw_link_dir = False

    def close(self) -> None:
        os.close(self._root_fd)

    # walking down from rootfs

    def _walk(self, parts: RelPath, entry: str, *, create: bool, lenient: bool = False, what: str = "") -> int | None:
        """Descriptor of the directory ``parts``, opened component by component without following symlinks.

        Missing components are created (``create``) or give None.  A component that is a symlink is
        refused, or gives None when ``lenient``.  The caller closes the descriptor.
        """
        fd = os.dup(self._root_fd)
        try:
            for depth, name in enumerate(parts, 1):
                child = self._step(fd, name, parts[:depth], entry, create=create, lenient=lenient, what=what)
                os.close(fd)
                fd = -1
                if child is None:
                    return None
                fd = child
            return fd
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def _step(
        self, dir_fd: int, name: str, shown: RelPath, entry: str, *, create: bool, lenient: bool, what: str
    ) -> int | None:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create:
                return None
        except OSError as err:
            if err.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            if lenient:
                return None
            st = _lstat_at(dir_fd, name)
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise UnsafeArchiveError(
                    entry, f"{what}path component {'/'.join(shown)!r} is a symbolic link; refusing to go through it"
                ) from None
            raise ArchiveError(entry, f"{what}path component {'/'.join(shown)!r} is not a directory") from None
        os.mkdir(name, 0o700, dir_fd=dir_fd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        os.chmod(fd, _IMPLICIT_DIR_MODE)  # mkdir's mode is masked by the umask, which a library must not change
        return fd

    @contextmanager
    def _directory(self, parts: RelPath, entry: str, *, create: bool, what: str = "") -> Iterator[int | None]:
        fd = self._walk(parts, entry, create=create, what=what)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    # metadata

    def _set_xattrs(self, target: int | str, meta: _Meta, entry: str) -> None:
        for key, value in meta.xattrs:
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as err:
                tolerated = err.errno == errno.EPERM or (
                    err.errno in _TOLERATED_NOTSUP and (self._best_effort_xattrs or not key.startswith("user."))
                )
                if not tolerated:
                    raise ArchiveError(entry, f"cannot set extended attribute {key!r}: {err.strerror}") from err
                log.debug("layer tar entry %r: skipped extended attribute %r: %s", entry, key, err.strerror)
                self._stats.xattrs_skipped += 1

    def _set_meta_fd(self, fd: int, meta: _Meta, entry: str, *, mode: int | None = None) -> None:
        if self._same_owner:
            os.chown(fd, meta.uid, meta.gid)
        self._set_xattrs(fd, meta, entry)
        os.chmod(fd, meta.mode if mode is None else mode)
        os.utime(fd, ns=(meta.atime_ns, meta.mtime_ns))

    def _set_meta_at(self, dir_fd: int, name: str, meta: _Meta, entry: str, *, chmod: bool) -> None:
        if self._same_owner:
            os.chown(name, meta.uid, meta.gid, dir_fd=dir_fd, follow_symlinks=False)
        # setxattr has no dir_fd form; the descriptor's /proc link resolves to the directory itself
        self._set_xattrs(f"/proc/self/fd/{dir_fd}/{name}", meta, entry)
        if chmod:
            os.chmod(name, meta.mode, dir_fd=dir_fd, follow_symlinks=False)
        os.utime(name, ns=(meta.atime_ns, meta.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

    # members

    def apply(self, member: tarfile.TarInfo, source: tarfile.TarFile) -> None:
        """Apply one member; its body, if any, is read from ``source``."""
        self._stats.entries += 1
        self._stats.content_bytes += member.size
        entry = member.name
        try:
            self._apply(member, source, entry)
        except OSError as err:
            raise ArchiveError(entry, err.strerror or str(err)) from err
        except tarfile.TarError as err:
            raise ArchiveError(entry, f"bad tar stream: {err}") from err

    def _apply(self, member: tarfile.TarInfo, source: tarfile.TarFile, entry: str) -> None:
        parts = clean_name(member.name, entry)
        if not parts:
            self._apply_root(member, entry)
            return
        base = parts[-1]
        if parts[0] == WHITEOUT_LINK_DIR:
            self._saw_link_dir = True
        elif base == WHITEOUT_OPAQUE:
            self._opaque(parts[:-1], entry)
            return
        elif base.startswith(WHITEOUT_META_PREFIX):
            log.debug("layer tar entry %r: AUFS metadata skipped", entry)
            return
        elif base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts[:-1], base[len(WHITEOUT_PREFIX) :], entry)
            return
        self._create(parts, member, source, entry)

    def _apply_root(self, member: tarfile.TarInfo, entry: str) -> None:
        if not member.isdir():
            raise ArchiveError(entry, "a non-directory entry cannot replace the root directory")
        meta = _Meta.of(member)
        self._set_meta_fd(self._root_fd, meta, entry, mode=meta.mode | stat.S_IRWXU)
        st = os.fstat(self._root_fd)
        self._dirs[()] = _DeferredDir(meta, st.st_dev, st.st_ino)

    def _whiteout(self, dir_parts: RelPath, name: str, entry: str) -> None:
        if name in ("", ".", ".."):
            raise UnsafeArchiveError(entry, f"whiteout target {name!r} is not a name in its directory")
        self._stats.whiteouts += 1
        with self._directory(dir_parts, entry, create=False) as fd:
            if fd is not None:  # a missing directory has nothing to delete
                _remove_at(fd, name)

    def _opaque(self, dir_parts: RelPath, entry: str) -> None:
        self._stats.whiteouts += 1
        with self._directory(dir_parts, entry, create=True) as fd:
            assert fd is not None
            self._prune(fd, dir_parts)

    def _prune(self, dir_fd: int, parts: RelPath) -> None:
        """Delete everything below ``parts`` that this tar did not add (opaque directories)."""
        for name in os.listdir(dir_fd):
            child = (*parts, name)
            if child not in self._added and child not in self._added_parents:
                _remove_at(dir_fd, name)
                continue
            sub = _open_child_dir(dir_fd, name)
            if sub is not None:
                try:
                    self._prune(sub, child)
                finally:
                    os.close(sub)

    def _create(self, parts: RelPath, member: tarfile.TarInfo, source: tarfile.TarFile, entry: str) -> None:
        if member.ischr() or member.isblk():
            if not self._allow_devices:
                raise UnsafeArchiveError(entry, "device node not allowed")
        elif not (member.isreg() or member.isdir() or member.issym() or member.islnk() or member.isfifo()):
            raise ArchiveError(entry, f"unsupported tar entry type {member.type!r}")
        meta = _Meta.of(member)
        with self._directory(parts[:-1], entry, create=True) as fd:
            assert fd is not None
            name = parts[-1]
            if member.islnk():
                self._hardlink(fd, name, parts, member, meta, entry)
            else:
                existing = _lstat_at(fd, name)
                if existing is not None and not (stat.S_ISDIR(existing.st_mode) and member.isdir()):
                    _remove_at(fd, name)
                    existing = None
                self._make(fd, name, parts, member, meta, source, entry, existing is not None)
        self._added.add(parts)
        self._added_parents.update(parts[:depth] for depth in range(1, len(parts)))

    def _make(
        self,
        fd: int,
        name: str,
        parts: RelPath,
        member: tarfile.TarInfo,
        meta: _Meta,
        source: tarfile.TarFile,
        entry: str,
        exists: bool,
    ) -> None:
        if member.isdir():
            self._make_dir(fd, name, parts, meta, entry, exists)
        elif member.isreg():
            self._make_file(fd, name, member, meta, source, entry)
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=fd)
            self._set_meta_at(fd, name, meta, entry, chmod=False)  # Linux symlinks have no mode of their own
        elif member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=fd)
            self._set_meta_at(fd, name, meta, entry, chmod=True)
        else:
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=fd)
            self._set_meta_at(fd, name, meta, entry, chmod=True)

    def _make_dir(self, fd: int, name: str, parts: RelPath, meta: _Meta, entry: str, exists: bool) -> None:
        if not exists:
            os.mkdir(name, 0o700, dir_fd=fd)
        dir_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
        try:
            # owner rwx until the end, so that the directory can be filled whatever its final mode
            self._set_meta_fd(dir_fd, meta, entry, mode=meta.mode | stat.S_IRWXU)
            st = os.fstat(dir_fd)
        finally:
            os.close(dir_fd)
        self._dirs[parts] = _DeferredDir(meta, st.st_dev, st.st_ino)

    def _make_file(
        self, fd: int, name: str, member: tarfile.TarInfo, meta: _Meta, source: tarfile.TarFile, entry: str
    ) -> None:
        data = source.extractfile(member)
        assert data is not None  # regular members always have a body
        file_fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=fd)
        try:
            with open(file_fd, "wb", closefd=False) as out:
                shutil.copyfileobj(data, out, _CHUNK)
            self._set_meta_fd(file_fd, meta, entry)
        finally:
            os.close(file_fd)

    def _hardlink(self, fd: int, name: str, parts: RelPath, member: tarfile.TarInfo, meta: _Meta, entry: str) -> None:
        link = member.linkname
        if link.startswith("/"):
            raise UnsafeArchiveError(entry, f"hard link target {link!r} is absolute")
        target = clean_name(link, entry, f"hard link target {link!r}")
        if not target:
            raise ArchiveError(entry, "hard link to the root directory")
        if target == parts:
            raise ArchiveError(entry, "hard link to itself")
        with self._directory(target[:-1], entry, create=False, what="hard link target ") as target_fd:
            target_st = _lstat_at(target_fd, target[-1]) if target_fd is not None else None
            if target_fd is None or target_st is None:
                raise ArchiveError(entry, f"hard link target {link!r} does not exist")
            if stat.S_ISDIR(target_st.st_mode):
                raise ArchiveError(entry, f"hard link target {link!r} is a directory")
            _remove_at(fd, name)
            os.link(target[-1], name, src_dir_fd=target_fd, dst_dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISLNK(target_st.st_mode):  # as Docker: the header's metadata go to the shared inode
            self._set_meta_at(fd, name, meta, entry, chmod=True)

    # the end

    def finish(self) -> None:
        """Drop the AUFS hard-link directory, then give directories their final modes and times."""
        if self._saw_link_dir:
            _remove_at(self._root_fd, WHITEOUT_LINK_DIR)
        for parts in sorted(self._dirs, key=len, reverse=True):
            deferred = self._dirs[parts]
            fd = self._walk(parts, "/".join(parts), create=False, lenient=True)
            if fd is None:  # replaced or deleted by a later entry
                continue
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == (deferred.dev, deferred.ino):
                    os.chmod(fd, deferred.meta.mode)
                    os.utime(fd, ns=(deferred.meta.atime_ns, deferred.meta.mtime_ns))
            finally:
                os.close(fd)
        if self._stats.xattrs_skipped:
            log.warning("skipped %d extended attributes the filesystem refused", self._stats.xattrs_skipped)


def apply_layer(
    rootfs: Path,
    stream: BinaryIO,
    *,
    allow_devices: bool = False,
    same_owner: bool = True,
    best_effort_xattrs: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ApplyStats:
    """Apply an uncompressed layer tar, read sequentially from ``stream``, to the tree at ``rootfs``.

    The stream is read to its end, past the tar's end marker.  ``progress`` is called with the number of
    bytes read so far after every read.  ``same_owner=False`` leaves files owned by the caller.
    Raises ``UnsafeArchiveError`` for anything that would reach outside ``rootfs`` (nothing outside has
    been touched then) and ``ArchiveError`` for other failures; in both cases ``rootfs`` may hold part of
    the layer.  Not thread-safe against other writers of ``rootfs``.
    """
    stats = ApplyStats()
    reader = _CountingReader(stream, progress)
    applier = _Applier(
        rootfs, allow_devices=allow_devices, same_owner=same_owner, best_effort_xattrs=best_effort_xattrs, stats=stats
    )
    try:
        for member, tar in _members(reader):
            applier.apply(member, tar)
        try:
            applier.finish()
        except OSError as err:
            raise ArchiveError("", f"cannot finish directories: {err.strerror or err}") from err
    finally:
        applier.close()
    reader.drain()
    stats.tar_bytes = reader.nr_bytes
    return stats
