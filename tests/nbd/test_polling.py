"""Polling for a busy client's next request: the rules (a lone connection whose requests come in
time polls; a late request, a busy worker or a second busy connection stop it) and a real server
polling or not, as seen by its calls to ``sched_yield`` between tries."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from nbd_memory import MemoryExport

from conftest import Serve
from devmapper.cli.main import main as cli_main
from devmapper.errors import DevmapperError
from devmapper.nbd import server as nbd_server
from devmapper.nbd.server import POLL_QUIET, NbdServer, _Polling

WINDOW = 50e-6


def test_a_lone_connection_polls_while_its_requests_come_in_time() -> None:
    polling = _Polling(WINDOW)
    assert polling.received(1, waited=10e-6, now=1.0)
    assert polling.may_poll(prompt=True, busy=False, now=1.0001)
    assert polling.received(1, waited=WINDOW, now=1.0002)
    assert not polling.received(1, waited=2 * WINDOW, now=1.0003)  # late: sleep next time
    assert not polling.may_poll(prompt=False, busy=False, now=1.0004)
    assert not polling.may_poll(prompt=True, busy=True, now=1.0004)  # a worker is busy


def test_two_connections_receiving_in_turn_stop_polling_for_a_while() -> None:
    polling = _Polling(WINDOW)
    polling.received(1, waited=10e-6, now=1.0)
    polling.received(2, waited=10e-6, now=1.0001)
    assert not polling.may_poll(prompt=True, busy=False, now=1.0002)
    assert not polling.may_poll(prompt=True, busy=False, now=1.0001 + POLL_QUIET / 2)
    assert polling.may_poll(prompt=True, busy=False, now=1.0001 + 2 * POLL_QUIET)
    polling.received(2, waited=10e-6, now=2.0)  # the same connection again: no new quiet time
    assert polling.may_poll(prompt=True, busy=False, now=2.0001)


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(DevmapperError, match="negative"):
        NbdServer({}, poll=-1e-6)


@pytest.fixture
def yields(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the server's ``sched_yield`` calls: one per unsuccessful try while polling."""
    count = [0]
    real: Callable[[], None] = os.sched_yield

    def counting() -> None:
        count[0] += 1
        real()

    monkeypatch.setattr(nbd_server.os, "sched_yield", counting)
    return count


def _client(path: str) -> Any:
    nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    h = nbd.NBD()
    h.set_export_name("mem")
    h.connect_unix(path)
    return h


@pytest.mark.parametrize("poll", [0.5, 0.0])
def test_a_lone_busy_client_is_polled_for_unless_polling_is_off(serve: Serve, yields: list[int], poll: float) -> None:
    export = MemoryExport(1 << 20)
    _server, path = serve({"mem": export}, poll=poll)
    h = _client(path)
    h.pwrite(b"a" * 4096, 0)
    assert h.pread(4096, 0) == b"a" * 4096  # came in time: the reader polls for the next one
    time.sleep(0.05)  # ... which comes 50 ms later, within the half-second window
    assert h.pread(4096, 0) == b"a" * 4096
    h.shutdown()
    assert (yields[0] > 0) == (poll > 0)


def test_a_second_busy_connection_stops_polling(
    serve: Serve, yields: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nbd_server, "POLL_QUIET", 30.0)
    export = MemoryExport(1 << 20)
    _server, path = serve({"mem": export}, poll=0.5)
    a, b = _client(path), _client(path)
    a.pread(4096, 0)
    b.pread(4096, 0)  # two connections received in turn: nobody polls for POLL_QUIET
    yields[0] = 0
    a.pread(4096, 0)
    time.sleep(0.05)
    a.pread(4096, 0)
    a.shutdown()
    b.shutdown()
    assert yields[0] == 0


@pytest.mark.parametrize("value", ["-1", "x", "2000000"])
def test_the_cli_refuses_a_bad_polling_time(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["nbd", "--file", "/dev/null", "--socket", "/nonexistent/s", "--poll-us", value])
    assert exit_info.value.code == 2
    assert "polling time" in capsys.readouterr().err
