"""Pool messages: the kernel's syntax, semantics and errno for each error case (pool_message)."""

from __future__ import annotations

import pytest

from devmapper.errors import DeviceError
from devmapper.thin.status import PoolFeatures, PoolMode
from pool.support import BLOCK, PoolFiles


def errno_of(pool_call: object, *args: object) -> str:
    with pytest.raises(DeviceError) as exc:
        pool_call(*args)  # type: ignore[operator]
    return exc.value.errno_name


@pytest.mark.parametrize(
    "msg",
    [
        "",
        "frobnicate 1",
        "create_thin",
        "create_thin 1 2",
        "create_thin x",
        "create_thin -1",
        "create_thin 16777216",
        "create_thin 0x10",
        "create_snap 1",
        "create_snap 1 x",
        "delete",
        "set_transaction_id 0",
        "set_transaction_id 0 x",
        "set_transaction_id 18446744073709551616 1",
        "reserve_metadata_snap now",
        "release_metadata_snap 1",
    ],
)
def test_malformed_messages_are_einval(files: PoolFiles, msg: str) -> None:
    with files.open() as pool:
        assert errno_of(pool.message, msg) == "EINVAL"


def test_create_thin_accepts_the_largest_id_and_mixed_case(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.message("CREATE_THIN 16777215")
        pool.message("create_thin +3")
        assert pool.md.devices() == [3, 16777215]
    files.check()


def test_existing_and_missing_devices(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.message("create_thin 1")
        assert errno_of(pool.message, "create_thin 1") == "EEXIST"
        assert errno_of(pool.message, "create_snap 1 2") == "EEXIST"
        assert errno_of(pool.message, "create_snap 2 9") == "ENODATA"
        assert errno_of(pool.message, "delete 9") == "ENODATA"
        pool.message("create_snap 2 1")
        pool.message("delete 2")
        assert pool.md.devices() == [1]
    files.check()


def test_delete_of_an_open_thin_is_ebusy(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.message("create_thin 1")
        vol = pool.open_thin(1, 2048)
        vol2 = pool.open_thin(1, 2048)
        assert errno_of(pool.message, "delete 1") == "EBUSY"
        vol.close()
        assert errno_of(pool.message, "delete 1") == "EBUSY"
        vol2.close()
        pool.message("delete 1")
    files.check()


def test_set_transaction_id_is_compare_and_swap(files: PoolFiles) -> None:
    with files.open() as pool:
        for i in range(20):
            pool.message(f"set_transaction_id {i} {i + 1}")
        assert errno_of(pool.message, "set_transaction_id 5 6") == "EINVAL"
        pool.message("set_transaction_id 20 18446744073709551615")
    with files.open() as pool:
        assert pool.status().startswith("18446744073709551615 ")
    files.check()


def test_metadata_snap_reserve_and_release_errors(files: PoolFiles) -> None:
    with files.open() as pool:
        assert errno_of(pool.message, "release_metadata_snap") == "EINVAL"
        pool.message("reserve_metadata_snap")
        assert errno_of(pool.message, "reserve_metadata_snap") == "EBUSY"
        pool.message("release_metadata_snap")
        assert errno_of(pool.message, "release_metadata_snap") == "EINVAL"
    files.check()


def test_metadata_snap_is_stable_while_live_mappings_change(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.message("create_thin 0")
        with pool.open_thin(0, 4096) as vol:
            vol.write(0, b"x" * BLOCK)
            pool.message("reserve_metadata_snap")
            vol.write(5 * BLOCK, b"y" * BLOCK)
            vol.discard(0, BLOCK)
    files.check()
    from pool.support import thin_check

    thin_check(files.meta, "-m")


def test_messages_are_committed_at_once(files: PoolFiles) -> None:
    pool = files.open()
    pool.message("create_thin 4")
    pool.message("create_snap 5 4")
    files.check()  # the live metadata on disk is already consistent and holds both
    pool.close()
    with files.open() as pool:
        assert pool.md.devices() == [4, 5]


def test_messages_are_refused_by_a_read_only_pool(files: PoolFiles) -> None:
    files.open().close()
    with files.open(features=PoolFeatures(read_only=True)) as pool:
        assert pool.mode is PoolMode.READ_ONLY
        for msg in ("create_thin 1", "delete 1", "reserve_metadata_snap", "bogus"):
            assert errno_of(pool.message, msg) == "EOPNOTSUPP"
        assert errno_of(pool.message, "") == "EINVAL"


def test_create_snap_waits_for_in_flight_writes_to_the_origin(files: PoolFiles) -> None:
    import threading

    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, 64 * 128) as vol:
            vol.write(0, b"\0" * (64 * BLOCK))
            stop = threading.Event()
            counter = [0]

            def writer() -> None:
                while not stop.is_set():
                    counter[0] += 1
                    vol.write((counter[0] % 64) * BLOCK, counter[0].to_bytes(8, "little") * (BLOCK // 8))

            t = threading.Thread(target=writer)
            t.start()
            snaps = []
            for i in range(1, 6):
                pool.create_snap(i, 0)
                snaps.append(i)
            stop.set()
            t.join()
            # each snapshot holds whole blocks: every block is one 8-byte value repeated
            for s in snaps:
                with pool.open_thin(s, 64 * 128) as snap:
                    data = snap.read(0, 64 * BLOCK)
                    for b in range(64):
                        block = data[b * BLOCK : (b + 1) * BLOCK]
                        assert block == block[:8] * (BLOCK // 8)
    files.check()


def test_a_reused_thin_id_starts_empty(files: PoolFiles) -> None:
    with files.open() as pool:
        pool.message("create_thin 1")
        with pool.open_thin(1, 2048) as vol:
            vol.write(0, b"old life")
        pool.message("delete 1")
        pool.message("create_thin 1")
        with pool.open_thin(1, 2048) as vol:
            assert vol.read(0, 8) == bytes(8) and vol.status() == "0 -"
        assert pool.status().split()[2] == "0/256"
    files.check()
