"""A progress bar on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``update(done, total)`` redraws at most ten times a second; ``close()`` ends the line."""

    def __init__(self, title: str, stream: TextIO | None = None, width: int = 40) -> None:
        self.title = title
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.width = width
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        frac = 0.0 if total <= 0 else min(1.0, done / total)
        filled = int(frac * self.width)
        bar = "=" * filled + ">" * (filled < self.width) + " " * (self.width - filled - 1)
        self.stream.write(f"\r{self.title} [{bar}] {frac * 100:5.1f}%")
        self.stream.flush()
        self._drawn = True

    def stage(self, name: str, done: int, total: int) -> None:
        self.title = name
        self.update(done, total)

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
