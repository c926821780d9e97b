"""Shared helpers for control-plane and udmsetup tests: a daemon per test, udmsetup runs, backing devices.

``Udm`` owns one daemon (a ``devmapper daemon`` subprocess on a short runtime directory, state
under the test's tmp_path) and runs ``udmsetup`` in-process against it with a private environment.
Fixture teardown stops every daemon it started -- and any daemon udmsetup started on its own, found
through the runtime directory's pid file -- so no test leaves a daemon behind.

``Backing`` makes the sparse files the seeds use and, for the "loop" flavour, attaches them to loop
devices with ``losetup -f --show`` (skipped unless root and losetup works); teardown detaches them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devmapper.cli import udmsetup
from devmapper.control.client import Client
from devmapper.control.manager import DeviceManager
from devmapper.control.state import StateStore

STARTUP_TIMEOUT = 30.0


@dataclasses.dataclass
class Result:
    rc: int
    out: str
    err: str


class Udm:
    def __init__(self, state_dir: Path) -> None:
        self.runtime = Path(tempfile.mkdtemp(prefix="udm", dir="/tmp"))
        self.state = state_dir
        self.env = {
            "DEVMAPPER_RUNTIME_DIR": str(self.runtime),
            "DEVMAPPER_STATE_DIR": str(self.state),
            "DEVMAPPER_NO_AUTOSTART": "1",
            "LANG": "C",
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    # -- the daemon ------------------------------------------------------------------------------

    def start(self, *extra: str, device_files: bool = False) -> subprocess.Popen[bytes]:
        """Start the daemon; without ``device_files`` it mounts no FUSE files and makes no loop devices."""
        if not device_files:
            extra = ("--no-device-files", *extra)
        log = open(self.runtime / "daemon.log", "ab")  # noqa: SIM115 - the daemon writes it
        env = {**os.environ, **self.env}
        proc = subprocess.Popen(
            [sys.executable, "-m", "devmapper.cli.main", "daemon", "--runtime-dir", str(self.runtime),
             "--state-dir", str(self.state), "--monitor-interval", "0.2", *extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
        )
        log.close()
        self.procs.append(proc)
        self.wait_ready(proc)
        return proc

    def wait_ready(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode}:\n{self.log()}")
            try:
                with Client.open(self.runtime) as c:
                    c.call("ping")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError(f"daemon did not come up:\n{self.log()}") from None
                time.sleep(0.05)

    def log(self) -> str:
        path = self.runtime / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pid(self) -> int | None:
        try:
            return int((self.runtime / "daemon.pid").read_text())
        except (OSError, ValueError):
            return None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the running daemon and wait until it is gone."""
        pid = self.pid()
        assert pid is not None, "no daemon running"
        os.kill(pid, sig)
        for proc in self.procs:
            if proc.pid == pid:
                proc.wait(timeout=60)
                return
        _wait_gone(pid)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def cleanup(self) -> None:
        """Stop every daemon of this runtime directory; then fail if one logged a traceback."""
        log = self.log()
        pid = self.pid()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        if pid is not None and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
        fusermount = shutil.which("fusermount3")
        if fusermount is not None:  # a killed daemon's device files (stat would fail: not connected)
            subprocess.run([fusermount, "-u", "-z", "-q", str(self.runtime / "devices")], capture_output=True,
                           check=False)
        shutil.rmtree(self.runtime, ignore_errors=True)
        assert "Traceback" not in log, f"the daemon logged an unexpected exception:\n{log}"

    def client(self) -> Client:
        return Client.open(self.runtime)

    # -- udmsetup --------------------------------------------------------------------------------

    def __call__(self, *args: str, stdin: str = "", env: dict[str, str] | None = None) -> Result:
        out, err = io.StringIO(), io.StringIO()
        rc = udmsetup.main(list(args), stdin=io.StringIO(stdin), stdout=out, stderr=err,
                           env={**self.env, **(env or {})})
        return Result(rc, out.getvalue(), err.getvalue())

    def ok(self, *args: str, stdin: str = "") -> str:
        r = self(*args, stdin=stdin)
        assert r.rc == 0, f"udmsetup {' '.join(args)} failed ({r.rc}):\n{r.err}"
        return r.out

    def fails(self, *args: str, stdin: str = "") -> Result:
        r = self(*args, stdin=stdin)
        assert r.rc == 1, f"udmsetup {' '.join(args)} should fail:\n{r.out}\n{r.err}"
        assert r.err.endswith("Command failed.\n") or "Couldn't process" in r.err, r.err
        return r

    def snapshot(self) -> tuple[str, str, str]:
        """Everything a refused command must leave alone: tables, info of all devices, saved state."""
        state = (self.state / "devices.json")
        return (self.ok("table"), self.ok("info"), state.read_text() if state.exists() else "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture(name="udm")
def udm_fixture(_hermetic_environment: Path) -> Iterator[Udm]:
    """A udmsetup runner with a daemon already started."""
    u = Udm(_hermetic_environment)
    try:
        u.start()
        yield u
    finally:
        u.cleanup()


@pytest.fixture(name="udm_idle")
def udm_idle_fixture(_hermetic_environment: Path) -> Iterator[Udm]:
    """A udmsetup runner with no daemon started."""
    u = Udm(_hermetic_environment)
    try:
        yield u
    finally:
        u.cleanup()


# -- backing devices ---------------------------------------------------------------------------------


def losetup_works() -> bool:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        return False
    with tempfile.NamedTemporaryFile(dir="/tmp") as f:
        f.truncate(1 << 20)
        proc = subprocess.run(["losetup", "-f", "--show", f.name], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return False
        subprocess.run(["losetup", "-d", proc.stdout.strip()], check=False)
    return True


class Backing:
    """Sparse files, optionally behind loop devices (``path(name)`` is what a table should name)."""

    def __init__(self, directory: Path, kind: str) -> None:
        self.directory = directory
        self.kind = kind
        self.loops: dict[str, str] = {}

    def sparse(self, name: str, size: int) -> str:
        path = self.directory / name
        with open(path, "wb") as f:
            f.truncate(size)
        if self.kind == "loop":
            proc = subprocess.run(["losetup", "-f", "--show", str(path)], capture_output=True, text=True, check=True)
            self.loops[name] = proc.stdout.strip()
            return self.loops[name]
        return str(path)

    def file(self, name: str) -> Path:
        return self.directory / name

    def devno(self, name: str) -> str:
        """How ``table`` shows the device: MAJ:MIN for a loop device, the path for a file."""
        if self.kind == "loop":
            st = os.stat(self.loops[name])
            return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return str(self.directory / name)

    def cleanup(self) -> None:
        for loop in self.loops.values():
            subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)


_LOOPS_OK: bool | None = None


@pytest.fixture(name="backing", params=["file", "loop"])
def backing_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backing]:
    global _LOOPS_OK
    if request.param == "loop":
        if _LOOPS_OK is None:
            _LOOPS_OK = losetup_works()
        if not _LOOPS_OK:
            pytest.skip("loop devices need root and a working losetup")
    b = Backing(tmp_path, request.param)
    try:
        yield b
    finally:
        b.cleanup()


def sparse(path: Path, size: int) -> str:
    """A sparse file of ``size`` bytes; its path as a string (for tables)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


@pytest.fixture(name="mgr")
def mgr_fixture(tmp_path: Path) -> Iterator[DeviceManager]:
    """An in-process device manager with its state under tmp_path (no daemon, no sockets)."""
    m = DeviceManager(StateStore(tmp_path / "state"), monitor_interval=0.1)
    m.start()
    yield m
    m.shutdown()
