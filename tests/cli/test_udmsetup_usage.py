"""udmsetup's command line: usage, version, option parsing, exit codes, and the daemon connection."""

from __future__ import annotations

import subprocess
import sys

import pytest

from control.support import Udm, udm_fixture, udm_idle_fixture  # noqa: F401 - fixtures
from devmapper import __version__
from devmapper.cli import udmsetup

COMMANDS = ["create", "remove", "remove_all", "suspend", "resume", "load", "reload", "rename", "message", "ls",
            "info", "deps", "status", "table", "wait", "mknodes", "targets", "version"]


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_every_command_on_stderr_and_exits_0(flag: str, udm_idle: Udm) -> None:
    r = udm_idle(flag)
    assert r.rc == 0 and r.out == ""
    assert r.err.startswith("Usage:\n\nudmsetup\n")
    for command in COMMANDS:
        assert f"\n\t{command} " in r.err or f"\n\t{command}\n" in r.err, command
    assert "--autoextend" in r.err


def test_help_columns_lists_the_info_fields(udm_idle: Udm) -> None:
    r = udm_idle("help", "-c")
    assert r.rc == 0 and "Device-mapper info fields" in r.err and "  segments" in r.err


def test_no_command_prints_usage_and_exits_1(udm_idle: Udm) -> None:
    r = udm_idle()
    assert r.rc == 1 and r.out == "" and r.err.startswith("Usage:")


def test_version_shows_library_and_driver(udm: Udm) -> None:
    out = udm.ok("version")
    assert out == f"Library version:   1.02.185 (devmapper {__version__})\nDriver version:    4.47.0\n"
    assert udm.ok("--version") == out


def test_targets_lists_every_target_type_with_its_version(udm: Udm) -> None:
    assert udm.ok("targets") == (
        "thin-pool        v1.23.0\nthin             v1.23.0\nzero             v1.2.0\n"
        "striped          v1.6.0\nlinear           v1.4.0\nerror            v1.6.0\n"
    )


def test_options_go_anywhere_like_getopt(udm: Udm) -> None:
    udm.ok("--table", "0 8 zero", "create", "z1")
    udm.ok("create", "z2", "--table=0 8 zero")
    udm.ok("create", "--readonly", "z3", "--table", "0 8 zero")
    assert udm.ok("ls") == "z1\t(253:0)\nz2\t(253:1)\nz3\t(253:2)\n"
    assert "State:             ACTIVE (READ-ONLY)" in udm.ok("info", "z3")


def test_without_a_daemon_and_no_autostart_it_says_so(udm_idle: Udm) -> None:
    r = udm_idle("ls")
    assert r.rc == 1
    assert "cannot connect to the devmapper daemon" in r.err
    assert r.err.endswith("Failure to communicate with the userspace device-mapper daemon.\nCommand failed.\n")


def test_starts_the_daemon_on_demand(udm_idle: Udm) -> None:
    r = udm_idle("ls", env={"DEVMAPPER_NO_AUTOSTART": ""})
    assert r.rc == 0, r.err
    assert r.out == "No devices found\n"
    assert udm_idle.pid() is not None  # cleanup() stops it
    assert (udm_idle.runtime / "control").is_socket()


def test_runs_as_a_console_script_and_a_module(udm: Udm) -> None:
    env = {**udm.env, "PATH": "/usr/bin:/bin"}
    for cmd in ([sys.executable, "-m", "devmapper.cli.udmsetup", "ls"], [sys.executable, "-c",
                "import sys; from devmapper.cli.udmsetup import main; sys.exit(main())", "ls"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "No devices found\n"


def test_main_reads_sys_argv_when_argv_is_none(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["udmsetup", "--help"])
    assert udmsetup.main() == 0
    assert capsys.readouterr().err.startswith("Usage:")
