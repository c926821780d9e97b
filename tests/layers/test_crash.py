"""SIGKILL during ``devmapper layers import``, then restart: nothing leaked, the pool's metadata checks clean."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from devmapper.layers.fs import mounts_under
from helpers.images import layer_tars, write_docker_save
from helpers.stack import SMALL, Stack


def _big_image(tmp: Path) -> Path:
    layers = layer_tars(tmp / "layers")
    bulk = tmp / "layers" / "bulk.tar"
    with tarfile.open(bulk, "w", format=tarfile.PAX_FORMAT) as tar:
        for n in range(24):
            data = os.urandom(8 << 20)
            info = tarfile.TarInfo(f"data/chunk{n:02d}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = tmp / "big.tar"
    write_docker_save(archive, [*layers, bulk], ["big:latest"])
    return archive


def _cli(stack: Stack, *args: str) -> list[str]:
    return [sys.executable, "-m", "devmapper.cli.main", "layers", "--root", str(stack.root), "--runtime-dir",
            str(stack.runtime), *[f"--storage-opt={o}" for o in SMALL], *args]


def _env(stack: Stack) -> dict[str, str]:
    return {**os.environ, **stack.rig.udm.env}


@pytest.mark.parametrize("also_daemon", [False, True], ids=["import-killed", "import-and-daemon-killed"])
def test_sigkill_during_import_leaks_nothing(stack: Stack, tmp_path: Path, also_daemon: bool) -> None:
    archive = _big_image(tmp_path)
    subprocess.run(_cli(stack, "init"), env=_env(stack), check=True, capture_output=True)
    proc = subprocess.Popen(_cli(stack, "import", str(archive)), env=_env(stack), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    tmp_sets = stack.root / "image/devicemapper/layerdb/tmp"
    mnt = stack.root / "devicemapper/mnt"
    deadline = time.monotonic() + 120
    # wait until the big layer is being written: three layers done, a write-set open, a device mounted
    while time.monotonic() < deadline and proc.poll() is None:
        layers = list((stack.root / "image/devicemapper/layerdb/sha256").glob("*"))
        writing = list(tmp_sets.glob("write-set-*")) if tmp_sets.is_dir() else []
        if len(layers) == 3 and writing and mounts_under(mnt):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.1)  # inside the 192 MiB layer
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if also_daemon:
        stack.rig.udm.kill(signal.SIGKILL)
        stack.rig.start()
    reconcile = subprocess.run(_cli(stack, "reconcile"), env=_env(stack), capture_output=True, text=True,
                               check=False)
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
    assert "clean" in reconcile.stdout
    images = subprocess.run(_cli(stack, "images"), env=_env(stack), capture_output=True, text=True, check=True)
    assert "big:latest" not in images.stdout
    with stack.store() as store:
        assert len(store.db.layers()) == 3  # the finished layers stay, the killed one is gone
        assert set(store.devices.devices) == {""} | {rec.cache_id for rec in store.db.layers()}
        assert not mounts_under(mnt)
        assert store.reconcile().clean
        store.devices.shutdown()
    stack.rig.stop_daemon()
    check = subprocess.run(["thin_check", str(stack.root / "devicemapper/devicemapper/metadata")],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    # and the import, run again, completes
    stack.rig.start()
    again = subprocess.run(_cli(stack, "import", str(archive)), env=_env(stack), capture_output=True, text=True,
                           check=False)
    assert again.returncode == 0, again.stderr
    assert "Loaded image: big:latest" in again.stdout
