"""Docker's image/layer database layout: records round-trip, file names and contents match what Docker writes,
writes are atomic and crash leftovers are found, ids are validated, and read-only mode refuses writes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmapper.errors import ReadOnlyError
from devmapper.layers.image import ImageFormatError, InvalidReferenceError, chain_ids
from devmapper.layers.imagedb import ImageDb, ImageDbError, InvalidIdError, LayerRecord, MountRecord
from helpers import images


def _hex(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def _digest(seed: str) -> str:
    return "sha256:" + _hex(seed)


DIFFS = [_digest("diff-1"), _digest("diff-2"), _digest("diff-3")]
CHAINS = chain_ids(DIFFS)
CACHES = [_hex("cache-1"), _hex("cache-2"), _hex("cache-3")]
CONTAINER = _hex("container")
MOUNT_ID = _hex("mount")


def _records() -> list[LayerRecord]:
    parents = [None, *CHAINS[:-1]]
    return [
        LayerRecord(chain, diff, parent, cache, size=1000 * (i + 1))
        for i, (chain, diff, parent, cache) in enumerate(zip(CHAINS, DIFFS, parents, CACHES, strict=True))
    ]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "docker" / "image" / "devicemapper"


@pytest.fixture
def db(root: Path) -> ImageDb:
    return ImageDb(root)


def _with_layers(db: ImageDb) -> list[LayerRecord]:
    records = _records()
    for rec in records:
        db.begin_layer(rec.cache_id)
        db.commit_layer(rec)
    return records


def _files(root: Path) -> dict[str, bytes | None]:
    """Every path under root -> file bytes (None for directories)."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return out


# -- layout ------------------------------------------------------------------------------------------


def test_opening_writable_creates_dockers_directories(root: Path) -> None:
    ImageDb(root)
    assert set(_files(root)) == {
        "imagedb",
        "imagedb/content",
        "imagedb/content/sha256",
        "imagedb/metadata",
        "imagedb/metadata/sha256",
        "layerdb",
        "layerdb/mounts",
        "layerdb/sha256",
        "layerdb/tmp",
        "repositories.json",
    }
    assert json.loads((root / "repositories.json").read_bytes()) == {"Repositories": {}}


def test_layout_matches_dockers_file_names_and_contents(db: ImageDb, root: Path) -> None:
    records = _with_layers(db)
    config = images.image_config(DIFFS)
    image_id = db.put_image(config)
    db.tag("busybox:latest", image_id)
    db.put_mount(MountRecord(CONTAINER, MOUNT_ID, MOUNT_ID + "-init", CHAINS[-1]))
    files = _files(root)
    base, second = (f"layerdb/sha256/{rec.chain_id.removeprefix('sha256:')}" for rec in records[:2])
    # Bare values without newlines, as Docker writes them.
    assert {k: v for k, v in files.items() if k.startswith(base + "/")} == {
        f"{base}/diff": DIFFS[0].encode(),
        f"{base}/size": b"1000",
        f"{base}/cache-id": CACHES[0].encode(),
    }
    assert {k: v for k, v in files.items() if k.startswith(second + "/")} == {
        f"{second}/diff": DIFFS[1].encode(),
        f"{second}/size": b"2000",
        f"{second}/cache-id": CACHES[1].encode(),
        f"{second}/parent": CHAINS[0].encode(),
    }
    mount = f"layerdb/mounts/{CONTAINER}"
    assert {k: v for k, v in files.items() if k.startswith(mount + "/")} == {
        f"{mount}/mount-id": MOUNT_ID.encode(),
        f"{mount}/init-id": (MOUNT_ID + "-init").encode(),
        f"{mount}/parent": CHAINS[-1].encode(),
    }
    image_hex = image_id.removeprefix("sha256:")
    assert files[f"imagedb/content/sha256/{image_hex}"] == config
    assert set(k for k in files if k.startswith(f"imagedb/metadata/sha256/{image_hex}/")) == {
        f"imagedb/metadata/sha256/{image_hex}/lastUpdated"
    }
    assert json.loads(files["repositories.json"] or b"") == {"Repositories": {"busybox": {"busybox:latest": image_id}}}
    assert [k for k in files if k.startswith("layerdb/tmp/")] == []


