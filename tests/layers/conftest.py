"""Fixtures for the layer-store tests: ``stack``, a daemon with device files and loop devices
(``helpers.stack``), skipped with the reason unless root with FUSE and loop devices."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse.rig import Rig, _skip_reason
from helpers.stack import Stack


@pytest.fixture(name="stack")
def stack_fixture(_hermetic_environment: Path, tmp_path: Path) -> Iterator[Stack]:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    rig = Rig(tmp_path, _hermetic_environment, tmp_path / "mapper")
    stack = Stack(rig, tmp_path)
    try:
        rig.start()
        yield stack
    finally:
        try:
            stack.cleanup()
        finally:
            rig.cleanup()
