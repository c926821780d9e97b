"""The sans-IO core: every handshake option and every command, fed whole, one byte at a time and
followed by trailing data; replies checked with the independent client codec in ``wire.py``;
garbage in gives only ``NbdProtocolError``."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

import nbd_wire as wire
import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmapper.nbd import protocol as p
from devmapper.nbd.protocol import Cmd, CmdFlag, Errno, Info, Opt, Rep, TxFlag

DISK = p.ExportInfo("disk", 1 << 20, description="a test disk")
RO = p.ExportInfo("ro", 8192 + 100, read_only=True)
ALIGNED = p.ExportInfo("aligned", 1 << 20, min_block=512, max_payload=1 << 16)
EXPORTS = {e.name: e for e in (DISK, RO, ALIGNED)}


def answer(conn: p.ServerConnection, ev: p.ExportQuery | p.ListQuery) -> None:
    if isinstance(ev, p.ListQuery):
        conn.answer_list([(n, EXPORTS[n].description) for n in sorted(EXPORTS)])
    else:
        conn.answer_export(EXPORTS.get(ev.name or "disk"))


Split = Callable[[bytes], list[bytes]]
SPLITS: dict[str, Split] = {
    "whole": lambda b: [b],
    "bytewise": lambda b: [b[i : i + 1] for i in range(len(b))],
    "halves": lambda b: [b[: len(b) // 2], b[len(b) // 2 :]],
}


@dataclasses.dataclass
class Run:
    conn: p.ServerConnection
    events: list[object]
    out: bytes


def drive(data: bytes, split: Split = SPLITS["whole"], conn: p.ServerConnection | None = None) -> Run:
    """Feed data in the split's pieces, drain events after each piece, answer queries from EXPORTS."""
    conn = conn or p.ServerConnection(buffer_size=8192)
    events: list[object] = []
    out = bytearray()
    for piece in split(data):
        conn.receive_data(piece)
        while True:
            ev = conn.next_event()
            out += conn.data_to_send()
            if ev is p.NEED_DATA:
                break
            events.append(ev)
            if isinstance(ev, (p.ExportQuery, p.ListQuery)):
                answer(conn, ev)
                out += conn.data_to_send()
            if isinstance(ev, (p.Disconnect, p.ConnectionClosed)):
                break
    return Run(conn, events, bytes(out))


GREETING_LEN = 18


def handshake(body: bytes, split: Split = SPLITS["whole"], flags: int = 3) -> tuple[Run, list[wire.OptReply]]:
    run = drive(wire.client_flags(flags) + body, split)
    greeting, rest = run.out[:GREETING_LEN], run.out[GREETING_LEN:]
    assert wire.parse_greeting(greeting) == 3  # FIXED_NEWSTYLE | NO_ZEROES
    if run.conn.state is p.State.TRANSMISSION or not rest:
        return run, []
    return run, wire.parse_option_replies(rest)


# -- the handshake, one case per option -----------------------------------------------------------

SR = wire.option(Opt.STRUCTURED_REPLY)


@dataclasses.dataclass(frozen=True)
class OptCase:
    name: str
    body: bytes
    replies: list[tuple[int, int]]  # (option, reply type)
    events: list[object]
    state: p.State = p.State.OPTIONS