def test_a_docker_written_database_opens(root: Path) -> None:
    # What Docker leaves behind: bare values, a tar-split file, its own write-set names, metadata.
    layer = root / "layerdb/sha256" / CHAINS[0].removeprefix("sha256:")
    layer.mkdir(parents=True)
    (layer / "diff").write_text(DIFFS[0])
    (layer / "size").write_text("4096")
    (layer / "cache-id").write_text(CACHES[0])
    (layer / "tar-split.json.gz").write_bytes(b"\x1f\x8b")
    mount = root / "layerdb/mounts" / CONTAINER
    mount.mkdir(parents=True)
    (mount / "mount-id").write_text(MOUNT_ID)
    (mount / "init-id").write_text(MOUNT_ID + "-init")
    (mount / "parent").write_text(CHAINS[0])
    crashed = root / "layerdb/tmp/write-set-123456789"
    crashed.mkdir(parents=True)
    (crashed / "cache-id").write_text(CACHES[1])
    config = images.image_config(DIFFS[:1])
    image_hex = hashlib.sha256(config).hexdigest()
    (root / "imagedb/content/sha256").mkdir(parents=True)
    (root / "imagedb/content/sha256" / image_hex).write_bytes(config)
    (root / "imagedb/metadata/sha256" / image_hex).mkdir(parents=True)
    (root / "imagedb/metadata/sha256" / image_hex / "lastUpdated").write_text("2024-01-02T03:04:05.123456789Z")
    (root / "repositories.json").write_text(
        f'{{"Repositories":{{"busybox":{{"busybox:latest":"sha256:{image_hex}",'
        f'"busybox@sha256:{"e" * 64}":"sha256:{image_hex}"}}}}}}'
    )
    db = ImageDb(root, read_only=True)
    assert db.layers() == [LayerRecord(CHAINS[0], DIFFS[0], None, CACHES[0], 4096)]
    assert db.mounts() == [MountRecord(CONTAINER, MOUNT_ID, MOUNT_ID + "-init", CHAINS[0])]
    assert db.incomplete() == [CACHES[1]]
    assert db.images() == ["sha256:" + image_hex]
    assert db.image_top_layer("sha256:" + image_hex) == CHAINS[0]
    assert db.tags() == {"busybox:latest": "sha256:" + image_hex, f"busybox@sha256:{'e' * 64}": "sha256:" + image_hex}


def test_values_with_trailing_newlines_are_accepted(db: ImageDb, root: Path) -> None:
    rec = _with_layers(db)[0]
    layer = root / "layerdb/sha256" / rec.chain_id.removeprefix("sha256:")
    for name in ("diff", "size", "cache-id"):
        (layer / name).write_bytes((layer / name).read_bytes() + b"\n")
    assert db.layer(rec.chain_id) == rec


# -- layers ------------------------------------------------------------------------------------------


def test_layer_records_round_trip(db: ImageDb, root: Path) -> None:
    records = _with_layers(db)
    assert [db.layer(rec.chain_id) for rec in records] == records
    assert db.layers() == sorted(records, key=lambda r: r.chain_id)
    assert ImageDb(root, read_only=True).layers() == db.layers()
    assert db.children(CHAINS[0]) == [CHAINS[1]]
    assert db.children(CHAINS[2]) == []
    assert db.layer(_digest("absent")) is None
    assert db.incomplete() == []


def test_begin_layer_records_the_cache_id_before_commit(db: ImageDb, root: Path) -> None:
    write_set = db.begin_layer(CACHES[0])
    assert write_set == root / "layerdb/tmp" / f"write-set-{CACHES[0]}"
    assert _files(write_set) == {"cache-id": CACHES[0].encode()}
    with pytest.raises(ImageDbError, match="already has a registration in progress"):
        db.begin_layer(CACHES[0])


