"""The layer store end to end on a live daemon: import, containers, diff/commit/export, sharing, safety, rescue."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from devmapper.errors import DevmapperError
from devmapper.layers.info import info_rows, render
from devmapper.layers.store import INIT_DIRS, INIT_FILES, LayerStore, LayerStoreError
from helpers.images import layer_tars, reference_tree, tree_manifest, write_docker_save, write_oci_layout
from helpers.stack import Stack

INIT_PATHS = {*INIT_DIRS, *INIT_FILES, "etc/mtab"}


def _image(tmp: Path, bulk: int = 0, **kw: object) -> tuple[Path, list[Path]]:
    layers = layer_tars(tmp / "layers")
    if bulk:  # a fourth layer with one incompressible file of ``bulk`` bytes
        data = os.urandom(bulk)
        info = tarfile.TarInfo("bulk.bin")
        info.size, info.mode = len(data), 0o644
        with tarfile.open(tmp / "layers" / "bulk.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(info, io.BytesIO(data))
        layers.append(tmp / "layers" / "bulk.tar")
    path = tmp / "image.tar"
    write_docker_save(path, layers, ["busybox:test"], **kw)  # type: ignore[arg-type]
    return path, layers


def _without_init(manifest: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in manifest.items() if k not in INIT_PATHS}


def _files_digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_container_shows_exactly_the_merged_tree(stack: Stack, tmp_path: Path) -> None:
    archive, layers = _image(tmp_path)
    expected = tree_manifest(reference_tree(layers, tmp_path / "reference"))
    with stack.store() as store:
        [image_id] = store.import_archive(archive)
        assert store.image(image_id).tags == ["busybox:test"]
        assert len(store.image(image_id).layers) == 3
        cid = store.create_container("busybox:test")
        rootfs = store.mount_container(cid)
        actual = tree_manifest(rootfs)
        assert _without_init(actual) == _without_init(expected)
        assert set(actual) >= INIT_PATHS
        assert (rootfs / "etc/hostname").read_text() == cid[:12] + "\n"
        assert os.readlink(rootfs / "etc/mtab") == "/proc/mounts"
        store.unmount_container(cid)
        # the image's own top layer has no init files at all
        top = store.image(image_id).top_cache_id
        assert top is not None
        with store._mounted(top) as layer_root:
            assert tree_manifest(layer_root) == expected
        assert store.reconcile().clean


def test_oci_layout_shares_layers_with_the_same_image(stack: Stack, tmp_path: Path) -> None:
    archive, layers = _image(tmp_path, oci_style=True, gzip_layers=True)
    oci = tmp_path / "oci"
    write_oci_layout(oci, layers, "busybox:oci")
    with stack.store() as store:
        [first] = store.import_archive(archive)
        devices = set(store.devices.devices)
        [second] = store.import_archive(oci)
        assert second == first  # same config, same image id
        assert set(store.devices.devices) == devices  # no layer imported twice
        assert sorted(store.image(first).tags) == ["busybox:oci", "busybox:test"]


def test_two_containers_share_their_image_blocks(stack: Stack, tmp_path: Path) -> None:
    archive, _layers = _image(tmp_path, bulk=8 << 20)
    with stack.store() as store:
        before = store.devices.pool_usage().used_data
        store.import_archive(archive)
        after_import = store.devices.pool_usage().used_data
        image_blocks = after_import - before
        assert image_blocks >= 128 + 16  # the 8 MiB layer plus busybox
        for name in ("c1", "c2"):
            cid = store.create_container("busybox:test", container_id=name * 32)
            rootfs = store.mount_container(cid)
            (rootfs / "delta").write_bytes(os.urandom(1 << 20))
            store.unmount_container(cid)
        grown = store.devices.pool_usage().used_data - after_import
        # each container costs its 1 MiB delta (16 blocks) plus a few blocks of filesystem metadata
        assert grown <= 2 * (16 + 40), (image_blocks, grown)
        assert grown < image_blocks
        usage = store.devices.usage()
        c1 = store.devices.devices[store.container("c1" * 32).mount_id].device_id
        assert usage[c1].shared_blocks >= image_blocks - 8


def test_diff_commit_export_and_remove(stack: Stack, tmp_path: Path) -> None:
    archive, _layers = _image(tmp_path)
    with stack.store() as store:
        store.import_archive(archive)
        cid = store.create_container("busybox:test")
        rootfs = store.mount_container(cid)
        (rootfs / "added.txt").write_text("new\n")
        (rootfs / "etc/passwd").unlink()
        os.chmod(rootfs / "bin", 0o700)
        diff = io.BytesIO()
        store.diff_container(cid, diff)
        diff.seek(0)
        with tarfile.open(fileobj=diff) as tar:
            names = tar.getnames()
        assert "added.txt" in names and "etc/.wh.passwd" in names and "bin" in names
        assert not (INIT_PATHS - {"etc"}) & set(names)  # init files are not the container's changes
        exported = io.BytesIO()
        store.export_container(cid, exported)
        exported.seek(0)
        with tarfile.open(fileobj=exported) as tar:
            export_names = set(tar.getnames())
        assert "added.txt" in export_names and "etc/passwd" not in export_names
        store.unmount_container(cid)
        new_image = store.commit_container(cid, "busybox:committed")
        assert len(store.image(new_image).layers) == 4
        c2 = store.create_container("busybox:committed")
        root2 = store.mount_container(c2)
        assert (root2 / "added.txt").read_text() == "new\n"
        assert not (root2 / "etc/passwd").exists()
        assert (root2 / "bin").stat().st_mode & 0o777 == 0o700
        store.unmount_container(c2)
        with pytest.raises(LayerStoreError, match="being used by container"):
            store.remove_image("busybox:committed")
        store.remove_container(c2)
        removed = store.remove_image("busybox:committed")
        assert len(removed) == 1  # only the committed layer; the other three belong to busybox:test too
        store.remove_container(cid)
        assert store.containers() == []
        assert store.reconcile().clean


@pytest.mark.parametrize("kind", ["dotdot", "symlink-escape", "hardlink-escape", "device"])
def test_malicious_layers_are_refused_and_leave_nothing(stack: Stack, tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep\n")
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w", format=tarfile.PAX_FORMAT) as tar:
        if kind == "dotdot":
            data = b"pwned\n"
            info = tarfile.TarInfo("../../../../../../../../" + str(outside / "secret").lstrip("/"))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        elif kind == "symlink-escape":
            link = tarfile.TarInfo("escape")
            link.type, link.linkname = tarfile.SYMTYPE, str(outside)
            tar.addfile(link)
            data = b"pwned\n"
            info = tarfile.TarInfo("escape/secret")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        elif kind == "hardlink-escape":
            link = tarfile.TarInfo("stolen")
            link.type, link.linkname = tarfile.LNKTYPE, str(outside / "secret")
            tar.addfile(link)
        else:
            dev = tarfile.TarInfo("dev/evil")
            dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(dev)
    archive = tmp_path / "image.tar"
    write_docker_save(archive, [evil], ["evil:latest"])
    snapshot = {p: (p.stat().st_mode, p.read_bytes()) for p in outside.iterdir()}
    with stack.store() as store:
        devices = set(store.devices.devices)
        with pytest.raises(DevmapperError) as err:
            store.import_archive(archive)
        assert "evil" in str(err.value) or "stolen" in str(err.value) or "secret" in str(err.value)
        assert {p: (p.stat().st_mode, p.read_bytes()) for p in outside.iterdir()} == snapshot
        assert set(store.devices.devices) == devices  # the half-made layer device is gone
        assert store.images() == []
        assert store.reconcile().clean


def test_info_prints_every_docker_label(stack: Stack, tmp_path: Path) -> None:
    with stack.store() as store:
        rows = dict(info_rows(store.devices))
        text = render(store.devices)
    docker_labels = ["Pool Name", "Pool Blocksize", "Base Device Size", "Backing Filesystem", "Udev Sync Supported",
                     "Data file", "Metadata file", "Data loop file", "Metadata loop file", "Data Space Used",
                     "Data Space Total", "Data Space Available", "Metadata Space Used", "Metadata Space Total",
                     "Metadata Space Available", "Thin Pool Minimum Free Space", "Deferred Removal Enabled",
                     "Deferred Deletion Enabled", "Deferred Deleted Device Count", "Library Version"]
    labels = [line.split(":", 1)[0].strip() for line in text.splitlines()[1:] if line.startswith(" ")]
    assert labels[: len(docker_labels)] == docker_labels
    assert text.startswith("Storage Driver: devicemapper\n")
    assert rows["Pool Blocksize"] == "65.54kB"
    assert rows["Base Device Size"] == "268.4MB"
    assert rows["Data Space Total"] == "2.147GB"
    assert rows["Metadata Space Total"] == "67.11MB"
    assert rows["Backing Filesystem"] == "ext4"
    assert rows["Pool Mode"] == "rw" and rows["Pool Needs Check"] == "false"
    assert rows["Thin Pool Minimum Free Space"] == "0B"
    assert rows["Data loop file"].endswith("devicemapper/devicemapper/data")
    assert "WARNING: devicemapper: usage of loopback devices" in text


def test_rescue_opens_an_old_directory_read_only(stack: Stack, tmp_path: Path) -> None:
    archive, layers = _image(tmp_path)
    expected = tree_manifest(reference_tree(layers, tmp_path / "reference"))
    with stack.store() as store:
        store.import_archive(archive)
        top = store.image(store.resolve_image("busybox:test")).top_cache_id
        assert top is not None
        store.devices.shutdown()  # as dockerd's exit: everything unmounted, the pool removed
    home = stack.root / "devicemapper"
    before = _files_digest(home)
    rescue = LayerStore(stack.root, stack.dm(), read_only=True).open()
    assert top in rescue.devices.devices
    out = tmp_path / "rootfs.tar"
    with open(out, "wb") as f:
        rescue.export_device(top, f)
    rescue.devices.shutdown()
    rescue.close()
    assert _files_digest(home) == before  # nothing written
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    with tarfile.open(out) as tar:
        tar.extractall(extracted)
    assert set(tree_manifest(extracted)) == set(expected)
