"""The external-tool helpers: find sbin tools off PATH, skip with a reason, show output on failure."""

from __future__ import annotations

import pytest

from helpers.tools import ToolFailed, find_tool, require_tool, run_tool


def test_missing_tool_skips_with_its_name() -> None:
    with pytest.raises(pytest.skip.Exception, match="no-such-tool-xyz"):
        require_tool("no-such-tool-xyz")


def test_sbin_tools_are_found_without_sbin_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    path = require_tool("thin_check")  # skips on a machine without thin-provisioning-tools
    assert path.endswith("/thin_check")


def test_too_old_tool_skips_with_both_versions() -> None:
    require_tool("thin_check")
    with pytest.raises(pytest.skip.Exception, match=r"need >= 999\.0"):
        require_tool("thin_check", min_version=(999, 0))


def test_run_tool_returns_text_output() -> None:
    proc = run_tool(["sh", "-c", "echo out; echo err >&2"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "out\n", "err\n")


def test_run_tool_failure_shows_output() -> None:
    with pytest.raises(ToolFailed, match=r"(?s)status 3.*boom"):
        run_tool(["sh", "-c", "echo boom >&2; exit 3"])
    assert run_tool(["sh", "-c", "exit 3"], check=False).returncode == 3


def test_find_tool_returns_none_when_absent() -> None:
    assert find_tool("no-such-tool-xyz") is None
