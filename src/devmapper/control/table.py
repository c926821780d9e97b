"""Table lines: ``<start> <length> <target type> <params>``, as dmsetup reads and prints them.

Reading follows dmsetup's ``_parse_line``: leading and trailing blanks are ignored, so are empty
lines and lines starting with ``#``, and a ``#`` later in a line starts a comment.  Start and length
are decimal sector counts.  A line that does not parse is dmsetup's ``Invalid format on line N of
table SOURCE.`` (the source is empty for ``--table``, ``on stdin`` for standard input, else the file
name) and nothing reaches the device-mapper.

Printing is dmsetup's ``"%llu %llu %s " + params``: a space always follows the target type, so
targets without parameters (``zero``, ``error``) and the ``thin-pool`` parameters, which the kernel
ends with a space, print with a trailing blank.  Such a line reads back unchanged.

Everything the kernel checks (contiguity, known target types, the targets' own arguments) happens
in ``manager.py`` and the targets; this module only splits text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from devmapper.errors import ToolError

__all__ = ["TableLine", "TableSyntaxError", "format_table", "parse_table"]

MAX_SECTOR = (1 << 64) - 1


class TableSyntaxError(ToolError):
    """A table line dmsetup itself would refuse."""


@dataclasses.dataclass(frozen=True, slots=True)
class TableLine:
    """One target of a table: sectors [start, start + length) mapped by ``target`` with ``params``."""

    start: int
    length: int
    target: str
    params: str = ""

    def format(self) -> str:
        return f"{self.start} {self.length} {self.target} {self.params}"

    def to_json(self) -> list[object]:
        return [self.start, self.length, self.target, self.params]

    @classmethod
    def from_json(cls, raw: object) -> TableLine:
        if not (isinstance(raw, list) and len(raw) == 4):
            raise TableSyntaxError(f"bad table line {raw!r}")
        start, length, target, params = raw
        if not (isinstance(start, int) and isinstance(length, int) and isinstance(target, str)
                and isinstance(params, str)):
            raise TableSyntaxError(f"bad table line {raw!r}")
        if not (0 <= start <= MAX_SECTOR and 0 <= length <= MAX_SECTOR) or not target:
            raise TableSyntaxError(f"bad table line {raw!r}")
        return cls(start, length, target, params)


def _number(word: str) -> int | None:
    digits = word[1:] if word.startswith("+") else word
    if not digits.isascii() or not digits.isdigit():
        return None
    value = int(digits)
    return value if value <= MAX_SECTOR else None


def parse_line(line: str) -> TableLine | None:
    """One line; None for blank and comment lines.  Raises ValueError on a malformed line."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    words = text.split(None, 3)
    if len(words) < 3:
        raise ValueError(text)
    start, length = _number(words[0]), _number(words[1])
    if start is None or length is None:
        raise ValueError(text)
    params = words[3] if len(words) > 3 else ""
    params = params.split("#", 1)[0].strip()
    return TableLine(start, length, words[2], params)


def parse_table(text: str, source: str = "") -> list[TableLine]:
    """Every target line of a table text (lines separated by newlines)."""
    lines: list[TableLine] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        try:
            parsed = parse_line(raw)
        except ValueError:
            raise TableSyntaxError(f"Invalid format on line {number} of table {source}.") from None
        if parsed is not None:
            lines.append(parsed)
    return lines


def format_table(lines: Sequence[TableLine]) -> str:
    """The table as ``dmsetup table`` prints it, one line per target, each ending in a newline."""
    return "".join(f"{line.format()}\n" for line in lines)