OPTION_CASES = [
    OptCase("structured_reply", SR, [(8, Rep.ACK)], []),
    OptCase("structured_reply_twice", SR + SR, [(8, Rep.ACK), (8, Rep.ERR_INVALID)], []),
    OptCase("structured_reply_with_data", wire.option(8, b"x"), [(8, Rep.ERR_INVALID)], []),
    OptCase("list", wire.option(Opt.LIST), [(3, Rep.SERVER)] * 3 + [(3, Rep.ACK)], [p.ListQuery()]),
    OptCase("list_with_data", wire.option(Opt.LIST, b"junk"), [(3, Rep.ERR_INVALID)], []),
    OptCase(
        "info", wire.info_go(Opt.INFO, "disk", (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE)),
        [(6, Rep.INFO)] * 4 + [(6, Rep.ACK)], [p.ExportQuery(Opt.INFO, "disk", (1, 2, 3))],
    ),
    OptCase("info_unknown", wire.info_go(Opt.INFO, "nope"), [(6, Rep.ERR_UNKNOWN)], [p.ExportQuery(Opt.INFO, "nope")]),
    OptCase("info_name_too_long", wire.option(Opt.INFO, struct.pack(">I", 99) + b"disk\0\0"),
            [(6, Rep.ERR_INVALID)], []),
    OptCase("info_too_short", wire.option(Opt.INFO, b"\0\0\0"), [(6, Rep.ERR_INVALID)], []),
    OptCase("info_count_mismatch", wire.option(Opt.INFO, struct.pack(">I", 4) + b"disk\0\x02\0\x01"),
            [(6, Rep.ERR_INVALID)], []),
    OptCase("info_bad_utf8", wire.option(Opt.INFO, struct.pack(">I", 2) + b"\xff\xfe\0\0"), [(6, Rep.ERR_INVALID)], []),
    OptCase("info_nul_in_name", wire.option(Opt.INFO, struct.pack(">I", 2) + b"a\0\0\0"), [(6, Rep.ERR_INVALID)], []),
    OptCase("go", wire.info_go(Opt.GO, "disk"), [], [p.ExportQuery(Opt.GO, "disk")], p.State.TRANSMISSION),
    OptCase("go_unknown", wire.info_go(Opt.GO, "nope"), [(7, Rep.ERR_UNKNOWN)], [p.ExportQuery(Opt.GO, "nope")]),
    OptCase("export_name_unknown", wire.option(Opt.EXPORT_NAME, b"nope"), [],
            [p.ExportQuery(Opt.EXPORT_NAME, "nope"), p.Disconnect("finished")], p.State.DONE),
    OptCase("abort", wire.option(Opt.ABORT), [(2, Rep.ACK)], [p.Disconnect("abort")], p.State.DONE),
    OptCase("abort_with_data", wire.option(Opt.ABORT, b"ignored"), [(2, Rep.ACK)], [p.Disconnect("abort")],
            p.State.DONE),
    OptCase("starttls", wire.option(Opt.STARTTLS), [(5, Rep.ERR_UNSUP)], []),
    OptCase("peek_export", wire.option(Opt.PEEK_EXPORT), [(4, Rep.ERR_UNSUP)], []),
    OptCase("extended_headers", wire.option(Opt.EXTENDED_HEADERS), [(11, Rep.ERR_UNSUP)], []),
    OptCase("unknown", wire.option(0x7777, b"whatever"), [(0x7777, Rep.ERR_UNSUP)], []),
    OptCase("list_meta_needs_sr", wire.meta(Opt.LIST_META_CONTEXT, "disk", ()), [(9, Rep.ERR_INVALID)], []),
    OptCase("set_meta_needs_sr", wire.meta(Opt.SET_META_CONTEXT, "disk", ("base:allocation",)),
            [(10, Rep.ERR_INVALID)], []),
    OptCase("list_meta_all", SR + wire.meta(Opt.LIST_META_CONTEXT, "disk", ()),
            [(8, Rep.ACK), (9, Rep.META_CONTEXT), (9, Rep.ACK)], [p.ExportQuery(Opt.LIST_META_CONTEXT, "disk")]),
    OptCase("list_meta_base_wildcard", SR + wire.meta(Opt.LIST_META_CONTEXT, "disk", ("base:",)),
            [(8, Rep.ACK), (9, Rep.META_CONTEXT), (9, Rep.ACK)],
            [p.ExportQuery(Opt.LIST_META_CONTEXT, "disk", queries=("base:",))]),
    OptCase("list_meta_other_namespace", SR + wire.meta(Opt.LIST_META_CONTEXT, "disk", ("qemu:allocation-depth",)),
            [(8, Rep.ACK), (9, Rep.ACK)],
            [p.ExportQuery(Opt.LIST_META_CONTEXT, "disk", queries=("qemu:allocation-depth",))]),
    OptCase("set_meta", SR + wire.meta(Opt.SET_META_CONTEXT, "disk", ("base:allocation",)),
            [(8, Rep.ACK), (10, Rep.META_CONTEXT), (10, Rep.ACK)],
            [p.ExportQuery(Opt.SET_META_CONTEXT, "disk", queries=("base:allocation",))]),
    OptCase("set_meta_base_wildcard_selects_nothing", SR + wire.meta(Opt.SET_META_CONTEXT, "disk", ("base:",)),
            [(8, Rep.ACK), (10, Rep.ACK)], [p.ExportQuery(Opt.SET_META_CONTEXT, "disk", queries=("base:",))]),
    OptCase("set_meta_no_namespace", SR + wire.meta(Opt.SET_META_CONTEXT, "disk", ("allocation",)),
            [(8, Rep.ACK), (10, Rep.ERR_INVALID)], []),
    OptCase("set_meta_unknown_export", SR + wire.meta(Opt.SET_META_CONTEXT, "nope", ("base:allocation",)),
            [(8, Rep.ACK), (10, Rep.ERR_UNKNOWN)],
            [p.ExportQuery(Opt.SET_META_CONTEXT, "nope", queries=("base:allocation",))]),
    OptCase("set_meta_trailing_bytes", SR + wire.option(Opt.SET_META_CONTEXT, struct.pack(">I", 0) + bytes(5)),
            [(8, Rep.ACK), (10, Rep.ERR_INVALID)], []),
    OptCase("set_meta_query_too_long", SR + wire.option(Opt.SET_META_CONTEXT, struct.pack(">III", 0, 1, 50) + b"x"),
            [(8, Rep.ACK), (10, Rep.ERR_INVALID)], []),
    OptCase("oversized_option", wire.option(Opt.INFO, bytes(p.MAX_OPTION_DATA + 1)), [(6, Rep.ERR_TOO_BIG)], []),
]


