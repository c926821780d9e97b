"""Test-wide hermeticity and Hypothesis profiles.

Every test runs with no inherited ``DEVMAPPER_*`` variables and with
``DEVMAPPER_STATE_DIR`` pointing at a fresh temporary directory, so no test can see or
change a developer's real state.  Hypothesis uses the deterministic "ci" profile unless
``HYPOTHESIS_PROFILE`` names another ("dev" for more, randomised examples).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=50,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _hermetic_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Scrub DEVMAPPER_* variables and point DEVMAPPER_STATE_DIR at a per-test directory."""
    for name in list(os.environ):
        if name.startswith("DEVMAPPER_"):
            monkeypatch.delenv(name)
    state_dir = tmp_path / "devmapper-state"
    state_dir.mkdir()
    monkeypatch.setenv("DEVMAPPER_STATE_DIR", str(state_dir))
    yield state_dir
