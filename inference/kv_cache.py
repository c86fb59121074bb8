"""Paged KV cache bookkeeping: a fixed pool of blocks and a block table per sequence.

Pure Python (no torch): the tensors themselves live with the model runner, which
indexes them with the slot numbers computed here. Slot `s` is row `s % block_size`
of block `s // block_size`."""

from __future__ import annotations

from collections import deque

from .errors import CacheFull
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


class KVCacheManager:
    """Grows and frees the block tables of sequences over one `BlockPool`.

    Invariant: every block id in a live sequence's `block_table` is used in the pool,
    and no id appears in two tables."""

    def __init__(self, num_blocks: int, block_size: int):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that its table covers `num_tokens` tokens."""
        return max(0, blocks_for_tokens(num_tokens, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.pool.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_tokens`; all or nothing (raises CacheFull)."""
        seq.block_table.extend(self.pool.allocate(self.blocks_needed(seq, num_tokens)))

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