@pytest.mark.parametrize("split", SPLITS, ids=str)
@pytest.mark.parametrize("case", OPTION_CASES, ids=lambda c: c.name)
def test_option_parsed_whole_bytewise_and_split(case: OptCase, split: str) -> None:
    run, replies = handshake(case.body, SPLITS[split])
    assert [(r.option, r.type) for r in replies] == case.replies
    assert run.events == case.events
    assert run.conn.state is case.state


@pytest.mark.parametrize("case", [c for c in OPTION_CASES if c.state is p.State.OPTIONS], ids=lambda c: c.name)
def test_option_followed_by_trailing_option(case: OptCase) -> None:
    """The next option in the same bytes is parsed after the case's own replies."""
    run, replies = handshake(case.body + wire.option(Opt.ABORT), SPLITS["whole"])
    assert [(r.option, r.type) for r in replies] == [*case.replies, (2, Rep.ACK)]
    assert run.events == [*case.events, p.Disconnect("abort")]


def test_info_replies_carry_size_flags_name_description_and_block_sizes() -> None:
    _, replies = handshake(wire.info_go(Opt.INFO, "disk", (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE)))
    infos = {struct.unpack_from(">H", r.data)[0]: r.data[2:] for r in replies if r.type == Rep.INFO}
    size, flags = struct.unpack(">QH", infos[Info.EXPORT])
    assert size == 1 << 20
    want = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES
    want |= TxFlag.SEND_FAST_ZERO | TxFlag.CAN_MULTI_CONN | TxFlag.SEND_CACHE
    assert flags == want  # no DF: structured replies were not negotiated
    assert infos[Info.NAME] == b"disk"
    assert infos[Info.DESCRIPTION] == b"a test disk"
    assert struct.unpack(">III", infos[Info.BLOCK_SIZE]) == (1, 4096, 32 << 20)


def test_read_only_export_flags_and_default_name() -> None:
    _run, replies = handshake(SR + wire.info_go(Opt.INFO, "ro"))
    (_, flags) = struct.unpack(">QH", replies[1].data[2:])
    assert flags & TxFlag.READ_ONLY and flags & TxFlag.SEND_DF
    assert not flags & (TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO)
    _, replies = handshake(wire.info_go(Opt.INFO, ""))  # default export: the canonical name is sent
    names = [r.data[2:] for r in replies if r.type == Rep.INFO and r.data[:2] == b"\0\1"]
    assert names == [b"disk"]


