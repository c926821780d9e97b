"""``devmapper layers`` as a user runs it: help, option errors, the image/container cycle, rescue read-only."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from devmapper.cli.main import main
from helpers.images import layer_tars, write_docker_save
from helpers.stack import SMALL, Stack


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), out, err)
    return rc, out.getvalue(), err.getvalue()


def test_help_lists_every_subcommand() -> None:
    proc = subprocess.run([sys.executable, "-m", "devmapper.cli.main", "layers", "--help"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0
    for cmd in ("init", "info", "import", "images", "rmi", "create", "ps", "mount", "unmount", "diff", "export",
                "commit", "grow", "rm", "devices", "export-device", "reconcile", "shutdown"):
        assert cmd in proc.stdout


def test_unknown_storage_option_is_refused_like_docker(tmp_path: Path) -> None:
    rc, _out, err = _run("layers", "--root", str(tmp_path / "docker"), "--storage-opt", "dm.bogus=1", "info")
    assert rc == 1
    assert "devmapper: Unknown option dm.bogus" in err
    assert not (tmp_path / "docker").exists()  # nothing created


def test_min_free_space_without_percent_is_refused(tmp_path: Path) -> None:
    rc, _out, err = _run("layers", "--root", str(tmp_path / "d"), "--storage-opt", "dm.min_free_space=10", "info")
    assert rc == 1 and "min_free_space" in err


class Cli:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def __call__(self, *args: str, check: bool = True, read_only: bool = False) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "devmapper.cli.main", "layers", "--root", str(self.stack.root),
                "--runtime-dir", str(self.stack.runtime)]
        if read_only:
            argv.append("--read-only")
        proc = subprocess.run([*argv, *args], capture_output=True, text=True, check=False,
                              env={**os.environ, **self.stack.rig.udm.env})
        if check:
            assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
        return proc


def test_image_and_container_cycle_through_the_cli(stack: Stack, tmp_path: Path) -> None:
    cli = Cli(stack)
    cli("init", *[f"--storage-opt={o}" for o in SMALL])  # saved for later commands
    archive = tmp_path / "image.tar"
    write_docker_save(archive, layer_tars(tmp_path / "layers"), ["busybox:cli"])
    assert "Loaded image: busybox:cli" in cli("import", str(archive)).stdout
    assert "busybox:cli" in cli("images").stdout
    cid = cli("create", "busybox:cli", "--size", "512M").stdout.strip()
    assert len(cid) == 64
    rootfs = Path(cli("mount", cid[:12]).stdout.strip())
    assert (rootfs / "bin/busybox").is_file()
    (rootfs / "hello").write_text("hi\n")
    assert os.statvfs(rootfs).f_blocks * os.statvfs(rootfs).f_frsize > 400 << 20  # the 512M size took
    assert cli("mount", cid).stdout.strip() == str(rootfs)  # second reference
    assert "      2" in cli("ps").stdout
    cli("unmount", cid)
    assert rootfs.is_dir()  # still mounted: one reference left
    cli("unmount", cid)
    assert not rootfs.exists()
    diff = tmp_path / "diff.tar"
    cli("diff", cid, "-o", str(diff))
    with tarfile.open(diff) as tar:
        assert "hello" in tar.getnames()
    info = cli("info").stdout
    assert "Pool Name: docker-" in info and "Base Device Size: 268.4MB" in info
    busy = cli("rmi", "busybox:cli", check=False)
    assert busy.returncode == 1 and "being used by container" in busy.stderr
    cli("rm", cid)
    cli("rmi", "busybox:cli")
    assert "clean" in cli("reconcile").stdout
    devices = cli("devices").stdout
    assert devices.splitlines()[1].startswith("base")
    # rescue: shut the store down (pool removed, as dockerd's exit), then open it read-only
    cli("shutdown")
    listing = cli("devices", read_only=True).stdout
    assert "base" in listing
    out = tmp_path / "base.tar"
    cli("export-device", "base", "-o", str(out), read_only=True)
    with tarfile.open(out) as tar:
        assert tar.getnames() == []  # the base device's rootfs directory does not even exist: empty tree
    refused = cli("create", "busybox:cli", read_only=True, check=False)
    assert refused.returncode == 1
