"""The deterministic workload of the crash test, shared by the worker process and the checker.

``operations(seed)`` yields an endless stream of ``Op`` over thin devices 0..2 (created before the
workload starts) and snapshots of them.  Both sides regenerate it from the seed, so the child only
has to report op indices.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

INITIAL_DEVICES = (0, 1, 2)
MAX_DEVICES = 7
VOL_BLOCKS = 24
TAIL_SECTORS = 3


@dataclasses.dataclass(frozen=True)
class Params:
    block_sectors: int
    passdown: bool
    commit_period: float

    @property
    def block(self) -> int:
        return self.block_sectors * 512

    @property
    def vol_size(self) -> int:
        return VOL_BLOCKS * self.block + TAIL_SECTORS * 512

    @property
    def data_blocks(self) -> int:
        return (VOL_BLOCKS + 1) * (MAX_DEVICES + 1)


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str  # write | discard | zeroes | flush | snap | delete
    dev: int
    offset: int = 0
    length: int = 0
    seed: int = 0
    fua: bool = False
    new: int = -1  # the snapshot's id

    @property
    def flushes(self) -> bool:
        """Completing it makes every earlier change of ``dev`` (snap/delete: of every device) durable."""
        return self.kind in ("flush", "snap", "delete")


def params(seed: int) -> Params:
    rng = random.Random(seed ^ 0x5EED)
    return Params(rng.choice([128, 256]), rng.random() < 0.7, rng.choice([0.01, 0.1, 1.0]))


def operations(seed: int) -> Iterator[Op]:
    rng = random.Random(seed)
    p = params(seed)
    live = list(INITIAL_DEVICES)
    next_id = len(INITIAL_DEVICES)
    while True:
        dev = rng.choice(live)
        r = rng.random()
        if r < 0.03 and len(live) < MAX_DEVICES:
            live.append(next_id)
            yield Op("snap", dev, new=next_id)
            next_id += 1
        elif r < 0.05 and len(live) > len(INITIAL_DEVICES):
            victim = rng.choice(live[len(INITIAL_DEVICES) :])
            live.remove(victim)
            yield Op("delete", victim)
        elif r < 0.15:
            yield Op("flush", dev)
        else:
            offset = rng.randrange(p.vol_size)
            cap = rng.choice([8192, 3 * p.block])
            length = rng.randint(1, min(cap, p.vol_size - offset))
            kind = rng.choices(["write", "discard", "zeroes"], [0.8, 0.1, 0.1])[0]
            yield Op(kind, dev, offset, length, rng.getrandbits(32), rng.random() < 0.1)


def payload(op: Op) -> bytes:
    return random.Random(op.seed).randbytes(op.length)
