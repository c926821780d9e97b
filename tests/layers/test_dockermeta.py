"""Docker's metadata directory: exact file bytes, lenient reading, atomic writes, names and id allocation.

Golden bytes are what Go's encoding/json writes for moby's ``devInfo``, ``transaction`` and
``DeviceSet`` structs (compact, fields in declaration order, HTML-safe string escaping).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmapper.errors import DeviceError, DevmapperError, ReadOnlyError
from devmapper.layers import dockermeta
from devmapper.layers.dockermeta import (
    DeviceSetRecord,
    DevInfo,
    IdAllocator,
    MetadataDir,
    MetadataFileError,
    TransactionRecord,
    device_name,
    device_prefix,
    file_name,
    go_json,
    pool_name,
)

GiB = 1 << 30
HASH = "3f2a1c0d9b8e7f6a5d4c3b2a19f8e7d6c5b4a3928170f6e5d4c3b2a190817263"
DOCKER_DEVINFO = b'{"device_id":12,"size":10737418240,"transaction_id":15,"initialized":false,"deleted":false}'
DOCKER_BASE = b'{"device_id":1,"size":10737418240,"transaction_id":1,"initialized":true,"deleted":false}'
DOCKER_TRANSACTION = b'{"open_transaction_id":16,"device_hash":"' + HASH.encode() + b'","device_id":13}'
DOCKER_DEVICESET = (
    b'{"next_device_id":13,"BaseDeviceUUID":"5c1e3f7a-61a4-4f2e-9c1d-0c8e2d3b4a59","BaseDeviceFilesystem":"xfs"}'
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "devicemapper"
    path.mkdir()
    return path


def write_meta(home: Path, name: str, data: bytes) -> Path:
    (home / "metadata").mkdir(exist_ok=True)
    path = home / "metadata" / name
    path.write_bytes(data)
    return path


def leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "metadata").iterdir() if p.name.startswith(".tmp"))


# -- exact bytes --------------------------------------------------------------------------------------


def test_devinfo_bytes_match_docker() -> None:
    assert DevInfo(HASH, 12, 10 * GiB, 15).to_json() == DOCKER_DEVINFO
    assert DevInfo("", 1, 10 * GiB, 1, initialized=True).to_json() == DOCKER_BASE
    assert DevInfo("x", 7, 1, 2, deleted=True).to_json() == (
        b'{"device_id":7,"size":1,"transaction_id":2,"initialized":false,"deleted":true}'
    )


def test_transaction_bytes_match_docker() -> None:
    assert TransactionRecord(16, HASH, 13).to_json() == DOCKER_TRANSACTION
    assert TransactionRecord(0, "", 0).to_json() == b'{"open_transaction_id":0,"device_hash":"","device_id":0}'


def test_deviceset_bytes_match_docker() -> None:
    rec = DeviceSetRecord(13, "5c1e3f7a-61a4-4f2e-9c1d-0c8e2d3b4a59", "xfs")
    assert rec.to_json() == DOCKER_DEVICESET
    assert DeviceSetRecord(0).to_json() == b'{"next_device_id":0,"BaseDeviceUUID":"","BaseDeviceFilesystem":""}'


def test_docker_files_decode() -> None:
    assert DevInfo.from_json(HASH, DOCKER_DEVINFO) == DevInfo(HASH, 12, 10 * GiB, 15)
    assert TransactionRecord.from_json(DOCKER_TRANSACTION) == TransactionRecord(16, HASH, 13)
    assert DeviceSetRecord.from_json(DOCKER_DEVICESET) == DeviceSetRecord(
        13, "5c1e3f7a-61a4-4f2e-9c1d-0c8e2d3b4a59", "xfs"
    )


def test_pre_1_8_deviceset_file_has_only_the_hint() -> None:
    assert DeviceSetRecord.from_json(b'{"next_device_id":3}') == DeviceSetRecord(3, "", "")


def test_older_devinfo_without_deleted_key() -> None:
    raw = b'{"device_id":4,"size":107374182400,"transaction_id":9,"initialized":false}'
    info = DevInfo.from_json("h", raw)
    assert (info.deleted, info.extra) == (False, {})
    assert info.to_json() == raw[:-1] + b',"deleted":false}'


def test_unknown_keys_are_kept_after_the_known_ones() -> None:
    raw = b'{"device_id":2,"filesystem":"xfs","size":5,"transaction_id":3,"initialized":true,"deleted":false}'
    info = DevInfo.from_json("h", raw)
    assert info.extra == {"filesystem": "xfs"}
    assert info.to_json() == (
        b'{"device_id":2,"size":5,"transaction_id":3,"initialized":true,"deleted":false,"filesystem":"xfs"}'
    )


def test_decoding_is_as_lenient_as_go() -> None:
    raw = b'{\n  "Device_ID": 5,\n  "SIZE": 10,\n  "transaction_id": null,\n  "deleted": true\n}\n'
    assert DevInfo.from_json("h", raw) == DevInfo("h", 5, 10, 0, deleted=True)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b'{"device_id":1}garbage', "not valid JSON"),
        (b"null", "expected a JSON object"),
        (b"[1,2]", "expected a JSON object"),
        (b'"base"', "expected a JSON object"),
        (b'{"device_id":"12"}', "device_id must be a JSON int"),
        (b'{"device_id":12.0}', "device_id must be a JSON int"),
        (b'{"device_id":1e3}', "device_id must be a JSON int"),
        (b'{"device_id":true}', "device_id must be a JSON int"),
        (b'{"device_id":9223372036854775808}', "device_id must be a JSON int"),
        (b'{"device_id":-1}', "device_id -1 is negative"),
        (b'{"size":-1}', "size must be a JSON uint64"),
        (b'{"size":18446744073709551616}', "size must be a JSON uint64"),
        (b'{"size":NaN}', "not valid JSON"),
        (b'{"transaction_id":Infinity}', "not valid JSON"),
        (b'{"initialized":1}', "initialized must be a JSON bool"),
        (b'{"deleted":"false"}', "deleted must be a JSON bool"),
        (b'{"x":' * 100_000, "not valid JSON"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),  # Go refuses a byte-order mark too
    ],
)
def test_invalid_device_files_are_refused(raw: bytes, problem: str) -> None:
    with pytest.raises(MetadataFileError) as info:
        DevInfo.from_json("h", raw, "/x/metadata/h")
    assert str(info.value).startswith("/x/metadata/h: ")
    assert problem in str(info.value)


def test_invalid_bookkeeping_files_are_refused() -> None:
    with pytest.raises(MetadataFileError, match="device_hash must be a JSON string"):
        TransactionRecord.from_json(b'{"open_transaction_id":1,"device_hash":5,"device_id":1}')
    with pytest.raises(MetadataFileError, match="BaseDeviceUUID must be a JSON string"):
        DeviceSetRecord.from_json(b'{"next_device_id":1,"BaseDeviceUUID":false}')
    with pytest.raises(MetadataFileError, match="next_device_id must be a JSON int"):
        DeviceSetRecord.from_json(b'{"next_device_id":"1"}')


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("<a&b>", r'"\u003ca\u0026b\u003e"'),
        ('q"b\\s', r'"q\"b\\s"'),
        ("\n\r\t\x01\x1f\x7f", '"\\n\\r\\t\\u0001\\u001f\x7f"'),
        ("\u2028\u2029é€😀", '"\\u2028\\u2029é€😀"'),
        ("\ud800", '"\ufffd"'),
        (1.0, "1"),
        (0.1, "0.1"),
        (-0.0, "-0"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (1.5e-7, "1.5e-7"),
        (123456789.5, "123456789.5"),
        (None, "null"),
        ([1, "a", True, {}], '[1,"a",true,{}]'),
        ({"b": 1, "a": {"c": None}}, '{"b":1,"a":{"c":null}}'),
    ],
)
def test_go_json_encoding(value: Any, encoded: str) -> None:
    assert go_json(value) == encoded


def test_go_json_refuses_what_go_cannot_encode() -> None:
    for value in (float("nan"), float("inf"), b"bytes", {1, 2}):
        with pytest.raises(MetadataFileError):
            go_json(value)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@given(JSON_VALUES)
def test_go_json_is_json(value: Any) -> None:
    assert json.loads(go_json(value)) == value


@given(
    hash=st.text(min_size=1, max_size=8),
    device_id=st.integers(0, 0xFFFFFF),
    size=st.integers(0, (1 << 64) - 1),
    transaction_id=st.integers(0, (1 << 64) - 1),
    initialized=st.booleans(),
    deleted=st.booleans(),
    extra=st.dictionaries(st.text(alphabet="xyz_", min_size=1, max_size=6), JSON_VALUES, max_size=3),
)
def test_devinfo_round_trip(
    hash: str, device_id: int, size: int, transaction_id: int, initialized: bool, deleted: bool, extra: dict[str, Any]
) -> None:
    info = DevInfo(hash, device_id, size, transaction_id, initialized, deleted, extra)
    raw = info.to_json()
    assert DevInfo.from_json(hash, raw) == info
    assert raw.startswith(b'{"device_id":%d,"size":%d,' % (device_id, size))


# -- names -------------------------------------------------------------------------------------------


def test_file_names() -> None:
    assert file_name("") == "base"
    assert file_name(HASH) == HASH
    assert file_name(HASH + "-init") == HASH + "-init"


@pytest.mark.parametrize(
    "hash",
    ["a/b", "/abs", "..", ".tmp123", ".hidden", "json.migrated", "deviceset-metadata", "transaction-metadata", "base",
     "nul\0byte", "x" * 256],
)
def test_file_name_refuses_clashing_hashes(hash: str) -> None:
    with pytest.raises(MetadataFileError, match="cannot name a metadata file"):
        file_name(hash)


def test_device_and_pool_names() -> None:
    prefix = "docker-253:1-17538953"
    assert device_name(prefix, "") == "docker-253:1-17538953-base"
    assert device_name(prefix, HASH) == f"docker-253:1-17538953-{HASH}"
    assert device_name(prefix, "abc-init") == "docker-253:1-17538953-abc-init"
    assert pool_name(prefix) == "docker-253:1-17538953-pool"


def test_device_prefix_from_stat(home: Path) -> None:
    st_ = os.stat(home)
    major = (st_.st_dev >> 8) & 0xFFF
    minor = (st_.st_dev & 0xFF) | ((st_.st_dev >> 12) & 0xFFF00)
    assert device_prefix(home) == f"docker-{major}:{minor}-{st_.st_ino}"
    if os.major(st_.st_dev) < 0x1000 and os.minor(st_.st_dev) < 0x100000:
        assert device_prefix(home) == f"docker-{os.major(st_.st_dev)}:{os.minor(st_.st_dev)}-{st_.st_ino}"


def test_device_prefix_changes_with_the_inode(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert device_prefix(tmp_path / "a") != device_prefix(tmp_path / "b")


@pytest.mark.parametrize(
    ("major", "minor", "docker"),
    [
        (8, 1, (8, 1)),
        (253, 0, (253, 0)),
        (259, 0x12345, (259, 0x12345)),  # minors above 255 use the high bits
        (0xFFF, 0xFFFFF, (0xFFF, 0xFFFFF)),
        (0x1000, 3, (0, 3)),  # Docker's major ignores the bits glibc keeps above bit 32
    ],
)
def test_docker_major_minor_arithmetic(major: int, minor: int, docker: tuple[int, int]) -> None:
    dev = os.makedev(major, minor)
    assert (dockermeta._docker_major(dev), dockermeta._docker_minor(dev)) == docker


def test_device_prefix_of_a_missing_home(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        device_prefix(tmp_path / "missing")


# -- the directory -----------------------------------------------------------------------------------


def test_missing_directory_is_empty(home: Path) -> None:
    meta = MetadataDir(home)
    assert meta.load_all() == {}
    assert meta.load(HASH) is None and meta.load("") is None
    assert meta.transaction() is None and meta.deviceset() is None
    assert meta.cleanup_temp() == 0
    meta.remove(HASH)
    meta.remove_transaction()
    assert not (home / "metadata").exists()


def test_save_load_round_trip(home: Path) -> None:
    meta = MetadataDir(home)
    base = DevInfo("", 1, 10 * GiB, 1, initialized=True)
    layer = DevInfo(HASH, 12, 10 * GiB, 15, extra={"filesystem": "xfs"})
    meta.save(base)
    meta.save(layer)
    assert (home / "metadata" / "base").read_bytes() == DOCKER_BASE
    assert (home / "metadata" / HASH).read_bytes() == DOCKER_DEVINFO[:-1] + b',"filesystem":"xfs"}'
    assert meta.load("") == base and meta.load(HASH) == layer
    assert meta.load_all() == {"": base, HASH: layer}
    assert MetadataDir(home, read_only=True).load_all() == {"": base, HASH: layer}


def test_new_directory_and_files_are_private(home: Path) -> None:
    MetadataDir(home).save(DevInfo(HASH, 1, 1, 1))
    assert stat.S_IMODE((home / "metadata").stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "metadata" / HASH).stat().st_mode) == 0o600


def test_save_replaces(home: Path) -> None:
    meta = MetadataDir(home)
    info = DevInfo(HASH, 12, 10 * GiB, 15)
    meta.save(info)
    info.deleted = True
    meta.save(info)
    assert meta.load(HASH) == info
    assert leftovers(home) == []


def test_bookkeeping_files(home: Path) -> None:
    meta = MetadataDir(home)
    meta.save_transaction(TransactionRecord(16, HASH, 13))
    meta.save_deviceset(DeviceSetRecord(13, "5c1e3f7a-61a4-4f2e-9c1d-0c8e2d3b4a59", "xfs"))
    assert (home / "metadata" / "transaction-metadata").read_bytes() == DOCKER_TRANSACTION
    assert (home / "metadata" / "deviceset-metadata").read_bytes() == DOCKER_DEVICESET
    assert meta.transaction() == TransactionRecord(16, HASH, 13)
    assert meta.deviceset() == DeviceSetRecord(13, "5c1e3f7a-61a4-4f2e-9c1d-0c8e2d3b4a59", "xfs")
    assert meta.load_all() == {}  # bookkeeping files are not devices
    meta.remove_transaction()
    assert meta.transaction() is None
    meta.remove_transaction()


def test_load_all_skips_what_docker_skips(home: Path) -> None:
    write_meta(home, "base", DOCKER_BASE)
    write_meta(home, HASH, DOCKER_DEVINFO)
    write_meta(home, "deviceset-metadata", DOCKER_DEVICESET)
    write_meta(home, "transaction-metadata", DOCKER_TRANSACTION)
    write_meta(home, ".tmp123456", b'{"device_id":')  # torn write from a crash
    write_meta(home, ".hidden", b"not json")
    write_meta(home, "json.migrated", b"{}")
    write_meta(home, "old.migrated", b"not json")
    (home / "metadata" / "subdir").mkdir()
    assert set(MetadataDir(home).load_all()) == {"", HASH}


def test_file_named_base_is_the_base_device(home: Path) -> None:
    write_meta(home, "base", DOCKER_BASE)
    assert MetadataDir(home).load_all()[""].initialized


def test_ids_beyond_24_bits_are_ignored_and_logged(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_meta(home, "big", b'{"device_id":16777216,"size":1,"transaction_id":1,"initialized":false,"deleted":false}')
    write_meta(home, "max", b'{"device_id":16777215,"size":1,"transaction_id":1,"initialized":false,"deleted":false}')
    meta = MetadataDir(home)
    with caplog.at_level(logging.WARNING, logger="devmapper.layers.dockermeta"):
        assert set(meta.load_all()) == {"max"}
        assert meta.load("big") is None
    assert "Ignoring Invalid DeviceId=16777216" in caplog.text


def test_unparsable_file_is_an_error_naming_it(home: Path) -> None:
    write_meta(home, "base", DOCKER_BASE)
    path = write_meta(home, "broken", b'{"device_id": 3, "size": ')
    meta = MetadataDir(home)
    with pytest.raises(MetadataFileError) as info:
        meta.load_all()
    assert str(info.value).startswith(f"{path}: not valid JSON")
    with pytest.raises(MetadataFileError, match="broken"):
        meta.load("broken")


def test_unparsable_bookkeeping_files_are_errors(home: Path) -> None:
    write_meta(home, "transaction-metadata", b"{")
    write_meta(home, "deviceset-metadata", b"[]")
    meta = MetadataDir(home)
    with pytest.raises(MetadataFileError, match="transaction-metadata: not valid JSON"):
        meta.transaction()
    with pytest.raises(MetadataFileError, match="deviceset-metadata: expected a JSON object"):
        meta.deviceset()


def test_unreadable_metadata_path_is_an_error(home: Path) -> None:
    (home / "metadata").write_bytes(b"a file, not a directory")
    meta = MetadataDir(home)
    with pytest.raises(MetadataFileError, match="cannot"):
        meta.load_all()
    with pytest.raises(MetadataFileError, match="cannot"):
        meta.save(DevInfo(HASH, 1, 1, 1))


def test_remove(home: Path) -> None:
    meta = MetadataDir(home)
    meta.save(DevInfo(HASH, 12, 1, 1))
    meta.remove(HASH)
    assert meta.load(HASH) is None and not (home / "metadata" / HASH).exists()
    meta.remove(HASH)  # missing is fine


def test_bad_hashes_are_refused_before_touching_disk(home: Path) -> None:
    meta = MetadataDir(home)
    for bad in ("../escape", "transaction-metadata", ".tmpx"):
        with pytest.raises(MetadataFileError):
            meta.save(DevInfo(bad, 1, 1, 1))
        with pytest.raises(MetadataFileError):
            meta.remove(bad)
        with pytest.raises(MetadataFileError):
            meta.load(bad)
    assert not (home / "metadata").exists() and not (home.parent / "escape").exists()


def test_crash_leftovers_are_ignored_then_cleaned(home: Path) -> None:
    meta = MetadataDir(home)
    meta.save(DevInfo(HASH, 12, 1, 1))
    write_meta(home, ".tmp0001", b'{"device_id":13,"si')
    write_meta(home, ".tmp0002", b"")
    write_meta(home, ".hidden", b"kept")
    (home / "metadata" / ".tmpdir").mkdir()
    assert set(meta.load_all()) == {HASH}
    assert MetadataDir(home, read_only=True).load_all() == meta.load_all()
    assert meta.cleanup_temp() == 2
    assert sorted(p.name for p in (home / "metadata").iterdir()) == [".hidden", ".tmpdir", HASH]
    assert meta.cleanup_temp() == 0


def test_failed_save_leaves_no_temp_file_and_keeps_the_old_state(home: Path) -> None:
    meta = MetadataDir(home)
    (home / "metadata").mkdir()
    (home / "metadata" / HASH).mkdir()  # rename cannot replace a directory
    with pytest.raises(MetadataFileError, match=f"{HASH}: cannot write"):
        meta.save(DevInfo(HASH, 12, 1, 1))
    assert leftovers(home) == []
    assert (home / "metadata" / HASH).is_dir()


def test_save_fsyncs_file_and_directory(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    meta = MetadataDir(home)
    meta.save(DevInfo(HASH, 12, 1, 1))
    assert synced == ["dir", "file", "dir"]  # home (metadata/ was created), the file, metadata/
    synced.clear()
    meta.save(DevInfo(HASH, 12, 2, 1))
    assert synced == ["file", "dir"]
    synced.clear()
    meta.remove(HASH)
    assert synced == ["dir"]


def test_read_only_refuses_every_write(home: Path) -> None:
    MetadataDir(home).save(DevInfo(HASH, 12, 1, 1))
    MetadataDir(home).save_transaction(TransactionRecord(1, HASH, 12))
    write_meta(home, ".tmp0001", b"")
    before = {p.name: p.read_bytes() for p in (home / "metadata").iterdir()}
    ro = MetadataDir(home, read_only=True)
    writes = [
        lambda: ro.save(DevInfo(HASH, 12, 2, 1)),
        lambda: ro.save(DevInfo("new", 13, 2, 1)),
        lambda: ro.remove(HASH),
        lambda: ro.save_transaction(TransactionRecord(2, HASH, 12)),
        ro.remove_transaction,
        lambda: ro.save_deviceset(DeviceSetRecord(1)),
        ro.cleanup_temp,
    ]
    for write in writes:
        with pytest.raises(ReadOnlyError, match="read-only"):
            write()
    assert {p.name: p.read_bytes() for p in (home / "metadata").iterdir()} == before
    assert ro.load(HASH) == DevInfo(HASH, 12, 1, 1) and ro.transaction() == TransactionRecord(1, HASH, 12)


def test_error_families() -> None:
    assert issubclass(MetadataFileError, DevmapperError)
    assert issubclass(ReadOnlyError, DevmapperError)


# -- id allocation -------------------------------------------------------------------------------------


def test_fresh_install_gives_the_base_device_id_1() -> None:
    alloc = IdAllocator(())
    assert [alloc.allocate() for _ in range(3)] == [1, 2, 3]
    assert alloc.next_hint == 3


def test_allocation_skips_used_ids_and_follows_the_hint() -> None:
    alloc = IdAllocator([1, 2, 3, 5, 100], next_hint=0)
    assert [alloc.allocate() for _ in range(3)] == [4, 6, 7]
    alloc = IdAllocator([1, 2, 3], next_hint=50)
    assert alloc.allocate() == 51
    assert alloc.is_used(51) and not alloc.is_used(4)


def test_released_ids_come_back_only_after_the_hint_passes_them() -> None:
    alloc = IdAllocator([1, 2, 3], next_hint=3)
    alloc.release(2)
    assert alloc.allocate() == 4  # Docker scans forward from the hint, not from 0
    assert not alloc.is_used(2)


def test_wrap_around_hands_out_id_0_like_docker() -> None:
    alloc = IdAllocator([1, 2], next_hint=14, max_id=15)
    assert [alloc.allocate() for _ in range(3)] == [15, 0, 3]


def test_wrap_around_in_the_24_bit_space() -> None:
    alloc = IdAllocator([0xFFFFFF, 0, 1], next_hint=0xFFFFFE)
    assert alloc.allocate() == 2
    alloc = IdAllocator([], next_hint=0xFFFFFF)
    assert alloc.allocate() == 0


def test_hint_wraps_like_go_masking() -> None:
    assert IdAllocator([], next_hint=0x1000000).next_hint == 0
    assert IdAllocator([], next_hint=-1).allocate() == 0  # Go: (-1 + 1) & 0xffffff


def test_exhaustion() -> None:
    alloc = IdAllocator([3], max_id=7)
    ids = [alloc.allocate() for _ in range(7)]
    assert sorted(ids) == [0, 1, 2, 4, 5, 6, 7]
    with pytest.raises(DeviceError, match="devmapper: Unable to find a free device ID") as info:
        alloc.allocate()
    assert info.value.errno_name == "ENOSPC"
    alloc.release(5)
    assert alloc.allocate() == 5


@pytest.mark.parametrize("max_id", [0, 6, 12, 16, 23])
def test_id_space_not_a_multiple_of_8(max_id: int) -> None:
    alloc = IdAllocator((), max_id=max_id)
    ids = {alloc.allocate() for _ in range(max_id + 1)}
    assert ids == set(range(max_id + 1))
    with pytest.raises(DeviceError):
        alloc.allocate()


def test_ids_outside_the_space_are_refused() -> None:
    with pytest.raises(DeviceError, match=r"outside 0\.\.16777215"):
        IdAllocator([0x1000000])
    alloc = IdAllocator((), max_id=7)
    for bad in (-1, 8):
        for op in (alloc.mark_used, alloc.release, alloc.is_used):
            with pytest.raises(DeviceError):
                op(bad)
    with pytest.raises(DeviceError):
        IdAllocator((), max_id=-1)


def test_scanning_a_crowded_24_bit_space_is_fast() -> None:
    alloc = IdAllocator(range(1, 200_000))  # the scan runs in C; a Python loop per id would be slow
    assert alloc.allocate() == 200_000


def reference_allocate(used: set[int], hint: int, size: int) -> int | None:
    """Docker's getNextFreeDeviceID, one id at a time."""
    candidate = hint
    for _ in range(size):
        candidate = (candidate + 1) % size
        if candidate not in used:
            return candidate
    return None


@given(
    max_id=st.integers(0, 40),
    initial=st.sets(st.integers(0, 40), max_size=20),
    hint=st.integers(0, 40),
    ops=st.lists(st.tuples(st.sampled_from(["allocate", "release", "mark"]), st.integers(0, 40)), max_size=60),
)
def test_allocator_matches_dockers_loop(
    max_id: int, initial: set[int], hint: int, ops: list[tuple[str, int]]
) -> None:
    size = max_id + 1
    used = {i for i in initial if i <= max_id}
    alloc = IdAllocator(used, hint, max_id=max_id)
    hint %= size
    for op, arg in ops:
        if op == "allocate":
            expected = reference_allocate(used, hint, size)
            if expected is None:
                with pytest.raises(DeviceError):
                    alloc.allocate()
            else:
                assert alloc.allocate() == expected
                used.add(expected)
                hint = expected
        elif arg <= max_id:
            (alloc.release if op == "release" else alloc.mark_used)(arg)
            (used.discard if op == "release" else used.add)(arg)
        assert alloc.next_hint == hint
    assert {i for i in range(size) if alloc.is_used(i)} == used
