"""Paged KV cache bookkeeping: a fixed pool of blocks and a block table per sequence.

Pure Python (no torch): the tensors themselves live with the model runner, which
indexes them with the slot numbers computed here. Slot `s` is row `s % block_size`
of block `s // block_size`."""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

from .errors import CacheFull
from .prefix_cache import NO_MATCH, Match, Node, PrefixTree
from .sequence import Sequence


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockPool:
    """A fixed set of block ids; each id is either free or owned by exactly one table."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheFull(n, len(self._free), self.num_blocks)
        ids = [self._free.popleft() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if i not in self._used:
                raise ValueError(f"block {i} freed twice or never allocated")
            self._used.remove(i)
            self._free.append(i)


@dataclass(slots=True)
class PrefixStats:
    """Counters since start (or since the last reset of the tree)."""

    lookups: int = 0  # sequences admitted while caching
    lookup_tokens: int = 0  # their tokens (prompt, plus output for a resumed sequence)
    hit_tokens: int = 0  # of those, tokens whose KV came from the tree
    evicted_blocks: int = 0
    # Now (filled in by `KVCacheManager.prefix_stats`): blocks in the tree, and their tokens.
    cached_blocks: int = 0
    cached_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


class KVCacheManager:
    """Grows and frees the block tables of sequences over one `BlockPool`, and, with
    `prefix_cache`, shares full blocks of identical prefixes through a `PrefixTree`.

    Invariants: every block id in a live sequence's `block_table` is used in the pool; a
    sequence's table is the path it holds in the tree (`_paths`, shared blocks, root first)
    followed by blocks it owns alone, and no owned id appears in two tables or in the tree.
    A block is thus free, owned by one sequence, or cached (in the tree, held by `refs`
    sequences; evictable when none)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = False):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.tree = PrefixTree(block_size) if prefix_cache else None
        self.stats = PrefixStats()
        self._paths: dict[int, list[Node]] = {}  # seq_id -> the cached blocks it holds

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get now: free ones, and cached ones nobody holds (evicted on demand)."""
        return self.pool.num_free + (self.tree.num_evictable if self.tree else 0)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by live sequences."""
        return self.pool.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return self.tree.num_nodes if self.tree else 0

    def prefix_stats(self) -> PrefixStats | None:
        """A snapshot of the prefix cache's counters; None when it is off."""
        if self.tree is None:
            return None
        n = self.tree.num_nodes
        return dataclasses.replace(self.stats, cached_blocks=n, cached_tokens=n * self.block_size)

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def blocks_needed(self, seq: Sequence, num_tokens: int, match: Match = NO_MATCH) -> int:
        """New blocks `seq` needs so that its table (plus `match`) covers `num_tokens` tokens."""
        have = len(seq.block_table) + len(match.nodes)
        return max(0, blocks_for_tokens(num_tokens, self.block_size) - have)

    def can_allocate(self, seq: Sequence, num_tokens: int, match: Match = NO_MATCH) -> bool:
        # Holding the match's unreferenced blocks takes them out of the evictable spare.
        return self.blocks_needed(seq, num_tokens, match) <= self.num_free_blocks - match.unreferenced

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_tokens`, evicting cached blocks nobody holds
        if the free ones are too few; all or nothing (raises CacheFull)."""
        n = self.blocks_needed(seq, num_tokens)
        short = n - self.pool.num_free
        if short > 0 and self.tree is not None and n <= self.num_free_blocks:
            evicted = self.tree.evict(short)
            self.pool.free(evicted)
            self.stats.evicted_blocks += len(evicted)
        seq.block_table.extend(self.pool.allocate(n))

    def match(self, seq: Sequence) -> Match:
        """The cached prefix a fresh (or preempted) sequence can start from. Never its last
        token: that one must run to give logits. Sequences that score their prompt
        (`prompt_logprobs`) compute it all."""
        if self.tree is None or seq.params.prompt_logprobs is not None or seq.block_table:
            return NO_MATCH
        return self.tree.match(seq.cache_tokens, (seq.num_tokens - 1) // self.block_size)

    def adopt(self, seq: Sequence, match: Match) -> None:
        """Start a blockless sequence from `match`: it holds those blocks and their tokens
        count as computed."""
        if seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"seq {seq.seq_id} already has blocks")
        if self.tree is None:
            return
        self.tree.acquire(match.nodes)
        self._paths[seq.seq_id] = list(match.nodes)
        seq.block_table = match.blocks
        hit = len(match.nodes) * self.block_size
        seq.num_computed_tokens = hit
        if not seq.output_token_ids:  # a resumed sequence keeps its first admission's figure
            seq.num_cached_tokens = hit
        self.stats.lookups += 1
        self.stats.lookup_tokens += seq.num_tokens
        self.stats.hit_tokens += hit

    def cache_computed(self, seq: Sequence) -> None:
        """Put the blocks `seq` has filled since the last call into the tree. Where another
        sequence cached the same prefix first, `seq` switches to that block and frees its own."""
        if self.tree is None:
            return
        path = self._paths.setdefault(seq.seq_id, [])
        full = seq.num_computed_tokens // self.block_size
        if full <= len(path):
            return
        bs, table = self.block_size, seq.block_table
        for i in range(len(path), full):
            # Keyed by cache_slice: a picture's tokens by its content, not by their pad token id.
            key = tuple(seq.cache_slice(i * bs, (i + 1) * bs))
            node = self.tree.extend(path[-1] if path else None, key, table[i])
            if node.block != table[i]:
                self.pool.free([table[i]])
                table[i] = node.block
            path.append(node)

    def cached_path_end(self, seq: Sequence) -> Node | None:
        """The tree node of `seq`'s last cached block (None: none cached yet)."""
        path = self._paths.get(seq.seq_id)
        return path[-1] if path else None

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks: the cached ones stay in the tree, the rest return to the pool."""
        path = self._paths.pop(seq.seq_id, [])
        if self.tree is not None and path:
            self.tree.release(path)
        self.pool.free(seq.block_table[len(path) :])
        seq.block_table = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (the runner that held their KV is gone); only while no
        sequence holds blocks. Returns the number of blocks dropped."""
        if self.tree is None:
            return 0
        dropped = self.tree.clear()
        self.pool.free(dropped)
        return len(dropped)

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
