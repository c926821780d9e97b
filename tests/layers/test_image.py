"""Reading image archives: docker save (legacy and Docker 25 OCI-style), OCI layouts (directory and tar),
and the errors malformed, unsupported or hostile archives give; also the fixtures those archives come from."""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import lzma
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmapper.errors import DevmapperError
from devmapper.layers.image import (
    DigestReader,
    ImageFormatError,
    ImageSource,
    InvalidReferenceError,
    chain_id,
    chain_ids,
    config_diff_ids,
    familiar_reference,
    open_image_archive,
)
from helpers import images

HEX_A = "a" * 64
HEX_B = "b" * 64


@pytest.fixture(scope="module")
def tars(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return images.layer_tars(tmp_path_factory.mktemp("layers"))


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _expected_chain_ids(diff_ids: list[str]) -> list[str]:
    out = [diff_ids[0]]
    for d in diff_ids[1:]:
        out.append(_sha256(f"{out[-1]} {d}".encode()))
    return out


def _only_image(path: Path) -> ImageSource:
    with open_image_archive(path) as archive:
        assert len(archive.images) == 1
        return archive.images[0]


def _read_layers(path: Path) -> list[bytes]:
    """Open the archive's one image and return every layer stream, verified."""
    out = []
    with open_image_archive(path) as archive:
        for layer in archive.images[0].layers:
            with layer.open() as reader:
                data = reader.read()
                reader.verify()
                assert reader.bytes_read == len(data)
            out.append(data)
    return out


def _error(path: Path, match: str, *, read_layers: bool = False) -> ImageFormatError:
    with pytest.raises(ImageFormatError, match=match) as info:
        if read_layers:
            _read_layers(path)
        else:
            with open_image_archive(path):
                pass
    return info.value


# -- every archive flavour -----------------------------------------------------------------------

Writer = Callable[[Path, list[Path]], tuple[Path, str, list[str]]]


def _legacy(gz: bool) -> Writer:
    def write(tmp: Path, layers: list[Path]) -> tuple[Path, str, list[str]]:
        path = tmp / "save.tar"
        image_id = images.write_docker_save(path, layers, ["busybox:latest", "example.com/a/b:1"], gzip_layers=gz)
        return path, image_id, ["busybox:latest", "example.com/a/b:1"]

    return write


def _docker25(gz: bool) -> Writer:
    def write(tmp: Path, layers: list[Path]) -> tuple[Path, str, list[str]]:
        path = tmp / "save.tar"
        image_id = images.write_docker_save(path, layers, ["busybox:latest"], gzip_layers=gz, oci_style=True)
        return path, image_id, ["busybox:latest"]

    return write


def _oci_dir(gz: bool, nested: bool = False) -> Writer:
    def write(tmp: Path, layers: list[Path]) -> tuple[Path, str, list[str]]:
        image_id = images.write_oci_layout(tmp / "oci", layers, "busybox:1.36", gzip_layers=gz, nested_index=nested)
        return tmp / "oci", image_id, ["busybox:1.36"]

    return write


def _oci_tar(tmp: Path, layers: list[Path]) -> tuple[Path, str, list[str]]:
    image_id = images.write_oci_layout(
        tmp / "oci", layers, "latest", containerd_name="docker.io/library/busybox:latest", tar_path=tmp / "oci.tar"
    )
    return tmp / "oci.tar", image_id, ["busybox:latest"]


FLAVOURS: dict[str, Writer] = {
    "legacy-plain": _legacy(False),
    "legacy-gzip": _legacy(True),
    "docker25-plain": _docker25(False),
    "docker25-gzip": _docker25(True),
    "oci-dir-gzip": _oci_dir(True),
    "oci-dir-plain": _oci_dir(False),
    "oci-dir-nested-index": _oci_dir(True, nested=True),
    "oci-tar": _oci_tar,
}


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_each_flavour_yields_id_tags_diff_ids_chain_ids_and_verified_layers(
    flavour: str, tars: list[Path], tmp_path: Path
) -> None:
    path, image_id, tags = FLAVOURS[flavour](tmp_path, tars)
    diff_ids = [images.sha256_file(t) for t in tars]
    image = _only_image(path)
    assert image.image_id == image_id == _sha256(image.config)
    assert image.repo_tags == tags
    assert image.diff_ids() == diff_ids
    assert config_diff_ids(image.config) == diff_ids
    assert image.chain_ids() == _expected_chain_ids(diff_ids)
    assert [layer.diff_id for layer in image.layers] == diff_ids
    assert all(layer.size is not None and layer.size > 0 for layer in image.layers)
    assert _read_layers(path) == [t.read_bytes() for t in tars]


def test_oci_layer_sources_carry_declared_media_types_and_blob_digests(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars, "latest", gzip_layers=True)
    image = _only_image(tmp_path / "oci")
    for layer in image.layers:
        assert layer.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert layer.blob_digest is not None and layer.blob_digest != layer.diff_id
        blob = tmp_path / "oci" / "blobs" / "sha256" / layer.blob_digest.removeprefix("sha256:")
        assert layer.size == blob.stat().st_size


def test_legacy_layers_are_declared_as_docker_diff_tars(tars: list[Path], tmp_path: Path) -> None:
    images.write_docker_save(tmp_path / "s.tar", tars, ["busybox:latest"])
    image = _only_image(tmp_path / "s.tar")
    assert {layer.media_type for layer in image.layers} == {"application/vnd.docker.image.rootfs.diff.tar"}
    assert [layer.size for layer in image.layers] == [t.stat().st_size for t in tars]


def test_a_layer_stream_feeds_a_streaming_tar_reader(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars, "latest", gzip_layers=True)
    with open_image_archive(tmp_path / "oci") as archive, archive.images[0].layers[1].open() as reader:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            names = [member.name for member in tar]
        reader.verify()
    assert "etc/opaque-me/.wh..wh..opq" in names


def test_verify_reads_what_the_caller_left_unread(tars: list[Path], tmp_path: Path) -> None:
    images.write_docker_save(tmp_path / "s.tar", tars, [], gzip_layers=True)
    with open_image_archive(tmp_path / "s.tar") as archive, archive.images[0].layers[0].open() as reader:
        assert len(reader.read(512)) == 512
        assert reader.bytes_read == 512
        reader.verify()
        assert reader.bytes_read == tars[0].stat().st_size


def test_untagged_docker_save_and_unannotated_oci_layout_have_no_tags(tars: list[Path], tmp_path: Path) -> None:
    images.write_docker_save(tmp_path / "s.tar", tars[:1], [])
    assert _only_image(tmp_path / "s.tar").repo_tags == []
    images.write_oci_layout(tmp_path / "oci", tars[:1], None)
    assert _only_image(tmp_path / "oci").repo_tags == []


def test_a_bare_oci_ref_name_names_no_repository(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars[:1], "v1.2")
    image = _only_image(tmp_path / "oci")
    assert (image.repo_tags, image.ref_name) == ([], "v1.2")


def test_a_full_oci_ref_name_is_normalised_like_dockers_tags(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars[:1], "docker.io/library/busybox:1.36")
    image = _only_image(tmp_path / "oci")
    assert (image.repo_tags, image.ref_name) == (["busybox:1.36"], "docker.io/library/busybox:1.36")


def test_an_invalid_name_annotation_is_a_format_error(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars[:1], None, containerd_name="../../etc:passwd")
    _error(tmp_path / "oci", "invalid reference")


def test_docker_save_piped_through_gzip_opens(tars: list[Path], tmp_path: Path) -> None:
    plain = tmp_path / "s.tar"
    image_id = images.write_docker_save(plain, tars, ["busybox:latest"])
    packed = tmp_path / "s.tar.gz"
    packed.write_bytes(images._gzip(plain.read_bytes()))
    assert _only_image(packed).image_id == image_id
    assert _read_layers(packed) == [t.read_bytes() for t in tars]


@pytest.mark.parametrize("compress", [bz2.compress, lzma.compress], ids=["bzip2", "xz"])
def test_bzip2_and_xz_layers_are_recognised_by_magic(
    compress: Callable[[bytes], bytes], tars: list[Path], tmp_path: Path
) -> None:
    members, _ = images.docker_save_members(tars[1:2], [])
    layer_name = json.loads(members["manifest.json"])[0]["Layers"][0]
    members[layer_name] = compress(members[layer_name])
    images.write_members_tar(tmp_path / "s.tar", members)
    assert _read_layers(tmp_path / "s.tar") == [tars[1].read_bytes()]


def test_a_repeated_legacy_layer_may_be_a_symlink_to_another_layer_tar(tars: list[Path], tmp_path: Path) -> None:
    # docker save before 25 writes a layer that occurs twice once and links the second layer.tar to it.
    members, _ = images.docker_save_members([tars[1], tars[1]], ["dup:latest"])
    first, second = json.loads(members["manifest.json"])[0]["Layers"]
    del members[second]
    path = images.write_members_tar(tmp_path / "s.tar", members)
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo(second)
        info.type, info.linkname = tarfile.SYMTYPE, "../" + first
        tar.addfile(info)
    assert _read_layers(path) == [tars[1].read_bytes()] * 2


def test_an_archive_with_two_images(tars: list[Path], tmp_path: Path) -> None:
    members, id1 = images.docker_save_members(tars[:1], ["one:latest"])
    more, id2 = images.docker_save_members(tars[:2], ["two:latest"])
    manifest = json.loads(members["manifest.json"]) + json.loads(more["manifest.json"])
    members.update(more)
    members["manifest.json"] = json.dumps(manifest).encode()
    with open_image_archive(images.write_members_tar(tmp_path / "s.tar", members)) as archive:
        assert [(i.image_id, i.repo_tags, len(i.layers)) for i in archive.images] == [
            (id1, ["one:latest"], 1),
            (id2, ["two:latest"], 2),
        ]


def test_layers_cannot_be_opened_after_the_archive_is_closed(tars: list[Path], tmp_path: Path) -> None:
    images.write_docker_save(tmp_path / "s.tar", tars[:1], [])
    with open_image_archive(tmp_path / "s.tar") as archive:
        layer = archive.images[0].layers[0]
    with pytest.raises(ValueError, match="closed"), layer.open():
        pass


def test_image_without_layers(tmp_path: Path) -> None:
    images.write_docker_save(tmp_path / "s.tar", [], ["scratch:latest"])
    image = _only_image(tmp_path / "s.tar")
    assert (image.layers, image.chain_ids()) == ([], [])


# -- corrupted and unsupported inputs ---------------------------------------------------------------


def _legacy_members(tars: list[Path], **kw: Any) -> tuple[dict[str, bytes], list[str]]:
    members, _ = images.docker_save_members(tars, ["busybox:latest"], **kw)
    return members, json.loads(members["manifest.json"])[0]["Layers"]


def _set_manifest_json(members: dict[str, bytes], mutate: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(members["manifest.json"])
    mutate(doc[0])
    members["manifest.json"] = json.dumps(doc).encode()


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def test_wrong_diff_id_in_the_config_fails_verification(tars: list[Path], tmp_path: Path) -> None:
    members, _ = _legacy_members(tars[:2])
    old_name = json.loads(members["manifest.json"])[0]["Config"]
    config = json.loads(members.pop(old_name))
    config["rootfs"]["diff_ids"][1] = "sha256:" + HEX_A
    raw = json.dumps(config).encode()
    new_name = _sha256(raw).removeprefix("sha256:") + ".json"
    members[new_name] = raw
    _set_manifest_json(members, lambda m: m.update(Config=new_name))
    images.write_members_tar(tmp_path / "s.tar", members)
    _error(tmp_path / "s.tar", f"layer sha256:{HEX_A} digest mismatch", read_layers=True)


def test_a_changed_layer_byte_fails_verification(tars: list[Path], tmp_path: Path) -> None:
    members, layers = _legacy_members(tars[:1])
    members[layers[0]] = _flip_last_byte(members[layers[0]])
    images.write_members_tar(tmp_path / "s.tar", members)
    _error(tmp_path / "s.tar", "digest mismatch: its uncompressed content", read_layers=True)


def test_a_damaged_gzip_layer_is_a_format_error(tars: list[Path], tmp_path: Path) -> None:
    members, layers = _legacy_members(tars[:1], gzip_layers=True)
    blob = members[layers[0]]
    members[layers[0]] = blob[: len(blob) // 2]  # truncated stream
    images.write_members_tar(tmp_path / "s.tar", members)
    _error(tmp_path / "s.tar", "cannot read layer stream", read_layers=True)


def test_a_changed_compressed_blob_fails_the_blob_digest(tars: list[Path], tmp_path: Path) -> None:
    # Appending a second, empty gzip member leaves the content (and diff id) alone but not the blob digest.
    images.write_oci_layout(tmp_path / "oci", tars[1:2], "latest", gzip_layers=True)
    digest = _only_image(tmp_path / "oci").layers[0].blob_digest
    assert digest is not None
    blob = tmp_path / "oci/blobs/sha256" / digest.removeprefix("sha256:")
    extra = images._gzip(b"")
    blob.write_bytes(blob.read_bytes() + extra)
    _edit_oci_manifest(tmp_path / "oci", lambda m: m["layers"][0].update(size=m["layers"][0]["size"] + len(extra)))
    _error(tmp_path / "oci", f"layer blob {digest} digest mismatch", read_layers=True)


def _rewrite_blob(layout: Path, old: Path, data: bytes) -> None:
    """Replace a blob and every reference to its digest/size in the layout's JSON files."""
    old_digest, new_digest = "sha256:" + old.name, _sha256(data)
    old.unlink()
    (old.parent / new_digest.removeprefix("sha256:")).write_bytes(data)
    for path in [layout / "index.json", *sorted(old.parent.iterdir())]:
        text = path.read_bytes()
        if old_digest.encode() in text:
            doc = json.loads(text)
            for desc in doc.get("manifests", []):
                if desc["digest"] == old_digest:
                    desc["digest"], desc["size"] = new_digest, len(data)
            if path.name == "index.json":
                path.write_bytes(json.dumps(doc).encode())
            else:
                _rewrite_blob(layout, path, json.dumps(doc).encode())


def _edit_oci_manifest(layout: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    digest = json.loads((layout / "index.json").read_bytes())["manifests"][0]["digest"]
    manifest_path = layout / "blobs/sha256" / digest.removeprefix("sha256:")
    manifest = json.loads(manifest_path.read_bytes())
    mutate(manifest)
    _rewrite_blob(layout, manifest_path, json.dumps(manifest).encode())


def test_missing_oci_layer_blob(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars, "latest")
    digest = _only_image(tmp_path / "oci").layers[2].blob_digest
    assert digest is not None
    (tmp_path / "oci/blobs/sha256" / digest.removeprefix("sha256:")).unlink()
    _error(tmp_path / "oci", f"layer blob {digest} is missing")


def test_missing_oci_config_blob(tars: list[Path], tmp_path: Path) -> None:
    image_id = images.write_oci_layout(tmp_path / "oci", tars, "latest")
    (tmp_path / "oci/blobs/sha256" / image_id.removeprefix("sha256:")).unlink()
    _error(tmp_path / "oci", f"config blob {image_id} is missing")


def test_missing_legacy_layer_member(tars: list[Path], tmp_path: Path) -> None:
    members, layers = _legacy_members(tars)
    del members[layers[1]]
    images.write_members_tar(tmp_path / "s.tar", members)
    _error(tmp_path / "s.tar", f"layer '{layers[1]}' .* is missing from the archive")


def test_a_changed_manifest_blob_fails_its_digest(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars[:1], "latest")
    index = json.loads((tmp_path / "oci/index.json").read_bytes())
    digest = index["manifests"][0]["digest"]
    blob = tmp_path / "oci/blobs/sha256" / digest.removeprefix("sha256:")
    blob.write_bytes(blob.read_bytes().replace(b"schemaVersion", b"schemaVersioN"))
    _error(tmp_path / "oci", f"manifest {digest} digest mismatch")


def test_descriptor_size_mismatch(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars[:1], "latest")
    _edit_oci_manifest(tmp_path / "oci", lambda m: m["layers"][0].update(size=m["layers"][0]["size"] + 1))
    _error(tmp_path / "oci", "size mismatch")


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("manifest.json", b"[{not json", "manifest.json: invalid JSON"),
        ("manifest.json", b'{"Config": "x"}', "manifest.json: expected a list of images"),
        ("manifest.json", b'[{"Config": "c.json", "RepoTags": []}]', "manifest.json: missing 'Layers'"),
        ("manifest.json", b'[{"Layers": []}]', "manifest.json: missing 'Config'"),
    ],
)
def test_bad_manifest_json(name: str, text: bytes, match: str, tars: list[Path], tmp_path: Path) -> None:
    members, _ = _legacy_members(tars[:1])
    members[name] = text
    images.write_members_tar(tmp_path / "s.tar", members)
    _error(tmp_path / "s.tar", match)


def test_bad_config_json(tars: list[Path], tmp_path: Path) -> None:
    members, _ = _legacy_members(tars[:1])
    members["config.json"] = b"{broken"
    _set_manifest_json(members, lambda m: m.update(Config="config.json"))
    images.write_members_tar(tmp_path / "s.tar", members)
    _error(tmp_path / "s.tar", "config.json: invalid JSON")


def test_config_without_layered_rootfs(tars: list[Path], tmp_path: Path) -> None:
    members, _ = _legacy_members(tars[:1])
    members["config.json"] = b'{"rootfs": {"type": "zfs", "diff_ids": []}}'
    _set_manifest_json(members, lambda m: m.update(Config="config.json"))
    images.write_members_tar(tmp_path / "s.tar", members)
    _error(tmp_path / "s.tar", "rootfs.type is 'zfs', expected 'layers'")


def test_bad_index_json(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars[:1], "latest")
    (tmp_path / "oci/index.json").write_bytes(b"\xff\xfe")
    _error(tmp_path / "oci", "index.json: invalid JSON")
    (tmp_path / "oci/index.json").write_bytes(b"{}")
    _error(tmp_path / "oci", "index.json: missing 'manifests'")


def test_unsupported_oci_layout_version(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars[:1], "latest")
    (tmp_path / "oci/oci-layout").write_bytes(b'{"imageLayoutVersion": "2.0.0"}')
    _error(tmp_path / "oci", "unsupported imageLayoutVersion '2.0.0'")


def test_layer_count_mismatch_in_docker_save(tars: list[Path], tmp_path: Path) -> None:
    members, _ = _legacy_members(tars)
    _set_manifest_json(members, lambda m: m.update(Layers=m["Layers"][:2]))
    images.write_members_tar(tmp_path / "s.tar", members)
    _error(tmp_path / "s.tar", "rootfs.diff_ids has 3 entries but manifest.json lists 2 layers")


def test_layer_count_mismatch_in_oci_manifest(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars, "latest")
    _edit_oci_manifest(tmp_path / "oci", lambda m: m.update(layers=m["layers"][1:]))
    _error(tmp_path / "oci", "rootfs.diff_ids has 3 entries but .* lists 2 layers")


def test_zstd_media_type_is_refused(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars[:1], "latest")
    _edit_oci_manifest(
        tmp_path / "oci", lambda m: m["layers"][0].update(mediaType="application/vnd.oci.image.layer.v1.tar+zstd")
    )
    _error(tmp_path / "oci", "zstd layers are not supported")


def test_zstd_content_is_refused_by_magic(tars: list[Path], tmp_path: Path) -> None:
    members, layers = _legacy_members(tars[:1])
    members[layers[0]] = b"\x28\xb5\x2f\xfd" + bytes(100)
    images.write_members_tar(tmp_path / "s.tar", members)
    _error(tmp_path / "s.tar", "zstd layers are not supported", read_layers=True)


def test_unknown_layer_media_type_is_refused(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars[:1], "latest")
    _edit_oci_manifest(tmp_path / "oci", lambda m: m["layers"][0].update(mediaType="application/x-squashfs"))
    _error(tmp_path / "oci", "unsupported layer media type 'application/x-squashfs'")


def test_missing_foreign_layer_is_refused(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars[:1], "latest")
    digest = _only_image(tmp_path / "oci").layers[0].blob_digest
    assert digest is not None
    (tmp_path / "oci/blobs/sha256" / digest.removeprefix("sha256:")).unlink()
    foreign = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    _edit_oci_manifest(tmp_path / "oci", lambda m: m["layers"][0].update(mediaType=foreign))
    _error(tmp_path / "oci", "foreign layers are not supported")


def test_other_digest_algorithms_are_refused(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars[:1], "latest")
    _edit_oci_manifest(tmp_path / "oci", lambda m: m["layers"][0].update(digest="sha512:" + "0" * 128))
    _error(tmp_path / "oci", "unsupported digest algorithm")


@pytest.mark.parametrize("bad", ["../../../etc/passwd", "/etc/passwd", "a/../../b", "x\\..\\y"])
def test_path_traversal_in_docker_save_member_names(bad: str, tars: list[Path], tmp_path: Path) -> None:
    members, _ = _legacy_members(tars[:1])
    _set_manifest_json(members, lambda m: m.update(Layers=[bad]))
    images.write_members_tar(tmp_path / "s.tar", members)
    _error(tmp_path / "s.tar", "unsafe member name")
    members, _ = _legacy_members(tars[:1])
    _set_manifest_json(members, lambda m: m.update(Config=bad))
    images.write_members_tar(tmp_path / "s.tar", members)
    _error(tmp_path / "s.tar", "unsafe member name")


def test_path_traversal_in_an_oci_digest(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars[:1], "latest")
    _edit_oci_manifest(tmp_path / "oci", lambda m: m["layers"][0].update(digest="sha256:../../../etc/passwd"))
    _error(tmp_path / "oci", "invalid digest")


def test_a_symlink_member_may_not_leave_the_archive(tars: list[Path], tmp_path: Path) -> None:
    members, layers = _legacy_members(tars[:1])
    del members[layers[0]]
    path = images.write_members_tar(tmp_path / "s.tar", members)
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo(layers[0])
        info.type, info.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
        tar.addfile(info)
    _error(path, "unsafe member name")


def test_a_symlinked_blob_may_not_leave_the_layout_directory(tars: list[Path], tmp_path: Path) -> None:
    images.write_oci_layout(tmp_path / "oci", tars[:1], "latest", gzip_layers=False)
    digest = _only_image(tmp_path / "oci").layers[0].blob_digest
    assert digest is not None
    blob = tmp_path / "oci/blobs/sha256" / digest.removeprefix("sha256:")
    outside = tmp_path / "outside.tar"
    blob.rename(outside)
    blob.symlink_to(outside)
    _error(tmp_path / "oci", "leads outside the layout directory")


def test_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"this is not a tar archive" * 100)
    _error(tmp_path / "junk", "not a tar archive")
    (tmp_path / "empty").mkdir()
    _error(tmp_path / "empty", r"neither manifest\.json \(docker save\) nor index\.json")
    _error(tmp_path / "absent", "no such file or directory")


def test_format_errors_are_devmapper_errors() -> None:
    assert issubclass(ImageFormatError, DevmapperError)
    assert issubclass(InvalidReferenceError, DevmapperError)


def test_digest_reader_hashes_what_it_hands_out() -> None:
    data = os.urandom(5000)
    reader = DigestReader(io.BytesIO(data), diff_id=_sha256(data))
    assert reader.read(10) + reader.read() == data
    reader.verify()
    assert reader.bytes_read == len(data)
    wrong = DigestReader(io.BytesIO(data), diff_id="sha256:" + HEX_A)
    with pytest.raises(ImageFormatError, match=f"layer sha256:{HEX_A} digest mismatch"):
        wrong.verify()


# -- chain ids and references -------------------------------------------------------------------------

digests = st.binary(max_size=16).map(_sha256)


@given(st.lists(digests, min_size=1, max_size=6))
def test_chain_ids_follow_the_oci_rule(diff_ids: list[str]) -> None:
    assert chain_ids(diff_ids) == _expected_chain_ids(diff_ids)
    assert chain_id(None, diff_ids[0]) == diff_ids[0]


def test_chain_id_refuses_malformed_digests() -> None:
    with pytest.raises(ImageFormatError, match="invalid digest"):
        chain_id(None, "sha256:xyz")
    with pytest.raises(ImageFormatError, match="invalid digest"):
        chain_id("nope", "sha256:" + HEX_A)


def test_chain_id_of_a_known_pair() -> None:
    parent, diff = "sha256:" + HEX_A, "sha256:" + HEX_B
    assert chain_id(parent, diff) == _sha256(f"sha256:{HEX_A} sha256:{HEX_B}".encode())


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("busybox", ("busybox", "busybox:latest")),
        ("busybox:latest", ("busybox", "busybox:latest")),
        ("docker.io/library/busybox:1.36", ("busybox", "busybox:1.36")),
        ("index.docker.io/library/busybox", ("busybox", "busybox:latest")),
        ("library/busybox:musl", ("busybox", "busybox:musl")),
        ("docker.io/foo/bar:1", ("foo/bar", "foo/bar:1")),
        ("foo/bar/baz", ("foo/bar/baz", "foo/bar/baz:latest")),
        ("localhost/img:v2", ("localhost/img", "localhost/img:v2")),
        ("localhost:5000/a/b:t", ("localhost:5000/a/b", "localhost:5000/a/b:t")),
        ("quay.io/org/x_y.z-w:1.0_rc", ("quay.io/org/x_y.z-w", "quay.io/org/x_y.z-w:1.0_rc")),
        (f"busybox@sha256:{HEX_A}", ("busybox", f"busybox@sha256:{HEX_A}")),
        (f"busybox:1@sha256:{HEX_A}", ("busybox", f"busybox@sha256:{HEX_A}")),
    ],
)
def test_familiar_reference_matches_dockers_repositories_json_keys(ref: str, expected: tuple[str, str]) -> None:
    assert familiar_reference(ref) == expected


