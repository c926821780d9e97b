"""Differences between two directory trees, and layer tars made from them (``ChangesDirs``, ``ExportChanges``).

Theory of operation
-------------------
The devicemapper graph driver has no union filesystem: a layer's diff is found by mounting the
parent's and the child's devices and walking both trees (the "naive diff").  This module does the
walking and the comparing, and writes the result as a layer tar; ``devmapper.layers.archive``
applies such tars.

Vocabulary:

* *relative path* (``RelPath``): a tuple of names below the tree's root, ``("etc", "passwd")``.
  The root itself is ``()`` and is never reported (Docker neither lists nor exports it).
* *node*: what ``scan_tree`` records about one entry, from ``lstat`` (symbolic links are never
  followed), ``readlink`` and the extended attributes.  Sockets are left out: a tar cannot hold them.
* *change*: ``A`` (the path is only in the new tree, or its parent was not a directory in the old one),
  ``C`` (in both, but different), ``D`` (only in the old tree; reported for the top-most such path
  only, since deleting a directory deletes its contents).

When is a path that exists in both trees changed?

* any difference in type, permission bits (with setuid/setgid/sticky), uid, gid or extended attributes;
* for anything but a directory, also: size, device number, symlink target, or mtime.  Directory sizes
  and mtimes are ignored, as in Docker: they change whenever a child is added or removed, and the
  child's own change already says so.  Two mtimes are equal if they match exactly, or if they fall in
  the same second and one has no fraction (Docker's ``sameFsTime``: tars carry whole seconds, so a tree
  extracted from a tar has truncated times);
* for regular files whose metadata are all equal but whose inode number or ctime differ, the contents
  are compared (``compare_content``, on by default).  ctime cannot be set by programs, and a thin
  snapshot keeps both inode numbers and ctimes of untouched files, so between a layer and its child
  the contents are read only for files that were rewritten and had their mtime put back (``cp -p``,
  ``rsync -t``, ``touch -r``).  For trees that share no history every such pair is read.  With
  ``compare_content=False`` the comparison is metadata only, exactly like Docker;
* for non-directories, a change in hard-link grouping: the set of names sharing the inode in the new
  tree differs from the set in the old tree restricted to names still present.  Without this rule a new
  name for an old inode would come back from a tar as a separate copy.

A directory whose only difference is its mtime therefore does not appear.  Docker's own list also
repeats every parent directory of a change as ``C``; ``changes(..., include_parents=True)`` gives that
list, and the tar writer always includes those parents so that extraction restores their metadata.

Tars (``write_changes_tar``, ``write_tree_tar``) are deterministic PAX tars: entries in ``sort_key``
order (bytewise by name, parents first), numeric ownership with empty user and group names,
whole-second mtimes (as Docker's tars), extended attributes as ``SCHILY.xattr.*``, second and later
names of an inode as hard-link entries to the first, and an empty ``.wh.NAME`` (mode 0, owner 0:0,
mtime 0) for each deletion.  There is no entry for the root directory.  A change tar holds the added
and changed entries, every parent directory of a change, and the whiteouts.  A file whose name
starts with ``.wh.`` cannot be stored (it would read back as a whiteout) and raises ``ArchiveError``.

Cost: one ``lstat`` and one ``listxattr`` per entry in each tree, plus ``getxattr`` per attribute and
``readlink`` per symlink; both trees are held in memory (a few hundred bytes per entry).
"""

from __future__ import annotations

import enum
import errno
import io
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

from devmapper.layers.archive import WHITEOUT_PREFIX, XATTR_PAX_PREFIX, ArchiveError, RelPath

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = [
    "Change",
    "ChangeKind",
    "Node",
    "RelPath",
    "changes",
    "diff_size",
    "diff_trees",
    "same_time",
    "scan_tree",
    "sort_key",
    "write_changes_tar",
    "write_tree_tar",
]

_CHUNK = 1 << 20
_NS = 1_000_000_000


class ChangeKind(enum.StrEnum):
    """Docker's change letters."""

    ADD = "A"
    MODIFY = "C"
    DELETE = "D"


