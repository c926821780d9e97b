"""DeviceSet on a live daemon: pool and base device, snapshots, mounts, deletion, transactions, reconcile."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from devmapper.layers.deviceset import DeviceSetError
from devmapper.layers.dockermeta import TransactionRecord
from helpers.stack import Stack

HEX = "a" * 64


def test_init_lays_out_docker_directories_and_a_formatted_base(stack: Stack) -> None:
    store = stack.store()
    ds = store.devices
    home = stack.root / "devicemapper"
    assert (home / "devicemapper" / "data").stat().st_size == 2 << 30
    assert (home / "devicemapper" / "metadata").stat().st_size == 64 << 20
    st = os.stat(home)
    major, minor = (st.st_dev >> 8) & 0xFFF, (st.st_dev & 0xFF) | ((st.st_dev >> 12) & 0xFFF00)
    assert ds.pool == f"docker-{major}:{minor}-{st.st_ino}-pool"
    base = json.loads((home / "metadata" / "base").read_text())
    assert base == {"device_id": 1, "size": 256 << 20, "transaction_id": 1, "initialized": True, "deleted": False}
    assert json.loads((home / "metadata" / "transaction-metadata").read_text())["open_transaction_id"] == 1
    assert ds.pool_usage().transaction_id == 1
    assert ds.base_fs == "ext4"
    assert not ds.is_active("")  # the base device is deactivated after mkfs
    store.close()
    # a second open finds everything and changes nothing
    again = stack.store()
    assert again.devices.devices[""].device_id == 1
    assert again.devices.pool_usage().transaction_id == 1
    again.close()


def test_snapshot_mount_write_and_share(stack: Stack) -> None:
    with stack.store() as store:
        ds = store.devices
        ds.add_device(HEX, "")
        rootfs = ds.mount(HEX)
        assert rootfs == stack.root / "devicemapper" / "mnt" / HEX / "rootfs"
        (rootfs / "hello").write_bytes(b"x" * (1 << 20))
        assert (rootfs.parent / "id").read_text() == HEX
        assert ds.mount(HEX) == rootfs  # reference-counted
        assert ds.mounted(HEX) == 2
        assert not ds.unmount(HEX)
        assert ds.unmount(HEX)
        assert not (rootfs.parent).exists()
        child = "b" * 64
        ds.add_device(child, HEX)
        assert (ds.mount(child) / "hello").read_bytes() == b"x" * (1 << 20)
        ds.unmount(child)
        usage = ds.usage()
        ids = {h: d.device_id for h, d in ds.devices.items()}
        # everything is shared with the parent but the few blocks the child's own mount wrote (superblock, journal)
        assert usage[ids[child]].exclusive_blocks < 8
        assert usage[ids[child]].shared_blocks >= 16  # the 1 MiB file at least
        assert usage[ids[child]].shared_blocks >= usage[ids[HEX]].mapped_blocks - 8
        with pytest.raises(DeviceSetError, match="already exists"):
            ds.add_device(child, HEX)
        with pytest.raises(DeviceSetError, match="Unknown device"):
            ds.add_device("c" * 64, "d" * 64)
        with pytest.raises(DeviceSetError, match="cannot be smaller"):
            ds.add_device("c" * 64, HEX, size=1 << 20)


def test_delete_while_mounted_is_deferred_then_finished(stack: Stack) -> None:
    with stack.store() as store:
        ds = store.devices
        ds.add_device(HEX, "")
        ds.mount(HEX)
        assert ds.delete_device(HEX) is False  # busy: marked deleted
        assert ds.devices[HEX].deleted
        meta = json.loads((stack.root / "devicemapper/metadata" / HEX).read_text())
        assert meta["deleted"] is True
        assert ds.deleted_count == 1
        with pytest.raises(DeviceSetError, match="deferred deletion"):
            ds.add_device("b" * 64, HEX)
        ds.unmount(HEX)
        assert ds.process_deleted() == 0
        assert HEX not in ds.devices
        assert not (stack.root / "devicemapper/metadata" / HEX).exists()
        assert ds.reconcile().clean


def test_pending_transaction_is_rolled_back_at_open(stack: Stack) -> None:
    with stack.store() as store:
        ds = store.devices
        tid = ds.transaction_id
        # a crash after create_snap and the device file, before set_transaction_id
        ds.meta.save_transaction(TransactionRecord(tid + 1, HEX, 7))
        ds.dm.message(ds.pool, "create_snap 7 1")
        assert 7 in ds.pool_ids()
    with stack.store() as store:
        assert 7 not in store.devices.pool_ids()
        assert store.devices.meta.transaction() is None
        assert store.devices.reconcile().clean


def test_reconcile_finds_orphans_both_ways_and_fixes_them(stack: Stack) -> None:
    with stack.store() as store:
        ds = store.devices
        ds.add_device(HEX, "")
        ds.dm.message(ds.pool, "create_thin 99")  # behind the store's back
        (stack.root / "devicemapper/metadata" / HEX).unlink()
        ds.devices.pop(HEX)
        ds.add_device("b" * 64, "")
        ds.dm.message(ds.pool, f"delete {ds.devices['b' * 64].device_id}")
        report = ds.reconcile()
        assert report.orphan_ids == sorted([99, 2])
        assert report.dangling == ["b" * 64]
        fixed = ds.reconcile(fix=True)
        assert fixed.fixed
        assert ds.reconcile().clean


def test_min_free_space_refuses_new_devices(stack: Stack) -> None:
    with stack.store("dm.min_free_space=99%") as store, pytest.raises(
        DeviceSetError, match="free data blocks which is less than minimum required"
    ):
        store.devices.add_device(HEX, "")


def test_basesize_grows_the_base_filesystem(stack: Stack) -> None:
    with stack.store():
        pass
    with stack.store("dm.basesize=512M") as store:
        ds = store.devices
        assert ds.devices[""].size == 512 << 20
        ds.add_device(HEX, "")
        rootfs = ds.mount(HEX)
        st = os.statvfs(rootfs)
        assert st.f_blocks * st.f_frsize > 400 << 20
        ds.unmount(HEX)
    with pytest.raises(DeviceSetError, match="cannot be smaller"):
        stack.store("dm.basesize=128M")


def test_per_device_size_grows_its_filesystem(stack: Stack) -> None:
    with stack.store() as store:
        ds = store.devices
        ds.add_device(HEX, "", size=1 << 30)
        st = os.statvfs(ds.mount(HEX))
        assert st.f_blocks * st.f_frsize > 900 << 20
        try:
            ds.grow_device(HEX, 2 << 30)  # online, mounted
        except DeviceSetError as e:
            # some sandboxes refuse online ext4 resizes (no CAP_SYS_RESOURCE): the message says what to do
            assert "unmount it and grow again" in str(e)
            assert ds.devices[HEX].size == 2 << 30
            ds.unmount(HEX)
            ds.grow_device(HEX, 2 << 30)  # offline this time
            ds.mount(HEX)
        st = os.statvfs(ds.mnt / HEX / "rootfs")
        assert st.f_blocks * st.f_frsize > 1800 << 20
        ds.unmount(HEX)
        with pytest.raises(DeviceSetError, match="cannot shrink"):
            ds.grow_device(HEX, 1 << 30)


def test_xfs_base_and_two_snapshots_mounted_at_once(stack: Stack) -> None:
    with stack.store("dm.fs=xfs", "dm.basesize=512M", "dm.xfs_nospace_max_retries=0") as store:
        ds = store.devices
        assert ds.base_fs == "xfs"
        ds.add_device(HEX, "")
        ds.add_device("b" * 64, "")
        one, two = ds.mount(HEX), ds.mount("b" * 64)  # same filesystem UUID: mounted with nouuid
        node = ds.dm.info(ds.name_of(HEX)).node  # type: ignore[union-attr]
        knob = Path("/sys/fs/xfs") / Path(node).name / "error/metadata/ENOSPC/max_retries"  # type: ignore[arg-type]
        assert knob.read_text().strip() == "0"
        (one / "f").write_text("one")
        assert not (two / "f").exists()
        assert ds.exists(HEX) and not ds.exists("c" * 64)
        ds.unmount(HEX)
        ds.unmount("b" * 64)


def test_thinpooldev_adopts_an_empty_pool_and_leaves_it_up(stack: Stack) -> None:
    data, meta = stack.tmp / "pool-data", stack.tmp / "pool-meta"
    for path, size in ((data, 1 << 30), (meta, 16 << 20)):
        with open(path, "wb") as f:
            f.truncate(size)
    dm = stack.dm()
    dm.create("mypool", [(0, (1 << 30) // 512, "thin-pool", f"{meta} {data} 128 32768 1 skip_block_zeroing")])
    dm.message("mypool", "create_thin 5")
    dm.message("mypool", "delete 5")
    dm.message("mypool", "set_transaction_id 0 3")
    with pytest.raises(DeviceSetError, match="non-zero transaction ID"):
        stack.store("dm.thinpooldev=/dev/mapper/mypool")
    dm.message("mypool", "set_transaction_id 3 0")
    with stack.store("dm.thinpooldev=/dev/mapper/mypool") as store:
        ds = store.devices
        assert ds.pool == "mypool"
        assert not ds.options.blkdiscard  # off by default with a pool of one's own
        ds.add_device(HEX, "")
        ds.shutdown()
    assert dm.exists("mypool")  # not ours to remove
    with stack.store("dm.thinpooldev=mypool") as store:
        assert HEX in store.devices.devices
    with pytest.raises(DeviceSetError, match="does not exist"):
        stack.store("dm.thinpooldev=nosuchpool", root=stack.tmp / "other")
