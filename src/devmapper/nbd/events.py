"""What the sans-IO NBD core (``nbd.protocol``) and its caller hand each other: the facts of an
export (``ExportInfo``, checked when made) and the events ``ServerConnection.next_event`` returns.
"""

from __future__ import annotations

import dataclasses

from devmapper.nbd.wire import DEFAULT_MAX_PAYLOAD, Cmd, LocalProtocolError, Opt, TxFlag

__all__ = [
    "NEED_DATA",
    "ConnectionClosed",
    "Disconnect",
    "Event",
    "ExportInfo",
    "ExportQuery",
    "ListQuery",
    "NeedData",
    "Request",
    "StartTLS",
]


# -- export facts ---------------------------------------------------------------------------------


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake says about one export.  Block sizes follow proto.md "Size constraints"."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    can_multi_conn: bool = True
    rotational: bool = False
    block_status: bool = True  # offers base:allocation
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = DEFAULT_MAX_PAYLOAD

    def __post_init__(self) -> None:
        if not 0 <= self.size < 1 << 64:
            raise LocalProtocolError(f"export size {self.size} does not fit 64 bits")
        if not (_power_of_two(self.min_block) and self.min_block <= 1 << 16):
            raise LocalProtocolError(f"minimum block size {self.min_block} must be a power of 2 <= 65536")
        if not (_power_of_two(self.preferred_block) and self.preferred_block >= max(self.min_block, 512)):
            raise LocalProtocolError(f"preferred block size {self.preferred_block} is not a power of 2 >= min, 512")
        if not self.preferred_block <= self.max_payload < 1 << 32:
            raise LocalProtocolError(f"maximum payload {self.max_payload} must be >= the preferred block size")

    def transmission_flags(self, structured: bool) -> int:
        """The 16-bit transmission flags for this export (DF only with structured replies)."""
        wanted = (
            (True, TxFlag.HAS_FLAGS),
            (self.read_only, TxFlag.READ_ONLY),
            (self.can_flush, TxFlag.SEND_FLUSH),
            (self.can_flush and self.can_fua, TxFlag.SEND_FUA),
            (self.rotational, TxFlag.ROTATIONAL),
            (not self.read_only and self.can_trim, TxFlag.SEND_TRIM),
            (not self.read_only and self.can_zero, TxFlag.SEND_WRITE_ZEROES),
            (structured, TxFlag.SEND_DF),
            (self.can_multi_conn, TxFlag.CAN_MULTI_CONN),
            (self.can_cache, TxFlag.SEND_CACHE),
            (not self.read_only and self.can_zero and self.can_fast_zero, TxFlag.SEND_FAST_ZERO),
        )
        return sum(int(flag) for on, flag in wanted if on)


# -- events ---------------------------------------------------------------------------------------


class NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclasses.dataclass(frozen=True, slots=True)
class ExportQuery:
    """An option about one export; answer with ``answer_export``.  ``name`` "" is the default export."""

    option: Opt
    name: str
    info_requests: tuple[int, ...] = ()  # INFO/GO
    queries: tuple[str, ...] = ()  # LIST/SET_META_CONTEXT


@dataclasses.dataclass(frozen=True, slots=True)
class ListQuery:
    """NBD_OPT_LIST; answer with ``answer_list``."""


@dataclasses.dataclass(frozen=True, slots=True)
class Disconnect:
    """A soft disconnect: NBD_OPT_ABORT (already acknowledged) or NBD_CMD_DISC.  Close after sending."""

    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class StartTLS:
    """NBD_OPT_STARTTLS was acknowledged: send ``data_to_send()``, run the TLS handshake on the
    transport as the server, then call ``tls_started()`` before anything else."""


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its end (EOF).  ``partial``: it stopped in the middle of a message."""

    partial: bool = False


class Request:
    """One transmission command.  ``payload`` is the data of a valid WRITE; ``error`` (an NBD error
    value, with ``message``) is set when the request was rejected and must only be answered."""

    __slots__ = ("command", "cookie", "error", "flags", "length", "message", "offset", "payload")

    def __init__(
        self,
        command: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        payload: bytearray | None = None,
        error: int = 0,
        message: str = "",
    ) -> None:
        self.command = command
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.payload = payload
        self.error = error
        self.message = message

    def __repr__(self) -> str:
        name = Cmd(self.command).name if self.command in Cmd._value2member_map_ else str(self.command)
        err = f" error={self.error} {self.message!r}" if self.error else ""
        return f"Request({name} flags={self.flags:#x} cookie={self.cookie} offset={self.offset} len={self.length}{err})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


Event = ExportQuery | ListQuery | Request | Disconnect | StartTLS | ConnectionClosed | NeedData