@dataclass(frozen=True, slots=True)
class Change:
    """One changed path, written as Docker prints it (``/etc/passwd``)."""

    path: str
    kind: ChangeKind

    @property
    def parts(self) -> RelPath:
        """The path as a tuple of names."""
        return tuple(self.path.strip("/").split("/"))

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


@dataclass(frozen=True, slots=True)
class Node:
    """One tree entry as ``lstat`` and friends see it."""

    fmt: int  # stat.S_IFMT bits
    mode: int  # permission bits including setuid, setgid and sticky
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int
    link: str | None  # symlink target
    xattrs: tuple[tuple[str, bytes], ...]  # sorted by name
    dev: int
    ino: int
    nlink: int
    ctime_ns: int

    @property
    def is_dir(self) -> bool:
        return self.fmt == stat.S_IFDIR


def sort_key(parts: RelPath) -> tuple[bytes, ...]:
    """Order of entries in our listings and tars: bytewise by name, parents before children."""
    return tuple(os.fsencode(name) for name in parts)


def _read_xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    """All extended attributes of ``path`` (not following a final symlink), sorted by name."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise
    return tuple(sorted((name, os.getxattr(path, name, follow_symlinks=False)) for name in names))


def _node(path: str, st: os.stat_result) -> Node:
    fmt = stat.S_IFMT(st.st_mode)
    return Node(
        fmt=fmt,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        rdev=st.st_rdev,
        link=os.readlink(path) if fmt == stat.S_IFLNK else None,
        xattrs=_read_xattrs(path),
        dev=st.st_dev,
        ino=st.st_ino,
        nlink=st.st_nlink,
        ctime_ns=st.st_ctime_ns,
    )


def scan_tree(root: Path) -> dict[RelPath, Node]:
    """Every entry below ``root`` except sockets, in ``sort_key`` order; symlinks are not followed."""
    found: dict[RelPath, Node] = {}
    pending: list[tuple[RelPath, str]] = [((), os.fspath(root))]
    while pending:
        parts, path = pending.pop()
        with os.scandir(path) as listing:
            for entry in listing:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISSOCK(st.st_mode):
                    continue
                child = (*parts, entry.name)
                found[child] = _node(entry.path, st)
                if stat.S_ISDIR(st.st_mode):
                    pending.append((child, entry.path))
    return {parts: found[parts] for parts in sorted(found, key=sort_key)}


def same_time(a_ns: int, b_ns: int) -> bool:
    """Docker's ``sameFsTime``: equal, or the same second with one side truncated to whole seconds."""
    if a_ns == b_ns:
        return True
    return a_ns // _NS == b_ns // _NS and (a_ns % _NS == 0 or b_ns % _NS == 0)


def _metadata_differs(old: Node, new: Node) -> bool:
    """True if the two entries differ in anything but contents and hard-link grouping."""
    if (old.fmt, old.mode, old.uid, old.gid, old.xattrs) != (new.fmt, new.mode, new.uid, new.gid, new.xattrs):
        return True
    if new.is_dir:
        return False
    return (
        old.size != new.size
        or old.rdev != new.rdev
        or old.link != new.link
        or not same_time(old.mtime_ns, new.mtime_ns)
    )


