"""B-tree rules of the checker: walk a tree once, check every node, count every pointer.

What a walk verifies (thin_check 0.9.0's node checks plus the ones it misses)
------------------------------------------------------------------------------
Per node: checksum and type, stored block number, flags exactly INTERNAL or LEAF, value size (8 for
internal nodes, the tree's value size for leaves), max_entries fits the block, is a multiple of 3 and
is the kernel's capacity, nr_entries within it, at least max/3 entries unless the node is the root of
its (sub)tree, keys strictly ascending.  Between nodes: parent key[i] <= first key under child i, every
key under child i < parent key[i+1], each leaf's first key above the previous leaf's last key in the
same (sub)tree, all leaves of a tree at one depth, no cycles, no block used by two kinds of tree.

Sharing and counting
--------------------
Every pointer followed adds one to the block's expected metadata reference count (``RefCounts``),
but a node already seen is not descended into again (thin_check's ``count_btree_blocks``; the
kernel's rule that a shared node's children have one parent block).  What the first visit learned
is memoised as a ``Summary`` -- height, first and last key, number of leaf entries below -- so a
shared subtree reached again from a snapshot is still checked against its new parent in O(1), and
a snapshot's ``mapped_blocks`` can be compared without walking shared leaves twice.  Leaf handlers
(``LeafFn``) see each distinct leaf exactly once, which is what makes data reference counts come out
as "number of distinct leaves naming the block".

Decoding is lenient (a wrong block number or a non-canonical capacity still lets the node be read);
a node whose header makes its contents unusable is reported and treated as missing.  Keys are
decoded in bulk with one ``struct.unpack_from`` per node; values are left in the buffer for the leaf
handler, which decodes only what it needs.
"""

from __future__ import annotations

import dataclasses
import operator
import struct
from collections.abc import Callable
from typing import Final

from devmapper.format.btree_node import INTERNAL_NODE, LEAF_NODE, NODE_HEADER_SIZE, calc_max_entries
from devmapper.format.checksum import BlockType
from devmapper.thin.check_base import BlockReader, DefectRule, Progress, RefCounts
from devmapper.units import METADATA_BLOCK_SIZE

Nodes = tuple[tuple[int, int], ...]
_HEADER = struct.Struct("<IIQIIII")
_PROGRESS_EVERY: Final = 256
WALK_STAGE: Final = "walking trees"


@dataclasses.dataclass(frozen=True, slots=True)
class TreeKind:
    """What a tree's leaves hold.  Two trees of different kinds must never share a node.

    ``replay``: leaves of this kind are shown to the leaf handler again (with ``replay=True``) when a
    later walk reaches them through a shared node, because each walk needs their contents (the
    details and top-level trees, shared between the live pool and its metadata snapshot).  Their
    decoded nodes are kept for that; mapping leaves are not (they are many, and seen once).
    """

    name: str
    value_size: int
    replay: bool = False


DETAILS: Final = TreeKind("device details", 24, replay=True)
TOP_LEVEL: Final = TreeKind("top-level mapping", 8, replay=True)
MAPPING: Final = TreeKind("mapping", 8)
SM_INDEX: Final = TreeKind("space map index", 16)
OVERFLOW: Final = TreeKind("reference count", 4)


@dataclasses.dataclass(frozen=True, slots=True)
class RawNode:
    """A node whose header passed the checks; values stay encoded in ``buf`` from ``voff``."""

    blocknr: int
    leaf: bool
    keys: list[int]
    buf: bytes
    voff: int
    value_size: int

    def values_u64(self) -> tuple[int, ...]:
        return struct.unpack_from(f"<{len(self.keys)}Q", self.buf, self.voff)

    def values_u32(self) -> tuple[int, ...]:
        return struct.unpack_from(f"<{len(self.keys)}I", self.buf, self.voff)

    def records(self, fmt: struct.Struct) -> list[tuple[int, ...]]:
        """Values decoded with fmt (whose size must be the value size), one tuple per entry."""
        end = self.voff + len(self.keys) * self.value_size
        return list(fmt.iter_unpack(self.buf[self.voff : end]))


@dataclasses.dataclass(frozen=True, slots=True)
class Summary:
    """What a finished visit learned about a subtree (memoised per block)."""

    kind: TreeKind
    height: int  # 0 for a leaf
    first: int | None  # smallest key below (None: empty, or unknown because the first child is damaged)
    last: int | None  # largest key below (None: empty, or unknown)
    nr_entries: int  # leaf entries below
    complete: bool  # False if some node below was unreadable


#: ``on_leaf(node, path, nodes, replay)``: a distinct leaf, or (``replay``) one already checked and
#: counted by an earlier walk that this walk reaches through a shared node.
LeafFn = Callable[[RawNode, str, Nodes, bool], None]


class _InProgress:
    """Marker for a node whose visit has started but not finished (seeing it again is a cycle)."""


_IN_PROGRESS: Final = _InProgress()
_UNSEEN: Final = object()


