"""thin_delta: the differences between two thin devices' mappings, as thin_delta 0.9.0 prints them.

Each device's mappings are first merged into runs of consecutive virtual and data blocks (time is
ignored), then the two run lists are walked in parallel, classifying stretches as ``same``,
``different`` (both mapped, other data blocks), ``left_only`` or ``right_only``.  The walk deliberately
keeps thin_delta 0.9.0's quirk: when one side's run list is exhausted, the unconsumed remainder of the
other side's *current* run is not reported (only its later runs are), so output matches the tool.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TextIO

from devmapper.blockdev.base import BlockDevice
from devmapper.errors import DeviceError
from devmapper.thin.dump import MetadataReader


class Kind(enum.Enum):
    LEFT_ONLY = "left_only"
    RIGHT_ONLY = "right_only"
    DIFFERENT = "different"
    SAME = "same"


Piece = tuple[Kind, int, int, int, int]  # kind, vbegin, left data, right data, length


def _runs(mappings: Iterable[tuple[int, int]]) -> list[list[int]]:
    runs: list[list[int]] = []
    for vblock, value in mappings:
        data = value >> 24
        if runs and runs[-1][0] + runs[-1][2] == vblock and runs[-1][1] + runs[-1][2] == data:
            runs[-1][2] += 1
        else:
            runs.append([vblock, data, 1])
    return runs


def diff(left: list[list[int]], right: list[list[int]]) -> list[Piece]:
    """Walk two run lists ([vbegin, dbegin, len]) the way thin_delta's dump_diff does."""
    out: list[Piece] = []
    li = ri = 0
    lm = [0, 0, 0]
    rm = [0, 0, 0]

    def consume(m: list[int], n: int) -> None:
        n = min(n, m[2])
        m[0] += n
        m[1] += n
        m[2] -= n

    while li < len(left) and ri < len(right):
        if not lm[2]:
            lm = list(left[li])
            li += 1
        if not rm[2]:
            rm = list(right[ri])
            ri += 1
        while lm[2] and rm[2]:
            if lm[0] < rm[0]:
                n = min(lm[2], rm[0] - lm[0])
                out.append((Kind.LEFT_ONLY, lm[0], lm[1], 0, n))
                consume(lm, n)
            elif lm[0] > rm[0]:
                n = min(rm[2], lm[0] - rm[0])
                out.append((Kind.RIGHT_ONLY, rm[0], 0, rm[1], n))
                consume(rm, n)
            else:
                n = min(lm[2], rm[2])
                kind = Kind.DIFFERENT if lm[1] != rm[1] else Kind.SAME
                out.append((kind, lm[0], lm[1], rm[1], n))
                consume(lm, n)
                consume(rm, n)
    out += [(Kind.LEFT_ONLY, v, d, 0, n) for v, d, n in left[li:] if n]
    out += [(Kind.RIGHT_ONLY, v, 0, d, n) for v, d, n in right[ri:] if n]
    return out


def _write_simple(out: TextIO, pieces: list[Piece]) -> None:
    spans: list[tuple[Kind, int, int]] = []  # kind, begin, end: adjacent pieces of one kind merge
    for kind, v, _ld, _rd, n in pieces:
        if spans and spans[-1][0] == kind and spans[-1][2] == v:
            spans[-1] = (kind, spans[-1][1], v + n)
        else:
            spans.append((kind, v, v + n))
    for kind, begin, end in spans:
        out.write(f'    <{kind.value} begin="{begin}" length="{end - begin}"/>\n')


def _write_verbose(out: TextIO, pieces: list[Piece]) -> None:
    current: Kind | None = None
    for kind, v, ld, rd, n in pieces:
        if kind != current:
            if current is not None:
                out.write(f"    </{current.value}>\n")
            out.write(f"    <{kind.value}>\n")
            current = kind
        if kind is Kind.DIFFERENT:
            out.write(f'      <range begin="{v}" left_data_begin="{ld}" right_data_begin="{rd}" length="{n}"/>\n')
        else:
            d = rd if kind is Kind.RIGHT_ONLY else ld
            out.write(f'      <range begin="{v}" data_begin="{d}" length="{n}"/>\n')
    if current is not None:
        out.write(f"    </{current.value}>\n")


def delta(
    dev: BlockDevice, out: TextIO, thin1: int, thin2: int, *, metadata_snap: bool | int = False, verbose: bool = False
) -> None:
    """Write thin_delta's XML for thin1 (left) against thin2 (right)."""
    reader = MetadataReader(dev, metadata_snap)
    roots = dict(reader.device_roots())
    for n, dev_id in ((1, thin1), (2, thin2)):
        if dev_id not in roots:
            raise DeviceError(f"Unable to find mapping tree for snap{n} ({dev_id})", "ENODATA")
    pieces = diff(_runs(reader.mappings(roots[thin1])), _runs(reader.mappings(roots[thin2])))
    sb = reader.sb
    snap = f' metadata_snap="{sb.held_root}"' if sb.held_root else ""
    out.write(
        f'<superblock uuid="" time="{sb.time}" transaction="{sb.trans_id}" data_block_size="{sb.data_block_size}" '
        f'nr_data_blocks="{reader.nr_data_blocks}"{snap}>\n'
    )
    out.write(f'  <diff left="{thin1}" right="{thin2}">\n')
    (_write_verbose if verbose else _write_simple)(out, pieces)
    out.write("  </diff>\n</superblock>\n")
