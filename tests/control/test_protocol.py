"""The control protocol without sockets: framing whole, byte by byte, with trailing data; garbage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmapper.control.protocol import Decoder, ProtocolError, decode_bytes, encode, encode_bytes

MESSAGES = [
    {"id": 1, "op": "create", "args": {"name": "pool", "table": [[0, 8, "zero", ""]]}},
    {"id": 2, "ok": True, "result": None},
    {"id": 3, "ok": False, "error": {"errno": "EBUSY", "reason": "dévice \u2603", "stage": None, "devno": None}},
]


def test_whole_stream() -> None:
    data = b"".join(encode(m) for m in MESSAGES)
    assert Decoder().feed(data) == MESSAGES


def test_byte_by_byte() -> None:
    decoder, out = Decoder(), []
    for byte in b"".join(encode(m) for m in MESSAGES):
        got = decoder.feed(bytes([byte]))
        assert len(got) <= 1
        out += got
    assert out == MESSAGES
    assert decoder.pending == 0


def test_trailing_partial_line_is_kept() -> None:
    decoder = Decoder()
    whole = encode(MESSAGES[0])
    assert decoder.feed(whole + whole[:10]) == [MESSAGES[0]]
    assert decoder.pending == 10
    assert decoder.feed(whole[10:]) == [MESSAGES[0]]


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n", b"\xff\xfe\n", b'"text"\n'])
def test_bad_lines_raise_protocol_error_and_the_decoder_stays_failed(line: bytes) -> None:
    decoder = Decoder()
    with pytest.raises(ProtocolError):
        decoder.feed(line)
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(encode(MESSAGES[1]))


def test_overlong_lines_are_refused_before_they_end() -> None:
    decoder = Decoder(max_line=64)
    with pytest.raises(ProtocolError, match="longer than 64"):
        decoder.feed(b"{" + b" " * 100)


@given(st.binary(max_size=300))
def test_garbage_raises_only_protocol_error(data: bytes) -> None:
    decoder = Decoder(max_line=200)
    try:
        for message in decoder.feed(data):
            assert isinstance(message, dict)
    except ProtocolError:
        pass


def test_payload_round_trip_and_bad_base64() -> None:
    assert decode_bytes(encode_bytes(b"\0\1\2xyz")) == b"\0\1\2xyz"
    for bad in ("not base64!", 5, None):
        with pytest.raises(ProtocolError):
            decode_bytes(bad)
