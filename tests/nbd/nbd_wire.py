"""The client's half of the NBD wire format, for tests: message builders and a reply parser.

Builders return the bytes a client sends; ``ReplyParser`` splits what a server sends into typed
tuples (option replies, simple replies, structured chunks).  Nothing here is clever on purpose:
it is the independent reading of proto.md that ``devmapper.nbd.protocol`` is checked against.
"""

from __future__ import annotations

import dataclasses
import struct

IHAVEOPT = 0x49484156454F5054
NBDMAGIC = 0x4E42444D41474943
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF


def client_flags(flags: int = 3) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def info_go(opt: int, name: str, requests: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(requests))
    body += b"".join(struct.pack(">H", r) for r in requests)
    return option(opt, body)


def meta(opt: int, name: str, queries: tuple[str, ...]) -> bytes:
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q.encode())) + q.encode()
    return option(opt, body)


def request(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 1, payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


@dataclasses.dataclass(frozen=True)
class OptReply:
    option: int
    type: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class SimpleReply:
    error: int
    cookie: int
    data: bytes = b""


@dataclasses.dataclass(frozen=True)
class Chunk:
    flags: int
    type: int
    cookie: int
    data: bytes


def parse_greeting(raw: bytes) -> int:
    magic, opt, flags = struct.unpack(">QQH", raw[:18])
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
    return int(flags)


def parse_option_replies(raw: bytes) -> list[OptReply]:
    out, pos = [], 0
    while pos < len(raw):
        magic, opt, typ, length = struct.unpack_from(">QIII", raw, pos)
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        pos += 20
        out.append(OptReply(opt, typ, raw[pos : pos + length]))
        pos += length
    return out


def parse_replies(raw: bytes, read_lengths: dict[int, int] | None = None) -> list[SimpleReply | Chunk]:
    """Split transmission replies; ``read_lengths`` maps cookies of successful simple-reply READs
    to the data length that follows them."""
    out: list[SimpleReply | Chunk] = []
    pos = 0
    while pos < len(raw):
        (magic,) = struct.unpack_from(">I", raw, pos)
        if magic == SIMPLE_MAGIC:
            _, error, cookie = struct.unpack_from(">IIQ", raw, pos)
            pos += 16
            n = (read_lengths or {}).get(cookie, 0) if error == 0 else 0
            out.append(SimpleReply(error, cookie, raw[pos : pos + n]))
            pos += n
        elif magic == STRUCTURED_MAGIC:
            _, flags, typ, cookie, length = struct.unpack_from(">IHHQI", raw, pos)
            pos += 20
            out.append(Chunk(flags, typ, cookie, raw[pos : pos + length]))
            pos += length
        else:
            raise AssertionError(f"bad reply magic {magic:#x} at {pos}")
    return out


def chunk_error(chunk: Chunk) -> tuple[int, str]:
    error, msglen = struct.unpack_from(">IH", chunk.data)
    return error, chunk.data[6 : 6 + msglen].decode()


def chunk_extents(chunk: Chunk) -> tuple[int, list[tuple[int, int]]]:
    (ctx,) = struct.unpack_from(">I", chunk.data)
    body = chunk.data[4:]
    return ctx, [struct.unpack_from(">II", body, i) for i in range(0, len(body), 8)]
