"""Sans-IO NBD server protocol: bytes in, events out; answers in, bytes out.  No sockets, no threads.

Theory of operation
-------------------
``ServerConnection`` is the server's half of one NBD connection (NetworkBlockDevice/nbd
``doc/proto.md``), fixed newstyle only.  It never touches a socket: the caller hands it the bytes it
received and sends the bytes it is given.  It speaks in three kinds of object:

* **events** (``next_event``): ``ExportQuery`` (an option that needs to know an export: INFO, GO,
  EXPORT_NAME, LIST_META_CONTEXT, SET_META_CONTEXT), ``ListQuery`` (LIST), ``Request`` (one
  transmission command, already validated), ``Disconnect`` (ABORT or DISC) and ``ConnectionClosed``
  (the peer's EOF); ``NEED_DATA`` when no whole message is buffered;
* **answers**: an ``ExportQuery`` is answered with ``answer_export(info or None)`` and a
  ``ListQuery`` with ``answer_list(names)``; everything else in the handshake that needs no
  knowledge of exports (STRUCTURED_REPLY, ABORT, STARTTLS, unknown and malformed options, client
  flags) is decided here, and its reply bytes are queued;
* **bytes to send**: the handshake's output accumulates in ``data_to_send()``.  Transmission replies
  are built by the ``reply_*`` methods, which read only state frozen when transmission began, so
  worker threads may call them concurrently; the caller orders and sends them.

States and transitions are one table (``_TRANSITIONS``, keyed by (state, what happened)); each state
has one reader (``_READERS``).  A transition the table does not list is a ``LocalProtocolError``
(our caller misused the object); bytes the protocol does not allow are a ``RemoteProtocolError``,
after which the connection must be dropped (a "hard disconnect").  Nothing else escapes: garbage in
gives only ``NbdProtocolError``.

    GREETING --client flags--> OPTIONS --export/list option--> ANSWER --answered--> OPTIONS
                                  |                              |--GO acked / EXPORT_NAME--> TRANSMISSION
                                  |--ABORT--> DONE               |--EXPORT_NAME refused--> DONE
                                  |--STARTTLS acked--> TLS --caller's handshake done--> OPTIONS
    TRANSMISSION --request--> TRANSMISSION --DISC--> DONE;   any state --EOF--> CLOSED

Receiving follows ``asyncio.BufferedProtocol``: ``get_buffer()`` returns a writable memoryview to
receive into and ``buffer_updated(n)`` commits ``n`` bytes; ``receive_data(b)`` does the same from a
bytes object (``b""`` is EOF).  Headers go to an internal buffer; once a WRITE header is parsed,
``get_buffer`` returns the unfilled part of that request's own payload buffer, so large payloads
go from the kernel straight to the buffer handed to the export (at most what arrived with the
header is copied).  The payload of a rejected WRITE is received into a scratch buffer and dropped.

Requests are validated here against the export's ``ExportInfo`` and the negotiated features, in
this order: unknown or unadvertised command (EINVAL), flags not valid for the command (EINVAL),
READ/WRITE longer than the maximum payload (EOVERFLOW), FLUSH with a range (EINVAL), write to a
read-only export (EPERM), range past the end (ENOSPC for WRITE and WRITE_ZEROES, EINVAL otherwise),
misalignment to the minimum block size (EINVAL).  A ``Request`` with ``error`` set is
to be answered with ``reply_error`` and nothing else; the connection stays usable.

The module knows bytes, numbers and names; the numbers, structs and exceptions of the wire are in
``nbd.wire``, ``ExportInfo`` and the event classes in ``nbd.events`` (all re-exported here); what an
export *is* lives in ``devmapper.export`` and ``server.py``.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from devmapper.nbd.events import (
    NEED_DATA,
    ConnectionClosed,
    Disconnect,
    Event,
    ExportInfo,
    ExportQuery,
    ListQuery,
    Request,
    StartTLS,
)
from devmapper.nbd.wire import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    CHUNK,
    CHUNK_ERROR,
    CHUNK_OFFSET_DATA,
    CLIENT_FIXED_NEWSTYLE,
    CLIENT_NO_ZEROES,
    DEFAULT_MAX_PAYLOAD,
    DRAIN_LIMIT,
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    EXTENT,
    GREETING,
    HANDSHAKE_FIXED_NEWSTYLE,
    HANDSHAKE_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_EXTENTS,
    MAX_OPTION_DATA,
    MAX_STRING,
    NBDMAGIC,
    OPT_HEADER,
    OPT_REPLY,
    OPT_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    LocalProtocolError,
    NbdProtocolError,
    Opt,
    RemoteProtocolError,
    Rep,
    ReplyType,
    TxFlag,
    nbd_errno,
)

__all__ = [
    "BASE_ALLOCATION",
    "BASE_ALLOCATION_ID",
    "DEFAULT_MAX_PAYLOAD",
    "DRAIN_LIMIT",
    "MAX_EXTENTS",
    "MAX_OPTION_DATA",
    "NEED_DATA",
    "STATE_HOLE",
    "STATE_ZERO",
    "TLS_OFF",
    "TLS_ON",
    "TLS_REQUIRE",
    "Cmd",
    "CmdFlag",
    "ConnectionClosed",
    "Disconnect",
    "Errno",
    "ExportInfo",
    "ExportQuery",
    "Info",
    "ListQuery",
    "LocalProtocolError",
    "NbdProtocolError",
    "Opt",
    "RemoteProtocolError",
    "Rep",
    "ReplyType",
    "Request",
    "ServerConnection",
    "StartTLS",
    "State",
    "TxFlag",
    "nbd_errno",
]

# -- states ---------------------------------------------------------------------------------------


class State(enum.Enum):
    GREETING = "greeting"  # greeting queued; waiting for the client flags
    OPTIONS = "options"  # option haggling
    ANSWER = "answer"  # an ExportQuery/ListQuery is out; waiting for our caller's answer
    TLS = "tls"  # STARTTLS acknowledged; waiting for our caller's TLS handshake
    TRANSMISSION = "transmission"
    DONE = "done"  # soft disconnect (ABORT/DISC) or refused EXPORT_NAME: close
    CLOSED = "closed"  # peer EOF
    ERROR = "error"  # RemoteProtocolError raised: close


_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.GREETING, "client_flags"): State.OPTIONS,
    (State.OPTIONS, "option_answered_here"): State.OPTIONS,
    (State.OPTIONS, "option_needs_answer"): State.ANSWER,
    (State.OPTIONS, "abort"): State.DONE,
    (State.OPTIONS, "starttls"): State.TLS,
    (State.OPTIONS, "tls_required_export_name"): State.DONE,
    (State.TLS, "tls_started"): State.OPTIONS,
    (State.ANSWER, "answered"): State.OPTIONS,
    (State.ANSWER, "go"): State.TRANSMISSION,
    (State.ANSWER, "export_name_refused"): State.DONE,
    (State.TRANSMISSION, "request"): State.TRANSMISSION,
    (State.TRANSMISSION, "disc"): State.DONE,
}
for _s in (State.GREETING, State.OPTIONS, State.ANSWER, State.TLS, State.TRANSMISSION):
    _TRANSITIONS[(_s, "eof")] = State.CLOSED
    _TRANSITIONS[(_s, "protocol_error")] = State.ERROR

# Command table: flags each command accepts (FUA "is valid for all commands" when advertised), and
# whether its range is checked as a write (past the end -> ENOSPC) or not (EINVAL).
_FUA, _NO_HOLE, _DF, _REQ_ONE, _FAST_ZERO = 1, 2, 4, 8, 16
_READ, _WRITE, _DISC, _FLUSH, _TRIM, _CACHE, _ZEROES, _BLOCK_STATUS = range(8)
_ALLOWED_FLAGS = {
    _READ: _FUA | _DF,
    _WRITE: _FUA,
    _DISC: _FUA,
    _FLUSH: _FUA,
    _TRIM: _FUA,
    _CACHE: _FUA,
    _ZEROES: _FUA | _NO_HOLE | _FAST_ZERO,
    _BLOCK_STATUS: _FUA | _REQ_ONE,
}
_WRITES = frozenset({_WRITE, _TRIM, _ZEROES})
_EINVAL, _EPERM, _ENOSPC, _EOVERFLOW = int(Errno.EINVAL), int(Errno.EPERM), int(Errno.ENOSPC), int(Errno.EOVERFLOW)

_MODE_HEADER, _MODE_PAYLOAD, _MODE_DRAIN = 0, 1, 2
_MIN_FREE = 4096  # get_buffer offers at least this much room in header mode
_SCRATCH = 64 << 10

Allocator = Callable[[int], bytearray]

TLS_OFF, TLS_ON, TLS_REQUIRE = "off", "on", "require"  # the server's TLS policy (nbdkit's --tls)


def _decode_string(raw: bytes | bytearray | memoryview) -> str | None:
    """A protocol string, or None when it breaks proto.md's rules (UTF-8, no NUL, <= 4096 bytes)."""
    if len(raw) > MAX_STRING:
        return None
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text