def _same_content(old_path: str, new_path: str) -> bool:
    """Compare two regular files byte by byte (neither final component may be a symlink)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(os.open(old_path, flags), "rb") as a, open(os.open(new_path, flags), "rb") as b:
        while True:
            chunk = a.read(_CHUNK)
            if chunk != b.read(len(chunk) or 1):
                return False
            if not chunk:
                return True


def _link_groups(tree: Mapping[RelPath, Node]) -> dict[RelPath, frozenset[RelPath]]:
    """For every non-directory with more than one name in ``tree``: all its names there."""
    by_inode: dict[tuple[int, int], list[RelPath]] = {}
    for parts, node in tree.items():
        if node.nlink > 1 and not node.is_dir:
            by_inode.setdefault((node.dev, node.ino), []).append(parts)
    groups: dict[RelPath, frozenset[RelPath]] = {}
    for names in by_inode.values():
        if len(names) > 1:
            group = frozenset(names)
            groups.update(dict.fromkeys(names, group))
    return groups


@dataclass(frozen=True, slots=True)
class _Side:
    """One tree and where it lives."""

    root: str
    tree: Mapping[RelPath, Node]
    groups: Mapping[RelPath, frozenset[RelPath]]

    def path(self, parts: RelPath) -> str:
        return os.path.join(self.root, *parts)

    def group(self, parts: RelPath) -> frozenset[RelPath]:
        return self.groups.get(parts, frozenset((parts,)))


def _modified(parts: RelPath, old: _Side, new: _Side, compare_content: bool) -> bool:
    before, after = old.tree[parts], new.tree[parts]
    if _metadata_differs(before, after):
        return True
    if after.is_dir:
        return False
    if new.group(parts) != frozenset(p for p in old.group(parts) if p in new.tree):
        return True
    return (
        compare_content
        and after.fmt == stat.S_IFREG
        and (before.ino, before.ctime_ns) != (after.ino, after.ctime_ns)
        and not _same_content(old.path(parts), new.path(parts))
    )


def _deleted_at_top(parts: RelPath, new_tree: Mapping[RelPath, Node]) -> bool:
    parent = parts[:-1]
    return not parent or (parent in new_tree and new_tree[parent].is_dir)


def diff_trees(
    old_root: Path | None,
    old_tree: Mapping[RelPath, Node],
    new_root: Path,
    new_tree: Mapping[RelPath, Node],
    *,
    compare_content: bool = True,
) -> list[tuple[RelPath, ChangeKind]]:
    """The changes from ``old_tree`` to ``new_tree`` (both from ``scan_tree``), in ``sort_key`` order."""
    old = _Side(os.fspath(old_root or ""), old_tree, _link_groups(old_tree))
    new = _Side(os.fspath(new_root), new_tree, _link_groups(new_tree))
    found: list[tuple[RelPath, ChangeKind]] = []
    for parts in new_tree:
        if parts not in old_tree:
            found.append((parts, ChangeKind.ADD))
        elif _modified(parts, old, new, compare_content):
            found.append((parts, ChangeKind.MODIFY))
    for parts in old_tree:
        if parts not in new_tree and _deleted_at_top(parts, new_tree):
            found.append((parts, ChangeKind.DELETE))
    found.sort(key=lambda item: sort_key(item[0]))
    return found


def _with_parents(found: Iterable[tuple[RelPath, ChangeKind]]) -> list[tuple[RelPath, ChangeKind]]:
    """Add every parent directory of a change (but not the root) as ``C``, as Docker's list does."""
    listed = dict(found)
    for parts in list(listed):
        for depth in range(1, len(parts)):
            listed.setdefault(parts[:depth], ChangeKind.MODIFY)
    return sorted(listed.items(), key=lambda item: sort_key(item[0]))


def changes(
    old: Path | None, new: Path, *, compare_content: bool = True, include_parents: bool = False
) -> list[Change]:
    """Walk both trees and list what changed from ``old`` to ``new`` (``old=None``: all added).

    Symlinks are never followed; reading errors (``OSError``) propagate.  With ``include_parents``
    the list is Docker's, which also names every parent directory of a change as ``C``.
    """
    old_tree = scan_tree(old) if old is not None else {}
    found = diff_trees(old, old_tree, new, scan_tree(new), compare_content=compare_content)
    if include_parents:
        found = _with_parents(found)
    return [Change("/" + "/".join(parts), kind) for parts, kind in found]


def diff_size(old: Path | None, new: Path) -> int:
    """Docker's ``DiffSize``: bytes of the added and changed non-directories of ``new``, each inode once."""
    old_tree = scan_tree(old) if old is not None else {}
    new_tree = scan_tree(new)
    seen: set[tuple[int, int]] = set()
    total = 0
    for parts, kind in diff_trees(old, old_tree, new, new_tree):
        node = new_tree.get(parts)
        if kind is ChangeKind.DELETE or node is None or node.is_dir or (node.dev, node.ino) in seen:
            continue
        seen.add((node.dev, node.ino))
        total += node.size
    return total


class _CountingWriter(io.RawIOBase):
    """The output stream as tarfile sees it."""

    def __init__(self, out: BinaryIO) -> None:
        super().__init__()
        self._out = out
        self.nr_bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer, /) -> int:
        self._out.write(data)
        size = memoryview(data).nbytes
        self.nr_bytes += size
        return size


