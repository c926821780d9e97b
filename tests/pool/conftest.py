"""Fixtures for the pool tests, and the opt-in long crash mode (``-m crash_long``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pool.support import PoolFiles, make_pool_files


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "crash_long: many-trial SIGKILL crash test; run with -m crash_long")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "crash_long" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="long crash mode: select it with -m crash_long")
    for item in items:
        if item.get_closest_marker("crash_long") is not None:
            item.add_marker(skip)


@pytest.fixture
def files(tmp_path: Path) -> Iterator[PoolFiles]:
    """A pool's metadata (4 MiB) and data (256 blocks of 64 KiB) files; checked clean at the end."""
    f = make_pool_files(tmp_path / "pool")
    yield f