class ServerConnection:
    """The server side of one NBD connection; see the module docstring.

    ``buffer_size`` is the header buffer (requests are parsed from it; it also receives the start of
    payloads); ``allocator(n)`` makes the buffer for an n-byte WRITE payload (``bytearray`` by
    default; a server may pool buffers).  ``tls``: ``TLS_OFF`` refuses STARTTLS, ``TLS_ON`` offers
    it, ``TLS_REQUIRE`` refuses every option but STARTTLS and ABORT until TLS is active (and ends the
    session on EXPORT_NAME, which cannot be refused), as proto.md's "TLS-only" mode.
    """

    def __init__(self, buffer_size: int = 64 << 10, allocator: Allocator = bytearray, tls: str = TLS_OFF) -> None:
        if tls not in (TLS_OFF, TLS_ON, TLS_REQUIRE):
            raise LocalProtocolError(f"TLS policy {tls!r} is not off, on or require")
        self.tls = tls
        self.tls_active = False
        self.state = State.GREETING
        self.structured = False
        self.no_zeroes = False
        self.export: ExportInfo | None = None
        self.contexts: dict[int, str] = {}  # selected metadata contexts, by id
        self._meta_export: str | None = None  # the export SET_META_CONTEXT referred to
        self._pending: ExportQuery | ListQuery | None = None
        self._out = bytearray(GREETING.pack(NBDMAGIC, IHAVEOPT, HANDSHAKE_FIXED_NEWSTYLE | HANDSHAKE_NO_ZEROES))
        self._events: deque[Event] = deque()
        self._alloc = allocator
        self._buf = bytearray(max(buffer_size, _MIN_FREE * 2))
        self._start = 0
        self._end = 0
        self._eof = False
        self._mode = _MODE_HEADER
        self._payload: bytearray | None = None
        self._payload_view: memoryview | None = None
        self._filled = 0
        self._drain_left = 0
        self._scratch: bytearray | None = None
        self._held: Request | None = None  # the request waiting for its payload (or drain)
        self._option_drain: tuple[int, int] | None = None  # (option, bytes left) of an oversized option
        # transmission checks, frozen at GO
        self._size = 0
        self._min_block = 1
        self._max_payload = DEFAULT_MAX_PAYLOAD
        self._allowed: dict[int, int] = {}
        self._read_only = False

    # -- state table --------------------------------------------------------------------------

    def _transition(self, what: str) -> None:
        new = _TRANSITIONS.get((self.state, what))
        if new is None:
            raise LocalProtocolError(f"cannot {what.replace('_', ' ')} in state {self.state.value}")
        self.state = new

    def _remote_error(self, message: str) -> RemoteProtocolError:
        if (self.state, "protocol_error") in _TRANSITIONS:
            self._transition("protocol_error")
        return RemoteProtocolError(message)

    @property
    def finished(self) -> bool:
        """True once the connection must be closed (after sending ``data_to_send()``)."""
        return self.state in (State.DONE, State.CLOSED, State.ERROR)

    # -- receiving ----------------------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (commit them with ``buffer_updated``)."""
        if self._mode == _MODE_PAYLOAD:
            assert self._payload_view is not None
            return self._payload_view[self._filled :]
        if self._mode == _MODE_DRAIN:
            if self._scratch is None:
                self._scratch = bytearray(_SCRATCH)
            return memoryview(self._scratch)[: min(_SCRATCH, self._drain_left)]
        self._make_room(_MIN_FREE)
        return memoryview(self._buf)[self._end :]

    def _make_room(self, need: int) -> None:
        buf, start, end = self._buf, self._start, self._end
        if len(buf) - end >= need:
            return
        if start == end:
            self._start = self._end = 0
            if len(buf) >= need:
                return
        live = end - start
        if live + need > len(buf):
            new = bytearray(max(len(buf) * 2, live + need))
            new[:live] = buf[start:end]
            self._buf = new
        else:
            buf[:live] = buf[start:end]
        self._start, self._end = 0, live

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last ``get_buffer()``; 0 means EOF."""
        if nbytes == 0:
            self._eof = True
            return
        if self._mode == _MODE_PAYLOAD:
            self._filled += nbytes
            if self._filled == len(self._payload or b""):
                self._finish_payload()
        elif self._mode == _MODE_DRAIN:
            self._drain_left -= nbytes
            if self._drain_left == 0:
                self._finish_drain()
        else:
            self._end += nbytes

    def partial_payload(self) -> tuple[Request, memoryview, int] | None:
        """While a valid WRITE's payload is still arriving: (its request, the payload buffer, bytes
        received so far).  A caller may take the rest of the payload elsewhere and account for it
        with ``buffer_updated`` (the payload buffer then holds only the first bytes); the request
        still comes out of ``next_event`` once all of it is counted."""
        if self._mode != _MODE_PAYLOAD:
            return None
        assert self._held is not None and self._payload_view is not None
        return self._held, self._payload_view, self._filled

    def buffered(self) -> int:
        """Bytes received but not parsed yet (more requests may be waiting in them)."""
        return self._end - self._start

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes; ``b""`` means EOF."""
        mv = memoryview(data).cast("B")
        if not len(mv):
            self.buffer_updated(0)
            return
        while len(mv):
            dst = self.get_buffer()
            n = min(len(dst), len(mv))
            dst[:n] = mv[:n]
            self.buffer_updated(n)
            mv = mv[n:]

    def _finish_payload(self) -> None:
        req, self._held = self._held, None
        assert req is not None
        req.payload = self._payload
        self._payload = self._payload_view = None
        self._mode = _MODE_HEADER
        self._events.append(req)

    def _finish_drain(self) -> None:
        self._mode = _MODE_HEADER
        if self._option_drain is not None:
            option, _ = self._option_drain
            self._option_drain = None
            self._reply_option(option, Rep.ERR_TOO_BIG, b"option data too long")
            return
        req, self._held = self._held, None
        assert req is not None
        self._events.append(req)

    def _take(self, n: int) -> bytes | None:
        """The next n buffered bytes, or None if fewer are buffered."""
        if self._end - self._start < n:
            return None
        s = self._start
        self._start = s + n
        return bytes(self._buf[s : s + n])

    def next_event(self) -> Event:
        """The next event, ``NEED_DATA`` if none is complete yet.  Raises ``RemoteProtocolError``."""
        if self.state is _TRANSMISSION and self._mode == _MODE_HEADER and not self._events and not self._eof:
            return self._read_request()  # the hot path: one request header from the buffer
        if self._events:
            return self._events.popleft()
        if self.finished:
            return ConnectionClosed() if self.state is State.CLOSED else Disconnect("finished")
        if self._mode != _MODE_HEADER:
            return self._at_eof() if self._eof else NEED_DATA
        reader = _READERS[self.state]
        event = reader(self)
        if event is NEED_DATA and self._eof:
            return self._at_eof()
        return event

    def _at_eof(self) -> ConnectionClosed:
        partial = self._end > self._start or self._mode != _MODE_HEADER
        self._transition("eof")
        return ConnectionClosed(partial)

    def _read_answer_pending(self) -> Event:
        raise LocalProtocolError("next_event called while an option waits for its answer")

    def _read_client_flags(self) -> Event:
        raw = self._take(4)
        if raw is None:
            return NEED_DATA
        (flags,) = U32.unpack(raw)
        if flags & ~(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES):
            raise self._remote_error(f"client flags {flags:#x} have bits the server did not offer")
        self.no_zeroes = bool(flags & CLIENT_NO_ZEROES)
        self._transition("client_flags")
        return self.next_event()

    # -- options ------------------------------------------------------------------------------

    def _read_option(self) -> Event:
        while True:
            if self._end - self._start < OPT_HEADER.size:
                return NEED_DATA
            magic, option, length = OPT_HEADER.unpack_from(self._buf, self._start)
            if magic != IHAVEOPT:
                raise self._remote_error(f"option magic {magic:#x} is not IHAVEOPT")
            if length > MAX_OPTION_DATA:
                if option == Opt.EXPORT_NAME:
                    raise self._remote_error("NBD_OPT_EXPORT_NAME name too long")
                self._start += OPT_HEADER.size
                self._drain_option(option, length)
                if self._mode == _MODE_DRAIN:
                    return NEED_DATA
                continue
            if self._end - self._start < OPT_HEADER.size + length:
                self._make_room(OPT_HEADER.size + length - (self._end - self._start))
                return NEED_DATA
            data = bytes(self._buf[self._start + OPT_HEADER.size : self._start + OPT_HEADER.size + length])
            self._start += OPT_HEADER.size + length
            event = self._option(option, data)
            if event is not None:
                return event

    def _drain_option(self, option: int, length: int) -> None:
        """Skip an option's oversized data (part may be buffered already), then refuse it."""
        have = min(length, self._end - self._start)
        self._start += have
        left = length - have
        if left == 0:
            self._reply_option(option, Rep.ERR_TOO_BIG, b"option data too long")
            return
        self._option_drain = (option, left)
        self._drain_left = left
        self._mode = _MODE_DRAIN

    def _option(self, option: int, data: bytes) -> Event | None:
        """Decide one whole option: an event for our caller, or None when answered here."""
        if self.tls == TLS_REQUIRE and not self.tls_active and option not in (Opt.STARTTLS, Opt.ABORT):
            if option == Opt.EXPORT_NAME:
                self._transition("tls_required_export_name")  # proto.md: it cannot be refused
                return Disconnect("NBD_OPT_EXPORT_NAME before TLS")
            return self._refuse(option, Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
        handler = _OPTION_HANDLERS.get(option)
        if handler is None:
            self._reply_option(option, Rep.ERR_UNSUP, f"option {option} is not supported".encode())
            self._transition("option_answered_here")
            return None
        return handler(self, option, data)

    def _opt_export_name(self, option: int, data: bytes) -> Event | None:
        name = _decode_string(data)
        if name is None:
            raise self._remote_error("NBD_OPT_EXPORT_NAME name is not a valid string")
        return self._ask(ExportQuery(Opt.EXPORT_NAME, name))

    def _opt_abort(self, option: int, data: bytes) -> Event | None:
        self._reply_option(option, Rep.ACK)
        self._transition("abort")
        return Disconnect("abort")

    def _opt_list(self, option: int, data: bytes) -> Event | None:
        if data:
            return self._refuse(option, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
        return self._ask(ListQuery())

    def _opt_starttls(self, option: int, data: bytes) -> Event | None:
        if self.tls == TLS_OFF:
            return self._refuse(option, Rep.ERR_UNSUP, "TLS is not configured on this server")
        if data:
            return self._refuse(option, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self.tls_active:
            return self._refuse(option, Rep.ERR_INVALID, "TLS is already active")
        if self._end > self._start:
            raise self._remote_error("data after NBD_OPT_STARTTLS, before the TLS handshake")
        self._reply_option(option, Rep.ACK)
        self._transition("starttls")
        return StartTLS()

    def tls_started(self) -> None:
        """Our caller finished the TLS handshake after ``StartTLS``; option haggling goes on.  What was
        negotiated in clear text is forgotten (proto.md: it MUST be negotiated again)."""
        if self.state is not State.TLS:
            raise LocalProtocolError("no STARTTLS is waiting for its handshake")
        self.tls_active = True
        self.structured = False
        self.contexts = {}
        self._meta_export = None
        self._transition("tls_started")

    def _read_tls_pending(self) -> Event:
        raise LocalProtocolError("next_event called before tls_started")

    def _opt_structured_reply(self, option: int, data: bytes) -> Event | None:
        if data:
            return self._refuse(option, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        if self.structured:
            return self._refuse(option, Rep.ERR_INVALID, "structured replies are already negotiated")
        self.structured = True
        self._reply_option(option, Rep.ACK)
        self._transition("option_answered_here")
        return None

    def _opt_info_go(self, option: int, data: bytes) -> Event | None:
        if len(data) < 6:
            return self._refuse(option, Rep.ERR_INVALID, "option data too short")
        (namelen,) = U32.unpack_from(data, 0)
        if namelen > len(data) - 6:
            return self._refuse(option, Rep.ERR_INVALID, "name length exceeds the option data")
        name = _decode_string(data[4 : 4 + namelen])
        if name is None:
            return self._refuse(option, Rep.ERR_INVALID, "export name is not a valid string")
        (count,) = U16.unpack_from(data, 4 + namelen)
        rest = data[6 + namelen :]
        if len(rest) != 2 * count:
            return self._refuse(option, Rep.ERR_INVALID, "information request count does not match the data")
        requests = tuple(U16.unpack_from(rest, 2 * i)[0] for i in range(count))
        return self._ask(ExportQuery(Opt(option), name, info_requests=requests))

    def _opt_meta_context(self, option: int, data: bytes) -> Event | None:
        if option == Opt.SET_META_CONTEXT:
            self.contexts = {}
            self._meta_export = None
        if not self.structured:
            return self._refuse(option, Rep.ERR_INVALID, "negotiate structured replies first")
        parsed = _parse_meta_request(data)
        if parsed is None:
            return self._refuse(option, Rep.ERR_INVALID, "malformed metadata context request")
        name, queries = parsed
        if any(not _valid_query(q) for q in queries):
            return self._refuse(option, Rep.ERR_INVALID, "a query lacks its namespace")
        return self._ask(ExportQuery(Opt(option), name, queries=queries))

    def _ask(self, query: ExportQuery | ListQuery) -> Event:
        self._pending = query
        self._transition("option_needs_answer")
        return query

    def _refuse(self, option: int, rep: Rep, message: str) -> Event | None:
        """Answer the option here with an error reply; None (no event for our caller)."""
        self._reply_option(option, rep, message.encode())
        self._transition("option_answered_here")
        return None

    def _reply_option(self, option: int, rep: int, data: bytes = b"") -> None:
        self._out += OPT_REPLY.pack(OPT_REPLY_MAGIC, option, rep, len(data))
        self._out += data

    # -- answers ------------------------------------------------------------------------------

    def answer_export(self, info: ExportInfo | None) -> None:
        """Answer the pending ``ExportQuery``: the export's facts, or None if it does not exist."""
        query = self._pending
        if not isinstance(query, ExportQuery) or self.state is not State.ANSWER:
            raise LocalProtocolError("no export query is waiting for an answer")
        self._pending = None
        if query.option == Opt.EXPORT_NAME:
            self._answer_export_name(info)
        elif query.option in (Opt.INFO, Opt.GO):
            self._answer_info_go(query, info)
        else:
            self._answer_meta(query, info)

    def answer_list(self, exports: Iterable[tuple[str, str]]) -> None:
        """Answer the pending ``ListQuery`` with (name, description) pairs."""
        if not isinstance(self._pending, ListQuery) or self.state is not State.ANSWER:
            raise LocalProtocolError("no list query is waiting for an answer")
        self._pending = None
        for name, description in exports:
            raw = name.encode()
            self._reply_option(Opt.LIST, Rep.SERVER, U32.pack(len(raw)) + raw + description.encode())
        self._reply_option(Opt.LIST, Rep.ACK)
        self._transition("answered")

    def answer_error(self, rep: Rep, message: str = "") -> None:
        """Refuse the pending option with an error reply (e.g. ``Rep.ERR_SHUTDOWN``)."""
        query = self._pending
        if query is None or self.state is not State.ANSWER or rep < 1 << 31:
            raise LocalProtocolError("no option to refuse, or not an error reply")
        self._pending = None
        if isinstance(query, ExportQuery) and query.option == Opt.EXPORT_NAME:
            self._transition("export_name_refused")
            return
        option = Opt.LIST if isinstance(query, ListQuery) else query.option
        self._reply_option(option, rep, message.encode())
        self._transition("answered")

    def _answer_export_name(self, info: ExportInfo | None) -> None:
        if info is None:
            self._transition("export_name_refused")  # proto.md: the server MUST terminate the session
            return
        self._out += EXPORT_NAME_REPLY.pack(info.size, info.transmission_flags(self.structured))
        if not self.no_zeroes:
            self._out += EXPORT_NAME_PADDING
        self._start_transmission(info, info.name)

    def _answer_info_go(self, query: ExportQuery, info: ExportInfo | None) -> None:
        option = query.option
        if info is None:
            self._reply_option(option, Rep.ERR_UNKNOWN, f"export {query.name!r} not found".encode())
            self._transition("answered")
            return
        reply = self._reply_option
        reply(option, Rep.INFO, INFO_EXPORT.pack(Info.EXPORT, info.size, info.transmission_flags(self.structured)))
        if Info.NAME in query.info_requests or query.name != info.name:
            reply(option, Rep.INFO, U16.pack(Info.NAME) + info.name.encode())
        if Info.DESCRIPTION in query.info_requests and info.description:
            reply(option, Rep.INFO, U16.pack(Info.DESCRIPTION) + info.description.encode())
        # Sent even when not requested (allowed); a client that did not ask may ignore it, and we
        # then still error misaligned requests cleanly.
        block_size = INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, info.min_block, info.preferred_block, info.max_payload)
        reply(option, Rep.INFO, block_size)
        reply(option, Rep.ACK)
        if option == Opt.GO:
            self._start_transmission(info, query.name)
        else:
            self._transition("answered")

    def _answer_meta(self, query: ExportQuery, info: ExportInfo | None) -> None:
        option = query.option
        if info is None:
            self._reply_option(option, Rep.ERR_UNKNOWN, f"export {query.name!r} not found".encode())
            self._transition("answered")
            return
        listing = option == Opt.LIST_META_CONTEXT
        names = _match_contexts(query.queries, listing) if info.block_status else []
        for ctx in names:
            ctx_id = 0 if listing else BASE_ALLOCATION_ID  # ids in a LIST reply are reserved (0)
            self._reply_option(option, Rep.META_CONTEXT, U32.pack(ctx_id) + ctx.encode())
        if not listing:
            self.contexts = {BASE_ALLOCATION_ID: names[0]} if names else {}
            self._meta_export = query.name
        self._reply_option(option, Rep.ACK)
        self._transition("answered")

    def _start_transmission(self, info: ExportInfo, name: str) -> None:
        if self._meta_export is None or (self._meta_export != name and self._meta_export != info.name):
            self.contexts = {}
        self.export = info
        self._size = info.size
        self._min_block = info.min_block
        self._max_payload = info.max_payload
        self._read_only = info.read_only
        tx = info.transmission_flags(self.structured)
        fua = _FUA if tx & TxFlag.SEND_FUA else 0
        allowed = {cmd: (flags & ~_FUA) | fua for cmd, flags in _ALLOWED_FLAGS.items()}
        if not self.structured:
            allowed[_READ] &= ~_DF
        if not tx & TxFlag.SEND_FAST_ZERO:
            allowed[_ZEROES] &= ~_FAST_ZERO
        if not tx & TxFlag.SEND_FLUSH:
            del allowed[_FLUSH]
        if not tx & (TxFlag.SEND_TRIM | TxFlag.READ_ONLY):
            del allowed[_TRIM]
        if not tx & (TxFlag.SEND_WRITE_ZEROES | TxFlag.READ_ONLY):
            del allowed[_ZEROES]
        if not self.contexts:
            del allowed[_BLOCK_STATUS]
        self._allowed = allowed
        self._transition("go")

    def data_to_send(self) -> bytes:
        """Handshake bytes queued so far (empty once nothing is pending)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- transmission -------------------------------------------------------------------------

    def _read_request(self) -> Event:
        start = self._start
        if self._end - start < 28:
            return NEED_DATA
        magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(self._buf, start)
        self._start = start + 28
        if magic != REQUEST_MAGIC:
            raise self._remote_error(f"request magic {magic:#x} is wrong")
        if cmd == _DISC:
            self._transition("disc")
            return Disconnect("disc")
        error, message = self._check(cmd, flags, offset, length)
        if cmd != _WRITE:
            if error:
                return Request(cmd, flags, cookie, offset, length, None, error, message)
            return Request(cmd, flags, cookie, offset, length)
        req = Request(cmd, flags, cookie, offset, length, None, error, message)
        return self._receive_payload(req)

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str]:
        """(0, "") for a valid request, else (NBD error, message); see the module docstring."""
        allowed = self._allowed.get(cmd)
        if allowed is None:
            return _EINVAL, f"command {cmd} is not supported on this export"
        if flags & ~allowed:
            return _EINVAL, f"flags {flags:#x} are not valid for command {cmd}"
        if cmd in (_READ, _WRITE):
            if length > self._max_payload:
                return _EOVERFLOW, f"length {length} exceeds the maximum payload {self._max_payload}"
        elif cmd == _FLUSH:
            return (_EINVAL, "flush offset and length must be zero") if offset or length else (0, "")
        if cmd in _WRITES and self._read_only:
            return _EPERM, "the export is read-only"
        end = offset + length
        if end > self._size:
            code = _ENOSPC if cmd in (_WRITE, _ZEROES) else _EINVAL
            return code, f"range [{offset}, {end}) is beyond the end of the export ({self._size})"
        mb = self._min_block
        if mb > 1 and (offset % mb or (length % mb and end != self._size)):
            return _EINVAL, f"range [{offset}, {end}) is not aligned to the minimum block size {mb}"
        return 0, ""

    def _receive_payload(self, req: Request) -> Event:
        length = req.length
        if req.error:
            if length > DRAIN_LIMIT:
                raise self._remote_error(f"write payload of {length} bytes is too large")
            have = min(length, self._end - self._start)
            self._start += have
            if have == length:
                return req
            self._held, self._drain_left, self._mode = req, length - have, _MODE_DRAIN
            return NEED_DATA
        payload = self._alloc(length)
        have = min(length, self._end - self._start)
        if have:
            s = self._start
            payload[:have] = memoryview(self._buf)[s : s + have]
            self._start = s + have
        if have == length:
            req.payload = payload
            return req
        self._held, self._payload, self._filled = req, payload, have
        self._payload_view = memoryview(payload)
        self._mode = _MODE_PAYLOAD
        return NEED_DATA

    # -- transmission replies (thread-safe: they read only state frozen at GO) -------------------

    def reply_ok(self, cookie: int) -> bytes:
        """Success for any command but READ and BLOCK_STATUS."""
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def reply_error(self, cookie: int, error: int, message: str = "") -> bytes:
        """An error reply (a structured ERROR chunk carrying the message when negotiated)."""
        if not self.structured:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
        raw = message.encode()[:MAX_STRING]
        return (
            CHUNK_ERROR.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.ERROR, cookie, 6 + len(raw), error, len(raw)
            )
            + raw
        )

    def reply_read(self, cookie: int, offset: int, length: int) -> bytes:
        """The header to send before ``length`` bytes of data read at ``offset`` (one chunk, DONE)."""
        if not self.structured:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
        if length == 0:
            return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.NONE, cookie, 0)
        return CHUNK_OFFSET_DATA.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.OFFSET_DATA, cookie, 8 + length, offset
        )

    def reply_block_status(self, cookie: int, extents: Sequence[tuple[int, int]]) -> bytes:
        """One BLOCK_STATUS chunk per selected context; extents are (length, flags), at least one."""
        if not extents:
            raise LocalProtocolError("a block status reply needs at least one extent")
        extents = extents[:MAX_EXTENTS]
        body = b"".join(EXTENT.pack(n, f) for n, f in extents)
        out = bytearray()
        ids = sorted(self.contexts)
        for i, ctx_id in enumerate(ids):
            flags = REPLY_FLAG_DONE if i == len(ids) - 1 else 0
            out += CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, ReplyType.BLOCK_STATUS, cookie, 4 + len(body))
            out += U32.pack(ctx_id)
            out += body
        return bytes(out)


_TRANSMISSION = State.TRANSMISSION
_READERS: dict[State, Callable[[ServerConnection], Event]] = {
    State.GREETING: ServerConnection._read_client_flags,
    State.OPTIONS: ServerConnection._read_option,
    State.ANSWER: ServerConnection._read_answer_pending,
    State.TLS: ServerConnection._read_tls_pending,
    State.TRANSMISSION: ServerConnection._read_request,
}

_OPTION_HANDLERS: dict[int, Callable[[ServerConnection, int, bytes], Event | None]] = {
    Opt.EXPORT_NAME: ServerConnection._opt_export_name,
    Opt.ABORT: ServerConnection._opt_abort,
    Opt.LIST: ServerConnection._opt_list,
    Opt.INFO: ServerConnection._opt_info_go,
    Opt.GO: ServerConnection._opt_info_go,
    Opt.STRUCTURED_REPLY: ServerConnection._opt_structured_reply,
    Opt.STARTTLS: ServerConnection._opt_starttls,
    Opt.LIST_META_CONTEXT: ServerConnection._opt_meta_context,
    Opt.SET_META_CONTEXT: ServerConnection._opt_meta_context,
}


def _parse_meta_request(data: bytes) -> tuple[str, tuple[str, ...]] | None:
    """(export name, queries) of a LIST/SET_META_CONTEXT option, or None if malformed."""
    if len(data) < 8:
        return None
    (namelen,) = U32.unpack_from(data, 0)
    if namelen > len(data) - 8:
        return None
    name = _decode_string(data[4 : 4 + namelen])
    pos = 4 + namelen
    (count,) = U32.unpack_from(data, pos)
    pos += 4
    if name is None or count > (len(data) - pos) // 4:
        return None
    queries = []
    for _ in range(count):
        if len(data) - pos < 4:
            return None
        (qlen,) = U32.unpack_from(data, pos)
        pos += 4
        if qlen > len(data) - pos:
            return None
        q = _decode_string(data[pos : pos + qlen])
        if q is None:
            return None
        queries.append(q)
        pos += qlen
    if pos != len(data):
        return None
    return name, tuple(queries)


def _valid_query(query: str) -> bool:
    namespace, colon, _leaf = query.partition(":")
    return bool(colon and namespace)


def _match_contexts(queries: tuple[str, ...], listing: bool) -> list[str]:
    """The contexts the queries name: ``base:allocation`` is our only one; ``base:`` lists it;
    unknown namespaces and leaves are ignored (proto.md "Metadata querying")."""
    if not queries:
        return [BASE_ALLOCATION] if listing else []
    for q in queries:
        namespace, _, leaf = q.partition(":")
        if namespace == "base" and (leaf == "allocation" or (listing and leaf == "")):
            return [BASE_ALLOCATION]
    return []
