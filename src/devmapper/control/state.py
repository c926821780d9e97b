"""The daemon's persistent state: every device and its tables, in one JSON file.

Theory of operation
-------------------
The kernel forgets its mapped devices at reboot; our daemon must not forget them when it restarts,
even after SIGKILL.  After every change the manager hands ``save`` the whole state (names, uuids,
minors, read-only and suspended flags, live and inactive tables in canonical form, deferred-remove
flags, autoextend policies and counters).  ``save`` writes a temporary file, fsyncs it, renames it
over ``devices.json`` and fsyncs the directory, so the file on disk is always either the previous or
the new state, never a mixture.  Pool *contents* are not here: each pool's metadata is its own
crash-safe store, reopened when its table is restored.

``load`` returns the saved state, or an empty one if there is none; a file that does not parse is
kept aside as ``devices.json.corrupt`` and the daemon starts empty (logged), so one bad write can
never stop the daemon from starting.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from devmapper.control.files import replace_file

log = logging.getLogger(__name__)

__all__ = ["STATE_VERSION", "StateStore"]

STATE_VERSION = 1
STATE_FILE = "devices.json"


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE

    def load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"version": STATE_VERSION, "devices": []}
        try:
            state = json.loads(text)
            if not isinstance(state, dict) or not isinstance(state.get("devices"), list):
                raise ValueError("not a devmapper state object")
        except ValueError as e:
            aside = self.path.with_name(STATE_FILE + ".corrupt")
            log.error("%s: unreadable state (%s); kept as %s, starting empty", self.path, e, aside)
            os.replace(self.path, aside)
            return {"version": STATE_VERSION, "devices": []}
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Atomically replace the state file (temp + fsync + rename + directory fsync)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        replace_file(self.path, json.dumps(state, indent=1, sort_keys=True).encode(), 0o600,
                     tmp_prefix=f".{STATE_FILE}.tmp-")
