"""Image fixtures for the layer-store tests: a busybox root filesystem, three layer tars, archive writers,
an independent reference merge, and a comparable description of a directory tree.

* ``rootfs_entries()`` describes a small root filesystem built around the static busybox binary; the
  same description is materialised on disk by ``busybox_rootfs`` and written as layer 1 by ``layer_tars``,
  so both carry the same owners, modes, xattrs and mtimes whoever runs the tests (on-disk owners are
  applied only as root).
* ``layer_tars`` writes three uncompressed PAX layer tars (numeric owners, xattrs as ``SCHILY.xattr.*``):
  L1 the rootfs; L2 and L3 the changes listed in ``LAYER2``/``LAYER3`` with AUFS-style whiteouts
  (``.wh.<name>``, ``.wh..wh..opq``).  ``MERGED_PRESENT``/``MERGED_ABSENT`` say what the merged tree of
  all three must and must not hold.
* ``docker_save_members``/``write_docker_save`` build a ``docker save`` archive (legacy ``<id>/layer.tar``
  or Docker 25's OCI-style one); ``oci_layout_members``/``write_oci_layout`` an OCI image layout, as a
  directory and optionally as a tar.  The ``*_members`` forms return the archive as name -> bytes so
  tests can damage it before writing it with ``write_members_tar``/``write_members_dir``.
* ``reference_tree`` merges layers with GNU tar plus whiteout handling done here; it shares no code with
  ``devmapper.layers`` on purpose, so comparing the two catches errors on either side.
* ``tree_manifest`` maps every path under a root to a ``ManifestEntry`` (type, mode, owner, size,
  content digest, user xattrs, hard-link group, mtime except for directories) for equality checks;
  ``manifest_diff`` lists the differences readably.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any, NamedTuple

import pytest

BUSYBOX = Path("/bin/busybox")
EPOCH = 1_700_000_000  # mtime of layer 1 entries; layer 2 is EPOCH + 1000, layer 3 EPOCH + 2000
CREATED = "2023-11-14T22:13:20Z"  # the configs' "created", fixed so image ids are reproducible

OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tar entry / filesystem object.  ``target`` is a symlink's target or a hard link's member name."""

    name: str
    kind: str  # "dir", "file", "symlink", "hardlink", "fifo"
    mode: int = 0o644
    data: bytes = b""
    target: str = ""
    uid: int = 0
    gid: int = 0
    mtime: int = EPOCH
    xattrs: tuple[tuple[str, bytes], ...] = ()


def _dir(name: str, mode: int = 0o755, **kw: Any) -> Entry:
    return Entry(name, "dir", mode, **kw)


def _file(name: str, data: bytes, mode: int = 0o644, **kw: Any) -> Entry:
    return Entry(name, "file", mode, data, **kw)


def _symlink(name: str, target: str, **kw: Any) -> Entry:
    return Entry(name, "symlink", 0o777, target=target, **kw)


def _hardlink(name: str, target: str, mode: int = 0o644, **kw: Any) -> Entry:
    return Entry(name, "hardlink", mode, target=target, **kw)


def _whiteout(name: str, **kw: Any) -> Entry:
    return Entry(name, "file", 0o644, **kw)


def require_busybox() -> Path:
    """Return the static busybox binary; skip the calling test if it is absent."""
    if not BUSYBOX.is_file():
        pytest.skip(f"{BUSYBOX} not found (install busybox-static)")
    return BUSYBOX


