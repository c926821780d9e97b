"""thin_dump XML / human-readable writers, the XML reader, the pool generator and thin_metadata_size.

Golden texts were printed by thin_dump 0.9.0.  Tests marked by ``require_tool`` compare with the real
tools (thin_restore, thin_dump, thin_metadata_size) and skip, naming the tool, where they are absent.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import random
from pathlib import Path

import pytest

from devmapper.errors import MetadataError
from devmapper.thin.ir import DeviceInfo, Run, SuperblockInfo
from devmapper.thin.metadata_size import (
    MetadataSizeError,
    Numeric,
    format_metadata_size,
    parse_metadata_size_args,
)
from devmapper.thin.xml import HumanReadableWriter, XmlFormatError, XmlWriter, parse_xml
from helpers.gen import (
    MAX_DEV_ID,
    MAX_TIME,
    GenPool,
    GenSizes,
    XmlStyle,
    canonical_dump,
    canonical_human_readable,
    generate_pool,
    metadata_file_size,
    pool_to_xml,
    random_style,
)
from helpers.tools import require_tool, run_tool

# thin_restore of INPUT, then thin_dump / thin_dump -f human_readable (0.9.0):
INPUT = """\
<superblock uuid="" time="5" transaction="7" flags="0" version="2" data_block_size="128" nr_data_blocks="1000">
  <device dev_id="0" mapped_blocks="99" transaction="1" creation_time="0" snap_time="3">
    <range_mapping origin_begin="0" data_begin="10" length="2" time="0"/>
    <range_mapping origin_begin="2" data_begin="12" length="3" time="0"/>
    <single_mapping origin_block="5" data_block="15" time="0"/>
    <single_mapping origin_block="6" data_block="16" time="1"/>
    <single_mapping origin_block="7" data_block="20" time="1"/>
    <single_mapping origin_block="9" data_block="21" time="1"/>
  </device>
  <device dev_id="5" mapped_blocks="0" transaction="1" creation_time="0" snap_time="3">
  </device>
</superblock>
"""
DUMP = """\
<superblock uuid="" time="5" transaction="7" flags="0" version="2" data_block_size="128" nr_data_blocks="1000">
  <device dev_id="0" mapped_blocks="9" transaction="1" creation_time="0" snap_time="3">
    <range_mapping origin_begin="0" data_begin="10" length="6" time="0"/>
    <single_mapping origin_block="6" data_block="16" time="1"/>
    <single_mapping origin_block="7" data_block="20" time="1"/>
    <single_mapping origin_block="9" data_block="21" time="1"/>
  </device>
  <device dev_id="5" mapped_blocks="0" transaction="1" creation_time="0" snap_time="3">
  </device>
</superblock>
"""
HUMAN = """\
begin superblock: "", 5, 7, 0, 2, 128, 1000
device: 0
mapped_blocks: 9
transaction: 1
creation time: 0
snap time: 3
    (0..5) -> (10..15), 0
    6 -> 16, 1
    7 -> 20, 1
    9 -> 21, 1

device: 5
mapped_blocks: 0
transaction: 1
creation time: 0
snap time: 3

