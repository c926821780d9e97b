"""The seeds' Docker part of ``devmapper demo``: images and containers as thin snapshots, for real.

It starts a private devmapper daemon (device files, loop devices; needs root and FUSE), builds a
two-layer busybox image as a ``docker save`` tarball, and then does what Docker's devicemapper
driver did: a pool over sparse files, a base device with ext4, a snapshot per layer with the layer
applied, and two containers (``-init`` snapshot plus read-write snapshot each) that share the
image's blocks.  It shows ``docker info``'s block, per-device usage, and checks the metadata with
``thin_check`` at the end.  Everything is undone afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from devmapper.layers.dm import Dm
from devmapper.layers.fs import mounts_under, syncfs
from devmapper.layers.info import render
from devmapper.layers.options import DmOptions, human_size
from devmapper.layers.store import LayerStore


class Say(Protocol):
    def __call__(self, title: str, command: str | None = None) -> None: ...

    def say(self, text: str) -> None: ...

OPTS = ["dm.loopdatasize=4G", "dm.loopmetadatasize=128M", "dm.basesize=512M", "dm.min_free_space=5%"]


def unavailable() -> str | None:
    """Why the Docker part cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices and mount)"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "needs FUSE (/dev/fuse and fusermount3 from the fuse3 package)"
    if not os.path.exists("/bin/busybox"):
        return "needs /bin/busybox (busybox-static) to build the demo image"
    return None


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, *, mode: int = 0o644,
         kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = kind, mode, link, 1_700_000_000
    if data is not None:
        info.size = len(data)
    tar.addfile(info, None if data is None else io.BytesIO(data))


def build_image(workdir: Path) -> Path:
    """A ``docker save`` tarball of ``demo/busybox:latest``: busybox, then a layer with a change and a whiteout."""
    layers = []
    one = io.BytesIO()
    with tarfile.open(fileobj=one, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "etc", "tmp", "root", "var", "var/log"):
            _add(tar, d, kind=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        _add(tar, "bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
        for applet in ("sh", "ls", "cat", "echo", "df"):
            _add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox", mode=0o777)
        _add(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        _add(tar, "etc/motd", b"layer one\n")
        _add(tar, "var/log/old.log", b"to be deleted by layer two\n")
    layers.append(one.getvalue())
    two = io.BytesIO()
    with tarfile.open(fileobj=two, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "etc/motd", b"layer two was here\n")
        _add(tar, "var/log/.wh.old.log", b"")
    layers.append(two.getvalue())
    diff_ids = [f"sha256:{hashlib.sha256(b).hexdigest()}" for b in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    names = [f"{d.split(':')[1]}/layer.tar" for d in diff_ids]
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["demo/busybox:latest"], "Layers": names}]).encode()
    path = workdir / "busybox.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [*zip(names, layers, strict=True), (config_name, config), ("manifest.json", manifest)]:
            _add(tar, name, data)
    return path


@contextlib.contextmanager
def _daemon(workdir: Path) -> Iterator[Path]:
    runtime = workdir / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "devmapper.cli.main", "daemon", "--runtime-dir", str(runtime), "--state-dir",
         str(workdir / "state"), "--mapper-dir", str(workdir / "mapper"), "--log-file", str(workdir / "daemon.log"),
         "--no-nbd"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (runtime / "control").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the devmapper daemon did not start (see {workdir / 'daemon.log'})")
            time.sleep(0.05)
        yield runtime
    finally:
        for point in mounts_under(workdir):
            if point != runtime / "devices":
                subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_docker_demo(workdir: Path, say: Say) -> int:
    archive = build_image(workdir)
    with _daemon(workdir) as runtime:
        dm = Dm.connect(runtime)
        try:
            return _walkthrough(workdir, archive, dm, say)
        finally:
            dm.close()


def _walkthrough(workdir: Path, archive: Path, dm: Dm, say: Say) -> int:
    root = workdir / "docker"
    say("Docker's devicemapper storage: pool, base device with ext4 (dm.basesize=512M)",
        "dockerd --storage-driver devicemapper --storage-opt dm.basesize=512M ...")
    store = LayerStore(root, dm, DmOptions.parse(OPTS)).open()
    ds = store.devices
    say.say(f"pool {ds.pool}: {dm.status(ds.pool).strip()}")
    say.say(f"base device: id {ds.devices[''].device_id}, {human_size(ds.devices[''].size)}, {ds.base_fs}")

    say("Load an image: each layer a snapshot of its parent with the layer's tar applied", "docker load -i busybox.tar")
    [image_id] = store.import_archive(archive)
    image = store.image(image_id)
    say.say(f"demo/busybox:latest = {image_id[:19]}..., {len(image.layers)} layers")
    for chain in image.layers:
        rec = store.db.layer(chain)
        assert rec is not None
        say.say(f"  layer {chain[:19]}... -> thin device {ds.devices[rec.cache_id].device_id}")

    say("Two containers: an -init snapshot and a read-write snapshot each", "docker create demo/busybox")
    c1 = store.create_container("demo/busybox", container_id="c1" * 32)
    c2 = store.create_container("demo/busybox", container_id="c2" * 32)
    root1, root2 = store.mount_container(c1), store.mount_container(c2)
    say.say(f"container 1 rootfs: {root1}")
    say.say(f"/etc/motd: {(root1 / 'etc/motd').read_text().strip()!r}; "
            f"/var/log/old.log present: {(root1 / 'var/log/old.log').exists()}")
    (root1 / "root/note").write_bytes(os.urandom(1 << 20))
    syncfs(root1)
    say.say("container 1 wrote 1 MiB to /root/note; container 2 sees it: "
            f"{(root2 / 'root/note').exists()}")
    usage = ds.usage()
    bs = ds.block_size
    for name, cid in (("container 1", c1), ("container 2", c2)):
        u = usage[ds.devices[store.container(cid).mount_id].device_id]
        say.say(f"{name}: {human_size(u.mapped_blocks * bs)} mapped, {human_size(u.exclusive_blocks * bs)} "
                f"exclusive, {human_size(u.shared_blocks * bs)} shared with the image")
    store.unmount_container(c1)
    store.unmount_container(c2)

    say("docker info", "docker info")
    for line in render(ds).splitlines():
        say.say(line)

    say("Remove a container, reconcile pool against records", "docker rm ...")
    store.remove_container(c2)
    report = store.reconcile()
    say.say(f"reconcile: {'clean' if report.clean else report}")
    ds.shutdown()
    store.close()
    meta = root / "devicemapper/devicemapper/metadata"
    say("Check the pool's metadata", f"thin_check {meta}")
    tool = shutil.which("thin_check") or "/usr/sbin/thin_check"
    rc = 0
    if os.path.exists(tool):
        r = subprocess.run([tool, str(meta)], capture_output=True, text=True, check=False)
        say.say(f"thin_check: exit {r.returncode}")
        rc = r.returncode
    return 0 if report.clean and rc == 0 else 1