_TAR_TYPES = {
    stat.S_IFDIR: tarfile.DIRTYPE,
    stat.S_IFREG: tarfile.REGTYPE,
    stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
}


def _tarinfo(name: str, node: Node) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = _TAR_TYPES[node.fmt]
    info.mode = node.mode
    info.uid, info.gid = node.uid, node.gid
    info.uname = info.gname = ""
    info.mtime = node.mtime_ns // _NS
    info.size = node.size if node.fmt == stat.S_IFREG else 0
    if node.link is not None:
        info.linkname = node.link
    if node.fmt in (stat.S_IFCHR, stat.S_IFBLK):
        info.devmajor, info.devminor = os.major(node.rdev), os.minor(node.rdev)
    info.pax_headers = {XATTR_PAX_PREFIX + key: value.decode("utf-8", "surrogateescape") for key, value in node.xattrs}
    return info


def _whiteout_info(parts: RelPath) -> tarfile.TarInfo:
    info = tarfile.TarInfo("/".join(parts))  # empty regular file, mode 0, owned by 0:0, mtime 0
    info.mode = 0
    info.uname = info.gname = ""
    return info


@contextmanager
def _regular_file(path: str, name: str) -> Iterator[IO[bytes]]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArchiveError(name, "changed from a regular file while the tar was written")
    with open(fd, "rb") as data:
        yield data


def _plan(found: list[tuple[RelPath, ChangeKind]]) -> list[tuple[RelPath, bool]]:
    """Tar entries as (path, is_whiteout): changes, their parent directories, whiteouts for deletions."""
    entries: dict[RelPath, bool] = {}
    for parts, kind in found:
        entries.update(dict.fromkeys((parts[:depth] for depth in range(1, len(parts))), False))
        if kind is ChangeKind.DELETE:
            entries[(*parts[:-1], WHITEOUT_PREFIX + parts[-1])] = True
        else:
            entries[parts] = False
    return sorted(entries.items(), key=lambda item: sort_key(item[0]))


def _write_tar(root: Path, tree: dict[RelPath, Node], plan: list[tuple[RelPath, bool]], out: BinaryIO) -> int:
    writer = _CountingWriter(out)
    first_names: dict[tuple[int, int], str] = {}
    with tarfile.open(
        fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for parts, is_whiteout in plan:
            if is_whiteout:
                tar.addfile(_whiteout_info(parts))
                continue
            name = "/".join(parts)
            if parts[-1].startswith(WHITEOUT_PREFIX):
                raise ArchiveError(name, "names starting with '.wh.' are whiteouts in layer tars; cannot store it")
            node = tree[parts]
            info = _tarinfo(name, node)
            inode = (node.dev, node.ino)
            if not node.is_dir and node.nlink > 1:
                if inode in first_names:
                    info.type, info.linkname, info.size = tarfile.LNKTYPE, first_names[inode], 0
                    tar.addfile(info)
                    continue
                first_names[inode] = name
            try:
                if node.fmt == stat.S_IFREG:
                    with _regular_file(os.path.join(root, *parts), name) as data:
                        tar.addfile(info, data)
                else:
                    tar.addfile(info)
            except OSError as err:
                raise ArchiveError(name, f"cannot write: {err.strerror or err}") from err
    return writer.nr_bytes


def write_changes_tar(old: Path | None, new: Path, out: BinaryIO, *, compare_content: bool = True) -> int:
    """Write the layer tar that turns ``old`` into ``new`` (``old=None``: all of ``new``); returns its size.

    Added and changed entries come from ``new`` with their parent directories; deletions become
    ``.wh.NAME`` entries.  Reads both trees fully (see ``devmapper.layers.changes``); ``out`` is written
    sequentially and not closed.
    """
    old_tree = scan_tree(old) if old is not None else {}
    new_tree = scan_tree(new)
    found = diff_trees(old, old_tree, new, new_tree, compare_content=compare_content)
    return _write_tar(new, new_tree, _plan(found), out)


def write_tree_tar(root: Path, out: BinaryIO) -> int:
    """Write the whole tree below ``root`` (not the root entry itself) as a tar; returns its size."""
    tree = scan_tree(root)
    return _write_tar(root, tree, [(parts, False) for parts in tree], out)
