"""Table text as dmsetup reads and prints it."""

from __future__ import annotations

import pytest

from devmapper.control.table import TableLine, TableSyntaxError, format_table, parse_table


def test_parses_lines_comments_and_blanks() -> None:
    text = "  # a comment\n\n0 100 linear /dev/loop0 0   # trailing comment\n100 28 zero\t\n"
    assert parse_table(text) == [TableLine(0, 100, "linear", "/dev/loop0 0"), TableLine(100, 28, "zero", "")]


def test_kernel_output_with_trailing_space_reads_back_as_the_same_table() -> None:
    printed = "0 20971522 thin-pool 7:2016 7:2015 128 65536 1 skip_block_zeroing \n0 8 error \n"
    lines = parse_table(printed)
    assert lines[0].params == "7:2016 7:2015 128 65536 1 skip_block_zeroing"
    assert parse_table(format_table(lines)) == lines
    assert format_table(lines).splitlines()[1] == "0 8 error "  # a space always follows the type


@pytest.mark.parametrize(
    ("text", "line"),
    [("0", 1), ("0 100", 1), ("x 100 zero", 1), ("0 -1 zero", 1), ("0 100 zero\n1 2", 2),
     (f"0 {1 << 64} zero", 1), ("# c\n\n0 1.5 zero", 3)],
)
def test_malformed_lines_name_their_number_and_source(text: str, line: int) -> None:
    with pytest.raises(TableSyntaxError, match=rf"^Invalid format on line {line} of table on stdin\.$"):
        parse_table(text, "on stdin")


def test_plus_signs_are_accepted_like_sscanf() -> None:
    assert parse_table("+0 +8 zero") == [TableLine(0, 8, "zero", "")]


def test_json_round_trip_and_validation() -> None:
    line = TableLine(0, 8, "linear", "7:0 2048")
    assert TableLine.from_json(line.to_json()) == line
    for bad in ([0, 8, "zero"], [0, -1, "zero", ""], ["0", 8, "zero", ""], [0, 8, "", ""], "0 8 zero"):
        with pytest.raises(TableSyntaxError):
            TableLine.from_json(bad)
