"""The autouse fixture in conftest.py isolates every test from the developer's environment."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import settings


def test_only_the_test_state_dir_is_set(tmp_path: Path) -> None:
    ours = {name: value for name, value in os.environ.items() if name.startswith("DEVMAPPER_")}
    assert list(ours) == ["DEVMAPPER_STATE_DIR"]
    state_dir = Path(ours["DEVMAPPER_STATE_DIR"])
    assert state_dir.is_dir()
    assert state_dir.parent == tmp_path


def test_hypothesis_profile_is_deterministic_by_default() -> None:
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        current = settings()
        assert current.derandomize
        assert current.deadline is None
        assert current.max_examples == 50