def require_root(why: str) -> None:
    """Skip the calling test unless running as root."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


def _applets(busybox: Path) -> list[str]:
    """Applet paths under bin/ and sbin/ from ``busybox --list-full``."""
    out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True).stdout
    names = {line.strip() for line in out.splitlines()}
    return sorted(n for n in names if n.startswith(("bin/", "sbin/")) and n.count("/") == 1 and n != "bin/busybox")


PASSWD = b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
GROUP = b"root:x:0:\nuser:x:1000:\n"


def rootfs_entries() -> list[Entry]:
    """Describe the busybox root filesystem (layer 1), parents before children."""
    busybox = require_busybox()
    entries = [
        _dir("bin"),
        _file("bin/busybox", busybox.read_bytes(), 0o755),
        _file("bin/suid-helper", b"#!/bin/sh\nexec id\n", 0o4755),
        _dir("sbin"),
        _dir("etc"),
        _file("etc/passwd", PASSWD),
        _file("etc/group", GROUP),
        _file("etc/hostname", b"busybox\n"),
        _file("etc/delete-me", b"deleted by layer 2\n"),
        _file("etc/becomes-dir", b"a file in layer 1, a directory in layer 2\n"),
        _file("etc/xattr-file", b"has a user xattr\n", xattrs=(("user.test", b"hello xattr"),)),
        _file("etc/hl-a", b"hard linked\n"),
        _hardlink("etc/hl-b", "etc/hl-a"),
        _dir("etc/opaque-me"),
        _file("etc/opaque-me/old1", b"hidden by the opaque directory of layer 2\n"),
        _dir("etc/opaque-me/sub"),
        _file("etc/opaque-me/sub/old2", b"also hidden\n"),
        _dir("home"),
        _dir("home/user", uid=1000, gid=1000),
        _file("home/user/notes.txt", b"owned by 1000:1000\n", 0o640, uid=1000, gid=1000),
        _dir("mnt"),  # stays empty
        _dir("root", 0o700),
        _dir("srv"),  # an empty directory replaced by a file in layer 3
        _dir("tmp", 0o1777),
        _dir("usr"),
        _dir("usr/bin"),
        _dir("var"),
        Entry("var/fifo", "fifo", 0o644),
        _dir("var/log"),
        _dir("var/tree-gone"),
        _file("var/tree-gone/top", b"deleted with its directory\n"),
        _dir("var/tree-gone/a"),
        _dir("var/tree-gone/a/b"),
        _file("var/tree-gone/a/b/file", b"deep\n"),
    ]
    for applet in _applets(busybox):
        entries.append(_symlink(applet, "busybox" if applet.startswith("bin/") else "../bin/busybox"))
    return entries


L2_TIME = EPOCH + 1000
L3_TIME = EPOCH + 2000

#: Layer 2: modify, add, delete a file, delete a tree, make a directory opaque, replace a file by a directory.
LAYER2: list[Entry] = [
    _dir("etc", mtime=L2_TIME),
    _file("etc/hostname", b"layer2\n", mtime=L2_TIME),
    _file("etc/added.conf", b"added in layer 2, deleted in layer 3\n", mtime=L2_TIME),
    _whiteout("etc/.wh.delete-me", mtime=L2_TIME),
    _dir("etc/opaque-me", mtime=L2_TIME),
    _whiteout("etc/opaque-me/.wh..wh..opq", mtime=L2_TIME),
    _file("etc/opaque-me/new-file", b"the only entry left in the opaque directory\n", mtime=L2_TIME),
    _dir("etc/becomes-dir", 0o750, mtime=L2_TIME),
    _file("etc/becomes-dir/inner.txt", b"inside the new directory\n", mtime=L2_TIME),
    _dir("opt", mtime=L2_TIME),
    _dir("opt/app", mtime=L2_TIME),
    _file("opt/app/run.sh", b"#!/bin/sh\necho run\n", 0o755, mtime=L2_TIME),
    _dir("usr", mtime=L2_TIME),
    _dir("usr/bin", mtime=L2_TIME),
    _file("usr/bin/l2tool", b"#!/bin/sh\necho l2tool\n", 0o755, mtime=L2_TIME),
    _dir("var", mtime=L2_TIME),
    _whiteout("var/.wh.tree-gone", mtime=L2_TIME),
]

#: Layer 3: delete something layer 2 added, change modes, add a hard link and symlinks, replace a dir by a file.
LAYER3: list[Entry] = [
    _dir("etc", mtime=L3_TIME),
    _whiteout("etc/.wh.added.conf", mtime=L3_TIME),
    _symlink("etc/link-to-hostname", "hostname", mtime=L3_TIME),
    _dir("home", mtime=L3_TIME),
    _dir("home/user", uid=1000, gid=1000, mtime=L3_TIME),
    _file("home/user/notes.txt", b"changed in layer 3\n", 0o600, uid=1000, gid=1000, mtime=L3_TIME),
    _dir("opt", mtime=L3_TIME),
    _dir("opt/app", mtime=L3_TIME),
    _file("opt/app/run.sh", b"#!/bin/sh\necho run\n", 0o700, mtime=L3_TIME),
    _file("srv", b"was an empty directory\n", mtime=L3_TIME),
    _dir("usr", mtime=L3_TIME),
    _dir("usr/bin", mtime=L3_TIME),
    _file("usr/bin/l2tool", b"#!/bin/sh\necho l2tool\n", 0o755, mtime=L3_TIME),
    # a hard link's header carries its inode's metadata, as tar writers produce it
    _hardlink("usr/bin/l2tool-link", "usr/bin/l2tool", mode=0o755, mtime=L3_TIME),
    _symlink("usr/bin/abs-sh", "/bin/busybox", mtime=L3_TIME),
    _dir("var", mtime=L3_TIME),
    _dir("var/log", 0o750, mtime=L3_TIME),
]

#: Paths the merge of layers 1-3 must contain.
MERGED_PRESENT = (
    "bin/busybox",
    "bin/sh",
    "bin/suid-helper",
    "etc/becomes-dir/inner.txt",
    "etc/hl-a",
    "etc/hl-b",
    "etc/hostname",
    "etc/link-to-hostname",
    "etc/opaque-me/new-file",
    "etc/xattr-file",
    "home/user/notes.txt",
    "mnt",
    "opt/app/run.sh",
    "srv",
    "usr/bin/abs-sh",
    "usr/bin/l2tool",
    "usr/bin/l2tool-link",
    "var/fifo",
    "var/log",
)
#: Paths the merge of layers 1-3 must not contain (deleted, hidden, or whiteout markers).
MERGED_ABSENT = (
    "etc/.wh.added.conf",
    "etc/.wh.delete-me",
    "etc/added.conf",
    "etc/delete-me",
    "etc/opaque-me/.wh..wh..opq",
    "etc/opaque-me/old1",
    "etc/opaque-me/sub",
    "var/.wh.tree-gone",
    "var/tree-gone",
)


# -- materialising entries ------------------------------------------------------------------------


def _materialise(entries: list[Entry], dest: Path) -> None:
    """Create ``entries`` under ``dest`` (owners only as root), then set mtimes, directories last."""
    is_root = os.geteuid() == 0
    for e in entries:
        path = dest / e.name
        if e.kind == "dir":
            path.mkdir(exist_ok=True)
        elif e.kind == "file":
            path.write_bytes(e.data)
        elif e.kind == "symlink":
            os.symlink(e.target, path)
        elif e.kind == "hardlink":
            os.link(dest / e.target, path)
            continue  # shares the target's inode and attributes
        elif e.kind == "fifo":
            os.mkfifo(path)
        else:
            raise ValueError(f"unknown entry kind {e.kind!r}")
        if is_root:
            os.lchown(path, e.uid, e.gid)  # before chmod: chown clears set-id bits
        if e.kind != "symlink":
            os.chmod(path, e.mode)
        for name, value in e.xattrs:
            try:
                os.setxattr(path, name, value, follow_symlinks=False)
            except OSError as exc:
                pytest.skip(f"cannot set xattr {name} under {dest}: {exc}")
    for e in sorted(entries, key=lambda e: e.kind == "dir"):
        if e.kind != "hardlink":
            os.utime(dest / e.name, ns=(e.mtime * 10**9, e.mtime * 10**9), follow_symlinks=False)


def busybox_rootfs(dest: Path) -> Path:
    """Create the busybox root filesystem (``rootfs_entries``) under ``dest`` and return ``dest``.

    Owners are applied only when running as root; without root every file belongs to the caller.
    """
    entries = rootfs_entries()
    dest.mkdir(parents=True, exist_ok=True)
    _materialise(entries, dest)
    return dest


# -- layer tars -----------------------------------------------------------------------------------


def _tarinfo(e: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(e.name)
    info.mode = e.mode
    info.uid, info.gid = e.uid, e.gid
    info.uname = info.gname = ""
    info.mtime = e.mtime
    info.type = {
        "dir": tarfile.DIRTYPE,
        "file": tarfile.REGTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }[e.kind]
    if e.kind in ("symlink", "hardlink"):
        info.linkname = e.target
    if e.kind == "file":
        info.size = len(e.data)
    info.pax_headers = {f"SCHILY.xattr.{name}": value.decode("utf-8") for name, value in e.xattrs}
    return info


def write_layer_tar(path: Path, entries: list[Entry]) -> Path:
    """Write ``entries`` as an uncompressed PAX tar with numeric owners; return ``path``."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            tar.addfile(_tarinfo(e), io.BytesIO(e.data) if e.kind == "file" else None)
    return path


