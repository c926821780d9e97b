"""Units and sizes shared by every layer."""

from __future__ import annotations

from typing import Final

SECTOR_SIZE: Final = 512
METADATA_BLOCK_SIZE: Final = 4096  # bytes; all metadata I/O is whole aligned 4 KiB blocks
SECTORS_PER_METADATA_BLOCK: Final = METADATA_BLOCK_SIZE // SECTOR_SIZE  # 8

MIN_DATA_BLOCK_SIZE: Final = 128  # sectors (64 KiB)
MAX_DATA_BLOCK_SIZE: Final = 2097152  # sectors (1 GiB)
MAX_DEV_ID: Final = (1 << 24) - 1


def parse_size(text: str, default_unit: str = "s") -> int:
    """Parse '64k', '1g', '128' (in default_unit) into bytes; units b s k m g t p (powers of 1024)."""
    text = text.strip()
    if not text:
        raise ValueError("empty size")
    mult = {"b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
    unit = text[-1].lower()
    if unit.isdigit():
        number, unit = text, default_unit
    else:
        number = text[:-1]
        if unit not in mult:
            raise ValueError(f"unknown unit in size {text!r}")
    if not number.isdigit():
        raise ValueError(f"bad size {text!r}")
    return int(number) * mult[unit]
