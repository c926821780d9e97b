"""Deliberate damage to metadata images, for testing checkers (ours and thin_check).

Each function breaks one invariant and, unless its purpose is a bad checksum, re-stamps the block it
changed (``format.validators.prepare_for_write`` through the codecs' ``pack``), so that the checker
meets a *structural* defect rather than a checksum failure.  Functions write straight to the device,
bypassing the transaction manager: they are for images at rest, never for a pool in use.

Locating things: ``device_root`` finds a device's mapping subtree, ``leaves`` / ``path_to_leaf`` find
nodes inside a tree, ``details_leaf`` finds a device's details record; the space-map helpers find
the bitmap holding a block's count.  All read the live superblock unless ``snapshot`` is asked for.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from typing import Literal

from devmapper.blockdev.base import BlockDevice
from devmapper.format import validators
from devmapper.format.bitmap import (
    ENTRIES_PER_BLOCK,
    pack_bitmap,
    pack_index_block,
    unpack_bitmap,
    unpack_index_block,
)
from devmapper.format.btree_node import Node
from devmapper.format.checksum import BlockType, identify
from devmapper.format.records import DeviceDetails, IndexEntry, pack_block_time, unpack_block_time
from devmapper.format.superblock import Superblock
from devmapper.units import METADATA_BLOCK_SIZE

SpaceMapName = Literal["metadata", "data"]


# -- raw blocks ----------------------------------------------------------------------------------


def read_block(dev: BlockDevice, b: int) -> bytearray:
    return bytearray(dev.read(b * METADATA_BLOCK_SIZE, METADATA_BLOCK_SIZE))


def write_block(dev: BlockDevice, b: int, buf: bytes | bytearray) -> None:
    if len(buf) != METADATA_BLOCK_SIZE:
        raise ValueError("metadata writes are whole blocks")
    dev.write(b * METADATA_BLOCK_SIZE, buf)


def block_type(dev: BlockDevice, b: int) -> BlockType | None:
    """The type whose salt makes block b's checksum match, or None."""
    return identify(read_block(dev, b))


def flip_byte(dev: BlockDevice, b: int, offset: int, *, keep_checksum: bool = False) -> None:
    """Invert every bit of one byte of block b.  ``keep_checksum`` re-stamps the checksum for the
    block's original type (keeping its stored block number), so only the contents are wrong."""
    buf = read_block(dev, b)
    kind = identify(buf)
    buf[offset] ^= 0xFF
    if keep_checksum:
        if kind is None:
            raise ValueError(f"block {b} has no valid checksum to keep")
        _restamp(buf, kind)
    write_block(dev, b, buf)


def set_blocknr(dev: BlockDevice, b: int, blocknr: int) -> None:
    """Store a different block number in block b (any type), with a valid checksum."""
    buf = read_block(dev, b)
    kind = identify(buf)
    if kind is None:
        raise ValueError(f"block {b} has no valid checksum")
    validators.prepare_for_write(buf, blocknr, kind)
    write_block(dev, b, buf)


def _restamp(buf: bytearray, kind: BlockType) -> None:
    validators.prepare_for_write(buf, struct.unpack_from("<Q", buf, 8)[0], kind)


# -- superblock ----------------------------------------------------------------------------------


def superblock(dev: BlockDevice, snapshot: bool = False) -> Superblock:
    """The live superblock, or with ``snapshot`` the metadata-snapshot copy it holds."""
    sb = Superblock.unpack(read_block(dev, 0), 0)
    if snapshot:
        if not sb.held_root:
            raise ValueError("no metadata snapshot")
        return Superblock.unpack(read_block(dev, sb.held_root), sb.held_root)
    return sb


def rewrite_superblock(dev: BlockDevice, **changes: object) -> None:
    """Rewrite block 0 with some fields changed (e.g. ``magic=1``), checksum re-stamped.

    A changed ``blocknr`` is stored in the block (which stays at 0)."""
    sb = superblock(dev).replace(**changes)
    buf = sb.replace(blocknr=0).pack()
    validators.prepare_for_write(buf, sb.blocknr, BlockType.SUPERBLOCK)
    write_block(dev, 0, buf)


