"""Seeded generator of random, valid pool descriptions (thin_dump XML) and their canonical dumps.

A ``GenPool`` is the IR of a pool: a ``SuperblockInfo`` and devices, each a ``DeviceInfo`` plus its
mappings as non-overlapping runs in ascending origin order.  The generator builds it the way a pool
evolves: a device is either fresh (random extents written at one time) or a snapshot of an earlier
device (all of its mappings, shared, then some ranges overwritten with new data blocks at a later
time, some discarded, some new ones written).  So snapshots share many (origin -> data, time)
mappings with their origin, as real ones do.  Data blocks are allocated uniquely, in contiguous
extents with random gaps, so large block numbers (up to ``max_data_blocks``) occur; ``nr_data_blocks``
is set just above the largest block used, sometimes exactly one above it.

``pool_to_xml`` writes the XML as a user might hand it to thin_restore: runs as written (optionally
split into adjacent pieces, length-1 runs sometimes as ``range_mapping length="1"``), devices and
mappings optionally shuffled, optional attributes optionally omitted.  ``canonical_dump`` returns
what thin_dump prints after thin_restore of any such text: uuid "", devices by id, mapped_blocks the
exact count, mappings by origin and merged maximally (by ``XmlWriter``).
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import random

from devmapper.thin.ir import DeviceInfo, MetadataVisitor, Run, SuperblockInfo
from devmapper.thin.xml import HumanReadableWriter, XmlWriter

MAX_DEV_ID = (1 << 24) - 1
MAX_TIME = (1 << 24) - 1


@dataclasses.dataclass(frozen=True)
class GenSizes:
    nr_devices: int = 8
    mappings_per_device: int = 200  # average for a fresh device; snapshots follow their origin
    snapshot_prob: float = 0.4
    max_data_blocks: int = 1 << 32
    max_origin: int = 1 << 40
    max_run: int = 600

    def data_budget(self) -> int:
        """Data blocks the generator expects to allocate at most (a generous estimate)."""
        return self.nr_devices * (2 * self.mappings_per_device + 2 * self.max_run + 64)


@dataclasses.dataclass
class GenDevice:
    info: DeviceInfo
    runs: list[Run]  # ascending origin, non-overlapping; adjacent runs may still be mergeable

    def mappings(self) -> list[tuple[int, int, int]]:
        return [(r.origin_begin + i, r.data_begin + i, r.time) for r in self.runs for i in range(r.length)]


@dataclasses.dataclass
class GenPool:
    superblock: SuperblockInfo
    devices: list[GenDevice]  # in creation order

    @property
    def nr_mappings(self) -> int:
        return sum(d.info.mapped_blocks for d in self.devices)


@dataclasses.dataclass(frozen=True)
class _Mod:
    start: int
    end: int
    write: bool  # True: map fresh data blocks over [start, end); False: discard


class _Allocator:
    """Unique data blocks: an ascending cursor with random gaps that cannot overrun ``limit``."""

    def __init__(self, rng: random.Random, limit: int, budget: int) -> None:
        self.rng = rng
        slack = max(0, limit - budget)
        self.cursor = rng.randrange(slack // 2 + 1)
        self.slack = slack - self.cursor
        self.gap_max = max(1, self.slack // max(1, budget // 8))
        self.limit = limit
        self.highest = -1

    def extent(self, length: int, contiguous: bool = False) -> int:
        gap = 0 if contiguous else min(self.slack, self.rng.choice((0, 0, 1, self.rng.randrange(self.gap_max + 1))))
        self.slack -= gap
        start = self.cursor + gap
        if start + length > self.limit:
            raise ValueError("data space exhausted: raise max_data_blocks or lower the sizes")
        self.cursor = start + length
        self.highest = self.cursor - 1
        return start


def _run_length(rng: random.Random, max_run: int) -> int:
    roll = rng.random()
    if roll < 0.4:
        return 1
    if roll < 0.85:
        return rng.randint(2, min(16, max(2, max_run)))
    return rng.randint(1, max_run)


def _fresh_mods(rng: random.Random, sizes: GenSizes, base: int) -> list[_Mod]:
    target = 0 if rng.random() < 0.1 else max(1, int(sizes.mappings_per_device * rng.uniform(0.5, 1.5)))
    mods: list[_Mod] = []
    pos, total = base, 0
    while total < target:
        length = min(_run_length(rng, sizes.max_run), target - total)
        pos += rng.choice((0, 0, 1, rng.randrange(1, 1000), rng.randrange(1, 1 << 20)))
        if pos + length > sizes.max_origin:
            break
        mods.append(_Mod(pos, pos + length, True))
        pos += length
        total += length
    return mods


def _snapshot_mods(rng: random.Random, runs: list[Run], sizes: GenSizes) -> list[_Mod]:
    """Overwrites and discards inside the origin's runs, plus new writes just past its end."""
    mods: list[_Mod] = []
    for _ in range(rng.randint(0, len(runs) // 5 + 1) if runs else 0):
        r = rng.choice(runs)
        a = r.origin_begin + rng.randrange(r.length)
        b = min(a + _run_length(rng, 16), r.origin_begin + r.length + rng.randrange(4))
        mods.append(_Mod(a, b, rng.random() < 0.8))
    last = runs[-1].origin_begin + runs[-1].length if runs else rng.randrange(sizes.max_origin // 2)
    for _ in range(rng.randint(0, 3)):
        a = last + rng.randrange(0, 64)
        mods.append(_Mod(a, min(a + _run_length(rng, sizes.max_run), sizes.max_origin), True))
    return _disjoint(mods)


def _disjoint(mods: list[_Mod]) -> list[_Mod]:
    out: list[_Mod] = []
    for m in sorted(mods, key=lambda m: m.start):
        if m.end > m.start and (not out or m.start >= out[-1].end):
            out.append(m)
    return out


def _cut(runs: list[Run], mods: list[_Mod]) -> list[Run]:
    """The parts of runs outside every mod interval (both lists sorted, mods disjoint)."""
    starts = [m.start for m in mods]
    out: list[Run] = []
    for r in runs:
        s, e = r.origin_begin, r.origin_begin + r.length
        k = max(0, bisect.bisect_right(starts, s) - 1)
        cur = s
        while k < len(mods) and mods[k].start < e:
            m = mods[k]
            if m.end > cur:
                if m.start > cur:
                    out.append(Run(cur, r.data_begin + cur - s, m.start - cur, r.time))
                cur = max(cur, m.end)
            k += 1
        if cur < e:
            out.append(Run(cur, r.data_begin + cur - s, e - cur, r.time))
    return out


def _apply(rng: random.Random, runs: list[Run], mods: list[_Mod], alloc: _Allocator, time: int) -> list[Run]:
    out = _cut(runs, mods)
    for m in mods:
        pos = m.start
        while m.write and pos < m.end:
            piece = m.end - pos if rng.random() < 0.8 else rng.randint(1, m.end - pos)
            # Sometimes the next piece continues the data extent but was written at another time:
            # adjacent in origin and data, yet not mergeable.
            older = pos > m.start and rng.random() < 0.5
            out.append(Run(pos, alloc.extent(piece, contiguous=older), piece, max(time - older, 0)))
            pos += piece
    out.sort(key=lambda r: r.origin_begin)
    return out


def _dev_ids(rng: random.Random, n: int) -> list[int]:
    ids = set(rng.sample(range(MAX_DEV_ID + 1), n))
    for edge in (0, MAX_DEV_ID):
        if n and edge not in ids and rng.random() < 0.3:
            ids.pop()
            ids.add(edge)
    out = list(ids)
    rng.shuffle(out)
    return out


def generate_pool(rng: random.Random, sizes: GenSizes = GenSizes()) -> GenPool:
    """A random valid pool; deterministic for a given rng state and sizes."""
    alloc = _Allocator(rng, sizes.max_data_blocks, sizes.data_budget())
    time = rng.choice((0, rng.randrange(1000), rng.randrange(MAX_TIME - 10 * sizes.nr_devices - 10)))
    made: list[tuple[DeviceInfo, list[Run]]] = []
    for dev_id in _dev_ids(rng, sizes.nr_devices):
        if made and rng.random() < sizes.snapshot_prob:
            i = rng.randrange(len(made))
            origin, origin_runs = made[i]
            time += 1  # taking a snapshot bumps the pool's time
            made[i] = (dataclasses.replace(origin, snap_time=time), origin_runs)
            created = time
            time += rng.randrange(2)  # the snapshot's own writes may come later still
            runs = _apply(rng, origin_runs, _snapshot_mods(rng, origin_runs, sizes), alloc, time)
        else:
            created = time
            base = rng.randrange(max(1, sizes.max_origin // 2))
            runs = _apply(rng, [], _fresh_mods(rng, sizes, base), alloc, time)
        trans = rng.choice((0, rng.randrange(1000), rng.randrange(1 << 63)))
        made.append((DeviceInfo(dev_id, sum(r.length for r in runs), trans, created, created), runs))
    time += rng.randrange(3)
    highest = alloc.highest
    spare = rng.choice((0, 1, rng.randrange(max(1, sizes.max_data_blocks - highest - 1))))
    nr_data_blocks = min(max(highest + 1 + spare, 1), max(sizes.max_data_blocks, highest + 1))
    sb = SuperblockInfo(
        uuid="",
        time=time,
        transaction=rng.choice((0, rng.randrange(100), rng.randrange(1 << 63))),
        flags=rng.choice((0, 0, 0, 1)),
        version=rng.choice((2, 2, 2, 1)),
        data_block_size=128 << rng.randrange(8),
        nr_data_blocks=nr_data_blocks,
    )
    return GenPool(sb, [GenDevice(info, runs) for info, runs in made])


# --------------------------------------------------------------------------------------------------
# Text


@dataclasses.dataclass(frozen=True)
class XmlStyle:
    """How far ``pool_to_xml`` strays from thin_dump's own layout (every variant restores the same)."""

    split_prob: float = 0.0  # split a run into adjacent pieces (thin_dump merges them back)
    single_as_range_prob: float = 0.0  # write a length-1 run as range_mapping length="1"
    shuffle_devices: bool = False
    shuffle_mappings: bool = False
    omit_defaults: bool = False  # leave out flags="0" / version="1"
    uuid: str = ""
    mapped_blocks_wrong: bool = False  # thin_restore ignores mapped_blocks


def _split(rng: random.Random, run: Run, prob: float) -> list[Run]:
    if run.length < 2 or rng.random() >= prob:
        return [run]
    cut = rng.randrange(1, run.length)
    head = Run(run.origin_begin, run.data_begin, cut, run.time)
    tail = Run(run.origin_begin + cut, run.data_begin + cut, run.length - cut, run.time)
    return [head, *_split(rng, tail, prob)]


def _mapping_line(rng: random.Random, r: Run, style: XmlStyle) -> str:
    if r.length == 1 and rng.random() >= style.single_as_range_prob:
        return f'    <single_mapping origin_block="{r.origin_begin}" data_block="{r.data_begin}" time="{r.time}"/>\n'
    return (
        f'    <range_mapping origin_begin="{r.origin_begin}" data_begin="{r.data_begin}"'
        f' length="{r.length}" time="{r.time}"/>\n'
    )


def pool_to_xml(pool: GenPool, rng: random.Random | None = None, style: XmlStyle = XmlStyle()) -> str:
    """The pool as XML for thin_restore, laid out according to ``style`` (choices drawn from rng)."""
    rng = rng or random.Random(0)
    sb = pool.superblock
    opt = ""
    if not (style.omit_defaults and sb.flags == 0):
        opt += f' flags="{sb.flags}"'
    if not (style.omit_defaults and sb.version == 1):
        opt += f' version="{sb.version}"'
    parts = [
        f'<superblock uuid="{style.uuid}" time="{sb.time}" transaction="{sb.transaction}"{opt}'
        f' data_block_size="{sb.data_block_size}" nr_data_blocks="{sb.nr_data_blocks}">\n'
    ]
    devices = list(pool.devices)
    if style.shuffle_devices:
        rng.shuffle(devices)
    for dev in devices:
        d = dev.info
        mapped = d.mapped_blocks + (rng.randrange(1, 100) if style.mapped_blocks_wrong else 0)
        parts.append(
            f'  <device dev_id="{d.dev_id}" mapped_blocks="{mapped}" transaction="{d.transaction}"'
            f' creation_time="{d.creation_time}" snap_time="{d.snap_time}">\n'
        )
        runs = [piece for r in dev.runs for piece in _split(rng, r, style.split_prob)]
        if style.shuffle_mappings:
            rng.shuffle(runs)
        parts.extend(_mapping_line(rng, r, style) for r in runs)
        parts.append("  </device>\n")
    parts.append("</superblock>\n")
    return "".join(parts)


def random_style(rng: random.Random) -> XmlStyle:
    """A random XmlStyle (for tests that want every layout thin_restore accepts)."""
    return XmlStyle(
        split_prob=rng.choice((0.0, 0.2, 0.7)),
        single_as_range_prob=rng.choice((0.0, 0.3)),
        shuffle_devices=rng.random() < 0.5,
        shuffle_mappings=rng.random() < 0.3,
        omit_defaults=rng.random() < 0.3,
        uuid=rng.choice(("", "", "0123456789abcdef", "pool-uuid")),
        mapped_blocks_wrong=rng.random() < 0.3,
    )


# --------------------------------------------------------------------------------------------------
# Canonical dumps


def replay_canonical(pool: GenPool, visitor: MetadataVisitor) -> None:
    """Drive visitor as our reader would over the restored pool: ids ascending, runs by origin."""
    visitor.superblock_b(dataclasses.replace(pool.superblock, uuid="", metadata_snap=None))
    for dev in sorted(pool.devices, key=lambda d: d.info.dev_id):
        visitor.device_b(dataclasses.replace(dev.info, mapped_blocks=sum(r.length for r in dev.runs)))
        for run in sorted(dev.runs, key=lambda r: r.origin_begin):
            visitor.map(run)
        visitor.device_e()
    visitor.superblock_e()
    visitor.eof()


def canonical_dump(pool: GenPool) -> str:
    """What ``thin_dump`` prints after ``thin_restore`` of any ``pool_to_xml`` text of this pool."""
    out = io.StringIO()
    replay_canonical(pool, XmlWriter(out))
    return out.getvalue()


def canonical_human_readable(pool: GenPool) -> str:
    """What ``thin_dump -f human_readable`` prints for the restored pool."""
    out = io.StringIO()
    replay_canonical(pool, HumanReadableWriter(out))
    return out.getvalue()


def metadata_file_size(pool: GenPool) -> int:
    """Bytes of (sparse) metadata file comfortably big enough for thin_restore of this pool."""
    sb = pool.superblock
    blocks = 256 + sb.nr_data_blocks // 16000 + pool.nr_mappings // 60 + 4 * len(pool.devices)
    mib = -(-blocks * 4096 // (1 << 20))
    return max(8, 2 * mib) << 20