@pytest.mark.parametrize(
    "ref",
    ["", "Busybox", "../busybox", "/busybox", "busybox/", "a//b", "a\\b", "busybox:bad/tag", "busybox:", "sha256",
     "busybox@sha256:xyz", "a/../b", "./a", "busybox:-x", "x" * 300],
)  # fmt: skip
def test_invalid_references_are_refused(ref: str) -> None:
    with pytest.raises(InvalidReferenceError, match="invalid reference"):
        familiar_reference(ref)


components = st.from_regex(r"[a-z0-9]{1,6}(?:[._-][a-z0-9]{1,4})?", fullmatch=True)
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", fullmatch=True)
domains = st.sampled_from(["", "docker.io/", "index.docker.io/", "quay.io/", "localhost:5000/", "localhost/"])


@given(domains, st.lists(components, min_size=1, max_size=3), st.none() | tags)
def test_familiar_reference_is_idempotent(domain: str, path: list[str], tag: str | None) -> None:
    ref = domain + "/".join(path) + ("" if tag is None else f":{tag}")
    repository, key = familiar_reference(ref)
    assert familiar_reference(key) == (repository, key)
    assert key.startswith(repository + ":")
    assert key.endswith(f":{tag or 'latest'}")


# -- the fixtures themselves ---------------------------------------------------------------------------