def test_commit_without_begin_works(db: ImageDb) -> None:
    rec = _records()[0]
    db.commit_layer(rec)
    assert db.layer(rec.chain_id) == rec
    assert db.incomplete() == []


def test_crash_before_commit_leaves_an_incomplete_write_set(root: Path) -> None:
    ImageDb(root).begin_layer(CACHES[1])  # the process dies here, before the device exists or commit
    reopened = ImageDb(root)
    assert reopened.incomplete() == [CACHES[1]]
    assert reopened.layers() == []
    reopened.abandon(CACHES[1])
    assert reopened.incomplete() == []
    assert list((root / "layerdb/tmp").iterdir()) == []
    reopened.abandon(CACHES[1])  # idempotent


def test_an_interrupted_commit_can_be_finished_after_restart(root: Path) -> None:
    rec = _records()[0]
    db = ImageDb(root)
    write_set = db.begin_layer(rec.cache_id)
    (write_set / "diff").write_text("partial")  # died while filling the write-set
    ImageDb(root).commit_layer(rec)
    assert ImageDb(root).layer(rec.chain_id) == rec


def test_commit_refuses_inconsistent_records(db: ImageDb) -> None:
    first, second, _ = _records()
    with pytest.raises(ImageDbError, match=r"parent layer .* is not registered"):
        db.commit_layer(second)
    with pytest.raises(ImageDbError, match="chain id does not follow"):
        db.commit_layer(LayerRecord(CHAINS[1], DIFFS[0], None, CACHES[0], 1))
    with pytest.raises(ImageDbError, match="invalid size"):
        db.commit_layer(LayerRecord(first.chain_id, first.diff_id, None, first.cache_id, -1))
    db.commit_layer(first)
    with pytest.raises(ImageDbError, match="already registered"):
        db.commit_layer(LayerRecord(first.chain_id, first.diff_id, None, CACHES[2], 1))
    db.begin_layer(CACHES[2])
    (db.root / f"layerdb/tmp/write-set-{CACHES[2]}/cache-id").write_text(CACHES[0])
    with pytest.raises(ImageDbError, match="does not hold"):
        db.commit_layer(LayerRecord(second.chain_id, second.diff_id, second.parent, CACHES[2], 1))


def test_remove_layer_refuses_parents_and_images_of_containers(db: ImageDb) -> None:
    records = _with_layers(db)
    db.put_mount(MountRecord(CONTAINER, MOUNT_ID, None, CHAINS[2]))
    with pytest.raises(ImageDbError, match="is the parent of 1 layer"):
        db.remove_layer(CHAINS[1])
    with pytest.raises(ImageDbError, match=f"is the image of container\\(s\\) {CONTAINER}"):
        db.remove_layer(CHAINS[2])
    db.remove_mount(CONTAINER)
    for rec in reversed(records):
        db.remove_layer(rec.chain_id)
    assert db.layers() == []
    db.remove_layer(CHAINS[0])  # absent: no-op


def test_a_damaged_layer_record_is_reported(db: ImageDb, root: Path) -> None:
    rec = _with_layers(db)[0]
    layer = root / "layerdb/sha256" / rec.chain_id.removeprefix("sha256:")
    (layer / "size").write_text("lots")
    with pytest.raises(ImageDbError, match="invalid size 'lots'"):
        db.layer(rec.chain_id)
    (layer / "size").unlink()
    with pytest.raises(ImageDbError, match="incomplete layer record"):
        db.layers()


# -- atomicity and leftovers ----------------------------------------------------------------------