def test_list_replies_name_and_description() -> None:
    _, replies = handshake(wire.option(Opt.LIST))
    servers = [(r.data[4 : 4 + struct.unpack_from(">I", r.data)[0]], r.data[4 + struct.unpack_from(">I", r.data)[0] :])
               for r in replies if r.type == Rep.SERVER]
    assert servers == [(b"aligned", b""), (b"disk", b"a test disk"), (b"ro", b"")]


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name_reply_with_and_without_zeroes(no_zeroes: bool) -> None:
    flags = 3 if no_zeroes else 1
    run = drive(wire.client_flags(flags) + wire.option(Opt.EXPORT_NAME, b"disk"))
    reply = run.out[GREETING_LEN:]
    assert len(reply) == 10 + (0 if no_zeroes else 124)
    assert struct.unpack(">QH", reply[:10]) == (1 << 20, DISK.transmission_flags(False))
    assert run.conn.state is p.State.TRANSMISSION


def test_set_meta_context_selects_base_allocation_for_go() -> None:
    body = SR + wire.meta(Opt.SET_META_CONTEXT, "disk", ("base:allocation", "x-other:thing")) + wire.info_go(7, "disk")
    run, _ = handshake(body)
    assert run.conn.contexts == {p.BASE_ALLOCATION_ID: p.BASE_ALLOCATION}
    assert run.conn.structured


def test_contexts_dropped_when_go_names_another_export() -> None:
    body = SR + wire.meta(Opt.SET_META_CONTEXT, "ro", ("base:allocation",)) + wire.info_go(7, "disk")
    run, _ = handshake(body)
    assert run.conn.contexts == {}


def test_failed_set_meta_clears_earlier_selection() -> None:
    body = SR + wire.meta(10, "disk", ("base:allocation",)) + wire.meta(10, "disk", ("nons",)) + wire.info_go(7, "disk")
    run, _ = handshake(body)
    assert run.conn.contexts == {}


def test_oversized_option_data_is_drained_and_the_next_option_works() -> None:
    big = wire.option(0x4242, bytes(p.MAX_OPTION_DATA + 10))
    for split in ("whole", "halves"):
        _run, replies = handshake(big + SR + wire.option(Opt.ABORT), SPLITS[split])
        assert [(r.option, r.type) for r in replies] == [(0x4242, Rep.ERR_TOO_BIG), (8, Rep.ACK), (2, Rep.ACK)]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(wire.client_flags(4), id="unknown_client_flag"),
        pytest.param(wire.client_flags(3) + struct.pack(">QII", 0x1234, 1, 0), id="bad_option_magic"),
        pytest.param(wire.client_flags(3) + wire.option(Opt.EXPORT_NAME, b"\xff"), id="export_name_not_utf8"),
        pytest.param(wire.client_flags(3) + wire.option(Opt.EXPORT_NAME, bytes(p.MAX_OPTION_DATA + 1)),
                     id="export_name_too_long"),
    ],
)
def test_protocol_violations_raise_remote_error(body: bytes) -> None:
    with pytest.raises(p.RemoteProtocolError):
        drive(body)


def test_eof_during_handshake() -> None:
    conn = p.ServerConnection()
    conn.receive_data(wire.client_flags() + wire.option(Opt.LIST)[:5])
    conn.receive_data(b"")
    assert conn.next_event() == p.ConnectionClosed(partial=True)
    assert conn.state is p.State.CLOSED and conn.finished
    conn = p.ServerConnection()
    conn.receive_data(b"")
    assert conn.next_event() == p.ConnectionClosed(partial=False)


def test_caller_misuse_is_a_local_error() -> None:
    conn = p.ServerConnection()
    with pytest.raises(p.LocalProtocolError):
        conn.answer_export(DISK)
    conn.receive_data(wire.client_flags() + wire.info_go(Opt.GO, "disk"))
    assert isinstance(conn.next_event(), p.ExportQuery)
    with pytest.raises(p.LocalProtocolError):
        conn.next_event()  # the query has not been answered
    with pytest.raises(p.LocalProtocolError):
        conn.answer_list([])
    conn.answer_error(Rep.ERR_SHUTDOWN, "going away")
    assert conn.state is p.State.OPTIONS