def test_layer_tars_are_pax_with_numeric_owners_xattrs_and_whiteouts(tars: list[Path]) -> None:
    with tarfile.open(tars[0]) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["etc/xattr-file"].pax_headers["SCHILY.xattr.user.test"] == "hello xattr"
    assert (members["home/user/notes.txt"].uid, members["home/user/notes.txt"].uname) == (1000, "")
    assert members["etc/hl-b"].islnk() and members["etc/hl-b"].linkname == "etc/hl-a"
    assert members["var/fifo"].isfifo()
    assert members["bin/suid-helper"].mode == 0o4755
    assert members["tmp"].mode == 0o1777
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
    with tarfile.open(tars[1]) as tar:
        names = tar.getnames()
    assert {"etc/.wh.delete-me", "var/.wh.tree-gone", "etc/opaque-me/.wh..wh..opq"} <= set(names)


def test_layer_tars_are_reproducible(tars: list[Path], tmp_path: Path) -> None:
    again = images.layer_tars(tmp_path)
    assert [images.sha256_file(p) for p in again] == [images.sha256_file(p) for p in tars]


def test_reference_tree_of_three_layers_holds_the_expected_paths(tars: list[Path], tmp_path: Path) -> None:
    merged = images.tree_manifest(images.reference_tree(tars, tmp_path / "merged"))
    assert [p for p in images.MERGED_PRESENT if p not in merged] == []
    assert [p for p in images.MERGED_ABSENT if p in merged] == []
    assert [p for p in merged if "/.wh." in "/" + p] == []
    assert sorted(p for p in merged if p.startswith("etc/opaque-me/")) == ["etc/opaque-me/new-file"]
    assert merged["etc/becomes-dir"].type == "dir"
    assert merged["srv"].type == "file"
    assert merged["opt/app/run.sh"].mode == 0o700
    assert merged["var/log"].mode == 0o750
    assert merged["usr/bin/l2tool-link"].link_group == merged["usr/bin/l2tool"].link_group == "usr/bin/l2tool"
    assert merged["etc/hl-b"].link_group == "etc/hl-a"
    assert merged["etc/xattr-file"].xattrs == (("user.test", b"hello xattr"),)
    assert (merged["home/user/notes.txt"].uid, merged["home/user/notes.txt"].gid) == (1000, 1000)
    assert merged["bin/suid-helper"].mode == 0o4755
    assert merged["usr/bin/abs-sh"] == merged["usr/bin/abs-sh"]._replace(type="symlink", content="/bin/busybox")
    assert merged["etc/hostname"].content == hashlib.sha256(b"layer2\n").hexdigest()