def layer_tars(dest: Path) -> list[Path]:
    """Write layer1.tar (the busybox rootfs), layer2.tar and layer3.tar under ``dest``; return their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    return [
        write_layer_tar(dest / "layer1.tar", rootfs_entries()),
        write_layer_tar(dest / "layer2.tar", LAYER2),
        write_layer_tar(dest / "layer3.tar", LAYER3),
    ]


def sha256_file(path: Path) -> str:
    """Return ``sha256:<hex>`` of a file, read in pieces."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


def image_config(diff_ids: list[str]) -> bytes:
    """Return an image config for ``diff_ids`` (architecture, os, config.Cmd, rootfs, history)."""
    return _json(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": CREATED,
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": CREATED, "created_by": f"test layer {i + 1}"} for i in range(len(diff_ids))],
        }
    )


# -- archives -------------------------------------------------------------------------------------


def write_members_tar(path: Path, members: dict[str, bytes]) -> Path:
    """Write name -> bytes as a tar (directories implied by names are added first); return ``path``."""
    dirs = sorted({"/".join(n.split("/")[:i]) for n in members for i in range(1, n.count("/") + 1)})
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, EPOCH
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, EPOCH
            tar.addfile(info, io.BytesIO(data))
    return path


def write_members_dir(dest: Path, members: dict[str, bytes]) -> Path:
    """Write name -> bytes as files under ``dest``; return ``dest``."""
    for name, data in members.items():
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return dest


