"""Docker's dm.* options, go-units sizes and the per-container size option.

Expected values are worked out by hand from go-units v0.5.0 (``parseSize``/``HumanSize``) and from
moby's ``NewDeviceSet``/``parseStorageOpt`` as they stood before the driver was removed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmapper.errors import DevmapperError
from devmapper.layers.options import DmOptions, OptionError, human_size, parse_bool, parse_container_size, ram_in_bytes

KiB, MiB, GiB, TiB, PiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40, 1 << 50
DEFERRED_MSG = (
    "devmapper: Deferred deletion can not be enabled as deferred removal is not enabled. "
    "Enable deferred removal using --storage-opt dm.use_deferred_removal=true parameter"
)


# -- RAMInBytes -------------------------------------------------------------------------------------

RAM_IN_BYTES = [
    ("0", 0),
    ("1", 1),
    ("32", 32),
    ("32b", 32),
    ("32B", 32),
    ("32k", 32 * KiB),
    ("32K", 32 * KiB),
    ("32kb", 32 * KiB),
    ("32Kb", 32 * KiB),
    ("32kib", 32 * KiB),
    ("32KiB", 32 * KiB),
    ("32Mb", 32 * MiB),
    ("32Gb", 32 * GiB),
    ("32Tb", 32 * TiB),
    ("32Pb", 32 * PiB),
    ("32PB", 32 * PiB),
    ("32P", 32 * PiB),
    ("10G", 10 * GiB),
    ("10GB", 10 * GiB),
    ("10gib", 10 * GiB),
    ("10GiB", 10 * GiB),
    ("10 GB", 10 * GiB),
    ("10 g", 10 * GiB),
    ("10 ", 10),  # the space separates a number from an empty suffix
    ("1.5k", 1536),
    ("0.1k", 102),  # 102.4 truncated toward zero
    ("32.3", 32),
    ("32.3 mb", 33869004),  # 32.3 * 1048576 = 33869004.8
    ("1.1g", 1181116006),  # 1.1 * 2^30 = 1181116006.4
    (".5k", 512),  # Go's ParseFloat takes ".5" and "5."
    ("5.k", 5120),
    ("+1", 1),
    ("-0", 0),
    ("1e3", 1000),  # Go floats have exponents
    ("1e3k", 1024000),
    ("0x1p4", 16),  # and hexadecimal mantissas with a p exponent
    ("100G", 100 * GiB),
    ("8191p", 8191 * PiB),  # 9222246136947933184, just under 2^63
    ("9223372036854774784", 9223372036854774784),  # the largest double below 2^63
]

RAM_IN_BYTES_ERRORS = [
    ("", "invalid size: ''"),
    ("hello", "invalid size: 'hello'"),
    ("k", "invalid size: 'k'"),
    ("-32", "invalid size: '-32'"),
    ("-0.5", "invalid size: '-0.5'"),
    (" 32 ", 'strconv.ParseFloat: parsing " 32": invalid syntax'),
    (" ", 'strconv.ParseFloat: parsing "": invalid syntax'),
    ("10  GB", 'strconv.ParseFloat: parsing "10 ": invalid syntax'),
    ("32m b", 'strconv.ParseFloat: parsing "32m": invalid syntax'),
    ("1.2.3", 'strconv.ParseFloat: parsing "1.2.3": invalid syntax'),
    ("1_000", 'strconv.ParseFloat: parsing "1_000": invalid syntax'),
    ("0x10", 'strconv.ParseFloat: parsing "0x10": invalid syntax'),
    ("1e400", 'strconv.ParseFloat: parsing "1e400": value out of range'),
    ("32bm", "invalid suffix: 'bm'"),
    ("10bb", "invalid suffix: 'bb'"),
    ("10i", "invalid suffix: 'i'"),
    ("10ib", "invalid suffix: 'ib'"),
    ("10ki", "invalid suffix: 'ki'"),
    ("10KB ", 'strconv.ParseFloat: parsing "10KB": invalid syntax'),
    ("10x", "invalid suffix: 'x'"),
    ("10kbb", "invalid suffix: 'kbb'"),
    ("10GIBB", "invalid suffix: 'GIBB'"),  # too long: quoted before lower-casing, as go-units does
    ("10e", "invalid suffix: 'e'"),
    # Beyond int64, or not finite: Go's int64(float) would have produced garbage; refused here.
    ("8192p", "invalid size: '8192p'"),
    ("9223372036854775807", "invalid size: '9223372036854775807'"),
    ("99999999999999999999", "invalid size: '99999999999999999999'"),
    ("inf ", "invalid size: 'inf '"),
    ("nan ", "invalid size: 'nan '"),
]


@pytest.mark.parametrize(("text", "expected"), RAM_IN_BYTES)
def test_ram_in_bytes(text: str, expected: int) -> None:
    assert ram_in_bytes(text) == expected


@pytest.mark.parametrize(("text", "message"), RAM_IN_BYTES_ERRORS)
def test_ram_in_bytes_refuses(text: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        ram_in_bytes(text)
    assert str(info.value) == message


def test_option_error_is_a_devmapper_error() -> None:
    assert issubclass(OptionError, DevmapperError)


UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "g": GiB, "gib": GiB, "t": TiB,
         "tb": TiB, "p": PiB, "pib": PiB}


@given(
    n=st.integers(min_value=0, max_value=1 << 53),
    unit=st.sampled_from(sorted(UNITS)),
    space=st.booleans(),
    upper=st.booleans(),
)
def test_ram_in_bytes_integers_times_unit(n: int, unit: str, space: bool, upper: bool) -> None:
    text = f"{n}{' ' if space else ''}{unit.upper() if upper else unit}"
    expected = n * UNITS[unit]  # exact in a double: n < 2^53 times a power of two
    if expected >= 1 << 63:
        with pytest.raises(OptionError, match="invalid size"):
            ram_in_bytes(text)
    else:
        assert ram_in_bytes(text) == expected


@given(st.text(max_size=12))
def test_ram_in_bytes_never_raises_anything_but_option_error(text: str) -> None:
    try:
        value = ram_in_bytes(text)
    except OptionError:
        return
    assert 0 <= value < 1 << 63


# -- HumanSize --------------------------------------------------------------------------------------

HUMAN_SIZE = [
    (0, "0B"),
    (1, "1B"),
    (999, "999B"),
    (1000, "1kB"),
    (1024, "1.024kB"),
    (65536, "65.54kB"),  # Docker's default pool block size
    (999949, "999.9kB"),
    (999999, "1000kB"),  # %.4g rounds after the unit is chosen (a go-units quirk)
    (1_000_000, "1MB"),
    (1_048_576, "1.049MB"),
    (1_500_000, "1.5MB"),
    (1.5e6, "1.5MB"),
    (2 * GiB, "2.147GB"),  # dm.loopmetadatasize default
    (10 * GiB, "10.74GB"),  # dm.basesize default
    (100 * GiB, "107.4GB"),  # dm.loopdatasize default
    (3.42e9, "3.42GB"),
    (5.372e12, "5.372TB"),
    (2.22e15, "2.22PB"),
    (1e21, "1ZB"),
    (1e28, "1e+04YB"),  # past the last unit, %g switches to an exponent
    (-5, "-5B"),
]


@pytest.mark.parametrize(("n", "expected"), HUMAN_SIZE)
def test_human_size(n: float, expected: str) -> None:
    assert human_size(n) == expected


@given(st.integers(min_value=0, max_value=10**24))
def test_human_size_has_at_most_four_significant_digits(n: int) -> None:
    text = human_size(n)
    number = text.rstrip("BkMGTPEZY")
    assert text[len(number) :] in ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
    assert len(number.replace(".", "").lstrip("0")) <= 4 or number == "0"
    assert float(number) <= 1000


# -- strconv.ParseBool ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1", "t", "T", "TRUE", "true", "True"])
def test_parse_bool_true(text: str) -> None:
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["0", "f", "F", "FALSE", "false", "False"])
def test_parse_bool_false(text: str) -> None:
    assert parse_bool(text) is False


@pytest.mark.parametrize("text", ["yes", "no", "TrUe", "", "2", " true", "on", "y"])
def test_parse_bool_refuses(text: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_bool(text)
    assert str(info.value) == f'strconv.ParseBool: parsing "{text}": invalid syntax'


# -- DmOptions: defaults and every option -----------------------------------------------------------


def test_defaults() -> None:
    o = DmOptions.parse([])
    assert o == DmOptions()
    assert (o.loopdatasize, o.loopmetadatasize, o.basesize) == (100 * GiB, 2 * GiB, 10 * GiB)
    assert (o.blocksize, o.blocksize_sectors) == (64 * KiB, 128)
    assert (o.fs, o.fs_given, o.basesize_given) == ("ext4", False, False)
    assert o.mkfsarg == [] and o.mountopt == [] and o.mount_options == ""
    assert o.datadev is None and o.metadatadev is None and o.thinpooldev is None and o.loopback
    assert o.blkdiscard is True
    assert o.use_deferred_removal is True and o.use_deferred_deletion is True
    assert o.min_free_space == 10
    assert (o.thinp_autoextend_threshold, o.thinp_autoextend_percent) == (80, 20)
    assert o.xfs_nospace_max_retries is None
    assert o.libdm_log_level == 2
    assert o.override_udev_sync_check is False


def test_sizes() -> None:
    o = DmOptions.parse(["dm.basesize=20G", "dm.loopdatasize=200GB", "dm.loopmetadatasize=4 gib"])
    assert (o.basesize, o.loopdatasize, o.loopmetadatasize) == (20 * GiB, 200 * GiB, 4 * GiB)
    assert o.basesize_given


def test_basesize_given_even_when_equal_to_the_default() -> None:
    assert DmOptions.parse(["dm.basesize=10G"]).basesize_given


def test_last_value_wins() -> None:
    assert DmOptions.parse(["dm.basesize=20G", "dm.basesize=30G"]).basesize == 30 * GiB


def test_keys_are_case_insensitive_and_trimmed() -> None:
    o = DmOptions.parse([" DM.BaseSize = 20G ", "Dm.Fs=xfs", "\tdm.mkfsarg\t=\t-m crc=0\n"])
    assert o.basesize == 20 * GiB and o.fs == "xfs" and o.mkfsarg == ["-m crc=0"]


def test_value_may_contain_equals() -> None:
    assert DmOptions.parse(["dm.mkfsarg=-E=stride=16"]).mkfsarg == ["-E=stride=16"]


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_fs(fs: str) -> None:
    o = DmOptions.parse([f"dm.fs={fs}"])
    assert o.fs == fs and o.fs_given


def test_mkfsarg_appends_and_mountopt_joins() -> None:
    o = DmOptions.parse(
        ["dm.mkfsarg=-O ^has_journal", "dm.mkfsarg=-b 4096", "dm.mountopt=nodiscard,noatime", "dm.mountopt=",
         "dm.mountopt=nobarrier"]
    )
    assert o.mkfsarg == ["-O ^has_journal", "-b 4096"]
    assert o.mountopt == ["nodiscard,noatime", "", "nobarrier"]
    assert o.mount_options == "nodiscard,noatime,nobarrier"


def test_datadev_and_metadatadev_turn_blkdiscard_off_by_default() -> None:
    o = DmOptions.parse(["dm.datadev=/dev/sdb1", "dm.metadatadev=/dev/sdc1"])
    assert (o.datadev, o.metadatadev, o.blkdiscard, o.loopback) == ("/dev/sdb1", "/dev/sdc1", False, False)


def test_metadatadev_alone_keeps_blkdiscard() -> None:
    assert DmOptions.parse(["dm.metadatadev=/dev/sdc1"]).blkdiscard is True  # Docker looks at data and pool only


@pytest.mark.parametrize(
    ("value", "name"), [("/dev/mapper/docker-thinpool", "docker-thinpool"), ("vg-pool", "vg-pool")]
)
def test_thinpooldev_strips_dev_mapper(value: str, name: str) -> None:
    o = DmOptions.parse([f"dm.thinpooldev={value}"])
    assert (o.thinpooldev, o.blkdiscard, o.loopback) == (name, False, False)


def test_empty_device_values_mean_not_given() -> None:
    o = DmOptions.parse(["dm.thinpooldev=/dev/mapper/", "dm.datadev=", "dm.metadatadev="])
    assert o.thinpooldev is None and o.datadev is None and o.metadatadev is None and o.blkdiscard and o.loopback


@pytest.mark.parametrize("order", [0, 1])
def test_explicit_blkdiscard_wins_over_the_device_default(order: int) -> None:
    opts = ["dm.thinpooldev=pool", "dm.blkdiscard=true"]
    assert DmOptions.parse(opts if order else opts[::-1]).blkdiscard is True
    assert DmOptions.parse(["dm.blkdiscard=false"]).blkdiscard is False


@pytest.mark.parametrize(("value", "size"), [("64k", 64 * KiB), ("512K", 512 * KiB), ("1M", MiB), ("1G", GiB)])
def test_blocksize(value: str, size: int) -> None:
    o = DmOptions.parse([f"dm.blocksize={value}"])
    assert o.blocksize == size and o.blocksize_sectors == size // 512


@pytest.mark.parametrize("value", ["32k", "96k", "0", "2G", "4G", "65537"])
def test_blocksize_outside_the_kernels_rule(value: str) -> None:
    with pytest.raises(OptionError) as info:
        DmOptions.parse([f"dm.blocksize={value}"])
    assert str(info.value) == (
        f"devmapper: Invalid value {value} for option dm.blocksize: the pool block size must be a multiple of "
        "64 KiB from 64 KiB to 1 GiB"
    )


@pytest.mark.parametrize(
    ("key", "attr"),
    [
        ("dm.blkdiscard", "blkdiscard"),
        ("dm.override_udev_sync_check", "override_udev_sync_check"),
        ("dm.use_deferred_removal", "use_deferred_removal"),
    ],
)
def test_bool_options(key: str, attr: str) -> None:
    for text, value in (("true", True), ("1", True), ("T", True), ("false", False), ("0", False), ("F", False)):
        assert getattr(DmOptions.parse([f"{key}={text}"]), attr) is value
    with pytest.raises(OptionError, match=r'^strconv\.ParseBool: parsing "maybe": invalid syntax$'):
        DmOptions.parse([f"{key}=maybe"])


def test_deferred_removal_off_turns_unset_deletion_off() -> None:
    o = DmOptions.parse(["dm.use_deferred_removal=false"])
    assert (o.use_deferred_removal, o.use_deferred_deletion) == (False, False)


def test_deferred_deletion_off_alone() -> None:
    o = DmOptions.parse(["dm.use_deferred_deletion=false"])
    assert (o.use_deferred_removal, o.use_deferred_deletion) == (True, False)


@pytest.mark.parametrize(
    "opts",
    [
        ["dm.use_deferred_removal=false", "dm.use_deferred_deletion=true"],
        ["dm.use_deferred_deletion=true", "dm.use_deferred_removal=false"],
    ],
)
def test_deferred_deletion_needs_removal(opts: list[str]) -> None:
    with pytest.raises(OptionError) as info:
        DmOptions.parse(opts)
    assert str(info.value) == DEFERRED_MSG


@pytest.mark.parametrize(("value", "percent"), [("0%", 0), ("1%", 1), ("10%", 10), ("99%", 99), ("007%", 7)])
def test_min_free_space(value: str, percent: int) -> None:
    assert DmOptions.parse([f"dm.min_free_space={value}"]).min_free_space == percent


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10", "devmapper: Option dm.min_free_space requires % suffix"),
        ("", "devmapper: Option dm.min_free_space requires % suffix"),
        ("100%", "devmapper: Invalid value 100% for option dm.min_free_space"),
        ("250%", "devmapper: Invalid value 250% for option dm.min_free_space"),
        ("%", 'strconv.ParseUint: parsing "": invalid syntax'),
        ("-1%", 'strconv.ParseUint: parsing "-1": invalid syntax'),
        ("+5%", 'strconv.ParseUint: parsing "+5": invalid syntax'),
        ("1.5%", 'strconv.ParseUint: parsing "1.5": invalid syntax'),
        ("10%%", 'strconv.ParseUint: parsing "10%": invalid syntax'),
        ("4294967296%", 'strconv.ParseUint: parsing "4294967296": value out of range'),
    ],
)
def test_min_free_space_refuses(value: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        DmOptions.parse([f"dm.min_free_space={value}"])
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("name", "default"), [("thinp_autoextend_threshold", 80), ("thinp_autoextend_percent", 20)]
)
def test_autoextend_options(name: str, default: int) -> None:
    for value, expected in (("90", 90), ("90%", 90), ("1", 1), ("100%", 100), ("0", default), ("0%", default)):
        assert getattr(DmOptions.parse([f"dm.{name}={value}"]), name) == expected
    for value, message in (
        ("101", f"dm.{name} must be greater than 0 and less than 100"),
        ("x", f'could not parse `dm.{name}=x`: strconv.ParseUint: parsing "x": invalid syntax'),
        ("-1%", f'could not parse `dm.{name}=-1%`: strconv.ParseUint: parsing "-1": invalid syntax'),
        ("5000000000", f'could not parse `dm.{name}=5000000000`: strconv.ParseUint: parsing "5000000000": '
                       "value out of range"),
    ):
        with pytest.raises(OptionError) as info:
            DmOptions.parse([f"dm.{name}={value}"])
        assert str(info.value) == message


@pytest.mark.parametrize("value", ["0", "5", "18446744073709551615"])
def test_xfs_nospace_max_retries_kept_as_text(value: str) -> None:
    assert DmOptions.parse([f"dm.xfs_nospace_max_retries={value}"]).xfs_nospace_max_retries == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", 'strconv.ParseUint: parsing "-1": invalid syntax'),
        ("many", 'strconv.ParseUint: parsing "many": invalid syntax'),
        ("18446744073709551616", 'strconv.ParseUint: parsing "18446744073709551616": value out of range'),
    ],
)
def test_xfs_nospace_max_retries_refuses(value: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        DmOptions.parse([f"dm.xfs_nospace_max_retries={value}"])
    assert str(info.value) == message


@pytest.mark.parametrize(("value", "level"), [("2", 2), ("7", 7), ("+4", 4), ("05", 5)])
def test_libdm_log_level(value: str, level: int) -> None:
    assert DmOptions.parse([f"dm.libdm_log_level={value}"]).libdm_log_level == level


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1", "dm.libdm_log_level must be in range [2,7]"),
        ("8", "dm.libdm_log_level must be in range [2,7]"),
        ("-3", "dm.libdm_log_level must be in range [2,7]"),
        ("debug", 'could not parse `dm.libdm_log_level=debug`: strconv.ParseInt: parsing "debug": invalid syntax'),
        ("2147483648",
         'could not parse `dm.libdm_log_level=2147483648`: strconv.ParseInt: parsing "2147483648": value out of range'),
    ],
)
def test_libdm_log_level_refuses(value: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        DmOptions.parse([f"dm.libdm_log_level={value}"])
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("opt", "message"),
    [
        ("dm.foo=1", "devmapper: Unknown option dm.foo"),
        ("DM.FOO=1", "devmapper: Unknown option dm.foo"),
        ("overlay2.size=1G", "devmapper: Unknown option overlay2.size"),
        ("dm.no_warn_on_loop_devices=true", "devmapper: Unknown option dm.no_warn_on_loop_devices"),  # Red Hat only
        ("dm.deferred_device_removal=true", "devmapper: Unknown option dm.deferred_device_removal"),
        ("dm.basesize", "unable to parse key/value option: dm.basesize"),
        ("", "unable to parse key/value option: "),
        ("dm.basesize=", "invalid size: ''"),
        ("dm.basesize=ten", "invalid size: 'ten'"),
        ("dm.loopdatasize=1x", "invalid suffix: 'x'"),
        ("dm.loopmetadatasize=-2G", "invalid size: '-2G'"),
        ("dm.fs=btrfs", "devmapper: Unsupported filesystem btrfs"),
        ("dm.fs=EXT4", "devmapper: Unsupported filesystem EXT4"),
        ("dm.blkdiscard=", 'strconv.ParseBool: parsing "": invalid syntax'),
    ],
)
def test_refused_options(opt: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        DmOptions.parse([opt])
    assert str(info.value) == message


@pytest.mark.parametrize(
    "opt",
    [
        "dm.directlvm_device=/dev/xvdf",
        "dm.directlvm_device_force=true",
        "dm.thinp_percent=95",
        "DM.THINP_METAPERCENT=1",
    ],
)
def test_direct_lvm_is_refused_clearly(opt: str) -> None:
    with pytest.raises(OptionError) as info:
        DmOptions.parse([opt])
    key = opt.split("=")[0].lower()
    assert str(info.value).startswith(f"devmapper: {key} is not supported here: direct-lvm setup needs LVM")


def test_first_bad_option_stops_parsing() -> None:
    with pytest.raises(OptionError, match=r"Unknown option dm\.foo$"):
        DmOptions.parse(["dm.foo=1", "dm.fs=btrfs"])


def test_parse_takes_any_iterable() -> None:
    assert DmOptions.parse(iter(["dm.basesize=1G"])).basesize == GiB


# -- saved options ----------------------------------------------------------------------------------


def test_to_json_from_json_round_trip() -> None:
    o = DmOptions.parse(
        ["dm.basesize=20G", "dm.fs=xfs", "dm.mkfsarg=-m crc=0", "dm.mountopt=nouuid", "dm.thinpooldev=pool",
         "dm.blocksize=512k", "dm.min_free_space=5%", "dm.xfs_nospace_max_retries=0", "dm.libdm_log_level=7",
         "dm.use_deferred_deletion=false", "dm.thinp_autoextend_threshold=90"]
    )
    data = json.loads(json.dumps(o.to_json()))
    back = DmOptions.from_json(data)
    assert back == o
    assert back.mkfsarg is not o.mkfsarg


def test_to_json_keys() -> None:
    assert set(DmOptions().to_json()) == {
        "loopdatasize", "loopmetadatasize", "basesize", "basesize_given", "blocksize", "fs", "fs_given", "mkfsarg",
        "mountopt", "datadev", "metadatadev", "thinpooldev", "blkdiscard", "use_deferred_removal",
        "use_deferred_deletion", "min_free_space", "thinp_autoextend_threshold", "thinp_autoextend_percent",
        "xfs_nospace_max_retries", "libdm_log_level", "override_udev_sync_check",
    }


def test_from_json_fills_defaults_and_ignores_unknown_keys() -> None:
    assert DmOptions.from_json({"basesize": GiB, "from_the_future": 1}) == DmOptions(basesize=GiB)


@pytest.mark.parametrize(
    "data",
    [
        {"basesize": "10G"},
        {"basesize": True},
        {"blkdiscard": 1},
        {"fs": None},
        {"datadev": 5},
        {"mkfsarg": "-b 4096"},
        {"mkfsarg": [1]},
        {"blocksize": 1000},
        {"min_free_space": 100},
        {"libdm_log_level": 9},
        {"fs": "btrfs"},
        {"use_deferred_removal": False, "use_deferred_deletion": True},
    ],
)
def test_from_json_refuses_bad_values(data: dict[str, Any]) -> None:
    with pytest.raises(OptionError):
        DmOptions.from_json(data)


def test_from_json_refuses_non_objects() -> None:
    with pytest.raises(OptionError, match="expected a JSON object"):
        DmOptions.from_json([])  # type: ignore[arg-type]


OPTION_STRINGS = st.lists(
    st.one_of(
        st.sampled_from(["10G", "20G", "512M", "1T"]).map(lambda v: f"dm.basesize={v}"),
        st.sampled_from(["ext4", "xfs"]).map(lambda v: f"dm.fs={v}"),
        st.text(max_size=8).map(lambda v: f"dm.mkfsarg={v}"),
        st.sampled_from(["", "discard", "noatime,nodiratime"]).map(lambda v: f"dm.mountopt={v}"),
        st.sampled_from(["", "pool", "/dev/mapper/p"]).map(lambda v: f"dm.thinpooldev={v}"),
        st.sampled_from(["64k", "128k", "1M"]).map(lambda v: f"dm.blocksize={v}"),
        st.sampled_from(["true", "false"]).map(lambda v: f"dm.blkdiscard={v}"),
        st.integers(0, 99).map(lambda v: f"dm.min_free_space={v}%"),
        st.integers(0, 100).map(lambda v: f"dm.thinp_autoextend_percent={v}"),
    ),
    max_size=8,
)


@given(OPTION_STRINGS)
def test_any_valid_option_list_round_trips(opts: list[str]) -> None:
    o = DmOptions.parse(opts)
    assert DmOptions.from_json(json.loads(json.dumps(o.to_json()))) == o
    assert o.mount_options == ",".join(v for v in o.mountopt if v)


# -- per-container size -----------------------------------------------------------------------------

PARENT = 10 * GiB


@pytest.mark.parametrize(
    ("opts", "size"),
    [
        ({}, PARENT),
        ({"size": "0"}, PARENT),
        ({"size": "10G"}, PARENT),
        ({"size": "20G"}, 20 * GiB),
        ({"Size": "20GB"}, 20 * GiB),
        ({"SIZE": "1T"}, TiB),
    ],
)
def test_container_size(opts: dict[str, str], size: int) -> None:
    assert parse_container_size(opts, PARENT) == size


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"size": "5G"}, "devmapper: Container size cannot be smaller than 10.74GB"),
        ({"size": "10737418239"}, "devmapper: Container size cannot be smaller than 10.74GB"),
        ({"foo": "1"}, "Unknown option foo"),
        ({"FOO": "1"}, "Unknown option foo"),
        ({"size": "20G", "foo": "1"}, "Unknown option foo"),
        ({"foo": "1", "size": "20G"}, "Unknown option foo"),
        ({"size": "big"}, "invalid size: 'big'"),
    ],
)
def test_container_size_refuses(opts: dict[str, str], message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_container_size(opts, PARENT)
    assert str(info.value) == message


def test_container_size_message_uses_the_parents_size() -> None:
    with pytest.raises(OptionError, match=r"smaller than 2\.147GB$"):
        parse_container_size({"size": "1G"}, 2 * GiB)
