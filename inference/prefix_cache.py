"""The prefix tree: which KV blocks already hold which token prefixes.

Pure Python (no torch). A trie over *full* blocks: each node is one block of `block_size`
token ids whose KV lives in block `node.block`, and its path from the root is the whole
prefix that KV was computed from (a block's KV depends on every token before it, so the
key is the path, not the block alone). Chosen over a token-granular radix tree (SGLang)
because our KV lives in blocks of 16 tokens: sharing a partial block would need copy-on-write
of its rows, for at most 15 tokens saved per hit. Chosen over vLLM's hashed full blocks
because the parent links give leaf-first eviction and reference counting along a path for
free, and keys are the tokens themselves (no hash collisions to reason about).

Invariants:
- a node's `refs` counts the sequences whose block tables hold its block; a sequence holds a
  path from the root, so a referenced node's ancestors are referenced too, and every node
  with `refs == 0` heads a subtree of unreferenced nodes: all of them are evictable;
- `num_evictable` is the number of nodes with `refs == 0`;
- a block id is in at most one node."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

TokenKey = tuple[int, ...]


@dataclass(slots=True, eq=False)
class Node:
    key: TokenKey
    block: int
    parent: Node | None
    children: dict[TokenKey, Node] = field(default_factory=dict)
    refs: int = 0
    last_used: int = 0  # a logical clock: higher is more recent


@dataclass(frozen=True, slots=True)
class Match:
    """The cached blocks of a prefix, root first; `unreferenced` of them are evictable now
    (holding them takes them out of the pool's spare capacity)."""

    nodes: tuple[Node, ...]
    unreferenced: int

    @property
    def blocks(self) -> list[int]:
        return [n.block for n in self.nodes]


NO_MATCH = Match((), 0)


class PrefixTree:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self._root = Node((), -1, None)
        self._clock = itertools.count(1)
        self.num_nodes = 0
        self.num_evictable = 0

    def key(self, tokens: Sequence[int], index: int) -> TokenKey:
        """The key of block `index` of `tokens`."""
        bs = self.block_size
        return tuple(tokens[index * bs : (index + 1) * bs])

    def match(self, tokens: Sequence[int], max_blocks: int) -> Match:
        """The longest cached prefix of `tokens`, in whole blocks, at most `max_blocks`."""
        node, nodes, free = self._root, [], 0
        for i in range(min(max_blocks, len(tokens) // self.block_size)):
            child = node.children.get(self.key(tokens, i))
            if child is None:
                break
            nodes.append(child)
            free += child.refs == 0
            node = child
        return Match(tuple(nodes), free) if nodes else NO_MATCH

    def acquire(self, nodes: Sequence[Node]) -> None:
        now = next(self._clock)
        for n in nodes:
            self.num_evictable -= n.refs == 0
            n.refs += 1
            n.last_used = now

    def release(self, nodes: Sequence[Node]) -> None:
        now = next(self._clock)
        # Leaf first, so that an interrupted release never leaves a child held under a free parent.
        for n in reversed(nodes):
            if n.refs <= 0:
                raise ValueError(f"block {n.block} released more often than acquired")
            n.refs -= 1
            n.last_used = now
            self.num_evictable += n.refs == 0

    def extend(self, parent: Node | None, key: TokenKey, block: int) -> Node:
        """The child of `parent` (None: the root) for `key`, held once more by the caller. If
        it is new, it takes `block`; if it already existed, its own block is the one to use
        and `block` stays the caller's (it holds the same tokens' KV, computed twice)."""
        if len(key) != self.block_size:
            raise ValueError(f"a key of {len(key)} tokens; blocks hold {self.block_size}")
        parent = parent or self._root
        if parent is not self._root and parent.refs == 0:
            raise ValueError("extending a prefix nobody holds")
        node = parent.children.get(key)
        if node is None:
            node = parent.children[key] = Node(key, block, parent)
            self.num_nodes += 1
            self.num_evictable += 1  # acquire below takes it off again
        self.acquire([node])
        return node

    def evict(self, n: int) -> list[int]:
        """Drop up to `n` unreferenced nodes, least recently used leaves first; returns their
        blocks (now free). A parent becomes a leaf once its children are gone."""
        heap = [(node.last_used, id(node), node) for node in self._leaves() if node.refs == 0]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < n:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key]
            self.num_nodes -= 1
            self.num_evictable -= 1
            freed.append(node.block)
            if parent is not self._root and not parent.children and parent.refs == 0:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        return freed

    def clear(self) -> list[int]:
        """Forget every cached prefix (the KV behind them is gone: a stage was replaced);
        returns their blocks. Only legal while nothing holds any."""
        if self.num_evictable != self.num_nodes:
            raise ValueError(f"{self.num_nodes - self.num_evictable} cached blocks are still held")
        return self.evict(self.num_nodes)

    def _leaves(self) -> list[Node]:
        leaves, stack = [], list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                leaves.append(node)
        return leaves
