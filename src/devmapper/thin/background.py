"""The pool's two background threads: the periodic committer and the event dispatcher.

* ``PeriodicCommitter`` mirrors the kernel's ``do_waker``/``COMMIT_PERIOD``: once something changed,
  a commit follows at most ``period`` seconds (1 s) after the *first* change since the last commit.
  The pool marks it dirty on every metadata change and clean after every commit; while clean the
  thread sleeps without a timeout, so an idle pool writes nothing.
* ``EventDispatcher`` stands in for ``dm_table_event``: the kernel only says "something happened,
  read the status"; here the callback also gets the reason.  Callbacks run on their own thread, in
  order, with no pool lock held, so a callback may grow the pool (the dmeventd pattern).

Both threads are daemons, and ``stop`` joins them unless called from the thread itself.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class PoolEvent(enum.Enum):
    """Why the pool raised a table event."""

    LOW_WATER_MARK = "low_water_mark"  # free data blocks <= low_water_mark (once until resume)
    METADATA_LOW_WATER_MARK = "metadata_low_water_mark"  # free metadata blocks crossed the threshold
    MODE_CHANGED = "mode_changed"  # rw / out_of_data_space / ro / fail (see status)
    NO_SPACE_TIMEOUT = "no_space_timeout"  # queued writes timed out: the pool now errors them


class PeriodicCommitter:
    def __init__(self, commit: Callable[[], None], period: float, name: str) -> None:
        self._commit = commit
        self.period = period
        self._cond = threading.Condition()
        self._dirty_since: float | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-commit", daemon=True)
        self._thread.start()

    def mark_dirty(self) -> None:
        """Note a change; the first one after a commit starts the clock."""
        if self._dirty_since is not None:
            return
        with self._cond:
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()
                self._cond.notify()

    def clean(self) -> None:
        with self._cond:
            self._dirty_since = None

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _next_due(self) -> bool:
        """Wait until a commit is due (True) or the committer stops (False)."""
        with self._cond:
            while not self._stopping:
                if self._dirty_since is None:
                    self._cond.wait()
                    continue
                delay = self._dirty_since + self.period - time.monotonic()
                if delay <= 0:
                    self._dirty_since = None
                    return True
                self._cond.wait(delay)
            return False

    def _run(self) -> None:
        while self._next_due():
            try:
                self._commit()
            except Exception:  # the pool has already changed mode and logged; keep the thread alive
                log.exception("periodic commit failed")


class EventDispatcher:
    def __init__(self, callback: Callable[[PoolEvent], None] | None, name: str) -> None:
        self._callback = callback
        self._queue: queue.SimpleQueue[PoolEvent | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if callback is not None:
            self._thread = threading.Thread(target=self._run, name=f"{name}-events", daemon=True)
            self._thread.start()

    def post(self, event: PoolEvent) -> None:
        if self._thread is not None:
            self._queue.put(event)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        assert self._callback is not None
        while (event := self._queue.get()) is not None:
            try:
                self._callback(event)
            except Exception:
                log.exception("pool event callback failed on %s", event.value)
