"""Layer-store benchmark (run by bench/layers.sh, which starts the daemon): import, container latency, space.

Rows:

* **import**: a 4-layer image (a busybox-like tree, then a layer of ``--files`` files of 4-64 KiB,
  a layer rewriting a tenth of them and deleting another tenth through whiteouts, and a small top
  layer) imported with ``LayerStore.import_archive`` (snapshot per layer, mount, apply, sync, unmount),
  against GNU ``tar -x`` of the same layer tars, one after the other, into ext4 on a plain loop device
  over a sparse file (mkfs'd the same way as our base device; whiteouts left as files there, since
  tar has no notion of them), followed by ``sync``.
* **create+mount**: latency of creating a container (``-init`` snapshot with its init files, then the
  read-write snapshot) and mounting it, with 1, 100 and 1000 containers already present; p50 and p99
  over ``--samples`` containers per level.
* **space**: pool data used per container (the blocks its ``-init`` layer and mounts wrote).

    bench/layers.sh            (root; env: CONTAINERS=1000 SAMPLES=50 FILES=3000)
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from devmapper.layers.dm import Dm
from devmapper.layers.options import DmOptions
from devmapper.layers.store import LayerStore

MiB = 1 << 20
OPTS = ["dm.loopdatasize=20G", "dm.loopmetadatasize=1G", "dm.basesize=2G", "dm.min_free_space=0%"]


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, mode: int = 0o644,
         kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.linkname = kind, mode, 1_700_000_000, link
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def make_layers(work: Path, files: int, seed: int = 1) -> list[Path]:
    rng = random.Random(seed)
    blob = os.urandom(64 << 10)
    paths = []
    l1 = work / "l1.tar"
    with tarfile.open(l1, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "etc", "usr", "usr/bin", "usr/lib", "var", "tmp", "root"):
            _add(tar, d, kind=tarfile.DIRTYPE, mode=0o755)
        busybox = Path("/bin/busybox").read_bytes() if Path("/bin/busybox").exists() else os.urandom(2 * MiB)
        _add(tar, "bin/busybox", busybox, 0o755)
        for applet in ("sh", "ls", "cat", "cp", "mv", "rm", "mkdir", "echo", "grep", "sed"):
            _add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox", mode=0o777)
        _add(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    paths.append(l1)
    names = [f"usr/lib/pkg{n // 100:03d}/file{n:05d}" for n in range(files)]
    l2 = work / "l2.tar"
    with tarfile.open(l2, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted({n.rsplit("/", 1)[0] for n in names}):
            _add(tar, d, kind=tarfile.DIRTYPE, mode=0o755)
        for n in names:
            size = rng.randrange(4 << 10, 64 << 10)
            _add(tar, n, blob[:size])
    paths.append(l2)
    l3 = work / "l3.tar"
    with tarfile.open(l3, "w", format=tarfile.PAX_FORMAT) as tar:
        picked = rng.sample(names, files // 5)
        for n in picked[: files // 10]:
            _add(tar, n, blob[: rng.randrange(4 << 10, 64 << 10)])
        for n in picked[files // 10:]:
            d, base = n.rsplit("/", 1)
            _add(tar, f"{d}/.wh.{base}", b"")
    paths.append(l3)
    l4 = work / "l4.tar"
    with tarfile.open(l4, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "etc/app.conf", b"answer=42\n")
    paths.append(l4)
    return paths


def docker_save(work: Path, layers: list[Path]) -> Path:
    """A legacy ``docker save`` tarball of one image with these layers."""
    import hashlib
    import json

    diff_ids = []
    for p in layers:
        h = hashlib.sha256(p.read_bytes()).hexdigest()
        diff_ids.append(f"sha256:{h}")
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    out = work / "image.tar"
    with tarfile.open(out, "w") as tar:
        members = []
        for n, p in enumerate(layers):
            name = f"{n:064x}/layer.tar"
            tar.add(p, arcname=name)
            members.append(name)
        manifest = json.dumps([{"Config": config_name, "RepoTags": ["bench:latest"], "Layers": members}]).encode()
        for name, data in ((config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def peer_import(work: Path, layers: list[Path]) -> float:
    img = work / "plain.img"
    with open(img, "wb") as f:
        f.truncate(2 << 30)
    loop = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True,
                          check=True).stdout.strip()
    target = work / "plain-mnt"
    target.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", loop],
                       check=True)
        subprocess.run(["mount", loop, str(target)], check=True)
        try:
            start = time.perf_counter()
            for p in layers:
                subprocess.run(["tar", "--xattrs", "--numeric-owner", "--same-owner", "-xpf", str(p), "-C",
                                str(target)], check=True)
            os.sync()
            return time.perf_counter() - start
        finally:
            subprocess.run(["umount", str(target)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime-dir", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--containers", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    work = args.work
    layer_dir = Path(tempfile.mkdtemp(dir=work, prefix="layers-"))
    layers = make_layers(layer_dir, args.files)
    archive = docker_save(layer_dir, layers)
    tar_bytes = sum(p.stat().st_size for p in layers)

    peer_s = peer_import(work, layers)
    store = LayerStore(work / "docker", Dm.connect(args.runtime_dir), DmOptions.parse(OPTS)).open()
    start = time.perf_counter()
    store.import_archive(archive)
    ours_s = time.perf_counter() - start
    print(f"image: {len(layers)} layers, {tar_bytes / MiB:.1f} MiB of tar, {args.files} files in layer 2")
    print(f"{'import':<28} {'ours s':>8} {'tar -x s':>9} {'ours/tar':>9}")
    print(f"{'docker save, 4 layers':<28} {ours_s:>8.2f} {peer_s:>9.2f} {ours_s / peer_s:>9.2f}")

    bs = store.devices.block_size
    present = 0
    rows = []
    for level in sorted({1, 100, args.containers}):
        while present < level:
            store.create_container("bench:latest")
            present += 1
        used_before = store.devices.pool_usage().used_data
        lat = []
        created = []
        for _ in range(args.samples):
            t0 = time.perf_counter()
            cid = store.create_container("bench:latest")
            store.mount_container(cid)
            lat.append(time.perf_counter() - t0)
            store.unmount_container(cid)
            created.append(cid)
        per_container = (store.devices.pool_usage().used_data - used_before) * bs / args.samples
        rows.append((level, statistics.median(lat) * 1000, pct(lat, 99) * 1000, per_container / 1024))
        for cid in created:
            store.remove_container(cid)
    print()
    print(f"{'containers present':>18} {'create+mount p50 ms':>20} {'p99 ms':>8} {'data KiB/container':>19}")
    for level, p50, p99, kib in rows:
        print(f"{level:>18} {p50:>20.1f} {p99:>8.1f} {kib:>19.0f}")
    store.devices.shutdown()
    store.close()
    if args.plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(no matplotlib: no plot)")
            return
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = [str(r[0]) for r in rows]
        ax.bar([x + " p50" for x in xs], [r[1] for r in rows])
        ax.bar([x + " p99" for x in xs], [r[2] for r in rows])
        ax.set_ylabel("create + mount, ms")
        ax.set_xlabel("containers present")
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
