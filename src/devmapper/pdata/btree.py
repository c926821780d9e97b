"""Copy-on-write B-trees of le64 keys (mirrors ``dm-btree.c``, ``dm-btree-remove.c``).

Vocabulary
----------
* A tree is named by its root block; every change returns the new root (roots move when shadowed).
* ``levels``: a 2-level tree (thin's mapping tree) has leaves at level 0 whose values are the roots of
  level-1 trees.  Those level-0 values are block pointers patched like internal pointers when the
  subtree root moves; their value type still increments a subtree root when a shared leaf is copied.
* ``ValueType`` (``struct dm_btree_value_type``): the value size and callbacks the tree calls when it
  duplicates a value (``inc``: a shared leaf was copied) or drops one (``dec``: removed or overwritten
  with a non-``equal`` value).  The tree never knows what values mean.

Invariants kept (what thin_check verifies)
------------------------------------------
keys strictly ascending in each node; parent key[i] <= first key of child i; every node except a
(sub)tree root holds at least max_entries / 3 entries; internal nodes have value_size 8; all leaves of a
tree are at the same depth.

Algorithms
----------
Insert descends shadowing the path (copying shared nodes and incrementing their children), inserts in
the leaf, and splits overfull nodes on the way back up; a root that splits gets a new internal root
above it.  When a key is smaller than key[0] of an internal node, key[0] is lowered to it, as the
kernel does.  Remove descends the same way, then repairs underfull children on the way up by merging
with a sibling (when both fit in one node) or redistributing evenly; an internal root left with one
child is replaced by that child.  ``remove_range`` repeats "find the first key >= begin, remove every
key of that leaf in range" (the kernel's ``dm_btree_remove_leaves``).

Cost: lookups and single changes are O(depth) block visits; a range removal is one descent per leaf.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator

from devmapper.format.btree_node import Node
from devmapper.pdata.transaction_manager import TransactionManager


@dataclasses.dataclass(frozen=True, slots=True)
class ValueType:
    size: int
    inc: Callable[[int], None] | None = None
    dec: Callable[[int], None] | None = None
    equal: Callable[[int, int], bool] | None = None

    def is_equal(self, a: int, b: int) -> bool:
        return self.equal(a, b) if self.equal is not None else a == b



def empty_tree(tm: TransactionManager, vt: ValueType) -> int:
    """A new tree: one empty leaf (``dm_btree_empty``)."""
    return tm.new_node(leaf=True, value_size=vt.size).blocknr


# ---------------------------------------------------------------------------------------------------
# lookups


def _child_index(node: Node, key: int) -> int:
    return bisect_right(node.keys, key) - 1


def lookup(tm: TransactionManager, root: int, key: int) -> int | None:
    """The value stored under key, or None."""
    node = tm.read_node(root)
    while not node.is_leaf:
        i = _child_index(node, key)
        if i < 0:
            return None
        node = tm.read_node(node.values[i])
    i = bisect_left(node.keys, key)
    if i < len(node.keys) and node.keys[i] == key:
        return node.values[i]
    return None


def lookup_next(tm: TransactionManager, root: int, key: int) -> tuple[int, int] | None:
    """The first (key, value) with key >= the given key, or None (``dm_btree_lookup_next``)."""
    node = tm.read_node(root)
    if node.is_leaf:
        i = bisect_left(node.keys, key)
        return (node.keys[i], node.values[i]) if i < len(node.keys) else None
    i = max(_child_index(node, key), 0)
    for j in range(i, len(node.keys)):
        found = lookup_next(tm, node.values[j], key)
        if found is not None:
            return found
    return None


def iterate(tm: TransactionManager, root: int, begin: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """(key, value) pairs with begin <= key < end in ascending order."""
    node = tm.read_node(root)
    if node.is_leaf:
        lo = bisect_left(node.keys, begin)
        hi = len(node.keys) if end is None else bisect_left(node.keys, end)
        yield from zip(node.keys[lo:hi], node.values[lo:hi], strict=True)
        return
    i = max(_child_index(node, begin), 0)
    for j in range(i, len(node.keys)):
        if end is not None and node.keys[j] >= end:
            break
        yield from iterate(tm, node.values[j], begin, end)


def lookup_range(tm: TransactionManager, root: int, begin: int, end: int) -> tuple[list[int], list[int]]:
    """The keys in [begin, end) and their values, as two lists in ascending key order.

    ``iterate`` for hot paths: one descent, then whole slices of each leaf (no per-key generator
    steps), so a range within one leaf costs a few node visits and two list slices.
    """
    keys: list[int] = []
    values: list[int] = []
    _collect_range(tm, root, begin, end, keys, values)
    return keys, values


def _collect_range(tm: TransactionManager, b: int, begin: int, end: int, keys: list[int], values: list[int]) -> None:
    node = tm.read_node(b)
    while not node.is_leaf:
        lo = max(bisect_right(node.keys, begin) - 1, 0)
        hi = bisect_left(node.keys, end, lo + 1)  # children lo..hi-1 may hold keys below end
        if hi - lo > 1:
            for child in node.values[lo:hi]:
                _collect_range(tm, child, begin, end, keys, values)
            return
        if node.keys[lo] >= end:  # only when begin is below the first key
            return
        node = tm.read_node(node.values[lo])
    lo = bisect_left(node.keys, begin)
    hi = bisect_left(node.keys, end, lo)
    if lo < hi:
        keys += node.keys[lo:hi]
        values += node.values[lo:hi]


def iterate_leaves(tm: TransactionManager, root: int) -> Iterator[Node]:
    """Every leaf in key order."""
    node = tm.read_node(root)
    if node.is_leaf:
        yield node
        return
    for child in node.values:
        yield from iterate_leaves(tm, child)


# ---------------------------------------------------------------------------------------------------
# shadowing helpers


def _shadow(tm: TransactionManager, b: int, vt: ValueType) -> Node:
    """Shadow a node; if it was shared, its children gain the copy as a second owner."""
    node, inc_children = tm.shadow_node(b)
    if inc_children:
        if not node.is_leaf:
            for child in node.values:
                tm.inc(child)
        elif vt.inc is not None:
            for v in node.values:
                vt.inc(v)
    return node


def _split(tm: TransactionManager, node: Node) -> Node:
    """Move the upper half of an overfull node into a new right sibling; return the sibling.

    Before: node [k0 .. kn]       After: node [k0 .. k(m-1)]   right [km .. kn]   (m = n // 2)
    Children and values move with their keys, so no reference counts change.
    """
    mid = len(node.keys) // 2
    right = tm.new_node(leaf=node.is_leaf, value_size=node.value_size)
    right.keys = node.keys[mid:]
    right.values = node.values[mid:]
    del node.keys[mid:]
    del node.values[mid:]
    return right


def _new_root(tm: TransactionManager, children: list[Node]) -> int:
    root = tm.new_node(leaf=False, value_size=8)
    root.keys = [c.keys[0] for c in children]
    root.values = [c.blocknr for c in children]
    return root.blocknr


# ---------------------------------------------------------------------------------------------------
# insert

LeafFn = Callable[[Node, int, bool], None]
"""Called with a writable leaf, the key's position, and whether the key is present there."""


def _insert(tm: TransactionManager, b: int, key: int, vt: ValueType, leaf_fn: LeafFn) -> list[Node]:
    """Shadow the path to key's leaf, apply leaf_fn there, split on the way up.

    Returns the node(s) now standing where b stood: one, or two after a split.
    """
    node = _shadow(tm, b, vt)
    if node.is_leaf:
        i = bisect_left(node.keys, key)
        leaf_fn(node, i, i < len(node.keys) and node.keys[i] == key)
    else:
        i = _child_index(node, key)
        if i < 0:
            i = 0
            node.keys[0] = key
        children = _insert(tm, node.values[i], key, vt, leaf_fn)
        node.values[i] = children[0].blocknr
        if len(children) == 2:
            node.keys.insert(i + 1, children[1].keys[0])
            node.values.insert(i + 1, children[1].blocknr)
    if len(node.keys) > node.max_entries:
        return [node, _split(tm, node)]
    return [node]


def _modify(tm: TransactionManager, root: int, key: int, vt: ValueType, leaf_fn: LeafFn) -> int:
    nodes = _insert(tm, root, key, vt, leaf_fn)
    return nodes[0].blocknr if len(nodes) == 1 else _new_root(tm, nodes)


def insert(tm: TransactionManager, root: int, key: int, value: int, vt: ValueType) -> tuple[int, bool]:
    """Insert or overwrite; returns (new root, whether the key was new).

    The caller's reference to ``value`` passes to the tree; an overwritten value that is not ``equal``
    to the new one is released with ``vt.dec`` (``dm_btree_insert_notify``).
    """
    inserted = [False]

    def leaf_fn(leaf: Node, i: int, present: bool) -> None:
        if present:
            old = leaf.values[i]
            leaf.values[i] = value
            if vt.dec is not None and not vt.is_equal(old, value):
                vt.dec(old)
        else:
            leaf.keys.insert(i, key)
            leaf.values.insert(i, value)
            inserted[0] = True

    return _modify(tm, root, key, vt, leaf_fn), inserted[0]


def update_subtree(
    tm: TransactionManager, root: int, key: int, top_vt: ValueType, change: Callable[[int], int]
) -> int:
    """In a 2-level tree, replace the subtree root stored under key by ``change(old_root)``.

    The top-level entry must exist.  The pointer is patched in place: ``change`` is expected to have
    shadowed the old root (which drops its reference), so no inc/dec is applied to the value.
    """

    def leaf_fn(leaf: Node, i: int, present: bool) -> None:
        if not present:
            raise KeyError(key)
        leaf.values[i] = change(leaf.values[i])

    return _modify(tm, root, key, top_vt, leaf_fn)


# ---------------------------------------------------------------------------------------------------
# remove


def _fix_underfull(tm: TransactionManager, parent: Node, i: int, child: Node, vt: ValueType) -> None:
    """Bring parent's child i (writable, underfull) back to >= max/3 entries with a sibling's help.

    Merge (both fit in one node)::        Redistribute (they don't)::
        parent [.. a b ..]                     parent [.. a b ..]     -> [.. a b' ..]
        left [x x]  right [y y y]  ->  left [x x y y y]    left [x]  right [y y y y y] -> [x y y] [y y y]

    The sibling is shadowed first (a shared sibling's children gain an owner); a merged-away right
    node is released, its children now owned by the left node.
    """
    j = i + 1 if i + 1 < len(parent.keys) else i - 1
    sibling = _shadow(tm, parent.values[j], vt)
    parent.values[j] = sibling.blocknr
    li, left, right = (i, child, sibling) if j > i else (j, sibling, child)
    total = len(left.keys) + len(right.keys)
    if total <= left.max_entries:
        left.keys.extend(right.keys)
        left.values.extend(right.values)
        right.keys, right.values = [], []
        del parent.keys[li + 1]
        del parent.values[li + 1]
        tm.dec(right.blocknr)
        return
    target = total // 2
    if len(left.keys) > target:
        move = len(left.keys) - target
        right.keys[0:0] = left.keys[-move:]
        right.values[0:0] = left.values[-move:]
        del left.keys[-move:]
        del left.values[-move:]
    else:
        move = target - len(left.keys)
        left.keys.extend(right.keys[:move])
        left.values.extend(right.values[:move])
        del right.keys[:move]
        del right.values[:move]
    parent.keys[li + 1] = right.keys[0]


def _remove(tm: TransactionManager, b: int, key: int, vt: ValueType, leaf_fn: LeafFn) -> Node:
    node = _shadow(tm, b, vt)
    if node.is_leaf:
        i = bisect_left(node.keys, key)
        leaf_fn(node, i, i < len(node.keys) and node.keys[i] == key)
        return node
    i = max(_child_index(node, key), 0)
    child = _remove(tm, node.values[i], key, vt, leaf_fn)
    node.values[i] = child.blocknr
    if len(child.keys) < child.max_entries // 3 and len(node.keys) > 1:
        _fix_underfull(tm, node, i, child, vt)
    return node


def _collapse_root(tm: TransactionManager, root: Node) -> int:
    """An internal root with one child is replaced by the child (its pointer passes up)."""
    while not root.is_leaf and len(root.keys) == 1:
        child = root.values[0]
        tm.dec(root.blocknr)
        root = tm.read_node(child)
    if not root.is_leaf and not root.keys:
        raise AssertionError("internal root with no entries")
    return root.blocknr


def _remove_in_leaf(tm: TransactionManager, root: int, key: int, vt: ValueType, leaf_fn: LeafFn) -> int:
    node = _remove(tm, root, key, vt, leaf_fn)
    return _collapse_root(tm, node)


def remove(tm: TransactionManager, root: int, key: int, vt: ValueType) -> tuple[int, int | None]:
    """Remove key; returns (new root, the removed value or None).  The value is released with vt.dec.

    A missing key changes nothing (no blocks are shadowed).
    """
    old = lookup(tm, root, key)
    if old is None:
        return root, None

    def leaf_fn(leaf: Node, i: int, present: bool) -> None:
        assert present
        del leaf.keys[i]
        v = leaf.values.pop(i)
        if vt.dec is not None:
            vt.dec(v)

    return _remove_in_leaf(tm, root, key, vt, leaf_fn), old


def remove_range(
    tm: TransactionManager,
    root: int,
    begin: int,
    end: int,
    vt: ValueType,
    on_remove: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Remove every key in [begin, end); returns (new root, number removed).

    ``on_remove(key, value)`` sees each removed entry before ``vt.dec`` releases its value.
    """
    removed = 0
    count = 0

    def leaf_fn(leaf: Node, i: int, present: bool) -> None:
        nonlocal count
        j = bisect_left(leaf.keys, end, lo=i)
        gone = leaf.values[i:j]
        keys = leaf.keys[i:j]
        del leaf.keys[i:j]
        del leaf.values[i:j]
        for k, v in zip(keys, gone, strict=True):
            if on_remove is not None:
                on_remove(k, v)
            if vt.dec is not None:
                vt.dec(v)
        count = j - i

    while True:
        found = lookup_next(tm, root, begin)
        if found is None or found[0] >= end:
            return root, removed
        first = found[0]
        root = _remove_in_leaf(tm, root, first, vt, leaf_fn)
        removed += count
        begin = first + 1


# ---------------------------------------------------------------------------------------------------
# delete


def delete_tree(tm: TransactionManager, root: int, vt: ValueType) -> None:
    """Drop one reference to a whole tree (``dm_btree_del``).

    A shared node just loses a reference; an unshared one releases its children (or its values, with
    ``vt.dec``) and is freed.
    """
    stack = [root]
    while stack:
        b = stack.pop()
        if tm.ref_count(b) > 1:
            tm.dec(b)
            continue
        node = tm.read_node(b)
        if node.is_leaf:
            if vt.dec is not None:
                for v in node.values:
                    vt.dec(v)
        else:
            stack.extend(node.values)
        tm.dec(b)
