"""The server against python3-libnbd: every option, every command and flag, every error, and the
connection staying usable after each error.  Runs with inline execution and with workers."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from nbd_memory import MemoryExport

from conftest import Serve

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")

MiB = 1 << 20
PATTERN = bytes(range(256)) * 16  # 4 KiB


def exports(**kw: Any) -> dict[str, MemoryExport]:
    disk = MemoryExport(4 * MiB, "disk", description="the test disk", **kw)
    ro = MemoryExport(MiB, "ro", read_only=True)
    ro.data[:4096] = PATTERN
    ro.allocated[0] = 1
    return {"disk": disk, "ro": ro}


def connect(path: str, name: str = "disk", *, meta: bool = True, strict: bool = True) -> Any:
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not strict:
        h.set_strict_mode(0)
    h.set_export_name(name)
    h.connect_unix(path)
    return h


def errnum(call: Callable[[], object]) -> int:
    with pytest.raises(nbd.Error) as info:
        call()
    return int(info.value.errnum)


@pytest.fixture(params=[0, 4], ids=["inline", "workers"])
def workers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


# -- handshake ------------------------------------------------------------------------------------


def test_options_list_info_meta_go_abort(serve: Serve) -> None:
    _server, path = serve(exports())
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_unix(path)
    assert h.aio_is_negotiating()
    assert h.get_structured_replies_negotiated()
    listed: list[tuple[str, str]] = []
    assert h.opt_list(lambda name, desc: listed.append((name, desc)) or 0) == 2
    assert listed == [("disk", "the test disk"), ("ro", "")]

    h.set_export_name("disk")
    h.opt_info()
    assert h.get_size() == 4 * MiB
    assert h.get_export_description() == "the test disk"
    assert h.get_canonical_export_name() == "disk"
    assert not h.is_read_only()
    assert not h.is_rotational()
    for can in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df", "can_cache",
                "can_multi_conn"):
        assert getattr(h, can)(), can
    assert [h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)] == [
        1, 4096, 32 * MiB]

    contexts: list[str] = []
    assert h.opt_list_meta_context(lambda name: contexts.append(name) or 0) == 1
    assert contexts == ["base:allocation"]

    h.set_export_name("ro")
    h.opt_info()
    assert h.is_read_only() and not h.can_trim() and not h.can_zero() and not h.can_fast_zero()

    h.set_export_name("nope")
    assert errnum(h.opt_info) == errno.ENOENT  # NBD_REP_ERR_UNKNOWN
    assert h.aio_is_negotiating()  # the failed option left the handshake usable

    h.set_export_name("disk")
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.opt_go()
    assert h.aio_is_ready()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h.pread(4, 0) == bytes(4)
    h.shutdown()

    h2 = nbd.NBD()
    h2.set_opt_mode(True)
    h2.connect_unix(path)
    h2.opt_abort()
    assert h2.aio_is_closed()


def test_default_export_is_the_named_default_or_the_only_one(serve: Serve) -> None:
    _server, path = serve(exports(), default_export="ro")
    h = connect(path, "")
    assert h.get_size() == MiB and h.is_read_only()
    only = {"solo": MemoryExport(8192, "solo")}
    _server, path2 = serve(only)
    assert connect(path2, "").get_size() == 8192
    _server, path3 = serve(exports())
    with pytest.raises(nbd.Error):
        connect(path3, "")  # two exports and no default


def test_unknown_export_fails_go(serve: Serve) -> None:
    _server, path = serve(exports())
    with pytest.raises(nbd.Error, match=r"(?i)unknown|not found|export"):
        connect(path, "nope")


def test_export_name_fallback_without_fixed_newstyle(serve: Serve) -> None:
    _server, path = serve(exports())
    for flags in (0, nbd.HANDSHAKE_FLAG_NO_ZEROES):
        h = nbd.NBD()
        h.set_handshake_flags(flags)
        h.set_export_name("disk")
        h.connect_unix(path)
        assert h.get_protocol() == "newstyle"
        assert not h.get_structured_replies_negotiated()
        h.pwrite(PATTERN, 4096)
        assert h.pread(4096, 4096) == PATTERN
        h.shutdown()


def test_simple_replies_when_structured_replies_are_not_requested(serve: Serve) -> None:
    _server, path = serve(exports())
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_export_name("disk")
    h.connect_unix(path)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_df() and not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.pwrite(PATTERN, 0)
    assert h.pread(4096, 0) == PATTERN
    h.set_strict_mode(0)
    assert errnum(lambda: h.pread(4096, 4 * MiB)) == errno.EINVAL
    assert h.pread(16, 0) == PATTERN[:16]


# -- commands -------------------------------------------------------------------------------------


def extents_of(h: Any, count: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []

    def cb(metacontext: str, off: int, entries: list[int], err: int) -> int:
        assert metacontext == "base:allocation" and off == offset
        got.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    h.block_status(count, offset, cb, flags)
    return got


HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO


def test_read_write_fua_flush(serve: Serve, workers: int) -> None:
    ex = exports()
    _server, path = serve(ex, workers=workers)
    h = connect(path)
    h.pwrite(PATTERN * 16, 65536)
    h.pwrite(PATTERN, 0, nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 0) == PATTERN
    assert h.pread(65536, 65536) == PATTERN * 16
    chunks: list[tuple[bytes, int, int]] = []
    data = h.pread_structured(100, 65536 + 3, lambda buf, off, st, err: chunks.append((buf, off, st)) or 0,
                              nbd.CMD_FLAG_DF)
    assert data == (PATTERN * 16)[3:103]
    assert chunks == [(data, 65536 + 3, nbd.READ_DATA)]  # DF: one content chunk
    assert ex["disk"].calls["fua"] == 1
    h.flush()
    assert ex["disk"].calls["flush"] == 1
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ZERO_SIZE)
    assert h.pread(0, 0) == b""  # zero length requests get a reply, not a disconnect
    h.pwrite(b"", 0)
    h.shutdown()


def test_trim_zero_cache_and_block_status(serve: Serve, workers: int) -> None:
    ex = exports()
    _server, path = serve(ex, workers=workers)
    h = connect(path)
    h.pwrite(PATTERN * 64, 0)  # 256 KiB allocated
    assert extents_of(h, 4 * MiB, 0) == [(256 << 10, 0), ((4 * MiB) - (256 << 10), HOLE_ZERO)]
    assert extents_of(h, 4 * MiB, 0, nbd.CMD_FLAG_REQ_ONE) == [(256 << 10, 0)]
    assert extents_of(h, 4096, 8192, nbd.CMD_FLAG_REQ_ONE) == [(4096, 0)]

    h.trim(65536, 65536)
    assert extents_of(h, 256 << 10, 0) == [(65536, 0), (65536, HOLE_ZERO), (128 << 10, 0)]
    h.zero(8192, 0)  # may punch: reads back zero, grains deallocated
    assert h.pread(8192, 0) == bytes(8192)
    assert extents_of(h, 8192, 0) == [(8192, HOLE_ZERO)]
    h.zero(8192, 0, nbd.CMD_FLAG_NO_HOLE)  # must allocate
    assert extents_of(h, 8192, 0) == [(8192, 0)]
    h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(4096, 8192) == bytes(4096)
    assert errnum(lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)) == errno.ENOTSUP
    h.zero(4096, 4 * MiB - 4096, nbd.CMD_FLAG_FUA)
    h.trim(4096, 0, nbd.CMD_FLAG_FUA)
    h.cache(MiB, 0)
    assert ex["disk"].calls["fua"] == 1 and ex["disk"].calls["flush"] == 1  # TRIM+FUA flushed
    h.shutdown()


def test_aio_pipeline_out_of_order_completion(serve: Serve, workers: int) -> None:
    _server, path = serve(exports(), workers=workers)
    h = connect(path)
    n = 128
    bufs = [nbd.Buffer.from_bytearray(bytearray(os.urandom(4096))) for _ in range(n)]
    cookies = [h.aio_pwrite(bufs[i], i * 4096) for i in range(n)]
    cookies.append(h.aio_flush())
    while h.aio_in_flight():
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    reads = [nbd.Buffer(4096) for _ in range(n)]
    cookies = [h.aio_pread(reads[i], i * 4096) for i in range(n)]
    while h.aio_in_flight():
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    assert all(reads[i].to_bytearray() == bufs[i].to_bytearray() for i in range(n))
    h.shutdown()


def test_multi_conn_flush_covers_writes_of_other_connections(serve: Serve) -> None:
    ex = exports()
    _server, path = serve(ex)
    a, b = connect(path), connect(path)
    assert a.can_multi_conn() and b.can_multi_conn()
    a.pwrite(PATTERN, 0)
    b.flush()
    assert b.pread(4096, 0) == PATTERN
    assert ex["disk"].calls["flush"] == 1
    a.shutdown()
    b.shutdown()


# -- errors ---------------------------------------------------------------------------------------


def test_bad_requests_get_errors_and_the_connection_stays_usable(serve: Serve, workers: int) -> None:
    ex = exports()
    _server, path = serve(ex, workers=workers, max_payload=MiB)
    h = connect(path, strict=False)
    end = 4 * MiB
    cases: list[tuple[str, Callable[[], object], int]] = [
        ("read past end", lambda: h.pread(4096, end - 2048), errno.EINVAL),
        ("write past end", lambda: h.pwrite(PATTERN, end - 2048), errno.ENOSPC),
        ("zero past end", lambda: h.zero(4096, end), errno.ENOSPC),
        ("trim past end", lambda: h.trim(4096, end), errno.EINVAL),
        ("cache past end", lambda: h.cache(4096, end), errno.EINVAL),
        ("block status past end", lambda: extents_of(h, 4096, end), errno.EINVAL),
        ("read over max payload", lambda: h.pread(2 * MiB, 0), errno.EOVERFLOW),
        ("write over max payload", lambda: h.pwrite(bytes(2 * MiB), 0), errno.EOVERFLOW),
        ("flag of another command", lambda: h.pwrite(PATTERN, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL),
        ("fast zero without holes", lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE),
         errno.ENOTSUP),
    ]
    for what, call, want in cases:
        assert errnum(call) == want, what
        assert h.pread(16, 0) == bytes(16), f"connection unusable after {what}"
    h.shutdown()


def test_read_only_export_refuses_writes_with_eperm(serve: Serve, workers: int) -> None:
    _server, path = serve(exports(), workers=workers)
    h = connect(path, "ro", strict=False)
    for call in (lambda: h.pwrite(PATTERN, 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0)):
        assert errnum(call) == errno.EPERM
        assert h.pread(4096, 0) == PATTERN
    h.flush()  # allowed, does nothing
    _server, path = serve(exports(), read_only=True)
    h = connect(path, "disk", strict=False)
    assert h.is_read_only()
    assert errnum(lambda: h.pwrite(PATTERN, 0)) == errno.EPERM


def test_minimum_block_size_is_advertised_and_enforced(serve: Serve) -> None:
    _server, path = serve(exports(), min_block=512, preferred_block=4096)
    h = connect(path, strict=False)
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
    assert errnum(lambda: h.pread(512, 100)) == errno.EINVAL
    assert errnum(lambda: h.pwrite(bytes(100), 0)) == errno.EINVAL
    assert errnum(lambda: h.trim(100, 512)) == errno.EINVAL
    h.pwrite(PATTERN[:512], 512)
    assert h.pread(512, 512) == PATTERN[:512]


def test_block_status_without_a_context_is_einval(serve: Serve) -> None:
    _server, path = serve(exports())
    h = connect(path, meta=False, strict=False)
    assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    with pytest.raises(nbd.Error):
        extents_of(h, 4096, 0)  # libnbd refuses locally or the server says EINVAL
    assert h.pread(16, 0) == bytes(16)


@pytest.mark.parametrize(
    ("op", "name", "call", "want"),
    [
        ("read", "EIO", lambda h: h.pread(4096, 0), errno.EIO),
        ("write", "ENOSPC", lambda h: h.pwrite(PATTERN, 0), errno.ENOSPC),
        ("write", "EROFS", lambda h: h.pwrite(PATTERN, 0), errno.EPERM),
        ("write", "EDQUOT", lambda h: h.pwrite(PATTERN, 0), errno.ENOSPC),
        ("flush", "EIO", lambda h: h.flush(), errno.EIO),
        ("write_zeroes", "EIO", lambda h: h.zero(4096, 0), errno.EIO),
        ("block_status", "EIO", lambda h: extents_of(h, 4096, 0), errno.EIO),
    ],
)
def test_export_errors_become_nbd_errors(serve: Serve, op: str, name: str, call: Any, want: int) -> None:
    ex = exports()
    _server, path = serve(ex)
    h = connect(path)
    ex["disk"].fail[op] = name
    assert errnum(lambda: call(h)) == want
    call(h)  # the fault was one-shot; the connection still works


def test_large_reads_use_readinto_and_pooled_buffers(serve: Serve, workers: int) -> None:
    ex = exports()
    ex["disk"].data[:] = os.urandom(4 * MiB)
    _server, path = serve(ex, workers=workers)
    h = connect(path)
    for _ in range(3):
        assert h.pread(2 * MiB, 4096) == ex["disk"].data[4096 : 2 * MiB + 4096]
        assert h.pread(65536, 0) == ex["disk"].data[:65536]
    assert ex["disk"].calls["readinto"] == 6 and ex["disk"].calls["read"] == 0
    ex["disk"].fail["readinto"], ex["disk"].fail_skip["readinto"] = "EIO", 1
    h.pread(MiB, 0)
    assert errnum(lambda: h.pread(MiB, 0)) == errno.EIO
    assert h.pread(MiB, 0) == ex["disk"].data[:MiB]


def test_trim_the_export_cannot_do_is_still_success(serve: Serve) -> None:
    ex = exports()
    _server, path = serve(ex)
    h = connect(path)
    ex["disk"].fail["discard"] = "EOPNOTSUPP"
    h.trim(4096, 0)


# -- lifecycle ------------------------------------------------------------------------------------


def test_shutdown_closes_connections_and_removes_the_socket(serve: Serve) -> None:
    server, path = serve(exports())
    h = connect(path)
    h.pwrite(PATTERN, 0)
    assert server.nr_connections == 1
    server.shutdown()
    assert not os.path.exists(path)
    assert server.nr_connections == 0
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)


def test_disconnect_one_export(serve: Serve) -> None:
    server, path = serve(exports())
    d, r = connect(path, "disk"), connect(path, "ro")
    assert server.disconnect("disk") == 1
    with pytest.raises(nbd.Error):
        d.pread(4096, 0)
    assert r.pread(4096, 0) == PATTERN
    assert server.disconnect("nope") == 0


def test_many_concurrent_clients(serve: Serve) -> None:
    ex = exports()
    _server, path = serve(ex)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            h = connect(path)
            data = bytes([i]) * 4096
            for _ in range(50):
                h.pwrite(data, i * 4096)
                assert h.pread(4096, i * 4096) == data
            h.shutdown()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    deadline = time.monotonic() + 5
    while _server.nr_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _server.nr_connections == 0


def test_tcp_loopback(serve: Serve) -> None:
    server, _path = serve(exports())
    host, port = server.serve_tcp("127.0.0.1", 0)
    h = nbd.NBD()
    h.set_export_name("disk")
    h.connect_tcp(host, str(port))
    h.pwrite(PATTERN, 0)
    assert h.pread(4096, 0) == PATTERN
    h.shutdown()
