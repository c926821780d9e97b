"""udmsetup: usage, version, and every command honestly reporting it is not implemented yet."""

from __future__ import annotations

import subprocess
import sys

import pytest

from devmapper import __version__
from devmapper.cli import udmsetup

COMMANDS = ["create", "remove", "load", "suspend", "resume", "table", "status", "message", "ls", "info"]


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_every_command_and_exits_0(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert udmsetup.main([flag]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Usage:")
    for command in COMMANDS:
        assert f"\n  {command}" in out, command
    assert "not implemented" in out
    assert err == ""


def test_version_prints_package_version_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert udmsetup.main(["--version"]) == 0
    out, err = capsys.readouterr()
    assert __version__ in out
    assert err == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_says_not_implemented_and_exits_1(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert udmsetup.main([command, "pool"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"udmsetup: {command}: the control plane is not implemented yet" in err


def test_no_arguments_prints_usage_to_stderr_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert udmsetup.main([]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("Usage:")


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["frobnicate"], "unknown command 'frobnicate'"), (["--bogus"], "unrecognised option '--bogus'")],
)
def test_unknown_input_exits_1_with_a_pointer_to_help(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert udmsetup.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err
    assert "--help" in err


def test_main_reads_sys_argv_when_argv_is_none(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["udmsetup", "--version"])
    assert udmsetup.main() == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "status"), [(["--help"], 0), (["ls"], 1)])
def test_runs_as_a_module_with_the_right_exit_status(argv: list[str], status: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "devmapper.cli.udmsetup", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == status, proc.stderr
