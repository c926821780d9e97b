"""The seeds' flow: base, snapshot, write the snapshot, snapshot the snapshot -- isolation both ways
and exactly the data blocks the kernel would use (shared blocks counted once), judged by thin_ls too."""

from __future__ import annotations

from devmapper.thin.pool import Pool
from helpers.tools import run_tool
from pool.support import BLOCK, PoolFiles, distinct_mapped_blocks, pattern, used_data_blocks

SIZE_BLOCKS = 32
SECTORS = SIZE_BLOCKS * BLOCK // 512


def exclusive_and_shared(files: PoolFiles) -> dict[int, tuple[int, int, int]]:
    out = run_tool(["thin_ls", "--no-headers", "--format", "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS",
                    str(files.meta)]).stdout
    rows = [list(map(int, line.split())) for line in out.splitlines() if line.strip()]
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def read_all(pool: Pool, dev: int) -> bytes:
    with pool.open_thin(dev, SECTORS) as vol:
        return vol.read(0, SIZE_BLOCKS * BLOCK)


def test_seeds_flow(files: PoolFiles) -> None:
    base = pattern(10, SIZE_BLOCKS * BLOCK)
    with files.open() as pool:
        pool.message("create_thin 1")
        with pool.open_thin(1, SECTORS) as vol:
            vol.write(0, base)
        assert used_data_blocks(pool) == SIZE_BLOCKS

        pool.message("create_snap 2 1")
        assert used_data_blocks(pool) == SIZE_BLOCKS  # a snapshot costs no data
        layer = bytearray(base)
        with pool.open_thin(2, SECTORS) as snap:
            snap.write(3 * BLOCK, b"L" * (2 * BLOCK))  # two whole blocks
            snap.write(10 * BLOCK + 100, b"partial")  # one partial block: copied
            layer[3 * BLOCK : 5 * BLOCK] = b"L" * (2 * BLOCK)
            layer[10 * BLOCK + 100 : 10 * BLOCK + 107] = b"partial"
        assert used_data_blocks(pool) == SIZE_BLOCKS + 3

        pool.message("create_snap 3 2")
        top = bytearray(layer)
        with pool.open_thin(3, SECTORS) as snap2:
            snap2.write(3 * BLOCK, b"T" * 10)  # breaks sharing with 2 (block already private to 2)
            snap2.write(20 * BLOCK, b"T" * BLOCK)  # breaks sharing with 1 and 2
            top[3 * BLOCK : 3 * BLOCK + 10] = b"T" * 10
            top[20 * BLOCK : 21 * BLOCK] = b"T" * BLOCK
        assert used_data_blocks(pool) == SIZE_BLOCKS + 5 == distinct_mapped_blocks(pool.md)

        assert read_all(pool, 1) == base
        assert read_all(pool, 2) == layer
        assert read_all(pool, 3) == top
        # writing the origin leaves both snapshots alone
        with pool.open_thin(1, SECTORS) as vol:
            vol.write(0, b"B" * BLOCK)
        assert read_all(pool, 2) == layer and read_all(pool, 3) == top
        assert used_data_blocks(pool) == SIZE_BLOCKS + 6
    files.check()

    # thin_ls: 1 alone holds its new block 0 and the originals of 3, 4, 10 (2 and 3 moved away from
    # them); 2 alone holds its copy of block 3 (3 broke it again); 3 alone holds blocks 3 and 20.
    counts = exclusive_and_shared(files)
    assert counts == {1: (SIZE_BLOCKS, 4, 28), 2: (SIZE_BLOCKS, 1, 31), 3: (SIZE_BLOCKS, 2, 30)}

    with files.open() as pool:  # deleting layers returns exactly their private blocks
        pool.message("delete 3")
        assert used_data_blocks(pool) == SIZE_BLOCKS + 4
        pool.message("delete 2")
        assert used_data_blocks(pool) == SIZE_BLOCKS  # 2's private blocks and the old block 0 are free
        assert used_data_blocks(pool) == distinct_mapped_blocks(pool.md)
    files.check()


def test_six_sharers_fully_rewritten_use_six_times_the_data(files: PoolFiles) -> None:
    """dmtest ref_count_tree: wipe origin, 5 snapshots, wipe all 6; then delete 5 of them."""
    n = 8
    with files.open() as pool:
        pool.create_thin(0)
        with pool.open_thin(0, n * 128) as vol:
            vol.write(0, b"\1" * n * BLOCK)
        for s in range(1, 6):
            pool.create_snap(s, 0)
        for dev in range(6):
            with pool.open_thin(dev, n * 128) as vol:
                vol.write(0, bytes([dev + 10]) * n * BLOCK)
        assert used_data_blocks(pool) == 6 * n
        for dev in range(1, 6):
            pool.delete(dev)
        assert used_data_blocks(pool) == n
    files.check()
