"""NBD wire vocabulary (NetworkBlockDevice/nbd ``doc/proto.md`` "Values"): magics, option, reply,
info, flag, command and error numbers, the fixed-size structs, and the protocol's exceptions.

Numbers and names only; the state machine that uses them is ``nbd.protocol``.
"""

from __future__ import annotations

import enum
import struct

from devmapper.errors import DevmapperError

__all__ = [
    "BASE_ALLOCATION",
    "BASE_ALLOCATION_ID",
    "CHUNK",
    "CHUNK_ERROR",
    "CHUNK_OFFSET_DATA",
    "CLIENT_FIXED_NEWSTYLE",
    "CLIENT_NO_ZEROES",
    "DEFAULT_MAX_PAYLOAD",
    "DRAIN_LIMIT",
    "EXPORT_NAME_PADDING",
    "EXPORT_NAME_REPLY",
    "EXTENT",
    "GREETING",
    "HANDSHAKE_FIXED_NEWSTYLE",
    "HANDSHAKE_NO_ZEROES",
    "IHAVEOPT",
    "INFO_BLOCK_SIZE",
    "INFO_EXPORT",
    "MAX_EXTENTS",
    "MAX_OPTION_DATA",
    "MAX_STRING",
    "NBDMAGIC",
    "OPT_HEADER",
    "OPT_REPLY",
    "OPT_REPLY_MAGIC",
    "REPLY_FLAG_DONE",
    "REQUEST",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY",
    "SIMPLE_REPLY_MAGIC",
    "STATE_HOLE",
    "STATE_ZERO",
    "STRUCTURED_REPLY_MAGIC",
    "U16",
    "U32",
    "Cmd",
    "CmdFlag",
    "Errno",
    "Info",
    "LocalProtocolError",
    "NbdProtocolError",
    "Opt",
    "RemoteProtocolError",
    "Rep",
    "ReplyType",
    "TxFlag",
    "nbd_errno",
]

# -- wire constants (proto.md "Values") -----------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

HANDSHAKE_FIXED_NEWSTYLE = 1 << 0
HANDSHAKE_NO_ZEROES = 1 << 1
CLIENT_FIXED_NEWSTYLE = 1 << 0
CLIENT_NO_ZEROES = 1 << 1

BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1  # our id for the context; ids are opaque to clients
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

MAX_STRING = 4096  # proto.md "Conventions": strings MUST be no longer than 4096 bytes
MAX_OPTION_DATA = 64 << 10  # longer options are drained and refused with ERR_TOO_BIG
MAX_EXTENTS = 1 << 20  # per block-status chunk
DEFAULT_MAX_PAYLOAD = 32 << 20
DRAIN_LIMIT = 64 << 20  # rejected WRITE payloads up to this size are read and dropped, larger ones disconnect
EXPORT_NAME_PADDING = bytes(124)


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TxFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1


class Errno(enum.IntEnum):
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# errno names an export may raise -> the NBD error sent (proto.md "Error values").
_ERRNO_BY_NAME: dict[str, int] = {
    "EPERM": Errno.EPERM,
    "EROFS": Errno.EPERM,
    "EACCES": Errno.EPERM,
    "EIO": Errno.EIO,
    "ENOMEM": Errno.ENOMEM,
    "EINVAL": Errno.EINVAL,
    "EBADF": Errno.EINVAL,
    "ENODATA": Errno.EIO,
    "ENODEV": Errno.EIO,
    "ENOSPC": Errno.ENOSPC,
    "EDQUOT": Errno.ENOSPC,
    "EFBIG": Errno.ENOSPC,
    "EOVERFLOW": Errno.EOVERFLOW,
    "ENOTSUP": Errno.ENOTSUP,
    "EOPNOTSUPP": Errno.ENOTSUP,
    "ESHUTDOWN": Errno.ESHUTDOWN,
}


def nbd_errno(name: str) -> int:
    """The NBD error value for an errno name (``"EROFS"`` -> EPERM); EIO when there is no better one."""
    return int(_ERRNO_BY_NAME.get(name, Errno.EIO))


# -- errors ---------------------------------------------------------------------------------------


class NbdProtocolError(DevmapperError):
    """The NBD conversation cannot continue."""


class RemoteProtocolError(NbdProtocolError):
    """The peer broke the protocol; drop the connection (a hard disconnect)."""


class LocalProtocolError(NbdProtocolError):
    """Our side used the connection object out of turn (a bug in the caller)."""


# -- structs --------------------------------------------------------------------------------------

GREETING = struct.Struct(">QQH")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
OPT_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length (28 bytes)
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie (16 bytes)
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length (20 bytes)
CHUNK_OFFSET_DATA = struct.Struct(">IHHQIQ")  # chunk header + offset
CHUNK_ERROR = struct.Struct(">IHHQIIH")  # chunk header + error + message length
EXTENT = struct.Struct(">II")
