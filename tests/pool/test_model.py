"""A hypothesis state machine over several thin volumes and snapshots against a byte model.

Every read must equal the model; data blocks in use must equal the distinct blocks the mappings
name (no leaks, shared blocks once); ``thin_check`` and our checker must be clean after every close.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from devmapper.thin.pool import Pool
from devmapper.thin.status import PoolFeatures
from devmapper.thin.volume import ThinVolume
from pool.support import PoolFiles, distinct_mapped_blocks, make_pool_files, pattern, used_data_blocks

MAX_DEVICES = 5
VOL_BLOCKS = 12


class PoolModel(RuleBasedStateMachine):
    """Model: thin id -> bytearray of the volume's contents."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="pool-model-"))
        self.model: dict[int, bytearray] = {}
        self.vols: dict[int, ThinVolume] = {}
        self.next_id = 0
        self.files: PoolFiles
        self.pool: Pool
        self.features = PoolFeatures()
        self.steps_since_reopen = 0

    @initialize(
        block_sectors=st.sampled_from([128, 256, 384]),
        tail_sectors=st.sampled_from([0, 3]),
        passdown=st.booleans(),
    )
    def setup(self, block_sectors: int, tail_sectors: int, passdown: bool) -> None:
        self.bs = block_sectors * 512
        self.size = VOL_BLOCKS * self.bs + tail_sectors * 512
        nr_data = (VOL_BLOCKS + 1) * (MAX_DEVICES + 1)
        self.files = make_pool_files(self.root, data_blocks=nr_data, block_sectors=block_sectors)
        self.features = PoolFeatures(no_discard_passdown=not passdown)
        self.pool = self.files.open(features=self.features, commit_period=0.05)
        self._new_thin()

    def _new_thin(self) -> int:
        dev = self.next_id
        self.next_id += 1
        self.pool.create_thin(dev)
        self.model[dev] = bytearray(self.size)
        self.vols[dev] = self.pool.open_thin(dev, self.size // 512)
        return dev

    def _pick(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.model)), label="dev")

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        offset = data.draw(st.integers(0, self.size - 1), label="offset")
        length = data.draw(st.integers(1, min(self.size - offset, 3 * self.bs)), label="length")
        return offset, length

    # -- devices -------------------------------------------------------------------------------

    @precondition(lambda self: len(self.model) < MAX_DEVICES)
    @rule()
    def create_thin(self) -> None:
        self._new_thin()

    @precondition(lambda self: len(self.model) < MAX_DEVICES)
    @rule(data=st.data())
    def create_snap(self, data: st.DataObject) -> None:
        origin = self._pick(data)
        dev = self.next_id
        self.next_id += 1
        self.pool.message(f"create_snap {dev} {origin}")
        self.model[dev] = bytearray(self.model[origin])
        self.vols[dev] = self.pool.open_thin(dev, self.size // 512)

    @precondition(lambda self: len(self.model) > 1)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        dev = self._pick(data)
        self.vols.pop(dev).close()
        self.pool.message(f"delete {dev}")
        del self.model[dev]

    # -- I/O -----------------------------------------------------------------------------------

    @rule(data=st.data(), seed=st.integers(0, 2**32), fua=st.booleans())
    def write(self, data: st.DataObject, seed: int, fua: bool) -> None:
        dev = self._pick(data)
        offset, length = self._range(data)
        payload = pattern(seed, length)
        self.vols[dev].write(offset, payload, fua=fua)
        self.model[dev][offset : offset + length] = payload

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        dev = self._pick(data)
        offset, length = self._range(data)
        self.vols[dev].discard(offset, length)
        begin, end = -(-offset // self.bs) * self.bs, (offset + length) // self.bs * self.bs
        if begin < end:
            self.model[dev][begin:end] = bytes(end - begin)

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, unmap: bool) -> None:
        dev = self._pick(data)
        offset, length = self._range(data)
        self.vols[dev].write_zeroes(offset, length, unmap=unmap)
        self.model[dev][offset : offset + length] = bytes(length)

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        dev = self._pick(data)
        offset, length = self._range(data)
        assert self.vols[dev].read(offset, length) == self.model[dev][offset : offset + length]

    @rule(data=st.data())
    def flush(self, data: st.DataObject) -> None:
        self.vols[self._pick(data)].flush()

    @precondition(lambda self: self.steps_since_reopen >= 6)  # each close runs thin_check (~40 ms)
    @rule()
    def reopen(self) -> None:
        self.steps_since_reopen = 0
        self._close_and_check()
        self.pool = self.files.open(features=self.features, commit_period=0.05)
        self.vols = {dev: self.pool.open_thin(dev, self.size // 512) for dev in self.model}
        for dev, contents in self.model.items():
            assert self.vols[dev].read(0, self.size) == contents

    # -- invariants and teardown ---------------------------------------------------------------

    @invariant()
    def data_blocks_used_are_the_distinct_mapped_blocks(self) -> None:
        self.steps_since_reopen += 1
        if hasattr(self, "pool"):
            assert used_data_blocks(self.pool) == distinct_mapped_blocks(self.pool.md)

    def _close_and_check(self) -> None:
        for vol in self.vols.values():
            vol.close()
        self.vols = {}
        self.pool.close()
        self.files.check()

    def teardown(self) -> None:
        try:
            if hasattr(self, "pool"):
                for dev, vol in self.vols.items():
                    assert vol.read(0, self.size) == self.model[dev]
                self._close_and_check()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


PoolModel.TestCase.settings = settings(settings.default, stateful_step_count=30)
TestPoolModel = PoolModel.TestCase
