"""The FUSE + loop test rig: a daemon with device files, and teardown that undoes everything.

``Rig`` starts a daemon with device files (and loop devices plus mapper links in ``mapper_dir``),
makes backing sparse files behind loop devices, and mounts filesystems.  Teardown runs even when a
test fails: unmount every filesystem it mounted (lazily if busy), stop the daemon (SIGTERM, then
SIGKILL), lazily unmount the FUSE directory, detach every loop device backed by a file of this test,
and remove the mapper links it left.  Everything skips with the reason unless we are root with
``/dev/fuse``, ``fusermount3``, a working ``losetup`` and mfusepy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.support import Udm, losetup_works


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "device files with loop devices need root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"mfusepy cannot load libfuse3: {e}"
    if not losetup_works():
        return "losetup cannot attach loop devices here"
    return None


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


class Rig:
    def __init__(self, tmp: Path, state: Path, mapper_dir: Path) -> None:
        self.tmp = tmp
        self.udm = Udm(state)
        self.mapper_dir = mapper_dir
        self.mounts: list[Path] = []
        self.loops: list[str] = []
        self.links: set[str] = set()

    @property
    def files(self) -> Path:
        return self.udm.runtime / "devices"

    def start(self) -> None:
        self.udm.start("--mapper-dir", str(self.mapper_dir), device_files=True)

    def dev(self, name: str) -> str:
        self.links.add(name)
        return str(self.mapper_dir / name)

    def ref(self, name: str) -> str:
        """How udmsetup commands and tables name a device: ``/dev/mapper/NAME``, or the bare name when
        the links go elsewhere (udmsetup knows only the real mapper directory)."""
        return f"/dev/mapper/{name}" if self.mapper_dir == Path("/dev/mapper") else name

    def sparse_loop(self, name: str, size: int) -> str:
        path = self.tmp / name
        with open(path, "wb") as f:
            f.truncate(size)
        loop = run("losetup", "-f", "--show", str(path)).stdout.strip()
        self.loops.append(loop)
        return loop

    def mount(self, device: str, name: str, *options: str) -> Path:
        where = self.tmp / "mnt" / name
        where.mkdir(parents=True, exist_ok=True)
        run("mount", *options, device, str(where))
        self.mounts.append(where)
        return where

    def umount(self, where: Path) -> None:
        run("umount", str(where))
        self.mounts.remove(where)

    def stop_daemon(self) -> None:
        self.udm.stop()

    def cleanup(self) -> None:
        for where in reversed(self.mounts):
            if run("umount", str(where), check=False).returncode != 0:
                run("umount", "-l", str(where), check=False)
        self.mounts.clear()
        pid = self.udm.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, AssertionError):
                os.kill(pid, signal.SIGTERM)
                for proc in self.udm.procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=30)
        ours = str(self.files) + "/"
        listing = run("losetup", "-l", "-n", "--raw", "-O", "NAME,BACK-FILE", check=False).stdout
        for line in listing.splitlines():
            loop, _, back = line.partition(" ")
            if back.startswith(ours):
                run("losetup", "-d", loop, check=False)
        for name in self.links:
            link = self.mapper_dir / name
            if link.is_symlink():
                link.unlink()
        try:
            self.udm.cleanup()  # kills what is left, unmounts the FUSE directory, checks the log
        finally:
            for loop in self.loops:
                run("losetup", "-d", loop, check=False)


@pytest.fixture(name="rig")
def rig_fixture(_hermetic_environment: Path, tmp_path: Path) -> Iterator[Rig]:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    r = Rig(tmp_path, _hermetic_environment, tmp_path / "mapper")
    try:
        yield r
    finally:
        r.cleanup()


@pytest.fixture(name="rig_dev_mapper")
def rig_dev_mapper_fixture(_hermetic_environment: Path, tmp_path: Path) -> Iterator[Rig]:
    """Like ``rig`` but with the real ``/dev/mapper`` (tests use names unique to the process)."""
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    r = Rig(tmp_path, _hermetic_environment, Path("/dev/mapper"))
    try:
        yield r
    finally:
        r.cleanup()