def test_export_info_validates_block_sizes() -> None:
    for bad in ({"min_block": 3}, {"min_block": 1 << 17}, {"preferred_block": 256}, {"max_payload": 1024}):
        with pytest.raises(p.LocalProtocolError):
            p.ExportInfo("x", 0, **bad)  # type: ignore[arg-type]


# -- transmission ---------------------------------------------------------------------------------


def transmission(export: str = "disk", structured: bool = True, meta: bool = True) -> p.ServerConnection:
    body = wire.client_flags()
    if structured:
        body += SR
        if meta:
            body += wire.meta(Opt.SET_META_CONTEXT, export, ("base:allocation",))
    body += wire.info_go(Opt.GO, export)
    run = drive(body)
    assert run.conn.state is p.State.TRANSMISSION
    return run.conn


@dataclasses.dataclass(frozen=True)
class ReqCase:
    name: str
    data: bytes
    want: p.Request | p.Disconnect
    export: str = "disk"
    structured: bool = True
    meta: bool = True


def R(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes | None = None, error: int = 0,
      cookie: int = 1) -> p.Request:
    return p.Request(cmd, flags, cookie, offset, length, None if payload is None else bytearray(payload), error)


W4K = bytes(range(256)) * 16
REQUEST_CASES = [
    ReqCase("read", wire.request(Cmd.READ, 4096, 512), R(Cmd.READ, 4096, 512)),
    ReqCase("read_df", wire.request(Cmd.READ, 0, 512, CmdFlag.DF), R(Cmd.READ, 0, 512, CmdFlag.DF)),
    ReqCase("read_fua", wire.request(Cmd.READ, 0, 512, CmdFlag.FUA), R(Cmd.READ, 0, 512, CmdFlag.FUA)),
    ReqCase("read_zero_length", wire.request(Cmd.READ, 0, 0), R(Cmd.READ, 0, 0)),
    ReqCase("read_to_end", wire.request(Cmd.READ, (1 << 20) - 1, 1), R(Cmd.READ, (1 << 20) - 1, 1)),
    ReqCase("write", wire.request(Cmd.WRITE, 8192, 4096, payload=W4K), R(Cmd.WRITE, 8192, 4096, payload=W4K)),
    ReqCase("write_fua", wire.request(Cmd.WRITE, 0, 4096, CmdFlag.FUA, payload=W4K),
            R(Cmd.WRITE, 0, 4096, CmdFlag.FUA, payload=W4K)),
    ReqCase("write_empty", wire.request(Cmd.WRITE, 0, 0), R(Cmd.WRITE, 0, 0, payload=b"")),
    ReqCase("flush", wire.request(Cmd.FLUSH), R(Cmd.FLUSH)),
    ReqCase("trim", wire.request(Cmd.TRIM, 0, 1 << 20), R(Cmd.TRIM, 0, 1 << 20)),
    ReqCase("trim_fua", wire.request(Cmd.TRIM, 0, 4096, CmdFlag.FUA), R(Cmd.TRIM, 0, 4096, CmdFlag.FUA)),
    ReqCase("cache", wire.request(Cmd.CACHE, 0, 65536), R(Cmd.CACHE, 0, 65536)),
    ReqCase("write_zeroes", wire.request(Cmd.WRITE_ZEROES, 0, 65536, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
            R(Cmd.WRITE_ZEROES, 0, 65536, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO)),
    ReqCase("block_status", wire.request(Cmd.BLOCK_STATUS, 0, 1 << 20, CmdFlag.REQ_ONE),
            R(Cmd.BLOCK_STATUS, 0, 1 << 20, CmdFlag.REQ_ONE)),
    ReqCase("disc", wire.request(Cmd.DISC), p.Disconnect("disc")),
    # errors: the request is still consumed whole, payload included
    ReqCase("unknown_command", wire.request(42, 0, 512), R(42, 0, 512, error=Errno.EINVAL)),
    ReqCase("unknown_flag", wire.request(Cmd.READ, 0, 512, 0x80), R(Cmd.READ, 0, 512, 0x80, error=Errno.EINVAL)),
    ReqCase("flag_of_another_command", wire.request(Cmd.WRITE, 0, 4096, CmdFlag.DF, payload=W4K),
            R(Cmd.WRITE, 0, 4096, CmdFlag.DF, error=Errno.EINVAL)),
    ReqCase("df_without_structured_replies", wire.request(Cmd.READ, 0, 512, CmdFlag.DF),
            R(Cmd.READ, 0, 512, CmdFlag.DF, error=Errno.EINVAL), structured=False),
    ReqCase("read_past_end", wire.request(Cmd.READ, 1 << 20, 1), R(Cmd.READ, 1 << 20, 1, error=Errno.EINVAL)),
    ReqCase("read_offset_overflow", wire.request(Cmd.READ, (1 << 64) - 1, 2),
            R(Cmd.READ, (1 << 64) - 1, 2, error=Errno.EINVAL)),
    ReqCase("write_past_end", wire.request(Cmd.WRITE, (1 << 20) - 4095, 4096, payload=W4K),
            R(Cmd.WRITE, (1 << 20) - 4095, 4096, error=Errno.ENOSPC)),
    ReqCase("zeroes_past_end", wire.request(Cmd.WRITE_ZEROES, 1 << 20, 1), R(6, 1 << 20, 1, error=Errno.ENOSPC)),
    ReqCase("trim_past_end", wire.request(Cmd.TRIM, 1 << 20, 1), R(Cmd.TRIM, 1 << 20, 1, error=Errno.EINVAL)),
    ReqCase("cache_past_end", wire.request(Cmd.CACHE, 1 << 20, 1), R(Cmd.CACHE, 1 << 20, 1, error=Errno.EINVAL)),
    ReqCase("block_status_past_end", wire.request(Cmd.BLOCK_STATUS, 0, (1 << 20) + 1),
            R(Cmd.BLOCK_STATUS, 0, (1 << 20) + 1, error=Errno.EINVAL)),
    ReqCase("flush_with_range", wire.request(Cmd.FLUSH, 0, 1), R(Cmd.FLUSH, 0, 1, error=Errno.EINVAL)),
    ReqCase("block_status_without_context", wire.request(Cmd.BLOCK_STATUS, 0, 512),
            R(Cmd.BLOCK_STATUS, 0, 512, error=Errno.EINVAL), meta=False),
    ReqCase("write_read_only", wire.request(Cmd.WRITE, 0, 4096, payload=W4K),
            R(Cmd.WRITE, 0, 4096, error=Errno.EPERM), export="ro"),
    ReqCase("trim_read_only", wire.request(Cmd.TRIM, 0, 4096), R(Cmd.TRIM, 0, 4096, error=Errno.EPERM), export="ro"),
    ReqCase("zeroes_read_only", wire.request(Cmd.WRITE_ZEROES, 0, 4096), R(6, 0, 4096, error=Errno.EPERM), export="ro"),
    ReqCase("fast_zero_not_advertised", wire.request(Cmd.WRITE_ZEROES, 0, 4096, CmdFlag.FAST_ZERO),
            R(6, 0, 4096, CmdFlag.FAST_ZERO, error=Errno.EINVAL), export="ro"),
    ReqCase("read_read_only_unaligned_tail", wire.request(Cmd.READ, 8192, 100), R(Cmd.READ, 8192, 100), export="ro"),
    ReqCase("unaligned_offset", wire.request(Cmd.READ, 100, 512), R(Cmd.READ, 100, 512, error=Errno.EINVAL),
            export="aligned"),
    ReqCase("unaligned_length", wire.request(Cmd.WRITE, 0, 100, payload=bytes(100)),
            R(Cmd.WRITE, 0, 100, error=Errno.EINVAL), export="aligned"),
    ReqCase("aligned", wire.request(Cmd.READ, 512, 1024), R(Cmd.READ, 512, 1024), export="aligned"),
    ReqCase("read_over_max_payload", wire.request(Cmd.READ, 0, (1 << 16) + 512),
            R(Cmd.READ, 0, (1 << 16) + 512, error=Errno.EOVERFLOW), export="aligned"),
    ReqCase("write_over_max_payload", wire.request(Cmd.WRITE, 0, (1 << 16) + 512, payload=bytes((1 << 16) + 512)),
            R(Cmd.WRITE, 0, (1 << 16) + 512, error=Errno.EOVERFLOW), export="aligned"),
    ReqCase("trim_over_max_payload_is_fine", wire.request(Cmd.TRIM, 0, 1 << 20), R(Cmd.TRIM, 0, 1 << 20),
            export="aligned"),
]


def feed_requests(conn: p.ServerConnection, data: bytes, split: Split) -> list[object]:
    events: list[object] = []
    for piece in split(data):
        conn.receive_data(piece)
        while (ev := conn.next_event()) is not p.NEED_DATA:
            events.append(ev)
            if isinstance(ev, (p.Disconnect, p.ConnectionClosed)):
                return events
    return events


def same(got: object, want: object) -> bool:
    """Equal events; a rejected request must carry some message (its text is free) and no payload."""
    if isinstance(got, p.Request) and isinstance(want, p.Request) and want.error:
        return (got.command, got.flags, got.offset, got.length, got.error, got.payload) == (
            want.command, want.flags, want.offset, want.length, want.error, None) and bool(got.message)
    return got == want


@pytest.mark.parametrize("split", SPLITS, ids=str)
@pytest.mark.parametrize("case", REQUEST_CASES, ids=lambda c: c.name)
def test_request_parsed_whole_bytewise_and_split(case: ReqCase, split: str) -> None:
    conn = transmission(case.export, case.structured, case.meta)
    events = feed_requests(conn, case.data, SPLITS[split])
    assert len(events) == 1 and same(events[0], case.want), events


@pytest.mark.parametrize("case", [c for c in REQUEST_CASES if c.name != "disc"], ids=lambda c: c.name)
def test_request_followed_by_trailing_request(case: ReqCase) -> None:
    conn = transmission(case.export, case.structured, case.meta)
    events = feed_requests(conn, case.data + wire.request(Cmd.READ, 0, 512, cookie=99), SPLITS["whole"])
    assert len(events) == 2 and same(events[0], case.want)
    assert events[1] == R(Cmd.READ, 0, 512, cookie=99)


def test_pipelined_requests_in_one_buffer() -> None:
    conn = transmission()
    data = b"".join(wire.request(Cmd.WRITE, i * 4096, 4096, cookie=i, payload=W4K) for i in range(40))
    events = feed_requests(conn, data + wire.request(Cmd.DISC), SPLITS["whole"])
    assert [e.cookie for e in events[:-1]] == list(range(40))  # type: ignore[attr-defined]
    assert events[-1] == p.Disconnect("disc")
    assert conn.state is p.State.DONE


def test_large_payload_is_received_into_its_own_buffer() -> None:
    conn = transmission()
    n = 512 << 10
    conn.receive_data(wire.request(Cmd.WRITE, 0, n, cookie=7) + b"\xaa" * 1000)
    assert conn.next_event() is p.NEED_DATA
    view = conn.get_buffer()
    assert len(view) == n - 1000  # exactly the rest of the payload
    view[:] = b"\xbb" * len(view)
    conn.buffer_updated(len(view))
    req = conn.next_event()
    assert isinstance(req, p.Request) and req.payload is not None
    assert req.payload[:1000] == b"\xaa" * 1000 and req.payload[1000:] == b"\xbb" * (n - 1000)
    assert conn.next_event() is p.NEED_DATA
    assert len(conn.get_buffer()) >= 4096  # back to headers


def test_custom_payload_allocator() -> None:
    made: list[int] = []

    def alloc(n: int) -> bytearray:
        made.append(n)
        return bytearray(n)

    conn = p.ServerConnection(allocator=alloc)
    drive(wire.client_flags() + wire.info_go(Opt.GO, "disk"), conn=conn)
    feed_requests(conn, wire.request(Cmd.WRITE, 0, 4096, payload=W4K), SPLITS["whole"])
    assert made == [4096]


def test_eof_in_the_middle_of_a_payload() -> None:
    conn = transmission()
    conn.receive_data(wire.request(Cmd.WRITE, 0, 4096) + bytes(100))
    assert conn.next_event() is p.NEED_DATA
    conn.receive_data(b"")
    assert conn.next_event() == p.ConnectionClosed(partial=True)


def test_bad_request_magic_is_a_remote_error() -> None:
    conn = transmission()
    conn.receive_data(struct.pack(">IHHQQI", 0x12560953, 0, 0, 1, 0, 512))
    with pytest.raises(p.RemoteProtocolError):
        conn.next_event()
    assert conn.state is p.State.ERROR


def test_huge_rejected_write_payload_disconnects() -> None:
    conn = transmission("ro")
    conn.receive_data(wire.request(Cmd.WRITE, 0, p.DRAIN_LIMIT + 1))
    with pytest.raises(p.RemoteProtocolError):
        conn.next_event()


# -- replies --------------------------------------------------------------------------------------


def test_simple_replies() -> None:
    conn = transmission(structured=False)
    raw = conn.reply_read(5, 0, 3) + b"abc" + conn.reply_ok(6) + conn.reply_error(7, Errno.ENOSPC, "full")
    assert wire.parse_replies(raw, {5: 3}) == [
        wire.SimpleReply(0, 5, b"abc"), wire.SimpleReply(0, 6), wire.SimpleReply(Errno.ENOSPC, 7)]


def test_structured_replies() -> None:
    conn = transmission()
    raw = conn.reply_read(5, 4096, 3) + b"abc" + conn.reply_read(6, 0, 0) + conn.reply_error(7, Errno.EIO, "bad")
    raw += conn.reply_block_status(8, [(4096, 0), (8192, p.STATE_HOLE | p.STATE_ZERO)])
    c5, c6, c7, c8 = wire.parse_replies(raw)
    assert isinstance(c5, wire.Chunk) and (c5.flags, c5.type, c5.cookie) == (1, p.ReplyType.OFFSET_DATA, 5)
    assert c5.data == struct.pack(">Q", 4096) + b"abc"
    assert isinstance(c6, wire.Chunk) and (c6.flags, c6.type, c6.data) == (1, p.ReplyType.NONE, b"")
    assert isinstance(c7, wire.Chunk) and c7.type == p.ReplyType.ERROR and wire.chunk_error(c7) == (5, "bad")
    assert isinstance(c8, wire.Chunk) and c8.flags == 1 and c8.type == p.ReplyType.BLOCK_STATUS
    assert wire.chunk_extents(c8) == (p.BASE_ALLOCATION_ID, [(4096, 0), (8192, 3)])


def test_errno_names_map_to_nbd_errors() -> None:
    assert [p.nbd_errno(n) for n in ("EROFS", "ENOSPC", "EFBIG", "EOPNOTSUPP", "EINVAL", "EWHATEVER")] == [
        Errno.EPERM, Errno.ENOSPC, Errno.ENOSPC, Errno.ENOTSUP, Errno.EINVAL, Errno.EIO]


# -- garbage in -----------------------------------------------------------------------------------


def _drain_garbage(conn: p.ServerConnection, data: bytes) -> None:
    try:
        conn.receive_data(data)
        for _ in range(10_000):
            ev = conn.next_event()
            conn.data_to_send()
            if ev is p.NEED_DATA or isinstance(ev, (p.Disconnect, p.ConnectionClosed)):
                return
            if isinstance(ev, (p.ExportQuery, p.ListQuery)):
                answer(conn, ev)
    except p.NbdProtocolError:
        pass


@given(st.binary(max_size=400))
def test_garbage_handshake_gives_only_protocol_errors(data: bytes) -> None:
    _drain_garbage(p.ServerConnection(), data)


@given(st.lists(st.sampled_from([
    wire.client_flags(), SR, wire.option(Opt.LIST), wire.info_go(Opt.INFO, "disk"), wire.info_go(Opt.GO, "ro"),
    wire.meta(Opt.SET_META_CONTEXT, "disk", ("base:allocation",)), wire.option(Opt.ABORT), b"\0", b"\xff" * 7,
    wire.request(Cmd.READ, 0, 512), wire.request(Cmd.WRITE, 0, 8, payload=bytes(8)),
]), max_size=8), st.binary(max_size=64))
def test_shuffled_messages_give_only_protocol_errors(parts: list[bytes], tail: bytes) -> None:
    _drain_garbage(p.ServerConnection(), b"".join(parts) + tail)


@given(st.binary(max_size=300))
def test_garbage_requests_give_only_protocol_errors(data: bytes) -> None:
    _drain_garbage(transmission(), data)