@dataclasses.dataclass(slots=True)
class _TreeState:
    kind: TreeKind
    path: str
    on_leaf: LeafFn | None
    prev_last: int | None = None


class TreeWalker:
    """Walks trees over one ``BlockReader``, sharing the memo (and the counts) between all walks."""

    def __init__(
        self, reader: BlockReader, counts: RefCounts | None, progress: Progress | None = None, total_hint: int = 0
    ) -> None:
        self.reader = reader
        self.sink = reader.sink
        self.counts = counts
        self.progress = progress
        self.total_hint = total_hint
        self._memo: dict[int, Summary | _InProgress | None] = {}
        self._replayable: dict[int, RawNode] = {}

    def count(self, b: int) -> None:
        """One more expected reference to metadata block b (ignored when not counting or out of range)."""
        counts = self.counts
        if counts is not None and 0 <= b < counts.nr_blocks:
            counts.inc(b)

    def walk(self, root: int, kind: TreeKind, path: str, on_leaf: LeafFn | None = None) -> Summary | None:
        """Check (and count) the tree at root; None if its root is unusable.  Counts the root pointer."""
        return self._visit(root, _TreeState(kind, path, on_leaf), True, ())

    def summary_of(self, b: int) -> Summary | None:
        """The memoised summary of an already visited node (no counting, no checks)."""
        seen = self._memo.get(b)
        return seen if isinstance(seen, Summary) else None

    def finish_progress(self) -> None:
        if self.progress is not None:
            done = len(self._memo)
            self.progress(WALK_STAGE, done, done)

    # -- visiting ----------------------------------------------------------------------------------

    def _visit(self, b: int, st: _TreeState, is_root: bool, nodes: Nodes) -> Summary | None:
        self.count(b)
        seen = self._memo.get(b, _UNSEEN)
        if seen is not _UNSEEN:
            return self._revisit(b, seen, st, nodes)
        self._memo[b] = _IN_PROGRESS
        buf = self.reader.read(b, BlockType.BTREE_NODE, st.path, nodes)
        node = None if buf is None else self._decode(b, buf, st, is_root, nodes)
        summary = None
        if node is not None:
            summary = self._leaf(node, st, nodes) if node.leaf else self._internal(node, st, nodes)
        self._memo[b] = summary
        if node is not None and summary is not None and summary.complete and st.kind.replay:
            self._replayable[b] = node
        self._tick()
        return summary

    def _revisit(self, b: int, seen: object, st: _TreeState, nodes: Nodes) -> Summary | None:
        if seen is _IN_PROGRESS:
            self.sink.add(DefectRule.CYCLE, b, "btree node is its own ancestor", path=st.path, nodes=nodes)
            return None
        if not isinstance(seen, Summary):
            return None  # damaged; reported at the first visit
        if seen.kind != st.kind:
            self.sink.add(DefectRule.CROSS_LINKED, b, f"{seen.kind.name} tree node also used in a {st.kind.name} tree",
                          path=st.path, nodes=nodes)
            return None
        self._check_leaf_order(b, seen.first, seen.last, st, nodes)
        if st.on_leaf is not None and seen.kind.replay:
            self._replay(b, st, nodes)
        return seen

    def _replay(self, b: int, st: _TreeState, nodes: Nodes) -> None:
        """Show the leaves under an already checked node to this walk's leaf handler again.

        Only complete subtrees are kept for replay, and a complete subtree has no cycle."""
        node = self._replayable.get(b)
        if node is None or st.on_leaf is None:
            return
        if node.leaf:
            st.on_leaf(node, st.path, nodes, True)
            return
        for key, child in zip(node.keys, node.values_u64(), strict=True):
            self._replay(child, st, (*nodes, (b, key)))

    def _tick(self) -> None:
        done = len(self._memo)
        if self.progress is not None and done % _PROGRESS_EVERY == 0:
            self.progress(WALK_STAGE, done, max(done, self.total_hint))

    # -- one node ----------------------------------------------------------------------------------

    def _decode(self, b: int, buf: bytes, st: _TreeState, is_root: bool, nodes: Nodes) -> RawNode | None:
        """Check the header; return the node if its keys and values can be located, else None."""
        _csum, flags, _bnr, n, max_entries, vs, _pad = _HEADER.unpack_from(buf, 0)
        add = self.sink.add
        if flags not in (INTERNAL_NODE, LEAF_NODE):
            add(DefectRule.BAD_FLAGS, b, f"btree node has flags {flags}, expected 1 (internal) or 2 (leaf)",
                path=st.path, nodes=nodes)
            return None
        leaf = flags == LEAF_NODE
        want = st.kind.value_size if leaf else 8
        if vs != want:
            what = f"{st.kind.name} leaf" if leaf else "internal node"
            add(DefectRule.VALUE_SIZE_MISMATCH, b, f"btree node value size {vs}, expected {want} for a {what}",
                path=st.path, nodes=nodes)
            return None
        if NODE_HEADER_SIZE + (8 + vs) * max_entries > METADATA_BLOCK_SIZE:
            add(DefectRule.MAX_ENTRIES_WRONG, b, f"btree node max_entries {max_entries} overruns the block",
                path=st.path, nodes=nodes)
            return None
        canonical = calc_max_entries(vs)
        if max_entries % 3:
            add(DefectRule.MAX_ENTRIES_NOT_DIV3, b, f"btree node max_entries {max_entries} is not a multiple of 3",
                path=st.path, nodes=nodes)
        elif max_entries != canonical:
            add(DefectRule.MAX_ENTRIES_WRONG, b, f"btree node max_entries {max_entries}, expected {canonical}",
                fatal=False, path=st.path, nodes=nodes)
        if n > min(max_entries, canonical):
            add(DefectRule.TOO_MANY_ENTRIES, b,
                f"btree node has {n} entries, at most {min(max_entries, canonical)} allowed",
                path=st.path, nodes=nodes)
            if n > max_entries:
                return None
        self._check_fill(b, n, canonical // 3, leaf, is_root, st, nodes)
        keys = list(struct.unpack_from(f"<{n}Q", buf, NODE_HEADER_SIZE))
        self._check_order(b, keys, st, nodes)
        return RawNode(b, leaf, keys, buf, NODE_HEADER_SIZE + 8 * max_entries, vs)

    def _check_fill(
        self, b: int, n: int, minimum: int, leaf: bool, is_root: bool, st: _TreeState, nodes: Nodes
    ) -> None:
        if not is_root and n < minimum:
            self.sink.add(DefectRule.UNDERFULL, b, f"btree node underfull: {n} entries, at least {minimum} expected",
                          path=st.path, nodes=nodes)
        elif not leaf and n == 0:
            self.sink.add(DefectRule.UNDERFULL, b, "internal btree node has no entries", path=st.path, nodes=nodes)

    def _check_order(self, b: int, keys: list[int], st: _TreeState, nodes: Nodes) -> None:
        if all(map(operator.lt, keys, keys[1:])):
            return
        i = next(i for i in range(1, len(keys)) if keys[i - 1] >= keys[i])
        self.sink.add(DefectRule.KEYS_OUT_OF_ORDER, b,
                      f"btree keys out of order: key[{i - 1}] = {keys[i - 1]}, key[{i}] = {keys[i]}",
                      path=st.path, nodes=nodes)

    def _check_leaf_order(self, b: int, first: int | None, last: int | None, st: _TreeState, nodes: Nodes) -> None:
        if first is None:
            return
        prev = st.prev_last
        if prev is not None and first <= prev:
            self.sink.add(DefectRule.LEAF_KEYS_OVERLAP, b,
                          f"first key {first} is not above the previous leaf's last key {prev}",
                          path=st.path, nodes=nodes)
        if last is not None:
            st.prev_last = last

    def _leaf(self, node: RawNode, st: _TreeState, nodes: Nodes) -> Summary:
        keys = node.keys
        first, last = (keys[0], keys[-1]) if keys else (None, None)
        self._check_leaf_order(node.blocknr, first, last, st, nodes)
        if st.on_leaf is not None:
            st.on_leaf(node, st.path, nodes, False)
        return Summary(st.kind, 0, first, last, len(keys), True)

    def _internal(self, node: RawNode, st: _TreeState, nodes: Nodes) -> Summary:
        keys, children = node.keys, node.values_u64()
        heights: set[int] = set()
        total, complete = 0, True
        first: int | None = None
        last: int | None = None
        for i, (key, child) in enumerate(zip(keys, children, strict=True)):
            sub = self._visit(child, st, False, (*nodes, (node.blocknr, key)))
            if sub is None:
                complete = False
                first = key if i == 0 else first
                last = None
                continue
            heights.add(sub.height)
            total += sub.nr_entries
            complete = complete and sub.complete
            first = sub.first if i == 0 else first
            last = sub.last
            self._check_child_keys(node, i, child, sub, st, nodes)
        if len(heights) > 1:
            self.sink.add(DefectRule.UNEQUAL_DEPTH, node.blocknr,
                          f"children have different heights {sorted(heights)}", path=st.path, nodes=nodes)
        height = 1 + max(heights, default=0)
        return Summary(st.kind, height, first, last, total, complete)

    def _check_child_keys(
        self, node: RawNode, i: int, child: int, sub: Summary, st: _TreeState, nodes: Nodes
    ) -> None:
        key = node.keys[i]
        where = (*nodes, (node.blocknr, key))
        if sub.first is not None and key > sub.first:
            self.sink.add(DefectRule.PARENT_KEY_TOO_BIG, child,
                          f"first key {sub.first} is below its parent's key {key} (parent block {node.blocknr})",
                          path=st.path, nodes=where)
        if i + 1 < len(node.keys) and sub.last is not None and sub.last >= node.keys[i + 1]:
            self.sink.add(DefectRule.KEY_OUTSIDE_PARENT_RANGE, child,
                          f"last key {sub.last} is not below its parent's next key {node.keys[i + 1]} "
                          f"(parent block {node.blocknr})", path=st.path, nodes=where)

