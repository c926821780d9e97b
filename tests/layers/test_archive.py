"""apply_layer: entry kinds, metadata, whiteouts, replacement rules, stream handling, and hostile tars.

Hostile tars are applied to ``tmp/a/b/rootfs`` with sentinel files in ``tmp``, ``tmp/a``,
``tmp/a/b`` and a directory ``tmp/outside`` that symlinks in the tar point at.  Every such test
snapshots everything outside rootfs (contents, modes, owners, mtimes, ctimes, inode numbers, link
counts, xattrs) before and after: ctime moves on any chmod, chown, utime or xattr change, and a link
count on any new hard link.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devmapper.errors import DevmapperError
from devmapper.layers.archive import ApplyStats, ArchiveError, UnsafeArchiveError, apply_layer

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown to other users, mknod, trusted.* xattrs)")

MTIME = 1_600_000_000
UID, GID = os.geteuid(), os.getegid()  # default owner of entries, so that tests without root can chown
NS = 1_000_000_000


# --- building tars ------------------------------------------------------------------------------


class LayerTar:
    """A PAX tar built member by member; every method returns the builder."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 -- data() closes

    def _add(
        self,
        name: str,
        kind: bytes,
        *,
        data: bytes = b"",
        mode: int = 0o644,
        uid: int = UID,
        gid: int = GID,
        mtime: int = MTIME,
        linkname: str = "",
        xattrs: dict[str, bytes] | None = None,
        pax: dict[str, str] | None = None,
        major: int = 0,
        minor: int = 0,
    ) -> LayerTar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, mtime
        info.linkname = linkname
        info.devmajor, info.devminor = major, minor
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        headers = dict(pax or {})
        for key, value in (xattrs or {}).items():
            headers["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = headers
        self._tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        return self

    def file(self, name: str, data: bytes = b"", **kw: Any) -> LayerTar:
        return self._add(name, tarfile.REGTYPE, data=data, **kw)

    def dir(self, name: str, **kw: Any) -> LayerTar:
        kw.setdefault("mode", 0o755)
        return self._add(name, tarfile.DIRTYPE, **kw)

    def symlink(self, name: str, target: str, **kw: Any) -> LayerTar:
        kw.setdefault("mode", 0o777)
        return self._add(name, tarfile.SYMTYPE, linkname=target, **kw)

    def hardlink(self, name: str, target: str, **kw: Any) -> LayerTar:
        return self._add(name, tarfile.LNKTYPE, linkname=target, **kw)

    def fifo(self, name: str, **kw: Any) -> LayerTar:
        return self._add(name, tarfile.FIFOTYPE, **kw)

    def device(self, name: str, kind: bytes = tarfile.CHRTYPE, major: int = 1, minor: int = 3, **kw: Any) -> LayerTar:
        return self._add(name, kind, major=major, minor=minor, **kw)

    def raw_type(self, name: str, kind: bytes) -> LayerTar:
        return self._add(name, kind)

    def data(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()


def apply(rootfs: Path, layer: LayerTar | bytes, **kw: Any) -> ApplyStats:
    data = layer.data() if isinstance(layer, LayerTar) else layer
    return apply_layer(rootfs, io.BytesIO(data), **kw)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """An empty directory to apply layers to."""
    path = tmp_path / "rootfs"
    path.mkdir()
    return path


# --- the sentinel layout ------------------------------------------------------------------------


Snapshot = dict[str, tuple[object, ...]]


def snapshot_outside(top: Path, rootfs: Path) -> Snapshot:
    """Everything under ``top`` except ``rootfs`` and below, in detail."""
    found: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if Path(dirpath) == rootfs.parent:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != rootfs]
        for name in [".", *dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            xattrs = sorted(
                (k, os.getxattr(path, k, follow_symlinks=False)) for k in os.listxattr(path, follow_symlinks=False)
            )
            found[str(path)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_ino,
                st.st_nlink,
                path.read_bytes() if stat.S_ISREG(st.st_mode) else None,
                os.readlink(path) if stat.S_ISLNK(st.st_mode) else None,
                tuple(xattrs),
            )
    return found


@dataclass
class Layout:
    top: Path
    rootfs: Path
    outside: Path  # a directory hostile symlinks point at
    before: Snapshot

    def unchanged(self) -> None:
        assert snapshot_outside(self.top, self.rootfs) == self.before


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    rootfs = tmp_path / "a" / "b" / "rootfs"
    rootfs.mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret").write_bytes(b"outside secret")
    (outside / "sub" / "deep").write_bytes(b"deep secret")
    for where in (tmp_path, tmp_path / "a", tmp_path / "a" / "b"):
        (where / "secret").write_bytes(b"sentinel in " + bytes(where))
    return Layout(tmp_path, rootfs, outside, snapshot_outside(tmp_path, rootfs))


# --- hostile tars -------------------------------------------------------------------------------

Hostile = Callable[[Layout], LayerTar]

HOSTILE: dict[str, tuple[Hostile, str]] = {
    "dotdot": (lambda lay: LayerTar().file("../x", b"x"), "leaves the root filesystem"),
    "dotdot_nested": (lambda lay: LayerTar().file("a/../../x", b"x"), "leaves the root filesystem"),
    "dotdot_onto_sentinel": (lambda lay: LayerTar().file("../../../secret", b"pwned"), "leaves the root"),
    "dotdot_dir": (lambda lay: LayerTar().dir("../newdir"), "leaves the root filesystem"),
    "absolute_dotdot": (lambda lay: LayerTar().file("/../secret", b"pwned"), "leaves the root filesystem"),
    "absolute_dotdot_nested": (lambda lay: LayerTar().file("/a/../../../secret", b"x"), "leaves the root"),
    "symlink_to_absolute_dir": (
        lambda lay: LayerTar().symlink("evil", str(lay.outside)).file("evil/file", b"pwned"),
        "'evil' is a symbolic link",
    ),
    "symlink_overwrite_outside_file": (
        lambda lay: LayerTar().symlink("evil", str(lay.outside)).file("evil/secret", b"pwned"),
        "symbolic link",
    ),
    "symlink_dotdot": (
        lambda lay: LayerTar().symlink("evil", "../..").file("evil/secret", b"pwned"),
        "symbolic link",
    ),
    "symlink_dir_then_nested_dir": (
        lambda lay: LayerTar().symlink("evil", str(lay.outside)).dir("evil/sub").file("evil/sub/deep", b"x"),
        "symbolic link",
    ),
    "symlink_chain": (
        lambda lay: LayerTar().symlink("l2", str(lay.outside)).symlink("l1", "l2").file("l1/secret", b"pwned"),
        "'l1' is a symbolic link",
    ),
    "symlink_chain_in_subdir": (
        lambda lay: LayerTar().dir("d").symlink("d/up", "../../..").symlink("d/up2", "up/b").file("d/up2/secret", b"x"),
        "'d/up2' is a symbolic link",
    ),
    "absolute_names_through_symlink": (
        lambda lay: LayerTar().symlink("/evil", str(lay.outside)).file("/evil/secret", b"pwned"),
        "symbolic link",
    ),
    "hardlink_inside_symlinked_dir": (
        lambda lay: LayerTar().file("inside", b"i").symlink("evil", str(lay.outside)).hardlink("evil/link", "inside"),
        "'evil' is a symbolic link",
    ),
    "hardlink_absolute_target": (
        lambda lay: LayerTar().hardlink("x", str(lay.outside / "secret")),
        "is absolute",
    ),
    "hardlink_dotdot_target": (lambda lay: LayerTar().hardlink("x", "../../secret"), "leaves the root filesystem"),
    "hardlink_target_through_symlink": (
        lambda lay: LayerTar().symlink("evil", str(lay.outside)).hardlink("x", "evil/secret"),
        "hard link target path component 'evil' is a symbolic link",
    ),
    "whiteout_through_symlink": (
        lambda lay: LayerTar().symlink("evil", str(lay.outside)).file("evil/.wh.secret"),
        "symbolic link",
    ),
    "whiteout_dotdot": (lambda lay: LayerTar().file("../.wh.secret"), "leaves the root filesystem"),
    "whiteout_of_dotdot": (lambda lay: LayerTar().file(".wh.."), "not a name in its directory"),
    "whiteout_of_dotdot_in_subdir": (lambda lay: LayerTar().dir("d").file("d/.wh..."), "not a name in its directory"),
    "opaque_under_symlink": (
        lambda lay: LayerTar().symlink("evil", str(lay.outside)).file("evil/.wh..wh..opq"),
        "symbolic link",
    ),
    "char_device": (lambda lay: LayerTar().device("null", tarfile.CHRTYPE, 1, 3), "device node not allowed"),
    "block_device": (lambda lay: LayerTar().device("sda", tarfile.BLKTYPE, 8, 0), "device node not allowed"),
    "dir_replaced_by_symlink_then_written": (
        lambda lay: LayerTar().dir("d").file("d/ok", b"ok").symlink("d", str(lay.outside)).file("d/secret", b"pwned"),
        "'d' is a symbolic link",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_is_refused_and_nothing_outside_changes(layout: Layout, case: str) -> None:
    build, reason = HOSTILE[case]
    with pytest.raises(UnsafeArchiveError, match=reason) as caught:
        apply(layout.rootfs, build(layout))
    assert isinstance(caught.value, DevmapperError)
    assert caught.value.entry and caught.value.reason in str(caught.value)
    layout.unchanged()


def test_refusal_names_the_entry(layout: Layout) -> None:
    with pytest.raises(UnsafeArchiveError) as caught:
        apply(layout.rootfs, LayerTar().file("a/../../etc/x"))
    assert str(caught.value) == "layer tar entry 'a/../../etc/x': path leaves the root filesystem"
    assert caught.value.entry == "a/../../etc/x"


@pytest.mark.parametrize("lower_link", ["outside", "dotdot"], ids=["symlink_to_outside", "symlink_up_two_levels"])
@pytest.mark.parametrize(
    "layer",
    [
        lambda: LayerTar().file("etc/secret", b"pwned"),
        lambda: LayerTar().dir("etc/sub"),
        lambda: LayerTar().file("etc/.wh.secret"),
        lambda: LayerTar().file("etc/.wh..wh..opq"),
        lambda: LayerTar().file("x", b"x").hardlink("etc/link", "x"),
        lambda: LayerTar().hardlink("x", "etc/secret"),
        lambda: LayerTar().symlink("etc/s", "/"),
    ],
    ids=["file", "dir", "whiteout", "opaque", "hardlink_in", "hardlink_from", "symlink"],
)
def test_symlinks_left_by_a_lower_layer_are_not_followed(
    layout: Layout, lower_link: str, layer: Callable[[], LayerTar]
) -> None:
    target = str(layout.outside) if lower_link == "outside" else "../../.."
    os.symlink(target, layout.rootfs / "etc")
    layout.before = snapshot_outside(layout.top, layout.rootfs)
    with pytest.raises(UnsafeArchiveError, match="'etc' is a symbolic link"):
        apply(layout.rootfs, layer())
    layout.unchanged()


def test_absolute_names_land_inside_rootfs(layout: Layout) -> None:
    target = layout.outside / "secret"
    apply(layout.rootfs, LayerTar().file(str(target), b"inside").file("/etc/hosts", b"h"))
    assert (layout.rootfs / str(target).lstrip("/")).read_bytes() == b"inside"
    assert (layout.rootfs / "etc" / "hosts").read_bytes() == b"h"
    layout.unchanged()


def test_entries_replace_symlinks_instead_of_writing_through_them(layout: Layout) -> None:
    os.symlink(layout.outside / "secret", layout.rootfs / "file_link")
    os.symlink(layout.outside, layout.rootfs / "dir_link")
    os.symlink(layout.outside / "secret", layout.rootfs / "fifo_link")
    os.symlink(layout.outside / "secret", layout.rootfs / "hard_link")
    layout.before = snapshot_outside(layout.top, layout.rootfs)
    layer = (
        LayerTar()
        .file("file_link", b"mine", mode=0o600, mtime=5)
        .dir("dir_link", mode=0o700)
        .file("dir_link/secret", b"mine too")
        .fifo("fifo_link", mode=0o600)
        .file("target", b"t")
        .hardlink("hard_link", "target")
    )
    apply(layout.rootfs, layer)
    assert (layout.rootfs / "file_link").read_bytes() == b"mine"
    assert not (layout.rootfs / "dir_link").is_symlink()
    assert (layout.rootfs / "dir_link" / "secret").read_bytes() == b"mine too"
    assert stat.S_ISFIFO((layout.rootfs / "fifo_link").lstat().st_mode)
    assert (layout.rootfs / "hard_link").read_bytes() == b"t"
    layout.unchanged()


def test_symlink_metadata_is_set_on_the_link_not_its_target(layout: Layout) -> None:
    layer = LayerTar().symlink(
        "s", str(layout.outside / "secret"), uid=os.geteuid(), mtime=123, xattrs={"user.x": b"v"}
    )
    stats = apply(layout.rootfs, layer)
    link = layout.rootfs / "s"
    assert os.readlink(link) == str(layout.outside / "secret")
    assert link.lstat().st_mtime == 123
    assert stats.xattrs_skipped == 1  # Linux refuses user.* attributes on symlinks
    layout.unchanged()


def test_hardlink_to_a_symlink_links_the_symlink_itself(layout: Layout) -> None:
    layer = LayerTar().symlink("evil", str(layout.outside / "secret")).hardlink("twin", "evil", mode=0o600, mtime=9)
    apply(layout.rootfs, layer)
    twin = layout.rootfs / "twin"
    assert twin.is_symlink() and os.readlink(twin) == str(layout.outside / "secret")
    assert twin.lstat().st_ino == (layout.rootfs / "evil").lstat().st_ino
    layout.unchanged()


def test_whiteout_of_a_symlink_removes_only_the_symlink(layout: Layout) -> None:
    os.symlink(layout.outside, layout.rootfs / "evil")
    (layout.rootfs / "d").mkdir()
    os.symlink(layout.outside, layout.rootfs / "d" / "evil")
    layout.before = snapshot_outside(layout.top, layout.rootfs)
    stats = apply(layout.rootfs, LayerTar().file(".wh.evil").file("d/.wh..wh..opq"))
    assert stats.whiteouts == 2
    assert sorted(os.listdir(layout.rootfs)) == ["d"]
    assert os.listdir(layout.rootfs / "d") == []
    layout.unchanged()


def test_files_after_a_refusal_are_not_applied(layout: Layout) -> None:
    with pytest.raises(UnsafeArchiveError):
        apply(layout.rootfs, LayerTar().file("first", b"1").file("../bad").file("later", b"2"))
    assert (layout.rootfs / "first").exists()
    assert not (layout.rootfs / "later").exists()
    layout.unchanged()


# --- entry kinds and metadata -------------------------------------------------------------------


def test_regular_files_and_directories(rootfs: Path) -> None:
    layer = (
        LayerTar()
        .dir("etc", mode=0o755, mtime=1000)
        .file("etc/hosts", b"127.0.0.1 localhost\n", mode=0o640, mtime=2000)
        .dir("etc/empty", mode=0o700, mtime=3000)
    )
    stats = apply(rootfs, layer)
    assert (rootfs / "etc" / "hosts").read_bytes() == b"127.0.0.1 localhost\n"
    assert mode_of(rootfs / "etc" / "hosts") == 0o640
    assert mode_of(rootfs / "etc" / "empty") == 0o700
    assert (rootfs / "etc" / "hosts").stat().st_mtime == 2000
    assert (rootfs / "etc").stat().st_mtime == 1000  # set after its children were added
    assert stats.entries == 3 and stats.whiteouts == 0
    assert stats.content_bytes == len(b"127.0.0.1 localhost\n")


def test_missing_parents_are_created_0755_whatever_the_umask(rootfs: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        apply(rootfs, LayerTar().file("x/y/z", b"z", mode=0o666))
    finally:
        os.umask(old_umask)
    assert mode_of(rootfs / "x") == 0o755
    assert mode_of(rootfs / "x" / "y") == 0o755
    assert mode_of(rootfs / "x" / "y" / "z") == 0o666


def test_directory_without_write_permission_is_filled_then_locked(rootfs: Path) -> None:
    apply(rootfs, LayerTar().dir("ro", mode=0o555, mtime=77).file("ro/f", b"f").dir("ro/sub", mode=0o500))
    assert (rootfs / "ro" / "f").read_bytes() == b"f"
    assert mode_of(rootfs / "ro") == 0o555
    assert mode_of(rootfs / "ro" / "sub") == 0o500
    assert (rootfs / "ro").stat().st_mtime == 77


def test_special_permission_bits(rootfs: Path) -> None:
    layer = (
        LayerTar()
        .file("suid", b"#!", mode=0o4755, uid=os.geteuid())
        .file("sgid", b"#!", mode=0o2711)
        .dir("tmp", mode=0o1777)
        .dir("shared", mode=0o2775)
    )
    apply(rootfs, layer)
    assert mode_of(rootfs / "suid") == 0o4755
    assert mode_of(rootfs / "sgid") == 0o2711
    assert mode_of(rootfs / "tmp") == 0o1777
    assert mode_of(rootfs / "shared") == 0o2775


@needs_root
def test_numeric_ownership_and_setuid_survive_chown(rootfs: Path) -> None:
    layer = (
        LayerTar()
        .dir("home", uid=1000, gid=1001)
        .file("home/su", b"#!", mode=0o6755, uid=1000, gid=1001)
        .symlink("home/link", "su", uid=1002, gid=1003)
        .fifo("home/pipe", uid=1004, gid=1005, mode=0o620)
    )
    apply(rootfs, layer)
    home = rootfs / "home"
    assert (home.stat().st_uid, home.stat().st_gid) == (1000, 1001)
    su = (home / "su").stat()
    assert (su.st_uid, su.st_gid, stat.S_IMODE(su.st_mode)) == (1000, 1001, 0o6755)
    link = (home / "link").lstat()
    assert (link.st_uid, link.st_gid) == (1002, 1003)
    pipe = (home / "pipe").lstat()
    assert (pipe.st_uid, pipe.st_gid, stat.S_IMODE(pipe.st_mode)) == (1004, 1005, 0o620)


def test_same_owner_false_keeps_the_callers_ownership(rootfs: Path) -> None:
    apply(rootfs, LayerTar().file("f", b"f", uid=4242, gid=4343).dir("d", uid=4242), same_owner=False)
    assert (rootfs / "f").stat().st_uid == os.geteuid()
    assert (rootfs / "d").stat().st_uid == os.geteuid()


def test_symlinks_keep_their_target_and_times(rootfs: Path) -> None:
    apply(rootfs, LayerTar().symlink("abs", "/usr/bin/env", mtime=11).symlink("rel", "../x/y", mtime=12))
    assert os.readlink(rootfs / "abs") == "/usr/bin/env"
    assert os.readlink(rootfs / "rel") == "../x/y"
    assert (rootfs / "abs").lstat().st_mtime == 11
    assert (rootfs / "rel").lstat().st_mtime == 12


def test_hardlinks_share_the_inode(rootfs: Path) -> None:
    layer = LayerTar().file("bin/busybox", b"elf", mode=0o755).hardlink("bin/sh", "bin/busybox", mode=0o755)
    apply(rootfs, layer.hardlink("sbin/init", "/bin/busybox".lstrip("/"), mode=0o755))
    one = (rootfs / "bin" / "busybox").stat()
    assert one.st_nlink == 3
    assert (rootfs / "bin" / "sh").stat().st_ino == one.st_ino
    assert (rootfs / "sbin" / "init").stat().st_ino == one.st_ino


def test_hardlink_replaces_an_existing_entry(rootfs: Path) -> None:
    (rootfs / "old").write_bytes(b"old")
    apply(rootfs, LayerTar().file("new", b"new").hardlink("old", "new"))
    assert (rootfs / "old").read_bytes() == b"new"
    assert (rootfs / "old").stat().st_nlink == 2


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (LayerTar().hardlink("x", "missing"), "does not exist"),
        (LayerTar().hardlink("x", "nodir/missing"), "does not exist"),
        (LayerTar().dir("d").hardlink("x", "d"), "is a directory"),
        (LayerTar().file("x", b"x").hardlink("x", "x"), "hard link to itself"),
        (LayerTar().hardlink("x", "."), "root directory"),
    ],
    ids=["missing", "missing_parent", "directory", "itself", "root"],
)
def test_bad_hardlinks_are_errors(rootfs: Path, layer: LayerTar, reason: str) -> None:
    with pytest.raises(ArchiveError, match=reason) as caught:
        apply(rootfs, layer)
    assert not isinstance(caught.value, UnsafeArchiveError)


def test_fifos(rootfs: Path) -> None:
    apply(rootfs, LayerTar().fifo("run/initctl", mode=0o600, mtime=44))
    st = (rootfs / "run" / "initctl").lstat()
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime == 44


@needs_root
def test_device_nodes_when_allowed(rootfs: Path) -> None:
    layer = (
        LayerTar()
        .device("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666)
        .device("dev/loop9", tarfile.BLKTYPE, 7, 9, mode=0o660, gid=6)
    )
    apply(rootfs, layer, allow_devices=True)
    null = (rootfs / "dev" / "null").lstat()
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3) and stat.S_IMODE(null.st_mode) == 0o666
    loop = (rootfs / "dev" / "loop9").lstat()
    assert stat.S_ISBLK(loop.st_mode) and loop.st_rdev == os.makedev(7, 9) and loop.st_gid == 6


def test_nanosecond_mtimes_and_atimes_from_pax_headers(rootfs: Path) -> None:
    layer = (
        LayerTar()
        .file("precise", b"p", pax={"mtime": "1600000000.123456789", "atime": "1700000000.5"})
        .file("old_atime", b"o", pax={"atime": "10"})
    )
    apply(rootfs, layer)
    precise = (rootfs / "precise").stat()
    assert precise.st_mtime_ns == 1_600_000_000_123_456_789
    assert precise.st_atime_ns == 1_700_000_000_500_000_000
    old = (rootfs / "old_atime").stat()
    assert old.st_atime_ns == old.st_mtime_ns == MTIME * NS  # an atime before the mtime is raised to it


def test_user_xattrs_on_files_and_directories(rootfs: Path) -> None:
    value = b"\x00\xffbinary"
    layer = LayerTar().dir("d", xattrs={"user.dir": b"D"}).file("d/f", b"f", xattrs={"user.a": value, "user.b": b""})
    stats = apply(rootfs, layer)
    assert os.getxattr(rootfs / "d", "user.dir") == b"D"
    assert os.getxattr(rootfs / "d" / "f", "user.a") == value
    assert os.getxattr(rootfs / "d" / "f", "user.b") == b""
    assert stats.xattrs_skipped == 0


@needs_root
def test_trusted_xattrs_as_root(rootfs: Path) -> None:
    apply(rootfs, LayerTar().file("f", b"f", xattrs={"trusted.overlay.x": b"y"}))
    assert os.getxattr(rootfs / "f", "trusted.overlay.x") == b"y"


def test_xattrs_in_unknown_namespaces_are_skipped(rootfs: Path) -> None:
    stats = apply(rootfs, LayerTar().file("f", b"f", xattrs={"bogus.name": b"v"}))
    assert stats.xattrs_skipped == 1
    assert (rootfs / "f").read_bytes() == b"f"


def test_user_xattr_failures_other_than_eperm_are_errors(rootfs: Path) -> None:
    huge = b"v" * (1 << 17)  # beyond the kernel's 64 KiB limit for one value
    with pytest.raises(ArchiveError, match=r"user\.big"):
        apply(rootfs, LayerTar().file("f", b"f", xattrs={"user.big": huge}))


def test_unsupported_user_xattrs_need_best_effort(rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_setxattr = os.setxattr

    def no_user_xattrs(path: Any, name: str, value: bytes, *args: Any, **kw: Any) -> None:
        if name.startswith("user."):
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        real_setxattr(path, name, value, *args, **kw)

    monkeypatch.setattr(os, "setxattr", no_user_xattrs)
    layer = LayerTar().file("f", b"f", xattrs={"user.k": b"v"}).data()
    strict, lenient = rootfs / "strict", rootfs / "lenient"
    strict.mkdir()
    lenient.mkdir()
    with pytest.raises(ArchiveError, match=r"user\.k"):
        apply(strict, layer)
    stats = apply(lenient, layer, best_effort_xattrs=True)
    assert stats.xattrs_skipped == 1
    assert (lenient / "f").read_bytes() == b"f"


# --- replacing existing entries -----------------------------------------------------------------


def test_file_replaces_a_directory_tree(rootfs: Path) -> None:
    (rootfs / "d" / "sub").mkdir(parents=True)
    (rootfs / "d" / "sub" / "f").write_bytes(b"f")
    apply(rootfs, LayerTar().file("d", b"now a file"))
    assert (rootfs / "d").read_bytes() == b"now a file"


def test_directory_replaces_a_file_and_a_symlink(rootfs: Path) -> None:
    (rootfs / "f").write_bytes(b"f")
    os.symlink("f", rootfs / "l")
    apply(rootfs, LayerTar().dir("f").dir("l").file("l/inner", b"i"))
    assert (rootfs / "f").is_dir() and not (rootfs / "l").is_symlink()
    assert (rootfs / "l" / "inner").read_bytes() == b"i"


def test_directory_over_directory_keeps_contents_and_takes_metadata(rootfs: Path) -> None:
    (rootfs / "d").mkdir(mode=0o755)
    (rootfs / "d" / "old").write_bytes(b"old")
    os.setxattr(rootfs / "d", "user.old", b"1")
    apply(rootfs, LayerTar().dir("d", mode=0o710, mtime=99, xattrs={"user.new": b"2"}).file("d/new", b"new"))
    assert sorted(os.listdir(rootfs / "d")) == ["new", "old"]
    assert mode_of(rootfs / "d") == 0o710
    assert (rootfs / "d").stat().st_mtime == 99
    assert os.getxattr(rootfs / "d", "user.new") == b"2"
    assert os.getxattr(rootfs / "d", "user.old") == b"1"  # as Docker: attributes are set, never cleared


def test_symlink_and_fifo_replace_files(rootfs: Path) -> None:
    (rootfs / "a").write_bytes(b"a")
    (rootfs / "b").mkdir()
    apply(rootfs, LayerTar().symlink("a", "target").fifo("b"))
    assert os.readlink(rootfs / "a") == "target"
    assert stat.S_ISFIFO((rootfs / "b").lstat().st_mode)


def test_later_entries_win(rootfs: Path) -> None:
    apply(rootfs, LayerTar().file("x", b"first").dir("x").file("x/in", b"in").file("x", b"last"))
    assert (rootfs / "x").read_bytes() == b"last"


def test_writing_below_a_file_is_an_error_but_not_unsafe(rootfs: Path) -> None:
    with pytest.raises(ArchiveError, match="'f' is not a directory") as caught:
        apply(rootfs, LayerTar().file("f", b"f").file("f/x", b"x"))
    assert not isinstance(caught.value, UnsafeArchiveError)


# --- whiteouts ----------------------------------------------------------------------------------


def test_whiteouts_delete_files_and_trees(rootfs: Path) -> None:
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "motd").write_bytes(b"m")
    (rootfs / "var" / "cache" / "apt").mkdir(parents=True)
    (rootfs / "var" / "cache" / "apt" / "pkg").write_bytes(b"p")
    layer = LayerTar().file("etc/.wh.motd").file("var/cache/.wh.apt").file(".wh.missing").file("nodir/.wh.x")
    stats = apply(rootfs, layer)
    assert os.listdir(rootfs / "etc") == []
    assert os.listdir(rootfs / "var" / "cache") == []
    assert not (rootfs / "nodir").exists()  # whiteouts never create directories
    assert stats.whiteouts == 4 and stats.entries == 4
    assert not any(name.startswith(".wh.") for _, _, files in os.walk(rootfs) for name in files)


def test_whiteout_deletes_what_the_same_tar_added_earlier(rootfs: Path) -> None:
    apply(rootfs, LayerTar().file("tmp1", b"x").file(".wh.tmp1"))
    assert os.listdir(rootfs) == []


def test_opaque_directory_keeps_only_this_layers_entries(rootfs: Path) -> None:
    lower = rootfs / "d"
    (lower / "b").mkdir(parents=True)
    (lower / "b" / "x").write_bytes(b"x")
    (lower / "c").mkdir()
    (lower / "c" / "old").write_bytes(b"old")
    (lower / "a").write_bytes(b"a")
    layer = (
        LayerTar()
        .file("d/before", b"1")
        .file("d/c/new", b"n")
        .file("d/.wh..wh..opq")
        .file("d/after", b"2")
        .dir("d/b")  # recreated after the marker: empty
    )
    stats = apply(rootfs, layer)
    assert sorted(os.listdir(lower)) == ["after", "b", "before", "c"]
    assert os.listdir(lower / "c") == ["new"]  # kept as the parent of an added entry, lower contents gone
    assert os.listdir(lower / "b") == []
    assert stats.whiteouts == 1


def test_opaque_marker_inside_an_added_directory_removes_lower_grandchildren(rootfs: Path) -> None:
    (rootfs / "d" / "sub").mkdir(parents=True)
    (rootfs / "d" / "sub" / "lower").write_bytes(b"l")
    apply(rootfs, LayerTar().dir("d").dir("d/sub").file("d/.wh..wh..opq"))
    assert os.listdir(rootfs / "d") == ["sub"]
    assert os.listdir(rootfs / "d" / "sub") == []


def test_opaque_marker_creates_a_missing_directory(rootfs: Path) -> None:
    apply(rootfs, LayerTar().file("new/.wh..wh..opq"))
    assert (rootfs / "new").is_dir() and os.listdir(rootfs / "new") == []


def test_aufs_metadata_is_skipped(rootfs: Path) -> None:
    stats = apply(rootfs, LayerTar().dir(".wh..wh.aufs").file("d/.wh..wh.orph", b"x").file("ok", b"ok"))
    assert os.listdir(rootfs) == ["ok"]  # skipped entirely: not even their parents are created
    assert stats.entries == 3 and stats.whiteouts == 0


def test_aufs_hardlinks_into_plnk_resolve_and_plnk_is_removed(rootfs: Path) -> None:
    layer = (
        LayerTar()
        .dir(".wh..wh.plnk", mode=0o700)
        .file(".wh..wh.plnk/1234.5678", b"shared", mode=0o755)
        .hardlink("usr/bin/a", ".wh..wh.plnk/1234.5678", mode=0o755)
        .hardlink("usr/bin/b", ".wh..wh.plnk/1234.5678", mode=0o755)
    )
    apply(rootfs, layer)
    assert sorted(os.listdir(rootfs)) == ["usr"]
    a, b = (rootfs / "usr" / "bin" / "a").stat(), (rootfs / "usr" / "bin" / "b").stat()
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert (rootfs / "usr" / "bin" / "a").read_bytes() == b"shared"


# --- the root entry, odd names and types ---------------------------------------------------------


def test_root_entry_sets_the_roots_metadata(rootfs: Path) -> None:
    apply(rootfs, LayerTar().dir("./", mode=0o750, mtime=31).file("./f", b"f"))
    assert mode_of(rootfs) == 0o750
    assert rootfs.stat().st_mtime == 31
    assert (rootfs / "f").read_bytes() == b"f"


def test_non_directory_root_entry_is_an_error(rootfs: Path) -> None:
    with pytest.raises(ArchiveError, match="cannot replace the root directory"):
        apply(rootfs, LayerTar().file(".", b"x"))


def test_names_are_cleaned(rootfs: Path) -> None:
    apply(rootfs, LayerTar().file("./a//b/./c", b"c").file("x/../y", b"y"))
    assert (rootfs / "a" / "b" / "c").read_bytes() == b"c"
    assert sorted(os.listdir(rootfs)) == ["a", "y"]  # ".." is resolved in the name, "x" is never looked at


def test_unsupported_entry_types_are_errors(rootfs: Path) -> None:
    with pytest.raises(ArchiveError, match="unsupported tar entry type"):
        apply(rootfs, LayerTar().raw_type("label", b"V"))


def test_missing_rootfs_is_an_archive_error(rootfs: Path) -> None:
    with pytest.raises(ArchiveError, match="cannot open the root filesystem"):
        apply(rootfs / "missing", LayerTar().file("f"))


def test_filesystem_errors_become_archive_errors(rootfs: Path) -> None:
    with pytest.raises(ArchiveError, match="too long") as caught:
        apply(rootfs, LayerTar().file("n" * 300, b"x"))
    assert isinstance(caught.value.__cause__, OSError)


# --- the stream ---------------------------------------------------------------------------------


def test_stream_is_read_to_its_end_and_counted(rootfs: Path) -> None:
    tar = LayerTar().file("f", b"x" * 100_000).data()
    stream = io.BytesIO(tar + b"\0" * 4096 + b"trailing junk")
    seen: list[int] = []
    stats = apply_layer(rootfs, stream, progress=seen.append)
    assert stream.read() == b""
    assert stats.tar_bytes == len(tar) + 4096 + len(b"trailing junk")
    assert seen == sorted(seen) and seen[-1] == stats.tar_bytes
    assert stats.content_bytes == 100_000


def test_empty_stream_is_an_empty_layer(rootfs: Path) -> None:
    assert apply_layer(rootfs, io.BytesIO(b"")) == ApplyStats()
    assert apply_layer(rootfs, io.BytesIO(b"\0" * 1024)).entries == 0
    assert os.listdir(rootfs) == []


def test_garbage_is_not_a_tar(rootfs: Path) -> None:
    with pytest.raises(ArchiveError, match="bad tar stream at byte 0"):
        apply_layer(rootfs, io.BytesIO(b"this is not a tar archive" * 40))


def test_short_garbage_is_not_a_tar(rootfs: Path) -> None:
    with pytest.raises(ArchiveError, match="bad tar stream"):
        apply_layer(rootfs, io.BytesIO(b"short"))


def test_garbage_between_members_is_an_error(rootfs: Path) -> None:
    tar = LayerTar().file("a", b"a").file("b", b"b").data()
    with pytest.raises(ArchiveError, match="bad tar stream at byte 1024"):
        apply_layer(rootfs, io.BytesIO(tar[:1024] + b"garbage!" * 64 + tar[1024:]))
    assert os.listdir(rootfs) == ["a"]


def test_truncated_file_body_is_an_error(rootfs: Path) -> None:
    tar = LayerTar().file("big", b"y" * 50_000).data()
    with pytest.raises(ArchiveError, match="big"):
        apply_layer(rootfs, io.BytesIO(tar[: 512 * 3 + 20_000]))


def test_truncated_header_is_an_error(rootfs: Path) -> None:
    tar = LayerTar().file("a", b"a").file("b", b"b").data()
    with pytest.raises(ArchiveError, match="bad tar stream at byte 1024"):
        apply_layer(rootfs, io.BytesIO(tar[: 1024 + 100]))


def test_stream_ending_on_a_header_boundary_without_end_marker_is_accepted(rootfs: Path) -> None:
    tar = LayerTar().file("a", b"a").file("b", b"b").data()
    stats = apply_layer(rootfs, io.BytesIO(tar[:2048]))  # as Go's reader; the layer digest guards the rest
    assert stats.entries == 2 and sorted(os.listdir(rootfs)) == ["a", "b"]