# -- nodes ---------------------------------------------------------------------------------------


def read_node(dev: BlockDevice, b: int) -> Node:
    return Node.unpack(read_block(dev, b), b)


def write_node(dev: BlockDevice, node: Node) -> None:
    """Pack (and stamp) node at its own block -- whatever invariant its contents break."""
    n = len(node.keys)
    if n > node.max_entries:
        raise ValueError(f"node {node.blocknr}: {n} entries do not fit in {node.max_entries}")
    write_block(dev, node.blocknr, node.pack())


def swap_keys(dev: BlockDevice, b: int, i: int, j: int) -> None:
    """Exchange keys i and j of node b (values stay), breaking key order."""
    node = read_node(dev, b)
    node.keys[i], node.keys[j] = node.keys[j], node.keys[i]
    write_node(dev, node)


def set_key(dev: BlockDevice, b: int, i: int, key: int) -> None:
    node = read_node(dev, b)
    node.keys[i] = key
    write_node(dev, node)


def set_nr_entries(dev: BlockDevice, b: int, nr_entries: int) -> None:
    """Store a different nr_entries in node b's header (the arrays are left alone)."""
    buf = read_block(dev, b)
    struct.pack_into("<I", buf, 16, nr_entries)
    _restamp(buf, BlockType.BTREE_NODE)
    write_block(dev, b, buf)


def leaves(dev: BlockDevice, root: int) -> list[int]:
    """The leaf blocks of the tree at root, left to right."""
    node = read_node(dev, root)
    if node.is_leaf:
        return [root]
    return [leaf for child in node.values for leaf in leaves(dev, child)]


def path_to_leaf(dev: BlockDevice, root: int, key: int) -> list[tuple[int, int]]:
    """(block, index) from root down to the leaf where key is (or would be); the leaf's index is
    key's position in it."""
    out = []
    node = read_node(dev, root)
    while not node.is_leaf:
        i = max(0, bisect_right(node.keys, key) - 1)
        out.append((node.blocknr, i))
        node = read_node(dev, node.values[i])
    i = bisect_right(node.keys, key) - 1
    out.append((node.blocknr, i))
    return out


def lookup(dev: BlockDevice, root: int, key: int) -> int | None:
    block, i = path_to_leaf(dev, root, key)[-1]
    node = read_node(dev, block)
    return node.values[i] if 0 <= i < len(node.keys) and node.keys[i] == key else None


def make_underfull(dev: BlockDevice, parent: int, i: int, keep: int) -> int:
    """Move all but ``keep`` entries of child i of node parent to the front of child i+1.

    Lowers parent key[i+1] to the new first key of child i+1, so the only broken invariant is child
    i's fill; returns child i's block.  Raises ValueError if child i+1 has no room::

        parent  [k0        k1      ]          [k0     m       ]
                  |         |            ->      |      |
        child i [a b c d m n]  [k1 ..]        [a b c d]  [m n k1 ..]
    """
    p = read_node(dev, parent)
    left, right = read_node(dev, p.values[i]), read_node(dev, p.values[i + 1])
    moved_keys, moved_values = left.keys[keep:], left.values[keep:]
    if not moved_keys:
        raise ValueError(f"child {i} of block {parent} has only {len(left.keys)} entries")
    if len(right.keys) + len(moved_keys) > right.max_entries:
        raise ValueError(f"child {i + 1} of block {parent} has no room for {len(moved_keys)} entries")
    del left.keys[keep:], left.values[keep:]
    right.keys[:0], right.values[:0] = moved_keys, moved_values
    p.keys[i + 1] = moved_keys[0]
    for node in (left, right, p):
        write_node(dev, node)
    return left.blocknr


# -- thin trees ----------------------------------------------------------------------------------


def device_root(dev: BlockDevice, dev_id: int, snapshot: bool = False) -> int:
    """The root of device dev_id's mapping subtree."""
    root = lookup(dev, superblock(dev, snapshot).data_mapping_root, dev_id)
    if root is None:
        raise KeyError(f"no device {dev_id} in the mapping tree")
    return root


