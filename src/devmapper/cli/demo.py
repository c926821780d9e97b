"""``devmapper demo``: the seed walkthrough on sparse files (filled in below)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Registered once the walkthrough exists."""
