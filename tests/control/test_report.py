"""dmsetup's output formats, checked against the exact text dmsetup prints."""

from __future__ import annotations

from typing import Any

import pytest

from devmapper.control import report


def info(**changes: Any) -> dict[str, Any]:
    base = {"name": "pool", "uuid": "", "major": 253, "minor": 0, "suspended": False, "read_only": False,
            "deferred_remove": False, "live_table": True, "inactive_table": False, "open_count": 1, "event_nr": 0,
            "target_count": 1, "read_ahead": 256}
    return {**base, **changes}


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (("create", "pool", "", None, "EBUSY"), "create ioctl on pool  failed: Device or resource busy"),
        (("create", "p", "LVM-1", None, "EBUSY"), "create ioctl on p LVM-1 failed: Device or resource busy"),
        (("reload", "thin", "", (253, 3), "ENODATA"), "reload ioctl on thin (253:3) failed: No data available"),
        (("reload", "thin", "", (253, 0), "EINVAL"), "reload ioctl on thin (253:0) failed: Invalid argument"),
        (("remove", "x", "", None, "ENXIO"), "remove ioctl on x  failed: No such device or address"),
    ],
)
def test_ioctl_error_lines(args: tuple[Any, ...], text: str) -> None:
    assert report.ioctl_error(*args) == "device-mapper: " + text


def test_info_long_block() -> None:
    assert report.info_long(info(suspended=True, read_only=True, deferred_remove=True, inactive_table=True,
                                 uuid="LVM-abc", minor=7, event_nr=3)) == (
        "Name:              pool\n"
        "State:             SUSPENDED (READ-ONLY) (DEFERRED REMOVE)\n"
        "Read Ahead:        256\n"
        "Tables present:    LIVE & INACTIVE\n"
        "Open count:        1\n"
        "Event number:      3\n"
        "Major, minor:      253, 7\n"
        "Number of targets: 1\n"
        "UUID: LVM-abc\n"
        "\n"
    )
    assert "Tables present:    None\n" in report.info_long(info(live_table=False, target_count=0))
    assert "Tables present:    INACTIVE\n" in report.info_long(info(live_table=False, inactive_table=True))


def test_info_columns_widths_grow_with_the_data() -> None:
    long_name = "docker-253:1-138011042-pool"
    out = report.info_columns([info(), info(name=long_name, minor=12, open_count=1234, event_nr=7)],
                              report.column_names(None))
    assert out.splitlines() == [
        "Name                        Maj Min Stat Open Targ Event  UUID" + " " * 28,
        "pool                        253   0 L--w    1    1      0 " + " " * 32,
        f"{long_name} 253  12 L--w 1234    1      7 " + " " * 32,
    ]
    assert report.info_columns([], report.column_names(None)) == ""
    assert report.info_columns([info()], ["name", "attr"], headings=False) == "pool:L--w\n"
    assert report.info_columns([info()], ["name", "attr"], headings=False, separator="|") == "pool|L--w\n"
    with pytest.raises(ValueError, match="Unrecognised field: bogus"):
        report.column_names("name,bogus")
    assert report.column_names("+devno")[-1] == "devno"


def test_one_liners() -> None:
    assert report.ls_line(info()) == "pool\t(253:0)"
    assert report.deps_line([["7:1", [7, 1]], ["7:2", [7, 2]]]) == "2 dependencies\t: (7, 1) (7, 2)"
    assert report.deps_line([["/srv/f", None]], "lin") == "lin: 1 dependencies\t: (/srv/f)"
    assert report.deps_line([]) == "0 dependencies\t:"
    assert report.target_line([0, 8, "zero", ""], "z") == "z: 0 8 zero "
    assert report.targets_line("thin-pool", "1.23.0") == "thin-pool        v1.23.0"


def tree_input() -> list[dict[str, Any]]:
    pool = info(name="pool", minor=0)
    thin1, thin2 = info(name="thin1", minor=1, open_count=0), info(name="thin2", minor=2, open_count=0)
    return [
        {"info": pool, "deps": [["7:1", [7, 1]], ["7:0", [7, 0]]]},
        {"info": thin1, "deps": [["253:0", [253, 0]]]},
        {"info": thin2, "deps": [["253:0", [253, 0]]]},
    ]


def test_tree_like_dmsetup_ls_tree() -> None:
    nodes, roots = report.build_tree(tree_input())
    assert report.render_tree(nodes, roots, report.TreeOptions()) == (
        "thin1 (253:1)\n"
        " `-pool (253:0)\n"
        "    |- (7:1)\n"
        "    `- (7:0)\n"
        "thin2 (253:2)\n"
        " `-pool (253:0)\n"
        "    |- (7:1)\n"
        "    `- (7:0)\n"
    )


def test_tree_names_a_device_listed_after_its_user() -> None:
    devices = tree_input()
    nodes, roots = report.build_tree([devices[1], devices[0]])  # thin1 comes before its pool
    assert report.render_tree(nodes, roots, report.TreeOptions()) == (
        "thin1 (253:1)\n `-pool (253:0)\n    |- (7:1)\n    `- (7:0)\n"
    )


def test_tree_utf_inverted_and_attributes() -> None:
    opts = report.TreeOptions(symbols="utf")
    opts.apply("inverted,active,open,uuid")
    nodes, roots = report.build_tree(tree_input(), inverted=True)
    assert report.render_tree(nodes, roots, opts) == (
        " (7:1)\n"
        " \u2514\u2500pool (253:0) [ACTIVE, 1, ]\n"
        "    \u251c\u2500thin1 (253:1) [ACTIVE, 0, ]\n"
        "    \u2514\u2500thin2 (253:2) [ACTIVE, 0, ]\n"
        " (7:0)\n"
        " \u2514\u2500pool (253:0) [ACTIVE, 1, ]\n"
        "    \u251c\u2500thin1 (253:1) [ACTIVE, 0, ]\n"
        "    \u2514\u2500thin2 (253:2) [ACTIVE, 0, ]\n"
    )
    with pytest.raises(ValueError, match=r"Tree option not recognised: nope\."):
        opts.apply("nope")


def test_strerror_names() -> None:
    assert report.strerror("EBUSY") == "Device or resource busy"
    assert report.strerror("ETIME") == "Timer expired"
    assert report.strerror("EWHATEVER") == "EWHATEVER"