def details_leaf(dev: BlockDevice, dev_id: int, snapshot: bool = False) -> tuple[int, int]:
    """(leaf block, index) of device dev_id's details record."""
    block, i = path_to_leaf(dev, superblock(dev, snapshot).device_details_root, dev_id)[-1]
    if read_node(dev, block).keys[i:i + 1] != [dev_id]:
        raise KeyError(f"no device {dev_id} in the details tree")
    return block, i


def set_mapped_blocks(dev: BlockDevice, dev_id: int, mapped_blocks: int) -> int:
    """Store a wrong mapped_blocks in a device's details; returns the details leaf block."""
    block, i = details_leaf(dev, dev_id)
    node = read_node(dev, block)
    d = DeviceDetails.unpack(node.values[i])
    node.values[i] = DeviceDetails(mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time).pack()
    write_node(dev, node)
    return block


def remove_details(dev: BlockDevice, dev_id: int) -> int:
    """Delete a device's details record from its leaf (leaving its mapping tree); returns the leaf."""
    block, i = details_leaf(dev, dev_id)
    node = read_node(dev, block)
    del node.keys[i], node.values[i]
    write_node(dev, node)
    return block


def set_mapping(
    dev: BlockDevice, dev_id: int, vblock: int, *, data_block: int | None = None, time: int | None = None
) -> int:
    """Change an existing mapping's data block and/or time in place (no reference counts change);
    returns the leaf block."""
    block, i = path_to_leaf(dev, device_root(dev, dev_id), vblock)[-1]
    node = read_node(dev, block)
    if node.keys[i:i + 1] != [vblock]:
        raise KeyError(f"device {dev_id} does not map virtual block {vblock}")
    old_block, old_time = unpack_block_time(node.values[i])
    node.values[i] = pack_block_time(old_block if data_block is None else data_block,
                                     old_time if time is None else time)
    write_node(dev, node)
    return block


# -- space maps ----------------------------------------------------------------------------------


def bitmap_of(dev: BlockDevice, which: SpaceMapName, b: int) -> int:
    """The bitmap block holding block b's entry in the named space map."""
    sb = superblock(dev)
    i = b // ENTRIES_PER_BLOCK
    if which == "metadata":
        root = sb.metadata_sm_root.bitmap_root
        return unpack_index_block(read_block(dev, root), root)[i].blocknr
    value = lookup(dev, sb.data_sm_root.bitmap_root, i)
    if value is None:
        raise KeyError(f"data space map has no bitmap {i}")
    return IndexEntry.unpack(value).blocknr


def space_map_entry(dev: BlockDevice, which: SpaceMapName, b: int) -> int:
    """Block b's 2-bit bitmap entry (3 means: see the overflow tree)."""
    bmp = bitmap_of(dev, which, b)
    return unpack_bitmap(read_block(dev, bmp), bmp)[b % ENTRIES_PER_BLOCK]


def set_space_map_entry(dev: BlockDevice, which: SpaceMapName, b: int, value: int) -> int:
    """Overwrite block b's bitmap entry with value (0..3), re-stamping the bitmap; returns the bitmap
    block.  Index entries, nr_allocated and the overflow tree are left alone."""
    if not 0 <= value <= 3:
        raise ValueError("bitmap entries hold 0..3")
    bmp = bitmap_of(dev, which, b)
    entries = unpack_bitmap(read_block(dev, bmp), bmp)
    entries[b % ENTRIES_PER_BLOCK] = value
    write_block(dev, bmp, pack_bitmap(entries, bmp))
    return bmp


def set_metadata_index_entry(
    dev: BlockDevice, i: int, *, nr_free: int | None = None, none_free_before: int | None = None
) -> int:
    """Change the hints of the metadata space map's index entry i; returns the index block."""
    root = superblock(dev).metadata_sm_root.bitmap_root
    entries = unpack_index_block(read_block(dev, root), root)
    e = entries[i]
    entries[i] = IndexEntry(e.blocknr, e.nr_free if nr_free is None else nr_free,
                            e.none_free_before if none_free_before is None else none_free_before)
    write_block(dev, root, pack_index_block(entries, root))
    return root