def _split_tag(ref: str) -> tuple[str, str]:
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:
        return ref, "latest"
    return name, tag


def _containerd_name(ref: str) -> str:
    name, tag = _split_tag(ref)
    first = name.split("/")[0]
    if "/" in name and ("." in first or ":" in first or first == "localhost"):
        return f"{name}:{tag}"
    if "/" not in name:
        name = "library/" + name
    return f"docker.io/{name}:{tag}"


def _layer_blobs(layers: list[Path], gzip_layers: bool) -> tuple[list[str], list[bytes]]:
    diff_ids, blobs = [], []
    for layer in layers:
        data = layer.read_bytes()
        diff_ids.append(_digest(data))
        blobs.append(_gzip(data) if gzip_layers else data)
    return diff_ids, blobs


def docker_save_members(
    layers: list[Path], repo_tags: list[str], *, gzip_layers: bool = False, oci_style: bool = False
) -> tuple[dict[str, bytes], str]:
    """Return (name -> bytes of a docker save archive, image id); see ``write_docker_save``."""
    diff_ids, blobs = _layer_blobs(layers, gzip_layers)
    config = image_config(diff_ids)
    image_id = _digest(config)
    members: dict[str, bytes] = {}
    if oci_style:
        layer_names = []
        media_type = OCI_LAYER_GZIP if gzip_layers else OCI_LAYER_TAR
        for blob in blobs:
            layer_names.append("blobs/sha256/" + _digest(blob).removeprefix("sha256:"))
            members[layer_names[-1]] = blob
        config_name = "blobs/sha256/" + image_id.removeprefix("sha256:")
        members[config_name] = config
        manifest = _oci_manifest(config, [(media_type, blob) for blob in blobs])
        members["blobs/sha256/" + _digest(manifest).removeprefix("sha256:")] = manifest
        descriptors = [
            _descriptor(
                OCI_MANIFEST,
                manifest,
                {
                    "io.containerd.image.name": _containerd_name(ref),
                    "org.opencontainers.image.ref.name": _split_tag(ref)[1],
                },
            )
            for ref in repo_tags
        ] or [_descriptor(OCI_MANIFEST, manifest)]
        members["index.json"] = _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors})
        members["oci-layout"] = _json({"imageLayoutVersion": "1.0.0"})
        top_v1 = image_id.removeprefix("sha256:")
    else:
        layer_names = []
        parent_v1 = ""
        for i, blob in enumerate(blobs):
            v1 = hashlib.sha256(f"{parent_v1}\n{diff_ids[i]}".encode()).hexdigest()
            v1_json: dict[str, Any] = {"id": v1, "created": CREATED, "container_config": {"Cmd": None}, "os": "linux"}
            if parent_v1:
                v1_json["parent"] = parent_v1
            members[f"{v1}/VERSION"] = b"1.0"
            members[f"{v1}/json"] = _json(v1_json)
            members[f"{v1}/layer.tar"] = blob
            layer_names.append(f"{v1}/layer.tar")
            parent_v1 = v1
        config_name = image_id.removeprefix("sha256:") + ".json"
        members[config_name] = config
        top_v1 = parent_v1
    members["manifest.json"] = _json([{"Config": config_name, "RepoTags": repo_tags or None, "Layers": layer_names}])
    repositories: dict[str, dict[str, str]] = {}
    for ref in repo_tags:
        name, tag = _split_tag(ref)
        repositories.setdefault(name, {})[tag] = top_v1
    if repositories:
        members["repositories"] = _json(repositories)
    return members, image_id


