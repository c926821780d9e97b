"""The block-device contract shared by file, memory and faulty devices."""

from __future__ import annotations

from typing import Protocol


class BlockDevice(Protocol):
    """A byte-addressed store with explicit durability.

    ``read`` past the end raises ``BlockDeviceError``; ``write`` past the end raises too (devices do
    not grow by writing: call ``resize``).  After ``flush`` returns, every earlier write survives a
    crash.
    """

    read_only: bool

    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...

    def resize(self, new_size: int) -> None: ...

    def close(self) -> None: ...
