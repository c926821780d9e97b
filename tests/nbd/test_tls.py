"""TLS: STARTTLS in the sans-IO core (off, on, require), then the server against real clients
(python3-libnbd, nbdinfo, qemu-img/qemu-io) with certificates made by openssl for the test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nbd_wire as wire
import pytest
from nbd_memory import MemoryExport

from conftest import Serve
from devmapper.errors import DevmapperError
from devmapper.nbd import protocol as p
from devmapper.nbd.protocol import Opt, Rep
from devmapper.nbd.tls import server_context

MiB = 1 << 20
GREETING_LEN = 18


def _handshake(tls: str, body: bytes) -> tuple[p.ServerConnection, list[wire.OptReply], list[object]]:
    conn = p.ServerConnection(tls=tls)
    conn.receive_data(wire.client_flags(3) + body)
    events: list[object] = []
    while True:
        ev = conn.next_event()
        if ev is p.NEED_DATA or isinstance(ev, (p.StartTLS, p.Disconnect)):
            if ev is not p.NEED_DATA:
                events.append(ev)
            break
        events.append(ev)
        if isinstance(ev, p.ExportQuery):
            conn.answer_export(p.ExportInfo(ev.name, MiB))
    out = conn.data_to_send()[GREETING_LEN:]
    return conn, wire.parse_option_replies(out) if out else [], events


# -- sans-IO ----------------------------------------------------------------------------------------


def test_starttls_is_refused_when_tls_is_off() -> None:
    conn, replies, events = _handshake(p.TLS_OFF, wire.option(Opt.STARTTLS))
    assert [(r.option, r.type) for r in replies] == [(Opt.STARTTLS, Rep.ERR_UNSUP)]
    assert events == [] and conn.state is p.State.OPTIONS


def test_starttls_then_options_go_on_and_clear_text_negotiation_is_forgotten() -> None:
    conn, replies, events = _handshake(p.TLS_ON, wire.option(Opt.STRUCTURED_REPLY) + wire.option(Opt.STARTTLS))
    assert [(r.option, r.type) for r in replies] == [(Opt.STRUCTURED_REPLY, Rep.ACK), (Opt.STARTTLS, Rep.ACK)]
    assert events == [p.StartTLS()] and conn.state is p.State.TLS and conn.structured
    with pytest.raises(p.LocalProtocolError):
        conn.next_event()  # nothing may be parsed before the handshake
    conn.tls_started()
    assert conn.tls_active and not conn.structured and conn.state is p.State.OPTIONS
    conn.receive_data(wire.option(Opt.STARTTLS) + wire.info_go(Opt.GO, "disk"))
    ev = conn.next_event()
    replies = wire.parse_option_replies(conn.data_to_send())
    assert [(r.option, r.type) for r in replies] == [(Opt.STARTTLS, Rep.ERR_INVALID)]
    assert isinstance(ev, p.ExportQuery) and ev.option == Opt.GO
    conn.answer_export(p.ExportInfo("disk", MiB))
    assert conn.state is p.State.TRANSMISSION


def test_tls_on_still_serves_clear_text_clients() -> None:
    conn, _replies, events = _handshake(p.TLS_ON, wire.info_go(Opt.GO, "disk"))
    assert isinstance(events[0], p.ExportQuery) and conn.state is p.State.TRANSMISSION


@pytest.mark.parametrize(
    "opt", [wire.option(Opt.LIST), wire.info_go(Opt.INFO, "disk"), wire.info_go(Opt.GO, "disk"),
            wire.option(Opt.STRUCTURED_REPLY), wire.meta(Opt.LIST_META_CONTEXT, "disk", ("base:",))],
    ids=["list", "info", "go", "structured_reply", "list_meta_context"],
)
def test_require_refuses_options_before_tls(opt: bytes) -> None:
    conn, replies, events = _handshake(p.TLS_REQUIRE, opt)
    assert [r.type for r in replies] == [Rep.ERR_TLS_REQD]
    assert events == [] and conn.state is p.State.OPTIONS and not conn.structured


def test_require_ends_the_session_on_export_name_and_allows_abort() -> None:
    conn, replies, events = _handshake(p.TLS_REQUIRE, wire.option(Opt.EXPORT_NAME, b"disk"))
    assert replies == [] and conn.state is p.State.DONE and isinstance(events[-1], p.Disconnect)
    conn, replies, events = _handshake(p.TLS_REQUIRE, wire.option(Opt.ABORT))
    assert [(r.option, r.type) for r in replies] == [(Opt.ABORT, Rep.ACK)] and conn.state is p.State.DONE


def test_bytes_sent_after_starttls_before_the_handshake_break_the_protocol() -> None:
    conn = p.ServerConnection(tls=p.TLS_ON)
    conn.receive_data(wire.client_flags(3) + wire.option(Opt.STARTTLS) + wire.option(Opt.LIST))
    with pytest.raises(p.RemoteProtocolError):
        conn.next_event()
    assert conn.state is p.State.ERROR


def test_bad_policy_and_starttls_with_data() -> None:
    with pytest.raises(p.LocalProtocolError):
        p.ServerConnection(tls="sometimes")
    _conn, replies, _ = _handshake(p.TLS_ON, wire.option(Opt.STARTTLS, b"x"))
    assert [r.type for r in replies] == [Rep.ERR_INVALID]


# -- real clients -----------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost and a client certificate, in the directory layout
    nbdkit, qemu and libnbd share (one directory serves both ends here)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make test certificates)")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
             "-days", "30", "-subj", "/CN=devmapper test CA", cwd=d)
    for who, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                     ("client", "extendedKeyUsage=clientAuth\n")):
        (d / f"{who}.ext").write_text(ext)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}-key.pem", "-out", f"{who}.csr",
                 "-subj", f"/CN={'localhost' if who == 'server' else 'client'}", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                 "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "30", "-extfile", f"{who}.ext", cwd=d)
    return d


def test_server_context_names_a_missing_file(tmp_path: Path, pki: Path) -> None:
    with pytest.raises(DevmapperError, match=r"server-cert\.pem"):
        server_context(tmp_path)
    (tmp_path / "server-cert.pem").write_bytes((pki / "server-cert.pem").read_bytes())
    (tmp_path / "server-key.pem").write_bytes((pki / "server-key.pem").read_bytes())
    server_context(tmp_path)
    with pytest.raises(DevmapperError, match=r"ca-cert\.pem"):
        server_context(tmp_path, verify_peer=True)
    (tmp_path / "server-key.pem").write_text("not a key")
    with pytest.raises(DevmapperError, match="cannot load"):
        server_context(tmp_path)


def test_libnbd_over_tls_with_workers_configured(serve: Serve, pki: Path) -> None:
    nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    disk = MemoryExport(4 * MiB, "disk")
    _server, path = serve({"disk": disk}, tls=server_context(pki, verify_peer=True), tls_required=True, workers=4)
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(pki))
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_export_name("disk")
    h.connect_unix(path)
    assert h.get_tls_negotiated() and h.get_structured_replies_negotiated()
    data = bytes(range(256)) * 1024
    h.pwrite(data, MiB, nbd.CMD_FLAG_FUA)
    reads = [nbd.Buffer(len(data)) for _ in range(8)]
    cookies = [h.aio_pread(b, MiB) for b in reads]  # pipelined through the TLS session
    while h.aio_in_flight():
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    assert all(b.to_bytearray() == data for b in reads)
    assert h.pread(len(data), MiB) == data and bytes(disk.data[MiB : MiB + len(data)]) == data
    h.flush()
    h.shutdown()


def test_clear_text_clients_are_refused_when_tls_is_required(serve: Serve, pki: Path) -> None:
    nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    _server, path = serve({"disk": MemoryExport(MiB, "disk")}, tls=server_context(pki), tls_required=True)
    h = nbd.NBD()
    h.set_export_name("disk")
    with pytest.raises(nbd.Error):
        h.connect_unix(path)


def test_verify_peer_refuses_a_client_without_a_certificate(serve: Serve, pki: Path, tmp_path: Path) -> None:
    nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    _server, path = serve({"disk": MemoryExport(MiB, "disk")}, tls=server_context(pki, verify_peer=True))
    (tmp_path / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())  # no client certificate
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(tmp_path))
    h.set_export_name("disk")
    with pytest.raises(nbd.Error):
        h.connect_unix(path)


def test_nbdinfo_and_qemu_over_tls(serve: Serve, pki: Path) -> None:
    for tool in ("nbdinfo", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    disk = MemoryExport(8 * MiB, "disk")
    _server, path = serve({"disk": disk}, tls=server_context(pki), tls_required=True)
    info = subprocess.run(["nbdinfo", f"nbds+unix:///disk?socket={path}&tls-certificates={pki}"],
                          capture_output=True, text=True, check=True).stdout
    assert "with TLS" in info and "export-size: 8388608" in info
    creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={pki}"
    image = f"driver=nbd,path={path},export=disk,tls-creds=tls0,tls-hostname=localhost"
    run = subprocess.run(["qemu-io", "--object", creds, "--image-opts", image,
                          "-c", "write -P 0x5a 1M 3M", "-c", "read -P 0x5a 1M 3M"],
                         capture_output=True, text=True, check=True)
    assert "Pattern verification failed" not in run.stdout + run.stderr
    assert bytes(disk.data[MiB : 4 * MiB]) == b"\x5a" * (3 * MiB)


def test_the_daemon_serves_its_devices_over_tls(pki: Path, tmp_path: Path) -> None:
    if shutil.which("nbdinfo") is None:
        pytest.skip("nbdinfo is not installed")
    from control.support import Udm

    udm = Udm(tmp_path / "state")
    try:
        udm.start("--nbd-tls", "require", "--nbd-tls-certificates", str(pki))
        udm.ok("create", "z", "--table", "0 2048 zero")
        sock = udm.runtime / "nbd.sock"
        info = subprocess.run(["nbdinfo", f"nbds+unix:///z?socket={sock}&tls-certificates={pki}"],
                              capture_output=True, text=True, check=True).stdout
        assert "with TLS" in info and "export-size: 1048576" in info
        plain = subprocess.run(["nbdinfo", f"nbd+unix:///z?socket={sock}"], capture_output=True, text=True)
        assert plain.returncode != 0
    finally:
        udm.cleanup()


def test_the_daemon_refuses_tls_without_certificates(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "devmapper.cli.main", "daemon", "--no-device-files", "--runtime-dir",
         str(tmp_path / "run"), "--state-dir", str(tmp_path / "state"), "--nbd-tls", "on"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "LANG": "C"},
    )
    assert run.returncode == 2 and "--nbd-tls-certificates" in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "devmapper.cli.main", "daemon", "--no-device-files", "--runtime-dir",
         str(tmp_path / "run"), "--state-dir", str(tmp_path / "state"), "--nbd-tls", "on",
         "--nbd-tls-certificates", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "LANG": "C"},
    )
    assert run.returncode == 1 and "server-cert.pem" in run.stderr


def test_nbd_command_checks_its_tls_options(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    base = [sys.executable, "-m", "devmapper.cli.main", "nbd", "--file", str(disk), "--socket", str(tmp_path / "s")]
    run = subprocess.run([*base, "--tls", "require"], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "--tls-certificates" in run.stderr
    run = subprocess.run([*base, "--tls", "on", "--tls-certificates", str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0 and "server-cert.pem" in run.stderr


def test_a_broken_handshake_closes_only_that_connection(serve: Serve, pki: Path) -> None:
    _server, path = serve({"disk": MemoryExport(MiB, "disk")}, tls=server_context(pki), tls_required=True)
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(30)
    raw.connect(path)
    assert len(raw.recv(GREETING_LEN, socket.MSG_WAITALL)) == GREETING_LEN
    raw.sendall(wire.client_flags(3) + wire.option(Opt.STARTTLS))
    reply = raw.recv(20, socket.MSG_WAITALL)
    assert [(r.option, r.type) for r in wire.parse_option_replies(reply)] == [(Opt.STARTTLS, Rep.ACK)]
    raw.sendall(b"this is not a TLS client hello" * 10)
    try:
        while raw.recv(4096):  # perhaps a TLS alert, then the server hangs up
            pass
    except ConnectionResetError:
        pass
    raw.close()
    nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(pki))
    h.set_export_name("disk")
    h.connect_unix(path)  # the server still serves
    assert h.get_size() == MiB
    h.shutdown()
