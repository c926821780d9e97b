"""NBD server: sockets and threads that drive ``nbd.protocol`` against ``Export`` objects.

Theory of operation
-------------------
``NbdServer`` serves the exports of a registry (anything with ``lookup(name) -> Export | None`` and
``list() -> names``, or a mapping, or a function returning one) on unix sockets and loopback TCP.
One export per mapped device, named after it; the empty name means ``default_export`` (or the only
export, when there is exactly one).  The server never opens or closes exports: their owner does.

Threading model:

* one **acceptor** thread per listening socket;
* one **reader** thread per connection: it runs the handshake, then loops ``recv_into`` (straight
  into the protocol's buffers) -> ``ServerConnection`` -> requests.  Requests run *inline* on the
  reader thread, in the order they arrive, and their replies are gathered and sent with one
  ``sendmsg`` per batch (when the reader runs out of buffered requests, or after ``BATCH``
  replies), so a pipelined burst costs one ``recv`` and a few ``send`` calls;
* FLUSH and FUA requests, which wait for the disk, go to the connection's **workers**
  (``workers`` threads, started on demand) so that reads and writes behind them keep flowing; a
  worker sends its own reply.  Replies may therefore leave out of order, which NBD allows
  (cookies match them up); all sends hold one lock per connection.  ``workers=0`` runs
  everything inline.
* Exports are called from several threads at once (connections, workers), as
  ``devmapper.export`` allows.

Why inline: under the GIL, on two cores, handing a 4 KiB read to another thread costs more than
doing it (a thread switch is ~10-30 us, a page-cache read through the thin engine ~10 us), and a
second Python thread cannot run the engine in parallel anyway.  Workers pay off only when a
request waits outside Python (fsync) while others could proceed.

Buffers: WRITE payloads and large READ replies (>= 64 KiB) use a per-connection pool of
bytearrays (allocating and faulting in 1 MiB costs about as much as copying it); reads use the
export's optional ``readinto(offset, buf)`` when it has one, else ``read``.  Either way the reply
header and the data leave in one ``sendmsg`` with no copy in Python.  Unix connections get a send
buffer of ``UNIX_SEND_BUFFER`` (as far as ``net.core.wmem_max`` allows): with the default ~200 KiB
a 1 MiB reply is handed over in five steps, each waiting for the client to drain the socket
(a cross-CPU wakeup), and sequential 1 MiB reads were ~10% slower.

Read-ahead: when a READ of 256 KiB to 4 MiB continues the one before it, the reader thread reads
the next range of the same length after sending the reply and before waiting for the next request,
so the disk read overlaps the client taking in the reply (at queue depth 1 the two used to take
turns).  The data is served only to a READ of exactly that range, and only if the export's
``read_token()`` (an optional method; thin volumes change it with every write, discard,
write-zeroes and metadata epoch; a mapped device also with its table, and answers None -- no
read-ahead -- when it cannot tell) is what it was before the read-ahead started -- so a write
acknowledged on any connection before that READ arrived is always seen.  Exports without
``read_token`` get no read-ahead.

Direct writes: when a WRITE of at least ``DIRECT_MIN`` bytes (without FUA, not over TLS) is still
arriving and the export offers ``write_target(offset, length)`` -- a context manager yielding a
writable view of its storage for the range, or None (thin volumes: mapped, unshared blocks,
consecutive and cached in the data file, held under their locks) -- the rest of the payload is
received straight into that view: one copy instead of two, and no page-cache write path.  The
protocol core only counts those bytes (``partial_payload``).  A client that stalls keeps the
blocks at most ``DIRECT_BUDGET`` seconds; then the locks go and the rest of the payload is received
and written the ordinary way (the write is not acknowledged before all of it is in place, so a
reader in between sees a write in progress, as NBD allows).  A client that vanishes mid-payload
leaves a partly written range, as an interrupted write on any disk does.

Polling: a client at queue depth 1 sends its next request a few tens of microseconds after our
reply, and putting the reader to sleep in ``recv`` and waking it again costs about as much (two
context switches and a cross-CPU wake-up; far more inside a VM).  So when a connection's last
request came within ``poll`` seconds (default ``POLL``, 50 µs) of its reader starting to wait, and
none of its workers is busy, the reader polls the socket (non-blocking ``recv``, yielding the CPU
between tries) for up to ``poll`` seconds before sleeping.  A request that comes later turns
polling off until one comes in time again, so an idle or slow client costs nothing; a busy one
costs at most ``poll`` of CPU per request, which the saved wake-ups mostly pay back (the kernel's
``SO_BUSY_POLL`` makes the same trade for network sockets; unix sockets have none).  When two
connections receive one after the other, no connection polls for ``POLL_QUIET``: the CPU is
theirs.  Not under TLS; ``poll=0`` turns it off.

Semantics that are ours, not the core's: TRIM is advisory, so an export that cannot discard
(``ENOTSUP``) still gets success; WRITE_ZEROES with FAST_ZERO is refused with ENOTSUP only when
NO_HOLE is also set (unmapping is fast, writing zeroes is not); CACHE is accepted and does nothing;
FLUSH on a read-only export does nothing.  ``CAN_MULTI_CONN`` is advertised (unless disabled):
every connection calls the same export object, whose ``flush`` covers all completed writes, so a
flush on one connection makes writes acknowledged on any connection durable.

TLS (``tls=`` an ``ssl.SSLContext`` for the server side): NBD_OPT_STARTTLS is offered, or with
``tls_required`` demanded before any other option (proto.md's TLS-only mode); the handshake runs on
the reader thread and the socket is wrapped from then on.  A TLS connection runs every request
inline (no workers) and sends with ``sendall``: an ``SSLSocket`` must not be used by two threads at
once and has no ``sendmsg``.

``shutdown`` stops the acceptors, shuts the read side of every connection (in-flight requests
finish and are answered), and waits for the threads.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, ExitStack
from queue import SimpleQueue
from typing import Protocol

from devmapper.errors import DevmapperError
from devmapper.export import Export, errno_of
from devmapper.nbd import protocol as p

log = logging.getLogger(__name__)

__all__ = ["ExportRegistry", "NbdServer"]

IOV_MAX = 1024
READ_AHEAD_MIN, READ_AHEAD_MAX = 256 << 10, 4 << 20  # READ sizes that trigger read-ahead when sequential
DIRECT_MIN = 256 << 10  # WRITE payloads at least this long may be received straight into storage
DIRECT_BUDGET = 0.5  # seconds a direct receive may hold the blocks; then the rest goes the usual way
POLL = 50e-6  # seconds a reader polls for the next request before sleeping (see "Polling")
POLL_QUIET = 1e-3  # seconds without polling after two connections received one after the other
TLS_HANDSHAKE_TIMEOUT = 30.0  # seconds a client may take over the TLS handshake
UNIX_SEND_BUFFER = 2 << 20  # SO_SNDBUF of unix connections (the kernel doubles it, capped by wmem_max)
_READ, _WRITE, _FLUSH, _TRIM, _CACHE, _ZEROES, _BLOCK_STATUS = 0, 1, 3, 4, 5, 6, 7
_FUA, _NO_HOLE, _REQ_ONE, _FAST_ZERO = 1, 2, 8, 16
_ENOTSUP, _EIO, _EINVAL = int(p.Errno.ENOTSUP), int(p.Errno.EIO), int(p.Errno.EINVAL)
_HOLE, _ZERO = p.STATE_HOLE, p.STATE_ZERO
Buffers = list[bytes | bytearray | memoryview]


class ExportRegistry(Protocol):
    """Where the server finds exports by name (the daemon's device table implements this)."""

    def lookup(self, name: str) -> Export | None: ...

    def list(self) -> list[str]: ...


class _MappingRegistry:
    def __init__(self, source: Mapping[str, Export] | Callable[[], Mapping[str, Export]]) -> None:
        self._source = source

    def _map(self) -> Mapping[str, Export]:
        return self._source() if callable(self._source) else self._source

    def lookup(self, name: str) -> Export | None:
        return self._map().get(name)

    def list(self) -> list[str]:
        return sorted(self._map())


ExportsArg = ExportRegistry | Mapping[str, Export] | Callable[[], Mapping[str, Export]]


def _as_registry(exports: ExportsArg) -> ExportRegistry:
    if isinstance(exports, Mapping) or callable(exports):
        return _MappingRegistry(exports)
    return exports


def _error_of(e: BaseException) -> tuple[int, str]:
    """(NBD error, message) for an exception raised by an export."""
    if isinstance(e, DevmapperError):
        return p.nbd_errno(errno_of(e)), str(e)
    if isinstance(e, OSError) and e.errno is not None:
        return p.nbd_errno(errno.errorcode.get(e.errno, "EIO")), str(e)
    log.exception("export raised an unexpected error")
    return _EIO, f"internal error: {type(e).__name__}"


def _sendv(sock: socket.socket, bufs: Buffers) -> None:
    """Send every buffer in order (sendmsg may stop short; IOV_MAX caps one call)."""
    while bufs:
        batch, bufs = bufs[:IOV_MAX], bufs[IOV_MAX:]
        sent = sock.sendmsg(batch)
        if sent == sum(map(len, batch)):
            continue
        for i, b in enumerate(batch):  # stopped short: resend from where it stopped
            if sent < len(b):
                bufs = [memoryview(b)[sent:], *batch[i + 1 :], *bufs]
                break
            sent -= len(b)


def _grow_send_buffer(sock: socket.socket) -> None:
    """Let a unix socket take a whole large reply at once (see "Buffers" in the module docstring)."""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2 * UNIX_SEND_BUFFER:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
    except OSError:
        pass  # only a performance hint


def _listening(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


class NbdServer:
    """Serve exports over NBD; see the module docstring.  Use as a context manager or call ``shutdown``.

    ``min_block``/``preferred_block``/``max_payload`` are advertised with NBD_INFO_BLOCK_SIZE and
    enforced (misaligned requests get EINVAL).  ``read_only`` makes every export read-only.
    """

    def __init__(
        self,
        exports: ExportsArg,
        *,
        default_export: str | None = None,
        workers: int = 4,
        min_block: int = 1,
        preferred_block: int = 4096,
        max_payload: int = p.DEFAULT_MAX_PAYLOAD,
        read_only: bool = False,
        multi_conn: bool = True,
        tls: ssl.SSLContext | None = None,
        tls_required: bool = False,
        direct_writes: bool = True,
        poll: float = POLL,
    ) -> None:
        self.registry = _as_registry(exports)
        self.default_export = default_export
        self.workers = workers
        self.read_only = read_only
        self.multi_conn = multi_conn
        self.direct_writes = direct_writes
        if poll < 0:
            raise DevmapperError(f"the polling window cannot be negative: {poll}")
        if tls_required and tls is None:
            raise DevmapperError("TLS cannot be required without a TLS context (certificates)")
        self.tls = tls
        self.tls_policy = p.TLS_OFF if tls is None else p.TLS_REQUIRE if tls_required else p.TLS_ON
        self._sizes = (min_block, preferred_block, max_payload)
        p.ExportInfo("", 0, min_block=min_block, preferred_block=preferred_block, max_payload=max_payload)
        self._lock = threading.Lock()
        self._closing = False
        self._listeners: list[tuple[socket.socket, threading.Thread, str | None]] = []
        self._connections: set[_Connection] = set()
        self.polling = _Polling(poll)
        self._stopped = threading.Event()

    def __enter__(self) -> NbdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def closing(self) -> bool:
        return self._closing

    # -- listening ----------------------------------------------------------------------------

    def serve_unix(self, path: str | os.PathLike[str]) -> str:
        """Listen on a unix socket at path (a stale socket there is replaced, a live one is an error);
        returns the path."""
        path = os.fspath(path)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                if _listening(path):
                    raise DevmapperError(f"{path}: another server is listening there")
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        self._listen(sock, path, f"nbd-accept {path}")
        return path

    def serve_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on TCP (loopback by default; port 0 picks one); returns the bound (host, port)."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        addr = sock.getsockname()
        self._listen(sock, None, f"nbd-accept {addr[0]}:{addr[1]}")
        return addr[0], addr[1]

    def _listen(self, sock: socket.socket, path: str | None, name: str) -> None:
        with self._lock:
            if self._closing:
                sock.close()
                raise DevmapperError("the NBD server is shut down")
            t = threading.Thread(target=self._accept_loop, args=(sock,), name=name, daemon=True)
            self._listeners.append((sock, t, path))
        t.start()

    def _accept_loop(self, lsock: socket.socket) -> None:
        while True:
            try:
                sock, _addr = lsock.accept()
            except OSError:
                return  # listener shut down
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                _grow_send_buffer(sock)
            conn = _Connection(self, sock)
            with self._lock:
                if self._closing:
                    sock.close()
                    return
                self._connections.add(conn)
            threading.Thread(target=conn.run, name="nbd-conn", daemon=True).start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    @property
    def nr_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    # -- exports ------------------------------------------------------------------------------

    def resolve(self, name: str) -> tuple[str, Export] | None:
        """The canonical name and export a client's name refers to ("" is the default export)."""
        if name == "":
            if self.default_export is not None:
                name = self.default_export
            else:
                names = self.registry.list()
                if len(names) != 1:
                    return None
                name = names[0]
        export = self.registry.lookup(name)
        return None if export is None else (name, export)

    def info(self, name: str, export: Export) -> p.ExportInfo:
        min_block, preferred, max_payload = self._sizes
        description = getattr(export, "description", "")
        return p.ExportInfo(
            name=name,
            size=export.size(),
            read_only=self.read_only or export.read_only,
            description=description if isinstance(description, str) else "",
            can_multi_conn=self.multi_conn,
            min_block=min_block,
            preferred_block=preferred,
            max_payload=max_payload,
        )

    def disconnect(self, name: str, timeout: float = 10.0) -> int:
        """Close every connection serving export ``name`` (its in-flight requests finish first), e.g.
        before the device behind it is removed; returns how many there were."""
        with self._lock:
            conns = [c for c in self._connections if c.export_name == name]
        for conn in conns:
            conn.stop_reading()
        for conn in conns:
            conn.join(timeout)
        return len(conns)

    # -- shutdown -----------------------------------------------------------------------------

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish, close every connection and wait."""
        with self._lock:
            self._closing = True
            listeners, self._listeners = self._listeners, []
            conns = list(self._connections)
        for sock, _t, _path in listeners:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for conn in conns:
            conn.stop_reading()
        for _sock, t, path in listeners:
            t.join(timeout)
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        for conn in conns:
            conn.join(timeout)
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until ``shutdown`` has finished; False on timeout."""
        return self._stopped.wait(timeout)


class _Polling:
    """When a reader may poll for its next request (see "Polling"), shared by a server's
    connections: arithmetic on the times it is given, so it is tested without sockets or clocks."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._last: int | None = None  # the connection that received last (its id)
        self._shared_until = 0.0  # no connection polls before this time

    def may_poll(self, prompt: bool, busy: bool, now: float) -> bool:
        """A reader whose last request came within the window (prompt) and with no worker busy
        polls, unless two connections received one after the other in the last POLL_QUIET."""
        return prompt and not busy and now > self._shared_until

    def received(self, conn: int, waited: float, now: float) -> bool:
        """Connection conn received at now after waiting that long: whether it came within the
        window (then it polls for its next request)."""
        if self._last != conn:
            if self._last is not None:
                self._shared_until = now + POLL_QUIET  # others are busy too: the CPU is theirs
            self._last = conn
        return waited <= self.window


class _BufferPool:
    """Reusable bytearrays for large payloads and reads (allocating and faulting in 1 MiB costs as
    much as copying it).  Buffers under ``MIN`` bytes are cheap and are not kept."""

    MIN = 64 << 10
    MAX_BYTES = 64 << 20

    def __init__(self) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, n: int) -> bytearray:
        if n >= self.MIN:
            with self._lock:
                free = self._free.get(n)
                if free:
                    self._bytes -= n
                    return free.pop()
        return bytearray(n)

    def put(self, buf: bytearray) -> None:
        n = len(buf)
        if n < self.MIN:
            return
        with self._lock:
            if self._bytes + n <= self.MAX_BYTES:
                self._free.setdefault(n, []).append(buf)
                self._bytes += n


Handler = Callable[[p.Request, Buffers, list[bytearray]], None]


class _Connection:
    """One client: a reader thread (handshake, then requests) and lazily started workers.

    Handlers append reply buffers to ``out`` and pool buffers to give back once ``out`` is sent to
    ``recycle``; the reader batches inline replies, a worker sends each request's own."""

    BATCH = 16  # inline replies sent together at most (bounds the client's wait for the first one)

    def __init__(self, server: NbdServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.pool = _BufferPool()
        self.proto = p.ServerConnection(allocator=self.pool.get, tls=server.tls_policy)
        self._tls = False
        self.export: Export | None = None
        self.export_name: str | None = None
        self._readinto: Callable[[int, bytearray | memoryview], None] | None = None
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._inflight = 0
        self._queue: SimpleQueue[p.Request | None] = SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._done = threading.Event()
        self._dead = False
        self._handlers: dict[int, Handler] = {}
        self._write_target: Callable[[int, int], AbstractContextManager[memoryview | None]] | None = None
        self._direct_req: p.Request | None = None  # the WRITE whose payload went (partly) direct
        self._direct_done = 0  # how many of its bytes
        self._read_token: Callable[[], object] | None = None  # the export's, when read-ahead is possible
        self._read_end = -1  # where the reader thread's last READ ended, and its length
        self._read_len = 0
        self._sequential = False  # that READ continued the one before: read ahead before the next recv
        self._ahead: tuple[int, bytearray, object] | None = None  # (offset, data, token) read ahead
        self._polling: _Polling | None = None  # the server's, once transmission starts (not under TLS)
        self._prompt = False  # the last request came within the polling window: poll for the next

    def stop_reading(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def join(self, timeout: float) -> None:
        self._done.wait(timeout)

    def run(self) -> None:
        try:
            if self._handshake():
                self._transmission()
        except p.RemoteProtocolError as e:
            log.info("NBD client broke the protocol: %s", e)
        except OSError as e:
            log.debug("NBD connection error: %s", e)
        except Exception:
            log.exception("NBD connection failed")
        finally:
            self._finish()

    def _finish(self) -> None:
        for _ in self._workers:
            self._queue.put(None)
        for t in self._workers:
            t.join()
        try:
            self.sock.close()
        finally:
            self.server._forget(self)
            self._done.set()

    def _recv(self) -> None:
        proto = self.proto
        if self._write_target is not None:
            partial = proto.partial_payload()
            if partial is not None and partial[0] is not self._direct_req and self._receive_direct(*partial):
                return
        buf = proto.get_buffer()
        polling = self._polling
        if polling is None:
            proto.buffer_updated(self.sock.recv_into(buf))
            return
        sock, now = self.sock, time.perf_counter
        start = now()
        n = -1
        if polling.may_poll(self._prompt, self._inflight > 0, start):
            end = start + polling.window
            while True:
                try:
                    n = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
                    break
                except BlockingIOError:
                    if now() > end:
                        break
                    os.sched_yield()  # a thread woken on this CPU (another connection's) runs first
        if n < 0:
            n = sock.recv_into(buf)
        t = now()
        self._prompt = polling.received(id(self), t - start, t)
        proto.buffer_updated(n)

    def _receive_direct(self, req: p.Request, payload: memoryview, filled: int) -> bool:
        """Receive the rest of a large WRITE payload straight into the export's storage when it
        offers a ``write_target`` for the range (see "Direct writes").  True if any bytes (or the
        end of the stream) were taken this way."""
        self._direct_req, self._direct_done = req, 0
        if req.flags & _FUA or req.length < DIRECT_MIN:
            return False
        assert self._write_target is not None
        sock, got, eof = self.sock, filled, False
        with ExitStack() as held:
            try:
                target = held.enter_context(self._write_target(req.offset, req.length))
            except Exception as e:  # e.g. a pool that fails I/O: the ordinary write reports it
                log.debug("NBD direct write not taken: %s", e)
                return False
            if target is None:
                return False
            if filled:
                target[:filled] = payload[:filled]
            deadline = time.monotonic() + DIRECT_BUDGET
            waiter: select.poll | None = None
            while got < req.length:
                try:  # what has arrived, without sleeping: one syscall while the client keeps up
                    n = sock.recv_into(target[got:], 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break  # a slow client: the rest goes the ordinary way, without holding the blocks
                    if waiter is None:
                        waiter = select.poll()
                        waiter.register(sock, select.POLLIN)
                    waiter.poll(left * 1000 + 1)
                    continue
                if not n:
                    eof = True
                    break
                got += n
        self._direct_done = got
        if got > filled:
            self.proto.buffer_updated(got - filled)  # counted, not copied: the bytes are in place
        if eof:
            self.proto.buffer_updated(0)
        return got > filled or eof

    # -- handshake ----------------------------------------------------------------------------

    def _handshake(self) -> bool:
        """Run option haggling; True when transmission starts."""
        proto, sock = self.proto, self.sock
        while True:
            out = proto.data_to_send()
            if out:
                sock.sendall(out)
            if proto.state is p.State.TRANSMISSION:
                return True
            if proto.finished:
                return False
            event = proto.next_event()
            if event is p.NEED_DATA:
                out = proto.data_to_send()
                if out:
                    sock.sendall(out)
                self._recv()
            elif isinstance(event, p.ExportQuery):
                self._answer_export(event)
            elif isinstance(event, p.ListQuery):
                self._answer_list()
            elif isinstance(event, p.StartTLS):
                self._start_tls()
                proto, sock = self.proto, self.sock

    def _start_tls(self) -> None:
        """Send STARTTLS's acknowledgement, then run the TLS handshake as the server.  The socket is
        wrapped for the rest of the connection, and everything then runs on the reader thread (an
        ``SSLSocket`` must not be read and written from two threads at once)."""
        out = self.proto.data_to_send()
        if out:
            self.sock.sendall(out)
        assert self.server.tls is not None
        self.sock.settimeout(TLS_HANDSHAKE_TIMEOUT)
        try:
            self.sock = self.server.tls.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as e:
            raise p.RemoteProtocolError(f"TLS handshake failed: {e}") from e
        self.sock.settimeout(None)
        self._tls = True
        self.proto.tls_started()

    def _answer_export(self, query: p.ExportQuery) -> None:
        server, proto = self.server, self.proto
        if server.closing:
            proto.answer_error(p.Rep.ERR_SHUTDOWN, "the server is shutting down")
            return
        found = server.resolve(query.name)
        if found is None:
            proto.answer_export(None)
            return
        name, export = found
        try:
            info = server.info(name, export)
        except DevmapperError as e:
            proto.answer_error(p.Rep.ERR_UNKNOWN, f"export {name!r} is not available: {e}")
            return
        proto.answer_export(info)
        if proto.state is p.State.TRANSMISSION:
            self.export, self.export_name = export, name

    def _answer_list(self) -> None:
        server, proto = self.server, self.proto
        if server.closing:
            proto.answer_error(p.Rep.ERR_SHUTDOWN, "the server is shutting down")
            return
        out = []
        for name in server.registry.list():
            export = server.registry.lookup(name)
            description = getattr(export, "description", "") if export is not None else ""
            out.append((name, description if isinstance(description, str) else ""))
        proto.answer_list(out)

    # -- transmission -------------------------------------------------------------------------

    def _transmission(self) -> None:
        assert self.export is not None
        readinto = getattr(self.export, "readinto", None)
        self._readinto = readinto if callable(readinto) else None
        write_target = getattr(self.export, "write_target", None)
        if callable(write_target) and not self._tls and self.server.direct_writes:
            self._write_target = write_target
        read_token = getattr(self.export, "read_token", None)
        if self._readinto is not None and callable(read_token):
            self._read_token = read_token
        self._handlers = {
            _READ: self._do_read,
            _WRITE: self._do_write,
            _FLUSH: self._do_flush,
            _TRIM: self._do_trim,
            _CACHE: self._do_cache,
            _ZEROES: self._do_zeroes,
            _BLOCK_STATUS: self._do_block_status,
        }
        proto, batch = self.proto, self.BATCH
        out: Buffers = []
        recycle: list[bytearray] = []
        use_workers = self.server.workers > 0 and not self._tls
        if self.server.polling.window and not self._tls:  # an SSLSocket takes no recv flags
            self._polling = self.server.polling
        request_type = p.Request
        pending = 0
        try:
            while True:
                event = proto.next_event()
                if event.__class__ is request_type:
                    assert isinstance(event, p.Request)
                    if use_workers and (event.command == _FLUSH or event.flags & _FUA) and not event.error:
                        self._submit(event)  # may wait for the disk: keep reading meanwhile
                        continue
                    self._execute(event, out, recycle)
                    pending += 1
                    if pending < batch:
                        continue
                elif event is not p.NEED_DATA:
                    break  # Disconnect, ConnectionClosed
                if out:
                    self._send(out, recycle)
                    out, recycle, pending = [], [], 0
                if event is p.NEED_DATA:
                    if self._sequential and not proto.buffered():
                        self._read_ahead()
                    self._recv()
        finally:
            if out:
                self._send(out, recycle)

    def _send(self, bufs: Buffers, recycle: list[bytearray]) -> None:
        with self._send_lock:
            if not self._dead:
                try:
                    self._sock_send(bufs)
                except OSError as e:
                    self._dead = True
                    log.debug("NBD reply not sent: %s", e)
        for buf in recycle:
            self.pool.put(buf)

    def _sock_send(self, bufs: Buffers) -> None:
        """Send bufs in order (the caller holds the send lock)."""
        if self._tls:
            self.sock.sendall(b"".join(bufs))  # SSLSocket has no sendmsg
        else:
            _sendv(self.sock, bufs)

    def _submit(self, req: p.Request) -> None:
        with self._state_lock:
            self._inflight += 1
        if len(self._workers) < self.server.workers and self._inflight > len(self._workers):
            t = threading.Thread(target=self._worker, name="nbd-worker", daemon=True)
            self._workers.append(t)
            t.start()
        self._queue.put(req)

    def _worker(self) -> None:
        queue = self._queue
        while True:
            req = queue.get()
            if req is None:
                return
            try:
                out: Buffers = []
                recycle: list[bytearray] = []
                self._execute(req, out, recycle)
                self._send(out, recycle)
            finally:
                with self._state_lock:
                    self._inflight -= 1

    def _execute(self, req: p.Request, out: Buffers, recycle: list[bytearray]) -> None:
        """Run one request, appending its reply to ``out``."""
        if req.error:
            out.append(self.proto.reply_error(req.cookie, req.error, req.message))
            return
        try:
            self._handlers[req.command](req, out, recycle)
        except Exception as e:
            code, message = _error_of(e)
            out.append(self.proto.reply_error(req.cookie, code, message))

    def _do_read(self, req: p.Request, out: Buffers, recycle: list[bytearray]) -> None:
        assert self.export is not None
        n = req.length
        if self._read_token is not None and not req.flags & _FUA:  # the reader thread's own reads
            ahead, self._ahead = self._ahead, None
            if ahead is not None:
                offset, buf, token = ahead
                if offset == req.offset and len(buf) == n and self._read_token() == token:
                    self._note_read(offset, n)
                    out += (self.proto.reply_read(req.cookie, offset, n), buf)
                    recycle.append(buf)
                    return
                self.pool.put(buf)
            self._note_read(req.offset, n)
        if self._readinto is not None and n >= _BufferPool.MIN:
            buf = self._read_pooled(req.offset, n)
            out += (self.proto.reply_read(req.cookie, req.offset, n), buf)
            recycle.append(buf)
            return
        data = self.export.read(req.offset, n)
        if len(data) != n:
            out.append(self.proto.reply_error(req.cookie, _EIO, f"short read: {len(data)} of {n} bytes"))
            return
        out += (self.proto.reply_read(req.cookie, req.offset, n), data)

    def _note_read(self, offset: int, n: int) -> None:
        self._sequential = offset == self._read_end and READ_AHEAD_MIN <= n <= READ_AHEAD_MAX
        self._read_end, self._read_len = offset + n, n

    def _read_ahead(self) -> None:
        """Read the range after a sequential READ while the client is still taking in the reply;
        served only if the next READ asks for exactly it and the export's ``read_token`` has not
        changed since (no write, discard or remap could have touched it)."""
        assert self._read_token is not None and self._readinto is not None and self.export is not None
        self._sequential = False
        offset, n = self._read_end, self._read_len
        try:
            if offset + n > self.export.size():
                return
            token = self._read_token()
            if token is None:
                return  # the export cannot tell now whether its bytes change
            buf = self._read_pooled(offset, n)
        except Exception as e:
            log.debug("NBD read-ahead skipped: %s", e)
            return
        self._ahead = (offset, buf, token)

    def _read_pooled(self, offset: int, n: int) -> bytearray:
        """n bytes from offset read by the export's ``readinto`` into a pool buffer (given back to
        the pool if the read fails)."""
        assert self._readinto is not None
        buf = self.pool.get(n)
        try:
            self._readinto(offset, buf)
        except BaseException:
            self.pool.put(buf)
            raise
        return buf

    def _do_write(self, req: p.Request, out: Buffers, recycle: list[bytearray]) -> None:
        assert self.export is not None and req.payload is not None
        done = 0
        if req is self._direct_req:
            done, self._direct_req = self._direct_done, None
        try:
            if done < req.length:
                self.export.write(req.offset + done, memoryview(req.payload)[done:], bool(req.flags & _FUA))
        finally:
            self.pool.put(req.payload)  # the export has copied what it needed
        out.append(self.proto.reply_ok(req.cookie))

    def _do_flush(self, req: p.Request, out: Buffers, recycle: list[bytearray]) -> None:
        assert self.export is not None
        if not self.export.read_only and not self.server.read_only:
            self.export.flush()
        out.append(self.proto.reply_ok(req.cookie))

    def _do_trim(self, req: p.Request, out: Buffers, recycle: list[bytearray]) -> None:
        assert self.export is not None
        try:
            self.export.discard(req.offset, req.length)
        except DevmapperError as e:
            if p.nbd_errno(errno_of(e)) != _ENOTSUP:
                raise
        else:
            if req.flags & _FUA:
                self.export.flush()
        out.append(self.proto.reply_ok(req.cookie))  # a hint the export cannot take is still success

    def _do_cache(self, req: p.Request, out: Buffers, recycle: list[bytearray]) -> None:
        out.append(self.proto.reply_ok(req.cookie))

    def _do_zeroes(self, req: p.Request, out: Buffers, recycle: list[bytearray]) -> None:
        assert self.export is not None
        no_hole = bool(req.flags & _NO_HOLE)
        if req.flags & _FAST_ZERO and no_hole:
            out.append(self.proto.reply_error(req.cookie, _ENOTSUP, "zeroing without holes is not faster than writing"))
            return
        self.export.write_zeroes(req.offset, req.length, bool(req.flags & _FUA), not no_hole)
        out.append(self.proto.reply_ok(req.cookie))

    def _do_block_status(self, req: p.Request, out: Buffers, recycle: list[bytearray]) -> None:
        assert self.export is not None
        if req.length == 0:
            out.append(self.proto.reply_error(req.cookie, _EINVAL, "block status of an empty range"))
            return
        extents: list[tuple[int, int]] = []
        for e in self.export.block_status(req.offset, req.length):
            if e.length <= 0:
                continue
            flags = (_HOLE if e.hole else 0) | (_ZERO if e.zero else 0)
            if extents and extents[-1][1] == flags:
                extents[-1] = (extents[-1][0] + e.length, flags)
            else:
                extents.append((e.length, flags))
            if len(extents) > p.MAX_EXTENTS:
                break
        if not extents:
            out.append(self.proto.reply_error(req.cookie, _EIO, "the export reported no extents"))
            return
        if req.flags & _REQ_ONE:
            extents = [(min(extents[0][0], req.length), extents[0][1])]
        out.append(self.proto.reply_block_status(req.cookie, extents))