def test_writes_leave_no_temporary_files(db: ImageDb, root: Path) -> None:
    _with_layers(db)
    config = images.image_config(DIFFS)
    image_id = db.put_image(config, parent=_digest("parent-image"))
    db.put_image(config)  # again: harmless
    db.tag("busybox", image_id)
    db.tag("busybox:1", image_id)
    db.untag("busybox:1")
    db.put_mount(MountRecord(CONTAINER, MOUNT_ID, MOUNT_ID + "-init", CHAINS[-1]))
    db.remove_mount(CONTAINER)
    db.remove_layer(CHAINS[-1])
    db.begin_layer(CACHES[2])
    db.abandon(CACHES[2])
    names = [Path(p).name for p in _files(root)]
    assert [n for n in names if n.startswith(".") or "tmp-" in n or "removing" in n or "set-" in n] == []
    assert list((root / "layerdb/tmp").iterdir()) == []


def test_leftovers_of_interrupted_operations_are_swept_on_writable_open(root: Path) -> None:
    db = ImageDb(root)
    db.begin_layer(CACHES[0])
    (root / "layerdb/tmp/.removing-abc-0123").mkdir()
    (root / "layerdb/tmp/.removing-abc-0123/diff").write_text("x")
    (root / "layerdb/tmp" / f"mount-set-{CONTAINER}-0123").mkdir()
    (root / "imagedb/content/sha256" / f".{'a' * 64}.tmp-0123").write_text("half")
    (root / ".repositories.json.tmp-0123").write_text("half")
    ImageDb(root, read_only=True)
    assert len(list((root / "layerdb/tmp").iterdir())) == 3
    ImageDb(root)
    assert [p.name for p in (root / "layerdb/tmp").iterdir()] == [f"write-set-{CACHES[0]}"]
    assert list((root / "imagedb/content/sha256").iterdir()) == []
    assert sorted(p.name for p in root.iterdir()) == ["imagedb", "layerdb", "repositories.json"]


