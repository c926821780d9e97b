"""Thin-pool messages: the kernel's text syntax parsed into typed commands (``pool_message``).

``dmsetup message <pool> 0 "<text>"`` carries one of six messages.  The kernel splits the text on
white space, matches the name case-insensitively, checks the exact argument count, then parses ids
(decimal, at most 2^24 - 1) and transaction ids (decimal u64) as ``kstrtoull`` does.  Every failure
here is EINVAL, as in ``dm-thin.c``; EEXIST, ENODATA, EBUSY and EOPNOTSUPP come from executing the
command against a pool, which ``Pool.message`` does.
"""

from __future__ import annotations

import dataclasses

from devmapper.errors import DeviceError
from devmapper.thin.status import parse_dev_id, parse_u64


@dataclasses.dataclass(frozen=True, slots=True)
class CreateThin:
    dev_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class CreateSnap:
    dev_id: int
    origin_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Delete:
    dev_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class SetTransactionId:
    current: int
    new: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReserveMetadataSnap:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class ReleaseMetadataSnap:
    pass


Message = CreateThin | CreateSnap | Delete | SetTransactionId | ReserveMetadataSnap | ReleaseMetadataSnap

# name -> (argument count including the name, parser of the arguments)
_SYNTAX: dict[str, tuple[int, type]] = {
    "create_thin": (2, CreateThin),
    "create_snap": (3, CreateSnap),
    "delete": (2, Delete),
    "set_transaction_id": (3, SetTransactionId),
    "reserve_metadata_snap": (1, ReserveMetadataSnap),
    "release_metadata_snap": (1, ReleaseMetadataSnap),
}


def split_message(text: str) -> list[str]:
    """The message's words; an empty message is EINVAL (dm core refuses it before the target)."""
    argv = text.split()
    if not argv:
        raise DeviceError("Empty message", "EINVAL")
    return argv


def parse_message(argv: list[str]) -> Message:
    """A typed command from the message's words, or DeviceError(EINVAL)."""
    syntax = _SYNTAX.get(argv[0].lower())
    if syntax is None:
        raise DeviceError(f"Unrecognised thin pool target message received: {argv[0]}", "EINVAL")
    nargs, kind = syntax
    if len(argv) != nargs:
        raise DeviceError(f"Message received with {len(argv)} arguments instead of {nargs}.", "EINVAL")
    args = argv[1:]
    if kind is SetTransactionId:
        return SetTransactionId(parse_u64(args[0], "transaction id"), parse_u64(args[1], "new transaction id"))
    return kind(*(parse_dev_id(a) for a in args))  # type: ignore[no-any-return]