def write_docker_save(
    path: Path, layers: list[Path], repo_tags: list[str], *, gzip_layers: bool = False, oci_style: bool = False
) -> str:
    """Write a ``docker save`` tarball of one image with ``layers``; return its image id.

    Legacy (before Docker 25): ``<v1 id>/{VERSION,json,layer.tar}``, ``<config hex>.json``, ``manifest.json``,
    ``repositories``.  ``oci_style`` (Docker 25+): ``blobs/sha256/*``, ``index.json``, ``oci-layout``,
    ``manifest.json`` naming blobs, ``repositories``.  ``gzip_layers`` stores the layers gzip-compressed.
    """
    members, image_id = docker_save_members(layers, repo_tags, gzip_layers=gzip_layers, oci_style=oci_style)
    write_members_tar(path, members)
    return image_id


def _descriptor(media_type: str, blob: bytes, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    desc: dict[str, Any] = {"mediaType": media_type, "digest": _digest(blob), "size": len(blob)}
    if annotations:
        desc["annotations"] = annotations
    return desc


def _oci_manifest(config: bytes, layers: list[tuple[str, bytes]]) -> bytes:
    return _json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor(OCI_CONFIG, config),
            "layers": [_descriptor(media_type, blob) for media_type, blob in layers],
        }
    )


def oci_layout_members(
    layers: list[Path],
    ref_name: str | None,
    *,
    gzip_layers: bool = True,
    nested_index: bool = False,
    containerd_name: str | None = None,
) -> tuple[dict[str, bytes], str]:
    """Return (name -> bytes of an OCI image layout, image id); see ``write_oci_layout``."""
    diff_ids, blobs = _layer_blobs(layers, gzip_layers)
    config = image_config(diff_ids)
    media_type = OCI_LAYER_GZIP if gzip_layers else OCI_LAYER_TAR
    manifest = _oci_manifest(config, [(media_type, blob) for blob in blobs])
    members = {"blobs/sha256/" + _digest(b).removeprefix("sha256:"): b for b in [*blobs, config, manifest]}
    annotations = {}
    if ref_name is not None:
        annotations["org.opencontainers.image.ref.name"] = ref_name
    if containerd_name is not None:
        annotations["io.containerd.image.name"] = containerd_name
    if nested_index:
        platform_desc = _descriptor(OCI_MANIFEST, manifest)
        platform_desc["platform"] = {"architecture": "amd64", "os": "linux"}
        nested = _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [platform_desc]})
        members["blobs/sha256/" + _digest(nested).removeprefix("sha256:")] = nested
        top = _descriptor(OCI_INDEX, nested, annotations)
    else:
        top = _descriptor(OCI_MANIFEST, manifest, annotations)
    members["index.json"] = _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]})
    members["oci-layout"] = _json({"imageLayoutVersion": "1.0.0"})
    return members, _digest(config)


def write_oci_layout(
    dest_dir: Path,
    layers: list[Path],
    ref_name: str | None,
    *,
    gzip_layers: bool = True,
    nested_index: bool = False,
    containerd_name: str | None = None,
    tar_path: Path | None = None,
) -> str:
    """Write an OCI image layout of one image under ``dest_dir``; return its image id.

    ``ref_name`` becomes the ``org.opencontainers.image.ref.name`` annotation, ``containerd_name`` the
    ``io.containerd.image.name`` one; ``nested_index`` puts the manifest behind a platform image index;
    ``tar_path`` also packs the layout into a tar there.
    """
    members, image_id = oci_layout_members(
        layers, ref_name, gzip_layers=gzip_layers, nested_index=nested_index, containerd_name=containerd_name
    )
    dest_dir.mkdir(parents=True, exist_ok=True)
    write_members_dir(dest_dir, members)
    if tar_path is not None:
        write_members_tar(tar_path, members)
    return image_id


# -- independent reference merge ------------------------------------------------------------------


