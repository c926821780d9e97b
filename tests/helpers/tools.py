"""Find and run external tools (thin-provisioning-tools, nbd and qemu utilities) from tests.

Tests that need a tool call ``require_tool(name)``, which skips the test with a precise
reason when the tool is missing or too old.  The sbin directories are searched explicitly
because thin_check and friends live in /usr/sbin, which is often not on a non-root PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence

import pytest

SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

_VERSION_RE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


class ToolFailed(subprocess.CalledProcessError):
    """A tool exited non-zero; unlike CalledProcessError, str() shows its output."""

    def __str__(self) -> str:
        return (
            f"{self.cmd!r} exited with status {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


def find_tool(name: str) -> str | None:
    """Return the absolute path of ``name`` on PATH or in the sbin directories, else None."""
    found = shutil.which(name)
    if found is not None:
        return found
    return shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def tool_version(path: str) -> tuple[int, ...] | None:
    """Return the first ``x.y[.z]`` printed by ``path --version``, or None if there is none."""
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION_RE.search(proc.stdout + proc.stderr)
    if match is None:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def require_tool(name: str, min_version: tuple[int, ...] | None = None) -> str:
    """Return the path of tool ``name``; skip the calling test if it is absent or too old."""
    path = find_tool(name)
    if path is None:
        pytest.skip(f"tool {name!r} not found on PATH or in {', '.join(SBIN_DIRS)}")
    if min_version is not None:
        have = tool_version(path)
        want = ".".join(map(str, min_version))
        if have is None:
            pytest.skip(f"tool {name!r} ({path}): cannot tell its version; need >= {want}")
        if have < min_version:
            pytest.skip(f"tool {name!r} ({path}) is version {'.'.join(map(str, have))}; need >= {want}")
    return path


def run_tool(
    args: Sequence[str],
    check: bool = True,
    *,
    input: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run a tool (``args[0]`` found as by ``require_tool``) and return its text output.

    Skips the test if the tool is missing.  With ``check`` a non-zero exit raises
    ``ToolFailed`` showing stdout and stderr.  The C locale keeps output stable.
    """
    if not args:
        raise ValueError("run_tool: empty command")
    cmd = [require_tool(args[0]), *args[1:]]
    env = dict(os.environ, LC_ALL="C")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, input=input, cwd=cwd, env=env, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise ToolFailed(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def run_tools(*cmds: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run tools concurrently (each thin_* run spends ~30 ms tearing down its AIO context)."""
    env = dict(os.environ, LC_ALL="C")
    procs = [
        (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        for cmd in cmds
    ]
    out = []
    for cmd, p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return out