def test_busybox_rootfs_equals_the_reference_tree_of_layer_one(tars: list[Path], tmp_path: Path) -> None:
    images.require_root("the rootfs carries files owned by 1000:1000")
    rootfs = images.tree_manifest(images.busybox_rootfs(tmp_path / "rootfs"))
    layer1 = images.tree_manifest(images.reference_tree(tars[:1], tmp_path / "ref"))
    assert images.manifest_diff(rootfs, layer1) == []
    assert rootfs["var/fifo"].type == "fifo"
    assert rootfs["mnt"].type == "dir" and not any(p.startswith("mnt/") for p in rootfs)
    assert rootfs["root"].mode == 0o700


def test_tree_manifest_notices_each_kind_of_difference(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    (root / "f").chmod(0o644)
    base = images.tree_manifest(root)
    (root / "f").chmod(0o600)
    assert images.manifest_diff(base, images.tree_manifest(root)) == ["differs f: mode: 420 != 384"]
    (root / "f").write_bytes(b"y")
    assert images.tree_manifest(root)["f"].content != base["f"].content
    os.link(root / "f", root / "g")
    assert images.tree_manifest(root)["g"].link_group == "f"
    os.setxattr(root / "f", "user.k", b"v")
    assert images.tree_manifest(root)["f"].xattrs == (("user.k", b"v"),)
    os.utime(root / "f", (1, 1))
    assert images.tree_manifest(root)["f"].mtime == 1
    assert images.tree_manifest(root, mtimes=False)["f"].mtime is None