def test_a_failed_replace_keeps_the_old_file(db: ImageDb, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image_id = db.put_image(images.image_config(DIFFS))
    db.tag("busybox", image_id)
    before = (root / "repositories.json").read_bytes()

    def fail(*args: Any) -> None:
        raise OSError("simulated crash at rename")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        db.tag("other", image_id)
    monkeypatch.undo()
    assert (root / "repositories.json").read_bytes() == before
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []


# -- images and tags ------------------------------------------------------------------------------------


def test_image_round_trip(db: ImageDb, root: Path) -> None:
    _with_layers(db)
    config = images.image_config(DIFFS)
    parent = _digest("parent-image")
    image_id = db.put_image(config, parent=parent)
    assert image_id == "sha256:" + hashlib.sha256(config).hexdigest()
    assert db.image_config(image_id) == config
    assert db.image_parent(image_id) == parent
    assert db.images() == [image_id]
    assert db.image_top_layer(image_id) == CHAINS[-1]
    last = (root / "imagedb/metadata/sha256" / image_id.removeprefix("sha256:") / "lastUpdated").read_text()
    assert last.endswith("Z") and last[4] == "-" and last[10] == "T"
    db.remove_image(image_id)
    assert (db.images(), db.image_config(image_id), db.image_parent(image_id)) == ([], None, None)
    assert list((root / "imagedb/metadata/sha256").iterdir()) == []
    db.remove_image(image_id)  # absent: no-op


def test_image_without_layers_has_no_top_layer(db: ImageDb) -> None:
    image_id = db.put_image(images.image_config([]))
    assert db.image_top_layer(image_id) is None
    assert db.image_top_layer(_digest("unknown")) is None


def test_put_image_refuses_what_is_not_an_image_config(db: ImageDb) -> None:
    with pytest.raises(ImageFormatError, match="invalid JSON"):
        db.put_image(b"not json")
    with pytest.raises(ImageFormatError, match="missing 'rootfs'"):
        db.put_image(b"{}")


def test_tampered_image_content_is_detected(db: ImageDb, root: Path) -> None:
    image_id = db.put_image(images.image_config(DIFFS))
    (root / "imagedb/content/sha256" / image_id.removeprefix("sha256:")).write_bytes(b"{}")
    with pytest.raises(ImageDbError, match="content does not match image id"):
        db.image_config(image_id)


def test_tags_are_stored_as_docker_normalises_them(db: ImageDb, root: Path) -> None:
    first = db.put_image(images.image_config(DIFFS[:1]))
    second = db.put_image(images.image_config(DIFFS))
    db.tag("busybox", first)
    db.tag("docker.io/library/busybox:1.36", second)
    db.tag("localhost:5000/team/app:v1", second)
    assert db.tags() == {"busybox:latest": first, "busybox:1.36": second, "localhost:5000/team/app:v1": second}
    assert json.loads((root / "repositories.json").read_bytes()) == {
        "Repositories": {
            "busybox": {"busybox:latest": first, "busybox:1.36": second},
            "localhost:5000/team/app": {"localhost:5000/team/app:v1": second},
        }
    }
    assert db.references(second) == ["busybox:1.36", "localhost:5000/team/app:v1"]
    db.tag("busybox:latest", second)  # moves the tag
    assert db.tags()["busybox:latest"] == second
    with pytest.raises(ImageDbError, match=r"still tagged as busybox:1\.36, busybox:latest"):
        db.remove_image(second)
    assert db.untag("docker.io/busybox:1.36") == second
    assert db.untag("busybox:1.36") is None
    assert db.untag("localhost:5000/team/app:v1") == second
    assert "localhost:5000/team/app" not in json.loads((root / "repositories.json").read_bytes())["Repositories"]
    with pytest.raises(ImageDbError, match="is not stored"):
        db.tag("ghost:latest", _digest("ghost"))


@pytest.mark.parametrize("ref", ["../../etc/passwd", "/abs", "a\\b", "Upper:case", "x:y/z", ""])
def test_invalid_references_are_refused(db: ImageDb, ref: str) -> None:
    image_id = db.put_image(images.image_config([]))
    with pytest.raises(InvalidReferenceError):
        db.tag(ref, image_id)
    with pytest.raises(InvalidReferenceError):
        db.untag(ref)


def test_damaged_repositories_json_is_reported(db: ImageDb, root: Path) -> None:
    (root / "repositories.json").write_text("{oops")
    with pytest.raises(ImageDbError, match=r"repositories\.json: invalid JSON"):
        db.tags()
    (root / "repositories.json").write_text('{"Repositories": {"busybox": {"busybox:latest": 7}}}')
    with pytest.raises(ImageDbError, match="not a map of name"):
        db.tags()


# -- mounts -----------------------------------------------------------------------------------------------


def test_mount_records_round_trip(db: ImageDb, root: Path) -> None:
    _with_layers(db)
    with_init = MountRecord(CONTAINER, MOUNT_ID, MOUNT_ID + "-init", CHAINS[-1])
    scratch = MountRecord(_hex("scratch-container"), _hex("scratch-mount"), None, None)
    db.put_mount(with_init)
    db.put_mount(scratch)
    assert db.mount(CONTAINER) == with_init
    assert db.mounts() == sorted([with_init, scratch], key=lambda m: m.container_id)
    assert ImageDb(root, read_only=True).mount(scratch.container_id) == scratch
    assert sorted(p.name for p in (root / "layerdb/mounts" / scratch.container_id).iterdir()) == ["mount-id"]
    with pytest.raises(ImageDbError, match="already has a mount record"):
        db.put_mount(with_init)
    db.remove_mount(CONTAINER)
    assert db.mount(CONTAINER) is None
    db.remove_mount(CONTAINER)  # absent: no-op


def test_put_mount_refuses_unknown_parents_and_bad_init_ids(db: ImageDb) -> None:
    with pytest.raises(ImageDbError, match=r"parent layer .* is not registered"):
        db.put_mount(MountRecord(CONTAINER, MOUNT_ID, None, CHAINS[0]))
    with pytest.raises(InvalidIdError, match="invalid init id"):
        db.put_mount(MountRecord(CONTAINER, MOUNT_ID, MOUNT_ID + "-other", None))
    assert db.mounts() == []


# -- id validation and read-only mode ---------------------------------------------------------------


def test_ids_that_could_escape_the_root_are_refused(db: ImageDb) -> None:
    bad_digests = ["sha256:../../../etc", "sha256:" + "A" * 64, "sha512:" + "a" * 128, "a" * 64, ""]
    bad_hex = ["../../x", "A" * 64, "a" * 63, "a" * 64 + "/x", "a" * 64 + "-init"]
    for value in bad_digests:
        for call in (db.layer, db.children, db.remove_layer, db.image_config, db.remove_image, db.image_top_layer):
            with pytest.raises(InvalidIdError, match=r"invalid (chain|image) id"):
                call(value)
    for value in bad_hex:
        with pytest.raises(InvalidIdError, match="invalid cache id"):
            db.begin_layer(value)
        with pytest.raises(InvalidIdError, match="invalid container id"):
            db.mount(value)
        with pytest.raises(InvalidIdError, match="invalid container id"):
            db.put_mount(MountRecord(value, MOUNT_ID, None, None))
        with pytest.raises(InvalidIdError, match="invalid mount id"):
            db.put_mount(MountRecord(CONTAINER, value, None, None))
    with pytest.raises(InvalidIdError, match="invalid cache id"):
        db.commit_layer(LayerRecord(CHAINS[0], DIFFS[0], None, "../x", 1))


@given(st.text(max_size=80))
def test_arbitrary_text_is_either_a_valid_id_or_refused(tmp_path_factory: pytest.TempPathFactory, value: str) -> None:
    root = tmp_path_factory.mktemp("db") / "root"
    db = ImageDb(root)
    before = _files(root.parent)
    try:
        db.begin_layer(value)
    except InvalidIdError:
        assert _files(root.parent) == before
    else:
        assert len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    with pytest.raises(InvalidIdError):
        db.layer(value)  # no digest prefix: never a chain id


def _write_calls(db: ImageDb, image_id: str) -> dict[str, Callable[[], object]]:
    rec = _records()[0]
    return {
        "begin_layer": lambda: db.begin_layer(CACHES[2]),
        "commit_layer": lambda: db.commit_layer(_records()[1]),
        "abandon": lambda: db.abandon(CACHES[0]),
        "remove_layer": lambda: db.remove_layer(rec.chain_id),
        "put_image": lambda: db.put_image(images.image_config([])),
        "remove_image": lambda: db.remove_image(image_id),
        "tag": lambda: db.tag("busybox", image_id),
        "untag": lambda: db.untag("busybox"),
        "put_mount": lambda: db.put_mount(MountRecord(CONTAINER, MOUNT_ID, None, None)),
        "remove_mount": lambda: db.remove_mount(CONTAINER),
    }


def test_read_only_refuses_every_write_and_changes_nothing(root: Path) -> None:
    writable = ImageDb(root)
    writable.commit_layer(_records()[0])
    image_id = writable.put_image(images.image_config(DIFFS[:1]))
    writable.begin_layer(CACHES[0])
    before = _files(root)
    ro = ImageDb(root, read_only=True)
    for name, call in _write_calls(ro, image_id).items():
        with pytest.raises(ReadOnlyError, match="open read-only"):
            call()
        assert _files(root) == before, name
    assert ro.layers() == [_records()[0]]
    assert ro.incomplete() == [CACHES[0]]


def test_read_only_open_of_a_missing_root_creates_nothing(root: Path) -> None:
    db = ImageDb(root, read_only=True)
    assert not root.exists()
    assert (db.layers(), db.mounts(), db.images(), db.tags(), db.incomplete()) == ([], [], [], {}, [])