end superblock
"""
EMPTY_POOL = (
    '<superblock uuid="" time="0" transaction="0" flags="0" version="2" data_block_size="128"'
    ' nr_data_blocks="0">\n</superblock>\n'
)


class Recorder:
    """A visitor that records every event."""

    def __init__(self) -> None:
        self.events: list[object] = []

    def superblock_b(self, sb: SuperblockInfo) -> None:
        self.events.append(sb)

    def superblock_e(self) -> None:
        self.events.append("superblock_e")

    def device_b(self, dev: DeviceInfo) -> None:
        self.events.append(dev)

    def device_e(self) -> None:
        self.events.append("device_e")

    def map(self, run: Run) -> None:
        self.events.append(run)

    def eof(self) -> None:
        self.events.append("eof")


def to_xml(text: str, *, chunk_size: int = 1 << 20) -> str:
    out = io.StringIO()
    parse_xml(io.StringIO(text), XmlWriter(out), chunk_size=chunk_size)
    return out.getvalue()


def to_human(text: str) -> str:
    out = io.StringIO()
    parse_xml(io.StringIO(text), HumanReadableWriter(out))
    return out.getvalue()


def parsed(text: str) -> list[object]:
    rec = Recorder()
    parse_xml(io.StringIO(text), rec)
    return rec.events


def superblock_xml(**attrs: str) -> str:
    base = {"uuid": "", "time": "1", "transaction": "2", "data_block_size": "128", "nr_data_blocks": "100"}
    base.update(attrs)
    return "<superblock " + " ".join(f'{k}="{v}"' for k, v in base.items()) + ">\n</superblock>\n"


# --------------------------------------------------------------------------------------------------
# Writers


def test_writer_merges_runs_as_thin_dump_does() -> None:
    # Differs from DUMP only in mapped_blocks, which thin_restore recomputes and we echo.
    assert to_xml(INPUT) == DUMP.replace('mapped_blocks="9"', 'mapped_blocks="99"')


def test_human_readable_writer_matches_golden() -> None:
    assert to_human(INPUT) == HUMAN.replace("mapped_blocks: 9", "mapped_blocks: 99")


def test_writers_reproduce_thin_dump_output_exactly() -> None:
    assert to_xml(DUMP) == DUMP
    assert to_human(DUMP) == HUMAN
    assert to_xml(EMPTY_POOL) == EMPTY_POOL


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        ([Run(0, 10, 1, 0), Run(1, 11, 1, 0)], ["range 0 10 2 0"]),
        ([Run(0, 10, 1, 0), Run(1, 11, 1, 1)], ["single 0 10 0", "single 1 11 1"]),  # time differs
        ([Run(0, 10, 1, 0), Run(1, 12, 1, 0)], ["single 0 10 0", "single 1 12 0"]),  # data gap
        ([Run(0, 10, 1, 0), Run(2, 11, 1, 0)], ["single 0 10 0", "single 2 11 0"]),  # origin gap
        ([Run(5, 7, 3, 2), Run(8, 10, 4, 2), Run(12, 14, 1, 2)], ["range 5 7 8 2"]),
        ([Run(0, 10, 0, 0), Run(3, 4, 1, 9), Run(4, 5, 0, 9)], ["single 3 4 9"]),  # zero-length ignored
        ([Run(0, 10, 2, 0), Run(1, 11, 1, 0)], ["range 0 10 2 0", "single 1 11 0"]),  # no overlap merge
    ],
)
def test_run_merging_rule(runs: list[Run], expected: list[str]) -> None:
    out = io.StringIO()
    w = XmlWriter(out)
    w.superblock_b(SuperblockInfo("", 0, 0, 0, 2, 128, 100))
    w.device_b(DeviceInfo(1, 0, 0, 0, 0))
    for run in runs:
        w.map(run)
    w.device_e()
    w.superblock_e()
    w.eof()
    lines = []
    for e in parsed(out.getvalue()):
        if isinstance(e, Run):
            kind = "single" if e.length == 1 else "range"
            nums = [e.origin_begin, e.data_begin] + ([] if e.length == 1 else [e.length]) + [e.time]
            lines.append(" ".join([kind, *map(str, nums)]))
    assert lines == expected
    # and the XML element kinds agree with the lengths
    assert out.getvalue().count("<single_mapping") == sum(s.startswith("single") for s in expected)


def test_metadata_snap_is_printed_only_when_given() -> None:
    out = io.StringIO()
    sb = SuperblockInfo("", 1, 2, 0, 2, 128, 100, metadata_snap=7)
    XmlWriter(out).superblock_b(sb)
    HumanReadableWriter(out).superblock_b(sb)
    assert out.getvalue() == (
        '<superblock uuid="" time="1" transaction="2" flags="0" version="2" data_block_size="128"'
        ' nr_data_blocks="100" metadata_snap="7">\n'
        'begin superblock: "", 1, 2, 0, 2, 128, 100, 7\n'
    )


# --------------------------------------------------------------------------------------------------
# Reader


def test_reader_events() -> None:
    assert parsed(DUMP) == [
        SuperblockInfo("", 5, 7, 0, 2, 128, 1000),
        DeviceInfo(0, 9, 1, 0, 3),
        Run(0, 10, 6, 0),
        Run(6, 16, 1, 1),
        Run(7, 20, 1, 1),
        Run(9, 21, 1, 1),
        "device_e",
        DeviceInfo(5, 0, 1, 0, 3),
        "device_e",
        "superblock_e",
        "eof",
    ]


def test_reader_accepts_paths_binary_and_text_streams_in_any_chunking(tmp_path: Path) -> None:
    path = tmp_path / "dump.xml"
    path.write_text(DUMP)
    for source in (path, str(path)):
        out = io.StringIO()
        parse_xml(source, XmlWriter(out))
        assert out.getvalue() == DUMP
    out = io.StringIO()
    parse_xml(io.BytesIO(DUMP.encode()), XmlWriter(out), chunk_size=7)
    assert out.getvalue() == DUMP
    assert to_xml(DUMP, chunk_size=1) == DUMP


def test_optional_attributes_and_their_defaults() -> None:
    sb = parsed(superblock_xml())[0]
    assert sb == SuperblockInfo("", 1, 2, 0, 1, 128, 100, None)  # version defaults to 1, as thin_restore
    sb = parsed(superblock_xml(flags="3", version="2", metadata_snap="9", uuid="abc", extra="ignored"))[0]
    assert sb == SuperblockInfo("abc", 1, 2, 3, 2, 128, 100, 9)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("+5", 5),
        ("007", 7),
        ("-1", 2**32 - 1),
        ("-0", 0),
        ("-4294967295", 1),
        ("4294967295", 2**32 - 1),
        ("0" * 5000 + "7", 7),  # as thin_restore; Python's int() alone would refuse 5000 digits
    ],
)
def test_numbers_are_read_like_boost_lexical_cast(text: str, value: int) -> None:
    sb = parsed(superblock_xml(data_block_size=text))[0]
    assert isinstance(sb, SuperblockInfo) and sb.data_block_size == value


@pytest.mark.parametrize(
    "text", [" 5", "5 ", "0x10", "", "-", "+", "--1", "1e3", "5.0", "4294967296", "٣", "²", "1_0", "9" * 5000]
)
def test_bad_numbers_are_rejected(text: str) -> None:
    with pytest.raises(XmlFormatError, match=r"line 1: <superblock>: attribute data_block_size="):
        parsed(superblock_xml(data_block_size=text))


def test_64_bit_limits() -> None:
    sb = parsed(superblock_xml(time=str(2**64 - 1), nr_data_blocks="-1"))[0]
    assert isinstance(sb, SuperblockInfo) and sb.time == sb.nr_data_blocks == 2**64 - 1
    with pytest.raises(XmlFormatError, match="64-bit"):
        parsed(superblock_xml(time=str(2**64)))


def test_zero_length_range_is_ignored_and_text_content_too() -> None:
    text = DUMP.replace(
        '    <single_mapping origin_block="9"',
        '    <range_mapping origin_begin="1" data_begin="5000" length="0" time="0"/>junk\n'
        '    <single_mapping origin_block="9"',
    )
    assert to_xml(text) == DUMP


SB = '<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="100">\n'
DEV = '  <device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">\n'
MAP = '    <single_mapping origin_block="1" data_block="2" time="0"/>\n'
END = "  </device>\n</superblock>\n"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (SB + DEV + "    <foo/>\n" + END, 3, "unknown tag type <foo>"),
        (SB + DEV.replace(' mapped_blocks="0"', "") + END, 2, "could not find attribute: mapped_blocks"),
        (SB + DEV + MAP.replace('"2"', '"x"') + END, 3, "attribute data_block='x' is not a 64-bit"),
        (SB + DEV + MAP.replace('time="0"', 'time="4294967296"') + END, 3, "time='4294967296' is not a 32-bit"),
        (SB + DEV + MAP, 4, "no element found"),  # truncated
        (SB + DEV + MAP + "  </device>\n</superb", 5, "unclosed token"),
        ("", 1, "no element found"),
        ("\n\n", 3, "no element found"),
        (SB + MAP + "</superblock>\n", 2, "<single_mapping> is not allowed inside <superblock>"),
        (DEV + "  </device>\n", 1, "<device> is not allowed as the document element"),
        (SB + DEV + MAP.replace("/>", ">") + MAP + "</single_mapping>" + END, 4, "not allowed inside <single"),
        (SB + DEV + MAP + "  </device>\n</superblock>\n<x/>\n", 6, "junk after document element"),
        (SB + '<device dev_id="1" dev_id="1"/>' + "</superblock>", 2, "duplicate attribute"),
    ],
)
def test_malformed_xml_names_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(XmlFormatError) as info:
        parsed(text)
    assert info.value.line == line
    assert str(info.value).startswith(f"XML line {line}: ")
    assert message in str(info.value)
    assert isinstance(info.value, MetadataError)


def test_visitor_errors_pass_through_with_the_line_noted() -> None:
    class Failing(Recorder):
        def map(self, run: Run) -> None:
            raise MetadataError("mapping beyond end of data device")

    with pytest.raises(MetadataError) as info:
        parse_xml(io.StringIO(SB + DEV + MAP + END), Failing())
    assert type(info.value) is MetadataError
    assert "while processing XML line 3" in getattr(info.value, "__notes__", [])


def test_eof_only_after_a_complete_document() -> None:
    rec = Recorder()
    with pytest.raises(XmlFormatError):
        parse_xml(io.StringIO(SB + DEV + MAP), rec)
    assert rec.events[-1] == Run(1, 2, 1, 0)


# --------------------------------------------------------------------------------------------------
# Generator (pure Python)


def mappings(pool: GenPool) -> dict[int, dict[int, tuple[int, int]]]:
    return {d.info.dev_id: {o: (b, t) for o, b, t in d.mappings()} for d in pool.devices}


@pytest.mark.parametrize("seed", range(10))
def test_generated_pools_are_valid(seed: int) -> None:
    pool = generate_pool(random.Random(seed), GenSizes(nr_devices=12, mappings_per_device=300))
    sb = pool.superblock
    ids = [d.info.dev_id for d in pool.devices]
    assert len(set(ids)) == len(ids) and all(0 <= i <= MAX_DEV_ID for i in ids)
    assert sb.time <= MAX_TIME
    for dev in pool.devices:
        assert dev.info.mapped_blocks == sum(r.length for r in dev.runs)
        assert dev.info.creation_time <= dev.info.snap_time <= sb.time
        ends = [(r.origin_begin, r.origin_begin + r.length) for r in dev.runs]
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(ends))
        for r in dev.runs:
            assert r.length >= 1 and r.time <= sb.time and r.data_begin + r.length <= sb.nr_data_blocks


def test_generator_makes_snapshots_that_share_mappings() -> None:
    pool = generate_pool(random.Random(3), GenSizes(nr_devices=10, mappings_per_device=500, snapshot_prob=0.7))
    maps = [set(d.mappings()) for d in pool.devices]
    shared = max(len(a & b) for i, a in enumerate(maps) for b in maps[i + 1 :])
    assert shared >= 100


def test_generator_reaches_large_block_numbers() -> None:
    pools = [generate_pool(random.Random(s), GenSizes(nr_devices=4)) for s in range(10)]
    assert max(p.superblock.nr_data_blocks for p in pools) > 2**31
    assert max(r.origin_begin for p in pools for d in p.devices for r in d.runs) > 2**32


@pytest.mark.parametrize("seed", range(10))
def test_generated_xml_parses_back_to_the_same_mappings(seed: int) -> None:
    rng = random.Random(seed)
    pool = generate_pool(rng, GenSizes(nr_devices=6, mappings_per_device=200))
    text = pool_to_xml(pool, rng, random_style(rng))
    got: dict[int, dict[int, tuple[int, int]]] = {}
    current: dict[int, tuple[int, int]] = {}
    for e in parsed(text):
        if isinstance(e, DeviceInfo):
            current = got.setdefault(e.dev_id, {})
        elif isinstance(e, Run):
            current.update((e.origin_begin + i, (e.data_begin + i, e.time)) for i in range(e.length))
    assert got == mappings(pool)


@pytest.mark.parametrize("seed", range(5))
def test_canonical_dump_is_a_fixed_point(seed: int) -> None:
    pool = generate_pool(random.Random(seed), GenSizes(nr_devices=8, mappings_per_device=400))
    canonical = canonical_dump(pool)
    assert to_xml(canonical) == canonical
    assert to_human(canonical) == canonical_human_readable(pool)


# --------------------------------------------------------------------------------------------------
# Against thin_restore / thin_dump 0.9.0


def restore(tmp_path: Path, text: str, size: int = 8 << 20) -> Path:
    xml, meta = tmp_path / "in.xml", tmp_path / "meta.bin"
    xml.write_text(text)
    with meta.open("wb") as f:
        f.truncate(size)
    run_tool(["thin_restore", "-q", "-i", str(xml), "-o", str(meta)])
    return meta


def thin_dump(meta: Path, *args: str) -> str:
    return run_tool(["thin_dump", *args, str(meta)]).stdout


def compat_pool(seed: int) -> GenPool:
    rng = random.Random(seed)
    sizes = GenSizes(
        nr_devices=rng.choice((0, 1, 4, 12, 30)),
        mappings_per_device=rng.choice((5, 100, 800, 3000)),
        max_data_blocks=rng.choice((1 << 12, 1 << 20, 1 << 24, 1 << 27)),
        snapshot_prob=rng.choice((0.0, 0.4, 0.8)),
    )
    return generate_pool(
        rng, dataclasses.replace(sizes, max_data_blocks=max(sizes.max_data_blocks, sizes.data_budget()))
    )


@pytest.mark.parametrize("seed", range(20))
def test_thin_dump_of_restored_generated_xml_is_canonical(tmp_path: Path, seed: int) -> None:
    require_tool("thin_restore")
    pool = compat_pool(seed)
    rng = random.Random(seed + 1000)
    meta = restore(tmp_path, pool_to_xml(pool, rng, random_style(rng)), metadata_file_size(pool))
    assert thin_dump(meta) == canonical_dump(pool)
    assert thin_dump(meta, "-f", "human_readable") == canonical_human_readable(pool)


@pytest.mark.parametrize("seed", range(6))
def test_parse_and_write_reproduce_real_thin_dump_output(tmp_path: Path, seed: int) -> None:
    require_tool("thin_restore")
    pool = compat_pool(100 + seed)
    meta = restore(tmp_path, pool_to_xml(pool, random.Random(seed), XmlStyle(split_prob=0.5)), metadata_file_size(pool))
    dumped = thin_dump(meta)
    assert to_xml(dumped) == dumped
    assert to_human(dumped) == thin_dump(meta, "-f", "human_readable")


def test_golden_texts_still_match_thin_dump(tmp_path: Path) -> None:
    meta = restore(tmp_path, INPUT)
    assert thin_dump(meta) == DUMP
    assert thin_dump(meta, "-f", "human_readable") == HUMAN


def test_thin_dump_never_prints_uuid_or_metadata_snap(tmp_path: Path) -> None:
    text = superblock_xml(uuid="abc", metadata_snap="0")
    assert thin_dump(restore(tmp_path, text)) == to_xml(superblock_xml())


@pytest.mark.parametrize("value", ["+5", "007", "-1", "-4294967295", " 5", "0x10", "", "4294967296", "5.0"])
def test_number_syntax_agrees_with_thin_restore(tmp_path: Path, value: str) -> None:
    text = superblock_xml(data_block_size=value)
    xml, meta = tmp_path / "in.xml", tmp_path / "meta.bin"
    xml.write_text(text)
    with meta.open("wb") as f:
        f.truncate(8 << 20)
    real = run_tool(["thin_restore", "-q", "-i", str(xml), "-o", str(meta)], check=False)
    try:
        ours = to_xml(text)
    except XmlFormatError:
        assert real.returncode != 0
    else:
        assert real.returncode == 0
        assert thin_dump(meta) == ours


# --------------------------------------------------------------------------------------------------
# thin_metadata_size


@pytest.mark.parametrize(
    ("argv", "stdout"),
    [
        (
            ["-b64k", "-s1t", "-m1000"],
            'thin_metadata_size - 1073224 sectors estimated metadata area size for "--block-size=64kibibytes'
            ' --pool-size=1tebibytes --max-thins=1000"\n',
        ),
        (["-b64k", "-s1t", "-m1000", "-nshort"], "1073224s\n"),
        (["-b64k", "-s1t", "-m1000", "-n"], "1073224\n"),
        (["-b64k", "-s1t", "-m1000", "-nlong", "-um"], "524.04mebibytes\n"),
        (["-b64k", "-s1t", "-m1000", "-uE", "-n"], "5.49e-10\n"),
        (["-b64k", "-s1t", "-m1000", "-uz", "-n"], "0\n"),  # factor wraps to 0: inf prints as 0
        (["-b", "128", "-s", "1000000", "-m", "5", "-n", "short"], "544\n"),  # "short" is not -n's
        (
            ["-u", "m", "-b", "128", "-s", "1000000", "-m", "5"],
            'thin_metadata_size - 0.27 mebibytes estimated metadata area size for "--block-size=128mebibytes'
            ' --pool-size=1000000mebibytes --max-thins=5"\n',
        ),
        (["--block=64k", "--pool", "1t", "--max-t=1k", "--unit=ki", "--numeric-only=l"], "536708kibibytes\n"),
        (["-b1", "-s99999999999999999", "-m18446744073709551615", "-ub", "-n"], "0\n"),  # >= 2**64
        (["-b64k", "-s1t", "-m" + "9" * 5000, "-n"], "288230376152776960\n"),  # atoll saturates
        (["-b64k", "-hx"], None),
        (["-b64k", "-s1t", "-m1", "-Vh"], "0.9.0\n"),
    ],
)
def test_metadata_size_golden(argv: list[str], stdout: str | None) -> None:
    text = format_metadata_size(parse_metadata_size_args(argv))
    if stdout is None:
        assert text.startswith("Thin Provisioning Metadata Device Size Calculator.\nUsage: thin_metadata_size")
    else:
        assert text == stdout


@pytest.mark.parametrize(
    ("argv", "stderr"),
    [
        (["-b100b", "-s1t", "-m1"], "thin_metadata_size - block size required!\n"),
        (["-b3", "-s1t", "-m1"], "thin_metadata_size - block size must be 2^^N\n"),
        (["-b64k", "-s64k", "-m1"], "thin_metadata_size - pool size must be larger than block size\n"),
        (["-b64k", "-b64k"], "thin_metadata_size - option already given!\n"),
        (["-b64x"], "thin_metadata_size - Invalid unit specifier!\n"),
        (["-xh"], "/usr/sbin/thin_metadata_size: invalid option -- 'x'\n"),
        (
            ["--=5"],
            "/usr/sbin/thin_metadata_size: option '--=5' is ambiguous; possibilities: '--block-size'"
            " '--pool-size' '--max-thins' '--unit' '--numeric-only' '--help' '--version'\n",
        ),
        (["--hel=x"], "/usr/sbin/thin_metadata_size: option '--help' doesn't allow an argument\n"),
        (["-b"], "/usr/sbin/thin_metadata_size: option requires an argument -- 'b'\n"),
    ],
)
def test_metadata_size_errors(argv: list[str], stderr: str) -> None:
    with pytest.raises(MetadataSizeError) as info:
        parse_metadata_size_args(argv)
    assert info.value.render() == stderr


def test_metadata_size_options_record_the_numeric_mode() -> None:
    assert parse_metadata_size_args(["-b64k", "-s1t", "-m1", "-nsh"]).numeric is Numeric.SHORT


def _random_size(rng: random.Random) -> str:
    digits = rng.choice(
        (
            "",
            "0",
            str(rng.randrange(1, 10)),
            str(2 ** rng.randrange(40)),
            str(rng.randrange(10 ** rng.randrange(1, 22))),
        )
    )
    unit: str = rng.choice(["", "", "", *"bskKmMgGtTpPeEzZyY", "ki", "tebi", "x", "bytes"])
    return f"{digits}{unit}"


def _random_argv(rng: random.Random) -> list[str]:
    argv = [
        f"-b{2 ** rng.randrange(25)}{rng.choice(('', 'k', 's', 'm', 'b'))}",
        f"-s{_random_size(rng)}",
        f"-m{_random_size(rng)}",
    ]
    extras = [
        f"-u{rng.choice('bskKmMgGtTpPeEzZyYq')}",
        rng.choice(("-n", "-nshort", "-nlong", "-nq")),
        rng.choice(("-h", "-V", "-x", "--foo", "junk", "--", "-b8", "--unit", "--pool=1g")),
    ]
    argv += rng.sample(extras, rng.randrange(len(extras) + 1))
    rng.shuffle(argv)
    return argv


def test_metadata_size_agrees_with_the_real_tool() -> None:
    tool = require_tool("thin_metadata_size")
    rng = random.Random(2024)
    for _ in range(300):
        argv = _random_argv(rng)
        real = run_tool([tool, *argv], check=False)
        try:
            ours = (format_metadata_size(parse_metadata_size_args(argv)), "", 0)
        except MetadataSizeError as e:
            ours = ("", e.render(argv0=tool), 1)
        assert ours == (real.stdout, real.stderr, real.returncode), argv


def test_metadata_size_help_is_exact() -> None:
    tool = require_tool("thin_metadata_size")
    assert format_metadata_size(parse_metadata_size_args(["-h"])) == run_tool([tool, "-h"]).stdout


def test_options_are_plain_data() -> None:
    opts = parse_metadata_size_args(["-b64k", "-s1t", "-m1000"])
    assert dataclasses.asdict(opts)["block_sectors"] == 128
