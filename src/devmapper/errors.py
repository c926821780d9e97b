"""The one root of every error devmapper raises, and its families.

Each family a command-line user can meet carries a stable exit code (``exit_code``); the CLI maps
errors to exit codes and nothing else does.  Lookups that miss return ``None`` instead of raising
(the kernel's -ENODATA is a normal result, not an error).
"""

from __future__ import annotations


class DevmapperError(Exception):
    """Root of all devmapper errors."""

    exit_code = 1


class MetadataError(DevmapperError):
    """Metadata cannot be read, parsed or trusted."""


class ChecksumError(MetadataError):
    """A metadata block's checksum does not match its contents."""

    def __init__(self, blocknr: int, kind: str, stored: int, computed: int) -> None:
        super().__init__(
            f"block {blocknr}: {kind} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        )
        self.blocknr = blocknr
        self.kind = kind


class BlockLocationError(MetadataError):
    """A metadata block says it lives somewhere else (the kernel's -ENOTBLK)."""

    def __init__(self, blocknr: int, kind: str, stored: int) -> None:
        super().__init__(f"block {blocknr}: {kind} has blocknr {stored}, expected {blocknr}")
        self.blocknr = blocknr
        self.kind = kind


class MetadataCorruption(MetadataError):
    """Metadata is structurally damaged (bad node, broken tree invariant)."""


class NoSpaceError(DevmapperError):
    """A space map has no free block (data or metadata)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"no free {what} blocks")
        self.what = what


class PoolFailedError(DevmapperError):
    """The pool latched into failure after a rollback failed; only close is allowed."""


class ReadOnlyError(DevmapperError):
    """A change was asked of metadata opened read-only."""


class DeviceError(DevmapperError):
    """Unknown thin id, id already in use, bad argument to a pool operation."""

    def __init__(self, message: str, errno_name: str = "EINVAL") -> None:
        super().__init__(message)
        self.errno_name = errno_name


class BlockDeviceError(DevmapperError):
    """I/O on a block device failed (short read, injected fault, device gone)."""


class ToolError(DevmapperError):
    """A command-line-only condition (bad option combination, unreadable input)."""
