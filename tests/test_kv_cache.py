"""Block pool and block tables: allocate, grow, free, exhaust, and no leaks."""

from __future__ import annotations

import random

import pytest

from inference.config import SamplingParams
from inference.errors import CacheFull
from inference.kv_cache import KVCacheManager
from inference.sequence import Sequence


def seq(n: int) -> Sequence:
    return Sequence(list(range(1, n + 1)), SamplingParams())


def test_allocate_grow_free():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    s = seq(5)
    kv.allocate(s, 5)
    assert len(s.block_table) == 2 and kv.num_free_blocks == 6
    kv.allocate(s, 8)  # still fits in two blocks
    assert len(s.block_table) == 2
    kv.allocate(s, 9)  # grows by one
    assert len(s.block_table) == 3 and kv.num_used_blocks == 3
    assert kv.slot(s, 8) == s.block_table[2] * 4
    kv.free(s)
    assert s.block_table == [] and kv.num_free_blocks == 8


def test_exhaust_is_typed_and_all_or_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a, b = seq(8), seq(8)
    kv.allocate(a, 8)
    with pytest.raises(CacheFull) as e:
        kv.allocate(b, 8)
    assert e.value.needed == 2 and e.value.free == 1
    assert b.block_table == [] and kv.num_free_blocks == 1  # nothing half-allocated
    assert not kv.can_allocate(b, 8) and kv.can_allocate(b, 4)


def test_double_free_is_refused():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    s = seq(3)
    kv.allocate(s, 3)
    table = list(s.block_table)
    kv.free(s)
    with pytest.raises(ValueError):
        kv.pool.free(table)


def test_no_leaks_after_1000_random_sequences():
    rnd = random.Random(0)
    kv = KVCacheManager(num_blocks=64, block_size=16)
    live: list[Sequence] = []
    for _ in range(1000):
        s = seq(rnd.randint(1, 200))
        try:
            kv.allocate(s, s.num_tokens)
            live.append(s)
        except CacheFull:
            pass
        for t in list(live):  # grow some, free some
            if rnd.random() < 0.3:
                try:
                    kv.allocate(t, t.num_tokens + rnd.randint(1, 40))
                except CacheFull:
                    kv.free(t)
                    live.remove(t)
            elif rnd.random() < 0.3:
                kv.free(t)
                live.remove(t)
        owned = [b for t in live for b in t.block_table]
        assert len(owned) == len(set(owned)) == kv.num_used_blocks
    for t in live:
        kv.free(t)
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 64
