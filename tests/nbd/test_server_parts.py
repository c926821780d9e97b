"""Server pieces without a client: scatter-gather sends that stop short, the buffer pool, registries."""

from __future__ import annotations

import pytest
from nbd_memory import MemoryExport

from devmapper.errors import DevmapperError
from devmapper.nbd import server as srv


class ShortSocket:
    """sendmsg that accepts at most ``limit`` bytes per call (and records what it got)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.calls = 0

    def sendmsg(self, bufs: list[bytes | bytearray | memoryview]) -> int:
        self.calls += 1
        assert len(bufs) <= srv.IOV_MAX
        joined = b"".join(bytes(b) for b in bufs)[: self.limit]
        self.data += joined
        return len(joined)


@pytest.mark.parametrize("limit", [1, 7, 100, 1 << 20])
def test_sendv_resumes_after_short_sends(limit: int) -> None:
    bufs: list[bytes | bytearray | memoryview] = [b"head", bytearray(b"x" * 300), memoryview(b"tail"), b"", b"end"]
    sock = ShortSocket(limit)
    srv._sendv(sock, list(bufs))  # type: ignore[arg-type]
    assert bytes(sock.data) == b"".join(bytes(b) for b in bufs)


def test_sendv_splits_at_iov_max() -> None:
    bufs: list[bytes | bytearray | memoryview] = [bytes([i % 256]) for i in range(3000)]
    sock = ShortSocket(1 << 30)
    srv._sendv(sock, bufs)  # type: ignore[arg-type]
    assert bytes(sock.data) == b"".join(bytes(b) for b in bufs)
    assert sock.calls == 3


def test_buffer_pool_reuses_large_buffers_only() -> None:
    pool = srv._BufferPool()
    big = pool.get(1 << 20)
    pool.put(big)
    assert pool.get(1 << 20) is big
    small = pool.get(4096)
    pool.put(small)
    assert pool.get(4096) is not small
    for _ in range(100):  # the pool keeps at most MAX_BYTES
        pool.put(bytearray(1 << 20))
    assert pool._bytes <= srv._BufferPool.MAX_BYTES


def test_registries_mapping_callable_and_object() -> None:
    a, b = MemoryExport(4096, "a"), MemoryExport(8192, "b")

    class Registry:
        def lookup(self, name: str) -> MemoryExport | None:
            return {"a": a}.get(name)

        def list(self) -> list[str]:
            return ["a"]

    for exports in ({"a": a, "b": b}, lambda: {"a": a, "b": b}, Registry()):
        server = srv.NbdServer(exports)
        assert server.resolve("a") == ("a", a)
        assert server.resolve("zzz") is None
    assert srv.NbdServer({"a": a}).resolve("") == ("a", a)  # the only export is the default
    assert srv.NbdServer({"a": a, "b": b}).resolve("") is None
    assert srv.NbdServer({"a": a, "b": b}, default_export="b").resolve("") == ("b", b)


def test_info_reflects_the_export_and_server_options() -> None:
    ro = MemoryExport(8192, "ro", read_only=True, description="d")
    info = srv.NbdServer({"ro": ro}, min_block=512, multi_conn=False).info("ro", ro)
    assert (info.size, info.read_only, info.description, info.min_block, info.can_multi_conn) == (
        8192, True, "d", 512, False)
    assert srv.NbdServer({}, read_only=True).info("x", MemoryExport(4096)).read_only


def test_bad_block_sizes_are_refused_up_front() -> None:
    with pytest.raises(DevmapperError):
        srv.NbdServer({}, min_block=3)


def test_serving_after_shutdown_is_refused(tmp_path: object) -> None:
    server = srv.NbdServer({})
    server.shutdown()
    assert server.wait(0)
    with pytest.raises(DevmapperError):
        server.serve_tcp("127.0.0.1", 0)


def test_unix_socket_replaces_a_stale_socket_but_not_a_live_one(tmp_path: object) -> None:
    import os
    import socket
    import tempfile

    d = tempfile.mkdtemp(prefix="nbdt-")
    path = os.path.join(d, "s")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    first = srv.NbdServer({})
    assert first.serve_unix(path) == path
    with pytest.raises(DevmapperError, match="listening"):
        srv.NbdServer({}).serve_unix(path)
    first.shutdown()
    assert not os.path.exists(path)
    os.rmdir(d)
