"""changes(), write_changes_tar() and write_tree_tar(): what counts as a change, the tars, and round trips.

The round-trip property: for trees P and C, applying ``write_changes_tar(P, C)`` to a copy of P gives a
tree equal to C (type, mode, owner, size, contents, symlink target, xattrs, hard-link grouping, and
mtime to the second for non-directories), after which ``changes`` finds nothing.  Trees are built from
small specs, both by hand and by Hypothesis (C is drawn as a mutation of P, so that kept, changed,
retyped, deleted and added entries all occur).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import subprocess
import tarfile
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmapper.layers.archive import ArchiveError, apply_layer
from devmapper.layers.changes import (
    Change,
    ChangeKind,
    changes,
    diff_size,
    same_time,
    write_changes_tar,
    write_tree_tar,
)

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown to other users, mknod)")

BASE = 1_600_000_000 * 1_000_000_000  # ns
NS = 1_000_000_000
OWNERS = [(0, 0), (1000, 1000), (65534, 65534)] if IS_ROOT else [(os.geteuid(), os.getegid())]


def _user_xattrs_supported() -> bool:
    with tempfile.NamedTemporaryFile() as probe:
        try:
            os.setxattr(probe.name, "user.probe", b"1")
        except OSError:
            return False
    return True


USER_XATTRS = _user_xattrs_supported()


# --- tree specs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class F:
    data: bytes = b""
    mode: int = 0o644
    owner: tuple[int, int] = OWNERS[0]
    mtime: int = BASE
    xattr: bytes | None = None


@dataclass(frozen=True)
class D:
    children: Mapping[str, Spec] = field(default_factory=dict)
    mode: int = 0o755
    owner: tuple[int, int] = OWNERS[0]
    mtime: int = BASE
    xattr: bytes | None = None


@dataclass(frozen=True)
class L:
    target: str
    owner: tuple[int, int] = OWNERS[0]
    mtime: int = BASE


@dataclass(frozen=True)
class P:
    mode: int = 0o644
    owner: tuple[int, int] = OWNERS[0]
    mtime: int = BASE


@dataclass(frozen=True)
class H:
    target: tuple[str, ...]  # a regular file (F) elsewhere in the same tree


Spec = F | D | L | P | H
Tree = Mapping[str, Spec]


def build(root: Path, tree: Tree) -> Path:
    """Create ``tree`` under ``root`` (which may exist); returns root."""
    root.mkdir(parents=True, exist_ok=True)
    links: list[tuple[Path, Path]] = []
    _build_children(root, root, tree, links)
    for path, target in links:
        os.link(target, path)
    _fix_dir_times(root, tree)
    return root


def _build_children(root: Path, where: Path, tree: Tree, links: list[tuple[Path, Path]]) -> None:
    for name, spec in tree.items():
        path = where / name
        if isinstance(spec, H):
            links.append((path, root.joinpath(*spec.target)))
            continue
        if isinstance(spec, D):
            path.mkdir()
            _build_children(root, path, spec.children, links)
        elif isinstance(spec, F):
            path.write_bytes(spec.data)
        elif isinstance(spec, L):
            os.symlink(spec.target, path)
        else:
            os.mkfifo(path)
        os.chown(path, *spec.owner, follow_symlinks=False)
        if not isinstance(spec, L):
            os.chmod(path, spec.mode)
        if isinstance(spec, (F, D)) and spec.xattr is not None:
            os.setxattr(path, "user.spec", spec.xattr)
        os.utime(path, ns=(spec.mtime, spec.mtime), follow_symlinks=False)


def _fix_dir_times(where: Path, tree: Tree) -> None:
    for name, spec in tree.items():
        if isinstance(spec, D):
            _fix_dir_times(where / name, spec.children)
            os.utime(where / name, ns=(spec.mtime, spec.mtime))


def snapshot(root: Path) -> tuple[dict[str, tuple[object, ...]], set[frozenset[str]]]:
    """Everything below ``root`` that a round trip must keep, and the hard-link groups."""
    entries: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, set[str]] = defaultdict(set)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st_ = os.lstat(path)
            kind = stat.S_IFMT(st_.st_mode)
            xattrs = tuple(
                sorted(
                    (k, os.getxattr(path, k, follow_symlinks=False)) for k in os.listxattr(path, follow_symlinks=False)
                )
            )
            entries[rel] = (
                kind,
                stat.S_IMODE(st_.st_mode),
                st_.st_uid,
                st_.st_gid,
                Path(path).read_bytes() if kind == stat.S_IFREG else None,
                os.readlink(path) if kind == stat.S_IFLNK else None,
                xattrs,
                None if kind == stat.S_IFDIR else st_.st_mtime_ns // NS,
                st_.st_rdev,
            )
            if kind != stat.S_IFDIR:
                inodes[st_.st_ino].add(rel)
    return entries, {frozenset(names) for names in inodes.values()}


def tar_of(old: Path | None, new: Path) -> bytes:
    out = io.BytesIO()
    size = write_changes_tar(old, new, out)
    assert size == len(out.getvalue())
    return out.getvalue()


def apply_bytes(root: Path, data: bytes) -> None:
    root.mkdir(parents=True, exist_ok=True)
    apply_layer(root, io.BytesIO(data), allow_devices=True)


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        return tar.getmembers()


def listing(found: list[Change]) -> list[str]:
    return [str(change) for change in found]


def assert_round_trip(work: Path, parent: Tree, child: Tree) -> None:
    old, new, applied = build(work / "old", parent), build(work / "new", child), build(work / "applied", parent)
    apply_bytes(applied, tar_of(old, new))
    assert snapshot(applied) == snapshot(new)
    assert changes(applied, new) == []
    fresh = work / "fresh"
    fresh.mkdir()
    out = io.BytesIO()
    write_tree_tar(new, out)
    apply_bytes(fresh, out.getvalue())
    assert snapshot(fresh) == snapshot(new)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


# --- what is a change ---------------------------------------------------------------------------

LOWER: Tree = {
    "etc": D(
        {
            "hosts": F(b"127.0.0.1 localhost\n"),
            "motd": F(b"hello"),
            "ssl": D({"cert": F(b"cert"), "key": F(b"key", mode=0o600)}),
        }
    ),
    "bin": D({"sh": L("busybox"), "busybox": F(b"\x7fELF", mode=0o755)}),
    "var": D({"empty": D()}),
}


def test_identical_trees_have_no_changes(work: Path) -> None:
    assert changes(build(work / "a", LOWER), build(work / "b", LOWER)) == []


def test_no_parent_means_everything_is_added(work: Path) -> None:
    found = changes(None, build(work / "a", {"d": D({"f": F(b"f")}), "l": L("/x")}))
    assert listing(found) == ["A /d", "A /d/f", "A /l"]


def test_adds_changes_and_top_most_deletions(work: Path) -> None:
    etc = LOWER["etc"]
    assert isinstance(etc, D)
    upper = {
        **LOWER,
        "etc": replace(etc, children={"hosts": F(b"127.0.0.1 box\n"), "motd": F(b"hello"), "new": F(b"n")}),
        "var": D(),
        "tmp": D({"x": F()}),
    }
    found = changes(build(work / "a", LOWER), build(work / "b", upper))
    assert listing(found) == ["C /etc/hosts", "A /etc/new", "D /etc/ssl", "A /tmp", "A /tmp/x", "D /var/empty"]
    assert found[0] == Change("/etc/hosts", ChangeKind.MODIFY) and found[0].kind == "C"


def test_docker_list_names_parents_of_changes(work: Path) -> None:
    upper = {**LOWER, "var": D({"empty": D({"new": F()})})}
    old, new = build(work / "a", LOWER), build(work / "b", upper)
    assert listing(changes(old, new)) == ["A /var/empty/new"]
    assert listing(changes(old, new, include_parents=True)) == ["C /var", "C /var/empty", "A /var/empty/new"]


def test_directory_mtime_alone_is_not_a_change_but_its_mode_is(work: Path) -> None:
    touched = {**LOWER, "var": D({"empty": D(mtime=BASE + 5 * NS)})}
    assert changes(build(work / "a", LOWER), build(work / "b", touched)) == []
    chmodded = {**LOWER, "var": D({"empty": D(mode=0o700)})}
    assert listing(changes(build(work / "c", LOWER), build(work / "d", chmodded))) == ["C /var/empty"]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (F(b"a"), F(b"b")),  # same size, same mtime: only the contents tell
        (F(b"a"), F(b"ab")),
        (F(b"a"), F(b"a", mode=0o600)),
        (F(b"a"), F(b"a", mtime=BASE + NS)),
        (F(b"a"), F(b"a", xattr=b"x")),
        (F(b"a"), L("a")),
        (F(b"a"), D()),
        (L("x"), L("y")),
        (P(), P(mode=0o600)),
        (D({"f": F()}), F()),
    ],
    ids=["contents", "size", "mode", "mtime", "xattr", "to_symlink", "to_dir", "target", "fifo_mode", "dir_to_file"],
)
def test_each_kind_of_difference_is_a_change(work: Path, before: Spec, after: Spec) -> None:
    if not USER_XATTRS and isinstance(after, F) and after.xattr is not None:
        pytest.skip("filesystem without user xattrs")
    found = changes(build(work / "a", {"x": before}), build(work / "b", {"x": after}))
    assert listing(found)[0] == "C /x"
    assert all(change.kind is ChangeKind.ADD for change in found[1:])


@needs_root
def test_owner_change_is_a_change(work: Path) -> None:
    assert listing(changes(build(work / "a", {"x": F()}), build(work / "b", {"x": F(owner=(5, 5))}))) == ["C /x"]


def test_contents_check_can_be_switched_off_like_docker(work: Path) -> None:
    old, new = build(work / "a", {"x": F(b"a")}), build(work / "b", {"x": F(b"b")})
    assert changes(old, new, compare_content=False) == []
    assert listing(changes(old, new)) == ["C /x"]


def test_seconds_truncated_by_a_tar_match_nanosecond_mtimes(work: Path) -> None:
    precise = BASE + 123_456_789
    assert listing(changes(build(work / "a", {"x": F(mtime=BASE)}), build(work / "b", {"x": F(mtime=precise)}))) == []
    assert same_time(BASE, precise) and same_time(precise, BASE)
    assert not same_time(precise, BASE + 1)
    assert not same_time(BASE, BASE + NS)


def test_new_name_for_an_old_inode_changes_the_old_name_too(work: Path) -> None:
    old = build(work / "a", {"f": F(b"data")})
    new = build(work / "b", {"f": F(b"data"), "g": H(("f",))})
    assert listing(changes(old, new)) == ["C /f", "A /g"]


def test_deleting_one_name_of_a_pair_leaves_the_other_alone(work: Path) -> None:
    old = build(work / "a", {"f": F(b"data"), "g": H(("f",))})
    new = build(work / "b", {"f": F(b"data")})
    assert listing(changes(old, new)) == ["D /g"]


def test_sockets_are_skipped(work: Path) -> None:
    old, new = build(work / "a", {}), build(work / "b", {"f": F()})
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(new / "sock"))
        assert listing(changes(old, new)) == ["A /f"]
        assert [m.name for m in members(tar_of(old, new))] == ["f"]


def test_the_root_directory_is_never_listed(work: Path) -> None:
    old, new = build(work / "a", {"f": F()}), build(work / "b", {"f": F()})
    os.chmod(new, 0o700)
    assert changes(old, new) == []


def test_diff_size_counts_changed_files_once_per_inode(work: Path) -> None:
    lower: Tree = {"keep": F(b"k" * 10), "edit": F(b"e" * 20), "gone": F(b"g" * 40)}
    upper: Tree = {
        "keep": F(b"k" * 10),
        "edit": F(b"E" * 25),
        "new": F(b"n" * 100),
        "twin": H(("new",)),
        "d": D({"l": L("target")}),
    }
    assert diff_size(build(work / "a", lower), build(work / "b", upper)) == 25 + 100 + len("target")
    assert diff_size(None, build(work / "c", {"x": F(b"x" * 7), "y": H(("x",))})) == 7


# --- the tars -----------------------------------------------------------------------------------


def test_change_tar_has_parents_changes_and_whiteouts_in_order(work: Path) -> None:
    upper = {**LOWER, "var": D({"empty": D({"new": F(b"n")})}), "etc": D({"hosts": F(b"127.0.0.1 localhost\n")})}
    data = tar_of(build(work / "a", LOWER), build(work / "b", upper))
    assert [m.name for m in members(data)] == [
        "etc",
        "etc/.wh.motd",
        "etc/.wh.ssl",
        "var",
        "var/empty",
        "var/empty/new",
    ]


def test_tar_entries_carry_numeric_owners_modes_times_and_xattrs(work: Path) -> None:
    xattr = b"\xff\x00binary" if USER_XATTRS else None
    owner = OWNERS[-1]
    tree: Tree = {
        "d": D({"f": F(b"abc", mode=0o4750, owner=owner, mtime=BASE + 7 * NS + 5, xattr=xattr)}, mode=0o1777),
        "l": L("/etc/passwd", mtime=BASE),
        "p": P(mode=0o600),
        "h": H(("d", "f")),
    }
    got = {m.name: m for m in members(tar_of(None, build(work / "t", tree)))}
    assert list(got) == ["d", "d/f", "h", "l", "p"]
    f = got["d/f"]
    assert (f.type, f.mode, f.uid, f.gid, f.uname, f.gname) == (tarfile.REGTYPE, 0o4750, *owner, "", "")
    assert f.mtime == BASE // NS + 7 and f.size == 3
    if xattr is not None:
        assert f.pax_headers["SCHILY.xattr.user.spec"].encode("utf-8", "surrogateescape") == xattr
    assert (got["d"].type, got["d"].mode) == (tarfile.DIRTYPE, 0o1777)
    assert (got["h"].type, got["h"].linkname, got["h"].size) == (tarfile.LNKTYPE, "d/f", 0)
    assert (got["l"].type, got["l"].linkname) == (tarfile.SYMTYPE, "/etc/passwd")
    assert got["p"].type == tarfile.FIFOTYPE


def test_whiteout_entries_are_empty_and_timeless(work: Path) -> None:
    data = tar_of(build(work / "a", {"gone": F(b"x", mtime=BASE)}), build(work / "b", {}))
    (whiteout,) = members(data)
    assert (whiteout.name, whiteout.type, whiteout.size, whiteout.mode, whiteout.mtime) == (
        ".wh.gone",
        tarfile.REGTYPE,
        0,
        0,
        0,
    )


@needs_root
def test_device_nodes_are_exported(work: Path) -> None:
    root = build(work / "t", {})
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(root / "null", 0o666)  # mknod's mode is masked by the umask
    (null,) = members(tar_of(None, root))
    assert (null.type, null.devmajor, null.devminor, null.mode) == (tarfile.CHRTYPE, 1, 3, 0o666)


def test_output_is_deterministic(work: Path) -> None:
    one = build(work / "one", LOWER)
    two = build(work / "two", dict(reversed(list(LOWER.items()))))  # other inode and directory orders
    assert tar_of(None, one) == tar_of(None, one) == tar_of(None, two)
    out = io.BytesIO()
    write_tree_tar(two, out)
    assert out.getvalue() == tar_of(None, one)


def test_names_that_look_like_whiteouts_cannot_be_stored(work: Path) -> None:
    with pytest.raises(ArchiveError, match="whiteouts"):
        tar_of(None, build(work / "t", {"d": D({".wh.sneaky": F()})}))


def test_non_utf8_names_and_long_names_survive(work: Path) -> None:
    root = build(work / "t", {})
    odd = os.fsdecode(b"caf\xe9")
    deep = root / ("n" * 120) / ("m" * 120)
    deep.mkdir(parents=True)
    (deep / odd).write_bytes(b"latin-1 name")
    fresh = work / "fresh"
    apply_bytes(fresh, tar_of(None, root))
    assert snapshot(fresh) == snapshot(root)


# --- round trips --------------------------------------------------------------------------------


def test_round_trip_of_a_typical_layer(work: Path) -> None:
    etc = LOWER["etc"]
    assert isinstance(etc, D)
    upper: Tree = {
        "etc": replace(
            etc,
            children={
                "hosts": F(b"127.0.0.1 container\n"),
                "motd": D({"now": F(b"a dir")}),
                "ssl": D({"key": F(b"key", mode=0o600), "cert": L("../hosts")}, mode=0o700),
            },
        ),
        "bin": D({"sh": H(("bin", "busybox")), "busybox": F(b"\x7fELF2", mode=0o755), "ash": H(("bin", "busybox"))}),
        "var": F(b"var is now a file"),
        "run": D({"pipe": P(mode=0o600)}),
    }
    assert_round_trip(work, LOWER, upper)


def test_round_trip_of_link_group_changes(work: Path) -> None:
    lower: Tree = {"a": F(b"1"), "b": H(("a",)), "c": F(b"1"), "d": D({"e": H(("a",))})}
    upper: Tree = {"a": F(b"1"), "c": F(b"1"), "b": H(("c",)), "d": D({"e": H(("c",)), "f": H(("a",))})}
    assert_round_trip(work, lower, upper)


def test_round_trip_where_only_contents_changed(work: Path) -> None:
    assert_round_trip(work, {"f": F(b"aaaa"), "g": H(("f",))}, {"f": F(b"bbbb"), "g": H(("f",))})


@needs_root
def test_round_trip_of_devices(work: Path) -> None:
    old, new, applied = build(work / "old", {}), build(work / "new", {}), build(work / "applied", {})
    os.mknod(new / "loop0", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.chmod(new / "loop0", 0o660)
    os.chown(new / "loop0", 0, 6)
    apply_bytes(applied, tar_of(old, new))
    assert snapshot(applied) == snapshot(new)


# --- GNU tar agrees with us -----------------------------------------------------------------------

needs_gnu_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")


@needs_gnu_tar
def test_gnu_tar_extracts_our_tars(work: Path) -> None:
    tree = {**LOWER, "x": F(b"x", xattr=b"v" if USER_XATTRS else None), "h": H(("x",))}
    src, dest = build(work / "src", tree), work / "dest"
    dest.mkdir()
    data = tar_of(None, src)
    flags = ["--xattrs", "--xattrs-include=*", "--numeric-owner", "-p"]
    subprocess.run(["tar", "-x", *flags, "-C", str(dest)], input=data, check=True, capture_output=True)
    assert snapshot(dest) == snapshot(src)


@needs_gnu_tar
def test_we_apply_gnu_tars(work: Path) -> None:
    tree = {**LOWER, "x": F(b"x", xattr=b"v" if USER_XATTRS else None), "h": H(("x",)), "p": P()}
    src, dest = build(work / "src", tree), work / "dest"
    flags = ["--format=posix", "--xattrs", "--xattrs-include=*", "--numeric-owner"]
    data = subprocess.run(["tar", "-c", *flags, "-C", str(src), "."], check=True, capture_output=True).stdout
    apply_bytes(dest, data)
    assert snapshot(dest) == snapshot(src)


# --- Hypothesis -----------------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "d"])
MTIMES = st.builds(lambda s, frac: BASE + s * NS + frac, st.integers(0, 2), st.sampled_from([0, 250_000_000]))
XATTRS = st.sampled_from([None, b"x", b"\x00\xff"]) if USER_XATTRS else st.none()
OWNER = st.sampled_from(OWNERS)


def files() -> st.SearchStrategy[F]:
    return st.builds(
        F,
        st.sampled_from([b"", b"one", b"two", b"x" * 5000]),
        st.sampled_from([0o644, 0o600, 0o4755]),
        OWNER,
        MTIMES,
        XATTRS,
    )


def leaves() -> st.SearchStrategy[Spec]:
    return st.one_of(
        files(),
        st.builds(L, st.sampled_from(["a", "../b", "/etc/passwd", "missing"]), OWNER, MTIMES),
        st.builds(P, st.sampled_from([0o644, 0o600]), OWNER, MTIMES),
    )


def nodes(depth: int) -> st.SearchStrategy[Spec]:
    if depth == 0:
        return leaves()
    dirs = st.builds(
        D,
        st.dictionaries(NAMES, st.deferred(lambda: nodes(depth - 1)), max_size=3),
        st.sampled_from([0o755, 0o700, 0o1777]),
        OWNER,
        MTIMES,
        XATTRS,
    )
    return st.one_of(leaves(), dirs)


def _paths(tree: Tree, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Spec]]:
    for name, spec in tree.items():
        yield (*prefix, name), spec
        if isinstance(spec, D):
            yield from _paths(spec.children, (*prefix, name))


def _with_links(tree: Tree, links: list[tuple[tuple[str, ...], tuple[str, ...]]]) -> Tree:
    """Add hard links (directory, target) named h0, h1... where the directory exists."""
    out: Tree = dict(tree)
    for number, (where, target) in enumerate(links):
        out = _insert(out, where, f"h{number}", H(target))
    return out


def _insert(tree: Tree, where: tuple[str, ...], name: str, spec: Spec) -> Tree:
    if not where:
        return {**tree, name: spec}
    sub = tree.get(where[0])
    if not isinstance(sub, D):
        return tree
    return {**tree, where[0]: replace(sub, children=_insert(sub.children, where[1:], name, spec))}


def _valid_links(tree: Tree) -> Tree:
    """Drop hard links whose target is no longer a regular file."""
    specs = dict(_paths(tree))

    def keep(spec: Spec) -> bool:
        return not isinstance(spec, H) or isinstance(specs.get(spec.target), F)

    def clean(sub: Tree) -> Tree:
        return {
            name: replace(spec, children=clean(spec.children)) if isinstance(spec, D) else spec
            for name, spec in sub.items()
            if keep(spec)
        }

    return clean(tree)


@st.composite
def trees(draw: st.DrawFn) -> Tree:
    tree: Tree = draw(st.dictionaries(NAMES, nodes(2), max_size=4))
    paths = dict(_paths(tree))
    file_paths = sorted(p for p, s in paths.items() if isinstance(s, F))
    dir_paths = [(), *sorted(p for p, s in paths.items() if isinstance(s, D))]
    if file_paths:
        links = draw(st.lists(st.tuples(st.sampled_from(dir_paths), st.sampled_from(file_paths)), max_size=3))
        tree = _with_links(tree, links)
    return tree


@st.composite
def mutated(draw: st.DrawFn, tree: Tree, depth: int = 2) -> Tree:
    out: dict[str, Spec] = {}
    for name, spec in tree.items():
        action = draw(st.sampled_from(["keep", "keep", "drop", "replace", "tweak"]))
        if action == "keep":
            if isinstance(spec, D) and draw(st.booleans()):
                spec = replace(spec, children=draw(mutated(spec.children, max(depth - 1, 0))))
            out[name] = spec
        elif action == "replace":
            out[name] = draw(nodes(depth))
        elif action == "tweak":
            out[name] = _tweak(spec, draw(st.integers(0, 3)))
    for name in draw(st.lists(NAMES, max_size=2)):
        out.setdefault(name, draw(nodes(depth)))
    return out


def _tweak(spec: Spec, how: int) -> Spec:
    if isinstance(spec, F):
        tweaks: list[Spec] = [
            replace(spec, data=bytes(reversed(spec.data)) + b"!"[: len(spec.data) == 0]),  # contents only
            replace(spec, mode=spec.mode ^ 0o011),
            replace(spec, mtime=spec.mtime + NS),
            replace(spec, owner=OWNERS[-1] if spec.owner != OWNERS[-1] else OWNERS[0]),
        ]
        return tweaks[how]
    if isinstance(spec, D):
        return replace(spec, mode=spec.mode ^ 0o050)
    if isinstance(spec, L):
        return replace(spec, target=spec.target + "2")
    if isinstance(spec, P):
        return replace(spec, mode=spec.mode ^ 0o040)
    return spec


@st.composite
def tree_pairs(draw: st.DrawFn) -> tuple[Tree, Tree]:
    parent = draw(trees())
    child = _valid_links(draw(mutated(parent)))
    if draw(st.booleans()):
        paths = dict(_paths(child))
        file_paths = sorted(p for p, s in paths.items() if isinstance(s, F))
        if file_paths:
            child = _with_links(child, [((), draw(st.sampled_from(file_paths)))])
    return parent, child


@contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


@given(tree_pairs())
def test_round_trip_property(pair: tuple[Tree, Tree]) -> None:
    parent, child = pair
    with scratch() as work:
        assert_round_trip(work, parent, child)


@given(trees())
def test_tree_tar_is_deterministic_and_complete(tree: Tree) -> None:
    with scratch() as work:
        root = build(work / "t", tree)
        first, second = io.BytesIO(), io.BytesIO()
        write_tree_tar(root, first)
        write_tree_tar(root, second)
        assert first.getvalue() == second.getvalue()
        names = [m.name for m in members(first.getvalue())]
        assert names == sorted(names, key=lambda n: [os.fsencode(p) for p in n.split("/")])
        assert sorted(names) == sorted(os.path.relpath(p, root) for p in _walk_all(root))


def _walk_all(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield os.path.join(dirpath, name)