def _gnu_tar() -> str:
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("GNU tar not found")
    version = subprocess.run([tar, "--version"], capture_output=True, text=True, check=False).stdout
    if "GNU tar" not in version:
        pytest.skip(f"{tar} is not GNU tar")
    return tar


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def reference_tree(layers: list[Path], dest: Path) -> Path:
    """Merge ``layers`` (uncompressed tars, base first) into ``dest`` with GNU tar; return ``dest``.

    Per layer: list it; empty every opaque directory (``.wh..wh..opq``) of what lower layers put there;
    extract with owners, modes and xattrs; then delete each ``.wh.<name>`` marker and ``<name>``.
    Needs root (``--same-owner``); skips otherwise.
    """
    require_root("GNU tar --same-owner restores owners only for root")
    tar = _gnu_tar()
    dest.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        listing = subprocess.run([tar, "-tf", str(layer)], capture_output=True, text=True, check=True).stdout
        names = [n.rstrip("/") for n in listing.splitlines() if n]
        whiteouts = [n for n in names if Path(n).name.startswith(".wh.")]
        for name in whiteouts:
            if Path(name).name == ".wh..wh..opq":
                opaque = dest / Path(name).parent
                if opaque.is_dir() and not opaque.is_symlink():
                    for child in opaque.iterdir():
                        _remove(child)
        subprocess.run(
            [
                tar,
                "--xattrs",
                "--xattrs-include=*",
                "--same-owner",
                "--numeric-owner",
                "-xpf",
                str(layer),
                "-C",
                str(dest),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        for name in whiteouts:
            marker = dest / name
            _remove(marker)
            if marker.name != ".wh..wh..opq":
                _remove(marker.with_name(marker.name.removeprefix(".wh.")))
    return dest


# -- tree manifests -------------------------------------------------------------------------------


class ManifestEntry(NamedTuple):
    """What ``tree_manifest`` records for one path."""

    type: str
    mode: int
    uid: int
    gid: int
    size: int
    content: str  # sha256 hex of a file, a symlink's target, "major:minor" of a device, else ""
    xattrs: tuple[tuple[str, bytes], ...]  # user.* only, sorted
    link_group: str | None  # the first path (sorted) of its hard-link group within the tree
    mtime: int | None  # whole seconds; None for directories (whiteout handling changes theirs)


_TYPES = (
    (stat.S_ISDIR, "dir"),
    (stat.S_ISREG, "file"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISCHR, "chr"),
    (stat.S_ISBLK, "blk"),
    (stat.S_ISSOCK, "sock"),
)


def _content_of(path: Path, st: os.stat_result, kind: str) -> str:
    if kind == "file":
        return sha256_file(path).removeprefix("sha256:")
    if kind == "symlink":
        return os.readlink(path)
    if kind in ("chr", "blk"):
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return ""


def _user_xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names if n.startswith("user.")))


def tree_manifest(root: Path, *, mtimes: bool = True) -> dict[str, ManifestEntry]:
    """Describe every path under ``root`` (not ``root`` itself), relative, as a ``ManifestEntry``."""
    raw: dict[str, tuple[os.stat_result, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            kind = next(k for test, k in _TYPES if test(st.st_mode))
            raw[str(path.relative_to(root))] = (st, kind)
    groups: dict[tuple[int, int], list[str]] = {}
    for rel, (st, kind) in raw.items():
        if kind != "dir" and st.st_nlink > 1:
            groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
    link_group = {rel: min(paths) for paths in groups.values() if len(paths) > 1 for rel in paths}
    manifest = {}
    for rel, (st, kind) in sorted(raw.items()):
        path = root / rel
        manifest[rel] = ManifestEntry(
            type=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if kind == "file" else 0,
            content=_content_of(path, st, kind),
            xattrs=_user_xattrs(path),
            link_group=link_group.get(rel),
            mtime=None if kind == "dir" or not mtimes else int(st.st_mtime),
        )
    return manifest


def manifest_diff(expected: dict[str, ManifestEntry], actual: dict[str, ManifestEntry], limit: int = 20) -> list[str]:
    """List the differences between two manifests, readably (at most ``limit`` lines)."""
    lines = []
    for rel in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(rel), actual.get(rel)
        if want == got:
            continue
        if want is None:
            lines.append(f"unexpected {rel}: {got}")
        elif got is None:
            lines.append(f"missing {rel}: {want}")
        else:
            fields = [
                f"{f}: {getattr(want, f)!r} != {getattr(got, f)!r}"
                for f in want._fields
                if getattr(want, f) != getattr(got, f)
            ]
            lines.append(f"differs {rel}: " + ", ".join(fields))
    return lines[:limit]
