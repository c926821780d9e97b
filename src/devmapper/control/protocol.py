"""The control socket protocol: newline-delimited JSON requests and responses, without I/O.

Theory of operation
-------------------
A client sends one JSON object per line, ``{"id": N, "op": "create", "args": {...}}``; the daemon
answers each with ``{"id": N, "ok": true, "result": ...}`` or ``{"id": N, "ok": false, "error":
{"errno": "EBUSY", "reason": "...", "stage": "create", "devno": [253, 0]}}``, in order.  Byte
payloads (the I/O operations) travel base64-encoded under ``"data"``.

``encode`` turns a message into its line; ``Decoder`` is fed whatever bytes arrive (whole lines,
single bytes, several lines at once) and hands out complete messages, keeping partial input for
the next ``feed``.  Anything that is not a line of JSON holding an object, or a line longer than
``MAX_LINE`` bytes, raises ``ProtocolError`` and nothing else; after that the decoder is unusable,
since the stream can no longer be trusted.  Nothing here touches a socket.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from devmapper.errors import DevmapperError

__all__ = ["MAX_LINE", "Decoder", "ProtocolError", "decode_bytes", "encode", "encode_bytes", "error_payload"]

MAX_LINE = 96 << 20  # bytes; room for a 64 MiB I/O payload in base64


class ProtocolError(DevmapperError):
    """The peer sent something that is not this protocol."""

    errno_name = "EPROTO"


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class Decoder:
    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._max = max_line
        self._failed = False

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add received bytes; return every message completed by them, in order."""
        if self._failed:
            raise ProtocolError("the stream already failed")
        self._buf += data
        out: list[dict[str, Any]] = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self._max:
                    raise self._fail(f"line longer than {self._max} bytes")
                return out
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            out.append(self._parse(line))

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held back."""
        return len(self._buf)

    def _parse(self, line: bytes) -> dict[str, Any]:
        if len(line) > self._max:
            raise self._fail(f"line longer than {self._max} bytes")
        try:
            message = json.loads(line.decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise self._fail(f"not JSON: {e}") from None
        if not isinstance(message, dict):
            raise self._fail("a message must be a JSON object")
        return message

    def _fail(self, why: str) -> ProtocolError:
        self._failed = True
        return ProtocolError(why)


def encode_bytes(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_bytes(text: object) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError("payload is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(f"bad base64 payload: {e}") from e


def error_payload(
    errno_name: str, reason: str, stage: str | None = None, devno: tuple[int, int] | None = None, logged: bool = True
) -> dict[str, Any]:
    return {"errno": errno_name, "reason": reason, "stage": stage, "devno": None if devno is None else list(devno),
            "logged": logged}
